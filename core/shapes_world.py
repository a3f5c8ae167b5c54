"""The vocabulary of "shapes world", the synthetic data skyloom trains its embedded model on.

Shared by the dataset generator (`skyloom dataset shapes`), the `shapes` captioner (which
re-captions clips from their pixels, as Sora's recipe does) and the evaluation.
"""

SHAPES = ("circle", "square", "triangle")

# sRGB values the objects are drawn at (with small jitter).
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "white": (240, 240, 240),
    "purple": (150, 60, 200),
}

BACKGROUNDS = {
    "black": (0, 0, 0),
    "gray": (110, 110, 110),
    "navy": (20, 30, 80),
}

# Motion name -> unit direction (dx, dy) in image coordinates (y grows downwards).
MOTIONS = {
    "moves left": (-1, 0),
    "moves right": (1, 0),
    "moves up": (0, -1),
    "moves down": (0, 1),
    "stays still": (0, 0),
}


def reversed_motion(motion: str) -> str:
    """The motion an object shows when its clip plays backwards."""
    dx, dy = MOTIONS[motion]
    return next(name for name, direction in MOTIONS.items() if direction == (-dx, -dy))


# Sizes are (width, height), as in --size WIDTHxHEIGHT; durations in frames at FPS.
SIZES = ((64, 64), (80, 48), (48, 80))
DURATIONS = (9, 17, 33)
FPS = 8

# Attribute combinations never shown in training, to measure compositional generalisation.
HELD_OUT = (
    {"colour": "purple", "shape": "triangle"},
    {"colour": "yellow", "motion": "moves down"},
)


def is_held_out(obj: dict) -> bool:
    """True when an object's attributes {colour, shape, motion} match a held-out combination."""
    return any(all(obj.get(key) == value for key, value in combo.items()) for combo in HELD_OUT)
