"""The `skyloom` command: generate writes exactly what was asked or nothing, with one-line errors."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from skyloom.cli import main
import torch

from skyloom.video_io import read_video, write_video


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("generate", "plugins", "doctor"):
        assert command in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "64"], "size '64' is not WIDTHxHEIGHT"),
        (["--size", "62x64"], "width 62 is not a multiple of 4"),
        (["--frames", "0"], "frames must be between 1 and"),
        (["--steps", "0"], "steps must be between 1 and 1000"),
        (["--sampler", "warp-drive"], "unknown sampler 'warp-drive'; valid names: ddim, ddpm, dpmpp-2m, euler, heun"),
        (["--fps", "-1"], "fps must be > 0.0"),
        (["--guidance-interval", "0.8", "0.2"], "guidance_interval [0.8, 0.2] runs backwards"),
        (["--guidance-interval", "0", "2"], "each end of guidance_interval must be >= 0.0 and <= 1.0, got 2.0"),
    ],
)
def test_invalid_arguments_fail_with_one_line_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "out.mp4"
    result = invoke("generate", "a red circle", "-o", str(out), "--steps", "1", *args)
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, extra, message",
    [
        ("out.avi", [], "unsupported file type '.avi'; use .mp4 for video or .png for one frame"),
        ("out.png", ["--frames", "5"], "a .png holds one frame but --frames is 5"),
        ("missing/out.mp4", [], "does not exist"),
    ],
)
def test_bad_output_paths_fail_before_any_work(tmp_path, name, extra, message):
    result = invoke("generate", "a red circle", "-o", str(tmp_path / name), *extra)
    assert result.exit_code == 1 and message in result.output
    assert list(tmp_path.iterdir()) == []


def test_unwritable_directory(tmp_path, monkeypatch):
    # Simulated: root (as in CI) can write anywhere, so a chmod would prove nothing.
    monkeypatch.setattr("skyloom.cli.os.access", lambda path, mode: False)
    result = invoke("generate", "a red circle", "-o", str(tmp_path / "out.mp4"))
    assert result.exit_code == 1 and f"directory {tmp_path} is not writable" in result.output


@pytest.mark.parametrize(
    "name, frames, size",
    [("clip.mp4", 17, "64x64"), ("wide.mp4", 9, "80x48"), ("still.png", 1, "64x64")],
)
def test_generate_writes_the_requested_frames_and_size(tmp_path, name, frames, size):
    out = tmp_path / name
    result = invoke("generate", "a red circle moves left", "-o", str(out), "--frames", str(frames),
                    "--size", size, "--steps", "2", "--seed", "1", "--json")
    assert result.exit_code == 0, result.output
    video, _ = read_video(out)
    width, height = map(int, size.split("x"))
    assert tuple(video.shape) == (frames, height, width, 3)
    record = json.loads(result.stdout)
    assert record["frames"] == frames and record["seed"] == 1 and record["output"] == str(out)
    assert set(record["stages"]) >= {"prompt_safety", "text_encoding", "sampling", "decoding", "writing"}
    assert record["stages"]["sampling"]["seconds"] >= 0 and record["stages"]["sampling"]["peak_rss_bytes"] > 0
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_guidance_interval_reaches_the_request_and_the_signed_recipe(tmp_path):
    out = tmp_path / "out.mp4"
    result = invoke("generate", "a red circle", "-o", str(out), "--size", "32x32", "--steps", "2", "--guidance", "3",
                    "--guidance-interval", "0.3", "1", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["guidance_interval"] == [0.3, 1.0]
    text = invoke("verify", str(out)).output
    assert "guidance 3.0 for t in [0.3, 1.0]," in text


def test_conditioning_video_edit_and_loop_options_reach_the_request(tmp_path):
    from skyloom.video_io import write_image

    image, tail, clip, out = tmp_path / "first.png", tmp_path / "tail.mp4", tmp_path / "clip.mp4", tmp_path / "out.mp4"
    write_image(image, torch.full((48, 48, 3), 200, dtype=torch.uint8))
    write_video(tail, torch.full((4, 32, 32, 3), 60, dtype=torch.uint8), 8)
    write_video(clip, torch.full((9, 32, 32, 3), 60, dtype=torch.uint8), 12)
    common = ("-o", str(out), "--size", "32x32", "--steps", "2", "--seed", "1", "--json", "-q")
    result = invoke("generate", "a red circle", *common, "--frames", "9", "--condition", str(image), "--condition", f"{tail}@-4")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["conditioning"] == [{"start_frame": 0, "frames": 1}, {"start_frame": -4, "frames": 4}]
    result = invoke("generate", "a red circle", *common, "--video", str(clip), "--strength", "0.5")  # the video's 9 frames at 12 fps
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["video_edit"]["steps_run"] == 1 and record["fps"] == 12 and read_video(out)[0].shape[0] == 9
    result = invoke("generate", "a red circle", *common, "--frames", "9", "--loop")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["loop"]["kept_frames"] == [0, 5, 6, 7, 8]

    # Errors about known frames name the --condition that was given; a video cannot become a .png.
    result = invoke("generate", "a red circle", *common, "--frames", "17", "--condition", f"{image}@-1")
    assert result.exit_code == 1
    assert result.output.startswith(f"error: --condition {image}@-1 starts at frame 16, not on a latent frame boundary")
    result = invoke("generate", "a red circle", "-o", str(tmp_path / "edit.png"), "--video", str(clip))
    assert result.exit_code == 1 and "a .png holds one frame but --frames is 9" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strength", "0.5"], "--strength applies only to editing a video: add --video FILE"),
        (["--video", "missing.mp4"], "--video missing.mp4: cannot read 'missing.mp4': no such file"),
        (["--condition", "missing.png@-1"], "--condition missing.png@-1: cannot read 'missing.png': no such file"),
        (["--frames", "5", "--loop"], "a loop needs at least 6 frames, got 5"),
    ],
)
def test_bad_media_options_fail_with_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = invoke("generate", "a red circle", "-o", "out.mp4", "--steps", "1", *args)
    assert result.exit_code == 1 and result.output.startswith(f"error: {message}") and result.output.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_untrained_model_says_so_and_the_trained_one_does_not(tmp_path):
    from skyloom.bundle import DEFAULT_MODEL_DIR

    index = json.loads((DEFAULT_MODEL_DIR / "model_index.json").read_text())
    index["trained"] = False  # the same architecture, initialised from init_seed
    for part in ("video_autoencoder", "transformer"):
        index[part].pop("weights"), index[part].pop("dtype")
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "model_index.json").write_text(json.dumps(index))
    args = ["generate", "a red circle", "--frames", "1", "--size", "64x64", "--steps", "1"]
    result = invoke(*args, "-o", str(tmp_path / "x.mp4"), "--model", str(untrained))
    assert result.exit_code == 0, result.output
    assert "is untrained (random weights)" in result.stderr
    result = invoke(*args, "-o", str(tmp_path / "y.mp4"))
    assert result.exit_code == 0, result.output
    assert "is untrained" not in result.stderr


def test_plugins_json_lists_builtins_with_kinds():
    result = invoke("plugins", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert all({"kind", "name", "package", "version"} <= set(row) for row in rows)
    names = {(row["kind"], row["name"]) for row in rows}
    assert {("sampler", "euler"), ("text_encoder", "minilm"), ("video_autoencoder", "causal3d")} <= names


def test_doctor_reports_build_devices_and_versions():
    result = invoke("doctor", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["build"]["cuda"] in (True, False) and report["build"]["torch_version"]
    assert report["devices"]["cpu"]["usable"] is True
    assert "torch" in report["versions"] and "av" in report["versions"]
    assert "skyloom" in report["plugin_packages"]
    text = invoke("doctor").output
    assert "extension: built with" in text and "devices: cpu" in text


def test_strict_plugins_flag_makes_a_broken_plugin_fatal(tmp_path):
    from tests.test_registry import install_fake_dist

    install_fake_dist(tmp_path, "acme-broken", "0.1", {"acme_broken": "raise ImportError('boom')"}, {"broken": "acme_broken"})
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "SKYLOOM_STRICT_PLUGINS": ""}
    lenient = subprocess.run([sys.executable, "-m", "skyloom", "plugins"], capture_output=True, text=True, env=env)
    assert lenient.returncode == 0 and "sampler:" in lenient.stdout and "failed to load: broken (acme-broken)" in lenient.stderr
    strict = subprocess.run([sys.executable, "-m", "skyloom", "--strict-plugins", "plugins"], capture_output=True, text=True, env=env)
    assert strict.returncode == 1
    assert strict.stderr.strip().splitlines()[-1].startswith("error: skyloom plugin 'broken (acme-broken)' failed to load: ImportError: boom")


def test_refused_prompt_exits_3_with_one_line_and_writes_nothing(tmp_path, monkeypatch):
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("SKYLOOM_AUDIT_LOG", str(log))
    out = tmp_path / "out" / "x.mp4"
    out.parent.mkdir()
    result = invoke("generate", "a man being decapitated, blood everywhere", "-o", str(out), "--steps", "1")
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines()[-1].startswith("refused: refused by safety filter 'policy' at stage prompt_safety: violence")
    assert list(out.parent.iterdir()) == []
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(e["allowed"] is False and e["category"] == "violence" and e["filter"] == "policy" for e in entries)


def test_safety_check_gives_one_decision_per_prompt(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("shooting hoops at the park\na video of a man being d e c a p i t a t e d\n")
    result = invoke("safety", "check", "a knife cutting bread", "--file", str(prompts), "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["allowed"] for r in rows] == [True, True, False]
    assert rows[2]["category"] == "violence" and rows[2]["filter"] == "policy"
    assert result.exit_code == 3  # any refusal
    assert invoke("safety", "check", "a red circle moves left").exit_code == 0
    assert "no prompts" in invoke("safety", "check").output


@pytest.fixture(scope="module")
def signed_video(tmp_path_factory):
    """A generation saved by the real pipeline, its frames swapped for a natural-looking clip:
    the untrained model's noise-like frames are the hardest content for the watermark
    (docs/responsible.md), and this test is about verify's verdicts, not robustness."""
    from skyloom.pipeline import Pipeline
    from skyloom.registry import get_registry
    from skyloom.request import GenerationRequest
    from tests.test_watermark import scene

    marker = get_registry().create("watermarker", "spreadspectrum")
    pipe = Pipeline.from_pretrained(device="cpu", watermarkers=[], audit_log=None)
    result = pipe(GenerationRequest("a blue square moves up", frames=12, width=64, height=64, steps=1, seed=4, upscale=4,
                                    guidance_interval=(0.25, 1.0)))
    payload = bytes.fromhex(result.record["model"]["hash"][:8]) + bytes([1, 2, 3, 4])
    result.frames = marker.embed(scene(seed=7, frames=12), payload)
    result.record["watermarks"] = [{"watermarker": "spreadspectrum", "payload": payload.hex()}]
    return result.save(tmp_path_factory.mktemp("verify") / "signed.mp4")


