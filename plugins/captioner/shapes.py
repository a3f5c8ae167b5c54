"""`shapes` captioner: describes a shapes-world clip from its pixels, in many phrasings.

Sora's recipe re-captions every training clip with a detailed caption; varying the wording
(templates, synonyms, word order) keeps the model from tying a concept to one sentence. The
facts come from skyloom.shapes_analysis (colour, shape and motion of each object, the
background); only the words vary. The phrasing is drawn from a seed: the `seed` config when
given, else a hash of the frames' bytes, so re-captioning one clip always gives one caption.
Shape and colour words are always the vocabulary's own (shapes_world), so they stay findable.
"""

from __future__ import annotations

import hashlib
import random

from skyloom.hookspecs import hookimpl
from skyloom.kinds import Captioner
from skyloom.shapes_analysis import VideoAnalysis, analyse, canonical_caption
from skyloom.video_io import as_frames

# Each motion in several phrasings; each keeps its direction word (left, right, up, down, still)
# or a verb that names it outright (rises, falls), so a reader or a parser can recover it.
MOTION_PHRASES = {
    "moves left": ("moves left", "travels to the left", "slides leftward", "drifts to the left", "glides left"),
    "moves right": ("moves right", "travels to the right", "slides rightward", "drifts to the right", "glides right"),
    "moves up": ("moves up", "rises", "travels upward", "floats up", "drifts upward"),
    "moves down": ("moves down", "falls", "sinks downward", "travels downward", "drops down"),
    "stays still": ("stays still", "stays in place", "remains still", "does not move", "sits motionless"),
}

ONE_OBJECT = (
    "{o1} {m1} on a {bg} background.",
    "On a {bg} background, {o1} {m1}.",
    "A plain {bg} background with {o1} that {m1}.",
    "{o1} {m1} against a {bg} backdrop.",
    "The video shows {o1} that {m1} over a {bg} background.",
)
TWO_OBJECTS = (
    "{o1} {m1} while {o2} {m2} on a {bg} background.",
    "On a {bg} background, {o1} {m1} and {o2} {m2}.",
    "Two shapes on a {bg} background: {o1} {m1}, and {o2} {m2}.",
    "{o1} {m1}; meanwhile {o2} {m2}, against a {bg} backdrop.",
    "The video shows {o1} that {m1} and {o2} that {m2} over a {bg} background.",
)
MANY_OBJECTS = ("{objects} on a {bg} background.", "On a {bg} background, {objects}.")
NO_OBJECTS = (
    "An empty {bg} background.",
    "A plain {bg} background with nothing on it.",
    "Nothing moves on a {bg} background.",
)
ARTICLES = ("a", "one")
# Share of captions in the canonical phrasing (the first of every list above), which is the one
# the `caption-style` enhancer writes: prompts enhanced that way then read as training captions.
CANONICAL_SHARE = 0.25


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


class ShapesCaptioner(Captioner):
    """Captions shapes-world clips. seed: fixes the phrasing; None derives it from the frames."""

    def __init__(self, seed: int | None = None):
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.seed = seed

    def caption(self, frames, fps: float) -> str:
        array = as_frames(frames)
        return self.describe(analyse(array, fps), seed=self._seed_for(array))

    def captions(self, frames, fps: float, count: int) -> list[str]:
        """`count` phrasings of one reading of the video (it is analysed once)."""
        array = as_frames(frames)
        analysis, seed = analyse(array, fps), self._seed_for(array)
        return [self.describe(analysis, seed=seed + k) for k in range(count)]

    def _seed_for(self, array) -> int:
        if self.seed is not None:
            return self.seed
        digest = hashlib.sha256(repr(array.shape).encode() + array.tobytes()).digest()
        return int.from_bytes(digest[:8], "little")

    @staticmethod
    def describe(analysis: VideoAnalysis, seed: int = 0) -> str:
        """The caption of an analysis, phrased by `seed` (same seed, same words)."""
        rng = random.Random(seed)
        if rng.random() < CANONICAL_SHARE:
            return canonical_caption(analysis.objects, analysis.background)
        bg = analysis.background
        nouns, verbs = [], []
        for obj in analysis.objects:
            noun = f"{obj.colour} {obj.shape}"
            article = rng.choice(ARTICLES)
            nouns.append(f"{'an' if article == 'a' and noun[0] in 'aeiou' else article} {noun}")
            verbs.append(rng.choice(MOTION_PHRASES[obj.motion]))
        if not nouns:
            return rng.choice(NO_OBJECTS).format(bg=bg)
        if len(nouns) == 1:
            return _capitalise(rng.choice(ONE_OBJECT).format(o1=nouns[0], m1=verbs[0], bg=bg))
        if len(nouns) == 2:
            return _capitalise(
                rng.choice(TWO_OBJECTS).format(o1=nouns[0], m1=verbs[0], o2=nouns[1], m2=verbs[1], bg=bg)
            )
        clauses = [f"{n} {v}" for n, v in zip(nouns, verbs)]
        joined = ", ".join(clauses[:-1]) + f" and {clauses[-1]}"
        return _capitalise(rng.choice(MANY_OBJECTS).format(objects=joined, bg=bg))


@hookimpl
def register_captioners(register) -> None:
    register("shapes", ShapesCaptioner)
