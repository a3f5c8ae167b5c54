"""The shapes-world dataset: clips of one or two moving shapes, with exact ground truth.

Each clip shows one or two objects (a circle, square or triangle in a palette colour with a
little jitter) on a plain background; each object "moves left/right/up/down" or "stays still".
The vocabulary (shapes, colours, backgrounds, motions, sizes, durations, held-out combinations)
is `skyloom.shapes_world`; this module only draws it.

Guarantees a consumer (the `shapes` captioner, the evaluation) may rely on:

- An object is drawn in one flat colour, `rgb`, with hard edges, inside a `size`×`size` box
  whose top-left corner sits on whole pixels in every frame; so its pixel mask is the same in
  every frame, only moved.
- `start` and `end` are the centre (x, y) of that box in the first and last frame, in pixels
  with x to the right and y downwards; in between the box moves linearly (rounded to pixels).
- A moving object travels at least `min_travel` of the frame along its axis (width for left
  and right, height for up and down): a quarter by default. A larger share starts objects
  nearer the edge they move away from, which ties a motion word to where the object starts.
  Every box stays inside the frame with a background border of `MARGIN` pixels, so nothing is
  ever cut off; two boxes are `gap` pixels apart in every frame (`GAP`, 1, by default).
- An object's box side is drawn from `object_size`, shares of the frame's shorter side: 0.20
  to 0.30 by default.
- A share `two_objects` of the clips (half by default) has two objects, the rest one.
- Clip i of a dataset depends only on (seed, i, split, min_travel, object_size, gap, two_objects):
  `make_clip(seed, i)`.
  Its size and duration cycle through every bucket of SIZES × DURATIONS, so any run of 9 clips holds each once.

    from skyloom.datasets.shapes import iter_dataset, write_dataset
    for scene, frames in iter_dataset(seed=0, count=10):   # frames: (T, H, W, 3) uint8
        ...
    write_dataset("data/shapes", seed=0, count=1000)       # clips/*.mp4 + manifest.jsonl
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import click
import numpy as np
import torch

from skyloom.process_map import available_cpus, check_workers, process_map
from skyloom.shapes_world import BACKGROUNDS, COLOURS, DURATIONS, FPS, MOTIONS, SHAPES, SIZES, is_held_out
from skyloom.video_io import write_video

SPLITS = ("train", "heldout", "all")
BUCKETS = tuple((size, frames) for size in SIZES for frames in DURATIONS)  # ((width, height), frames)
JITTER = 8  # each colour channel is drawn within ±JITTER of its palette value
OBJECT_SIZE = (0.20, 0.30)  # an object's box side, as shares of the frame's shorter side, by default
# an option's bounds: below, a circle of under 8 pixels fills nearly its whole box, as a square
# does; above, two objects have too little room to pass each other
OBJECT_SIZE_LIMITS = (0.15, 0.40)
MIN_TRAVEL = 0.25  # the least share of the frame a moving object crosses, by default
# the most: objects of the default size still fit that travel inside the margins (check_object_size)
MAX_MIN_TRAVEL = 0.6
MARGIN = 1  # background pixels always left along every edge of the frame
GAP = 1  # background pixels always left between two objects' boxes, by default
# the most: a wider gap than the autoencoder's 4-pixel latent cell keeps two objects apart in its
# reconstructions (docs/performance.md), and two of the largest objects still fit a 48-pixel side
MAX_GAP = 8
MAX_OBJECTS = 2
TWO_OBJECTS = 0.5  # the share of clips with two objects, by default
# Whether a clip has two objects is one draw of rng.integers(_PAIR_DRAWS): a power of two, so the
# default share draws the top bit, the same draw as rng.integers(1, 3) that chose before the
# option existed; every earlier dataset keeps its clips.
_PAIR_DRAWS = 2**16
MANIFEST = "manifest.jsonl"
CLIPS = "clips"

_LAYOUT_TRIES = 50  # positions tried for one choice of objects before choosing new objects


class DatasetError(ValueError):
    """A dataset cannot be generated or written as asked; the message says why and what to do."""


@dataclass
class SceneSpec:
    """One clip's ground truth. Objects are dicts:
    {shape, colour, motion, size (box side, px), start (x, y), end (x, y) (box centres), rgb (r, g, b)}.
    """

    width: int
    height: int
    frames: int
    fps: float
    background: str
    objects: list[dict] = field(default_factory=list)

    def boxes(self) -> np.ndarray:
        """(objects, frames, 4) int64: each object's box (x0, y0, x1, y1) per frame, x1/y1 exclusive."""
        steps = np.arange(self.frames) / max(self.frames - 1, 1)  # (T,) 0 -> 1
        boxes = np.empty((len(self.objects), self.frames, 4), dtype=np.int64)
        for index, obj in enumerate(self.objects):
            half = obj["size"] / 2
            corner0 = np.array(obj["start"], dtype=np.float64) - half  # top-left, whole pixels
            corner1 = np.array(obj["end"], dtype=np.float64) - half
            corners = np.floor(corner0 + (corner1 - corner0) * steps[:, None] + 0.5).astype(np.int64)  # (T, 2)
            boxes[index, :, :2] = corners
            boxes[index, :, 2:] = corners + obj["size"]
        return boxes


