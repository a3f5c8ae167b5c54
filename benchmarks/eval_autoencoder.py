"""What a bundle's video autoencoder preserves: the analyser reads its reconstructions of unseen
shapes-world clips and is scored against their ground truth, as `skyloom eval` scores
generations. Whatever the reconstructions lose, no transformer can put back, so these figures
bound the model's prompt adherence.

    python benchmarks/eval_autoencoder.py [--bundle core/models/default] [--count 54] [--seed 7]
        [--min-travel 0.25] [--object-size 0.2 0.3] [--gap 1]   # the dataset's settings
"""

from __future__ import annotations

import argparse
import json

import torch

from skyloom.bundle import DEFAULT_MODEL_DIR, load_bundle
from skyloom.datasets.shapes import GAP, MIN_TRAVEL, OBJECT_SIZE, make_clip
from skyloom.evaluation import aggregate, score
from skyloom.registry import get_registry
from skyloom.shapes_analysis import analyse


@torch.no_grad()
def reconstruct(vae, frames: torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> the autoencoder's (T, H, W, 3) uint8 reconstruction of the mean latent."""
    video = frames.permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W) in [-1, 1]
    out = vae.decode(vae.encode(video))  # normalise/denormalise cancel; clamped to [-1, 1]
    return ((out[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def evaluate(vae, count: int, seed: int, **settings) -> dict:
    """`aggregate`'s report over the reconstructions of clips 0 .. count-1 of dataset `seed` (split "all";
    settings: make_clip's min_travel, object_size and gap)."""
    records = []
    for index in range(count):
        scene, frames = make_clip(seed, index, split="all", **settings)
        analysis = analyse(reconstruct(vae, frames), scene.fps)
        records.append({"score": score(analysis, {"objects": scene.objects, "background": scene.background})})
    return aggregate(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="model bundle directory (default: the embedded model)")
    parser.add_argument("--count", type=int, default=54, help="clips (every 9 cover each size and duration once)")
    parser.add_argument("--seed", type=int, default=7, help="dataset seed; training uses 0, so 7 is unseen")
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
        bundle.video_autoencoder, args.count, args.seed,
        min_travel=args.min_travel, object_size=tuple(args.object_size), gap=args.gap,
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{bundle.name}: {report['prompts']} clips, {report['objects']} objects, reconstructions scored")
    for name, value in report["metrics"].items():
        print(f"  {name:14s} {value}")


if __name__ == "__main__":
    main()
