"""Benchmarks skyloom.ops against PyTorch, side by side in one run (`make bench`).

CPU: spacetime attention on B=1, T=8..16, S=256..1024, heads 4..8, head_dim 64, forward and
forward+backward; full mode against torch SDPA on ready-made (B, heads, T·S, D) inputs,
spatial/temporal against the permute -> SDPA -> permute reference; each side's GFLOP/s, and
ours against the rate of an fp32 torch.mm timed right after (how near the machine's FMA
ceiling the kernels run decides how far ahead of SDPA they can get); patchify GB/s against a
plain copy of the same bytes. CUDA (when available): the 480p-latent shapes (T=21, S=30×52,
heads 12..24, head_dim 64/128, bf16) against SDPA's flash and cuDNN backends, with CUDA
events, warm-up and an L2 flush before every timed call; TFLOP/s and the fraction of peak, and
GB/s against a device-to-device copy (the measure for the memory-bound temporal mode).

    python benchmarks/bench_ops.py [--device cpu|cuda|all] [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from skyloom import _C, ops, reference_ops

# bf16 dense tensor-core peaks (TFLOP/s) for the fraction-of-peak column
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def attention_flops(shape, mode: str, backward: bool) -> float:
    """Matmul FLOPs of a non-causal call: 4·rows·keys·head_dim per sequence forward."""
    B, T, S, heads, D = shape
    rows, keys, count = {"full": (T * S, T * S, 1), "spatial": (S, S, T), "temporal": (T, T, S)}[mode]
    flops = 4.0 * B * heads * count * rows * keys * D
    return flops * (3.5 if backward else 1.0)  # backward is ~2.5x the forward's matmuls


def attention_bytes(shape, element_size: int, backward: bool) -> float:
    """Bytes the op must move at least: forward reads q, k, v and writes out and lse; backward
    reads grad_out, q, k, v, out and lse and writes the three gradients."""
    B, T, S, heads, D = shape
    tensor, lse = B * T * S * heads * D * element_size, B * T * S * heads * 4
    forward = 4 * tensor + lse
    return forward + (8 * tensor + lse if backward else 0)


def emit(*lines: str) -> None:
    """Prints report lines as they are measured, so a run cut short keeps what it did."""
    for line in lines:
        print(line, flush=True)


# --- timing ------------------------------------------------------------------------------


def time_cpu(fns, repeats: int) -> tuple[list[float], list[float]]:
    """Median and best wall times (seconds) of callables measured in turn, after a warm-up of
    each, so that all of them see the same machine load."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times], [min(t) for t in times]


MATMUL_N = 2048  # fp32 torch.mm of MATMUL_N², the yardstick for attention's GFLOP/s


def matmul_case():
    """A callable doing one MATMUL_N² fp32 torch.mm, and its FLOPs: what a tuned BLAS gets from
    this machine's FMA units at the current thread count (a kernel whose tiles stay in cache
    can pass it somewhat)."""
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    return (lambda: a @ b), 2.0 * MATMUL_N**3


def time_cuda(fn, repeats: int) -> float:
    """Median CUDA-event time in seconds; warm-up, and L2 flushed before every timed call."""
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


# --- attention ---------------------------------------------------------------------------


def attention_cases(shape, mode, dtype, device, backward):
    """(ours, baseline) closures for one shape; baseline is what a user would otherwise write."""
    B, T, S, heads, D = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    grad = torch.randn(shape, generator=g, device=device, dtype=dtype)
    if mode == "full":  # SDPA's own layout, prepared outside the timed region: the strictest comparison
        qf, kf, vf = (x.detach().reshape(B, T * S, heads, D).transpose(1, 2).contiguous().requires_grad_(backward)
                      for x in (q, k, v))
        gradf = grad.reshape(B, T * S, heads, D).transpose(1, 2).contiguous()
        base_fwd = lambda: F.scaled_dot_product_attention(qf, kf, vf)  # noqa: E731
        base_grad = gradf
    else:
        base_fwd = lambda: reference_ops.spacetime_attention(q, k, v, mode)  # noqa: E731
        base_grad = grad
    ours_fwd = lambda: ops.spacetime_attention(q, k, v, mode)  # noqa: E731
    if not backward:
        return ours_fwd, base_fwd
    return (lambda: ours_fwd().backward(grad)), (lambda: base_fwd().backward(base_grad))


