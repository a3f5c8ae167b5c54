"""`skyloom train CONFIG`: the video autoencoder, then the diffusion transformer, from one config.

The recipe follows Sora's: videos are re-captioned from their pixels by a captioner plugin (in
several phrasings each), the autoencoder learns the latent space, and the transformer learns
rectified-flow velocities on the latents of the whole dataset under the captions.

One run, in a run directory:

1. data: the dataset (a directory as `skyloom dataset shapes` writes it: clips/*.mp4 and
   manifest.jsonl) is read into memory; with `data.shapes` in the config it is generated
   first, into RUN_DIR/data. Captions are computed once and kept in RUN_DIR/captions.jsonl.
2. autoencoder stage: reconstruction (L1 + MSE) plus a small KL term, on bucketed batches.
   At its end the EMA weights, the latents' mean and standard deviation (the normalisation
   the transformer sees) and the RNG states are written to RUN_DIR/autoencoder, which any
   config with the same data and autoencoder settings may reuse.
3. transformer stage: rectified flow, x_t = (1-t)·x0 + t·noise, velocity target noise - x0,
   t logit-normal and shifted by the token count as the sampler is, on the latents' posterior
   means; captions encoded once, up front, and dropped to the empty prompt for
   classifier-free guidance; random frame-conditioning masks (first frame,
   last frame, both ends, a prefix, a suffix or none), so image-to-video, extension and
   connecting use the same weights. The loss covers only the frames not given.
4. the EMA weights of both go into a model bundle (`output`), with the config and the log.

Both stages share one loop: AdamW with warmup and cosine decay, gradient clipping, EMA,
bucketed batches (one (size, frames) bucket per batch; longer clips get smaller batches so
every batch holds about the same number of voxels), a tqdm bar, a JSONL log, and checkpoints
in safetensors (weights, EMA, optimizer moments, RNG states; step counters in JSON), written
to a temporary directory and renamed. Every random draw comes from one generator whose state
is checkpointed, and batch k is a function of (seed, k), so a resumed run continues exactly
where the interrupted one stopped. Ctrl-C finishes the current step, writes a checkpoint and
exits.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from skyloom.atomic_write import write_atomic, write_atomic_with
from skyloom.bundle import FORMAT, FORMAT_VERSION, BundleError, ModelBundle, load_bundle, safetensors_state, save_bundle
from skyloom.kinds import Captioner
from skyloom.process_map import check_workers, process_map
from skyloom.registry import Registry, UnknownKindError, UnknownPluginError
from skyloom.request import RequestError, check_guidance_interval
from skyloom.sampling import resolution_shift, shift_time
from skyloom.transformer import DiTConfig, SpacetimeDiT

STAGES = ("autoencoder", "transformer")
CONDITIONING_KINDS = ("none", "first", "last", "ends", "prefix", "suffix")
REFERENCE_FRAMES = 17  # batch_size counts clips of this many frames; other durations are scaled


def clips_per_batch(batch_size: int, bucket: tuple) -> int:
    """How many clips of a (width, height, frames) bucket hold about the voxels of `batch_size`
    clips of REFERENCE_FRAMES frames (at least 1)."""
    return max(1, round(batch_size * REFERENCE_FRAMES / bucket[2]))
CHECKPOINTS = "checkpoints"
AUTOENCODER_DIR = "autoencoder"
CAPTIONS = "captions.jsonl"
# Kept so that a resumed run reads what the first run computed instead of computing it again
# (12 minutes for the embedded recipe's 12,000 clips), and gets the very same numbers.
LATENTS = "latents.safetensors"  # in AUTOENCODER_DIR: each clip's raw posterior mean
CAPTION_ENCODINGS = "caption_encodings.safetensors"
LOG = "log.jsonl"
CONFIG = "config.json"
INIT = "init.json"

STAGE_DEFAULTS = {
    "steps": 1000,  # optimizer steps
    "batch_size": 8,  # clips of REFERENCE_FRAMES frames per batch (scaled for other durations)
    "lr": 3e-4,  # peak learning rate
    "min_lr_ratio": 0.1,  # the cosine decay ends at lr·min_lr_ratio
    "warmup": 100,  # linear warm-up steps
    "weight_decay": 0.0,
    "betas": [0.9, 0.99],
    "grad_clip": 1.0,  # max gradient norm (0: no clipping)
    "ema_decay": 0.999,  # EMA of the weights, with the usual (1+n)/(10+n) warm-up
    "checkpoint_every": 500,  # steps between checkpoints (one is always written at the end)
    "log_every": 20,  # steps between log lines
}
AUTOENCODER_DEFAULTS = {
    **STAGE_DEFAULTS,
    "lr": 1e-3,
    "kl_weight": 1e-4,
    # Reconstruction weight of pixels unlike their frame's border colour (1: no emphasis). Small
    # objects on a flat background are a few percent of the pixels: without it they are learnt
    # last (measured: still missing after 2,000 steps, while weight 10 learns them steadily).
    "foreground_weight": 1.0,
}
FOREGROUND_DISTANCE = 0.1  # in [-1, 1] units on any channel: what counts as unlike the border
TRANSFORMER_DEFAULTS = {
    **STAGE_DEFAULTS,
    "batch_size": 32,
    "text_dropout": 0.1,  # share of captions replaced by the empty prompt (classifier-free guidance)
    # torch.compile each transformer block (shape-generic, so new buckets rarely recompile):
    # fuses the elementwise work of norms, RoPE and modulation. Needs a C++ compiler on the
    # CPU; the first step pays the compile.
    "compile": False,
    "logit_normal": [0.0, 1.0],  # (mean, std) of logit(t) before the shift (SD3)
    # Loss weight of latent cells that cover an object (pixels unlike the border, as for the
    # autoencoder's foreground_weight), against 1 for the background; 1: no emphasis.
    "foreground_weight": 1.0,
    # Share of samples trained with each kind of known frames; "none" is plain text-to-video.
    "conditioning": {"none": 0.5, "first": 0.15, "last": 0.05, "ends": 0.1, "prefix": 0.1, "suffix": 0.1},
}
DEFAULTS = {
    "name": "skyloom-model",
    "seed": 0,
    "device": "auto",  # auto: cuda when available
    "mixed_precision": "auto",  # bf16 | no; auto: bf16 on CUDA, none on the CPU (fp16 would need loss scaling)
    "gradient_checkpointing": "auto",  # true | false; auto: on CUDA only
    "weights_dtype": "float16",  # dtype the bundle's weights are stored in
    "output": None,  # the bundle directory (relative to the config file); --out overrides
    "init": None,  # a trained bundle both models start from (fine-tuning), relative to the config file
    # false: only the autoencoder starts from init; the transformer starts afresh, so its section
    # may differ from the bundle's (a new transformer recipe on a trained autoencoder)
    "init_transformer": True,
    # time_reversal: add every clip played backwards (see prepare_data)
    "data": {"path": None, "shapes": None, "captioner": "shapes", "captions_per_clip": 4, "time_reversal": False},
    "text_encoder": {"plugin": "minilm", "config": {}},
    "video_autoencoder": {"plugin": "causal3d", "config": {}},
    "transformer": {},
    "autoencoder_training": AUTOENCODER_DEFAULTS,
    "transformer_training": TRANSFORMER_DEFAULTS,
    "defaults": {"sampler": "euler", "steps": 30, "guidance": 5.0, "shift": 1.0, "frames": 17, "width": 64, "height": 64, "fps": 8},
}


class TrainingError(ValueError):
    """A config, dataset, run directory or checkpoint is unusable; the message says how to fix it."""


# --- config ---------------------------------------------------------------------------------


def _merge(defaults: dict, given: dict, where: str) -> dict:
    """`given` over `defaults`, one level of nested sections deep; unknown keys are errors."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise TrainingError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(defaults)}")
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if isinstance(defaults[key], dict) and key not in ("config", "conditioning", "transformer", "defaults"):
            if not isinstance(value, dict):
                raise TrainingError(f"{where}: {key!r} must be an object, got {type(value).__name__}")
            out[key] = _merge(defaults[key], value, f"{where}.{key}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: str | os.PathLike) -> dict:
    """Read a training config (JSON) and fill in the defaults. Its relative paths (data.path,
    output) are relative to the config file's directory: pass that to train() as base_dir.
    Raises TrainingError naming the bad key."""
    path = Path(path)
    try:
        given = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"training config {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TrainingError(f"training config {path} is not valid JSON ({error})") from None
    if not isinstance(given, dict):
        raise TrainingError(f"training config {path}: the top level must be a JSON object")
    config = _merge(DEFAULTS, given, str(path))
    check_config(config, str(path))
    return config


def check_config(config: dict, where: str = "config") -> None:
    data = config["data"]
    if (data["path"] is None) == (data["shapes"] is None):
        raise TrainingError(f"{where}: give exactly one of data.path (a dataset directory) and data.shapes ({{\"seed\", \"count\"}})")
    if data["shapes"] is not None:
        shapes = data["shapes"]
        keys = {"seed", "count", "crf", "min_travel", "object_size", "gap", "two_objects"}
        if not isinstance(shapes, dict) or set(shapes) - keys or "count" not in shapes:
            raise TrainingError(
                f"{where}: data.shapes must be {{\"seed\": int, \"count\": int, \"crf\": int (optional), "
                f"\"min_travel\": number (optional), \"object_size\": [smallest, largest] (optional), "
                f"\"gap\": int (optional), \"two_objects\": number (optional)}}, got {shapes!r}"
            )
        from skyloom.datasets.shapes import (
            GAP, MIN_TRAVEL, OBJECT_SIZE, TWO_OBJECTS, DatasetError, check_gap, check_min_travel, check_object_size,
            check_two_objects,
        )

        try:
            min_travel = check_min_travel(shapes.get("min_travel", MIN_TRAVEL))
            check_object_size(shapes.get("object_size", OBJECT_SIZE), min_travel)
            check_gap(shapes.get("gap", GAP))
            check_two_objects(shapes.get("two_objects", TWO_OBJECTS))
        except DatasetError as error:
            raise TrainingError(f"{where}: data.shapes.{error}") from None
    _check_int(data["captions_per_clip"], f"{where}: data.captions_per_clip", 1)
    if not isinstance(data["time_reversal"], bool):
        raise TrainingError(f"{where}: data.time_reversal must be true or false, got {data['time_reversal']!r}")
    _check_int(config["seed"], f"{where}: seed", 0)
    if config["mixed_precision"] not in ("auto", "bf16", "no"):
        raise TrainingError(f"{where}: mixed_precision must be auto, bf16 or no (fp16 would need loss scaling), got {config['mixed_precision']!r}")
    if config["gradient_checkpointing"] not in ("auto", True, False):
        raise TrainingError(f"{where}: gradient_checkpointing must be true, false or \"auto\", got {config['gradient_checkpointing']!r}")
    if config["weights_dtype"] not in ("float32", "float16", "bfloat16"):
        raise TrainingError(f"{where}: weights_dtype must be float32, float16 or bfloat16, got {config['weights_dtype']!r}")
    init = config["init"]
    if init is not None and not (isinstance(init, str) and init):
        raise TrainingError(f"{where}: init must be the path of a trained model bundle (or null), got {init!r}")
    if config["init_transformer"] not in (True, False):
        raise TrainingError(f"{where}: init_transformer must be true or false, got {config['init_transformer']!r}")
    if init is None and not config["init_transformer"]:
        raise TrainingError(f"{where}: init_transformer is false but no init bundle is named; set init, or drop init_transformer")
    for stage in ("autoencoder_training", "transformer_training"):
        settings = config[stage]
        for key in ("steps", "batch_size", "checkpoint_every", "log_every"):
            # With an init bundle, 0 autoencoder steps keeps the bundle's autoencoder as it is.
            low = 0 if key == "steps" and stage == "autoencoder_training" and init is not None else 1
            _check_int(settings[key], f"{where}: {stage}.{key}", low)
        _check_int(settings["warmup"], f"{where}: {stage}.warmup", 0)
        if not (isinstance(settings["lr"], (int, float)) and settings["lr"] > 0):
            raise TrainingError(f"{where}: {stage}.lr must be a number > 0, got {settings['lr']!r}")
        if not 0 <= settings["ema_decay"] < 1:
            raise TrainingError(f"{where}: {stage}.ema_decay must be in [0, 1), got {settings['ema_decay']!r}")
    for stage in ("autoencoder_training", "transformer_training"):
        weight = config[stage]["foreground_weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 1:
            raise TrainingError(f"{where}: {stage}.foreground_weight must be a number >= 1 (1: no emphasis), got {weight!r}")
    shares = config["transformer_training"]["conditioning"]
    bad = sorted(set(shares) - set(CONDITIONING_KINDS))
    if bad or not shares or any(not isinstance(v, (int, float)) or v < 0 for v in shares.values()) or sum(shares.values()) <= 0:
        raise TrainingError(
            f"{where}: transformer_training.conditioning must map some of {list(CONDITIONING_KINDS)} to shares >= 0 "
            f"with a positive sum, got {shares!r}"
        )
    if not 0 <= config["transformer_training"]["text_dropout"] < 1:
        raise TrainingError(f"{where}: transformer_training.text_dropout must be in [0, 1)")
    if not isinstance(config["transformer_training"]["compile"], bool):
        raise TrainingError(f"{where}: transformer_training.compile must be true or false, got {config['transformer_training']['compile']!r}")
    try:
        DiTConfig.from_dict(config["transformer"])
    except (TypeError, ValueError) as error:
        raise TrainingError(f"{where}: transformer: {error}") from None
    if "guidance_interval" in config["defaults"]:  # checked now, not by the bundle after hours of training
        try:
            check_guidance_interval(config["defaults"]["guidance_interval"])
        except RequestError as error:
            raise TrainingError(f"{where}: defaults.{error}") from None


def _check_int(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrainingError(f"{name} must be an integer >= {low}, got {value!r}")


def _canonical(config: dict) -> str:
    return json.dumps(config, sort_keys=True, indent=2)


# --- data -----------------------------------------------------------------------------------


@dataclass
class Clip:
    frames: torch.Tensor  # (T, H, W, 3) uint8
    captions: list[str]

    @property
    def bucket(self) -> tuple[int, int, int]:
        T, H, W, _ = self.frames.shape
        return (W, H, T)


def prepare_data(
    config: dict, run_dir: Path, registry: Registry, progress: bool, base_dir: Path, workers: int = 1
) -> list[Clip]:
    """Write the dataset if the config generates one, read every clip (with data.time_reversal,
    then each clip played backwards: reversed_clips), and re-caption them (cached in
    RUN_DIR/captions.jsonl, so a resumed run reads the same captions). workers: processes that
    make, read and caption the clips (skyloom.process_map); the result is the same for any number."""
    from skyloom.datasets.shapes import GAP, MIN_TRAVEL, OBJECT_SIZE, TWO_OBJECTS, read_manifest, write_dataset
    from skyloom.video_io import VideoIOError

    data = config["data"]
    if data["shapes"] is not None:
        root = run_dir / "data"
        shapes = data["shapes"]
        write_dataset(
            root, shapes.get("seed", 0), shapes["count"], crf=shapes.get("crf", 18), resume=True, progress=progress,
            min_travel=shapes.get("min_travel", MIN_TRAVEL), object_size=shapes.get("object_size", OBJECT_SIZE),
            gap=shapes.get("gap", GAP), two_objects=shapes.get("two_objects", TWO_OBJECTS), workers=workers,
        )
    else:
        root = base_dir / data["path"]
    if not (root / "manifest.jsonl").is_file():
        raise TrainingError(f"dataset {root} has no manifest.jsonl; write one with `skyloom dataset shapes {root}`")
    records = read_manifest(root)
    if not records:
        raise TrainingError(f"dataset {root} lists no clips in manifest.jsonl")

    from tqdm import tqdm

    videos = []
    paths = [root / record["path"] for record in records]
    try:
        with closing(process_map(_read_frames, paths, workers)) as read:
            for frames, record in zip(
                tqdm(read, desc="reading clips", unit="clip", total=len(paths), disable=not progress, file=sys.stderr),
                records,
            ):
                videos.append((torch.from_numpy(frames), float(record.get("fps", 8))))
    except VideoIOError as error:
        raise TrainingError(f"dataset {root}: {error}") from None
    if data["time_reversal"]:
        videos += reversed_clips(records, videos)

    captions_path = run_dir / CAPTIONS
    per_clip = data["captions_per_clip"]
    cached = _read_captions(captions_path, len(videos), per_clip)
    if cached is None:
        captioner = _create(registry, "captioner", data["captioner"], {})
        if workers > 1:
            try:
                pickle.dumps(captioner)
            except Exception as error:  # it cannot travel to worker processes
                _say(f"captioner {data['captioner']!r} cannot be sent to worker processes ({error}); captioning in this one")
                workers = 1
        caption = functools.partial(_captions_of, captioner, per_clip)
        jobs = ((frames.numpy(), fps) for frames, fps in videos)
        with closing(process_map(caption, jobs, workers)) as captions:
            cached = list(tqdm(captions, desc="re-captioning", unit="clip", total=len(videos), disable=not progress,
                               file=sys.stderr))
        write_atomic(captions_path, "".join(json.dumps(c) + "\n" for c in cached))
    return [Clip(frames, captions) for (frames, _), captions in zip(videos, cached)]


def _read_frames(path: Path) -> np.ndarray:
    """A clip's frames, (T, H, W, 3) uint8, as numpy: what a worker process sends back."""
    from skyloom.video_io import read_video

    return read_video(path)[0].numpy()


def _captions_of(captioner: Captioner, count: int, video: tuple[np.ndarray, float]) -> list[str]:
    frames, fps = video
    return captioner.captions(torch.from_numpy(frames), fps, count)


def reversed_clips(records: list[dict], videos: list[tuple[torch.Tensor, float]]) -> list[tuple[torch.Tensor, float]]:
    """(frames, fps) of each clip played backwards: the same scene with every motion reversed,
    so the captions of a clip and its reversal differ only in the direction words (moves up /
    moves down), which the transformer then has to read. A clip whose reversal would show a
    held-out object (a yellow object moving up becomes one moving down) is left out."""
    from skyloom.shapes_world import is_held_out, reversed_motion

    out = []
    for record, (frames, fps) in zip(records, videos):
        if "objects" not in record:
            raise TrainingError(
                f"data.time_reversal needs each manifest record's objects, as `skyloom dataset shapes` writes them "
                f"(clip {record.get('path')!r} has none); set it to false for this dataset"
            )
        if not any(is_held_out({**obj, "motion": reversed_motion(obj["motion"])}) for obj in record["objects"]):
            out.append((frames.flip(0), fps))
    return out


def _read_captions(path: Path, count: int, per_clip: int) -> list[list[str]] | None:
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    captions = [json.loads(line) for line in lines]
    if len(captions) != count or any(len(c) != per_clip for c in captions):
        raise TrainingError(
            f"{path} holds captions for {len(captions)} clips, the dataset has {count} (x{per_clip}); "
            "delete it to re-caption"
        )
    return captions


class BucketBatches:
    """Batch k of a run, as a function of (seed, k) alone: every epoch shuffles each bucket's
    clips and the order of the batches; a bucket of T frames gets batch_size·17/T clips (at
    least 1), so batches hold about the same number of voxels. Remainders are dropped."""

    def __init__(self, buckets: list[tuple], batch_size: int, seed: int):
        self.seed, self.batch_size = seed, batch_size
        self.members: dict[tuple, list[int]] = {}
        for index, bucket in enumerate(buckets):
            self.members.setdefault(bucket, []).append(index)
        self.sizes = {b: clips_per_batch(batch_size, b) for b in self.members}
        self.per_epoch = sum(len(m) // self.sizes[b] for b, m in self.members.items())
        if self.per_epoch == 0:
            raise TrainingError(
                f"no bucket has a full batch (batch_size {batch_size}, buckets {self._describe()}); "
                "lower batch_size or add clips"
            )
        self._epoch, self._batches = -1, []

    def _describe(self) -> str:
        return ", ".join(f"{w}x{h}x{t}: {len(m)}" for (w, h, t), m in sorted(self.members.items()))

    def __call__(self, step: int) -> list[int]:
        epoch, position = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            batches = []
            for bucket in sorted(self.members):
                members, size = self.members[bucket], self.sizes[bucket]
                order = torch.randperm(len(members), generator=generator).tolist()
                batches += [[members[i] for i in order[j : j + size]] for j in range(0, len(order) - size + 1, size)]
            permutation = torch.randperm(len(batches), generator=generator).tolist()
            self._epoch, self._batches = epoch, [batches[i] for i in permutation]
        return self._batches[position]


def _pixels(clips: list[Clip], indices: list[int], device: torch.device) -> torch.Tensor:
    """(B, 3, T, H, W) float in [-1, 1]."""
    video = torch.stack([clips[i].frames for i in indices]).to(device)  # (B, T, H, W, 3) uint8
    return video.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1)


# --- the shared loop ------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a module's floating-point state, with (1+n)/(10+n) warm-up."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for shadow, live in zip(self.module.state_dict().values(), module.state_dict().values()):
            if shadow.is_floating_point():
                shadow.lerp_(live.detach(), 1 - decay)
            else:
                shadow.copy_(live)


def learning_rate(settings: dict, step: int) -> float:
    """Linear warm-up to lr, then cosine decay to lr·min_lr_ratio at the last step."""
    lr, warmup, steps = settings["lr"], settings["warmup"], settings["steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = settings["min_lr_ratio"]
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class StopRequested(Exception):
    """Raised after a checkpoint when the run stops early (Ctrl-C or the time limit)."""

    def __init__(self, stage: str, step: int, reason: str):
        super().__init__(f"{reason}: stopped after {stage} step {step}")
        self.stage, self.step, self.reason = stage, step, reason


@contextmanager
def _graceful_interrupt() -> Iterator[dict]:
    """The first Ctrl-C only sets flag["stop"] (the loop checkpoints and stops after the current
    step); a second one interrupts at once."""
    flag = {"stop": False}
    if not hasattr(signal, "SIGINT") or signal.getsignal(signal.SIGINT) is None:
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        print("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave the signal alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class Stage:
    name: str  # "autoencoder" or "transformer"
    module: nn.Module
    settings: dict
    batches: BucketBatches
    loss: Callable[[list[int], torch.Generator], torch.Tensor]  # batch indices, rng -> scalar loss


def run_stage(stage: Stage, run: "Run") -> nn.Module:
    """Train to settings.steps, resuming from the stage's latest checkpoint. Returns the EMA module."""
    settings, module = stage.settings, stage.module
    decay_groups = _parameter_groups(module, settings["weight_decay"])
    # fused: one kernel for all parameters (the per-tensor loop took 9 % of a CPU transformer step)
    optimizer = torch.optim.AdamW(decay_groups, lr=settings["lr"], betas=tuple(settings["betas"]), eps=1e-8, fused=True)
    ema = EMA(module, settings["ema_decay"])
    step = run.restore(stage.name, module, ema.module, optimizer)
    run.truncate_log(stage.name, step)

    from tqdm import tqdm

    total = settings["steps"]
    started, window_start, window_samples = time.perf_counter(), time.perf_counter(), 0
    module.train()
    with _graceful_interrupt() as interrupt, tqdm(
        total=total, initial=step, desc=stage.name, unit="step", disable=not run.progress, file=sys.stderr
    ) as bar:
        while step < total:
            indices = stage.batches(step)
            lr = learning_rate(settings, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with run.autocast():
                loss = stage.loss(indices, run.generator)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"{stage.name} step {step}: the loss is {loss.item()}; lower {stage.name}_training.lr "
                    "or resume from an earlier checkpoint"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (
                nn.utils.clip_grad_norm_(module.parameters(), settings["grad_clip"]).item()
                if settings["grad_clip"] else float("nan")
            )
            optimizer.step()
            ema.update(module, step)
            step += 1
            window_samples += len(indices)
            bar.update(1)
            if step % settings["log_every"] == 0 or step == total:
                now = time.perf_counter()
                run.log({
                    "stage": stage.name, "step": step, "loss": round(loss.item(), 6), "lr": lr,
                    "grad_norm": round(grad_norm, 4), "samples_per_s": round(window_samples / max(now - window_start, 1e-9), 3),
                    "elapsed_s": round(now - started, 2),
                })
                bar.set_postfix(loss=f"{loss.item():.4f}")
                window_start, window_samples = now, 0
            out_of_time = run.deadline is not None and time.monotonic() >= run.deadline
            if step % settings["checkpoint_every"] == 0 or step == total or interrupt["stop"] or out_of_time:
                run.checkpoint(stage.name, step, module, ema.module, optimizer)
            if step < total and (interrupt["stop"] or out_of_time):
                raise StopRequested(stage.name, step, "interrupted" if interrupt["stop"] else "time limit reached")
    return ema.module


def _parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases, norms and embeddings' gains)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# --- the run directory ----------------------------------------------------------------------


class Run:
    """A run directory: config.json, log.jsonl, captions.jsonl, checkpoints/, autoencoder/, and
    init.json when the config fine-tunes a bundle."""

    def __init__(
        self, run_dir: Path, config: dict, *, resume: bool, progress: bool, time_limit_s: float | None, device,
        init_hash: str | None = None,
    ):
        self.dir, self.config, self.progress = run_dir, config, progress
        self.device = device
        self.init_hash = init_hash  # the model hash of the init bundle, if the config names one
        self.deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        self.generator = torch.Generator().manual_seed(config["seed"])
        self.started_config, self.bundle_only_changes = config, []
        self._open(resume)

    def _open(self, resume: bool) -> None:
        config_path = self.dir / CONFIG
        if self.dir.exists() and not self.dir.is_dir():
            raise TrainingError(f"run directory {self.dir} exists and is not a directory")
        if config_path.is_file():
            if not resume:
                raise TrainingError(
                    f"run directory {self.dir} already holds a run; pass --resume to continue it, or give a new --run-dir"
                )
            # Over today's defaults, so that a key added since the run started is not a difference.
            stored = _merge(DEFAULTS, json.loads(config_path.read_text(encoding="utf-8")), str(config_path))
            identity, started = _run_identity(self.config), _run_identity(stored)
            if _canonical(identity) != _canonical(started):  # as JSON: 1 and 1.0 differ, as they did when hashed
                changed = sorted(_differences(started, identity)) or ["a number's type (such as 1 against 1.0)"]
                raise TrainingError(
                    f"cannot resume {self.dir}: the config differs from the one it was started with at {', '.join(changed)}; "
                    "use the original config (only the defaults training does not read, such as guidance, may change), "
                    "or a new --run-dir"
                )
            # Checkpoints carry the hash of the config the run started with, whatever defaults
            # the bundle is written with now.
            self.started_config = stored
            self.bundle_only_changes = sorted(_differences(stored, self.config))
        elif self.dir.is_dir() and any(self.dir.iterdir()) and not resume:
            raise TrainingError(f"run directory {self.dir} is not empty and holds no run; give an empty or new --run-dir")
        init_path = self.dir / INIT
        if self.init_hash is not None and init_path.is_file():
            if json.loads(init_path.read_text(encoding="utf-8")).get("model_hash") != self.init_hash:
                raise TrainingError(
                    f"cannot resume {self.dir}: the init bundle {self.config['init']} has changed since the run started "
                    "(the model hash of its index and weights differs); restore that bundle, or use a new --run-dir"
                )
        self.dir.mkdir(parents=True, exist_ok=True)
        if not config_path.is_file():
            write_atomic(config_path, _canonical(self.config) + "\n")
        if self.init_hash is not None and not init_path.is_file():
            write_atomic(init_path, json.dumps({"init": self.config["init"], "model_hash": self.init_hash}) + "\n")

    @contextmanager
    def autocast(self):
        mode = self.config["mixed_precision"]
        if mode == "auto":
            mode = "bf16" if self.device.type == "cuda" else "no"
        if mode == "no":
            yield
            return
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            yield

    # -- log ---------------------------------------------------------------------------------

    def log(self, entry: dict) -> None:
        with open(self.dir / LOG, "a", encoding="utf-8") as file:
            file.write(json.dumps(entry) + "\n")
            file.flush()

    def truncate_log(self, stage: str, step: int) -> None:
        """Drop log lines written after the checkpoint a resumed stage restarts from."""
        path = self.dir / LOG
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by an interrupted write
            position = (STAGES.index(entry["stage"]), entry["step"])
            if position <= (STAGES.index(stage), step):
                kept.append(line + "\n")
        write_atomic(path, "".join(kept))

    # -- checkpoints -------------------------------------------------------------------------

    def _checkpoint_dirs(self, stage: str) -> list[tuple[int, Path]]:
        root = self.dir / CHECKPOINTS
        found = []
        if root.is_dir():
            for path in root.iterdir():
                name, _, number = path.name.rpartition("-")
                if name == stage and number.isdigit() and path.is_dir():
                    found.append((int(number), path))
        return sorted(found)

    def checkpoint(self, stage: str, step: int, module: nn.Module, ema: nn.Module, optimizer) -> Path:
        from safetensors.torch import save_file

        root = self.dir / CHECKPOINTS
        root.mkdir(exist_ok=True)
        target = root / f"{stage}-{step:07d}"
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            save_file(safetensors_state(module), str(staging / "model.safetensors"))
            save_file(safetensors_state(ema), str(staging / "ema.safetensors"))
            tensors, groups = _flatten_optimizer(optimizer)
            tensors["rng.train"] = self.generator.get_state()
            tensors["rng.torch"] = torch.get_rng_state()
            save_file(tensors, str(staging / "optimizer.safetensors"))
            state = {"stage": stage, "step": step, "param_groups": groups, "config_sha256": _config_hash(self.started_config)}
            (staging / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for _, old in self._checkpoint_dirs(stage)[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
        return target

    def restore(self, stage: str, module: nn.Module, ema: nn.Module, optimizer) -> int:
        """Load the stage's latest checkpoint into the objects; the step it was taken at (0: none)."""
        found = self._checkpoint_dirs(stage)
        if not found:
            return 0
        step, path = found[-1]
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
            model = load_file(str(path / "model.safetensors"))
            shadow = load_file(str(path / "ema.safetensors"))
            tensors = load_file(str(path / "optimizer.safetensors"))
        except (OSError, ValueError, SafetensorError) as error:
            raise TrainingError(
                f"checkpoint {path} is unreadable ({error}); delete it to resume from the one before, "
                "or start a new --run-dir"
            ) from None
        if state.get("stage") != stage or state.get("step") != step or state.get("config_sha256") != _config_hash(self.started_config):
            raise TrainingError(f"checkpoint {path} belongs to another run or stage; delete it or use a new --run-dir")
        for target, tensors_of, label in ((module, model, "model"), (ema, shadow, "ema")):
            _load_exact(target, tensors_of, path / f"{label}.safetensors")
        try:
            optimizer.load_state_dict(_unflatten_optimizer(tensors, state["param_groups"]))
            self.generator.set_state(tensors["rng.train"])
            torch.set_rng_state(tensors["rng.torch"])
        except (KeyError, ValueError, RuntimeError) as error:
            raise TrainingError(f"checkpoint {path}: the optimizer or RNG state does not fit this model ({error})") from None
        return step

    # -- the autoencoder's result ------------------------------------------------------------

    def save_autoencoder(self, vae: nn.Module, shift: float, scale: float, latents: list[torch.Tensor], clips_key: str) -> None:
        """The finished autoencoder, its latent statistics, the RNG states and the clips' raw latents."""
        from safetensors.torch import save_file

        target = self.dir / AUTOENCODER_DIR
        staging = Path(tempfile.mkdtemp(prefix=".autoencoder.", dir=self.dir))
        try:
            save_file(safetensors_state(vae), str(staging / "weights.safetensors"))
            # The random streams as the stage left them, so the transformer stage draws the same
            # numbers whether it follows in this process, after a restart, or in another run.
            save_file({"rng.train": self.generator.get_state(), "rng.torch": torch.get_rng_state()}, str(staging / "rng.safetensors"))
            stats = {"shift_factor": shift, "scaling_factor": scale, "config_sha256": _autoencoder_config_hash(self.config, self.init_hash)}
            (staging / "latent_stats.json").write_text(json.dumps(stats) + "\n", encoding="utf-8")
            save_file(_numbered(latents), str(staging / LATENTS), metadata={"clips": clips_key})
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def load_autoencoder(self, vae: nn.Module) -> tuple[float, float] | None:
        """(shift, scale) and the weights loaded into `vae`, or None when the stage has not finished."""
        target = self.dir / AUTOENCODER_DIR
        if not target.is_dir():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            stats = json.loads((target / "latent_stats.json").read_text(encoding="utf-8"))
            tensors = load_file(str(target / "weights.safetensors"))
        except (OSError, ValueError, SafetensorError) as error:
            raise TrainingError(f"{target} is unreadable ({error}); delete it to retrain the autoencoder") from None
        try:
            rng = load_file(str(target / "rng.safetensors"))
            train_rng, torch_rng = rng["rng.train"], rng["rng.torch"]
        except (OSError, KeyError, SafetensorError) as error:
            raise TrainingError(
                f"{target} has no readable rng.safetensors ({error}; an older skyloom did not write one), so the transformer "
                "stage could not draw what a straight run draws; delete it to retrain the autoencoder"
            ) from None
        if stats.get("config_sha256") != _autoencoder_config_hash(self.config, self.init_hash):
            raise TrainingError(
                f"{target} was trained with other data or autoencoder settings; delete it or use a new --run-dir"
            )
        _load_exact(vae, tensors, target / "weights.safetensors")
        try:
            self.generator.set_state(train_rng)
            torch.set_rng_state(torch_rng)
        except (RuntimeError, TypeError) as error:
            raise TrainingError(f"{target}/rng.safetensors does not hold RNG states ({error}); delete {target} to retrain the autoencoder") from None
        return float(stats["shift_factor"]), float(stats["scaling_factor"])

    def save_latents(self, latents: list[torch.Tensor], clips_key: str) -> None:
        """Keep the clips' raw latents beside an autoencoder saved without them (an older run's)."""
        _save_atomic(self.dir / AUTOENCODER_DIR / LATENTS, _numbered(latents), {"clips": clips_key})

    def load_latents(self, clips_key: str, shapes: list[tuple]) -> list[torch.Tensor] | None:
        """The raw latents saved with the autoencoder, or None (saying why) when there are none
        or they are not of these clips (`clips_key`, `shapes`); they can always be encoded again."""
        path = self.dir / AUTOENCODER_DIR / LATENTS
        if not path.is_file():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                same_clips = (file.metadata() or {}).get("clips") == clips_key and len(file.keys()) == len(shapes)
                latents = [file.get_tensor(str(index)) for index in range(len(shapes))] if same_clips else []
        except (OSError, SafetensorError) as error:
            _say(f"{path} is unreadable ({error}); encoding the latents again")
            return None
        if not same_clips or any(tuple(latent.shape) != shape for latent, shape in zip(latents, shapes)):
            _say(f"{path} holds latents of other clips; encoding the latents again")
            return None
        return latents


def clips_key(clips: list[Clip]) -> str:
    """A hash of every clip's frames, in order: what cached latents were computed from."""
    digest = hashlib.sha256()
    for clip in clips:
        digest.update(str(tuple(clip.frames.shape)).encode())
        digest.update(clip.frames.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _numbered(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A list of tensors as a safetensors dict, keyed by position."""
    return {str(index): tensor.contiguous() for index, tensor in enumerate(tensors)}


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors written to a temporary file beside `path`, then renamed over it."""
    from safetensors.torch import save_file

    write_atomic_with(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def _load_exact(module: nn.Module, tensors: dict, path: Path) -> None:
    expected = module.state_dict()
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise TrainingError(f"{path} does not match the model the config builds (other tensors or shapes); use a new --run-dir")
    module.load_state_dict(tensors)


def _flatten_optimizer(optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """An optimizer's state as flat tensors (for safetensors) plus its JSON param groups."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"state.{index}.{key}"] = torch.as_tensor(value).detach().to("cpu").contiguous().clone()
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": groups}


# Keys added after runs had been written, with their defaults: left out of a config's hash at
# those defaults, so checkpoints written before a key existed still resume.
ADDED_KEYS = {("init",): None, ("init_transformer",): True, ("transformer_training", "compile"): False}


def _config_hash(config: dict) -> str:
    config = copy.deepcopy(config)
    for path, default in ADDED_KEYS.items():
        *parents, key = path
        section = config
        for parent in parents:
            section = section.get(parent) if isinstance(section, dict) else None
        if isinstance(section, dict) and key in section and section[key] == default:
            del section[key]
    return hashlib.sha256(_canonical(config).encode()).hexdigest()


# What the autoencoder stage reads. Its finished result (autoencoder/) serves any config that
# agrees on these, so a new transformer recipe can start from a trained autoencoder.
AUTOENCODER_KEYS = ("seed", "device", "mixed_precision", "data", "video_autoencoder", "autoencoder_training")


def _autoencoder_config_hash(config: dict, init_hash: str | None) -> str:
    """With an init bundle the stage starts from its weights, so its model hash counts too (not
    its path: the same bundle may be named from elsewhere)."""
    keys = {key: config[key] for key in AUTOENCODER_KEYS}
    if init_hash is not None:
        keys["init"] = init_hash
    return _config_hash(keys)


def _trained_defaults(config: dict) -> dict:
    """The sampling defaults that training reads too: the timestep shift, and the video size the
    shift is scaled from (resolution_shift). The other defaults only go into the bundle's index."""
    given, fallback = config["defaults"], DEFAULTS["defaults"]  # a config's "defaults" replaces the section whole
    trained = {key: given.get(key, fallback[key]) for key in ("shift", "frames", "height", "width")}
    return {**trained, "shift": float(trained["shift"])}


def _run_identity(config: dict) -> dict:
    """What a resumed run must agree on: the whole config, except the defaults training does not
    read (sampler, steps, guidance, ...), so that a finished run can write its bundle again with
    new ones (skyloom train NEW-CONFIG --run-dir RUN --resume) instead of training again."""
    return {**config, "defaults": _trained_defaults(config)}


def _differences(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in set(a) | set(b):
            out += _differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if a == b else [prefix or "(top level)"]


def _create(registry: Registry, kind: str, name: str, config: dict):
    try:
        return registry.create(kind, name, **config)
    except (UnknownPluginError, UnknownKindError) as error:
        raise TrainingError(f"config: {kind} {name!r}: {error}") from None
    except (TypeError, ValueError) as error:
        raise TrainingError(f"config: {kind} {name!r} does not accept its config: {error}") from None


# --- the two stages -------------------------------------------------------------------------


def foreground(video: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, H, W) bool: where a pixel of video (B, 3, T, H, W) differs from its frame's
    border colour (the per-channel median of the top and bottom rows) by more than
    FOREGROUND_DISTANCE."""
    border = torch.cat([video[..., 0, :], video[..., -1, :]], dim=-1).median(dim=-1).values  # (B, 3, T)
    return (video - border[..., None, None]).abs().amax(dim=1, keepdim=True) > FOREGROUND_DISTANCE


def foreground_weights(video: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, T, H, W): `weight` on the foreground, 1 elsewhere."""
    return 1 + (weight - 1) * foreground(video).to(video.dtype)


@torch.no_grad()
def latent_foreground(clips: list[Clip], temporal_compression: int, spatial_compression: int) -> list[torch.Tensor]:
    """Each clip's foreground on the latent grid, (T', H', W') bool: a cell is foreground when any
    pixel it covers, in any of its frames, is. Latent frame 0 covers frame 0 alone (the
    VideoAutoencoder contract), so frame 0 is repeated to fill its group."""
    tc, sc = temporal_compression, spatial_compression
    out = []
    for index in range(len(clips)):
        mask = foreground(_pixels(clips, [index], torch.device("cpu"))).float()  # (1, 1, T, H, W)
        mask = torch.cat([mask[:, :, :1].expand(-1, -1, tc - 1, -1, -1), mask], dim=2)
        out.append(torch.nn.functional.max_pool3d(mask, (tc, sc, sc))[0, 0].bool())
    return out


def _autoencoder_loss(vae, clips: list[Clip], settings: dict, device) -> Callable:
    def loss(indices: list[int], generator: torch.Generator) -> torch.Tensor:
        video = _pixels(clips, indices, device)  # (B, 3, T, H, W)
        mean, logvar = vae.encode_distribution(video)  # (B, C', T', H', W') each
        noise = torch.randn(mean.shape, generator=generator).to(device)
        z = mean + noise * (0.5 * logvar).exp()  # a posterior sample
        error = vae.decode(z, clamp=False) - video  # (B, 3, T, H, W); normalisation is identity here
        weights = foreground_weights(video, settings["foreground_weight"])  # (B, 1, T, H, W)
        reconstruction = (weights * (error.abs() + error.square())).mean()  # weighted L1 + MSE
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        return reconstruction + settings["kl_weight"] * kl

    return loss


ENCODE_BATCH = 16  # clips of REFERENCE_FRAMES frames encoded together (scaled for other durations)
CAPTION_CHUNK = 256  # captions encoded together by CaptionTable


@torch.no_grad()
def encode_latents(vae, clips: list[Clip], device, progress: bool) -> list[torch.Tensor]:
    """Each clip's posterior mean, raw (before normalisation), on the CPU, in the clips' order.
    The transformer learns the means: with a small KL, channels the autoencoder leaves unused are
    prior noise, which a posterior sample would hand the transformer to model for nothing. Clips
    are encoded in batches of one bucket: 3.6x as fast as one at a time (180 clips, two CPU cores)."""
    from tqdm import tqdm

    members: dict[tuple, list[int]] = {}
    for index, clip in enumerate(clips):
        members.setdefault(clip.bucket, []).append(index)
    out: list[torch.Tensor | None] = [None] * len(clips)
    with tqdm(total=len(clips), desc="encoding latents", unit="clip", disable=not progress, file=sys.stderr) as bar:
        for bucket, indices in sorted(members.items()):
            size = clips_per_batch(ENCODE_BATCH, bucket)
            for start in range(0, len(indices), size):
                batch = indices[start : start + size]
                mean, _ = vae.encode_distribution(_pixels(clips, batch, device))  # (b, C', T', H', W')
                for index, row in zip(batch, mean.float().cpu()):
                    out[index] = row.clone()  # its own storage, not a view of the batch
                bar.update(len(batch))
    return out


class CaptionTable:
    """Every caption's text encoding, computed once before the transformer stage: the distinct
    captions and the empty prompt of text dropout, sorted, in chunks of CAPTION_CHUNK. A prompt's
    encoding depends in its last bits on the batch it is encoded with (MiniLM: up to 2e-6), so a
    fixed order gives a straight and a resumed run the same numbers. Encoding the captions at
    every step instead cost about a quarter of a CPU step (MiniLM: 0.18 s per 32 on two cores).
    Rows keep only the real tokens: MiniLM's 24,001 captions of recipe v16 took 0.7 GB (v17 has 30,903)."""

    def __init__(self, text_encoder, clips: list[Clip], progress: bool, cache: Path | None = None, encoder_config: dict | None = None):
        """cache: a file that keeps the encodings for a resumed run, valid for these captions and
        this `encoder_config` (the config's text_encoder section)."""
        from tqdm import tqdm

        captions = sorted({caption for clip in clips for caption in clip.captions} | {""})
        self.index = {caption: i for i, caption in enumerate(captions)}
        key = hashlib.sha256(json.dumps([encoder_config, captions], sort_keys=True).encode("utf-8")).hexdigest()
        tokens, mask = self._read(cache, key, len(captions)) if cache is not None else (None, None)
        if tokens is not None:
            _say(f"caption encodings read from {cache}")
        else:
            _say("encoding the captions")
            chunks = []
            with tqdm(total=len(captions), desc="encoding captions", unit="caption", disable=not progress, file=sys.stderr) as bar:
                for start in range(0, len(captions), CAPTION_CHUNK):
                    with torch.no_grad():
                        emb = text_encoder.encode(captions[start : start + CAPTION_CHUNK])
                    mask_chunk = emb.mask.cpu().bool()
                    chunks.append((emb.tokens.cpu()[mask_chunk], mask_chunk))  # the real tokens only, row after row
                    bar.update(len(mask_chunk))
            mask = torch.cat([m for _, m in chunks])
            tokens = torch.cat([t for t, _ in chunks])
            if cache is not None:
                _save_atomic(cache, {"tokens": tokens, "mask": mask}, {"key": key})
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # (real tokens (n, D), mask (L,)) per caption
        for row_mask, row_tokens in zip(mask, tokens.split(mask.sum(1).tolist())):
            self.rows.append((row_tokens, row_mask))
        self.length, self.dim, self.dtype = mask.shape[1], tokens.shape[1], tokens.dtype

    @staticmethod
    def _read(cache: Path, key: str, count: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(tokens, mask) from `cache` when it holds the encodings of these captions, else (None, None)."""
        if not cache.is_file():
            return None, None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(cache), framework="pt") as file:
                if (file.metadata() or {}).get("key") != key:
                    _say(f"{cache} holds the encodings of other captions; encoding the captions again")
                    return None, None
                tokens, mask = file.get_tensor("tokens"), file.get_tensor("mask")
        except (OSError, SafetensorError) as error:
            _say(f"{cache} is unreadable ({error}); encoding the captions again")
            return None, None
        if mask.dtype != torch.bool or mask.dim() != 2 or len(mask) != count or tokens.dim() != 2 or len(tokens) != int(mask.sum()):
            _say(f"{cache} does not hold one encoding per caption; encoding the captions again")
            return None, None
        return tokens, mask

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, L, D), zero where masked, and mask (B, L) of `captions`, on the CPU."""
        tokens = torch.zeros(len(captions), self.length, self.dim, dtype=self.dtype)
        mask = torch.zeros(len(captions), self.length, dtype=torch.bool)
        for i, caption in enumerate(captions):
            real, mask[i] = self.rows[self.index[caption]]
            tokens[i, mask[i]] = real
        return tokens, mask


def _condition_masks(kinds: list[str], weights: torch.Tensor, batch: int, frames: int, generator) -> torch.Tensor:
    """(B, T') 0/1 masks of the known latent frames, one drawn kind per sample."""
    mask = torch.zeros(batch, frames)
    for row, choice in enumerate(torch.multinomial(weights, batch, replacement=True, generator=generator).tolist()):
        kind = kinds[choice]
        k = int(torch.randint(1, max(frames, 2), (1,), generator=generator))  # 1 .. T'-1 frames
        if kind == "first":
            mask[row, 0] = 1
        elif kind == "last":
            mask[row, -1] = 1
        elif kind == "ends":
            mask[row, 0] = mask[row, -1] = 1
        elif kind == "prefix":
            mask[row, :k] = 1
        elif kind == "suffix":
            mask[row, frames - k :] = 1
        if frames == 1 or mask[row].all():  # at least one frame must be left to generate
            mask[row] = 0
    return mask


def _transformer_loss(dit, captions_of: CaptionTable, latents, clips: list[Clip], settings: dict, config: dict, base_tokens: int, device,
                      foreground_of: list[torch.Tensor] | None = None) -> Callable:
    """The loss of one batch; foreground_of (latent_foreground's masks) weights the cells that
    cover an object by settings["foreground_weight"]."""
    kinds = list(settings["conditioning"])
    weights = torch.tensor([float(settings["conditioning"][k]) for k in kinds])
    mu, sigma = settings["logit_normal"]
    base_shift = _trained_defaults(config)["shift"]

    def loss(indices: list[int], generator: torch.Generator) -> torch.Tensor:
        B = len(indices)
        x0 = torch.stack([latents[i] for i in indices])  # (B, C, T', H', W') normalised posterior means
        _, C, T, H, W = x0.shape
        captions = []
        for i in indices:
            choice = int(torch.randint(len(clips[i].captions), (1,), generator=generator))
            dropped = float(torch.rand((), generator=generator)) < settings["text_dropout"]
            captions.append("" if dropped else clips[i].captions[choice])
        shift = resolution_shift(dit.config.num_tokens(T, H, W), base_tokens=base_tokens, base_shift=base_shift)
        t = shift_time(torch.sigmoid(mu + sigma * torch.randn(B, generator=generator)), shift)  # (B,) in (0, 1)
        noise = torch.randn(x0.shape, generator=generator)
        known = _condition_masks(kinds, weights, B, T, generator)  # (B, T')

        x0, noise, known, t = x0.to(device), noise.to(device), known.to(device), t.to(device)
        tt = t.view(B, 1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * noise  # (B, C, T', H', W')
        target = noise - x0  # the velocity dx/dt
        text_tokens, text_mask = captions_of(captions)
        cond_latent = x0 * known.view(B, 1, T, 1, 1)
        velocity = dit(x_t, t, text_tokens.to(device), text_mask.to(device), cond_latent, known)
        weight = (1 - known).view(B, 1, T, 1, 1).expand_as(target)  # only the frames to generate
        if foreground_of is not None:
            cells = torch.stack([foreground_of[i] for i in indices]).to(device)[:, None]  # (B, 1, T', H', W')
            weight = weight * (1 + (settings["foreground_weight"] - 1) * cells.to(weight.dtype))
        return ((velocity.float() - target).square() * weight).sum() / weight.sum().clamp(min=1)

    return loss


# --- entry point ----------------------------------------------------------------------------


def load_init(config: dict, base_dir: Path, registry: Registry) -> ModelBundle:
    """The trained bundle `config["init"]` names (a ModelBundle on the CPU), checked to hold the
    text encoder, autoencoder and (unless init_transformer is false) transformer the config
    builds, so its weights fit them."""
    path = base_dir / config["init"]
    try:
        bundle = load_bundle(path, registry)
    except BundleError as error:
        raise TrainingError(f"config: init: {error}") from None
    if not bundle.trained:
        raise TrainingError(f"config: init {path} is an untrained bundle (\"trained\": false); name a bundle skyloom train wrote")
    index = bundle.index
    ae = index["video_autoencoder"]
    ae_config = {k: v for k, v in ae.get("config", {}).items() if k not in ("shift_factor", "scaling_factor")}
    te = index["text_encoder"]
    dit = bundle.transformer.config.to_dict()
    given = DiTConfig.from_dict({**dit, **config["transformer"], "gradient_checkpointing": dit["gradient_checkpointing"]}).to_dict()
    differ = [
        name for name, same in (
            ("text_encoder", (te["plugin"], te.get("config", {})) == (config["text_encoder"]["plugin"], config["text_encoder"]["config"])),
            ("video_autoencoder", (ae["plugin"], ae_config) == (config["video_autoencoder"]["plugin"], config["video_autoencoder"]["config"])),
            ("transformer", given == dit or not config["init_transformer"]),
        ) if not same
    ]
    if differ:
        raise TrainingError(
            f"config: init {path} holds another {', '.join(differ)} than the config builds; an init bundle's weights must "
            f"fit the config's architecture, so copy those sections from {path / 'model_index.json'} or train from scratch"
            + (" (or, for a new transformer on its autoencoder, set init_transformer to false)" if differ == ["transformer"] else "")
        )
    return bundle


def _say(message: str) -> None:
    """A milestone on stderr (the bars show only on a terminal; a log file gets these)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _device(config: dict) -> torch.device:
    if config["device"] == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(config["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("config: device is cuda but no CUDA device is available; set \"device\": \"auto\" or \"cpu\"")
    return device


def train(
    config: dict,
    run_dir: str | os.PathLike,
    *,
    registry: Registry,
    output: str | os.PathLike | None = None,
    base_dir: str | os.PathLike = ".",
    resume: bool = False,
    time_limit_s: float | None = None,
    progress: bool = False,
    workers: int = 1,
) -> Path:
    """Run (or resume) the whole recipe of `config` (from load_config) in `run_dir` and write the
    model bundle to `output` (default: config["output"], relative to base_dir, the config file's
    directory, as data.path is). workers: processes for the data stage (prepare_data); the
    weights do not depend on it. Returns the bundle's path. Raises StopRequested after a
    checkpoint when interrupted or out of time, TrainingError for bad input."""
    try:
        check_workers(workers)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    base_dir = Path(base_dir)
    if output is None:
        if config["output"] is None:
            raise TrainingError("no output bundle: set \"output\" in the config or pass --out DIR")
        output = base_dir / config["output"]
    run_dir, output = Path(run_dir), Path(output)
    device = _device(config)
    if config["transformer_training"]["compile"] and device.type == "cpu":  # checked before any stage runs
        if not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++") if c):
            raise TrainingError(
                "config: transformer_training.compile needs a C++ compiler on the CPU (Inductor builds its kernels "
                "with one): install g++ (or set CXX), or set compile to false"
            )
    init = None
    if config["init"] is not None:  # checked before the run directory is made; its RNG draws are its own
        with torch.random.fork_rng(devices=[]):
            init = load_init(config, base_dir, registry)
        if output.resolve() == init.path.resolve():
            raise TrainingError(f"the output bundle {output} is the init bundle; write the new bundle elsewhere (--out DIR)")
    torch.manual_seed(config["seed"])
    run = Run(
        run_dir, config, resume=resume, progress=progress, time_limit_s=time_limit_s, device=device,
        init_hash=None if init is None else init.model_hash,
    )
    if init is not None:
        parts = "" if config["init_transformer"] else "the autoencoder "
        _say(f"starting {parts}from the weights of {init.path} ({init.name})")
    if run.bundle_only_changes:
        _say(f"the run started with other {', '.join(run.bundle_only_changes)}; training does not read them, the bundle gets the new ones")
    _say(f"run {run_dir} on {device}: preparing the data")
    clips = prepare_data(config, run_dir, registry, progress, base_dir, workers)
    buckets = [clip.bucket for clip in clips]
    _say(f"{len(clips)} clips in {len(set(buckets))} buckets, {len(clips[0].captions)} captions each")

    # 1. The autoencoder.
    ae_part = config["video_autoencoder"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"] * 1000 + 1)
        vae = _create(registry, "video_autoencoder", ae_part["plugin"], ae_part["config"])
    if not hasattr(vae, "encode_distribution") or not hasattr(getattr(vae, "config", None), "scaling_factor"):
        raise TrainingError(
            f"video_autoencoder {ae_part['plugin']!r} cannot be trained by skyloom train: it needs encode_distribution() "
            "and a config with scaling_factor and shift_factor (as causal3d has)"
        )
    vae.config.shift_factor, vae.config.scaling_factor = 0.0, 1.0  # raw latents while it trains
    vae.to(device)
    if init is not None:
        vae.load_state_dict(init.video_autoencoder.state_dict())
    ae_settings = config["autoencoder_training"]
    stats = run.load_autoencoder(vae)
    if stats is None and ae_settings["steps"] == 0:  # the init bundle's autoencoder, unchanged
        _say("autoencoder: the init bundle's, unchanged; encoding the latents")
        raw = encode_latents(vae.eval(), clips, device, progress)
        stats = (init.video_autoencoder.config.shift_factor, init.video_autoencoder.config.scaling_factor)
        run.save_autoencoder(vae, *stats, raw, clips_key(clips))
    elif stats is None:
        _say(f"autoencoder: training to step {ae_settings['steps']}")
        stage = Stage(
            "autoencoder", vae, ae_settings, BucketBatches(buckets, ae_settings["batch_size"], config["seed"]),
            _autoencoder_loss(vae, clips, ae_settings, device),
        )
        vae = run_stage(stage, run)
        raw = encode_latents(vae, clips, device, progress)
        values = torch.cat([mean.flatten() for mean in raw])
        stats = (values.mean().item(), 1.0 / values.std().clamp(min=1e-6).item())
        run.save_autoencoder(vae, *stats, raw, clips_key(clips))
        _say(f"autoencoder done; latent shift {stats[0]:.4f}, scale {stats[1]:.4f}")
    else:
        key = clips_key(clips)
        raw = run.load_latents(key, [tuple(vae.latent_shape(*clip.frames.shape[:3])) for clip in clips])
        if raw is not None:
            _say(f"autoencoder: trained already ({run.dir / AUTOENCODER_DIR}); its latents of the clips read")
        else:
            _say(f"autoencoder: trained already ({run.dir / AUTOENCODER_DIR}); encoding the latents")
            raw = encode_latents(vae.eval(), clips, device, progress)
            run.save_latents(raw, key)
    vae.config.shift_factor, vae.config.scaling_factor = stats
    latents = [(mean - stats[0]) * stats[1] for mean in raw]  # normalised
    vae.eval().requires_grad_(False)

    # 2. The transformer.
    dit_values = dict(config["transformer"])
    dit_values.setdefault("in_channels", vae.latent_channels)
    te_part = config["text_encoder"]
    text_encoder = _create(registry, "text_encoder", te_part["plugin"], te_part["config"])
    dit_values.setdefault("text_dim", text_encoder.dim)
    checkpointing = config["gradient_checkpointing"]
    dit_values["gradient_checkpointing"] = device.type == "cuda" if checkpointing == "auto" else bool(checkpointing)
    dit_config = DiTConfig.from_dict(dit_values)
    if dit_config.in_channels != vae.latent_channels or dit_config.text_dim != text_encoder.dim:
        raise TrainingError(
            f"config: transformer in_channels/text_dim ({dit_config.in_channels}/{dit_config.text_dim}) must match the "
            f"autoencoder's latent_channels ({vae.latent_channels}) and the text encoder's width ({text_encoder.dim})"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"] * 1000 + 2)
        dit = SpacetimeDiT(dit_config).to(device)
    if init is not None and config["init_transformer"]:
        dit.load_state_dict(init.transformer.state_dict())
    if config["transformer_training"]["compile"]:
        dit.compile_blocks()  # the weights, the EMA copy and the bundle stay plain
    text_encoder = text_encoder.to(device) or text_encoder
    captions_of = CaptionTable(text_encoder, clips, progress, cache=run.dir / CAPTION_ENCODINGS, encoder_config=te_part)
    d = _trained_defaults(config)
    base_latent = vae.latent_shape(d["frames"], d["height"], d["width"])
    base_tokens = dit_config.num_tokens(*base_latent[1:])
    dit_settings = config["transformer_training"]
    foreground_of = None
    if dit_settings["foreground_weight"] != 1:
        _say("finding the objects' latent cells")
        foreground_of = latent_foreground(clips, vae.temporal_compression, vae.spatial_compression)
        if any(mask.shape != latent.shape[1:] for mask, latent in zip(foreground_of, latents)):
            raise TrainingError(
                "transformer_training.foreground_weight needs an autoencoder whose latent grid is the frames' grid "
                "divided by its temporal_compression and spatial_compression; set foreground_weight to 1"
            )
    _say(f"transformer ({sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M parameters): training to step {dit_settings['steps']}")
    stage = Stage(
        "transformer", dit, dit_settings, BucketBatches(buckets, dit_settings["batch_size"], config["seed"] + 1),
        _transformer_loss(dit, captions_of, latents, clips, dit_settings, config, base_tokens, device, foreground_of),
    )
    dit_ema = run_stage(stage, run)

    # 3. The bundle: EMA weights, the config and the log.
    bundle = write_bundle(config, run, output, vae, dit_ema, dit_config, init)
    _say(f"wrote {bundle}")
    return bundle


def write_bundle(config: dict, run: Run, output: Path, vae: nn.Module, dit: SpacetimeDiT, dit_config: DiTConfig, init: ModelBundle | None = None) -> Path:
    """The bundle, with the run's config and log in training/; a fine-tuned one also keeps its
    init bundle's training/ (config, log and its own init, if any) in training/init/."""
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[config["weights_dtype"]]
    vae_config = dict(config["video_autoencoder"]["config"])
    vae_config.update(shift_factor=vae.config.shift_factor, scaling_factor=vae.config.scaling_factor)
    stored_dit = DiTConfig.from_dict({**dit_config.to_dict(), "gradient_checkpointing": False})
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": config["name"],
        "trained": True,
        "init_seed": config["seed"],
        "text_encoder": dict(config["text_encoder"]),
        "video_autoencoder": {"plugin": config["video_autoencoder"]["plugin"], "config": vae_config},
        "transformer": {"config": stored_dit.to_dict()},
        "defaults": dict(config["defaults"]),
        "training": {"config": "training/config.json", "log": "training/log.jsonl"},
    }
    extra = {
        "training/config.json": (_canonical(config) + "\n").encode(),  # the run's, or it with new bundle-only defaults
        "training/log.jsonl": (run.dir / LOG).read_bytes() if (run.dir / LOG).is_file() else b"",
    }
    if init is not None:
        index["training"]["init"] = {"name": init.name, "model_hash": init.model_hash, "transformer": config["init_transformer"]}
        history = init.path / "training"
        files = sorted(f for f in history.rglob("*") if f.is_file()) if history.is_dir() else []
        for file in files:
            extra[f"training/init/{file.relative_to(history).as_posix()}"] = file.read_bytes()
        if files:
            index["training"]["init"]["training"] = "training/init"
    components = {
        "video_autoencoder": copy.deepcopy(vae).to("cpu", dtype),
        "transformer": copy.deepcopy(dit).to("cpu", dtype),
    }
    return save_bundle(output, index, components, extra_files=extra)
