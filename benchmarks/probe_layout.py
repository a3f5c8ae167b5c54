"""Does the prompt decide where an object starts, or does the starting noise?

In shapes world an object that moves down starts high up (it must stay visible while it
travels), so a model that follows "moves down" must place the object by the text before the
path is drawn. This probe renders one-object prompts that differ only in their direction word
(up/down, left/right) from the same seeds and reads them back with the evaluator's analyser:

- layout follows text: the share of same-seed pairs whose starting place, along the motion's
  axis, differs by at least an eighth of the frame; 0 % means the noise alone places objects;
- motion right, split by whether the object started where the data lets that motion start
  (in the half of the frame it moves away from, or anywhere else);
- at pure noise (t = 1) the best prediction of the clean latent is the mean over the data for
  that prompt, whatever the noise: the probe averages the model's prediction over several
  noises and reports how much it changes with the direction word against the colour word.

    python benchmarks/probe_layout.py [--model DIR] [--seeds 16] [--noises 6] [--guidance G] [--shift S]
"""

import argparse

import torch

from skyloom.pipeline import Pipeline
from skyloom.request import GenerationRequest
from skyloom.shapes_analysis import analyse

PAIRS = (("up", "down"), ("left", "right"))
OBJECTS = (("red", "circle", "black"), ("green", "triangle", "gray"), ("blue", "square", "navy"), ("white", "circle", "navy"))
SIZE, FRAMES = 64, 17


def prompt(colour: str, shape: str, direction: str, background: str) -> str:
    return f"a {colour} {shape} moves {direction} on a {background} background"


def start_and_motion(pipe: Pipeline, text: str, seed: int, axis: int, options: dict) -> tuple[float, str] | None:
    """(starting place along `axis` as a share of the frame, motion read back), or None when
    the analyser does not find exactly one object. options: more GenerationRequest fields."""
    frames = pipe(GenerationRequest(text, frames=FRAMES, width=SIZE, height=SIZE, seed=seed, **options)).frames
    objects = analyse(frames.numpy(), 8.0).objects
    if len(objects) != 1:
        return None
    _, x, y = objects[0].track[0]
    return (x, y)[axis] / SIZE, objects[0].motion


def layout_probe(pipe: Pipeline, seeds: int, options: dict) -> dict:
    pairs = differs = 0
    right = {"feasible": [0, 0], "infeasible": [0, 0]}  # [right, total]
    for first, second in PAIRS:
        axis = 0 if first == "left" else 1
        for seed in range(seeds):
            colour, shape, background = OBJECTS[seed % len(OBJECTS)]
            found = {d: start_and_motion(pipe, prompt(colour, shape, d, background), seed, axis, options) for d in (first, second)}
            for direction, result in found.items():
                if result is None:
                    continue
                start, motion = result
                # "up"/"left" leave from the far half (start > 0.5); "down"/"right" from the near half.
                feasible = (start > 0.5) == (direction in ("up", "left"))
                tally = right["feasible" if feasible else "infeasible"]
                tally[0] += motion == f"moves {direction}"
                tally[1] += 1
            if all(found.values()):
                pairs += 1
                differs += abs(found[first][0] - found[second][0]) >= 1 / 8
    return {"pairs": pairs, "layout_follows_text": differs / max(pairs, 1), "motion_right": right}


def mean_prediction_at_pure_noise(pipe: Pipeline, text: str, noises: int) -> torch.Tensor:
    """The transformer's clean-latent prediction at t = 1 (conditional branch), averaged over noises."""
    bundle = pipe.bundle
    latent_shape = bundle.video_autoencoder.latent_shape(FRAMES, SIZE, SIZE)
    text = pipe.prompt_enhancer[0].enhance(text) if pipe.prompt_enhancer else text
    emb = bundle.text_encoder.encode([text])
    known = torch.zeros((1, *latent_shape))
    known_mask = torch.zeros((1, latent_shape[1]))
    total = torch.zeros((1, *latent_shape))
    one = torch.ones(1)
    with torch.inference_mode():
        for seed in range(noises):
            noise = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(seed))
            velocity = bundle.transformer(noise, one, emb.tokens, emb.mask, known, known_mask).float()
            total += noise - velocity  # x0 = x_t - t·v at t = 1
    return total / noises


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Model directory (default: the embedded model).")
    parser.add_argument("--seeds", type=int, default=16, help="Seeds per direction pair.")
    parser.add_argument("--noises", type=int, default=6, help="Noises averaged at t = 1.")
    parser.add_argument("--guidance", type=float, default=None, help="Guidance scale (default: the model's).")
    parser.add_argument("--shift", type=float, default=None, help="Sampler timestep shift (default: the model's).")
    args = parser.parse_args()
    pipe = Pipeline.from_pretrained(args.model, watermarkers=[], safety_filters=[], audit_log=None)

    options = {} if args.guidance is None else {"guidance": args.guidance}
    if args.shift is not None:
        options["sampler_options"] = {"shift": args.shift}
    result = layout_probe(pipe, args.seeds, options)
    print(f"layout follows text: {100 * result['layout_follows_text']:.0f} % of {result['pairs']} same-seed pairs")
    for where, (hits, total) in result["motion_right"].items():
        print(f"motion right when the start is {where}: {hits}/{total}")

    down, up, blue = (mean_prediction_at_pure_noise(pipe, prompt(c, "circle", d, "black"), args.noises)
                      for c, d in (("red", "down"), ("red", "up"), ("blue", "down")))
    direction, colour = (down - up).std().item(), (down - blue).std().item()
    print(f"mean prediction at t = 1, std of the change: direction word {direction:.3f}, colour word {colour:.3f} "
          f"(ratio {direction / colour:.2f})")


if __name__ == "__main__":
    main()
