"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12 and 16) for the
flow's α_t = 1 - t, σ_t = t.

With η = 0 (the default) the sampler is deterministic; in this parameterisation its update is
exactly Euler's step on the flow ODE, x_s = x_t + (s - t)·v, written here the DDIM way. With
η = 1 it is ancestral sampling with the DDPM posterior variance; 0 < η < 1 interpolates, and
any η > 0 draws fresh noise from the generator at every step but the last.
"""

from __future__ import annotations

import math
from numbers import Real

from skyloom.hookspecs import hookimpl
from skyloom.sampling import FlowSampler, draw_noise, predicted_data, predicted_noise


class DDIMSampler(FlowSampler):
    """DDIM; one model evaluation per step.

    eta: η in [0, 1], the fraction of the DDPM posterior noise re-injected at each step
        (0: deterministic, 1: DDPM-like ancestral sampling).
    shift: the default timestep shift for set_timesteps() (1 = a uniform grid).
    """

    def __init__(self, *, eta: float = 0.0, shift: float = 1.0) -> None:
        if isinstance(eta, bool) or not isinstance(eta, Real) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1] (0 = deterministic DDIM), got {eta!r}")
        super().__init__(shift=shift, eta=float(eta))
        self.stochastic = eta > 0

    def _step(self, index, velocity, sample, generator):
        t, s = float(self.time_grid[index]), float(self.time_grid[index + 1])  # s < t
        alpha_t, sigma_t, alpha_s, sigma_s = 1 - t, t, 1 - s, s
        eta = self.config["eta"]
        # 1. predicted x_0 and ε (eq. 12): x̂_0 = x_t - t·v, ε̂ = x_t + (1 - t)·v
        data = predicted_data(sample, velocity, t)
        noise = predicted_noise(sample, velocity, t)
        # 2. σ_t(η) (eq. 16) for a general α, σ: η·(σ_s/σ_t)·√(σ_t² - (α_t/α_s)²·σ_s²), the
        #    DDPM posterior standard deviation times η (α_s = 1 - s > 0 since s < t ≤ 1)
        variance_t_given_s = max(sigma_t**2 - (alpha_t / alpha_s) ** 2 * sigma_s**2, 0.0)
        c = eta * (sigma_s / sigma_t) * math.sqrt(variance_t_given_s)
        # 3. the direction pointing to x_t: √(σ_s² - c²)·ε̂
        direction = math.sqrt(max(sigma_s**2 - c**2, 0.0)) * noise
        # 4. x_s = α_s·x̂_0 + √(σ_s² - c²)·ε̂ + c·z, z ~ N(0, I)
        prev_sample = alpha_s * data + direction
        if c > 0:
            prev_sample = prev_sample + c * draw_noise(sample, generator)
        return prev_sample


@hookimpl
def register_samplers(register):
    register("ddim", DDIMSampler)
