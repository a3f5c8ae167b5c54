"""Sampling math shared by the samplers and the pipeline: time grids, timestep shift, guidance.

The flow convention of skyloom.kinds: x_t = (1 - t)·x_0 + t·ε with t from 1 (noise) to 0
(data), and the model predicts the velocity v = ε - x_0. In the notation of the diffusion
papers the samplers follow, the signal and noise scales are α_t = 1 - t and σ_t = t, so

    x̂_0 = x_t - t·v            (the model's estimate of the data)
    ε̂   = x_t + (1 - t)·v      (the model's estimate of the noise)

This module knows the sampler kind, not any sampler: `FlowSampler` is the bookkeeping that
the built-in samplers share (grid, step cursor, input checks); third-party samplers may use it
or implement skyloom.kinds.Sampler directly.
"""

from __future__ import annotations

from abc import abstractmethod

import math
from numbers import Integral, Real

import torch

from skyloom.kinds import Sampler

# Open-Sora 1.2's resolution rule (after SD3, Esser et al. 2024, §5.3.2): the shift grows as
# the square root of the number of latent tokens, relative to one 512×512 frame. With the
# usual 8× spatial autoencoder and 2×2 patches that frame is (512/8/2)² = 32·32 = 1024 tokens.
BASE_NUM_TOKENS = 1024

# How far a `timestep` passed to step() may be from the one expected (it is usually the very
# same value; the slack lets a caller pass it through float16 without tripping the check).
TIMESTEP_TOLERANCE = 1e-3


# --- checks ---------------------------------------------------------------------------------


def check_num_steps(num_steps: object) -> int:
    """`num_steps` as an int, or a ValueError saying what was wrong with it."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, Integral):
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r} ({type(num_steps).__name__})")
    if num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps}")
    return int(num_steps)


def check_shift(shift: object, name: str = "shift") -> float:
    """`shift` as a float, or a ValueError unless it is a finite number > 0."""
    if isinstance(shift, bool) or not isinstance(shift, Real) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (1 means no shift), got {shift!r}")
    return float(shift)


# --- time grid and shift ----------------------------------------------------------------


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The SD3 timestep shift t' = s·t / (1 + (s - 1)·t).

    It fixes t = 0 and t = 1, is increasing in t, and s = 1 is the identity; s > 1 moves every
    interior time towards 1, so a uniform grid spends more of its steps at high noise, which
    large images and long videos need (their pixels are more redundant, so noise destroys less).
    """
    s = check_shift(shift)
    if s == 1.0:
        return t.clone() if isinstance(t, torch.Tensor) else t
    # Written as s·t/((1 - t) + s·t), so that rounding cannot move t = 1 off 1.
    return s * t / ((1 - t) + s * t)


def flow_time_grid(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """The `num_steps + 1` times 1 = t_0 > t_1 > ... > t_n = 0 that the samplers step between.

    t_i = shift_time(1 - i/n, shift), in float64 so the step coefficients are exact; the
    endpoints are exactly 1 and 0.
    """
    n = check_num_steps(num_steps)
    uniform = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    grid = shift_time(uniform, check_shift(shift))
    grid[0], grid[-1] = 1.0, 0.0
    return grid


def resolution_shift(num_tokens: int, *, base_tokens: int = BASE_NUM_TOKENS, base_shift: float = 1.0) -> float:
    """The timestep shift for a latent of `num_tokens` tokens: base_shift·√(num_tokens/base_tokens).

    num_tokens is the transformer's sequence length, T'·(H'/p_h)·(W'/p_w) for a latent video of
    T'×H'×W' and patch size p; base_tokens is the sequence length at which `base_shift` was
    tuned (default: one 512×512 frame, BASE_NUM_TOKENS). As in Open-Sora 1.2, whose
    √(resolution ratio)·√(frames ratio) is this square root of the token ratio, the result is
    not clamped: sequences shorter than the base get a shift below `base_shift`.
    """
    for name, value in (("num_tokens", num_tokens), ("base_tokens", base_tokens)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return check_shift(base_shift, "base_shift") * math.sqrt(num_tokens / base_tokens)


# --- guidance ----------------------------------------------------------------------------


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): v = v_u + w·(v_c - v_u).

    Written as v_c + (w - 1)·(v_c - v_u), which is the same line but equals `cond` bit for bit at
    w = 1 (no guidance); w = 0 gives the unconditional prediction.
    """
    if cond.shape != uncond.shape:
        raise ValueError(
            f"classifier_free_guidance needs cond and uncond of one shape, got {tuple(cond.shape)} "
            f"and {tuple(uncond.shape)}; split the batched model output with .chunk(2) first"
        )
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
        raise ValueError(f"guidance scale must be a finite number, got {scale!r}")
    return cond + (scale - 1) * (cond - uncond)


def guided_at(t: float, guidance: float, interval: tuple[float, float]) -> bool:
    """Whether a model evaluation at time t needs the unconditional branch: guidance is not 1
    and t lies in interval = (low, high). The ends count as inside; the slack absorbs timesteps
    stored in float32 (t = 0.7 is held as 0.69999999)."""
    low, high = interval
    return guidance != 1.0 and low - 1e-6 <= float(t) <= high + 1e-6


# --- predictions from the velocity ------------------------------------------------------


def predicted_data(sample: torch.Tensor, velocity: torch.Tensor, t: float) -> torch.Tensor:
    """x̂_0 = x_t - t·v."""
    return sample - t * velocity


def predicted_noise(sample: torch.Tensor, velocity: torch.Tensor, t: float) -> torch.Tensor:
    """ε̂ = x_t + (1 - t)·v."""
    return sample + (1 - t) * velocity


def draw_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like `like`, drawn only from `generator` (the global RNG
    when None). It is drawn on the generator's device and moved, so a CPU generator seeds a
    CUDA run and a seed gives the same noise on any device."""
    if generator is None:
        return torch.randn(like.shape, dtype=like.dtype, device=like.device)
    noise = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device)
    return noise.to(like.device)


