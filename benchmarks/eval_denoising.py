"""At which noise level does the model lose what the prompt asks for? Each held-out prompt's
ground truth (drawn as `skyloom eval --reference` draws it) is encoded, noised to time s and
denoised back to 0 with Euler steps on the bundle's default time grid and guidance, then
decoded and scored as `skyloom eval` scores generations (the prompt goes through the bundle's
default prompt enhancer, as there). s = 0 scores the autoencoder alone; s = 1 starts from pure
noise, as text-to-video does. A figure that falls between two strengths is lost there.

    python benchmarks/eval_denoising.py [--bundle core/models/default] [--count 60] [--seed 0]
                                        [--strengths 0,0.3,0.5,0.7,1] [--guidance G]
"""

from __future__ import annotations

import argparse

import torch

from skyloom.bundle import DEFAULT_MODEL_DIR, load_bundle
from skyloom.evaluation import DEFAULT_SETTING, ReferenceGenerator, aggregate, build_prompts, clip_seed, score
from skyloom.registry import get_registry
from skyloom.request import check_guidance_interval
from skyloom.sampling import classifier_free_guidance, flow_time_grid, guided_at
from skyloom.shapes_analysis import analyse
from skyloom.shapes_world import FPS
from skyloom.training import DEFAULTS as TRAINING_DEFAULTS


def sampling_defaults(bundle) -> dict:
    """The bundle's generation defaults, with what `skyloom train` writes where a config is silent."""
    return {**TRAINING_DEFAULTS["defaults"], **bundle.defaults}


@torch.no_grad()
def denoise_from(bundle, frames: torch.Tensor, prompt: str, strength: float, seed: int, guidance: float | None = None) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> noised to `strength` in latent space, denoised (guidance: the
    bundle's default if None; at the times of the bundle's guidance interval), decoded, uint8."""
    vae, transformer = bundle.video_autoencoder, bundle.transformer
    defaults = sampling_defaults(bundle)
    guidance = defaults["guidance"] if guidance is None else guidance
    interval = check_guidance_interval(defaults.get("guidance_interval", (0.0, 1.0)))
    video = frames.permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W) in [-1, 1]
    clean = vae.encode(video)  # (1, C, T', H', W') normalised
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    sample = (1 - strength) * clean + strength * noise
    # The default grid's times below `strength`, starting at `strength` itself.
    grid = [t for t in flow_time_grid(defaults["steps"], defaults["shift"]).tolist() if t < strength]
    times = [strength, *grid] if strength > 0 else []
    emb = bundle.text_encoder.encode([prompt, ""])
    _, C, T, H, W = clean.shape
    nothing_known = (torch.zeros(2, C, T, H, W), torch.zeros(2, T))
    for t, t_next in zip(times[:-1], times[1:]):
        if guided_at(t, guidance, interval):
            v = transformer(sample.expand(2, -1, -1, -1, -1), torch.full((2,), t), emb.tokens, emb.mask, *nothing_known)
            velocity = classifier_free_guidance(v[:1], v[1:], guidance)
        else:
            velocity = transformer(sample, torch.full((1,), t), emb.tokens[:1], emb.mask[:1], *(x[:1] for x in nothing_known))
        sample = sample + (t_next - t) * velocity
    pixels = vae.decode(sample)[0].permute(1, 2, 3, 0)  # (T, H, W, 3) in [-1, 1]
    return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="model bundle directory (default: the embedded model)")
    parser.add_argument("--count", type=int, default=60, help="held-out prompts (half name two objects)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompt set and the noise, as skyloom eval --seed")
    parser.add_argument("--strengths", default="0,0.3,0.5,0.7,1", help="comma-separated noise levels in [0, 1]")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the bundle's)")
    args = parser.parse_args()
    try:
        strengths = [float(s) for s in args.strengths.split(",")]
    except ValueError:
        parser.error(f"--strengths must be comma-separated numbers in [0, 1], e.g. 0,0.5,1; got {args.strengths!r}")
    if args.count < 1 or not all(0 <= s <= 1 for s in strengths):
        parser.error(f"--count must be >= 1 and every strength in [0, 1], got {args.count} and {args.strengths}")

    registry = get_registry()
    bundle = load_bundle(args.bundle or DEFAULT_MODEL_DIR, registry)
    enhancer_name = bundle.defaults.get("prompt_enhancer")
    enhance = registry.create("prompt_enhancer", enhancer_name).enhance if enhancer_name else (lambda text: text)
    prompts = build_prompts(args.count, args.seed)
    truth = ReferenceGenerator(prompts)
    width, height, frames = DEFAULT_SETTING
    names = ["colour", "shape", "motion", "persistence", "binding", "count"]
    guidance = sampling_defaults(bundle)["guidance"] if args.guidance is None else args.guidance
    print(f"{bundle.name}, {len(prompts)} prompts at {width}x{height}, {frames} frames, guidance {guidance}")
    print(f"{'strength':>8}  " + "  ".join(f"{n:>11}" for n in names))
    for strength in strengths:
        records = []
        for prompt in prompts:
            seed = clip_seed(args.seed, prompt.index)
            clip = truth(prompt.text, width, height, frames, seed)
            out = denoise_from(bundle, clip, enhance(prompt.text), strength, seed, args.guidance)
            records.append({"score": score(analyse(out, FPS), prompt)})
        metrics = aggregate(records)["metrics"]
        print(f"{strength:>8.2f}  " + "  ".join(f"{metrics[n]:>11}" for n in names), flush=True)


if __name__ == "__main__":
    main()
