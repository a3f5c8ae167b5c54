"""Pure-PyTorch references for the compiled ops in skyloom.ops, for tests and benchmarks.

They are written for clarity, not speed: permute/reshape plus torch's scaled_dot_product_attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(x: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, C·pt·ph·pw); tokens t-major then h then w, features (c, pt, ph, pw)."""
    B, C, T, H, W = x.shape
    pt, ph, pw = patch_size
    x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, T', H', W', C, pt, ph, pw)
    return x.reshape(B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, patch_size: tuple[int, int, int], grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, C·pt·ph·pw) -> (B, C, T, H, W); the inverse of patchify."""
    B, N, D = tokens.shape
    pt, ph, pw = patch_size
    gt, gh, gw = grid
    C = D // (pt * ph * pw)
    x = tokens.reshape(B, gt, gh, gw, C, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, T', pt, H', ph, W', pw)
    return x.reshape(B, C, gt * pt, gh * ph, gw * pw)


def spacetime_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: str = "full",
    *,
    causal: bool = False,
    scale: float | None = None,
    valid_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over (B, T, S, heads, head_dim) activations; see skyloom.ops.spacetime_attention."""
    B, T, S, Hn, D = q.shape
    if mode == "spatial":  # each frame on its own: (B·T, heads, S, D)
        fold = lambda x: x.reshape(B * T, S, Hn, D).transpose(1, 2)
        out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), scale=scale)
        return out.transpose(1, 2).reshape(B, T, S, Hn, D)
    if mode == "temporal":  # each spatial position on its own: (B·S, heads, T, D)
        fold = lambda x: x.permute(0, 2, 3, 1, 4).reshape(B * S, Hn, T, D)
        out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), is_causal=causal, scale=scale)
        return out.reshape(B, S, Hn, T, D).permute(0, 3, 1, 2, 4)
    if mode != "full":
        raise ValueError(f"mode must be 'full', 'spatial' or 'temporal', got {mode!r}")
    fold = lambda x: x.reshape(B, T * S, Hn, D).transpose(1, 2)  # (B, heads, T·S, D)
    frame = torch.arange(T, device=q.device).repeat_interleave(S)  # frame index of each token
    mask = torch.ones(B, 1, T * S, T * S, dtype=torch.bool, device=q.device)
    if causal:
        mask = mask & (frame[None, None, None, :] <= frame[None, None, :, None])
    if valid_lengths is not None:
        mask = mask & (frame[None, None, None, :] < valid_lengths.to(q.device).view(B, 1, 1, 1))
    out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(B, T, S, Hn, D)
