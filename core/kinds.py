"""The plugin kinds and the interface each kind implements.

The core calls plugins only through these interfaces; it never imports a concrete plugin.
A kind with no plugin selected is skipped by the pipeline and the result record says so.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

KINDS = (
    "text_encoder",
    "video_autoencoder",
    "sampler",
    "safety_filter",
    "watermarker",
    "prompt_enhancer",
    "captioner",
)


# --- text_encoder ------------------------------------------------------------------------


@dataclass
class TextEmbedding:
    tokens: torch.Tensor  # (B, L, D) float: one embedding per token
    mask: torch.Tensor  # (B, L) bool: True where the token is real, False where it is padding
    pooled: torch.Tensor  # (B, D) float: one embedding per prompt


class TextEncoder(ABC):
    """Turns prompts into token embeddings for the transformer's cross-attention."""

    dim: int  # D, the width of the token embeddings

    @abstractmethod
    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        """Encode a batch of prompts (the empty string is the unconditional prompt)."""

    def to(self, device: torch.device | str) -> "TextEncoder":
        """Move the encoder's weights (the pipeline offloads idle components to the CPU)."""
        return self


class CachingTextEncoder(TextEncoder):
    """A TextEncoder that keeps the encodings of its last `cache_size` prompts (least recently
    used go first), so a pipeline called many times with one prompt, and the empty negative
    prompt, encodes each once. Subclasses set `max_length`, `dim`, `dtype`, `device` and
    `cache_size`, and implement `encode_uncached`."""

    max_length: int
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    cache_size: int = 256

    @abstractmethod
    def encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Distinct prompts -> tokens (B, max_length, D), mask (B, max_length), pooled (B, D)."""

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not one string; wrap it: encode([prompt])")
        prompts = list(prompts)
        cache = self.__dict__.setdefault("_cache", OrderedDict())  # prompt -> CPU (tokens, mask, pooled)
        missing = list(dict.fromkeys(p for p in prompts if p not in cache))
        fresh = {}
        if missing:
            tokens, mask, pooled = self.encode_uncached(missing)
            for i, prompt in enumerate(missing):
                fresh[prompt] = (tokens[i].cpu().clone(), mask[i].cpu().clone(), pooled[i].cpu().clone())
        rows = [fresh.get(prompt) or cache[prompt] for prompt in prompts]  # before any eviction
        if self.cache_size:
            for prompt, row in zip(prompts, rows):
                cache[prompt] = row
                cache.move_to_end(prompt)
            while len(cache) > self.cache_size:
                cache.popitem(last=False)
        if not rows:
            return TextEmbedding(
                tokens=torch.zeros(0, self.max_length, self.dim, dtype=self.dtype, device=self.device),
                mask=torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device),
                pooled=torch.zeros(0, self.dim, dtype=self.dtype, device=self.device),
            )
        tokens, mask, pooled = (torch.stack(column).to(self.device) for column in zip(*rows))
        return TextEmbedding(tokens=tokens, mask=mask, pooled=pooled)

    def clear_cache(self) -> None:
        self.__dict__.get("_cache", {}).clear()


# --- video_autoencoder -------------------------------------------------------------------


class VideoAutoencoder(torch.nn.Module, ABC):
    """Compresses RGB video into a latent video and back.

    Pixels are (B, 3, T, H, W) floats in [-1, 1]. The first frame is encoded on its own, so a
    video of T = 1 + k·temporal_compression frames has 1 + k latent frames and a still image
    is a one-frame video. H and W are multiples of spatial_compression.
    """

    latent_channels: int
    temporal_compression: int
    spatial_compression: int

    @abstractmethod
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) pixels -> (B, latent_channels, T', H', W') normalised latents."""

    @abstractmethod
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, T', H', W') latents -> (B, 3, T, H, W) pixels in [-1, 1]."""

    def iter_decode(self, latent: torch.Tensor, chunk_frames: int = 2) -> Iterator[torch.Tensor]:
        """Decode `chunk_frames` latent frames at a time, yielding (B, 3, t, H, W) pixel chunks in
        order, so that a long video never has all its decoder activations alive at once.
        Override to carry causal state between chunks; this default decodes in one piece."""
        yield self.decode(latent)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The latent (C', T', H', W') that covers a video of this size, rounding up."""
        ct, cs = self.temporal_compression, self.spatial_compression
        t = 1 + -(-(frames - 1) // ct)
        return (self.latent_channels, t, -(-height // cs), -(-width // cs))


# --- sampler -----------------------------------------------------------------------------


class Sampler(ABC):
    """A rectified-flow sampler in the diffusers style; the denoising loop belongs to the caller.

    Time t runs from 1 (pure noise) to 0 (data): x_t = (1 - t)·x_0 + t·noise, and the model
    predicts the velocity v = noise - x_0. The caller does:

        sampler.set_timesteps(num_steps, shift=shift)
        for t in sampler.timesteps:
            sample = sampler.step(model(sample, t), t, sample, generator=generator)
    """

    config: dict  # the constructor's arguments, recorded in the result

    timesteps: torch.Tensor  # the times at which the model is evaluated, in calling order
    stochastic: bool = False  # True when step() draws noise from the generator

    @abstractmethod
    def set_timesteps(self, num_steps: int, *, shift: float = 1.0) -> None:
        """Prepare `num_steps` steps; `shift` > 1 spends more of them at high noise (SD3)."""

    @abstractmethod
    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Advance `sample` from `timestep` using the model's velocity there."""

    def set_begin_step(self, step: int) -> int:
        """Skip the first `step` steps of the run set_timesteps() just prepared: the caller's
        sample is already noised to the time where step `step` begins (video-to-video, SDEdit).
        Returns the index in `timesteps` of the first model evaluation left to make.

        A sampler that cannot start part-way keeps this default, and cannot edit videos.
        """
        raise NotImplementedError(
            f"sampler {type(self).__name__} cannot start part-way through its steps, so it cannot "
            "edit a video; choose one of skyloom's built-in samplers (see `skyloom plugins`)"
        )


