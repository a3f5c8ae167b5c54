"""`skyloom eval`: the held-out prompt set, scoring against the ground truth, and the command.

Generators here draw the prompts' ground truth with the dataset renderer (a perfect model), or
break it on purpose one attribute at a time, so each metric is seen to catch its own failure.
"""

import json
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from skyloom import evaluation
from skyloom.cli import main
from skyloom.evaluation import (
    DEFAULT_COUNT, HELD_OUT_SHARE, ContinuationGenerator, EvalPrompt, ReferenceGenerator, build_prompts, confusion, evaluate,
    format_table, score,
)  # fmt: skip
from skyloom.shapes_analysis import analyse, canonical_caption
from skyloom.shapes_world import BACKGROUNDS, COLOURS, HELD_OUT, SIZES, is_held_out
from skyloom.video_io import read_video

from skyloom.plugins.captioner import shapes as captioner
from skyloom.plugins.prompt_enhancer.caption_style import CaptionStyleEnhancer, parse

SETTINGS = [(64, 64, 17), (80, 48, 17), (48, 80, 17), (64, 64, 33)]  # the four settings
METRICS = ("colour", "shape", "motion", "persistence", "binding", "background", "count", "exact")


@pytest.fixture(scope="module")
def prompts():
    return build_prompts()


# --- the prompt set ----------------------------------------------------------------------


def test_prompt_set_is_deterministic_and_large_enough(prompts):
    assert len(prompts) == DEFAULT_COUNT >= 100
    assert build_prompts() == prompts
    assert [p.text for p in build_prompts(seed=1)] != [p.text for p in prompts]
    assert [p.index for p in prompts] == list(range(len(prompts)))
    assert len({p.text for p in prompts}) >= 0.95 * len(prompts)  # phrasings and scenes vary


