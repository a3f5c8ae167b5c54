"""skyloom train: the recipe end to end on a tiny config, exact resume, checkpoints and errors."""

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from skyloom import training
from skyloom.bundle import BundleError, load_bundle, save_bundle
from skyloom.cli import main
from skyloom.datasets.shapes import iter_dataset, write_dataset
from skyloom.registry import get_registry
from skyloom.training import DEFAULTS as TRAINING_DEFAULTS
from skyloom.training import (
    BucketBatches,
    CaptionTable,
    Clip,
    StopRequested,
    TrainingError,
    _condition_masks,
    encode_latents,
    foreground_weights,
    latent_foreground,
    learning_rate,
    load_config,
    train,
)
from skyloom.transformer import DiTConfig

TINY = {
    "name": "tiny",
    "data": {"path": "data", "captions_per_clip": 2},
    "video_autoencoder": {"plugin": "causal3d", "config": {"latent_channels": 4, "widths": [8, 16, 16]}},
    "transformer": {"hidden_size": 32, "depth": 2, "num_heads": 2},
    "autoencoder_training": {"steps": 4, "batch_size": 2, "warmup": 1, "checkpoint_every": 2, "log_every": 1},
    "transformer_training": {"steps": 4, "batch_size": 2, "warmup": 1, "checkpoint_every": 2, "log_every": 1},
    "output": "bundle",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """18 clips: two of each (size, duration) bucket."""
    root = tmp_path_factory.mktemp("shapes") / "data"
    write_dataset(root, seed=0, count=18)
    return root


def _config_file(folder: Path, dataset: Path, **changes) -> Path:
    config = json.loads(json.dumps(TINY))
    config["data"]["path"] = str(dataset)
    for key, value in changes.items():
        config[key] = value
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


def _train(path: Path, run_dir: Path, **kwargs) -> Path:
    return train(load_config(path), run_dir, registry=get_registry(), base_dir=path.parent, **kwargs)


def _weights(bundle: Path) -> dict[str, torch.Tensor]:
    return {
        f"{name}/{key}": value
        for name in ("video_autoencoder", "transformer")
        for key, value in load_file(str(bundle / f"{name}.safetensors")).items()
    }


def _losses(run_dir: Path) -> list[tuple]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [(e["stage"], e["step"], e["loss"], e["lr"]) for e in map(json.loads, lines)]


@pytest.fixture(scope="module")
def straight_run(dataset, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("straight")
    path = _config_file(folder, dataset)
    return _train(path, folder / "run"), folder / "run"


def test_recipe_writes_a_trained_bundle_that_generates(straight_run):
    bundle_dir, run_dir = straight_run
    index = json.loads((bundle_dir / "model_index.json").read_text())
    assert index["trained"] is True and index["name"] == "tiny"
    assert index["video_autoencoder"]["dtype"] == index["transformer"]["dtype"] == "float16"
    vae_config = index["video_autoencoder"]["config"]
    assert vae_config["scaling_factor"] > 0 and vae_config["shift_factor"] != 0  # the latents' statistics
    assert json.loads((bundle_dir / "training" / "config.json").read_text()) == json.loads((run_dir / "config.json").read_text())
    assert (bundle_dir / "training" / "log.jsonl").read_bytes() == (run_dir / "log.jsonl").read_bytes()
    assert [s for s, *_ in _losses(run_dir)] == ["autoencoder"] * 4 + ["transformer"] * 4

    bundle = load_bundle(bundle_dir, get_registry())
    assert bundle.trained
    from skyloom.pipeline import Pipeline
    from skyloom.request import GenerationRequest

    pipe = Pipeline(bundle, safety_filters=[], watermarkers=[], audit_log=None)
    result = pipe(GenerationRequest("a red circle moves left", frames=9, width=64, height=64, steps=2, seed=0))
    assert result.frames.shape == (9, 64, 64, 3)


def test_captions_come_from_the_pixels_in_several_phrasings(straight_run, dataset):
    _, run_dir = straight_run
    captions = [json.loads(line) for line in (run_dir / "captions.jsonl").read_text().splitlines()]
    manifest = [json.loads(line) for line in (dataset / "manifest.jsonl").read_text().splitlines()]
    assert len(captions) == len(manifest) and all(len(c) == 2 for c in captions)
    assert any(a != b for a, b in captions)  # two phrasings, not one sentence twice
    for pair, record in zip(captions, manifest):
        for caption in pair:
            for obj in record["objects"]:  # the re-caption names what is in the clip
                assert obj["colour"] in caption and obj["shape"] in caption


def test_interrupted_and_resumed_run_equals_the_straight_run(straight_run, dataset, tmp_path):
    bundle_dir, run_dir = straight_run
    path = _config_file(tmp_path, dataset)
    stops = 0
    while True:
        try:  # a tiny time limit stops after every step
            resumed = _train(path, tmp_path / "run", resume=stops > 0, time_limit_s=1e-9)
            break
        except StopRequested as stop:
            stops += 1
            assert stop.reason == "time limit reached"
    assert stops == 6  # 3 stops in each stage: after steps 1, 2 and 3
    expected, got = _weights(bundle_dir), _weights(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert _losses(tmp_path / "run") == _losses(run_dir)


def _killed_before_the_transformer_stage(run_dir: Path, folder: Path) -> Path:
    """A copy of a finished run with what its transformer stage wrote undone."""
    killed = folder / "run"
    shutil.copytree(run_dir, killed)
    for checkpoint in (killed / "checkpoints").glob("transformer-*"):
        shutil.rmtree(checkpoint)
    log = killed / "log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if '"autoencoder"' in line))
    return killed


def test_run_killed_before_the_first_transformer_checkpoint_resumes_exactly(straight_run, dataset, tmp_path):
    bundle_dir, run_dir = straight_run
    killed = _killed_before_the_transformer_stage(run_dir, tmp_path)
    resumed = _train(_config_file(tmp_path, dataset), killed, resume=True)
    expected, got = _weights(bundle_dir), _weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # the same random draws as the straight run
    assert _losses(killed) == _losses(run_dir)


def test_a_resume_reads_the_latents_and_caption_encodings_instead_of_computing_them(straight_run, dataset, tmp_path, monkeypatch, capsys):
    bundle_dir, run_dir = straight_run
    killed = _killed_before_the_transformer_stage(run_dir, tmp_path)
    assert (killed / "autoencoder" / training.LATENTS).is_file() and (killed / training.CAPTION_ENCODINGS).is_file()

    def computed_again(*args, **kwargs):
        raise AssertionError("a resume computed the latents or the caption encodings again")

    path = _config_file(tmp_path, dataset)
    encoder_class = get_registry().get("text_encoder", load_config(path)["text_encoder"]["plugin"]).factory
    monkeypatch.setattr(training, "encode_latents", computed_again)
    monkeypatch.setattr(encoder_class, "encode", computed_again)
    resumed = _train(path, killed, resume=True)
    expected, got = _weights(bundle_dir), _weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    err = capsys.readouterr().err
    assert "its latents of the clips read" in err and "caption encodings read from" in err and "encoding the" not in err


def test_damaged_latents_and_caption_encodings_are_computed_again(straight_run, dataset, tmp_path, capsys):
    bundle_dir, run_dir = straight_run
    killed = _killed_before_the_transformer_stage(run_dir, tmp_path)
    (killed / "autoencoder" / training.LATENTS).write_bytes(b"not safetensors")
    from safetensors.torch import save_file

    encodings = killed / training.CAPTION_ENCODINGS  # a readable file, but of other captions
    save_file(load_file(str(encodings)), str(encodings), metadata={"key": "other captions"})
    resumed = _train(_config_file(tmp_path, dataset), killed, resume=True)
    expected, got = _weights(bundle_dir), _weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    err = capsys.readouterr().err
    assert "is unreadable" in err and "encoding the latents again" in err
    assert "holds the encodings of other captions; encoding the captions again" in err
    assert (killed / training.CAPTION_ENCODINGS).read_bytes() == (run_dir / training.CAPTION_ENCODINGS).read_bytes()
    again, first = (load_file(str(d / "autoencoder" / training.LATENTS)) for d in (killed, run_dir))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_latents_of_other_clips_are_not_used(straight_run, dataset, tmp_path, capsys):
    """The same count and shapes of clips but other pixels (a dataset rewritten in place)."""
    _, run_dir = straight_run
    killed = _killed_before_the_transformer_stage(run_dir, tmp_path)
    from safetensors.torch import save_file

    latents = killed / "autoencoder" / training.LATENTS
    save_file(load_file(str(latents)), str(latents), metadata={"clips": "other pixels"})
    _train(_config_file(tmp_path, dataset), killed, resume=True)
    assert "holds latents of other clips; encoding the latents again" in capsys.readouterr().err


def test_a_new_transformer_recipe_reuses_a_finished_autoencoder(straight_run, dataset, tmp_path):
    bundle_dir, run_dir = straight_run
    transformer_training = {**TINY["transformer_training"], "lr": 1e-3}
    path = _config_file(tmp_path, dataset, transformer_training=transformer_training)
    fresh = tmp_path / "fresh"
    reusing = tmp_path / "reusing"
    shutil.copytree(run_dir / "autoencoder", reusing / "autoencoder")
    expected = _weights(_train(path, fresh, output=tmp_path / "fresh-bundle"))
    got = _weights(_train(path, reusing, resume=True, output=tmp_path / "reusing-bundle"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # as if trained from scratch
    assert [s for s, *_ in _losses(reusing)] == ["transformer"] * 4  # the autoencoder was not trained again
    straight = _weights(bundle_dir)
    assert all(torch.equal(straight[k], got[k]) for k in got if k.startswith("video_autoencoder/"))
    assert not all(torch.equal(straight[k], got[k]) for k in got if k.startswith("transformer/"))  # the new lr

    other = tmp_path / "other"
    shutil.copytree(run_dir / "autoencoder", other / "autoencoder")
    changed = _config_file(tmp_path, dataset, autoencoder_training={**TINY["autoencoder_training"], "lr": 5e-4})
    with pytest.raises(TrainingError, match="trained with other data or autoencoder settings"):
        _train(changed, other, resume=True)


def test_a_joint_text_transformer_trains_on_a_finished_autoencoder_and_generates(straight_run, dataset, tmp_path):
    _, run_dir = straight_run
    transformer = {**TINY["transformer"], "attention_modes": ["full"], "text_conditioning": "joint"}
    path = _config_file(tmp_path, dataset, transformer=transformer)
    shutil.copytree(run_dir / "autoencoder", tmp_path / "run" / "autoencoder")
    bundle_dir = _train(path, tmp_path / "run", resume=True, output=tmp_path / "bundle")
    assert [s for s, *_ in _losses(tmp_path / "run")] == ["transformer"] * 4
    bundle = load_bundle(bundle_dir, get_registry())
    assert bundle.transformer.config.text_conditioning == "joint"
    assert "blocks.0.text_mlp.0.weight" in bundle.transformer.state_dict()
    from skyloom.pipeline import Pipeline
    from skyloom.request import GenerationRequest

    pipe = Pipeline(bundle, safety_filters=[], watermarkers=[], audit_log=None)
    result = pipe(GenerationRequest("a red circle moves left", frames=9, width=64, height=64, steps=2, seed=0))
    assert result.frames.shape == (9, 64, 64, 3)


def test_a_compiled_transformer_trains_as_the_plain_one_and_resumes_exactly(straight_run, dataset, tmp_path, monkeypatch):
    bundle_dir, run_dir = straight_run
    compiled_modules = []
    compile_module = torch.nn.Module.compile

    def spy(module, *args, **kwargs):
        compiled_modules.append(type(module).__name__)
        return compile_module(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    path = _config_file(tmp_path, dataset, transformer_training={**TINY["transformer_training"], "compile": True})
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for folder in (straight, stopped):
        shutil.copytree(run_dir / "autoencoder", folder / "autoencoder")
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    compiled = _weights(_train(path, straight, resume=True, output=tmp_path / "compiled"))
    assert compiled_modules == ["DiTBlock"] * TINY["transformer"]["depth"]
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo did capture them
    plain = _weights(bundle_dir)
    assert compiled.keys() == plain.keys()  # the bundle holds the plain blocks' weights
    # Fused kernels round differently: the same losses to rounding, not bit for bit.
    expected = [loss for stage, _, loss, _ in _losses(run_dir) if stage == "transformer"]
    got = [loss for *_, loss, _ in _losses(straight)]
    assert got == pytest.approx(expected, rel=1e-3)

    while True:
        try:  # stops after every step, recompiling (or reusing the compiled graph) each time
            resumed = _weights(_train(path, stopped, resume=True, output=tmp_path / "resumed", time_limit_s=1e-9))
            break
        except StopRequested:
            pass
    assert all(torch.equal(compiled[k], resumed[k]) for k in compiled)
    assert _losses(stopped) == _losses(straight)


def test_compiling_without_a_cpp_compiler_is_a_clear_error(dataset, tmp_path, monkeypatch):
    path = _config_file(tmp_path, dataset, transformer_training={**TINY["transformer_training"], "compile": True})
    monkeypatch.setattr(training.shutil, "which", lambda name: None)
    with pytest.raises(TrainingError, match="compile needs a C\\+\\+ compiler on the CPU"):
        _train(path, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before any stage ran


def _fine_tune_config(folder: Path, dataset: Path, init: str, **changes) -> Path:
    folder.mkdir(exist_ok=True)
    kept = {**TINY["autoencoder_training"], "steps": 0}  # the init bundle's autoencoder, unchanged
    return _config_file(folder, dataset, init=init, autoencoder_training=kept, **changes)


def test_fine_tuning_starts_from_an_init_bundle_and_keeps_its_history(straight_run, dataset, tmp_path):
    bundle_dir, _ = straight_run
    init = tmp_path / "init"
    shutil.copytree(bundle_dir, init)
    nudge = {**TINY["transformer_training"], "steps": 2, "lr": 1e-12}  # so small that the weights stay the init's
    path = _fine_tune_config(tmp_path / "tune", dataset, "../init", transformer_training=nudge)
    tuned = _train(path, tmp_path / "tune" / "run")
    assert [s for s, *_ in _losses(tmp_path / "tune" / "run")] == ["transformer"] * 2  # the autoencoder was kept
    start, got = _weights(init), _weights(tuned)
    assert all(torch.equal(start[k], got[k]) for k in got if k.startswith("video_autoencoder/"))
    assert all(torch.allclose(start[k].float(), got[k].float(), atol=1e-6) for k in got)
    index, init_index = (json.loads((b / "model_index.json").read_text()) for b in (tuned, init))
    for key in ("shift_factor", "scaling_factor"):
        assert index["video_autoencoder"]["config"][key] == init_index["video_autoencoder"]["config"][key]
    assert index["training"]["init"] == {
        "name": "tiny", "model_hash": load_bundle(init, get_registry()).model_hash, "transformer": True, "training": "training/init"
    }
    for name in ("config.json", "log.jsonl"):  # the whole recipe's history travels with the weights
        assert (tuned / "training" / "init" / name).read_bytes() == (init / "training" / name).read_bytes()
    (tmp_path / "scratch").mkdir()
    fresh = _weights(_train(_config_file(tmp_path / "scratch", dataset, transformer_training=nudge), tmp_path / "scratch" / "run"))
    assert not all(torch.allclose(start[k].float(), fresh[k].float(), atol=1e-6) for k in fresh if k.startswith("transformer/"))


def test_a_new_transformer_can_start_from_an_init_bundles_autoencoder(straight_run, dataset, tmp_path):
    bundle_dir, _ = straight_run
    init = tmp_path / "init"
    shutil.copytree(bundle_dir, init)
    other = {**TINY["transformer"], "hidden_size": 48, "absolute_position": True}
    with pytest.raises(TrainingError, match="holds another transformer than the config builds.*set init_transformer to false"):
        _train(_fine_tune_config(tmp_path / "refused", dataset, "../init", transformer=other), tmp_path / "refused" / "run")
    path = _fine_tune_config(tmp_path / "new", dataset, "../init", transformer=other, init_transformer=False)
    bundle = _train(path, tmp_path / "new" / "run")
    start, got = _weights(init), _weights(bundle)
    assert all(torch.equal(start[k], got[k]) for k in got if k.startswith("video_autoencoder/"))
    assert got["transformer/x_embedder.weight"].shape[0] == 48
    loaded = load_bundle(bundle, get_registry())
    assert loaded.transformer.config.absolute_position and loaded.transformer.position is not None
    index = json.loads((bundle / "model_index.json").read_text())
    assert index["training"]["init"]["transformer"] is False
    # The same architecture as the init's transformer still starts afresh when asked to.
    nudge = {**TINY["transformer_training"], "steps": 1, "lr": 1e-12}
    same = _fine_tune_config(tmp_path / "same", dataset, "../init", transformer_training=nudge, init_transformer=False)
    fresh = _weights(_train(same, tmp_path / "same" / "run"))
    assert all(torch.equal(start[k], fresh[k]) for k in fresh if k.startswith("video_autoencoder/"))
    assert not all(torch.allclose(start[k].float(), fresh[k].float(), atol=1e-6) for k in fresh if k.startswith("transformer/"))


def test_a_fine_tuning_run_resumes_exactly_and_guards_its_init_bundle(straight_run, dataset, tmp_path):
    bundle_dir, _ = straight_run
    init = tmp_path / "init"
    shutil.copytree(bundle_dir, init)
    path = _fine_tune_config(tmp_path / "tune", dataset, "../init")
    straight = _train(path, tmp_path / "tune" / "straight")
    stops = 0
    while True:
        try:  # a tiny time limit stops after every step
            resumed = _train(path, tmp_path / "tune" / "stopped", resume=stops > 0, time_limit_s=1e-9, output=tmp_path / "resumed")
            break
        except StopRequested:
            stops += 1
    assert stops == 3
    expected, got = _weights(straight), _weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert _losses(tmp_path / "tune" / "stopped") == _losses(tmp_path / "tune" / "straight")

    with pytest.raises(TrainingError, match="is the init bundle; write the new bundle elsewhere"):
        _train(path, tmp_path / "tune" / "onto-init", output=init)
    index_path = init / "model_index.json"  # the init bundle changes under a run that started from it
    index_path.write_text(index_path.read_text().replace('"name": "tiny"', '"name": "tiny-2"'))
    with pytest.raises(TrainingError, match="init bundle ../init has changed since the run started"):
        _train(path, tmp_path / "tune" / "stopped", resume=True, output=tmp_path / "resumed")
    wider = _fine_tune_config(tmp_path / "wider", dataset, "../init", transformer={**TINY["transformer"], "hidden_size": 64})
    with pytest.raises(TrainingError, match="holds another transformer than the config builds"):
        _train(wider, tmp_path / "wider" / "run")
    assert not (tmp_path / "wider" / "run").exists()  # refused before the run directory is made
    untrained = tmp_path / "untrained"
    shutil.copytree(init, untrained)
    (untrained / "model_index.json").write_text(index_path.read_text().replace('"trained": true', '"trained": false'))
    with pytest.raises(TrainingError, match="is an untrained bundle"):
        _train(_fine_tune_config(tmp_path / "u", dataset, "../untrained"), tmp_path / "u" / "run")


def test_run_directory_guards(straight_run, dataset, tmp_path):
    path = _config_file(tmp_path, dataset)
    _, run_dir = straight_run
    with pytest.raises(TrainingError, match="already holds a run; pass --resume"):
        _train(path, run_dir)
    changed = _config_file(tmp_path, dataset, seed=5)
    with pytest.raises(TrainingError, match="differs from the one it was started with at seed"):
        _train(changed, run_dir, resume=True)
    # grad_clip 1.0 when the run started; 1 hashes differently, so it is another config.
    retyped = _config_file(tmp_path, dataset, transformer_training={**TINY["transformer_training"], "grad_clip": 1})
    with pytest.raises(TrainingError, match=r"at a number's type \(such as 1 against 1.0\)"):
        _train(retyped, run_dir, resume=True)


def test_a_finished_run_writes_its_bundle_again_with_new_sampling_defaults(straight_run, dataset, tmp_path, capsys):
    bundle_dir, run_dir = straight_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    sampling = {"sampler": "heun", "steps": 12, "guidance": 2.0, "shift": 1.0, "frames": 17, "width": 64, "height": 64, "fps": 12}
    path = _config_file(tmp_path, dataset, defaults=sampling)
    again = _train(path, run, resume=True, output=tmp_path / "again")
    assert "the run started with other defaults.fps, defaults.guidance, defaults.sampler, defaults.steps" in capsys.readouterr().err
    expected, got = _weights(bundle_dir), _weights(again)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)  # not trained again
    assert (run / "log.jsonl").read_bytes() == (run_dir / "log.jsonl").read_bytes()
    assert json.loads((again / "model_index.json").read_text())["defaults"] == sampling
    assert json.loads((again / "training" / "config.json").read_text()) == json.loads(json.dumps(load_config(path)))
    assert (run / "config.json").read_bytes() == (run_dir / "config.json").read_bytes()  # the run's record stays
    # The shift and the base size shape the training timesteps: changing them is another run.
    for key, value in (("shift", 3.0), ("frames", 33), ("width", 80)):
        changed = _config_file(tmp_path, dataset, defaults={**sampling, key: value})
        with pytest.raises(TrainingError, match=f"differs from the one it was started with at defaults.{key}"):
            _train(changed, run, resume=True, output=tmp_path / "refused")


def test_a_run_resumed_with_new_sampling_defaults_still_resumes_exactly(straight_run, dataset, tmp_path):
    # Checkpoints written after such a resume carry the hash of the config the run started with.
    bundle_dir, _ = straight_run
    path = _config_file(tmp_path, dataset)
    with pytest.raises(StopRequested):
        _train(path, tmp_path / "run", time_limit_s=1e-9)
    (tmp_path / "changed").mkdir()
    changed = _config_file(tmp_path / "changed", dataset, defaults={**TRAINING_DEFAULTS["defaults"], "guidance": 2.0})
    for _ in range(3):  # each stops after one step and writes a checkpoint
        with pytest.raises(StopRequested):
            _train(changed, tmp_path / "run", resume=True, time_limit_s=1e-9)
    resumed = _train(changed, tmp_path / "run", resume=True)
    expected, got = _weights(bundle_dir), _weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_run_from_before_a_new_config_key_resumes(dataset, tmp_path):
    path = _config_file(tmp_path, dataset)
    with pytest.raises(StopRequested):
        _train(path, tmp_path / "run", time_limit_s=1e-9)
    stored = tmp_path / "run" / "config.json"  # as a skyloom without the added keys wrote it, and its checkpoint
    config = json.loads(stored.read_text())
    del config["init"], config["init_transformer"], config["transformer_training"]["compile"]
    stored.write_text(json.dumps(config, sort_keys=True, indent=2) + "\n")
    (state_path,) = (tmp_path / "run" / "checkpoints").glob("*/state.json")
    state = json.loads(state_path.read_text())
    state["config_sha256"] = hashlib.sha256(json.dumps(config, sort_keys=True, indent=2).encode()).hexdigest()
    state_path.write_text(json.dumps(state))
    assert _train(path, tmp_path / "run", resume=True).is_dir()


def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(dataset, tmp_path):
    path = _config_file(tmp_path, dataset)
    with pytest.raises(StopRequested):
        _train(path, tmp_path / "run", time_limit_s=1e-9)
    checkpoint = tmp_path / "run" / "checkpoints" / "autoencoder-0000001"
    (checkpoint / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TrainingError, match="autoencoder-0000001 is unreadable"):
        _train(path, tmp_path / "run", resume=True)


def test_checkpoint_of_another_model_is_an_error(dataset, tmp_path):
    path = _config_file(tmp_path, dataset)
    with pytest.raises(StopRequested):
        _train(path, tmp_path / "run", time_limit_s=1e-9)
    from safetensors.torch import save_file

    checkpoint = tmp_path / "run" / "checkpoints" / "autoencoder-0000001"
    save_file({"weight": torch.zeros(3)}, str(checkpoint / "model.safetensors"))
    with pytest.raises(TrainingError, match="does not match the model the config builds"):
        _train(path, tmp_path / "run", resume=True)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bogus": 1}, r"unknown key\(s\) \['bogus'\]"),
        ({"autoencoder_training": {"stepz": 3}}, r"autoencoder_training: unknown key\(s\) \['stepz'\]"),
        ({"autoencoder_training": {"steps": 0}}, "autoencoder_training.steps must be an integer >= 1"),
        ({"init": 5}, "init must be the path of a trained model bundle"),
        ({"init_transformer": False}, "init_transformer is false but no init bundle is named"),
        ({"init": "b", "init_transformer": "no"}, "init_transformer must be true or false"),
        ({"transformer_training": {"compile": "yes"}}, "transformer_training.compile must be true or false"),
        ({"data": {"path": "x", "shapes": {"count": 3}}}, "exactly one of data.path"),
        ({"data": {"path": None, "shapes": {"count": 3, "min_travel": 0.8}}}, r"data.shapes.min_travel must be a number from 0.25 to 0.6"),
        ({"data": {"path": None, "shapes": {"count": 3, "travel": 0.5}}}, r"data.shapes must be .*\"min_travel\": number"),
        ({"data": {"path": None, "shapes": {"count": 3, "object_size": [0.5, 0.6]}}}, r"data.shapes.object_size must be two numbers"),
        ({"data": {"path": None, "shapes": {"count": 3, "gap": 12}}}, r"data.shapes.gap must be a whole number of pixels from 1 to 8"),
        ({"data": {"path": None, "shapes": {"count": 3, "two_objects": -0.5}}}, r"data.shapes.two_objects must be a number from 0 to 1"),
        ({"data": {"path": None, "shapes": {"count": 3, "min_travel": 0.6, "object_size": [0.3, 0.4]}}},
         r"data.shapes.object_size \[0.3, 0.4\]: a 25px object cannot travel min_travel 0.6"),
        ({"transformer_training": {"conditioning": {"sideways": 1.0}}}, "conditioning must map some of"),
        ({"transformer": {"hidden_size": 30, "num_heads": 4}}, "divisible by num_heads"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be"),
        ({"mixed_precision": "fp16"}, "fp16 would need loss scaling"),
        ({"autoencoder_training": {"foreground_weight": 0.5}}, "foreground_weight must be a number >= 1"),
        ({"transformer_training": {"foreground_weight": True}}, "transformer_training.foreground_weight must be"),
    ],
)
def test_bad_config_names_the_key(tmp_path, change, message):
    config = {**json.loads(json.dumps(TINY)), **change}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(TrainingError, match=message):
        load_config(path)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.json")), ids=lambda p: p.name)
def test_every_committed_config_is_valid(path):
    config = load_config(path)  # raises TrainingError naming the key otherwise
    # Each recipe's bundle is named by its file; only the embedded recipe writes the embedded bundle.
    assert config["name"] == path.stem
    embedded = path.stem == "skyloom-tiny-shapes"
    assert config["output"] == ("../core/models/default" if embedded else f"../runs/{path.stem}")


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(TrainingError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TrainingError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")


def test_bucket_batches_are_one_bucket_each_deterministic_and_cover_an_epoch():
    buckets = [(64, 64, 17)] * 10 + [(80, 48, 33)] * 7 + [(48, 80, 9)] * 9
    batches = BucketBatches(buckets, batch_size=2, seed=3)
    assert batches.sizes == {(64, 64, 17): 2, (80, 48, 33): 1, (48, 80, 9): 4}  # ~equal voxels per batch
    epoch = [batches(step) for step in range(batches.per_epoch)]
    assert all(len({buckets[i] for i in batch}) == 1 for batch in epoch)
    seen = [i for batch in epoch for i in batch]
    assert len(seen) == len(set(seen)) == 10 + 7 + 8  # each clip once; the 9-frame remainder is dropped
    again = BucketBatches(buckets, batch_size=2, seed=3)  # asked in another order: batch k depends on k alone
    steps = range(batches.per_epoch + 3)
    assert [again(s) for s in reversed(steps)][::-1] == [batches(s) for s in steps]
    assert batches(batches.per_epoch) != batches(0) or batches(batches.per_epoch + 1) != batches(1)  # a new epoch reshuffles


def test_bucket_batches_error_when_no_batch_fits():
    with pytest.raises(TrainingError, match="no bucket has a full batch"):
        BucketBatches([(64, 64, 9)], batch_size=8, seed=0)


@pytest.mark.parametrize("kind", ["none", "first", "last", "ends", "prefix", "suffix"])
def test_condition_masks(kind):
    generator = torch.Generator().manual_seed(0)
    masks = _condition_masks([kind], torch.ones(1), 64, 5, generator)
    assert not masks.all(dim=1).any()  # some frame is always left to generate
    if kind == "none":
        assert masks.sum() == 0
    elif kind == "first":
        assert masks[:, 0].all() and masks[:, 1:].sum() == 0
    elif kind == "last":
        assert masks[:, -1].all() and masks[:, :-1].sum() == 0
    elif kind == "ends":
        assert masks[:, 0].all() and masks[:, -1].all() and masks[:, 1:-1].sum() == 0
    else:
        counts = masks.sum(1).long()
        assert counts.min() >= 1 and counts.max() <= 4 and len(set(counts.tolist())) > 1
        for row, n in zip(masks, counts):
            known = row[:n] if kind == "prefix" else row[5 - n :]
            assert known.all()


def test_foreground_weights_mark_the_objects_and_nothing_else():
    from skyloom.datasets.shapes import make_clip, shape_mask

    scene, frames = make_clip(0, 4)  # 80x48, 17 frames
    video = frames.permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W)
    weights = foreground_weights(video, 10.0)  # (1, 1, T, H, W)
    expected = torch.zeros(frames.shape[:3], dtype=torch.bool)
    for obj, boxes in zip(scene.objects, scene.boxes()):
        mask = torch.from_numpy(shape_mask(obj["shape"], obj["size"]))
        for t, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            expected[t, y0:y1, x0:x1] |= mask
    assert torch.equal(weights[0, 0] == 10.0, expected)
    assert set(weights.unique().tolist()) == {1.0, 10.0}
    assert torch.equal(foreground_weights(video, 1.0), torch.ones_like(weights))


def test_latent_foreground_marks_every_cell_that_covers_an_object():
    from skyloom.datasets.shapes import make_clip

    _, frames = make_clip(0, 4)  # 80x48, 17 frames
    cells = latent_foreground([Clip(frames, ["a"])], 4, 4)[0]
    assert cells.shape == (5, 12, 20)  # 1 + 16/4 latent frames of 48/4 x 80/4 cells
    pixels = foreground_weights(frames.permute(3, 0, 1, 2)[None].float() / 127.5 - 1, 2.0)[0, 0] > 1  # (T, H, W)
    groups = [[0]] + [list(range(4 * j - 3, 4 * j + 1)) for j in range(1, 5)]  # latent frame 0 is frame 0 alone
    for j, group in enumerate(groups):
        for y in range(12):
            for x in range(20):
                assert bool(cells[j, y, x]) == bool(pixels[group, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4].any()), (j, y, x)
    assert 0 < cells.sum() < cells.numel() / 2


def test_transformer_loss_weights_the_objects_cells():
    """The loss is the weighted mean of the squared velocity error over the frames to generate:
    foreground_weight on the cells latent_foreground marks, 1 elsewhere."""
    C, T, H, W = 4, 3, 4, 4
    latents = [torch.randn(C, T, H, W, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cells = [torch.zeros(T, H, W, dtype=torch.bool) for _ in range(2)]
    cells[0][:, 1, 2] = cells[1][2, :2, :] = True
    seen = {}

    class Recorder(torch.nn.Module):  # predicts velocity 0 and keeps what it was given
        config = DiTConfig.from_dict({"in_channels": 4, "patch_size": [1, 2, 2]})

        def forward(self, x_t, t, text_tokens, text_mask, cond_latent, known):
            seen.update(x_t=x_t, t=t, known=known)
            return torch.zeros_like(x_t)

    settings = {**training.TRANSFORMER_DEFAULTS, "foreground_weight": 7.0, "conditioning": {"none": 1.0, "first": 1.0}}
    captions_of = lambda captions: (torch.zeros(len(captions), 2, 8), torch.ones(len(captions), 2, dtype=torch.bool))
    clips = [Clip(torch.zeros(9, 16, 16, 3, dtype=torch.uint8), ["a red circle"]) for _ in range(2)]
    loss_fn = training._transformer_loss(Recorder(), captions_of, latents, clips, settings, {"defaults": {"shift": 1.0}}, 4,
                                         torch.device("cpu"), cells)
    for seed in range(4):
        loss = loss_fn([0, 1], torch.Generator().manual_seed(seed))
        x0 = torch.stack(latents)
        t = seen["t"].view(2, 1, 1, 1, 1)
        target = (seen["x_t"] - (1 - t) * x0) / t - x0  # noise - x0
        weight = (1 - seen["known"]).view(2, 1, T, 1, 1) * (1 + 6.0 * torch.stack(cells)[:, None].float())
        expected = (target.square() * weight).sum() / weight.expand_as(target).sum()
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_time_reversal_adds_each_clip_backwards_but_never_a_held_out_object(dataset, tmp_path):
    from skyloom.datasets.shapes import read_manifest
    from skyloom.shapes_analysis import analyse
    from skyloom.shapes_world import is_held_out, reversed_motion

    assert [reversed_motion(m) for m in ("moves left", "moves up", "stays still")] == ["moves right", "moves down", "stays still"]
    data = {**TINY["data"], "path": str(dataset), "time_reversal": True}
    (tmp_path / "run").mkdir()
    clips = training.prepare_data(load_config(_config_file(tmp_path, dataset, data=data)), tmp_path / "run", get_registry(), False, tmp_path)
    records = read_manifest(dataset)
    kept = [i for i, r in enumerate(records)
            if not any(is_held_out({**o, "motion": reversed_motion(o["motion"])}) for o in r["objects"])]
    assert 0 < len(kept) < len(records)  # this dataset has a yellow object moving up: its reversal is left out
    assert len(clips) == len(records) + len(kept)
    for i, clip in zip(kept, clips[len(records):]):
        assert torch.equal(clip.frames, clips[i].frames.flip(0))
        found = sorted(o.motion for o in analyse(clip.frames.numpy(), 8.0).objects)
        assert found == sorted(reversed_motion(o["motion"]) for o in records[i]["objects"])  # what the captions read
        assert clip.captions != clips[i].captions
    with pytest.raises(TrainingError, match="data.time_reversal must be true or false"):
        load_config(_config_file(tmp_path, dataset, data={**data, "time_reversal": "yes"}))


def test_workers_read_and_caption_the_clips_as_one_process_does(dataset, tmp_path):
    config = load_config(_config_file(tmp_path, dataset))
    runs = []
    for workers in (1, 2):  # 18 clips: two chunks of reading and of captioning
        (tmp_path / f"run{workers}").mkdir()
        runs.append(training.prepare_data(config, tmp_path / f"run{workers}", get_registry(), False, tmp_path, workers))
    assert [c.captions for c in runs[0]] == [c.captions for c in runs[1]]
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(*runs))
    assert (tmp_path / "run1" / "captions.jsonl").read_bytes() == (tmp_path / "run2" / "captions.jsonl").read_bytes()


def test_a_captioner_that_cannot_go_to_workers_captions_in_this_process(dataset, tmp_path, capsys):
    from skyloom.registry import PluginInfo, Registry

    class LocalCaptioner(training.Captioner):  # defined here, so pickle cannot find it by name
        def caption(self, frames, fps):
            return f"{frames.shape[0]} frames"

    registry = Registry.load()
    registry.add(PluginInfo("captioner", "local", LocalCaptioner))
    config = load_config(_config_file(tmp_path, dataset, data={**TINY["data"], "path": str(dataset), "captioner": "local"}))
    clips = training.prepare_data(config, tmp_path, registry, False, tmp_path, workers=2)
    assert [c.captions for c in clips] == [[f"{c.frames.shape[0]} frames"] * 2 for c in clips]
    assert "captioner 'local' cannot be sent to worker processes" in capsys.readouterr().err
    with pytest.raises(TrainingError, match="workers must be a whole number of processes, at least 1, got 0"):
        _train(_config_file(tmp_path, dataset), tmp_path / "bad", workers=0)


def test_encode_latents_batches_by_bucket_and_keeps_the_clips_order(monkeypatch):
    monkeypatch.setattr(training, "ENCODE_BATCH", 2)  # buckets split over several batches, the last one short
    clips = [Clip(frames, ["a"]) for _, frames in iter_dataset(seed=3, count=30)]
    assert len({clip.bucket for clip in clips}) == 9  # every (size, duration) bucket, more than once
    vae = get_registry().create("video_autoencoder", "causal3d", latent_channels=4, widths=[8, 16, 16]).eval()
    batched = encode_latents(vae, clips, torch.device("cpu"), progress=False)
    for clip, latent in zip(clips, batched):
        alone = encode_latents(vae, [clip], torch.device("cpu"), progress=False)[0]
        assert latent.shape == alone.shape == (4, *vae.latent_shape(*clip.frames.shape[:3])[1:])
        torch.testing.assert_close(latent, alone, rtol=1e-4, atol=1e-5)


def test_caption_table_encodes_each_caption_once_whatever_the_clips_order(encoder_calls):
    text_encoder, calls = encoder_calls
    clips = [Clip(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), [f"a red circle {i}", f"the blue square {i}"]) for i in range(300)]
    table = CaptionTable(text_encoder, clips, progress=False)
    assert sum(calls) == 601 and max(calls) == training.CAPTION_CHUNK  # 600 captions and the empty prompt
    drawn = ["", "the blue square 7", "a red circle 299"]
    tokens, mask = table(drawn)
    assert sum(calls) == 601  # looked up, not encoded again
    direct = text_encoder.encode_uncached(drawn)
    assert torch.equal(mask, direct[1].bool())
    torch.testing.assert_close(tokens, direct[0], rtol=0, atol=1e-5)  # the same, up to the batch's rounding
    text_encoder.clear_cache()
    shuffled = CaptionTable(text_encoder, clips[::-1], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(table(drawn), shuffled(drawn)))  # bit for bit: resume stays exact


@pytest.fixture
def encoder_calls():
    """A MiniLM text encoder counting the prompts it encodes."""
    text_encoder = get_registry().create("text_encoder", "minilm")
    calls = []
    original = text_encoder.encode_uncached

    def counting(prompts):
        calls.append(len(prompts))
        return original(prompts)

    text_encoder.encode_uncached = counting
    return text_encoder, calls


def test_learning_rate_warms_up_then_decays_to_the_floor():
    settings = {"lr": 1e-3, "warmup": 10, "steps": 110, "min_lr_ratio": 0.1}
    assert learning_rate(settings, 0) == pytest.approx(1e-4)
    assert learning_rate(settings, 9) == pytest.approx(1e-3)
    assert learning_rate(settings, 60) == pytest.approx(0.55e-3)
    assert learning_rate(settings, 110) == pytest.approx(1e-4)
    values = [learning_rate(settings, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_save_bundle_extra_files(tmp_path):
    index = json.loads((Path(__file__).parents[1] / "core/models/default/model_index.json").read_text())
    index.pop("training", None)
    with pytest.raises(BundleError, match="must be a relative path inside the bundle"):
        save_bundle(tmp_path / "b", index, {}, extra_files={"../escape.txt": b"x"})
    save_bundle(tmp_path / "b", index, {}, extra_files={"training/log.jsonl": b"{}\n"})
    assert (tmp_path / "b" / "training" / "log.jsonl").read_bytes() == b"{}\n"


def test_cli_train_errors_are_one_line(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({**TINY, "bogus": 1}))
    result = CliRunner().invoke(main, ["train", str(tmp_path / "c.json"), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "unknown key(s) ['bogus']" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_time_limit_stops_with_a_resume_hint(dataset, tmp_path):
    path = _config_file(tmp_path, dataset)
    run, out = tmp_path / "run", tmp_path / "my bundle"  # a space: the hint must quote it
    args = ["train", str(path), "--run-dir", str(run), "--out", str(out), "--time-limit", "0.0000001"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 75
    assert "time limit reached: stopped after autoencoder step 1" in result.output
    # The hint keeps --out: without it the resumed run would write the config's "output" instead.
    assert f"continue with: skyloom train {path} --run-dir {run} --out '{out}' --resume" in result.output


def test_ctrl_c_checkpoints_and_resume_finishes(dataset, tmp_path):
    """A real SIGINT to `skyloom train`: it finishes the step, writes a checkpoint, exits 130."""
    slow = {"steps": 100000, "batch_size": 2, "warmup": 1, "checkpoint_every": 100000, "log_every": 1}
    path = _config_file(tmp_path, dataset, autoencoder_training=slow)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "skyloom", "train", str(path), "--run-dir", str(run_dir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "log.jsonl").is_file() or not (run_dir / "log.jsonl").read_text().strip():
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "training never logged a step"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output
    assert "interrupted: stopped after autoencoder step" in output
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert len(checkpoints) == 1 and checkpoints[0].startswith("autoencoder-")
    step = int(checkpoints[0].split("-")[1])
    logged = [e["step"] for e in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())]
    assert max(logged) == step  # nothing done after the last checkpoint went unrecorded or was lost


def test_a_generated_dataset_keeps_min_travel_object_size_gap_and_two_objects(dataset, tmp_path):
    from skyloom.datasets.shapes import read_manifest

    shapes = {"seed": 2, "count": 9, "min_travel": 0.5, "object_size": [0.3, 0.4], "gap": 6, "two_objects": 1}
    data = {**TINY["data"], "path": None, "shapes": shapes}
    (tmp_path / "run").mkdir()
    clips = training.prepare_data(load_config(_config_file(tmp_path, dataset, data=data)), tmp_path / "run", get_registry(), False, tmp_path)
    records = read_manifest(tmp_path / "run" / "data")
    assert len(clips) == len(records) == 9 and {r["min_travel"] for r in records} == {0.5}
    assert all(r["object_size"] == [0.3, 0.4] and r["gap"] == 6 and r["two_objects"] == 1 for r in records)
    assert all(len(r["objects"]) == 2 for r in records)
    assert all(obj["size"] >= 0.3 * min(r["width"], r["height"]) for r in records for obj in r["objects"])
    moving = [(r, o) for r in records for o in r["objects"] if o["motion"] != "stays still"]
    assert moving
    for record, obj in moving:  # starts in the half of the frame it moves away from
        axis = {"moves left": 0, "moves right": 0, "moves up": 1, "moves down": 1}[obj["motion"]]
        length = (record["width"], record["height"])[axis]
        assert abs(obj["end"][axis] - obj["start"][axis]) >= length / 2
        assert (obj["start"][axis] < length / 2) == (obj["end"][axis] > obj["start"][axis])


def test_memorisation_benchmark_scores_the_clips_and_captions_training_reads(dataset, tmp_path):
    """benchmarks/eval_memorisation.py's training side must be what the recipe trained on: the
    same decoded frames (a fresh MP4 write of the same clips) and each clip's first caption."""
    from benchmarks.eval_memorisation import written_clips

    shapes = {"seed": 4, "count": 3, "crf": 18, "min_travel": 0.5, "object_size": [0.3, 0.4], "gap": 6}
    data = {**TINY["data"], "path": None, "shapes": shapes}
    (tmp_path / "run").mkdir()
    clips = training.prepare_data(load_config(_config_file(tmp_path, dataset, data=data)), tmp_path / "run", get_registry(), False, tmp_path)
    captioner = get_registry().create("captioner", "shapes")
    ours = written_clips(tmp_path / "benchmark", shapes["seed"], shapes["count"], shapes)
    assert len(ours) == len(clips) == 3
    for (frames, fps), clip in zip(ours, clips):
        assert torch.equal(frames, clip.frames)
        assert captioner.captions(frames, fps, TINY["data"]["captions_per_clip"])[0] == clip.captions[0]
