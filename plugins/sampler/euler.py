"""Euler's method on the flow ODE dx/dt = v(x, t), from t = 1 (noise) to t = 0 (data).

The first-order sampler of rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): one model
evaluation per step, at t_0 = 1, t_1, ..., t_{n-1}. Deterministic: the only randomness of a run
is its starting noise.
"""

from __future__ import annotations

from skyloom.hookspecs import hookimpl
from skyloom.sampling import FlowSampler


class FlowEulerSampler(FlowSampler):
    """Euler steps x_{i+1} = x_i + (t_{i+1} - t_i)·v(x_i, t_i).

    shift: the default timestep shift for set_timesteps() (1 = a uniform grid).
    """

    def __init__(self, *, shift: float = 1.0) -> None:
        super().__init__(shift=shift)

    def _step(self, index, velocity, sample, generator):
        t, t_next = float(self.time_grid[index]), float(self.time_grid[index + 1])
        # 1. the step size; negative, time runs from noise to data
        dt = t_next - t
        # 2. x_{t+dt} = x_t + dt·v(x_t, t)
        return sample + dt * velocity


@hookimpl
def register_samplers(register):
    register("euler", FlowEulerSampler, aliases=("flow-euler",))
