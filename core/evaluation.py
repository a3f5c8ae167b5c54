"""Prompt adherence: generate from a held-out prompt set, read every clip with the shapes-world
analyser (skyloom.shapes_analysis) and score it against the prompt's ground truth.

    from skyloom.evaluation import build_prompts, evaluate, format_table, pipeline_generator
    from skyloom.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("path/to/model")
    report = evaluate(pipeline_generator(pipe), build_prompts(120, seed=0), [(64, 64, 17)])
    print(format_table(report))        # report is JSON-ready; docs/evaluation.md has its schema

The prompts are built by code from a seed, in phrasings the `shapes` captioner never writes
(so a model is not scored on sentences it was trained on), and a fixed share of them hold the
combinations training never shows (shapes_world.HELD_OUT). Colour and shape words stay the
vocabulary's own: the analyser names those. `skyloom eval` is the command over this module.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from skyloom.shapes_analysis import VideoAnalysis, analyse
from skyloom.shapes_world import BACKGROUNDS, COLOURS, FPS, HELD_OUT, MOTIONS, SHAPES, is_held_out

DEFAULT_COUNT = 120
MIN_COUNT = 100  # the targets are measured on at least this many prompts
HELD_OUT_SHARE = 0.25  # of the one-object and of the two-object prompts, each: hold a held-out object
DEFAULT_SETTING = (64, 64, 17)  # (width, height, frames) the targets are set at
# Targets (percent) at DEFAULT_SETTING; at any other setting each is OTHER_SETTING_SLACK lower.
TARGETS = {"colour": 95.0, "shape": 80.0, "motion": 90.0, "persistence": 95.0, "binding": 70.0}
OTHER_SETTING_SLACK = 10.0
REPORT_FORMAT, REPORT_VERSION = "skyloom-eval", 1

# --- prompts -----------------------------------------------------------------------------

# Phrasings of each motion the `shapes` captioner never uses (tests/test_evaluation.py checks
# against its lists), each readable by the `caption-style` enhancer. Participles follow a noun
# ("a red circle heading left"), adjectives precede it ("a motionless red circle").
MOTION_PARTICIPLES = {
    "moves left": ("heading left", "going to the left", "making its way left", "edging leftwards",
                   "sliding toward the left side"),
    "moves right": ("heading right", "going to the right", "making its way right", "edging rightwards",
                    "sweeping toward the right"),
    "moves up": ("climbing", "heading up", "ascending", "going upwards", "rising toward the top"),
    "moves down": ("dropping", "heading down", "descending", "going downwards", "sinking toward the bottom"),
    "stays still": ("at rest", "holding still", "not moving at all", "frozen in place", "keeping perfectly still"),
}  # fmt: skip
MOTION_ADJECTIVES = {
    "moves left": ("left-moving",),
    "moves right": ("right-moving",),
    "moves up": ("rising", "climbing", "ascending"),
    "moves down": ("descending", "dropping", "sinking"),
    "stays still": ("motionless", "stationary", "unmoving"),
}
ARTICLES = ("a", "a single")
# {o1}: "a red circle"; {p1}: a participle; {a1}: "a motionless red circle"; {bg}: a background name.
ONE_OBJECT_TEMPLATES = (
    "{o1} {p1}, over a {bg} backdrop.",
    "Against {bg}, {o1} is {p1}.",
    "{a1} against plain {bg}.",
    "Seen on solid {bg}: {o1} {p1}.",
    "{a1}, alone in front of a {bg} wall.",
)
TWO_OBJECT_TEMPLATES = (
    "{o1} {p1} and {o2} {p2}, over a {bg} backdrop.",
    "Against {bg}, {o1} is {p1} as {o2} is {p2}.",
    "{o1} {p1}, with {o2} {p2} nearby, against plain {bg}.",
    "A pair of shapes in front of a {bg} wall: {o1} {p1}, {o2} {p2}.",
    "{a1} and {a2} on solid {bg}.",
    "Over a {bg} backdrop, {a1} next to {o2} {p2}.",
)


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt and its ground truth. objects: ({colour, shape, motion}, ...) in the order the
    text names them; two objects always differ in colour or shape."""

    index: int
    text: str
    objects: tuple[dict, ...]
    background: str

    @property
    def held_out(self) -> bool:
        """True when an object is a combination training never shows (shapes_world.is_held_out)."""
        return any(is_held_out(o) for o in self.objects)

    def as_dict(self) -> dict:
        return {"index": self.index, "text": self.text, "objects": [dict(o) for o in self.objects],
                "background": self.background, "held_out": self.held_out}  # fmt: skip


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _draw_object(rng: np.random.Generator, combo: dict | None) -> dict:
    """Uniform {colour, shape, motion}: matching `combo` (a HELD_OUT entry), or, for None, held out in no way."""
    while True:
        obj = {
            "colour": list(COLOURS)[rng.integers(len(COLOURS))],
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "motion": list(MOTIONS)[rng.integers(len(MOTIONS))],
            **(combo or {}),
        }
        if combo is not None or not is_held_out(obj):
            return obj