# --- safety_filter -----------------------------------------------------------------------


@dataclass
class SafetyDecision:
    allowed: bool
    category: str | None = None  # e.g. "violence"; None when allowed
    reason: str = ""  # one line a person can read
    score: float | None = None  # the filter's own confidence, when it has one
    filter: str = ""  # filled in by the pipeline: the plugin's registered name
    stage: str = ""  # filled in by the pipeline: the stage's name, e.g. "prompt_safety", "frame_safety"


class SafetyFilter(ABC):
    """Judges prompts, frames or both. A method returns None when the filter does not judge
    that kind of input. Every selected filter runs; any refusal stops the request."""

    def check_text(self, text: str) -> SafetyDecision | None:
        return None

    def check_frames(self, frames: torch.Tensor) -> SafetyDecision | None:
        """frames: (T, H, W, 3) uint8."""
        return None


# --- watermarker -------------------------------------------------------------------------


@dataclass
class WatermarkDetection:
    detected: bool
    payload: bytes | None  # the recovered payload when detected
    confidence: float  # 0..1


class Watermarker(ABC):
    """Embeds an invisible payload in frames and finds it again after common edits."""

    payload_bytes: int = 8
    min_frame_side: int = 1  # smaller frames cannot carry the mark: the pipeline skips and says so

    @abstractmethod
    def embed(self, frames: torch.Tensor, payload: bytes) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> (T, H, W, 3) uint8 carrying `payload`."""

    @abstractmethod
    def detect(self, frames: torch.Tensor) -> WatermarkDetection:
        """Look for this watermarker's mark in (T, H, W, 3) uint8 frames."""


# --- prompt_enhancer ---------------------------------------------------------------------


class PromptEnhancer(ABC):
    """Rewrites a short user prompt into the detailed style the model was trained on."""

    @abstractmethod
    def enhance(self, prompt: str) -> str: ...


# --- captioner ---------------------------------------------------------------------------


class Captioner(ABC):
    """Describes a video from its pixels (re-captioning training data, evaluation)."""

    @abstractmethod
    def caption(self, frames: torch.Tensor, fps: float) -> str:
        """frames: (T, H, W, 3) uint8."""

    def captions(self, frames: torch.Tensor, fps: float, count: int) -> list[str]:
        """`count` captions of one video, for training on several phrasings (a deterministic
        captioner repeats itself; the `shapes` captioner varies the words, not the facts)."""
        return [self.caption(frames, fps) for _ in range(count)]