def verify_json(path):
    result = invoke("verify", str(path), "--json")
    return result.exit_code, json.loads(result.stdout)


def test_verify_signed_and_intact(signed_video):
    code, report = verify_json(signed_video)
    assert code == 0 and report["verdict"] == "signed_intact"
    assert report["manifest"]["present"] and report["manifest"]["valid"] and report["manifest"]["trusted"]
    assert report["manifest"]["recipe"]["seed"] == 4 and report["manifest"]["recipe"]["upscale"] == 4
    assert report["manifest"]["recipe"]["guidance_interval"] == {"low": 0.25, "high": 1.0}
    assert "prompt" not in report["manifest"]["recipe"]  # only with --include-prompt
    payload = report["watermark"]["payload"]
    assert report["watermark"]["detected"] and len(payload) == 16
    assert payload == report["manifest"]["recipe"]["watermarks"][0]["payload"]


def test_verify_tampered(signed_video, tmp_path):
    data = bytearray(signed_video.read_bytes())
    mdat = data.find(b"mdat") + 64
    data[mdat : mdat + 16] = bytes(16)  # change video bytes after signing
    tampered = tmp_path / "tampered.mp4"
    tampered.write_bytes(bytes(data))
    code, report = verify_json(tampered)
    assert code == 2 and report["verdict"] == "tampered"
    assert report["manifest"]["present"] and not report["manifest"]["valid"]