def _phrase(rng: np.random.Generator, objects: list[dict], background: str) -> str:
    def pick(options):
        return options[rng.integers(len(options))]

    slots = {"bg": background}
    for number, obj in enumerate(objects, start=1):
        noun = f"{obj['colour']} {obj['shape']}"
        slots[f"o{number}"] = f"{pick(ARTICLES)} {noun}"
        slots[f"p{number}"] = pick(MOTION_PARTICIPLES[obj["motion"]])
        slots[f"a{number}"] = f"{pick(ARTICLES)} {pick(MOTION_ADJECTIVES[obj['motion']])} {noun}"
    text = pick(ONE_OBJECT_TEMPLATES if len(objects) == 1 else TWO_OBJECT_TEMPLATES).format(**slots)
    return text[0].upper() + text[1:]


def build_prompts(count: int = DEFAULT_COUNT, seed: int = 0) -> list[EvalPrompt]:
    """The held-out prompt set: `count` prompts, the same for the same (count, seed).

    Even indices hold one object, odd ones two. Of each group, ceil(HELD_OUT_SHARE · size) prompts
    (chosen by the seed) hold exactly one held-out object, cycling through HELD_OUT so every
    combination appears; the other prompts hold none. Every prompt names its background.
    """
    count, seed = _check_int("count", count, 1), _check_int("seed", seed, 0)
    rng = np.random.default_rng([seed, 0xE7A1])
    groups = [list(range(0, count, 2)), list(range(1, count, 2))]
    held = {}  # prompt index -> HELD_OUT combination
    for group in groups:
        chosen = sorted(rng.choice(group, size=math.ceil(HELD_OUT_SHARE * len(group)), replace=False)) if group else []
        held.update({int(i): HELD_OUT[k % len(HELD_OUT)] for k, i in enumerate(chosen)})
    prompts = []
    for index in range(count):
        objects = [_draw_object(rng, held.get(index))]
        if index % 2:
            while True:
                other = _draw_object(rng, None)
                if (other["colour"], other["shape"]) != (objects[0]["colour"], objects[0]["shape"]):
                    break
            objects.insert(int(rng.integers(2)), other)
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        prompts.append(EvalPrompt(index, _phrase(rng, objects, background), tuple(objects), background))
    return prompts


# --- scoring -----------------------------------------------------------------------------

ATTRIBUTES = ("colour", "shape", "motion")


def match(expected: Sequence[dict], found: Sequence) -> list[int | None]:
    """For each expected object, the index of its detected object (ObjectAnalysis), or None.

    Hungarian assignment maximising attribute agreement (how many of colour, shape, motion are
    right); ties go to agreeing shape, then motion, then colour (so swapped colours read as wrong
    colours, not wrong shapes), then to the more persistent detection. A detection that agrees in
    nothing is no match: the expected object is missing.
    """
    if not expected or not found:
        return [None] * len(expected)
    weight = 8 * len(expected)  # larger than any sum of the tie-breaks below
    value = np.zeros((len(expected), len(found)))
    for i, want in enumerate(expected):
        for j, obj in enumerate(found):
            s, m, c = obj.shape == want["shape"], obj.motion == want["motion"], obj.colour == want["colour"]
            if s or m or c:
                value[i, j] = weight * (s + m + c) + 4 * s + 2 * m + c + 0.1 * obj.persistence
    rows, cols = linear_sum_assignment(value, maximize=True)
    matched: list[int | None] = [None] * len(expected)
    for i, j in zip(rows, cols):
        if value[i, j] > 0:
            matched[i] = int(j)
    return matched