# --- sampling ------------------------------------------------------------------------------


def _check_split(split) -> str:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def _sample_attributes(rng: np.random.Generator, held_out: bool | None) -> dict:
    """{shape, colour, motion} drawn uniformly; held_out True/False keeps only held-out/other ones."""
    while True:
        obj = {
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "colour": list(COLOURS)[rng.integers(len(COLOURS))],
            "motion": list(MOTIONS)[rng.integers(len(MOTIONS))],
        }
        if held_out is None or is_held_out(obj) == held_out:
            return obj


def _place(
    rng: np.random.Generator, width: int, height: int, size: int, motion: str, min_travel: float
) -> tuple[tuple, tuple]:
    """(start corner, end corner) of a size×size box: inside the margins, travelling >= min_travel of the frame."""
    direction = MOTIONS[motion]
    corners = [[0, 0], [0, 0]]  # start, end; [x, y]
    for axis, length in enumerate((width, height)):
        low, high = MARGIN, length - MARGIN - size  # inclusive range of the box's corner
        step = direction[axis]
        if step == 0:
            corners[0][axis] = corners[1][axis] = int(rng.integers(low, high + 1))
            continue
        shortest = math.ceil(length * min_travel)
        if high - low < shortest:  # check_object_size rules this out; guards edits to it
            raise DatasetError(f"a {size}px object cannot travel {shortest}px across {length}px")
        travel = int(rng.integers(shortest, high - low + 1))
        first = int(rng.integers(low, high - travel + 1))
        corners[0][axis], corners[1][axis] = (first, first + travel) if step > 0 else (first + travel, first)
    return tuple(corners[0]), tuple(corners[1])


def _apart(boxes: np.ndarray, gap: int = GAP) -> bool:
    """True when every pair of boxes (objects, T, 4) is at least `gap` pixels apart in every frame."""
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            p, q = boxes[a], boxes[b]
            separated = (
                (p[:, 2] + gap <= q[:, 0]) | (q[:, 2] + gap <= p[:, 0])
                | (p[:, 3] + gap <= q[:, 1]) | (q[:, 3] + gap <= p[:, 1])
            )
            if not separated.all():
                return False
    return True


