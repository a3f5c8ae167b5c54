"""skyloom's hot ops, backed by the compiled kernels in skyloom._C (torch.ops.skyloom.*).

Each op has a CPU kernel (csrc/cpu) and, in CUDA builds, a CUDA kernel (csrc/cuda); a fake
implementation, so it traces under torch.compile and FakeTensor; and autograd, so it trains.
The pure-PyTorch definitions they must agree with are in skyloom.reference_ops (docs/kernels.md).

    tokens = patchify(x, (1, 2, 2))                      # (B, C, T, H, W) -> (B, N, C·pt·ph·pw)
    x = unpatchify(tokens, (1, 2, 2), grid)              # and back, bit-exact
    out = spacetime_attention(q, k, v, "temporal", causal=True)   # (B, T, S, heads, head_dim)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

import skyloom  # noqa: F401  (loads skyloom._C, which defines torch.ops.skyloom)

__all__ = ["patchify", "unpatchify", "spacetime_attention", "MODES", "CUDA_HEAD_DIMS"]

MODES = ("full", "spatial", "temporal")
CUDA_HEAD_DIMS = (32, 64, 128)  # head_dim values the CUDA attention kernels are built for
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: CPU only (gradcheck)


# --- argument checks ---------------------------------------------------------------------


def _check_float_tensor(t: object, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64 on CPU), got {t.dtype}")
    if t.dtype == torch.float64 and t.device.type != "cpu":
        raise TypeError(f"{name} is float64 on {t.device}: float64 is supported on the CPU only")


def _check_triple(value: object, name: str, what: str) -> tuple[int, int, int]:
    try:
        triple = tuple(int(v) for v in value)  # type: ignore[union-attr]
    except TypeError:
        raise TypeError(f"{name} must be a sequence of 3 ints {what}, got {value!r}") from None
    if len(triple) != 3 or any(v <= 0 for v in triple):
        raise ValueError(f"{name} must be 3 positive ints {what}, got {value!r}")
    return triple  # type: ignore[return-value]


def _check_backend(op: str, t: Tensor) -> None:
    key = "CUDA" if t.device.type == "cuda" else "CPU"
    if t.device.type not in ("cpu", "cuda", "meta") or (
        key == "CUDA" and not torch._C._dispatch_has_kernel_for_dispatch_key(f"skyloom::{op}", key)
    ):
        raise RuntimeError(
            f"skyloom.ops.{op} has no kernel for {t.device} in this build "
            f"(skyloom._C.build_info() = {skyloom._C.build_info()}); rebuild with SKYLOOM_CUDA=1 for CUDA tensors"
        )


# --- patchify / unpatchify ---------------------------------------------------------------


def patchify(x: Tensor, patch_size: Sequence[int]) -> Tensor:
    """Cut a video into non-overlapping patches, one token per patch.

    x: (B, C, T, H, W), float32/float16/bfloat16 (float64 on CPU), any strides.
    patch_size: (pt, ph, pw); T, H and W must be multiples of it.
    Returns tokens (B, N, C·pt·ph·pw), contiguous, N = (T/pt)·(H/ph)·(W/pw): token order is
    t-major, then h, then w; features are ordered (c, pt, ph, pw). The inverse is unpatchify.
    """
    _check_float_tensor(x, "x")
    pt, ph, pw = _check_triple(patch_size, "patch_size", "(pt, ph, pw)")
    if x.dim() != 5:
        raise ValueError(f"x must be (B, C, T, H, W), got shape {tuple(x.shape)}")
    B, C, T, H, W = x.shape
    if T % pt or H % ph or W % pw:
        raise ValueError(
            f"x (B, C, T, H, W) = {tuple(x.shape)}: T, H, W must be multiples of patch_size "
            f"{(pt, ph, pw)}; pad or crop the video first"
        )
    _check_backend("patchify", x)
    return torch.ops.skyloom.patchify(x, [pt, ph, pw])


def unpatchify(tokens: Tensor, patch_size: Sequence[int], grid: Sequence[int]) -> Tensor:
    """Reassemble a video from patch tokens: the exact inverse of patchify.

    tokens: (B, N, C·pt·ph·pw), any strides; patch_size: (pt, ph, pw);
    grid: (T/pt, H/ph, W/pw), the patch counts along each axis, with N = their product.
    Returns x (B, C, T, H, W), contiguous.
    """
    _check_float_tensor(tokens, "tokens")
    pt, ph, pw = _check_triple(patch_size, "patch_size", "(pt, ph, pw)")
    gt, gh, gw = _check_triple(grid, "grid", "(T/pt, H/ph, W/pw)")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, N, C·pt·ph·pw), got shape {tuple(tokens.shape)}")
    B, N, F = tokens.shape
    if N != gt * gh * gw:
        raise ValueError(f"tokens has N = {N} tokens but grid {(gt, gh, gw)} has {gt * gh * gw} cells")
    if F % (pt * ph * pw):
        raise ValueError(f"tokens has {F} features, not a multiple of pt·ph·pw = {pt * ph * pw}")
    _check_backend("unpatchify", tokens)
    return torch.ops.skyloom.unpatchify(tokens, [pt, ph, pw], [gt, gh, gw])


@torch.library.register_fake("skyloom::patchify")
def _patchify_fake(x: Tensor, patch_size: Sequence[int]) -> Tensor:
    B, C, T, H, W = x.shape
    pt, ph, pw = patch_size
    return x.new_empty((B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw))


@torch.library.register_fake("skyloom::unpatchify")
def _unpatchify_fake(tokens: Tensor, patch_size: Sequence[int], grid: Sequence[int]) -> Tensor:
    B, N, F = tokens.shape
    pt, ph, pw = patch_size
    gt, gh, gw = grid
    return tokens.new_empty((B, F // (pt * ph * pw), gt * pt, gh * ph, gw * pw))


def _patchify_setup(ctx, inputs, output) -> None:
    x, patch_size = inputs
    pt, ph, pw = patch_size
    ctx.patch_size = list(patch_size)
    ctx.grid = [x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw]


def _patchify_backward(ctx, grad: Tensor):
    return torch.ops.skyloom.unpatchify(grad, ctx.patch_size, ctx.grid), None


def _unpatchify_setup(ctx, inputs, output) -> None:
    _, patch_size, _ = inputs
    ctx.patch_size = list(patch_size)


def _unpatchify_backward(ctx, grad: Tensor):
    return torch.ops.skyloom.patchify(grad, ctx.patch_size), None, None


torch.library.register_autograd("skyloom::patchify", _patchify_backward, setup_context=_patchify_setup)
torch.library.register_autograd("skyloom::unpatchify", _unpatchify_backward, setup_context=_unpatchify_setup)


# --- spacetime attention -----------------------------------------------------------------


def spacetime_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mode: str = "full",
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    valid_lengths: Optional[Tensor] = None,
) -> Tensor:
    """Softmax attention over video tokens laid out (B, T, S, heads, head_dim).

    q, k, v: same shape, dtype and device; float32/float16/bfloat16 (float64 on CPU);
    any strides. Scores accumulate in float32 (float64 for float64 inputs).
    mode: "full"     every one of the T·S tokens attends to all of them;
          "spatial"  tokens attend within their own frame (S keys);
          "temporal" tokens attend across frames at their own spatial position (T keys).
    causal: full and temporal modes: keys in later frames than the query's are masked.
    scale: multiplies q·k; default 1/sqrt(head_dim).
    valid_lengths: full mode only, integer (B,): video b has valid_lengths[b] real frames
        (1..T); keys in later frames are masked for every query, padded frames' rows included.
    Returns (B, T, S, heads, head_dim), contiguous, in q's dtype. head_dim may be anything on
    the CPU; on CUDA it must be one of CUDA_HEAD_DIMS.
    """
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_float_tensor(t, name)
    if q.dim() != 5:
        raise ValueError(f"q must be (B, T, S, heads, head_dim), got shape {tuple(q.shape)}")
    for t, name in ((k, "k"), (v, "v")):
        if t.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}; they must match")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} is {t.dtype} but q is {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; they must match")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if causal and mode == "spatial":
        raise ValueError("causal=True masks later frames, which spatial attention never sees; use 'full' or 'temporal'")
    B, T, S, heads, head_dim = q.shape
    if q.device.type == "cuda" and head_dim not in CUDA_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported on CUDA; use one of {CUDA_HEAD_DIMS}")
    if valid_lengths is not None:
        if mode != "full":
            raise ValueError(f"valid_lengths applies to mode='full' only, got mode={mode!r}")
        if not isinstance(valid_lengths, Tensor) or valid_lengths.dtype.is_floating_point or valid_lengths.is_complex():
            raise TypeError(f"valid_lengths must be an integer tensor of shape (B,) = ({B},), got {valid_lengths!r}")
        if valid_lengths.shape != (B,):
            raise ValueError(f"valid_lengths must have shape (B,) = ({B},), got {tuple(valid_lengths.shape)}")
        valid_lengths = valid_lengths.to(device=q.device, dtype=torch.int64)
        if not torch.compiler.is_compiling() and valid_lengths.numel() and (
            int(valid_lengths.min()) < 1 or int(valid_lengths.max()) > T
        ):
            raise ValueError(f"valid_lengths must lie in [1, T] = [1, {T}], got {valid_lengths.tolist()}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    _check_backend("spacetime_attention_forward", q)
    out, _ = torch.ops.skyloom.spacetime_attention_forward(q, k, v, mode, bool(causal), scale, valid_lengths)
    return out


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("skyloom::spacetime_attention_forward")
def _attention_forward_fake(q, k, v, mode, causal, scale, valid_lengths):
    B, T, S, heads, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, T, S, heads), dtype=_lse_dtype(q))


@torch.library.register_fake("skyloom::spacetime_attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, lse, mode, causal, scale, valid_lengths):
    return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, mode, causal, scale, valid_lengths = inputs
    out, lse = output
    ctx.mode, ctx.causal, ctx.scale = mode, causal, scale
    ctx.has_valid_lengths = valid_lengths is not None
    ctx.save_for_backward(q, k, v, out, lse, *([valid_lengths] if valid_lengths is not None else []))


def _attention_backward(ctx, grad_out: Optional[Tensor], grad_lse: Optional[Tensor]):
    # lse is an internal output (skyloom.ops.spacetime_attention never returns it): no gradient flows through it
    q, k, v, out, lse, *rest = ctx.saved_tensors
    valid_lengths = rest[0] if ctx.has_valid_lengths else None
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_q, grad_k, grad_v = torch.ops.skyloom.spacetime_attention_backward(
        grad_out, q, k, v, out, lse, ctx.mode, ctx.causal, ctx.scale, valid_lengths
    )
    return grad_q, grad_k, grad_v, None, None, None, None


def _attention_double_backward(ctx, *grads):
    raise NotImplementedError(
        "skyloom.ops.spacetime_attention does not support double backward (create_graph=True through "
        "its gradient); use skyloom.reference_ops.spacetime_attention for higher-order gradients"
    )


torch.library.register_autograd(
    "skyloom::spacetime_attention_forward", _attention_backward, setup_context=_attention_setup
)
torch.library.register_autograd(
    "skyloom::spacetime_attention_backward", _attention_double_backward, setup_context=lambda ctx, inputs, output: None
)