@pytest.mark.parametrize("count", [DEFAULT_COUNT, 100, 101, 7])
def test_prompt_set_holds_the_held_out_combinations_in_the_promised_share(count):
    prompts = build_prompts(count, seed=3)
    for objects in (1, 2):
        group = [p for p in prompts if len(p.objects) == objects]
        assert len(group) in (count // 2, count - count // 2)  # half one-object, half two-object
        held = [p for p in group if p.held_out]
        assert len(held) >= HELD_OUT_SHARE * len(group) >= 0.2 * len(group)
        assert all(sum(map(is_held_out, p.objects)) == 1 for p in held)  # exactly one held-out object
        if len(held) >= len(HELD_OUT):  # every held-out combination appears
            for combo in HELD_OUT:
                assert any(all(o.get(k) == v for k, v in combo.items()) for p in held for o in p.objects)


def test_two_objects_in_one_prompt_are_distinguishable(prompts):
    pairs = [p.objects for p in prompts if len(p.objects) == 2]
    assert pairs and all((a["colour"], a["shape"]) != (b["colour"], b["shape"]) for a, b in pairs)


def _template_pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{\w+\}", template)
    return re.compile(".+".join(re.escape(part) for part in parts), re.IGNORECASE)


def test_no_prompt_uses_a_training_caption_phrasing(prompts):
    templates = captioner.ONE_OBJECT + captioner.TWO_OBJECTS + captioner.MANY_OBJECTS + captioner.NO_OBJECTS
    patterns = [_template_pattern(t) for t in templates]
    phrases = [phrase for options in captioner.MOTION_PHRASES.values() for phrase in options]
    assert len(patterns) > 10 and len(phrases) == 25
    for prompt in prompts:
        assert not any(p.fullmatch(prompt.text) for p in patterns), prompt.text
        used = [ph for ph in phrases if re.search(rf"\b{re.escape(ph)}\b", prompt.text, re.IGNORECASE)]
        assert used == [], prompt.text
        assert "background" not in prompt.text  # every training caption says "background"
        assert prompt.text != canonical_caption(prompt.objects, prompt.background)


def test_the_caption_style_enhancer_reads_every_prompt_back_to_its_ground_truth(prompts):
    enhancer = CaptionStyleEnhancer()
    for prompt in prompts:
        objects, background = parse(prompt.text)
        assert objects == [dict(o) for o in prompt.objects] and background == prompt.background, prompt.text
        assert enhancer.enhance(prompt.text) == canonical_caption(prompt.objects, prompt.background)


def test_prompt_set_refuses_bad_arguments():
    with pytest.raises(ValueError, match="count must be an integer >= 1, got 0"):
        build_prompts(0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        build_prompts(10, seed=-1)


# --- scoring -----------------------------------------------------------------------------


def metrics(report, setting=0):
    return report["settings"][setting]["metrics"]


def test_a_perfect_generator_scores_100_at_every_setting(prompts):
    report = evaluate(ReferenceGenerator(prompts[:40]), prompts[:40], SETTINGS, seed=5)
    assert report["complete"] and len(report["records"]) == 40 * len(SETTINGS)
    for index, setting in enumerate(SETTINGS):
        m = metrics(report, index)
        assert {name: m[name] for name in METRICS} == dict.fromkeys(METRICS, 100.0), setting
        assert m["flicker"] == 0.0 and m["extra_objects"] == 0.0
        assert all(t["met"] for t in report["settings"][index]["targets"].values())
        for table in report["settings"][index]["confusion"].values():  # every value found as itself
            assert all(list(row) == [value] for value, row in table.items())
    json.dumps(report)  # JSON-ready as it is


def shifted(prompts, change):
    """Prompts with the same texts but ground truth changed by `change(objects) -> objects`."""
    return [replace(p, objects=tuple(change([dict(o) for o in p.objects]))) for p in prompts]


def test_wrong_colours_score_zero_colour_and_nothing_else_changes(prompts):
    def other_colours(objects):  # colours none of the prompt's objects has, so none can match
        unused = [c for c in COLOURS if c not in {o["colour"] for o in objects}]
        return [{**o, "colour": unused[i]} for i, o in enumerate(objects)]

    drawn = shifted(prompts[:20], other_colours)
    report = evaluate(ReferenceGenerator(drawn), prompts[:20])
    m = metrics(report)
    assert m["colour"] == 0.0 and m["binding"] == 0.0 and m["exact"] == 0.0
    assert m["shape"] == m["motion"] == m["persistence"] == m["background"] == 100.0
    # The confusion table counts each expected colour as found in some other colour, never its own.
    table = report["settings"][0]["confusion"]["colour"]
    asked = Counter(o["colour"] for p in prompts[:20] for o in p.objects)
    assert {colour: sum(row.values()) for colour, row in table.items()} == asked
    assert not any(colour in row or "missing" in row for colour, row in table.items())
    one_object = [(p.objects[0]["colour"], d.objects[0]["colour"]) for p, d in zip(prompts[:20], drawn) if len(p.objects) == 1]
    assert all(table[a].get(d, 0) >= one_object.count((a, d)) > 0 for a, d in one_object)


def test_an_object_missing_from_some_frames_fails_persistence_only(prompts):
    reference = ReferenceGenerator(prompts[:20])

    def flickering(text, width, height, frames, seed):
        clip = reference(text, width, height, frames, seed).clone()
        clip[5:10] = clip[0, 0, 0]  # frames 5..9 show only the background
        return clip

    m = metrics(evaluate(flickering, prompts[:20]))
    assert m["persistence"] == 0.0
    assert m["colour"] == m["shape"] == m["motion"] == m["binding"] == 100.0


def test_swapped_colours_fail_binding_but_keep_each_objects_shape(prompts):
    pairs = [p for p in prompts if len(p.objects) == 2
             and len({o["colour"] for o in p.objects}) == 2 and len({o["shape"] for o in p.objects}) == 2][:12]  # fmt: skip
    assert len(pairs) == 12

    def swap(objects):
        a, b = objects
        return [{**a, "colour": b["colour"]}, {**b, "colour": a["colour"]}]

    m = metrics(evaluate(ReferenceGenerator(shifted(pairs, swap)), pairs))
    assert m["binding"] == 0.0 and m["colour"] == 0.0
    assert m["shape"] == m["motion"] == m["persistence"] == 100.0


def test_missing_and_extra_objects_are_counted(prompts):
    two = next(p for p in prompts if len(p.objects) == 2)
    one = next(p for p in prompts if len(p.objects) == 1)
    clip = ReferenceGenerator([two])(two.text, 64, 64, 17, 0)
    # Scored against the one-object prompt, a two-object clip has one extra (or two, unmatched).
    as_one = score(analyse(clip, 8), {"objects": [two.objects[0]], "background": two.background})
    assert as_one["extra_objects"] == 1 and not as_one["count"] and not as_one["exact"] and as_one["bound"] is None
    assert all(as_one["objects"][0][k] for k in ("colour", "shape", "motion", "persistent"))
    empty = torch.full_like(clip, 0)
    empty[:] = torch.tensor(BACKGROUNDS[one.background], dtype=torch.uint8)
    nothing = score(analyse(empty, 8), one)
    assert nothing["objects"] == [
        {"colour": False, "shape": False, "motion": False, "persistent": False, "expected": dict(one.objects[0]), "found": None}
    ]
    assert confusion(nothing["objects"])["shape"] == {one.objects[0]["shape"]: {"missing": 1}}
    assert nothing["background"] and nothing["extra_objects"] == 0 and not nothing["count"]


def test_report_breaks_down_by_subset_and_formats_a_table(prompts):
    report = evaluate(ReferenceGenerator(prompts[:12]), prompts[:12], [(64, 64, 17), (80, 48, 9)])
    entry = report["settings"][0]
    subsets = entry["subsets"]
    assert subsets["one_object"]["prompts"] + subsets["two_objects"]["prompts"] == entry["prompts"] == 12
    assert subsets["held_out"]["prompts"] + subsets["seen"]["prompts"] == 12
    assert subsets["held_out"]["prompts"] == sum(p.held_out for p in prompts[:12]) > 0
    assert subsets["one_object"]["metrics"]["binding"] is None  # nothing to bind
    one_colour = [p.index for p in prompts[:12] if len(p.objects) == 2 and len({o["colour"] for o in p.objects}) == 1]
    assert subsets["two_objects_one_colour"]["prompts"] == len(one_colour) > 0
    assert subsets["two_objects_one_colour"]["prompts"] + subsets["two_objects_two_colours"]["prompts"] == 6
    assert entry["counts"]["colour"] == [18, 18]  # 6 one-object + 6 two-object prompts
    assert report["settings"][1]["targets"]["colour"]["target"] == 85.0  # 10 points lower off 64x64, 17f
    lines = format_table(report).splitlines()
    assert lines[0].split() == ["setting", "prompts", "colour", "shape", "motion", "persistence", "binding", "background", "flicker"]
    assert lines[1].split()[:4] == ["64x64,", "17f", "12", "100.0"] and lines[2].startswith("80x48, 9f")


# --- the command -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained bundle small enough to sample in a blink (no weights: drawn from init_seed)."""
    root = tmp_path_factory.mktemp("tiny-model")
    (root / "model_index.json").write_text(json.dumps({
        "format": "skyloom-bundle", "format_version": 1, "name": "eval-tiny", "trained": False, "init_seed": 3,
        "text_encoder": {"plugin": "minilm", "config": {}},
        "video_autoencoder": {"plugin": "causal3d", "config": {"latent_channels": 4, "patch_size": 4, "widths": [8, 8, 8]}},
        "transformer": {"config": {"in_channels": 4, "text_dim": 384, "hidden_size": 32, "depth": 2, "num_heads": 2,
                                   "patch_size": [1, 2, 2]}},
        "defaults": {"sampler": "euler", "steps": 4, "guidance": 5.0, "frames": 17, "width": 64, "height": 64, "fps": 8},
    }))  # fmt: skip
    return root


def run_eval(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args)], catch_exceptions=False)