def sample_scene(
    rng: np.random.Generator,
    *,
    size: tuple[int, int] | None = None,
    frames: int | None = None,
    split: str = "train",
    objects: int | None = None,
    min_travel: float = MIN_TRAVEL,
    object_size: tuple[float, float] = OBJECT_SIZE,
    gap: int = GAP,
    two_objects: float = TWO_OBJECTS,
) -> SceneSpec:
    """Draw one scene from `rng`.

    size: (width, height) from shapes_world.SIZES; frames: from DURATIONS; each drawn from rng if None.
    split: "train" never draws a held-out object (shapes_world.is_held_out), "heldout" always
    draws at least one, "all" draws anything.
    objects: how many objects, 1 or 2 (if None: 2 for a share two_objects of draws, else 1).
    min_travel: the least share of the frame a moving object crosses (check_min_travel).
    object_size: (smallest, largest) box side, as shares of the shorter side (check_object_size).
    gap: background pixels always left between two objects' boxes (check_gap).
    two_objects: the share of scenes with two objects when `objects` is None (check_two_objects).
    """
    _check_split(split)
    if size is None:
        size = SIZES[rng.integers(len(SIZES))]
    elif tuple(size) not in SIZES:
        valid = ", ".join(f"{w}x{h}" for w, h in SIZES)
        raise DatasetError(f"size {tuple(size)!r} is not a bucket; valid (width, height): {valid}")
    if frames is None:
        frames = DURATIONS[rng.integers(len(DURATIONS))]
    elif frames not in DURATIONS:
        raise DatasetError(f"frames {frames!r} is not a bucket; valid: {', '.join(map(str, DURATIONS))}")
    if objects is None:
        pair_from = round((1 - check_two_objects(two_objects)) * _PAIR_DRAWS)
        objects = 2 if int(rng.integers(_PAIR_DRAWS)) >= pair_from else 1
    elif isinstance(objects, bool) or not isinstance(objects, (int, np.integer)) or not 1 <= objects <= MAX_OBJECTS:
        raise DatasetError(f"objects must be 1 or {MAX_OBJECTS}, got {objects!r}")
    width, height = (int(v) for v in size)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]

    while True:  # choose objects, then look for a layout where they stay apart
        held_out_index = int(rng.integers(objects)) if split == "heldout" else -1
        chosen = []
        for index in range(objects):
            # train: none held out; heldout: one object held out, the other anything; all: anything
            held_out = {"train": False, "all": None}.get(split, True if index == held_out_index else None)
            obj = _sample_attributes(rng, held_out)
            base = np.array(COLOURS[obj["colour"]])
            obj["rgb"] = tuple(int(c) for c in np.clip(base + rng.integers(-JITTER, JITTER + 1, 3), 0, 255))
            chosen.append(obj)
        scene = lay_out(
            rng, chosen, width=width, height=height, frames=int(frames), background=background,
            min_travel=min_travel, object_size=object_size, gap=gap,
        )
        if scene is not None:
            return scene


def lay_out(
    rng: np.random.Generator,
    objects: list[dict],
    *,
    width: int,
    height: int,
    frames: int,
    background: str,
    tries: int = _LAYOUT_TRIES,
    min_travel: float = MIN_TRAVEL,
    object_size: tuple[float, float] = OBJECT_SIZE,
    gap: int = GAP,
) -> SceneSpec | None:
    """Place `objects` ({shape, colour, motion, rgb}) in a width×height clip by the dataset's rules:
    a box side in object_size of the shorter side, a moving object travels at least min_travel
    of the frame, MARGIN from the edges, boxes `gap` apart in every frame. Returns the scene, or
    None when `tries` random layouts all collide (draw other objects, or try again)."""
    min_travel, gap = check_min_travel(min_travel), check_gap(gap)  # checked once, not per object and try
    smallest, largest = _sides(check_object_size(object_size, min_travel), min(width, height))
    for _ in range(tries):
        placed = []
        for obj in objects:
            side = int(rng.integers(smallest, largest + 1))
            start, end = _place(rng, width, height, side, obj["motion"], min_travel)
            placed.append({
                "shape": obj["shape"], "colour": obj["colour"], "motion": obj["motion"], "size": side,
                "start": (start[0] + side / 2, start[1] + side / 2),
                "end": (end[0] + side / 2, end[1] + side / 2),
                "rgb": tuple(obj["rgb"]),
            })
        scene = SceneSpec(width, height, frames, float(FPS), background, placed)
        if _apart(scene.boxes(), gap):
            return scene
    return None