def score(analysis: VideoAnalysis, expected: EvalPrompt | dict) -> dict:
    """How one clip's analysis agrees with its prompt's ground truth (an EvalPrompt, or a dict
    with objects and background). JSON-ready:

    objects: per expected object {colour, shape, motion, persistent (bool), expected (its
    colour, shape and motion), found (the matched detection's attributes and persistence, or
    None)}; persistent means seen in every frame;
    bound: two-object prompts only (else None), both objects found with the right colour, shape
    and motion; extra_objects: detections matched to nothing; count: as many detections as
    objects; exact: the detections' (colour, shape, motion) are exactly the expected ones;
    background: named right; flicker: the analysis' frame-to-frame background flicker.
    """
    objects = list(expected.objects if isinstance(expected, EvalPrompt) else expected["objects"])
    background = expected.background if isinstance(expected, EvalPrompt) else expected["background"]
    found = analysis.objects
    per_object = []
    for want, j in zip(objects, match(objects, found)):
        obj = found[j] if j is not None else None
        entry = {name: obj is not None and getattr(obj, name) == want[name] for name in ATTRIBUTES}
        entry["persistent"] = obj is not None and obj.persistence >= 1.0
        entry["expected"] = {name: want[name] for name in ATTRIBUTES}
        entry["found"] = None if obj is None else {**obj.attributes, "persistence": round(obj.persistence, 4)}
        per_object.append(entry)
    triples = sorted((o["colour"], o["shape"], o["motion"]) for o in objects)
    return {
        "objects": per_object,
        "bound": all(all(e[n] for n in ATTRIBUTES) for e in per_object) if len(objects) == 2 else None,
        "extra_objects": len(found) - sum(e["found"] is not None for e in per_object),
        "count": len(found) == len(objects),
        "exact": sorted((o.colour, o.shape, o.motion) for o in found) == triples,
        "background": analysis.background == background,
        "flicker": round(float(analysis.flicker), 4),
    }


# --- generators --------------------------------------------------------------------------

# generate(prompt_text, width, height, frames, seed) -> (T, H, W, 3) uint8 frames (tensor or
# array), or a GenerationResult (its .frames; its record's enhanced prompt is kept).
Generator = Callable[[str, int, int, int, int], object]


class PipelineGenerator:
    """A Generator over a Pipeline: the pipeline's plugins as constructed (build it with the
    default prompt_enhancer, as `skyloom generate` does), the bundle's default sampler, steps,
    guidance and guidance interval unless given here, no upscaling. Returns GenerationResults."""

    def __init__(self, pipe, steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                 guidance_interval: tuple[float, float] | None = None):
        self.pipe, self.steps, self.guidance, self.sampler = pipe, steps, guidance, sampler
        self.guidance_interval = guidance_interval

    def request(self, prompt: str, width: int, height: int, frames: int, seed: int):
        from skyloom.request import GenerationRequest

        return GenerationRequest(prompt, frames=frames, width=width, height=height, seed=seed, steps=self.steps,
                                 guidance=self.guidance, guidance_interval=self.guidance_interval, sampler=self.sampler)  # fmt: skip

    def check(self, width: int, height: int, frames: int) -> None:
        """Raise RequestError (or UnknownPluginError) now if this setting cannot be generated."""
        self.pipe._prepare(self.request("check", width, height, frames, 0))

    def describe(self) -> dict:
        """What generates: the model, sampler, steps, guidance (and its interval) and prompt enhancer in effect."""
        from skyloom.request import check_guidance_interval

        pipe, bundle = self.pipe, self.pipe.bundle
        return {
            "model": {"name": bundle.name, "path": str(bundle.path), "hash": bundle.model_hash, "trained": bundle.trained},
            "sampler": self.sampler or (pipe.sampler if isinstance(pipe.sampler, str) else pipe.defaults.get("sampler", "euler")),
            "steps": self.steps if self.steps is not None else pipe.defaults.get("steps"),
            "guidance": self.guidance if self.guidance is not None else pipe.defaults.get("guidance"),
            "guidance_interval": list(check_guidance_interval(self.guidance_interval or pipe.defaults.get("guidance_interval", (0.0, 1.0)))),
            "prompt_enhancer": pipe.prompt_enhancer[1]["name"] if pipe.prompt_enhancer else None,
            "device": str(pipe.device),
        }

    def __call__(self, prompt: str, width: int, height: int, frames: int, seed: int):
        return self.pipe(self.request(prompt, width, height, frames, seed), progress=False)


