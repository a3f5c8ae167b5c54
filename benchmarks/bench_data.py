"""The data stage of `skyloom train` in one process against worker processes (`--workers`),
side by side in one run: making a shapes-world dataset (`write_dataset`), then reading and
re-captioning it (`prepare_data`, with captions.jsonl removed between runs so every run
captions). Each is timed at workers 1 and N, alternately, and the outputs are checked to be
the same.

    python -m benchmarks.bench_data [--count 2000] [--workers N] [--repeats 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from skyloom.datasets.shapes import write_dataset
from skyloom.process_map import available_cpus
from skyloom.registry import get_registry
from skyloom.training import CAPTIONS, load_config, prepare_data

# recipe v19's data (configs/skyloom-tiny-shapes-gap.json), as docs/performance.md measured it
SETTINGS = {"seed": 0, "min_travel": 0.5, "object_size": (0.3, 0.4), "gap": 6}


def time_write(root: Path, count: int, workers: int) -> float:
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    write_dataset(root, count=count, workers=workers, **SETTINGS)
    return time.perf_counter() - start


def time_prepare(config: dict, run_dir: Path, registry, workers: int) -> tuple[float, list]:
    (run_dir / CAPTIONS).unlink(missing_ok=True)
    start = time.perf_counter()
    clips = prepare_data(config, run_dir, registry, False, run_dir, workers)
    return time.perf_counter() - start, clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="clips in the dataset")
    parser.add_argument("--workers", type=int, default=available_cpus(), help="the worker processes to compare with one")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each, alternated")
    args = parser.parse_args()
    if args.count < 1 or args.workers < 2 or args.repeats < 1:
        parser.error("--count and --repeats must be at least 1, --workers at least 2")
    print(f"# data stage, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {available_cpus()} cores; {args.count} clips")
    registry = get_registry()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        times = {("write", w): [] for w in (1, args.workers)} | {("prepare", w): [] for w in (1, args.workers)}
        for _ in range(args.repeats):
            for workers in (1, args.workers):
                times["write", workers].append(time_write(scratch / f"data{workers}", args.count, workers))
        one, many = (scratch / f"data{w}" / "manifest.jsonl" for w in (1, args.workers))
        assert one.read_text() == many.read_text(), "the datasets differ"

        data = {"path": str(scratch / "data1"), "captioner": "shapes", "captions_per_clip": 4}
        config = load_config_from(scratch, data)
        results = {}
        for _ in range(args.repeats):
            for workers in (1, args.workers):
                seconds, results[workers] = time_prepare(config, scratch, registry, workers)
                times["prepare", workers].append(seconds)
        assert [c.captions for c in results[1]] == [c.captions for c in results[args.workers]], "the captions differ"

    print(f"| step | 1 process, s | {args.workers} workers, s | speed-up (medians) | clips/s with workers |")
    print("|---|---|---|---|---|")
    for step, label in (("write", "making the clips (write_dataset)"), ("prepare", "reading and re-captioning (prepare_data)")):
        base, ours = (sorted(times[step, w])[len(times[step, w]) // 2] for w in (1, args.workers))
        print(f"| {label} | {base:.1f} | {ours:.1f} | {base / ours:.2f}× | {args.count / ours:.0f} |")


def load_config_from(folder: Path, data: dict) -> dict:
    """A minimal training config around `data` (prepare_data reads only its data section)."""
    path = folder / "config.json"
    path.write_text(json.dumps({"name": "bench", "data": data, "output": "bundle"}))
    return load_config(path)


if __name__ == "__main__":
    main()
