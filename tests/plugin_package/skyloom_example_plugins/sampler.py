"""A third-party sampler: the explicit midpoint method (RK2) on the flow ODE.

It implements skyloom.kinds.Sampler directly, with its own bookkeeping, to show (and test) that
a sampler needs nothing from skyloom but the interface and, optionally, skyloom.sampling's grid.
Each step from t_i to t_{i+1} evaluates the model at t_i and at the midpoint
m_i = (t_i + t_{i+1})/2, so the model is evaluated 2·num_steps times, never at t = 0.
"""

from __future__ import annotations

import torch

from skyloom.kinds import Sampler
from skyloom.sampling import flow_time_grid


class ExampleSampler(Sampler):
    """Midpoint (RK2): x_{i+1} = x_i + Δt·v(x_i + (Δt/2)·v(x_i, t_i), m_i)."""

    def __init__(self) -> None:
        self.config = {}
        self._grid = None

    @property
    def timesteps(self) -> torch.Tensor:
        if self._grid is None:
            raise RuntimeError("ExampleSampler: call set_timesteps(num_steps) first")
        return self._timesteps

    def set_timesteps(self, num_steps: int, *, shift: float = 1.0) -> None:
        grid = flow_time_grid(num_steps, shift)  # checks num_steps and shift
        midpoints = (grid[:-1] + grid[1:]) / 2
        self._grid = grid
        self._timesteps = torch.stack([grid[:-1], midpoints], dim=1).reshape(-1).float()  # t_0, m_0, t_1, m_1, ...
        self._index = 0
        self._start = None  # (x_i, Δt) while the midpoint evaluation of step i is pending

    def set_begin_step(self, step: int) -> int:
        # Optional: starting part-way lets `GenerationRequest(video=...)` edit videos with this sampler.
        if self._grid is None or self._index != 0:
            raise RuntimeError("ExampleSampler.set_begin_step: call it right after set_timesteps(num_steps)")
        if not 0 <= step < len(self._grid) - 1:
            raise ValueError(f"ExampleSampler.set_begin_step: step must be in 0..{len(self._grid) - 2}, got {step}")
        self._index = 2 * step  # step i's evaluations are 2i (at t_i) and 2i + 1 (at its midpoint)
        return self._index

    def step(self, model_output, timestep, sample, *, generator=None):
        if self._grid is None:
            raise RuntimeError("ExampleSampler.step: call set_timesteps(num_steps) before step()")
        if self._index >= len(self._timesteps):
            raise RuntimeError("ExampleSampler.step: this run is done; call set_timesteps(num_steps) again")
        i, is_midpoint = divmod(self._index, 2)
        self._index += 1
        dt = float(self._grid[i + 1] - self._grid[i])
        if not is_midpoint:
            # 1. half an Euler step to the midpoint: x_m = x_i + (Δt/2)·v(x_i, t_i)
            self._start = sample
            return sample + 0.5 * dt * model_output
        # 2. the full step with the midpoint's slope: x_{i+1} = x_i + Δt·v(x_m, m_i)
        start, self._start = self._start, None
        return start + dt * model_output
