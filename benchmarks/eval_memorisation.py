"""Has the transformer memorised its training clips? Its flow-matching loss at fixed noise levels
on the first clips of its own training data, against as many fresh clips drawn with the same
dataset settings from another seed. Both sides are written as the recipe writes them (MP4 at
the recipe's crf, read back), re-captioned by the recipe's captioner (the first of each clip's
captions), get the same noise (seeded by the clip's index) and no known frames, and go through
the bundle's EMA weights in fp32. A ratio above 1 is loss on clips the model never saw.

    python benchmarks/eval_memorisation.py [--bundle core/models/default] [--count 200]
                                           [--fresh-seed 1] [--times 0.1,0.3,0.5,0.7,0.9,0.97]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from skyloom.bundle import DEFAULT_MODEL_DIR, load_bundle
from skyloom.datasets.shapes import GAP, TWO_OBJECTS, read_manifest, write_dataset
from skyloom.registry import get_registry
from skyloom.video_io import read_video


def written_clips(root: Path, seed: int, count: int, shapes: dict) -> list[tuple[torch.Tensor, float]]:
    """(frames, fps) of dataset clips 0 .. count-1 for `seed`, through the MP4 round trip training reads."""
    write_dataset(
        root, seed, count, crf=shapes.get("crf", 18), min_travel=shapes["min_travel"], object_size=tuple(shapes["object_size"]),
        gap=shapes.get("gap", GAP), two_objects=shapes.get("two_objects", TWO_OBJECTS),
    )
    return [(read_video(root / record["path"])[0], float(record.get("fps", 8))) for record in read_manifest(root)]


@torch.no_grad()
def flow_losses(bundle, frames: torch.Tensor, caption: str, times: list[float], seed: int) -> list[float]:
    """The velocity loss (mean over latent values) of one clip at each noise level, one noise for all."""
    video = frames.permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W) in [-1, 1]
    clean = bundle.video_autoencoder.encode(video)  # the normalised posterior mean training learns
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    emb = bundle.text_encoder.encode([caption])
    losses = []
    for t in times:
        velocity = bundle.transformer((1 - t) * clean + t * noise, torch.tensor([t]), emb.tokens, emb.mask)
        losses.append((velocity - (noise - clean)).square().mean().item())
    return losses


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error."""
    mean = sum(values) / len(values)
    spread = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return mean, math.sqrt(spread / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="model bundle directory (default: the embedded model)")
    parser.add_argument("--count", type=int, default=200, help="clips on each side")
    parser.add_argument("--fresh-seed", type=int, default=1, help="dataset seed of the fresh clips (not the recipe's)")
    parser.add_argument("--times", default="0.1,0.3,0.5,0.7,0.9,0.97", help="comma-separated noise levels in (0, 1]")
    args = parser.parse_args()
    try:
        times = [float(t) for t in args.times.split(",")]
    except ValueError:
        parser.error(f"--times must be comma-separated numbers in (0, 1], e.g. 0.5,0.9; got {args.times!r}")
    if args.count < 2 or not all(0 < t <= 1 for t in times):
        parser.error(f"--count must be >= 2 and every time in (0, 1], got {args.count} and {args.times}")

    registry = get_registry()
    bundle = load_bundle(args.bundle or DEFAULT_MODEL_DIR, registry)
    recorded = bundle.index.get("training", {}).get("config")
    if recorded is None:
        parser.error(f"{bundle.path} has no training/config.json: name a bundle that skyloom train wrote")
    data = json.loads((bundle.path / recorded).read_text())["data"]
    shapes = data["shapes"]
    if shapes is None or data["time_reversal"]:
        parser.error("the bundle's recipe does not draw its clips with data.shapes alone; this benchmark needs one that does")
    if args.fresh_seed == shapes["seed"]:
        parser.error(f"--fresh-seed must differ from the recipe's dataset seed {shapes['seed']}")
    count = min(args.count, shapes["count"])
    captioner = registry.create("captioner", data["captioner"])

    print(f"{bundle.name}: {count} clips of its training data (seed {shapes['seed']}), {count} fresh (seed {args.fresh_seed})")
    print(f"{'t':>5}  {'training clips':>16}  {'fresh clips':>16}  {'fresh / training':>16}")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for side, seed in (("training", shapes["seed"]), ("fresh", args.fresh_seed)):
            per_time = [[] for _ in times]
            for index, (frames, fps) in enumerate(written_clips(Path(scratch) / side, seed, count, shapes)):
                caption = captioner.captions(frames, fps, data["captions_per_clip"])[0]  # training's first caption
                for column, loss in zip(per_time, flow_losses(bundle, frames, caption, times, seed=index)):
                    column.append(loss)
            results[side] = [mean_and_error(column) for column in per_time]
    for t, (train, train_error), (fresh, fresh_error) in zip(times, results["training"], results["fresh"]):
        print(f"{t:>5.2f}  {train:>9.4f} ± {train_error:.4f}  {fresh:>9.4f} ± {fresh_error:.4f}  {fresh / train:>16.3f}")


if __name__ == "__main__":
    main()