class ContinuationGenerator(PipelineGenerator):
    """A PipelineGenerator that is given the first `known_frames` frames of each prompt's ground
    truth (drawn as ReferenceGenerator draws it) and generates the rest: 1 known frame scores
    image-to-video, more score extension. The scores separate what the model does with a scene
    it is shown from what it does when it must also compose the scene from the text."""

    def __init__(self, pipe, prompts: Iterable[EvalPrompt], known_frames: int, **options):
        super().__init__(pipe, **options)
        if known_frames < 1:
            raise ValueError(f"known_frames must be at least 1, got {known_frames}")
        self.truth, self.known_frames = ReferenceGenerator(prompts), known_frames

    def check(self, width: int, height: int, frames: int) -> None:
        if self.known_frames >= frames:
            raise ValueError(f"--known-frames {self.known_frames} leaves nothing to generate in {frames}-frame clips; give fewer than {frames}")
        super().check(width, height, frames)

    def describe(self) -> dict:
        return {**super().describe(), "known_frames": self.known_frames}

    def __call__(self, prompt: str, width: int, height: int, frames: int, seed: int):
        from skyloom.request import Conditioning

        known = self.truth(prompt, width, height, frames, seed)[: self.known_frames]  # (known, H, W, 3) uint8
        request = replace(self.request(prompt, width, height, frames, seed), conditioning=(Conditioning(known),))
        return self.pipe(request, progress=False)


def pipeline_generator(pipe, steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                       guidance_interval: tuple[float, float] | None = None) -> PipelineGenerator:
    """The Generator that scores `pipe` (a skyloom.pipeline.Pipeline); None keeps the bundle's default."""
    return PipelineGenerator(pipe, steps=steps, guidance=guidance, sampler=sampler, guidance_interval=guidance_interval)


class ReferenceGenerator:
    """Draws each prompt's ground truth with the dataset renderer (skyloom.datasets.shapes): what
    a perfect model would make, so its scores are the ceiling the analyser allows."""

    def __init__(self, prompts: Iterable[EvalPrompt]):
        self.truth = {p.text: p for p in prompts}

    def describe(self) -> dict:
        return {"reference": True}

    def __call__(self, prompt: str, width: int, height: int, frames: int, seed: int):
        from skyloom.datasets.shapes import JITTER, lay_out, render

        truth = self.truth[prompt]
        rng = np.random.default_rng([seed, width, height, frames])
        objects = []
        for obj in truth.objects:
            rgb = np.clip(np.array(COLOURS[obj["colour"]]) + rng.integers(-JITTER, JITTER + 1, 3), 0, 255)
            objects.append({**obj, "rgb": tuple(int(c) for c in rgb)})
        for _ in range(20):
            scene = lay_out(rng, objects, width=width, height=height, frames=frames, background=truth.background)
            if scene is not None:
                return render(scene)
        raise ValueError(f"no layout keeps the objects of {prompt!r} apart at {width}x{height}")


# --- running -----------------------------------------------------------------------------


