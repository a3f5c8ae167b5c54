"""How well the `shapes` captioner's analyser re-captions shapes-world clips, against the
generator's ground truth (the manifest), after the clips' H.264 round trip.

    python benchmarks/eval_captioner.py [--count 300] [--split train|heldout|all] [--seed 11]
        [--min-travel F] [--object-size MIN MAX] [--gap PIXELS] [--two-objects SHARE]

The data options are `skyloom dataset shapes`'s (the defaults are its own), so clips can be
drawn as a training recipe draws them. Besides the whole set, it scores one-object clips and
two-object clips whose objects share a colour or not: the analyser merges touching objects
of one colour, so those clips are where a narrow `--gap` costs captions.
"""

import argparse
import collections
import tempfile
from pathlib import Path

from skyloom.datasets.shapes import GAP, MIN_TRAVEL, OBJECT_SIZE, TWO_OBJECTS, read_manifest, write_dataset
from skyloom.shapes_analysis import analyse
from skyloom.video_io import read_video

GROUPS = ("all", "one object", "two objects, one colour", "two objects, two colours")


def _group(objects: list[dict]) -> str:
    if len(objects) == 1:
        return "one object"
    return "two objects, one colour" if len({o["colour"] for o in objects}) == 1 else "two objects, two colours"


def evaluate(out: Path, count: int, split: str, seed: int, **data) -> dict[str, tuple[int, int, dict]]:
    """Per group: (scenes read right, scenes, {attribute: (right, total)})."""
    write_dataset(out, seed=seed, count=count, split=split, **data)
    right = {g: collections.Counter() for g in GROUPS}
    total = {g: collections.Counter() for g in GROUPS}
    for record in read_manifest(out):
        frames, fps = read_video(out / record["path"])
        analysis = analyse(frames, fps)
        truth = sorted((o["shape"], o["colour"], o["motion"]) for o in record["objects"])
        found = sorted((o.shape, o.colour, o.motion) for o in analysis.objects)
        for group in ("all", _group(record["objects"])):
            r, t = right[group], total[group]
            t["scene"] += 1
            r["scene"] += truth == found
            t["object count"] += 1
            r["object count"] += len(found) == len(truth)
            t["background"] += 1
            r["background"] += analysis.background == record["background"]
            if len(found) == len(truth):
                for true_attrs, found_attrs in zip(truth, found):
                    for name, want, got in zip(("shape", "colour", "motion"), true_attrs, found_attrs):
                        t[name] += 1
                        r[name] += want == got
    return {
        g: (right[g]["scene"], total[g]["scene"], {n: (right[g][n], total[g][n]) for n in total[g] if n != "scene"})
        for g in GROUPS
        if total[g]["scene"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--split", choices=("train", "heldout", "all"), default="train")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--min-travel", type=float, default=MIN_TRAVEL)
    parser.add_argument("--object-size", type=float, nargs=2, default=OBJECT_SIZE, metavar=("SMALLEST", "LARGEST"))
    parser.add_argument("--gap", type=int, default=GAP)
    parser.add_argument("--two-objects", type=float, default=TWO_OBJECTS)
    args = parser.parse_args()
    data = dict(min_travel=args.min_travel, object_size=tuple(args.object_size), gap=args.gap, two_objects=args.two_objects)
    with tempfile.TemporaryDirectory() as tmp:
        groups = evaluate(Path(tmp) / "data", args.count, args.split, args.seed, **data)
    settings = ", ".join(f"{k} {v}" for k, v in data.items())
    for group, (scenes_right, scenes, figures) in groups.items():
        print(f"\n{group}: {scenes} clips (split {args.split}, seed {args.seed}, {settings}): "
              f"whole scene right {scenes_right}/{scenes}")  # fmt: skip
        print("| attribute | right | of | accuracy |\n|---|---|---|---|")
        for name, (right, total) in figures.items():
            print(f"| {name} | {right} | {total} | {right / total:.3f} |")


if __name__ == "__main__":
    main()
