"""DDPM ancestral sampling (Ho, Jain & Abbeel 2020, eq. 6-7) for the flow's α_t = 1 - t, σ_t = t.

Each step samples the forward process's posterior q(x_s | x_t, x_0) with x_0 replaced by the
model's estimate x̂_0 = x_t - t·v. For a general Gaussian forward process (Kingma et al. 2021,
"Variational Diffusion Models", appendix A) with α_{t|s} = α_t/α_s and
σ²_{t|s} = σ_t² - α_{t|s}²·σ_s², that posterior is N(μ̃, β̃·I) with

    μ̃ = (α_{t|s}·σ_s²/σ_t²)·x_t + (α_s·σ²_{t|s}/σ_t²)·x̂_0,     β̃ = σ²_{t|s}·σ_s²/σ_t².

Stochastic: fresh noise from the generator at every step but the last (which ends at σ_s = 0,
where β̃ = 0 and the result is x̂_0). It needs more steps than the ODE samplers (≈ 100).
"""

from __future__ import annotations

import math

from skyloom.hookspecs import hookimpl
from skyloom.sampling import FlowSampler, draw_noise, predicted_data


class DDPMSampler(FlowSampler):
    """DDPM ancestral sampling; one model evaluation per step.

    shift: the default timestep shift for set_timesteps() (1 = a uniform grid).
    """

    stochastic = True

    def __init__(self, *, shift: float = 1.0) -> None:
        super().__init__(shift=shift)

    def _step(self, index, velocity, sample, generator):
        t, s = float(self.time_grid[index]), float(self.time_grid[index + 1])  # s < t
        alpha_t, sigma_t, alpha_s, sigma_s = 1 - t, t, 1 - s, s
        # 1. x̂_0 = x_t - t·v
        data = predicted_data(sample, velocity, t)
        # 2. the transition from s to t: α_{t|s} = α_t/α_s, σ²_{t|s} = σ_t² - α_{t|s}²·σ_s²
        alpha_ts = alpha_t / alpha_s
        variance_ts = max(sigma_t**2 - alpha_ts**2 * sigma_s**2, 0.0)
        # 3. posterior mean μ̃(x_t, x̂_0) (eq. 7)
        mean = (alpha_ts * sigma_s**2 / sigma_t**2) * sample + (alpha_s * variance_ts / sigma_t**2) * data
        # 4. posterior variance β̃ = σ²_{t|s}·σ_s²/σ_t²
        variance = variance_ts * sigma_s**2 / sigma_t**2
        # 5. x_s = μ̃ + √β̃·z, z ~ N(0, I) (eq. 6); no noise on the last step, where β̃ = 0
        if variance > 0:
            return mean + math.sqrt(variance) * draw_noise(sample, generator)
        return mean


@hookimpl
def register_samplers(register):
    register("ddpm", DDPMSampler)