# --- the built-in samplers' bookkeeping -------------------------------------------------


class FlowSampler(Sampler):
    """What the built-in samplers share: the time grid, the step cursor and the input checks.

    A subclass implements `_step(index, velocity, sample, generator)` for the `index`-th model
    evaluation of the run, may override `_evaluation_times` (when it evaluates the model at
    other times than t_0 ... t_{n-1}) and `_reset` (to clear its per-run state; a run that
    starts part-way, at set_begin_step(), starts with it clear), and records
    its own constructor arguments with `super().__init__(shift=shift, **config)`.

    `shift` given to the constructor is the default for set_timesteps(); one passed there wins.
    """

    def __init__(self, *, shift: float = 1.0, **config) -> None:
        self.config = {"shift": check_shift(shift), **config}
        self._time_grid: torch.Tensor | None = None
        self._timesteps: torch.Tensor | None = None
        self._index = 0

    @property
    def timesteps(self) -> torch.Tensor:
        """(num_evaluations,) float32: the times at which the model is evaluated, in order."""
        return self._require_run()[1]

    @property
    def time_grid(self) -> torch.Tensor:
        """(num_steps + 1,) float64: 1 = t_0 > ... > t_n = 0, the times the run steps between."""
        return self._require_run()[0]

    @property
    def num_steps(self) -> int:
        return len(self.time_grid) - 1

    def set_timesteps(self, num_steps: int, *, shift: float | None = None) -> None:
        """Start a new run of `num_steps` steps (forgetting any run in progress).

        shift: the SD3 timestep shift (skyloom.sampling.shift_time); None uses the
        constructor's. See resolution_shift() for the value that suits a sequence length.
        """
        shift = self.config["shift"] if shift is None else shift
        self._time_grid = flow_time_grid(num_steps, shift)
        self._timesteps = self._evaluation_times(self._time_grid).to(torch.float32)
        self._index = 0
        self._reset()

    def set_begin_step(self, step: int) -> int:
        grid, _ = self._require_run()
        if self._index != 0:
            raise RuntimeError(f"{type(self).__name__}.set_begin_step must come right after set_timesteps, before any step()")
        if isinstance(step, bool) or not isinstance(step, Integral) or not 0 <= step < len(grid) - 1:
            raise ValueError(f"{type(self).__name__}.set_begin_step: step must be an integer in 0..{len(grid) - 2}, got {step!r}")
        self._index = self._evaluation_index(int(step))
        return self._index

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        index = self._next_index(timestep)
        if model_output.shape != sample.shape:
            raise ValueError(
                f"{type(self).__name__}.step: model_output has shape {tuple(model_output.shape)} "
                f"but sample has {tuple(sample.shape)}; the model must predict one velocity per latent value"
            )
        self._index = index + 1
        # At least float32 for the update (as diffusers does), returned in the sample's dtype.
        dtype = torch.promote_types(sample.dtype, torch.float32)
        prev_sample = self._step(index, model_output.to(dtype), sample.to(dtype), generator)
        return prev_sample.to(sample.dtype)

    # -- for subclasses ------------------------------------------------------------------

    def _evaluation_times(self, grid: torch.Tensor) -> torch.Tensor:
        return grid[:-1]

    def _evaluation_index(self, step: int) -> int:
        """The index in `timesteps` of the evaluation that starts grid step `step`: the last one
        at time_grid[step] (a corrector of the step before, as Heun's, comes first)."""
        grid, timesteps = self._require_run()
        (matches,) = (timesteps == grid[step].to(timesteps.dtype)).nonzero(as_tuple=True)
        if len(matches) == 0:
            raise NotImplementedError(
                f"{type(self).__name__} does not evaluate the model at t = {float(grid[step]):.4f}, where step "
                f"{step} begins, so it cannot start there; it must override _evaluation_index"
            )
        return int(matches[-1])

    def _reset(self) -> None:
        """Clear per-run state (previous outputs); called by set_timesteps()."""

    @abstractmethod
    def _step(
        self, index: int, velocity: torch.Tensor, sample: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Step `index` of the run: the sample at the next grid time, from the velocity here."""

    # -- the cursor ----------------------------------------------------------------------

    def _require_run(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._time_grid is None or self._timesteps is None:
            raise RuntimeError(
                f"{type(self).__name__} has no timesteps yet; call set_timesteps(num_steps) before "
                "reading timesteps or calling step()"
            )
        return self._time_grid, self._timesteps

    def _next_index(self, timestep: torch.Tensor | float) -> int:
        """The index in `timesteps` of the evaluation due now, after checking `timestep` is its time."""
        _, timesteps = self._require_run()
        index = self._index
        if index >= len(timesteps):
            raise RuntimeError(
                f"{type(self).__name__}: all {len(timesteps)} steps of this run are done; "
                "call set_timesteps(num_steps) to start another run"
            )
        given = torch.as_tensor(timestep, dtype=torch.float64).detach().cpu().reshape(-1)
        expected = float(timesteps[index])
        if given.numel() == 0 or not bool(((given - expected).abs() <= TIMESTEP_TOLERANCE).all()):
            raise ValueError(
                f"{type(self).__name__}.step expected timestep {expected:.6f} (evaluation {index} of "
                f"{len(timesteps)}) but got {given[:4].tolist()}; call step() once for each t in "
                "sampler.timesteps, in order, and set_timesteps() again to restart"
            )
        return index