def bench_cpu(repeats: int, quick: bool) -> None:
    matmul, matmul_flops = matmul_case()
    emit(f"GFLOP/s: the attention's matmul FLOPs over its median time; matmul: the best of 3 fp32 torch.mm of "
         f"{MATMUL_N}² ({torch.get_num_threads()} threads) timed right after each row", "",
         "| op | shape (B, T, S, heads, D) | pass | skyloom ms | baseline ms | speed-up (medians) | "
         "speed-up (best) | skyloom GFLOP/s | baseline GFLOP/s | matmul GFLOP/s | skyloom of matmul | target |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|")
    shapes = {
        "full": [(1, 8, 256, 4, 64)] + ([] if quick else [(1, 16, 256, 8, 64)]),
        "spatial": [(1, 8, 256, 4, 64)] + ([] if quick else [(1, 16, 1024, 8, 64)]),
        "temporal": [(1, 8, 256, 4, 64)] + ([] if quick else [(1, 16, 1024, 8, 64)]),
    }
    for mode, mode_shapes in shapes.items():
        target = "≥ 1.0× SDPA" if mode == "full" else "≥ 1.5× permute→SDPA"
        for shape in mode_shapes:
            for backward in (False, True):
                ours, base = attention_cases(shape, mode, torch.float32, "cpu", backward)
                (t_ours, t_base), (b_ours, b_base) = time_cpu([ours, base], repeats)
                _, (b_mm,) = time_cpu([matmul], 3)  # right after, apart: between them it would evict their caches
                gflop, mm_gflops = attention_flops(shape, mode, backward) / 1e9, matmul_flops / b_mm / 1e9
                emit(f"| attention {mode} | {shape} | {'fwd+bwd' if backward else 'fwd'} | "
                     f"{t_ours * 1e3:.1f} | {t_base * 1e3:.1f} | {t_base / t_ours:.2f}× | {b_base / b_ours:.2f}× | "
                     f"{gflop / t_ours:.0f} | {gflop / t_base:.0f} | {mm_gflops:.0f} | "
                     f"{gflop / t_ours / mm_gflops:.0%} | {target} |")
    emit("", "| op | video (B, C, T, H, W), patch | skyloom GB/s | copy GB/s | fraction of copy (medians) | "
         "(best) | target |", "|---|---|---|---|---|---|---|")
    for shape, patch in [((1, 16, 16, 64, 64), (1, 2, 2)), ((2, 16, 21, 60, 104), (1, 2, 2))]:
        x = torch.randn(shape)
        moved = 2 * x.numel() * x.element_size()  # read once, written once
        (t_patch, t_copy), (b_patch, b_copy) = time_cpu([lambda: ops.patchify(x, patch), lambda: x.clone()],
                                                        3 * repeats)
        emit(f"| patchify fp32 | {shape}, {patch} | {moved / t_patch / 1e9:.1f} | {moved / t_copy / 1e9:.1f} | "
             f"{t_copy / t_patch:.2f} | {b_copy / b_patch:.2f} | ≥ 0.5 |")


def bench_cuda(repeats: int, quick: bool) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = torch.cuda.get_device_name()
    peak = next((p for key, p in PEAK_BF16_TFLOPS.items() if key in name), None)
    emit(f"CUDA device: {name}", "",
         "| mode | shape | pass | skyloom ms | TFLOP/s | of peak | GB/s | of copy | flash ms | cuDNN ms | "
         "speed-up vs best |", "|---|---|---|---|---|---|---|---|---|---|---|")
    configs = [(12, 64), (24, 64), (16, 128)] if not quick else [(12, 64)]
    for heads, D in configs:
        shape = (1, 21, 30 * 52, heads, D)
        # Temporal mode is memory-bound: judge it in GB/s against a device-to-device copy's.
        x = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
        copy_gbps = 2 * x.numel() * x.element_size() / time_cuda(lambda: x.clone(), repeats) / 1e9
        for mode in ("full", "spatial", "temporal"):
            for backward in (False, True):
                ours, base = attention_cases(shape, mode, torch.bfloat16, "cuda", backward)
                t_ours = time_cuda(ours, repeats)
                base_times = {}
                for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    try:
                        with sdpa_kernel(backend):
                            base_times[label] = time_cuda(base, repeats)
                    except RuntimeError:  # that backend does not run this shape/dtype
                        base_times[label] = float("nan")
                best = min((t for t in base_times.values() if t == t), default=float("nan"))
                tflops = attention_flops(shape, mode, backward) / t_ours / 1e12
                gbps = attention_bytes(shape, 2, backward) / t_ours / 1e9
                emit(
                    f"| {mode} | {shape} | {'fwd+bwd' if backward else 'fwd'} | {t_ours * 1e3:.2f} | {tflops:.0f} | "
                    f"{'' if peak is None else f'{tflops / peak:.0%}'} | {gbps:.0f} | {gbps / copy_gbps:.2f} | "
                    f"{base_times['flash'] * 1e3:.2f} | {base_times['cudnn'] * 1e3:.2f} | {best / t_ours:.2f}× |")
    for shape, patch in [((1, 16, 21, 60, 104), (1, 2, 2))]:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        moved = 2 * x.numel() * x.element_size()
        t_patch = time_cuda(lambda: ops.patchify(x, patch), repeats)
        t_copy = time_cuda(lambda: x.clone(), repeats)
        emit(f"| patchify bf16 {shape} {patch} | {moved / t_patch / 1e9:.0f} GB/s | copy "
             f"{moved / t_copy / 1e9:.0f} GB/s | {t_copy / t_patch:.2f} of copy |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="one shape per mode")
    args = parser.parse_args()
    print(f"# skyloom.ops benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, skyloom._C {_C.build_info()}, CPU kernels "
          f"{os.environ.get('SKYLOOM_CPU_CAPABILITY') or _C.cpu_capabilities()[0]} (of {_C.cpu_capabilities()}; "
          "unpinned, temporal T <= 8 runs avx2 on an avx512 CPU)")
    if args.device in ("cpu", "all"):
        bench_cpu(args.repeats, args.quick)
    if args.device in ("cuda", "all"):
        if torch.cuda.is_available():
            bench_cuda(args.repeats, args.quick)
        else:
            print("# no CUDA device: CUDA benchmarks skipped")


if __name__ == "__main__":
    main()
