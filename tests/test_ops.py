"""skyloom.ops against the pure-PyTorch references in skyloom.reference_ops: outputs and gradients,
every dtype and mask, awkward sizes and strides, the fake/autograd registrations (opcheck), and the
errors a caller gets for bad input."""

import contextlib
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skyloom import _C, ops, reference_ops
from tests.strategies import attention_problems, low_precision_dtypes, patch_problems

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# The attention tests run every instruction-set build of the CPU kernels this CPU can run, and CUDA.
# "cpu-<instruction set>" for each copy of the CPU kernels this CPU runs, then CUDA
TARGETS = [f"cpu-{c}" for c in _C.cpu_capabilities()] + [pytest.param("cuda", marks=pytest.mark.cuda)]
LAYOUTS = ["contiguous", "permuted", "sliced", "head_dim_strided"]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as t (B, T, S, heads, D) in another memory layout."""
    if layout == "permuted":  # stored (B, S, heads, T, D), as a temporal block would hold it
        return t.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4)
    if layout == "sliced":  # rows padded in memory: unit stride over D, gaps between tokens
        return torch.cat([t, torch.zeros_like(t[..., :3])], dim=-1)[..., : t.shape[-1]]
    if layout == "head_dim_strided":  # head_dim not unit-stride
        return t.transpose(3, 4).contiguous().transpose(3, 4)
    return t


@contextlib.contextmanager
def _on(target: str):
    """Yields target's torch device, with the CPU kernels pinned to its instruction set meanwhile."""
    device, _, capability = target.partition("-")
    saved = os.environ.get("SKYLOOM_CPU_CAPABILITY")
    if capability:
        os.environ["SKYLOOM_CPU_CAPABILITY"] = capability
    try:
        yield device
    finally:
        if saved is None:
            os.environ.pop("SKYLOOM_CPU_CAPABILITY", None)
        else:
            os.environ["SKYLOOM_CPU_CAPABILITY"] = saved


def _attention_inputs(problem, dtype, device, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(problem["shape"], generator=g, dtype=torch.float64) for _ in range(3))
    valid = problem["valid_lengths"]
    valid = None if valid is None else torch.tensor(valid, device=device)
    return [x.to(device=device, dtype=dtype).requires_grad_(requires_grad) for x in (q, k, v)], valid


def _run(fn, q, k, v, problem, valid, grad_out):
    out = fn(q, k, v, problem["mode"], causal=problem["causal"], valid_lengths=valid)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return (out, *grads)


