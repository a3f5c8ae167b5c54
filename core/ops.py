"""skyloom's hot ops. (Being wired to the compiled kernels in skyloom._C; until then these
call the references so that the model can be written against the final API.)"""

from __future__ import annotations

import torch

from skyloom import reference_ops


def patchify(x: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    return reference_ops.patchify(x, patch_size)


def unpatchify(tokens: torch.Tensor, patch_size: tuple[int, int, int], grid: tuple[int, int, int]) -> torch.Tensor:
    return reference_ops.unpatchify(tokens, patch_size, grid)


def spacetime_attention(q, k, v, mode="full", *, causal=False, scale=None, valid_lengths=None):
    return reference_ops.spacetime_attention(q, k, v, mode, causal=causal, scale=scale, valid_lengths=valid_lengths)
