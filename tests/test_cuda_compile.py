"""Every CUDA source compiles for sm_90a with the installed nvcc, GPU or not, so the CUDA
kernels cannot rot on machines that never run them (skipped where nvcc is absent)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or (str(Path("/usr/local/cuda/bin/nvcc")) if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def test_there_are_cuda_sources():
    assert {p.name for p in CUDA_SOURCES} >= {"attention.cu", "patchify.cu"}


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_for_sm90a(source, tmp_path):
    result = subprocess.run(
        [NVCC, "-std=c++17", "-arch=sm_90a", "-O3", f"-I{ROOT / 'csrc'}", "-c", str(source), "-o", str(tmp_path / "k.o")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr[-4000:]}"
    assert (tmp_path / "k.o").stat().st_size > 0