def test_verify_stripped_but_watermarked_and_neither(signed_video, tmp_path):
    frames, fps = read_video(signed_video)
    stripped = tmp_path / "reencoded.mp4"
    write_video(stripped, frames, fps, crf=23)  # a re-encode drops the manifest, keeps the mark
    code, report = verify_json(stripped)
    assert code == 0 and report["verdict"] == "stripped_watermark_found"
    assert not report["manifest"]["present"] and report["watermark"]["detected"]
    plain = tmp_path / "plain.mp4"
    write_video(plain, torch.full((9, 256, 256, 3), 90, dtype=torch.uint8), 8)
    code, report = verify_json(plain)
    assert report["verdict"] == "neither" and not report["watermark"]["detected"] and report["watermark"]["payload"] is None


def test_64x64_videos_are_watermarked_and_smaller_ones_say_why_not(tmp_path):
    result = invoke("generate", "a red circle", "-o", str(tmp_path / "default.mp4"), "--frames", "1", "--size", "64x64", "--steps", "1", "--json")
    record = json.loads(result.stdout)
    assert record["stages"]["watermarking"]["status"] == "ran" and "not watermarked" not in result.stderr
    assert [w["watermarker"] for w in record["watermarks"]] == ["spreadspectrum"]
    out = tmp_path / "small.mp4"
    result = invoke("generate", "a red circle", "-o", str(out), "--frames", "1", "--size", "40x40", "--steps", "1", "--json")
    assert "note: not watermarked: frames 40x40 are smaller than the 48-pixel side" in result.stderr
    assert "--upscale 2" in json.loads(result.stdout)["stages"]["watermarking"]["reason"]
