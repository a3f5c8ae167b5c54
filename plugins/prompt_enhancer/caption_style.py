"""`caption-style` prompt enhancer: rewrites a short prompt into the training captions' style.

"red circle going left" -> "A red circle moves left on a black background." The model learnt
from captions written by the `shapes` captioner; a prompt phrased the same way lands where the
training data was. The enhancer parses colours, shapes, motions and the background (with
synonyms: "ball", "box", "rising", "grey", ...) and writes the canonical caption
(skyloom.shapes_analysis.canonical_caption).
Deterministic and offline; its own output is a fixed point (enhancing twice changes nothing).

Defaults, where the prompt says nothing:
- motion: "stays still". Every training caption states a motion, and a prompt that names
  none most plausibly wants none;
- background: `default_background`, black unless configured (None leaves it out). Every
  training caption names one, and a prompt without one is read as the start of a two-object
  caption: with it left out, the embedded v27 drew "a red circle moves left" as two circles
  for 15 of 20 seeds, with "on a black background" added for none (docs/performance.md, "A
  prompt without a background"). Say "on a navy background" to pick another;
- colour and shape: never invented. An object named only by colour becomes "a red shape".
A prompt with neither a shape nor an object colour in it is returned unchanged.
"""

from __future__ import annotations

import re

from skyloom.hookspecs import hookimpl
from skyloom.kinds import PromptEnhancer
from skyloom.shapes_analysis import canonical_caption
from skyloom.shapes_world import BACKGROUNDS, COLOURS, MOTIONS, SHAPES

SHAPE_WORDS = {
    **{s: s for s in SHAPES},
    **{s + "s": s for s in SHAPES},
    "disc": "circle", "disk": "circle", "ball": "circle", "dot": "circle", "ring": "circle", "orb": "circle",
    "box": "square", "block": "square", "cube": "square", "rectangle": "square", "tile": "square",
    "triangular": "triangle", "pyramid": "triangle", "wedge": "triangle",
}  # fmt: skip
COLOUR_WORDS = {
    **{c: c for c in COLOURS},
    "scarlet": "red", "crimson": "red", "lime": "green", "emerald": "green", "azure": "blue",
    "cyan": "blue", "gold": "yellow", "golden": "yellow", "violet": "purple", "magenta": "purple",
}  # fmt: skip
BACKGROUND_WORDS = {**{b: b for b in BACKGROUNDS}, "grey": "gray"}
MOTION_WORDS = {
    **dict.fromkeys(("left", "leftward", "leftwards", "west", "westward"), "moves left"),
    **dict.fromkeys(("right", "rightward", "rightwards", "east", "eastward"), "moves right"),
    **dict.fromkeys(("up", "upward", "upwards", "rise", "rises", "rising", "ascend", "ascends", "ascending",
                     "climb", "climbs", "climbing", "north"), "moves up"),
    **dict.fromkeys(("down", "downward", "downwards", "fall", "falls", "falling", "sink", "sinks", "sinking",
                     "drop", "drops", "dropping", "descend", "descends", "descending", "south"), "moves down"),
    **dict.fromkeys(("still", "static", "stationary", "motionless", "unmoving", "stays_put"), "stays still"),
}  # fmt: skip
# Phrases rewritten before tokenising, so their words are not read one by one.
PHRASES = (
    (r"\b(?:does not|doesn't|do not|don't|not|never|without) mov(?:e|es|ing)\b", " still "),
    (r"\b(?:in place|in one place|stays put|standing|at rest)\b", " still "),
    (r"\bdark blue (?:background|backdrop)\b", " background_navy "),
    (r"\b(\w+) (?:background|backdrop)\b", r" background_\1 "),
)


def parse(prompt: str) -> tuple[list[dict], str | None]:
    """Objects [{colour, shape, motion}] (None where unstated) and the background named in a prompt."""
    text = prompt.lower()
    for pattern, replacement in PHRASES:
        text = re.sub(pattern, replacement, text)
    objects: list[dict] = []
    background = None
    pending = {"colour": None, "motion": None}  # words seen before the shape they belong to
    previous = None
    for token in re.findall(r"[a-z_]+", text):
        was_motion, previous = previous in MOTION_WORDS, token
        if token.startswith("background_"):
            word = token.removeprefix("background_")
            background = BACKGROUND_WORDS.get(word, background)
        elif token in BACKGROUND_WORDS:
            background = BACKGROUND_WORDS[token]
        elif token in COLOUR_WORDS:
            if pending["colour"] is not None:  # "red ... blue": the red one had no shape word
                objects.append({"colour": pending["colour"], "shape": None, "motion": pending["motion"]})
                pending = {"colour": None, "motion": None}
            pending["colour"] = COLOUR_WORDS[token]
        elif token in SHAPE_WORDS:
            objects.append({"colour": pending["colour"], "shape": SHAPE_WORDS[token], "motion": pending["motion"]})
            pending = {"colour": None, "motion": None}
        elif token in MOTION_WORDS:
            if was_motion:  # "sinks downward", "drops down": one motion in two words
                continue
            if pending["colour"] is None and objects and objects[-1]["motion"] is None:
                objects[-1]["motion"] = MOTION_WORDS[token]
            elif pending["motion"] is None:
                pending["motion"] = MOTION_WORDS[token]
    if pending["colour"] is not None:
        if objects and objects[-1]["colour"] is None:  # "a circle, red"
            objects[-1]["colour"] = pending["colour"]
            objects[-1]["motion"] = objects[-1]["motion"] or pending["motion"]
        else:
            objects.append({"colour": pending["colour"], "shape": None, "motion": pending["motion"]})
    return objects, background


class CaptionStyleEnhancer(PromptEnhancer):
    """default_motion fills an unstated motion; default_background an unstated background (None: omit)."""

    def __init__(self, default_motion: str = "stays still", default_background: str | None = "black"):
        if default_motion not in MOTIONS:
            raise ValueError(f"default_motion must be one of {', '.join(MOTIONS)}; got {default_motion!r}")
        if default_background is not None and default_background not in BACKGROUNDS:
            raise ValueError(
                f"default_background must be one of {', '.join(BACKGROUNDS)} or None; got {default_background!r}"
            )
        self.default_motion = default_motion
        self.default_background = default_background

    def enhance(self, prompt: str) -> str:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        objects, background = parse(prompt)
        if not objects:
            return prompt
        for obj in objects:
            obj["motion"] = obj["motion"] or self.default_motion
        return canonical_caption(objects, background or self.default_background)


@hookimpl
def register_prompt_enhancers(register) -> None:
    register("caption-style", CaptionStyleEnhancer, aliases=("caption_style",))
