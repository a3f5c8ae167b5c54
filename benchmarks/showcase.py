"""The README's picture: frame strips of several prompts from the embedded model (`make showcase`).

Each row is one prompt (listed in order in docs/showcase.md, written beside the picture), each
column a frame spread evenly over the clip, upscaled with Lanczos like `--upscale`. The
generation runs exactly as `skyloom generate` does (the bundle's defaults, the default prompt
enhancer, the safety filters), with a fixed seed per row, so the picture is reproducible.

    python benchmarks/showcase.py --out docs/showcase.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from skyloom.pipeline import Pipeline
from skyloom.request import GenerationRequest
from skyloom.video_io import resize_frames, write_image

PROMPTS = (
    "a red circle moves left",
    "a blue square moves up on a gray background",
    "a yellow triangle falls",
    "a green circle moves right while a white square stays still",
    "a purple square moves down on a navy background",
    "a white triangle moves right on a black background",
)
COLUMNS = 6
SCALE = 2
GAP = 4  # pixels of white between frames and rows


def strip(frames: torch.Tensor, columns: int, scale: int) -> np.ndarray:
    """(T, H, W, 3) -> one row of `columns` frames spread over the clip, each upscaled."""
    T, H, W, _ = frames.shape
    picks = np.linspace(0, T - 1, columns).round().astype(int)
    chosen = resize_frames(frames[picks], W * scale, H * scale).numpy()  # (columns, H·s, W·s, 3)
    gap = np.full((H * scale, GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([part for frame in chosen for part in (frame, gap)][:-1], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/showcase.png"))
    parser.add_argument("--model", type=Path, default=None, help="model bundle (default: the embedded one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipe = Pipeline.from_pretrained(args.model, watermarkers=[], audit_log=None)
    rows, lines = [], []
    for index, prompt in enumerate(PROMPTS):
        result = pipe(GenerationRequest(prompt, seed=args.seed + index))
        rows.append(strip(result.frames, COLUMNS, SCALE))
        lines.append(f"{index + 1}. {prompt}" + (f" (enhanced: {result.record['enhanced_prompt']})" if "enhanced_prompt" in result.record else ""))
    gap = np.full((GAP, rows[0].shape[1], 3), 255, dtype=np.uint8)
    picture = np.concatenate([part for row in rows for part in (row, gap)][:-1], axis=0)
    write_image(args.out, picture)
    legend = args.out.with_suffix(".md")
    legend.write_text(
        f"Rows of {args.out.name}, top to bottom (model {pipe.bundle.name}, seeds {args.seed}..{args.seed + len(PROMPTS) - 1}, "
        f"{COLUMNS} frames spread over each clip, {SCALE}x Lanczos):\n\n" + "\n".join(lines) + "\n",
        encoding="utf-8",
    )
    print(f"wrote {args.out} ({picture.shape[1]}x{picture.shape[0]}) and {legend}")


if __name__ == "__main__":
    main()
