"""What a bundle's video autoencoder preserves: the analyser reads its reconstructions of unseen
shapes-world clips and is scored against their ground truth, as `skyloom eval` scores
generations. Whatever the reconstructions lose, no transformer can put back, so these figures
bound the model's prompt adherence.

    python benchmarks/eval_autoencoder.py [--bundle core/models/default] [--count 54] [--seed 7]
        [--split all] [--min-travel 0.25] [--object-size 0.2 0.3] [--gap 1]   # the dataset's settings

It also prints, per true shape, the mean and spread of the analyser's fill ratio and corner
occupancy on the reconstructions: where shapes_analysis.SQUARE_CIRCLE_CENTROIDS and
SQUARE_CIRCLE_SPREAD come from (`--count 180 --split train --min-travel 0.5 --object-size 0.3 0.4`).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from skyloom.bundle import DEFAULT_MODEL_DIR, load_bundle
from skyloom.datasets.shapes import GAP, MIN_TRAVEL, OBJECT_SIZE, SPLITS, make_clip
from skyloom.evaluation import aggregate, match, score
from skyloom.registry import get_registry
from skyloom.shapes_analysis import analyse


@torch.no_grad()
def reconstruct(vae, frames: torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> the autoencoder's (T, H, W, 3) uint8 reconstruction of the mean latent."""
    video = frames.permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W) in [-1, 1]
    out = vae.decode(vae.encode(video))  # normalise/denormalise cancel; clamped to [-1, 1]
    return ((out[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def evaluate(vae, count: int, seed: int, split: str = "all", **settings) -> dict:
    """`aggregate`'s report over the reconstructions of clips 0 .. count-1 of dataset `seed`
    (settings: make_clip's min_travel, object_size and gap), with "shape_readings": per true
    shape, the matched objects' count and the [mean, standard deviation] of their fill ratio and
    corner occupancy."""
    records, readings = [], {}
    for index in range(count):
        scene, frames = make_clip(seed, index, split=split, **settings)
        analysis = analyse(reconstruct(vae, frames), scene.fps)
        records.append({"score": score(analysis, {"objects": scene.objects, "background": scene.background})})
        for want, j in zip(scene.objects, match(scene.objects, analysis.objects)):
            if j is not None and analysis.objects[j].corner_occupancy is not None:
                found = analysis.objects[j]
                readings.setdefault(want["shape"], []).append((found.fill_ratio, found.corner_occupancy))
    report = aggregate(records)
    report["shape_readings"] = {}
    for shape, values in sorted(readings.items()):
        fills, corners = np.array(values).T
        report["shape_readings"][shape] = {
            "objects": len(values),
            "fill": [round(float(fills.mean()), 4), round(float(fills.std()), 4)],
            "corners": [round(float(corners.mean()), 4), round(float(corners.std()), 4)],
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="model bundle directory (default: the embedded model)")
    parser.add_argument("--count", type=int, default=54, help="clips (every 9 cover each size and duration once)")
    parser.add_argument("--seed", type=int, default=7, help="dataset seed; training uses 0, so 7 is unseen")
    parser.add_argument("--split", choices=SPLITS, default="all", help="the dataset's split (training reads 'train')")
    parser.add_argument("--min-travel", type=float, default=MIN_TRAVEL, help="the dataset's min_travel")
    parser.add_argument("--object-size", type=float, nargs=2, default=OBJECT_SIZE, metavar=("SMALLEST", "LARGEST"),
                        help="the dataset's object_size")
    parser.add_argument("--gap", type=int, default=GAP, help="the dataset's gap between two objects' boxes, in pixels")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = parser.parse_args()
    if args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}")

    bundle = load_bundle(args.bundle or DEFAULT_MODEL_DIR, get_registry())
    report = evaluate(
        bundle.video_autoencoder, args.count, args.seed, args.split,
        min_travel=args.min_travel, object_size=tuple(args.object_size), gap=args.gap,
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{bundle.name}: {report['prompts']} clips, {report['objects']} objects, reconstructions scored")
    for name, value in report["metrics"].items():
        print(f"  {name:14s} {value}")
    print("fill ratio and corner occupancy per true shape, [mean, standard deviation]:")
    for shape, reading in report["shape_readings"].items():
        print(f"  {shape:9s} {reading['objects']:4d} objects  fill {reading['fill']}  corners {reading['corners']}")
    pair = [report["shape_readings"][s] for s in ("square", "circle") if s in report["shape_readings"]]
    if len(pair) == 2:  # SQUARE_CIRCLE_SPREAD: the two shapes' pooled standard deviations
        pooled = [round(float(np.sqrt((pair[0][k][1] ** 2 + pair[1][k][1] ** 2) / 2)), 4) for k in ("fill", "corners")]
        print(f"  square and circle, pooled standard deviations: fill {pooled[0]}, corners {pooled[1]}")


if __name__ == "__main__":
    main()
