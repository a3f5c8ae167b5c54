"""How seamless are loops? For each of the showcase's prompts, the same seed is generated plain
and with `loop=True`; the wrap-around difference (mean absolute difference of the last frame and
the first, in 0..255 levels) is compared with the mean difference of consecutive frames. A
seamless loop wraps as a plain video steps (ratio 1).

    python benchmarks/eval_loops.py [--bundle DIR]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.showcase import PROMPTS
from skyloom.pipeline import Pipeline
from skyloom.request import GenerationRequest


def difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="model bundle directory (default: the embedded model)")
    args = parser.parse_args()
    pipe = Pipeline.from_pretrained(args.bundle, device="cpu", safety_filters=[], watermarkers=[], audit_log=None)
    print(f"{'':>6}  {'wrap':>6}  {'step':>6}  {'wrap/step':>9}")
    for loop in (False, True):
        rows = []
        for seed, prompt in enumerate(PROMPTS):
            frames = pipe(GenerationRequest(prompt, seed=seed, loop=loop)).frames
            step = sum(difference(a, b) for a, b in zip(frames[:-1], frames[1:])) / (len(frames) - 1)
            rows.append((difference(frames[-1], frames[0]), step))
        wrap, step = (sum(column) / len(rows) for column in zip(*rows))
        ratio = sum(w / s for w, s in rows) / len(rows)
        print(f"{'loop' if loop else 'plain':>6}  {wrap:>6.2f}  {step:>6.2f}  {ratio:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