# --- drawing -------------------------------------------------------------------------------


def shape_mask(shape: str, size: int) -> np.ndarray:
    """(size, size) bool mask of a shape filling its box, sampled at pixel centres (hard edges).

    circle: the inscribed disc; square: the whole box; triangle: apex at the top centre, base
    along the bottom edge.
    """
    centres = np.arange(size) + 0.5
    u, v = centres[None, :], centres[:, None]  # x across, y down
    if shape == "circle":
        return (u - size / 2) ** 2 + (v - size / 2) ** 2 <= (size / 2) ** 2
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "triangle":
        return np.abs(u - size / 2) * 2 <= v
    raise DatasetError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")


def render(scene: SceneSpec) -> torch.Tensor:
    """Draw a scene: (frames, height, width, 3) uint8 RGB."""
    video = np.empty((scene.frames, scene.height, scene.width, 3), dtype=np.uint8)
    video[:] = BACKGROUNDS[scene.background]
    for obj, boxes in zip(scene.objects, scene.boxes()):  # boxes: (T, 4)
        mask = shape_mask(obj["shape"], obj["size"])
        rgb = np.array(obj["rgb"], dtype=np.uint8)
        for frame, (x0, y0, x1, y1) in zip(video, boxes):
            frame[y0:y1, x0:x1][mask] = rgb
    return torch.from_numpy(video)


# --- datasets ------------------------------------------------------------------------------


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def _check_count(count) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise DatasetError(f"count must be an integer >= 1, got {count!r}")
    return int(count)


def check_min_travel(min_travel) -> float:
    if isinstance(min_travel, bool) or not isinstance(min_travel, (int, float)) or not MIN_TRAVEL <= min_travel <= MAX_MIN_TRAVEL:
        raise DatasetError(
            f"min_travel must be a number from {MIN_TRAVEL} to {MAX_MIN_TRAVEL} (the share of the frame a moving object "
            f"crosses at least), got {min_travel!r}"
        )
    return float(min_travel)


def check_gap(gap) -> int:
    if isinstance(gap, bool) or not isinstance(gap, (int, np.integer)) or not GAP <= gap <= MAX_GAP:
        raise DatasetError(
            f"gap must be a whole number of pixels from {GAP} to {MAX_GAP} (the background left between two objects' "
            f"boxes), got {gap!r}"
        )
    return int(gap)


def check_two_objects(two_objects) -> float:
    if isinstance(two_objects, bool) or not isinstance(two_objects, (int, float)) or not 0 <= two_objects <= 1:
        raise DatasetError(
            f"two_objects must be a number from 0 to 1 (the share of clips with two objects), got {two_objects!r}"
        )
    return float(two_objects)


def check_object_size(object_size, min_travel: float = MIN_TRAVEL) -> tuple[float, float]:
    """object_size as (smallest, largest), after checking that every bucket (shapes_world.SIZES)
    has a whole-pixel side in that range and room for its largest object to travel min_travel."""
    low, high = OBJECT_SIZE_LIMITS
    numbers = isinstance(object_size, (list, tuple)) and len(object_size) == 2 and all(
        not isinstance(v, bool) and isinstance(v, (int, float)) for v in object_size
    )
    if not numbers or not low <= object_size[0] <= object_size[1] <= high:
        raise DatasetError(
            f"object_size must be two numbers [smallest, largest] with {low} <= smallest <= largest <= {high} "
            f"(an object's box side as a share of the frame's shorter side), got {object_size!r}"
        )
    object_size = (float(object_size[0]), float(object_size[1]))
    for width, height in SIZES:
        smallest, largest = _sides(object_size, min(width, height))
        if smallest > largest:
            raise DatasetError(
                f"object_size {list(object_size)} holds no whole-pixel side in a {width}x{height} frame "
                f"({object_size[0] * min(width, height):g} to {object_size[1] * min(width, height):g} pixels); widen it"
            )
        for length in (width, height):
            if length - 2 * MARGIN - largest < math.ceil(length * min_travel):
                raise DatasetError(
                    f"object_size {list(object_size)}: a {largest}px object cannot travel min_travel {min_travel} "
                    f"of a {width}x{height} frame; lower the largest object_size or min_travel"
                )
    return object_size


