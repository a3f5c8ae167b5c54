"""The CUDA attention kernels, executed on the CPU: tests/cuda_emulation/emulate.h runs each thread
of a block as a host thread (barriers for __syncthreads/__syncwarp, an exchange for
__shfl_xor_sync, mma.sync and ldmatrix with the PTX ISA's fragment layouts, cp.async copies that
land at their wait, whole-tile WMMA fragments), and attention.cpp checks out, lse, dQ, dK and dV
against attention in double. This checks the kernels' indexing, masks and synchronisation where no
GPU is; the CUDA-marked tests in test_ops.py check the compiled kernels where one is."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_cuda_compile import NVCC, ROOT

HERE = Path(__file__).resolve().parent / "cuda_emulation"
# The toolkit's headers (uint4, the host side of __half and __nv_bfloat16); nvcc may be a wrapper script.
_CUDA_ROOTS = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
               NVCC and str(Path(NVCC).resolve().parents[1])]
CUDA_INCLUDE = next((Path(r) / "include" for r in _CUDA_ROOTS if r and (Path(r) / "include" / "cuda_runtime.h").exists()),
                    None)
CXX = shutil.which("g++")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CXX is None or CUDA_INCLUDE is None, reason="needs g++ and the CUDA toolkit's headers"),
]


@pytest.fixture(scope="module")
def emulated_kernels(tmp_path_factory):
    binary = tmp_path_factory.mktemp("emulation") / "attention"
    result = subprocess.run(
        [CXX, "-std=c++20", "-O2", "-pthread", f"-I{HERE}", f"-I{ROOT / 'csrc'}", f"-I{CUDA_INCLUDE}",
         str(HERE / "attention.cpp"), "-o", str(binary)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"the emulation harness did not build:\n{result.stderr[-4000:]}"
    return binary


def _check(binary, kernels, dtype, B, T, S, heads, D, mode, causal, valid, layout):
    args = [kernels, dtype, B, T, S, heads, D, mode, int(causal), ",".join(map(str, valid)) if valid else "-", layout]
    result = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args}: errors over the {dtype} tolerance:\n{result.stdout}{result.stderr}"
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["out", "lse", "dq", "dk", "dv"]


# kernels, dtype, B, T, S, heads, head_dim, mode, causal, valid_lengths, layout. The edges: T = 1
# and T = 64 (the short-T kernels' longest), several sequences per block with a partial last one
# (T = 21: 3 a block), more than one block of rows for the tensor-core kernels (64 a block, 128
# for mma at head_dim 64: L = 132, 194), three or more 64-key tiles so that the mma kernels'
# double buffers are refilled (L = 150, 194), more than one block of rows for the general kernels
# with a partial last one (256 rows a block at head_dim 32: L = 260; 64 at head_dim 128: L = 90),
# and the layouts the bindings pass through unchanged.
CASES = [
    ("temporal", "f32", 1, 5, 3, 2, 32, "temporal", False, None, "contiguous"),
    ("temporal", "f32", 2, 21, 5, 2, 64, "temporal", True, None, "permuted"),
    ("temporal", "f16", 2, 1, 7, 2, 64, "temporal", True, None, "contiguous"),
    ("temporal", "f16", 1, 21, 4, 3, 128, "temporal", False, None, "permuted"),
    ("temporal", "bf16", 1, 21, 5, 3, 128, "temporal", False, None, "padded"),
    ("temporal", "bf16", 1, 64, 2, 2, 64, "temporal", True, None, "permuted"),
    ("general", "f32", 2, 3, 5, 2, 64, "full", True, [2, 1], "permuted"),
    ("general", "f32", 1, 4, 65, 1, 32, "full", False, None, "padded"),
    ("general", "f32", 2, 2, 13, 3, 128, "spatial", False, None, "contiguous"),
    ("general", "bf16", 1, 3, 30, 2, 128, "full", True, [2], "permuted"),
    ("general", "f16", 2, 8, 3, 2, 64, "temporal", True, None, "permuted"),
    ("general", "bf16", 1, 70, 2, 1, 32, "temporal", True, None, "contiguous"),
    ("mma", "f16", 1, 3, 7, 1, 64, "full", False, None, "contiguous"),
    ("mma", "bf16", 2, 5, 17, 2, 128, "full", True, [3, 2], "permuted"),
    ("mma", "f16", 1, 3, 70, 2, 64, "spatial", False, None, "padded"),
    ("mma", "f16", 1, 2, 150, 1, 64, "spatial", False, None, "contiguous"),
    ("mma", "bf16", 2, 4, 33, 3, 128, "full", True, None, "padded"),
    ("mma", "bf16", 1, 2, 97, 2, 64, "full", True, None, "padded"),
    ("wmma", "f16", 1, 3, 7, 1, 64, "full", False, None, "contiguous"),
    ("wmma", "bf16", 2, 5, 17, 2, 128, "full", True, [3, 2], "permuted"),
    ("wmma", "f16", 1, 3, 70, 2, 64, "spatial", False, None, "padded"),
    ("wmma", "bf16", 1, 1, 1, 1, 64, "spatial", False, None, "contiguous"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join("x".join(map(str, x)) if isinstance(x, list) else str(x)
                                                                for x in c))
def test_kernels_match_attention_in_double(emulated_kernels, case):
    _check(emulated_kernels, *case)


@st.composite
def emulated_problems(draw):
    kernels = draw(st.sampled_from(["general", "mma", "wmma", "temporal"]))
    tensor_cores = kernels in ("mma", "wmma")
    mode = "temporal" if kernels == "temporal" else draw(st.sampled_from(["full", "spatial", "temporal"]))
    if tensor_cores:
        mode = draw(st.sampled_from(["full", "spatial"]))
    dtype = draw(st.sampled_from(["f16", "bf16"] if tensor_cores else ["f32", "f16", "bf16"]))
    D = draw(st.sampled_from([64, 128] if tensor_cores else [32, 64, 128]))
    B, T, S, heads = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 11)), draw(st.integers(1, 3))
    causal = mode != "spatial" and draw(st.booleans())
    valid = [draw(st.integers(1, T)) for _ in range(B)] if mode == "full" and draw(st.booleans()) else None
    layout = draw(st.sampled_from(["contiguous", "permuted", "padded"]))
    return kernels, dtype, B, T, S, heads, D, mode, causal, valid, layout


@given(problem=emulated_problems())
@settings(max_examples=25)
def test_kernels_match_attention_in_double_on_drawn_problems(emulated_kernels, problem):
    _check(emulated_kernels, *problem)