def test_eval_command_prints_the_table_and_writes_the_report(tiny_model, tmp_path):
    out, videos = tmp_path / "eval.json", tmp_path / "clips"
    result = run_eval("--model", tiny_model, "--count", 3, "--steps", 2, "--size", "64x64,80x48", "--frames", 9,
                      "--guidance-interval", "0.5", "1", "--json-out", out, "--videos", videos)  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["setting", "prompts", "colour"]
    assert lines[1].startswith("64x64, 9f") and lines[2].startswith("80x48, 9f") and lines[3].startswith("targets")
    assert "model 'eval-tiny' is untrained" in result.stderr and "3 prompts" in result.stderr
    report = json.loads(out.read_text())
    assert {"format", "format_version", "complete", "generator", "prompt_set", "settings", "prompts", "records"} <= set(report)
    assert report["complete"] is True and len(report["records"]) == 6
    assert report["generator"]["steps"] == 2 and report["generator"]["sampler"] == "euler"
    assert report["generator"]["guidance_interval"] == [0.5, 1.0]
    assert report["generator"]["model"]["name"] == "eval-tiny" and report["generator"]["model"]["trained"] is False
    assert report["prompt_set"] == {"count": 3, "seed": 0, "one_object": 2, "two_objects": 1,
                                    "held_out": sum(p.held_out for p in build_prompts(3)), "enough_for_targets": False}  # fmt: skip
    entry = report["settings"][0]
    assert (entry["width"], entry["height"], entry["frames"], entry["prompts"]) == (64, 64, 9, 3)
    assert set(entry["metrics"]) == {*METRICS, "flicker", "extra_objects"}
    assert set(entry["subsets"]) == {"one_object", "two_objects", "two_objects_one_colour", "two_objects_two_colours",
                                     "held_out", "seen"}  # fmt: skip
    assert {"setting", "prompt", "seed", "score", "found", "seconds"} <= set(report["records"][0])
    clip, _ = read_video(videos / "80x48_9f" / "0002.mp4")
    assert tuple(clip.shape) == (9, 48, 80, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips", "eval.json"]  # no temporary file left


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "64"], "error: --size: size '64' is not WIDTHxHEIGHT"),
        (["--size", "64x64,60x64"], "error: width 60 is not a multiple of 8"),
        (["--frames", "17,x"], "error: --frames: 'x' is not a whole number of frames"),
        (["--sampler", "warp-drive"], "error: unknown sampler 'warp-drive'"),
        (["--guidance-interval", "1", "0.5"], "error: guidance_interval [1.0, 0.5] runs backwards: give the lower time first"),
        (["--json-out", "missing/eval.json"], "error: --json-out missing/eval.json: directory"),
        (["--frames", "9", "--known-frames", "9"], "error: --known-frames 9 leaves nothing to generate in 9-frame clips"),
        (["--known-frames", "1", "--reference"], "error: --reference and --known-frames exclude each other"),
    ],
)
def test_bad_input_fails_with_one_line_before_any_work(tiny_model, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = run_eval("--model", tiny_model, "--count", 3, "--steps", 1, *args)
    assert result.exit_code == 1 and result.output.startswith(message), result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_known_frames_give_the_model_the_start_of_the_ground_truth(tiny_model, tmp_path, prompts):
    class RecordingPipe:  # stands in for the Pipeline: keeps each request
        requests = []

        def __call__(self, request, progress):
            self.requests.append(request)
            return torch.zeros(request.frames, request.height, request.width, 3, dtype=torch.uint8)

    generate = ContinuationGenerator(RecordingPipe(), prompts[:2], known_frames=5, steps=2)
    generate(prompts[1].text, 80, 48, 17, seed=3)
    (request,) = RecordingPipe.requests
    (condition,) = request.conditioning
    truth = ReferenceGenerator(prompts[:2])(prompts[1].text, 80, 48, 17, seed=3)
    assert condition.start_frame == 0 and torch.equal(condition.media, truth[:5])
    assert (request.prompt, request.frames, request.width, request.height, request.seed, request.steps) == (prompts[1].text, 17, 80, 48, 3, 2)

    out = tmp_path / "eval.json"
    result = run_eval("--model", tiny_model, "--count", 2, "--steps", 1, "--frames", 9, "--known-frames", 5, "--json-out", out, "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].startswith("64x64, 9f, first 5 given")
    assert json.loads(out.read_text())["generator"]["known_frames"] == 5


def test_reference_run_scores_the_analysers_ceiling(tmp_path):
    result = run_eval("--reference", "--count", 4, "--size", "48x80", "--json-out", tmp_path / "r.json", "-q")
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.splitlines()[1].split() == ["48x80,", "17f", "4", *["100.0"] * 6, "0.00"]


def test_ctrl_c_writes_a_partial_report_and_exits_130(tmp_path, monkeypatch):
    calls = []

    def interrupt_on_the_third(frames, fps):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return analyse(frames, fps)

    monkeypatch.setattr(evaluation, "analyse", interrupt_on_the_third)
    out = tmp_path / "partial.json"
    result = run_eval("--reference", "--count", 5, "--json-out", out)
    assert result.exit_code == 130
    assert "interrupted: 2 of 5 clips evaluated; partial report in" in result.stderr
    report = json.loads(out.read_text())
    assert report["complete"] is False and len(report["records"]) == 2 and report["settings"][0]["prompts"] == 2
    assert report["prompt_set"]["count"] == 5
