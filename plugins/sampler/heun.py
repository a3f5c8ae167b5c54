"""Heun's method (the explicit trapezoidal rule) on the flow ODE, as in EDM (Karras et al. 2022,
Algorithm 1) and diffusers' HeunDiscreteScheduler.

Each step from t_i to t_{i+1} evaluates the model twice: at (x_i, t_i), then at the Euler
prediction (x̃, t_{i+1}), and averages the two slopes. The last step ends at t = 0, where the
model is not evaluated, so it is a plain Euler step (EDM does the same). With n steps the model
is evaluated 2n - 1 times, at

    timesteps = [t_0, t_1, t_1, t_2, t_2, ..., t_{n-1}, t_{n-1}]

(every interior time twice: once as the corrector of the step that ends there, once as the
predictor of the step that starts there). Compare samplers at equal model evaluations, not steps.
"""

from __future__ import annotations

import torch

from skyloom.hookspecs import hookimpl
from skyloom.sampling import FlowSampler


class FlowHeunSampler(FlowSampler):
    """Second-order Heun steps; ≈ 2·num_steps - 1 model evaluations per run.

    shift: the default timestep shift for set_timesteps() (1 = a uniform grid).
    """

    def __init__(self, *, shift: float = 1.0) -> None:
        super().__init__(shift=shift)

    def _evaluation_times(self, grid: torch.Tensor) -> torch.Tensor:
        interior = grid[1:-1]
        return torch.cat([grid[:1], interior.repeat_interleave(2)])

    def _reset(self) -> None:
        self._predictor_state = None  # (x_i, v_i) while the corrector of step i is pending

    def _step(self, index, velocity, sample, generator):
        # Even evaluations are the predictor of step i = index/2, odd ones its corrector.
        i = index // 2
        t, t_next = float(self.time_grid[i]), float(self.time_grid[i + 1])
        dt = t_next - t
        if index % 2 == 0:
            # 1. slope at the start: d_i = v(x_i, t_i); Euler prediction x̃ = x_i + dt·d_i
            self._predictor_state = (sample, velocity)
            # 2. at t_{i+1} = 0 there is no corrector, so x̃ is the result (a final Euler step)
            return sample + dt * velocity
        # 3. slope at the end: d'_i = v(x̃, t_{i+1}); x_{i+1} = x_i + dt·(d_i + d'_i)/2
        start, start_velocity = self._predictor_state
        self._predictor_state = None
        return start + dt * 0.5 * (start_velocity + velocity)


@hookimpl
def register_samplers(register):
    register("heun", FlowHeunSampler, aliases=("flow-heun",))