# --- patchify ----------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
@given(problem=patch_problems(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       strided=st.booleans())
@settings(max_examples=20)
def test_patchify_matches_reference_and_round_trips(target, problem, dtype, strided):
    shape, patch = problem
    with _on(target) as device:
        x = torch.randn(shape).to(device=device, dtype=dtype)
        if strided:  # channels-last-like storage: W is not the unit-stride axis
            x = x.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)
        tokens = ops.patchify(x, patch)
        assert torch.equal(tokens, reference_ops.patchify(x, patch))
        grid = (shape[2] // patch[0], shape[3] // patch[1], shape[4] // patch[2])
        assert torch.equal(ops.unpatchify(tokens, patch, grid), x)  # bit-exact identity
        strided_tokens = tokens.transpose(1, 2).contiguous().transpose(1, 2)
        assert torch.equal(ops.unpatchify(strided_tokens, patch, grid), x)


@pytest.mark.parametrize("target", [t for t in TARGETS if isinstance(t, str)])
@pytest.mark.parametrize(
    "dtype,ph,pw",  # every dtype and patch width whose runs are 8 bytes, and an odd row count
    [(torch.float32, 2, 2), (torch.bfloat16, 2, 4), (torch.float16, 2, 4), (torch.float64, 2, 1), (torch.float32, 1, 2),
     (torch.float32, 2, 4)],
)
@pytest.mark.parametrize("W_patches", [9, 420])  # 2 tiles of 4 tokens and a tail; more than one block of tokens
@pytest.mark.parametrize("layout", ["contiguous", "padded"])
def test_patchify_vector_tiles_and_their_tails(target, dtype, ph, pw, W_patches, layout):
    """The CPU fast path moves runs of pw pixels in tiles of rows x tokens (4 x 4 with AVX2, 2 x 2
    without); C = 5 gives 10 or 5 pixel rows per slab, so rows and tokens are left outside whole
    tiles. "padded": rows and frames further apart than the shape says (a crop of every other
    frame) and tokens further apart than their features (a slice of wider ones)."""
    C, T, H, W = 5, 3, 4, W_patches * pw
    patch, grid = (1, ph, pw), (T, H // ph, W_patches)
    with _on(target):
        x = torch.randn(2, C, 2 * T, H, W + 3).to(dtype)[:, :, ::2, :, :W]
        if layout == "contiguous":
            x = x.contiguous()
        tokens = ops.patchify(x, patch)
        assert torch.equal(tokens, reference_ops.patchify(x, patch))
        F = tokens.shape[-1]
        source = torch.cat([tokens, torch.zeros_like(tokens[..., :3])], dim=-1)[..., :F] if layout == "padded" else tokens
        assert torch.equal(ops.unpatchify(source, patch, grid), x.contiguous())


@pytest.mark.parametrize("target", [t for t in TARGETS if isinstance(t, str)])
@pytest.mark.parametrize("dtype,patch", [
    (torch.float32, (1, 2, 2)),  # 8-byte runs, moved in tiles
    (torch.float16, (2, 2, 4)),
    (torch.float32, (1, 2, 1)),  # 4-byte runs, one at a time
])
def test_patchify_streams_large_outputs(target, dtype, patch):
    """Tokens of 12 MiB and more are gathered a block at a time and written with streaming stores
    (kStreamOutputBytes in streaming.h). 102 tokens a slab: a block of 64, then one of 38 with a
    tail outside whole tiles; C = 5 leaves pixel rows outside them too."""
    pt, ph, pw = patch
    x = torch.randn(1, 5, 100 // min(pw, 2), 62, 102 * pw).to(dtype)  # 12.6 MB
    with _on(target):
        tokens = ops.patchify(x, patch)
    assert tokens.nbytes >= 12 * 2**20
    assert torch.equal(tokens, reference_ops.patchify(x, patch))


@pytest.mark.parametrize("device", DEVICES)
def test_patchify_gradients_are_unpatchify(device):
    x = torch.randn(2, 3, 4, 6, 10, device=device, requires_grad=True)
    tokens = ops.patchify(x, (2, 3, 2))
    grad = torch.randn_like(tokens)
    (gx,) = torch.autograd.grad(tokens, x, grad)
    assert torch.equal(gx, reference_ops.unpatchify(grad, (2, 3, 2), (2, 2, 5)))
    t = tokens.detach().requires_grad_(True)
    (gt,) = torch.autograd.grad(ops.unpatchify(t, (2, 3, 2), (2, 2, 5)), t, x.detach())
    assert torch.equal(gt, reference_ops.patchify(x.detach(), (2, 3, 2)))


def test_patchify_gradcheck_float64():
    x = torch.randn(1, 2, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.patchify(x, (2, 2, 3)), (x,))
    t = torch.randn(1, 2, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.unpatchify(t, (2, 2, 3), (1, 2, 1)), (t,))


@pytest.mark.parametrize("device", DEVICES)
def test_patch_ops_opcheck(device):
    x = torch.randn(2, 3, 4, 6, 10, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.skyloom.patchify, (x, [2, 3, 2]))
    t = torch.randn(2, 20, 36, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.skyloom.unpatchify, (t, [2, 3, 2], [2, 2, 5]))


def test_patchify_bad_inputs():
    x = torch.randn(1, 3, 4, 6, 10)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        ops.patchify(x, (3, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        ops.patchify(x[0], (1, 2, 2))
    with pytest.raises(TypeError, match="float32"):
        ops.patchify(x.to(torch.int32), (1, 2, 2))
    with pytest.raises(ValueError, match="patch_size"):
        ops.patchify(x, (1, 0, 2))
    with pytest.raises(TypeError, match="patch_size"):
        ops.patchify(x, 2)
    tokens = ops.patchify(x, (2, 2, 2))
    with pytest.raises(ValueError, match="grid"):
        ops.unpatchify(tokens, (2, 2, 2), (2, 3, 4))
    with pytest.raises(ValueError, match="features"):
        ops.unpatchify(tokens[..., :-1], (2, 2, 2), (2, 3, 5))
    with pytest.raises(RuntimeError, match="not divisible"):  # the op itself checks too
        torch.ops.skyloom.patchify(x, [3, 2, 2])


# --- spacetime attention -----------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
@given(problem=attention_problems(), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
@settings(max_examples=30)
def test_attention_float32_matches_reference(target, problem, layout, seed):
    with _on(target) as device:
        _check_float32_matches_reference(device, problem, layout, seed)


def _check_float32_matches_reference(device, problem, layout, seed):
    if device == "cuda" and problem["shape"][-1] not in ops.CUDA_HEAD_DIMS:
        problem = dict(problem, shape=problem["shape"][:-1] + (32,))
    (q, k, v), valid = _attention_inputs(problem, torch.float32, device, seed)
    grad_out = torch.randn(problem["shape"], generator=torch.Generator().manual_seed(seed + 1)).to(device)
    ours = _run(ops.spacetime_attention, *(_layout(x, layout) for x in (q, k, v)), problem, valid, grad_out)
    ref = _run(reference_ops.spacetime_attention, q, k, v, problem, valid, grad_out)
    for name, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name} ({problem}): {m}")


@pytest.mark.parametrize("target", TARGETS)
@given(problem=attention_problems(max_tokens=96), dtype_name=low_precision_dtypes, seed=st.integers(0, 2**16))
@settings(max_examples=20)
def test_attention_low_precision_error_within_twice_torchs(target, problem, dtype_name, seed):
    """Against a float64 reference, our fp16/bf16 error is at most 2x PyTorch's own at that precision."""
    with _on(target) as device:
        _check_low_precision_error(device, problem, dtype_name, seed)


def _check_low_precision_error(device, problem, dtype_name, seed, layout="contiguous"):
    if device == "cuda" and problem["shape"][-1] not in ops.CUDA_HEAD_DIMS:
        problem = dict(problem, shape=problem["shape"][:-1] + (64,))
    dtype = getattr(torch, dtype_name)
    (q, k, v), valid = _attention_inputs(problem, dtype, device, seed)
    grad_out = torch.randn(problem["shape"], generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    ours = _run(ops.spacetime_attention, *(_layout(x, layout) for x in (q, k, v)), problem, valid, grad_out)
    torch_low = _run(reference_ops.spacetime_attention, q, k, v, problem, valid, grad_out)
    exact_inputs = [x.detach().double().cpu().requires_grad_(True) for x in (q, k, v)]
    exact = _run(reference_ops.spacetime_attention, *exact_inputs, problem,
                 None if valid is None else valid.cpu(), grad_out.double().cpu())
    eps = 1e-3 if dtype == torch.float16 else 8e-3
    for name, a, b, e in zip(("out", "grad_q", "grad_k", "grad_v"), ours, torch_low, exact):
        ours_err = (a.double().cpu() - e).abs().max().item()
        torch_err = (b.double().cpu() - e).abs().max().item()
        assert ours_err <= 2 * torch_err + eps * max(1.0, e.abs().max().item()), (name, ours_err, torch_err, problem)


CASES = [  # (mode, causal, valid_lengths)
    ("full", False, None),
    ("full", True, None),
    ("full", False, [2, 1]),
    ("full", True, [1, 3]),
    ("spatial", False, None),
    ("temporal", False, None),
    ("temporal", True, None),
]


@pytest.mark.parametrize("target", [t for t in TARGETS if isinstance(t, str)])
@pytest.mark.parametrize("mode,causal,valid", CASES)
def test_attention_gradcheck_float64(target, mode, causal, valid):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 2, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lengths = None if valid is None else torch.tensor(valid)
    fn = lambda q, k, v: ops.spacetime_attention(q, k, v, mode, causal=causal, valid_lengths=lengths)  # noqa: E731
    with _on(target):
        assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)
        # float64 agrees with the reference to rounding, which makes gradcheck meaningful for the kernel
        torch.testing.assert_close(fn(q, k, v), reference_ops.spacetime_attention(q, k, v, mode, causal=causal,
                                                                                 valid_lengths=lengths))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,causal,valid", CASES)
def test_attention_opcheck(device, mode, causal, valid):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 2, 32, generator=g).to(device).requires_grad_(True) for _ in range(3))
    lengths = None if valid is None else torch.tensor(valid, device=device)
    scale = 1 / math.sqrt(32)
    torch.library.opcheck(torch.ops.skyloom.spacetime_attention_forward, (q, k, v, mode, causal, scale, lengths))
    out, lse = torch.ops.skyloom.spacetime_attention_forward(q, k, v, mode, causal, scale, lengths)
    # the backward op is not differentiable itself (double backward raises), so its inputs do not require grad
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), mode, causal, scale,
            lengths)
    torch.library.opcheck(torch.ops.skyloom.spacetime_attention_backward, args)


TEMPORAL_LENGTHS = [  # around one AVX2 vector of the accumulation type, one AVX-512 vector, one tile
    *((torch.float32, T) for T in (8, 9, 16, 33, 65)), (torch.float64, 4), (torch.float64, 5), (torch.bfloat16, 8),
    (torch.bfloat16, 9),
]


@pytest.mark.parametrize("target", [t for t in TARGETS if isinstance(t, str)] + ["cpu"])
@pytest.mark.parametrize("dtype,T", TEMPORAL_LENGTHS)
@pytest.mark.parametrize("causal", [False, True])
def test_temporal_attention_around_the_vector_widths(target, dtype, T, causal):
    """Unpinned ("cpu"), an AVX-512 CPU runs temporal sequences that fit one AVX2 vector (T <= 8,
    4 in float64) on the AVX2 copy; pinned, every copy runs them itself."""
    problem = dict(shape=(1, T, 6, 2, 16), mode="temporal", causal=causal, valid_lengths=None)
    (q, k, v), valid = _attention_inputs(problem, dtype, "cpu", 5)
    grad_out = torch.randn(problem["shape"], generator=torch.Generator().manual_seed(6)).to(dtype)
    with _on(target):
        ours = _run(ops.spacetime_attention, q, k, v, problem, valid, grad_out)
    wide = torch.float64 if dtype == torch.float64 else torch.float32  # bf16: the kernel computes in fp32
    exact = [x.detach().to(wide).requires_grad_(True) for x in (q, k, v)]
    ref = _run(reference_ops.spacetime_attention, *exact, problem, valid, grad_out.to(wide))
    tolerance = {torch.float32: (2e-5, 1e-4), torch.float64: (1e-10, 1e-9), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.to(wide), b, atol=tolerance[0], rtol=tolerance[1])


@pytest.mark.parametrize("target", [t for t in TARGETS if isinstance(t, str)])
@pytest.mark.parametrize("dtype,shape", [
    (torch.float32, (1, 8, 2048, 4, 64)),  # 16 MiB a tensor: streamed in whole vectors
    (torch.float32, (1, 8, 2048, 5, 52)),  # 52 floats a row: whole SSE vectors only, the rest stored as usual
    (torch.float64, (1, 4, 2048, 4, 64)),
])
def test_temporal_attention_streams_large_outputs(target, dtype, shape):
    """Outputs of 12 MiB and more are written with streaming stores (kStreamOutputBytes in streaming.h)."""
    problem = dict(shape=shape, mode="temporal", causal=True, valid_lengths=None)
    (q, k, v), valid = _attention_inputs(problem, dtype, "cpu", 7)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(8), dtype=dtype)
    with _on(target):
        ours = _run(ops.spacetime_attention, q, k, v, problem, valid, grad_out)
    ref = _run(reference_ops.spacetime_attention, q, k, v, problem, valid, grad_out)
    for name, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), ours, ref):
        assert a.nbytes >= 16 * 2**20
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("target", [t for t in TARGETS if isinstance(t, str)])
def test_attention_long_sequence_crosses_tiles(target):
    """More queries and keys than one tile (256 x 64), with a causal mask that cuts tiles mid-way."""
    problem = dict(shape=(1, 5, 67, 1, 16), mode="full", causal=True, valid_lengths=[4])
    (q, k, v), valid = _attention_inputs(problem, torch.float32, "cpu", 3)
    grad_out = torch.randn(problem["shape"])
    with _on(target):
        ours = _run(ops.spacetime_attention, q, k, v, problem, valid, grad_out)
    ref = _run(reference_ops.spacetime_attention, q, k, v, problem, valid, grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("target", [t for t in TARGETS if isinstance(t, str)])
@pytest.mark.parametrize("head_dim", [96, 128])  # AVX-512 P·V: 4 + 2 vectors of columns; 4 + 4
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_reuses_packed_keys_across_query_blocks(target, head_dim, threads):
    """Three query blocks per head whose causal masks end in different key tiles: a thread keeps the
    key tiles it packed for one block of a head for its next, and packs again for the next head."""
    problem = dict(shape=(1, 3, 200, 2, head_dim), mode="full", causal=True, valid_lengths=None)
    (q, k, v), valid = _attention_inputs(problem, torch.float32, "cpu", 5)
    grad_out = torch.randn(problem["shape"], generator=torch.Generator().manual_seed(6))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _on(target):
            ours = _run(ops.spacetime_attention, q, k, v, problem, valid, grad_out)
    finally:
        torch.set_num_threads(saved)
    ref = _run(reference_ops.spacetime_attention, q, k, v, problem, valid, grad_out)
    for name, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("target", [t for t in TARGETS if isinstance(t, str)])
def test_attention_never_reads_padding_frames(target):
    """Frames past a video's valid_length are padding that may hold anything: NaN in q, k and v
    there changes no output row of the valid frames (compared with the reference on the same
    values without the NaN)."""
    problem = dict(shape=(2, 3, 100, 2, 32), mode="full", causal=False, valid_lengths=[2, 3])
    (q, k, v), valid = _attention_inputs(problem, torch.float32, "cpu", 7, requires_grad=False)
    nan_padded = [x.clone() for x in (q, k, v)]
    for x in nan_padded:
        x[0, 2:] = float("nan")  # video 0's padding: keys 200..299, from mid-way through the tile 192..255
    with _on(target):
        ours = ops.spacetime_attention(*nan_padded, "full", valid_lengths=valid)
    ref = reference_ops.spacetime_attention(q, k, v, "full", valid_lengths=valid)
    torch.testing.assert_close(ours[0, :2], ref[0, :2], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours[1], ref[1], atol=2e-5, rtol=1e-4)


def test_attention_default_scale_and_explicit_scale():
    q, k, v = (torch.randn(1, 2, 3, 1, 16) for _ in range(3))
    torch.testing.assert_close(ops.spacetime_attention(q, k, v), ops.spacetime_attention(q, k, v, scale=0.25))
    torch.testing.assert_close(ops.spacetime_attention(q, k, v, scale=0.7),
                               reference_ops.spacetime_attention(q, k, v, scale=0.7))


def test_attention_bad_inputs():
    q = torch.randn(1, 2, 3, 2, 8)
    with pytest.raises(ValueError, match=r"\(B, T, S, heads, head_dim\)"):
        ops.spacetime_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="k has shape"):
        ops.spacetime_attention(q, q[:, :1], q)
    with pytest.raises(TypeError, match="v is torch.float16"):
        ops.spacetime_attention(q, q, q.half())
    with pytest.raises(TypeError, match="float32"):
        ops.spacetime_attention(q.int(), q.int(), q.int())
    with pytest.raises(ValueError, match="mode"):
        ops.spacetime_attention(q, q, q, "diagonal")
    with pytest.raises(ValueError, match="spatial"):
        ops.spacetime_attention(q, q, q, "spatial", causal=True)
    with pytest.raises(ValueError, match="mode='full'"):
        ops.spacetime_attention(q, q, q, "temporal", valid_lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        ops.spacetime_attention(q, q, q, valid_lengths=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer"):
        ops.spacetime_attention(q, q, q, valid_lengths=torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        ops.spacetime_attention(q, q, q, valid_lengths=torch.tensor([3]))
    with pytest.raises(RuntimeError, match="must match"):  # the op checks too
        torch.ops.skyloom.spacetime_attention_forward(q, q[:, :1], q, "full", False, 1.0, None)


def test_cpu_capability_override():
    assert _C.cpu_capabilities()[-1] == "default"
    q = torch.randn(1, 2, 3, 1, 8)
    with _on("cpu-sse9"), pytest.raises(ValueError, match=r"SKYLOOM_CPU_CAPABILITY=sse9 .*use one of .*default"):
        ops.spacetime_attention(q, q, q)
    with _on("cpu-sse9"), pytest.raises(ValueError, match=r"SKYLOOM_CPU_CAPABILITY=sse9"):
        ops.patchify(torch.randn(1, 2, 1, 4, 4), (1, 2, 2))
    with _on("cpu-default"):
        torch.testing.assert_close(ops.spacetime_attention(q, q, q), reference_ops.spacetime_attention(q, q, q))


def _huge_pages_advised(t: torch.Tensor) -> bool:
    """Whether the memory in the middle of t lies in a mapping marked MADV_HUGEPAGE ('hg' in its
    VmFlags in /proc/self/smaps)."""
    address = t.data_ptr() + t.nbytes // 2
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            field = line.split()[0]
            if field == "VmFlags:":
                if inside:
                    return "hg" in line.split()[1:]
            elif not field.endswith(":"):  # a mapping's header: "start-end perms ..."
                start, end = (int(x, 16) for x in field.split("-"))
                inside = start <= address < end
    raise AssertionError(f"address {address:#x} is in no mapping")


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage"), reason="needs Linux huge pages")
def test_large_cpu_outputs_ask_for_huge_pages():
    """Every op's large outputs are advised for 2 MiB pages, so filling them costs 16 page faults
    per 32 MiB instead of 8,192 (docs/performance.md); the values are tested elsewhere."""
    q, k, v = (torch.randn(1, 16, 256, 8, 64, requires_grad=True) for _ in range(3))  # 8 MiB each
    out = ops.spacetime_attention(q, k, v, "temporal")
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    tokens = ops.patchify(torch.randn(1, 8, 4, 256, 256), (1, 2, 2))
    video = ops.unpatchify(tokens, (1, 2, 2), (4, 128, 128))
    for name, t in [("out", out), ("grad_q", grads[0]), ("grad_k", grads[1]), ("grad_v", grads[2]),
                    ("tokens", tokens), ("video", video)]:
        assert _huge_pages_advised(t), name
    if "THP_MEM_ALLOC_ENABLE" not in os.environ:  # torch's own allocator asks for none
        # 512 MiB (never touched, so free) is above glibc's largest mmap threshold (32 MiB) and
        # more than the heap ever has free in these tests, so this is fresh memory: a smaller
        # buffer may reuse heap pages that an earlier op's output already advised.
        assert not _huge_pages_advised(torch.empty(128 * 2**20))


@pytest.mark.cuda
def test_attention_cuda_rejects_unsupported_head_dim():
    q = torch.randn(1, 2, 3, 2, 59, device="cuda")
    with pytest.raises(ValueError, match="head_dim 59"):
        ops.spacetime_attention(q, q, q)


# 64 frames: the longest the short-T temporal kernels take; 65: the general kernels. The sliced
# layout's rows are not 16-byte aligned, which also sends a short sequence to the general kernels.
@pytest.mark.cuda
@pytest.mark.parametrize("frames", [21, 64, 65])
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_cuda_temporal_short_and_long_sequences(frames, dtype_name, causal):
    problem = dict(shape=(2, frames, 5, 3, 64), mode="temporal", causal=causal, valid_lengths=None)
    if dtype_name == "float32":
        for layout in ("contiguous", "sliced"):
            _check_float32_matches_reference("cuda", problem, layout, seed=frames)
    else:
        _check_low_precision_error("cuda", problem, dtype_name, seed=frames)


# fp16/bf16 full and spatial attention on tensor cores: contiguous rows take the mma.sync kernels
# (forward and backward), sliced rows (not 16-byte aligned) the WMMA forward and CUDA-core
# backward. 210 tokens a sequence: more than one block of rows at either head_dim.
@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode, causal, valid", [("full", False, None), ("full", True, [3, 2]), ("spatial", False, None)])
def test_attention_cuda_tensor_core_kernels(layout, head_dim, dtype_name, mode, causal, valid):
    problem = dict(shape=(2, 3, 70, 2, head_dim), mode=mode, causal=causal, valid_lengths=valid)
    _check_low_precision_error("cuda", problem, dtype_name, seed=head_dim, layout=layout)


def test_attention_double_backward_raises_clearly():
    q, k, v = (torch.randn(1, 2, 3, 1, 8, requires_grad=True) for _ in range(3))
    (gq,) = torch.autograd.grad(ops.spacetime_attention(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gq.sum().backward()


def test_attention_is_traceable_with_fake_tensors():
    """Shapes and dtypes come from the fake implementations, without running a kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 5, 4, 16, dtype=torch.bfloat16)
        out, lse = torch.ops.skyloom.spacetime_attention_forward(q, q, q, "full", True, 0.25, None)
        tokens = ops.patchify(torch.empty(2, 4, 6, 8, 8), (2, 2, 2))
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == (2, 3, 5, 4) and lse.dtype == torch.float32
    assert tokens.shape == (2, 3 * 4 * 4, 4 * 8)