def _sides(object_size: tuple[float, float], shorter: int) -> tuple[int, int]:
    """The smallest and largest whole-pixel box side for a frame whose shorter side is `shorter`."""
    return math.ceil(object_size[0] * shorter), math.floor(object_size[1] * shorter)


def make_clip(
    seed: int, index: int, *, split: str = "train", min_travel: float = MIN_TRAVEL,
    object_size: tuple[float, float] = OBJECT_SIZE, gap: int = GAP, two_objects: float = TWO_OBJECTS,
) -> tuple[SceneSpec, torch.Tensor]:
    """Clip `index` of the dataset for `seed`: (scene, frames). Depends on (seed, index, split,
    min_travel, object_size, gap, two_objects) only."""
    rng = np.random.default_rng([_check_seed(seed), int(index)])
    size, frames = BUCKETS[index % len(BUCKETS)]
    scene = sample_scene(
        rng, size=size, frames=frames, split=split, min_travel=min_travel, object_size=object_size, gap=gap,
        two_objects=two_objects,
    )
    return scene, render(scene)


def iter_dataset(
    seed: int, count: int, *, split: str = "train", min_travel: float = MIN_TRAVEL,
    object_size: tuple[float, float] = OBJECT_SIZE, gap: int = GAP, two_objects: float = TWO_OBJECTS,
) -> Iterator[tuple[SceneSpec, torch.Tensor]]:
    """(scene, frames) for clips 0 .. count-1, one at a time: only the current clip is in memory."""
    seed, count, split = _check_seed(seed), _check_count(count), _check_split(split)
    min_travel, gap, two_objects = check_min_travel(min_travel), check_gap(gap), check_two_objects(two_objects)
    object_size = check_object_size(object_size, min_travel)
    return (
        make_clip(
            seed, index, split=split, min_travel=min_travel, object_size=object_size, gap=gap, two_objects=two_objects
        )
        for index in range(count)
    )


def clip_record(
    scene: SceneSpec, index: int, *, split: str, seed: int, min_travel: float = MIN_TRAVEL,
    object_size: tuple[float, float] = OBJECT_SIZE, gap: int = GAP, two_objects: float = TWO_OBJECTS,
) -> dict:
    """The manifest line (ground truth) for clip `index`."""
    return {
        "id": index,
        "path": f"{CLIPS}/{index:06d}.mp4",
        "width": scene.width,
        "height": scene.height,
        "frames": scene.frames,
        "fps": scene.fps,
        "background": scene.background,
        "objects": [
            {
                "shape": obj["shape"], "colour": obj["colour"], "motion": obj["motion"],
                "rgb": list(obj["rgb"]), "start": list(obj["start"]), "end": list(obj["end"]), "size": obj["size"],
            }
            for obj in scene.objects
        ],
        "split": split,
        "seed": seed,
        "min_travel": min_travel,
        "object_size": list(object_size),
        "gap": gap,
        "two_objects": two_objects,
    }