def clip_seed(seed: int, index: int) -> int:
    """The generation seed of prompt `index`: the same at every setting, so settings compare."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _video_path(directory: Path, setting: tuple[int, int, int], index: int) -> Path:
    width, height, frames = setting
    return Path(directory) / f"{width}x{height}_{frames}f" / f"{index:04d}.mp4"


def iter_scores(
    generate: Generator,
    prompts: Sequence[EvalPrompt],
    settings: Sequence[tuple[int, int, int]] = (DEFAULT_SETTING,),
    *,
    seed: int = 0,
    videos: str | Path | None = None,
    progress: bool = False,
) -> Iterator[dict]:
    """One record per (setting, prompt), setting by setting, as each clip is scored.

    settings: (width, height, frames) each. seed: mixed with the prompt index into each clip's
    generation seed (clip_seed). videos: also write each clip to
    videos/WxH_Tf/NNNN.mp4 (a GenerationResult is saved with its signed provenance).
    generate.check(width, height, frames), when it exists, is called for every setting first,
    so a setting that cannot be generated fails before any work.
    """
    settings = [tuple(int(v) for v in s) for s in settings]
    for setting in settings:
        if hasattr(generate, "check"):
            generate.check(*setting)
    from tqdm import tqdm

    from skyloom.pipeline import SafetyRefusal
    from skyloom.video_io import write_video

    with tqdm(total=len(settings) * len(prompts), unit="clip", desc="eval", disable=not progress, leave=False) as bar:
        for setting in settings:
            width, height, frames = setting
            for prompt in prompts:
                record = {"setting": list(setting), "prompt": prompt.index, "seed": clip_seed(seed, prompt.index)}
                started = time.perf_counter()
                try:
                    output = generate(prompt.text, width, height, frames, record["seed"])
                except SafetyRefusal as refusal:  # scored as a clip with nothing in it
                    record.update(error=str(refusal), seconds=round(time.perf_counter() - started, 4))
                    record["score"] = score(_EMPTY, prompt)
                    yield record
                    bar.update(1)
                    continue
                clip = getattr(output, "frames", output)
                generated = time.perf_counter()
                enhanced = getattr(output, "record", {}).get("enhanced_prompt")
                if enhanced is not None:
                    record["enhanced_prompt"] = enhanced
                analysis = analyse(clip, FPS)
                record["score"] = score(analysis, prompt)
                record["found"] = [{**o.attributes, "persistence": round(o.persistence, 4)} for o in analysis.objects]
                record["found_background"] = analysis.background
                record["seconds"] = round(time.perf_counter() - started, 4)
                record["generate_seconds"] = round(generated - started, 4)
                if videos is not None:
                    path = _video_path(videos, setting, prompt.index)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if hasattr(output, "save"):
                        output.save(path)
                    else:
                        write_video(path, clip, FPS)
                yield record
                bar.update(1)


class _EmptyAnalysis:  # what a refused request shows: nothing, on no named background
    objects = ()
    background = None
    flicker = 0.0


_EMPTY = _EmptyAnalysis()


def _percent(right: int, total: int) -> float | None:
    return round(100.0 * right / total, 2) if total else None


def confusion(objects: list[dict]) -> dict[str, dict[str, dict[str, int]]]:
    """Per attribute, how often each expected value was found as each value ("missing": no
    detection matched), e.g. confusion["shape"]["square"] == {"circle": 44, "triangle": 8,
    "square": 2, "missing": 3}."""
    table: dict[str, dict[str, dict[str, int]]] = {name: {} for name in ATTRIBUTES}
    for o in objects:
        for name in ATTRIBUTES:
            row = table[name].setdefault(o["expected"][name], {})
            found = o["found"][name] if o["found"] is not None else "missing"
            row[found] = row.get(found, 0) + 1
    return table


def aggregate(records: list[dict]) -> dict:
    """Accuracies (percent; None with nothing to count), their [right, of] counts, what each
    expected attribute value was found as (confusion), flicker, extras."""
    objects = [o for r in records for o in r["score"]["objects"]]
    bound = [r["score"]["bound"] for r in records if r["score"]["bound"] is not None]
    counts = {
        "colour": [sum(o["colour"] for o in objects), len(objects)],
        "shape": [sum(o["shape"] for o in objects), len(objects)],
        "motion": [sum(o["motion"] for o in objects), len(objects)],
        "persistence": [sum(o["persistent"] for o in objects), len(objects)],
        "binding": [sum(bound), len(bound)],
        "background": [sum(r["score"]["background"] for r in records), len(records)],
        "count": [sum(r["score"]["count"] for r in records), len(records)],
        "exact": [sum(r["score"]["exact"] for r in records), len(records)],
    }
    metrics = {name: _percent(*pair) for name, pair in counts.items()}
    metrics["flicker"] = round(float(np.mean([r["score"]["flicker"] for r in records])), 3) if records else None
    metrics["extra_objects"] = round(float(np.mean([r["score"]["extra_objects"] for r in records])), 3) if records else None
    return {"prompts": len(records), "objects": len(objects), "metrics": metrics, "counts": counts,
            "confusion": confusion(objects)}  # fmt: skip


def _colours(prompt: EvalPrompt) -> int | None:
    """How many colours a two-object prompt names (1 or 2); None for any other prompt."""
    return len({o["colour"] for o in prompt.objects}) if len(prompt.objects) == 2 else None


def targets_for(setting: tuple[int, int, int]) -> dict[str, float]:
    """The issue's targets at a setting: TARGETS at DEFAULT_SETTING, OTHER_SETTING_SLACK lower elsewhere."""
    slack = 0.0 if tuple(setting) == DEFAULT_SETTING else OTHER_SETTING_SLACK
    return {name: value - slack for name, value in TARGETS.items()}


