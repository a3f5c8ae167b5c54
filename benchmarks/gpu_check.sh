#!/usr/bin/env bash
# The CUDA checks in one run, for a machine with an NVIDIA GPU, a CUDA build of torch, nvcc,
# pytest and hypothesis (no network needed): build skyloom._C with its CUDA kernels, run the
# CUDA tests of skyloom.ops, run the CUDA benchmark, and profile the attention kernels with
# Nsight Compute. Stages run in order of importance, each under its own time limit, and each
# writes its log to $OUT (default: gpu-check/) as it goes, so a run cut short keeps what it did.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   SKYLOOM_CUDA_ARCHS=80 bash benchmarks/gpu_check.sh   # another GPU (default 90a: H100/H200)
#
# A setuptools older than 77 cannot read pyproject.toml's license field: put a newer wheel in
# .whl/ (pip download setuptools --only-binary=:all: -d .whl) and it is used from there.
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/skyloom-site .whl/*.whl
  export PYTHONPATH=/tmp/skyloom-site${PYTHONPATH:+:$PYTHONPATH}
fi

stage() {  # stage NAME SECONDS COMMAND...: runs COMMAND, its output to the screen and $OUT/NAME.log
  local name=$1 seconds=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S) UTC, limit ${seconds}s)"
  timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit $status"
  return "$status"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())'
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

stage build 240 env SKYLOOM_CUDA=1 SKYLOOM_CUDA_ARCHS="${SKYLOOM_CUDA_ARCHS:-90a}" MAX_JOBS="$(nproc)" \
  python3 -m pip install --no-deps --no-build-isolation --no-index -e . || exit 1
python3 -c 'from skyloom import _C; print("built:", _C.build_info())' | tee -a "$OUT/build.log" || exit 1

stage tests 180 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_ops.py
stage bench 240 python3 benchmarks/bench_ops.py --device cuda --repeats 5

# Where the time goes: one temporal and one full forward+backward (480p latent, bf16).
cat > "$OUT/profile.py" <<'PY'
import torch
from skyloom import ops
shape = (1, 21, 30 * 52, 16, 64)
q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
for mode in ("temporal", "full"):
    ops.spacetime_attention(q, k, v, mode).sum().backward()
torch.cuda.synchronize()
PY
stage profile 90 ncu --section SpeedOfLight --section Occupancy --kernel-name-base demangled --kernel-name regex:skyloom python3 "$OUT/profile.py"
exit 0
