"""DPM-Solver++(2M): the second-order multistep solver of Lu et al. 2022 ("DPM-Solver++: Fast
Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2), in the
data-prediction form, for the flow's α_t = 1 - t and σ_t = t.

It integrates the ODE exactly in its linear part, in the half-log-SNR λ_t = log(α_t/σ_t) =
log((1 - t)/t), and extrapolates the data prediction x̂_0 = x_t - t·v linearly in λ from the
last two model evaluations. One model evaluation per step, at t_0 = 1, ..., t_{n-1}.

The endpoints have λ = ±∞: λ_{t_0} = -∞ at t = 1 and λ_{t_n} = +∞ at t = 0. The update is
written with the closed-form coefficients below, which are finite there; a step whose own or
previous λ-step h is infinite (the first two and the last) is a first-order step, the limit
of the 2M formula as h_{i-1} → ∞ and diffusers' `lower_order_final` respectively.
"""

from __future__ import annotations

import math

from skyloom.hookspecs import hookimpl
from skyloom.sampling import FlowSampler, predicted_data


def half_log_snr(t: float) -> float:
    """λ_t = log(α_t/σ_t) = log((1 - t)/t), for 0 < t < 1."""
    return math.log1p(-t) - math.log(t)


class DPMSolverPlusPlus2MSampler(FlowSampler):
    """DPM-Solver++(2M), deterministic; one model evaluation per step.

    shift: the default timestep shift for set_timesteps() (1 = a uniform grid).
    """

    def __init__(self, *, shift: float = 1.0) -> None:
        super().__init__(shift=shift)

    def _reset(self) -> None:
        self._previous_data = None  # x̂_0 from the previous step, x_θ(x̃_{t_{i-1}}, t_{i-1})

    def _step(self, index, velocity, sample, generator):
        grid = self.time_grid
        t, t_next = float(grid[index]), float(grid[index + 1])
        # 1. data prediction x_θ(x̃_{t_i}, t_i) = (x_t - σ_t·ε̂)/α_t, which is x_t - t·v for the flow
        data = predicted_data(sample, velocity, t)
        # 2. D_i = (1 + 1/(2r_i))·x_θ,i - 1/(2r_i)·x_θ,i-1, with r_i = h_{i-1}/h_i and
        #    h_i = λ_{t_{i+1}} - λ_{t_i}; first order (D_i = x_θ,i) when h_{i-1} or h_i is infinite
        t_prev = float(grid[index - 1]) if index > 0 else 1.0
        if self._previous_data is not None and t_prev < 1.0 and t_next > 0.0:
            lam_prev, lam, lam_next = half_log_snr(t_prev), half_log_snr(t), half_log_snr(t_next)
            r = (lam - lam_prev) / (lam_next - lam)
            D = (1 + 1 / (2 * r)) * data - (1 / (2 * r)) * self._previous_data
        else:
            D = data
        self._previous_data = data
        # 3. x̃_{t_{i+1}} = (σ_{i+1}/σ_i)·x̃_{t_i} - α_{i+1}·(e^{-h_i} - 1)·D_i, where for α = 1 - t,
        #    σ = t: σ_{i+1}/σ_i = t_{i+1}/t_i and -α_{i+1}(e^{-h_i} - 1) = (1 - t_{i+1}) - (1 - t_i)·t_{i+1}/t_i,
        #    finite at t_i = 1 (x = t_{i+1}·x + (1 - t_{i+1})·D) and t_{i+1} = 0 (x = D)
        sample_coef = t_next / t
        data_coef = (1 - t_next) - (1 - t) * t_next / t
        return sample_coef * sample + data_coef * D


@hookimpl
def register_samplers(register):
    register("dpmpp-2m", DPMSolverPlusPlus2MSampler, aliases=("dpmpp_2m", "dpm++2m"))