def read_manifest(path) -> list[dict]:
    """The clip records of a dataset's manifest.jsonl (or of the directory holding it).

    A last line cut short by an interrupted write is ignored; any other bad line is an error.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    records, _ = _read_manifest_lines(path)
    return records


def _read_manifest_lines(path: Path) -> tuple[list[dict], int]:
    """(records, bytes up to the end of the last complete line)."""
    data = path.read_bytes()
    records, good = [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        last = number == len(lines)
        if last:
            break  # after the final "\n" (empty), or a line the interrupted run never finished
        try:
            records.append(json.loads(line))
        except ValueError:
            raise DatasetError(f"{path}: line {number} is not JSON; the manifest is damaged") from None
        good += len(line) + 1
    return records, good


def write_dataset(
    out_dir,
    seed: int,
    count: int,
    *,
    split: str = "train",
    crf: int = 18,
    resume: bool = False,
    progress: bool = False,
    min_travel: float = MIN_TRAVEL,
    object_size: tuple[float, float] = OBJECT_SIZE,
    gap: int = GAP,
    two_objects: float = TWO_OBJECTS,
    workers: int = 1,
) -> Path:
    """Write clips 0 .. count-1 to out_dir/clips/NNNNNN.mp4 and their ground truth to out_dir/manifest.jsonl.

    Each clip is written atomically, then its manifest line is appended and flushed, so an
    interrupted run leaves only whole clips, each listed. resume=True continues such a run (same
    seed, split, min_travel, object_size, gap and two_objects): clips already in the manifest are kept, the rest are written, and
    the result equals an uninterrupted run. Without resume, out_dir must be empty or not exist.
    progress: show a tqdm bar on stderr. workers: processes that make and write the clips
    (skyloom.process_map); the files are the same for any number. Returns the manifest's path.
    """
    seed, count, split = _check_seed(seed), _check_count(count), _check_split(split)
    min_travel, gap, two_objects = check_min_travel(min_travel), check_gap(gap), check_two_objects(two_objects)
    object_size = check_object_size(object_size, min_travel)
    try:
        check_workers(workers)
    except ValueError as error:
        raise DatasetError(str(error)) from None
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise DatasetError(f"crf must be an integer in [0, 51], got {crf!r}")
    out_dir = Path(out_dir)
    manifest = out_dir / MANIFEST
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"{out_dir} exists and is not a directory; give a directory for the dataset")
    done: set[int] = set()
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not resume:
            raise DatasetError(
                f"{out_dir} is not empty; pass resume=True (--resume) to continue the dataset there, "
                "or give an empty or new directory"
            )
        if not manifest.is_file():
            raise DatasetError(f"cannot resume in {out_dir}: it is not empty but has no {MANIFEST}")
        records, good = _read_manifest_lines(manifest)
        for record in records:
            written = (
                record.get("seed"), record.get("split"), record.get("min_travel", MIN_TRAVEL),
                list(record.get("object_size", OBJECT_SIZE)), record.get("gap", GAP),
                record.get("two_objects", TWO_OBJECTS),
            )
            if written != (seed, split, min_travel, list(object_size), gap, two_objects):
                raise DatasetError(
                    f"cannot resume in {out_dir}: it was written with seed {written[0]!r}, split {written[1]!r}, "
                    f"min_travel {written[2]!r}, object_size {written[3]!r}, gap {written[4]!r} and two_objects "
                    f"{written[5]!r}, not seed {seed}, split {split!r}, min_travel {min_travel!r}, object_size "
                    f"{list(object_size)!r}, gap {gap!r} and two_objects {two_objects!r}; use those, or another directory"
                )
            done.add(record["id"])
        if good != manifest.stat().st_size:  # drop a line the interrupted run left unfinished
            os.truncate(manifest, good)
    (out_dir / CLIPS).mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    todo = [index for index in range(count) if index not in done]
    write_clip = functools.partial(
        _write_clip, out_dir, seed=seed, split=split, crf=crf, min_travel=min_travel, object_size=object_size, gap=gap,
        two_objects=two_objects,
    )
    with open(manifest, "a", encoding="utf-8") as lines, tqdm(
        total=count, initial=count - len(todo), unit="clip", desc="shapes", disable=not progress, file=sys.stderr
    ) as bar, contextlib.closing(process_map(write_clip, todo, workers)) as records:
        for record in records:
            lines.write(json.dumps(record) + "\n")
            lines.flush()
            bar.update(1)
    return manifest


def _write_clip(
    out_dir: Path, index: int, *, seed: int, split: str, crf: int, min_travel: float, object_size: tuple[float, float],
    gap: int, two_objects: float,
) -> dict:
    """Make clip `index`, write its video and return its manifest record (run in a worker)."""
    options = dict(split=split, min_travel=min_travel, object_size=object_size, gap=gap, two_objects=two_objects)
    scene, frames = make_clip(seed, index, **options)
    record = clip_record(scene, index, seed=seed, **options)
    write_video(out_dir / record["path"], frames, scene.fps, crf=crf, reproducible=True)
    return record


# --- command -------------------------------------------------------------------------------


@click.command("shapes")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--count", type=int, default=1000, show_default=True, help="Number of clips.")
@click.option("--seed", type=int, default=0, show_default=True, help="Dataset seed: clip i depends only on (seed, i).")
@click.option("--split", type=click.Choice(SPLITS), default="train", show_default=True,
              help="train: no held-out combinations; heldout: each clip has one; all: anything.")
@click.option("--min-travel", type=click.FloatRange(MIN_TRAVEL, MAX_MIN_TRAVEL), default=MIN_TRAVEL, show_default=True,
              help="Least share of the frame a moving object crosses; larger starts objects nearer the edge they leave.")
@click.option("--object-size", type=(float, float), default=OBJECT_SIZE, show_default=True, metavar="SMALLEST LARGEST",
              help=f"An object's box side, as shares of the frame's shorter side ({OBJECT_SIZE_LIMITS[0]} to "
                   f"{OBJECT_SIZE_LIMITS[1]}).")
@click.option("--gap", type=click.IntRange(GAP, MAX_GAP), default=GAP, show_default=True,
              help="Background pixels always left between two objects' boxes.")
@click.option("--two-objects", type=click.FloatRange(0, 1), default=TWO_OBJECTS, show_default=True,
              help="Share of the clips with two objects; the rest have one.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run in OUT_DIR (same seed, split, --min-travel, --object-size, --gap and "
                   "--two-objects).")
@click.option("--crf", type=click.IntRange(0, 51), default=18, show_default=True, help="H.264 quality (lower is better).")
@click.option("--workers", type=click.IntRange(min=1), default=available_cpus, show_default="the cores this process may use",
              help="Processes that make the clips; the files are the same for any number.")
def shapes_command(out_dir, count, seed, split, min_travel, object_size, gap, two_objects, resume, crf, workers):
    """Write COUNT shapes-world clips to OUT_DIR/clips and their ground truth to OUT_DIR/manifest.jsonl."""
    from skyloom.cli import SkyloomCLIError
    from skyloom.video_io import VideoIOError

    started = time.perf_counter()
    manifest = Path(out_dir) / MANIFEST
    try:
        before = len(read_manifest(manifest)) if resume and manifest.is_file() else 0
        write_dataset(
            out_dir, seed, count, split=split, crf=crf, resume=resume, progress=sys.stderr.isatty(),
            min_travel=min_travel, object_size=object_size, gap=gap, two_objects=two_objects, workers=workers,
        )
    except (DatasetError, VideoIOError, OSError) as error:
        raise SkyloomCLIError(str(error)) from None
    except KeyboardInterrupt:
        kept = len(read_manifest(manifest)) if manifest.is_file() else 0
        click.echo(f"interrupted: {kept} clips are complete in {out_dir}; run again with --resume to continue", err=True)
        sys.exit(130)
    total = len(read_manifest(manifest))
    click.echo(
        f"wrote {total - before} clips ({total} in all, split {split}, seed {seed}) to {out_dir} "
        f"in {time.perf_counter() - started:.1f}s; ground truth: {manifest}"
    )