def summarise(
    records: Sequence[dict],
    prompts: Sequence[EvalPrompt],
    settings: Sequence[tuple[int, int, int]],
    *,
    complete: bool = True,
    generator: dict | None = None,
    seed: int | None = None,
) -> dict:
    """The JSON-ready report of scored records (iter_scores), one entry per setting, with
    breakdowns by subset (one_object, two_objects and those of one or two colours, held_out,
    seen) and the targets' status."""
    by_prompt = {p.index: p for p in prompts}
    entries = []
    for setting in settings:
        setting = tuple(int(v) for v in setting)
        mine = [r for r in records if tuple(r["setting"]) == setting]
        subsets = {
            "one_object": [r for r in mine if len(by_prompt[r["prompt"]].objects) == 1],
            "two_objects": [r for r in mine if len(by_prompt[r["prompt"]].objects) == 2],
            # Two objects of one colour cannot be told apart by colour, in the picture or in
            # the prompt: their own figures show whether a model keeps them apart.
            "two_objects_one_colour": [r for r in mine if _colours(by_prompt[r["prompt"]]) == 1],
            "two_objects_two_colours": [r for r in mine if _colours(by_prompt[r["prompt"]]) == 2],
            "held_out": [r for r in mine if by_prompt[r["prompt"]].held_out],
            "seen": [r for r in mine if not by_prompt[r["prompt"]].held_out],
        }
        entry = {"width": setting[0], "height": setting[1], "frames": setting[2], **aggregate(mine)}
        entry["seconds_per_clip"] = round(float(np.mean([r["seconds"] for r in mine])), 4) if mine else None
        entry["subsets"] = {name: aggregate(rs) for name, rs in subsets.items()}
        entry["targets"] = {
            name: {"target": target, "met": None if entry["metrics"][name] is None else entry["metrics"][name] >= target}
            for name, target in targets_for(setting).items()
        }
        entries.append(entry)
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "complete": complete,
        "generator": generator or {},
        "prompt_set": {
            "count": len(prompts),
            "seed": seed,
            "one_object": sum(len(p.objects) == 1 for p in prompts),
            "two_objects": sum(len(p.objects) == 2 for p in prompts),
            "held_out": sum(p.held_out for p in prompts),
            "enough_for_targets": len(prompts) >= MIN_COUNT,
        },
        "settings": entries,
        "prompts": [p.as_dict() for p in prompts],
        "records": list(records),
    }


def evaluate(
    generate: Generator,
    prompts: Sequence[EvalPrompt],
    settings: Sequence[tuple[int, int, int]] = (DEFAULT_SETTING,),
    *,
    seed: int = 0,
    videos: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Generate and score every prompt at every setting; the report of `summarise`."""
    records = list(iter_scores(generate, prompts, settings, seed=seed, videos=videos, progress=progress))
    describe = getattr(generate, "describe", None)
    return summarise(records, prompts, settings, generator=describe() if describe else None, seed=seed)


# --- table -------------------------------------------------------------------------------

TABLE_COLUMNS = ("colour", "shape", "motion", "persistence", "binding", "background", "flicker")


def format_table(report: dict) -> str:
    """One row per setting: accuracies in percent (`*` marks one below its target, `-` nothing
    to count) and the mean flicker in 0..255 levels."""
    header = ["setting", "prompts", *TABLE_COLUMNS]
    rows = []
    for entry in report["settings"]:
        metrics = entry["metrics"]
        known = (report.get("generator") or {}).get("known_frames")
        given = f", first {known} given" if known else ""  # the targets are text-to-video's
        row = [f"{entry['width']}x{entry['height']}, {entry['frames']}f{given}", str(entry["prompts"])]
        for name in TABLE_COLUMNS:
            value = metrics[name]
            if value is None:
                row.append("-")
            elif name == "flicker":
                row.append(f"{value:.2f}")
            else:
                below = entry["targets"].get(name, {}).get("met") is False
                row.append(f"{value:.1f}" + ("*" if below else ""))
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
    default = ", ".join(f"{name} {value:g}" for name, value in TARGETS.items())
    lines.append(f"targets at {DEFAULT_SETTING[0]}x{DEFAULT_SETTING[1]}, {DEFAULT_SETTING[2]}f: {default}; "
                 f"{OTHER_SETTING_SLACK:g} points lower at other settings; * below target")  # fmt: skip
    return "\n".join(lines)
