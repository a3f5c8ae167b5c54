"""How well the `shapes` captioner's analyser re-captions shapes-world clips, against the
generator's ground truth (the manifest), after the clips' H.264 round trip.

    python benchmarks/eval_captioner.py [--count 300] [--split train|heldout|all] [--seed 11]
"""

import argparse
import collections
import tempfile
from pathlib import Path

from skyloom.datasets.shapes import read_manifest, write_dataset
from skyloom.shapes_analysis import analyse
from skyloom.video_io import read_video


def evaluate(out: Path, count: int, split: str, seed: int) -> tuple[int, int, dict]:
    write_dataset(out, seed=seed, count=count, split=split)
    right, total = collections.Counter(), collections.Counter()
    scenes_right = 0
    records = read_manifest(out)
    for record in records:
        frames, fps = read_video(out / record["path"])
        analysis = analyse(frames, fps)
        truth = sorted((o["shape"], o["colour"], o["motion"]) for o in record["objects"])
        found = sorted((o.shape, o.colour, o.motion) for o in analysis.objects)
        scenes_right += truth == found
        total["object count"] += 1
        right["object count"] += len(found) == len(truth)
        total["background"] += 1
        right["background"] += analysis.background == record["background"]
        if len(found) == len(truth):
            for true_attrs, found_attrs in zip(truth, found):
                for name, t, f in zip(("shape", "colour", "motion"), true_attrs, found_attrs):
                    total[name] += 1
                    right[name] += t == f
    return scenes_right, len(records), {name: (right[name], total[name]) for name in total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--split", choices=("train", "heldout", "all"), default="train")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scenes_right, scenes, figures = evaluate(Path(tmp) / "data", args.count, args.split, args.seed)
    print(f"{scenes} clips, split {args.split}, seed {args.seed}: whole scene right {scenes_right}/{scenes}")
    print("| attribute | right | of | accuracy |\n|---|---|---|---|")
    for name, (right, total) in figures.items():
        print(f"| {name} | {right} | {total} | {right / total:.3f} |")


if __name__ == "__main__":
    main()
