"""What a caller asks for (GenerationRequest) and the checks that turn bad input into clear errors."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch

MAX_FRAMES = 1025
MAX_SIDE = 2048


class RequestError(ValueError):
    """A request field is invalid; the message names the field and how to fix it."""


@dataclass(frozen=True)
class Conditioning:
    """Known pixels for some frames of the output: an image (1 frame) or a clip.

    media: (T, H, W, 3) uint8 frames; resized to the request's size.
    start_frame: index of the output frame where `media` begins; negative counts from the end.
        It must be 0 or start a latent frame, 1 + k·temporal_compression: with the embedded
        model's 17 frames, -4 puts an image on the last latent frame (frames 13-16).
    """

    media: torch.Tensor
    start_frame: int = 0


@dataclass(frozen=True)
class GenerationRequest:
    """One video to generate. Fields left as None take the model's defaults."""

    prompt: str
    negative_prompt: str = ""
    frames: int | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None  # None: a random seed, recorded in the result
    sampler: str | None = None
    sampler_options: dict = field(default_factory=dict)
    conditioning: tuple[Conditioning, ...] = ()
    # Video-to-video (SDEdit): start from `video`, (T, H, W, 3) uint8 resized to the request's
    # size, noised to where the last `strength` share of the sampling steps begins; 1 redraws it
    # all. `frames` defaults to the video's length.
    video: torch.Tensor | None = None
    strength: float = 0.8
    loop: bool = False  # the last frame leads back into the first: the video plays as a loop
    upscale: int = 1  # resize the decoded frames by this factor (Lanczos) before writing
    # (low, high): guide only the model evaluations at a time t (1 = noise, 0 = data) in
    # [low, high]; the others take the conditional prediction alone, one transformer pass instead
    # of two (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval"). (0, 1): all.
    # The last field, so that positional arguments keep their places.
    guidance_interval: tuple[float, float] | None = None

    def with_defaults(self, defaults: dict) -> "GenerationRequest":
        """Fill the None fields from a model's defaults, draw a seed if none was given, and guide
        every step if neither says otherwise."""
        filled = {}
        for f in fields(self):
            if getattr(self, f.name) is None and f.name in defaults:
                filled[f.name] = defaults[f.name]
        if self.frames is None and isinstance(self.video, torch.Tensor) and self.video.dim() == 4:
            filled["frames"] = self.video.shape[0]
        if self.seed is None and "seed" not in filled:
            filled["seed"] = int(torch.randint(0, 2**31 - 1, ()).item())
        if self.guidance_interval is None and "guidance_interval" not in filled:
            filled["guidance_interval"] = (0.0, 1.0)  # every step
        return replace(self, **filled)

    @property
    def edit_steps(self) -> int:
        """With a `video`: how many of the `steps` run, the last `strength` share (as diffusers counts)."""
        return math.floor(self.steps * self.strength + 1e-6)

    def loop_roll(self, temporal_multiple: int) -> tuple[int, tuple[Conditioning, ...]] | None:
        """How a loop rolls its first pass's video, and where the known frames land in the rolled one.

        The roll m is the one nearest the middle for which the rolled video's last latent frame
        (frames m - k .. m - 1 of the first pass, k <= temporal_multiple) does not wrap around,
        and every known frame, moved to (start - m) mod frames, starts a latent frame and does not
        wrap either. Returns (m, the moved conditioning), or None when no roll fits.
        """
        n = self.frames
        kept = n - last_latent_frame_start(n, temporal_multiple)  # frames in the last latent frame
        for m in sorted(range(kept, n), key=lambda m: (abs(m - n // 2), m)):
            moved = []
            for cond in self.conditioning:
                start = (cond.start_frame - m) % n  # a negative start_frame counts from the end, as % does
                if start + cond.media.shape[0] > n or (start != 0 and (start - 1) % temporal_multiple):
                    break
                moved.append(Conditioning(cond.media, start))
            else:
                return m, tuple(moved)
        return None

    def validate(self, *, spatial_multiple: int = 1, temporal_multiple: int = 1) -> None:
        """Raise RequestError naming the first invalid field; call after with_defaults."""
        if not isinstance(self.prompt, str):
            raise RequestError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not self.prompt.strip():
            raise RequestError("prompt is empty: describe the video to generate")
        if not isinstance(self.negative_prompt, str):
            raise RequestError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")
        _check_int("frames", self.frames, 1, MAX_FRAMES, "a still image is --frames 1")
        for name in ("width", "height"):
            value = getattr(self, name)
            _check_int(name, value, spatial_multiple, MAX_SIDE, "sizes are written WIDTHxHEIGHT, e.g. 64x64")
            if value % spatial_multiple:
                lower = value // spatial_multiple * spatial_multiple
                raise RequestError(
                    f"{name} {value} is not a multiple of {spatial_multiple} (the model's spatial compression); "
                    f"use {lower or spatial_multiple} or {lower + spatial_multiple}"
                )
        _check_float("fps", self.fps, 0.0, 240.0)
        _check_int("steps", self.steps, 1, 1000, "e.g. --steps 30")
        _check_float("guidance", self.guidance, 0.0, 100.0, inclusive_low=True)
        check_guidance_interval(self.guidance_interval)
        _check_int("seed", self.seed, 0, 2**63 - 1, "any non-negative integer")
        _check_int("upscale", self.upscale, 1, 8, "e.g. --upscale 4 makes 64x64 into 256x256")
        if not isinstance(self.sampler_options, dict):
            raise RequestError("sampler_options must be a dict of keyword arguments for the sampler")
        for index, cond in enumerate(self.conditioning):
            media = cond.media
            _check_frames(f"conditioning[{index}].media", media)
            start = cond.start_frame if cond.start_frame >= 0 else self.frames + cond.start_frame
            if start < 0 or start + media.shape[0] > self.frames:
                raise RequestError(
                    f"conditioning[{index}] covers frames {start}..{start + media.shape[0] - 1}, "
                    f"outside the {self.frames} requested frames"
                )
            if start != 0 and (start - 1) % temporal_multiple:
                # Latent frame 0 is pixel frame 0; latent frame j >= 1 covers frames (j-1)·ct+1 .. j·ct.
                before = 1 + (start - 1) // temporal_multiple * temporal_multiple
                raise RequestError(
                    f"conditioning[{index}] starts at frame {start}, not on a latent frame boundary: "
                    f"use frame 0 or 1 + k·{temporal_multiple} (here {before}, that is {before - self.frames} "
                    f"from the end, or {before + temporal_multiple})"
                )
        _check_float("strength", self.strength, 0.0, 1.0)
        if self.video is not None:
            video = self.video
            _check_frames("video", video)
            if video.shape[0] != self.frames:
                raise RequestError(
                    f"video has {video.shape[0]} frames but {self.frames} frames were requested: "
                    f"ask for {video.shape[0]} frames (the default with a video) or trim the video"
                )
            if self.edit_steps < 1:
                raise RequestError(
                    f"strength {self.strength} of {self.steps} steps runs no step: "
                    f"use strength >= {math.ceil(1000 / self.steps) / 1000} or more steps"
                )
        if not isinstance(self.loop, bool):
            raise RequestError(f"loop must be True or False, got {self.loop!r}")
        if self.loop and self.video is not None:
            raise RequestError(
                "loop cannot be combined with a video to edit: its second pass generates the frames between "
                "the video's ends anew and would not keep the edit; drop one or the other"
            )
        if self.loop and self.frames < temporal_multiple + 2:
            raise RequestError(
                f"a loop needs at least {temporal_multiple + 2} frames, got {self.frames}: it keeps the first frame "
                "and the last latent frame of the video and generates the frames between them anew"
            )
        if self.loop and self.loop_roll(temporal_multiple) is None:
            raise RequestError(
                "a loop rolls its video so that its ends meet in the middle, and no roll puts every known frame "
                f"(conditioning) on a latent frame boundary, 1 + k·{temporal_multiple}, without wrapping past the end; "
                "use shorter clips or images as known frames, or another frame count"
            )


def last_latent_frame_start(frames: int, temporal_multiple: int) -> int:
    """The first output frame of the last latent frame: latent frame 0 is frame 0, latent frame
    j >= 1 covers frames (j-1)·temporal_multiple + 1 .. j·temporal_multiple."""
    return 1 + (frames - 2) // temporal_multiple * temporal_multiple


def _check_frames(name: str, media) -> None:
    if not isinstance(media, torch.Tensor) or media.dtype != torch.uint8 or media.dim() != 4 or media.shape[-1] != 3:
        shape = tuple(media.shape) if isinstance(media, torch.Tensor) else type(media).__name__
        raise RequestError(f"{name} must be a (T, H, W, 3) uint8 tensor, got {shape}")


def _check_int(name, value, low, high, hint=""):
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}" + (f" ({hint})" if hint else ""))


def _check_float(name, value, low, high, inclusive_low=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}")
    if value > high or value < low or (value == low and not inclusive_low):
        bound = ">=" if inclusive_low else ">"
        raise RequestError(f"{name} must be {bound} {low} and <= {high}, got {value}")


def check_guidance_interval(interval) -> tuple[float, float]:
    """`interval` as (low, high), or a RequestError unless it is two numbers with 0 <= low <= high <= 1."""
    if isinstance(interval, (str, bytes, dict)) or not hasattr(interval, "__len__") or len(interval) != 2:
        raise RequestError(f"guidance_interval must be two numbers (low, high) with 0 <= low <= high <= 1, got {interval!r}")
    for value in interval:
        _check_float("each end of guidance_interval", value, 0.0, 1.0, inclusive_low=True)
    low, high = (float(v) for v in interval)
    if low > high:
        raise RequestError(
            f"guidance_interval {list(interval)} runs backwards: give the lower time first, "
            f"({high}, {low}) (--guidance-interval {high} {low})"
        )
    return low, high


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height), e.g. '80x48' -> (80, 48)."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        raise RequestError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 64x64 or 80x48")
    width, height = (int(p) for p in parts)
    return width, height
