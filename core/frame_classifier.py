"""Frame sampling for frame safety filters, and an adapter that turns an image classifier into one.

A deployment with its own image model (an in-house NSFW or violence classifier, say) implements
`FrameClassifier.classify(frame) -> (category, score)` and wraps it:

    class MyClassifier:
        def classify(self, frame):           # (H, W, 3) uint8 RGB, read-only
            probs = my_model(frame)
            best = max(probs, key=probs.get)
            return (best if best != "safe" else None), probs[best]

    @hookimpl
    def register_safety_filters(register):
        register("my-classifier", lambda **config: ClassifierFrameFilter(MyClassifier(), **config))

`ClassifierFrameFilter` picks the frames, calls the classifier and builds the SafetyDecision,
so the deployment writes no frame-sampling code. The hashlist filter samples frames with the
same `sample_frames`, so both see the same positions of a video.

Which frames are judged: the first, the last and every `every`-th (0, k, 2k, ..., T-1). A
frame between two sampled positions is not looked at, so an image that shows for fewer than
`every` frames can slip through; anything that stays on screen for `every` consecutive frames
or more always includes a sampled position. `every=1` judges every frame.
"""

from __future__ import annotations

import math
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from skyloom.kinds import SafetyDecision, SafetyFilter
from skyloom.video_io import as_frames

DEFAULT_EVERY = 8  # judge every 8th frame (plus the last): 7 of a 49-frame video


def sampled_frame_indices(num_frames: int, every: int = DEFAULT_EVERY) -> list[int]:
    """The positions a frame filter judges: 0, every, 2·every, ... and num_frames - 1, ascending.

    Any `every` consecutive frames contain at least one of them.
    """
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    check_every(every)
    return sorted({*range(0, num_frames, every), num_frames - 1})


def check_every(every) -> int:
    """`every` as given, or a ValueError: it must be an int >= 1."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an int >= 1 (1 judges every frame), got {every!r}")
    return every


def sample_frames(frames: torch.Tensor | np.ndarray, every: int = DEFAULT_EVERY) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, frame) for the sampled positions of (T, H, W, 3) uint8 frames.

    Each frame is a read-only (H, W, 3) uint8 numpy view: no copy, and a filter cannot change
    the video it judges. Raises ValueError/TypeError for anything but (T, H, W, 3) uint8.
    """
    array = as_frames(frames).view()
    array.flags.writeable = False
    for index in sampled_frame_indices(array.shape[0], every):
        yield index, array[index]


@runtime_checkable
class FrameClassifier(Protocol):
    """An image classifier: what a deployment implements to judge frames with its own model."""

    def classify(self, frame: np.ndarray) -> tuple[str | None, float]:
        """(H, W, 3) uint8 RGB frame -> (category, score).

        category: what the frame shows that is prohibited ("nudity", "violence", ...), or None
            when it shows nothing prohibited.
        score: the classifier's confidence in that category, compared with the filter's
            threshold (any scale the deployment chooses; usually a probability in [0, 1]).
        """
        ...


class ClassifierFrameFilter(SafetyFilter):
    """Refuses a video when the classifier gives a sampled frame a category with score >= threshold.

    classifier: any object with `classify(frame) -> (category, score)` (see FrameClassifier).
    threshold: the lowest score that refuses.
    every: judge the first, the last and every `every`-th frame (see the module docstring).
    Judges frames only; check_text returns None. Stops at the first refusing frame.
    """

    def __init__(self, classifier: FrameClassifier, *, threshold: float = 0.5, every: int = DEFAULT_EVERY):
        if not isinstance(classifier, FrameClassifier):
            raise TypeError(
                f"classifier must have a classify(frame) -> (category, score) method, "
                f"got {type(classifier).__name__}"
            )
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        self.classifier = classifier
        self.threshold = float(threshold)
        self.every = check_every(every)

    def check_frames(self, frames: torch.Tensor) -> SafetyDecision:
        name = type(self.classifier).__name__
        judged = 0
        highest: float | None = None  # the highest score given to any category, for the record
        for index, frame in sample_frames(frames, self.every):
            category, score = self._classify(frame, index)
            judged += 1
            if category is None:
                continue
            highest = score if highest is None else max(highest, score)
            if score >= self.threshold:
                return SafetyDecision(
                    allowed=False,
                    category=category,
                    reason=f"frame {index} classified {category} by {name} (score {score:.3g} >= {self.threshold:.3g})",
                    score=score,
                )
        return SafetyDecision(
            allowed=True,
            reason=f"{name} found nothing at or above {self.threshold:.3g} in {judged} sampled frames",
            score=highest,
        )

    def _classify(self, frame: np.ndarray, index: int) -> tuple[str | None, float]:
        result = self.classifier.classify(frame)
        name = type(self.classifier).__name__
        try:
            category, score = result
        except (TypeError, ValueError):
            raise TypeError(f"{name}.classify must return (category, score), got {result!r} for frame {index}") from None
        if category is not None and (not isinstance(category, str) or not category):
            raise TypeError(f"{name}.classify returned category {category!r} for frame {index}; use a non-empty str or None")
        try:
            score = float(score)
        except (TypeError, ValueError):
            raise TypeError(f"{name}.classify returned score {score!r} for frame {index}; use a number") from None
        if not math.isfinite(score):
            raise ValueError(f"{name}.classify returned score {score!r} for frame {index}; scores must be finite")
        return category, score
