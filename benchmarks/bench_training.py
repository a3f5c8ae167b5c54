"""One transformer training step of a training config, eager against torch.compile'd blocks
(`transformer_training.compile`), side by side in one run.

A step is what `skyloom train` runs, on random data: forward under the config's mixed
precision, an MSE loss of the velocity's shape, backward, gradient clipping and an AdamW step.
The model is the config's transformer; the batches are three of the shapes-world buckets
(64x64 at 17 frames, 80x48 at 33, 48x80 at 9), with `batch_size` scaled as training scales it. Both
models start from the same weights; the compiled one is warmed up first, and its compile time
is printed.

Then the cross-attention to the text of each bucket, forward and backward in the config's
precision: skyloom's `text_attention` (plain matmuls) against F.scaled_dot_product_attention
with the same boolean mask, which the transformer used until 2026-12-06.

    python -m benchmarks.bench_training [--config configs/skyloom-tiny-shapes.json] [--repeats N]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench_ops import time_cpu_pair
from skyloom.registry import get_registry
from skyloom.training import clips_per_batch, load_config
from skyloom.transformer import DiTConfig, SpacetimeDiT, text_attention

BUCKETS = [(64, 64, 17), (80, 48, 33), (48, 80, 9)]  # (width, height, frames)
TEXT_TOKENS = 64  # MiniLM's padded prompt length; 24 of them real, about a training caption's


def training_step(dit: SpacetimeDiT, optimizer, batch: dict, bf16: bool):
    def step():
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            velocity = dit(batch["x_t"], batch["t"], batch["tokens"], batch["mask"])
        loss = F.mse_loss(velocity.float(), batch["target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        optimizer.step()

    return step


def attention_pass(attention, q, k, v, mask, bf16: bool):
    def run():
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            out = attention(q, k, v, mask)
        torch.autograd.grad(out.float().sum(), (q, k, v))

    return run


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).parent.parent / "configs" / "skyloom-tiny-shapes.json"),
                        help="training config whose transformer, mixed precision and batch_size are timed")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each, alternated")
    args = parser.parse_args()
    config = load_config(args.config)
    part = config["video_autoencoder"]
    vae = get_registry().create("video_autoencoder", part["plugin"], **part["config"])
    dit_config = DiTConfig.from_dict({"in_channels": vae.latent_channels, **config["transformer"]})  # text_dim: MiniLM's
    bf16 = config["mixed_precision"] == "bf16"
    batch_size = config["transformer_training"]["batch_size"]
    print(f"# transformer training step, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{Path(args.config).name}: hidden {dit_config.hidden_size}, depth {dit_config.depth}, patch {dit_config.patch_size}, "
          f"{'bf16' if bf16 else 'fp32'}, batch_size {batch_size}")

    torch.manual_seed(0)
    eager = SpacetimeDiT(dit_config).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()  # as skyloom train compiles them
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for m in (eager, compiled)]  # as skyloom train

    print("| bucket (W×H×frames) | clips | eager s/step | compiled s/step | speed-up (medians) | speed-up (best) |")
    print("|---|---|---|---|---|---|")
    for index, (width, height, frames) in enumerate(BUCKETS):
        B = clips_per_batch(batch_size, (width, height, frames))
        C, T, H, W = vae.latent_shape(frames, height, width)
        g = torch.Generator().manual_seed(index)
        mask = torch.zeros(B, TEXT_TOKENS, dtype=torch.bool)
        mask[:, :24] = True
        batch = {
            "x_t": torch.randn(B, C, T, H, W, generator=g), "t": torch.rand(B, generator=g),
            "tokens": torch.randn(B, TEXT_TOKENS, dit_config.text_dim, generator=g) * mask[..., None], "mask": mask,
            "target": torch.randn(B, C, T, H, W, generator=g),
        }
        step_eager = training_step(eager, optimizers[0], batch, bf16)
        step_compiled = training_step(compiled, optimizers[1], batch, bf16)
        if index == 0:
            start = time.perf_counter()
            step_compiled()
            print(f"# first compiled step (compiling): {time.perf_counter() - start:.1f} s", flush=True)
        t_eager, t_compiled, best = time_cpu_pair(step_eager, step_compiled, args.repeats)
        print(f"| {width}×{height}×{frames} | {B} | {t_eager:.3f} | {t_compiled:.3f} | {t_eager / t_compiled:.2f}× | {1 / best:.2f}× |", flush=True)

    print("\n| bucket (W×H×frames) | q (B, heads, N, d), L | SDPA fwd+bwd ms | text_attention fwd+bwd ms | speed-up (medians) | speed-up (best) |")
    print("|---|---|---|---|---|---|")
    heads, d = dit_config.num_heads, dit_config.head_dim
    for index, (width, height, frames) in enumerate(BUCKETS):
        B = clips_per_batch(batch_size, (width, height, frames))
        C, T, H, W = vae.latent_shape(frames, height, width)
        N = dit_config.num_tokens(T, H, W)
        g = torch.Generator().manual_seed(index)
        q = torch.randn(B, heads, N, d, generator=g).requires_grad_()
        k, v = (torch.randn(B, heads, TEXT_TOKENS, d, generator=g).requires_grad_() for _ in range(2))
        mask = torch.zeros(B, 1, 1, TEXT_TOKENS, dtype=torch.bool)
        mask[..., :24] = True
        ours, base = attention_pass(text_attention, q, k, v, mask, bf16), attention_pass(sdpa, q, k, v, mask, bf16)
        t_ours, t_base, best = time_cpu_pair(ours, base, args.repeats * 4)
        print(f"| {width}×{height}×{frames} | ({B}, {heads}, {N}, {d}), {TEXT_TOKENS} | {t_base * 1e3:.2f} | {t_ours * 1e3:.2f} "
              f"| {t_base / t_ours:.2f}× | {best:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
