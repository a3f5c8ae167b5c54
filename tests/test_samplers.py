"""Samplers: one shared contract for every registered sampler and the third-party example, the
accuracy of each on a problem with a known answer, and the shared math of skyloom.sampling.

The known answer: data x_0 ~ N(μ, diag(s²)) has, under x_t = (1 - t)·x_0 + t·ε, the exact
velocity field v(x, t) = E[ε | x_t = x] - E[x_0 | x_t = x], linear in x. Its flow ODE carries
noise ε to exactly μ + s·ε, so a deterministic sampler can be checked point by point, and a
stochastic one by the mean and spread of what it lands on.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from skyloom.kinds import Sampler
from skyloom.registry import DEFAULT_PLUGINS, Registry
from skyloom.sampling import (
    BASE_NUM_TOKENS,
    classifier_free_guidance,
    flow_time_grid,
    resolution_shift,
    shift_time,
)
from tests.strategies import (
    guidance_scales,
    sampler_num_steps,
    timestep_shifts,
    token_counts,
    unit_times,
    velocity_pairs,
)


def _load_example_sampler():
    """The third-party package's sampler, loaded from its file (the package itself is installed
    only inside tests/test_third_party_plugins.py)."""
    path = Path(__file__).parent / "plugin_package" / "skyloom_example_plugins" / "sampler.py"
    spec = importlib.util.spec_from_file_location("skyloom_example_sampler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ExampleSampler


ExampleSampler = _load_example_sampler()

SAMPLER_MODULES = [module for module in DEFAULT_PLUGINS if ".plugins.sampler." in module]
REGISTRY = Registry.load(builtins=SAMPLER_MODULES, entry_points=False, strict=True)

# Every registered sampler with its default config, DDIM's stochastic variant, and the example.
SAMPLER_CASES = {name: REGISTRY.get("sampler", name).factory for name in REGISTRY.names("sampler")}
SAMPLER_CASES["ddim[eta=0.5]"] = functools.partial(REGISTRY.get("sampler", "ddim").factory, eta=0.5)
SAMPLER_CASES["example-midpoint"] = ExampleSampler

# The order of accuracy each deterministic sampler promises (halving the step halves the error
# for order 1 and quarters it for order 2).
ORDER = {"euler": 1, "ddim": 1, "heun": 2, "dpmpp-2m": 2, "example-midpoint": 2}

# --- the Gaussian problem ------------------------------------------------------------------

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
SCALE = torch.tensor([0.6, 1.3], dtype=torch.float64)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The exact v(x, t) for x_0 ~ N(MU, SCALE²): x_t ~ N((1 - t)μ, (1 - t)²s² + t²), and
    E[x_0 | x_t] = μ + (1 - t)s²·c/var, E[ε | x_t] = t·c/var with c = x_t - (1 - t)μ."""
    t = float(t)
    mu, s2 = MU.to(x.dtype), SCALE.to(x.dtype) ** 2
    var = (1 - t) ** 2 * s2 + t**2
    centred = x - (1 - t) * mu
    expected_data = mu + (1 - t) * s2 / var * centred
    expected_noise = t / var * centred
    return expected_noise - expected_data


def sample_from_noise(sampler, num_steps, *, shift=1.0, seed=0, count=256, dtype=torch.float64, step_seed=None):
    """The caller's loop from kinds.Sampler: returns (starting noise, final sample).

    step_seed: seed a separate generator for step() (default: keep using the noise's)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, 2, generator=generator, dtype=dtype)
    if step_seed is not None:
        generator = torch.Generator().manual_seed(step_seed)
    sampler.set_timesteps(num_steps, shift=shift)
    sample = noise
    for t in sampler.timesteps:
        sample = sampler.step(gaussian_velocity(sample, t), t, sample, generator=generator)
    return noise, sample


def transport_error(sampler, num_steps, shift=1.0) -> float:
    """Largest distance from the exact ODE solution μ + s·ε."""
    noise, sample = sample_from_noise(sampler, num_steps, shift=shift)
    return float((sample - (MU + SCALE * noise)).abs().max())


# --- the shared contract -------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(SAMPLER_CASES), ids=list(SAMPLER_CASES))
def case(request):
    return request.param, SAMPLER_CASES[request.param]


class TestSamplerContract:
    """What the pipeline relies on from any sampler, built-in or third-party."""

    def test_is_a_sampler_with_recorded_config(self, case):
        _, make = case
        sampler = make()
        assert isinstance(sampler, Sampler)
        assert isinstance(sampler.config, dict)
        assert isinstance(sampler.stochastic, bool)

    @given(num_steps=sampler_num_steps, shift=timestep_shifts)
    def test_timesteps_start_at_noise_and_decrease(self, case, num_steps, shift):
        _, make = case
        sampler = make()
        sampler.set_timesteps(num_steps, shift=shift)
        ts = sampler.timesteps
        assert ts.ndim == 1 and ts.dtype.is_floating_point
        assert num_steps <= len(ts) <= 2 * num_steps  # one or two model evaluations per step
        assert float(ts[0]) == 1.0  # every run starts at pure noise
        assert bool((ts[1:] <= ts[:-1]).all()), "evaluation times must not increase"
        assert bool((ts > 0).all() & (ts <= 1).all())

    @given(num_steps=st.integers(2, 64), shift=st.floats(1.5, 20.0))
    def test_shift_moves_evaluations_towards_noise(self, case, num_steps, shift):
        _, make = case
        sampler = make()
        sampler.set_timesteps(num_steps)
        plain = sampler.timesteps.clone()
        sampler.set_timesteps(num_steps, shift=1.0)
        assert torch.equal(sampler.timesteps, plain), "the default shift is 1 (no shift)"
        sampler.set_timesteps(num_steps, shift=shift)
        shifted = sampler.timesteps
        assert shifted.shape == plain.shape
        assert bool((shifted >= plain).all()) and bool((shifted > plain).any())

    @pytest.mark.parametrize("shift", [1.0, 3.0])
    def test_lands_on_the_data_distribution(self, case, shift):
        _, make = case
        sampler = make()
        count = 16_000  # 32k values: below torch's grain size, so one thread (no spinning on a busy box)
        num_steps = 100 if sampler.stochastic else 40
        _, sample = sample_from_noise(sampler, num_steps, shift=shift, count=count, seed=1)
        # Four standard errors of the estimates, plus the discretisation error at this many steps.
        mean_error = (sample.mean(0) - MU).abs()
        std_error = (sample.std(0) / SCALE - 1).abs()
        assert bool((mean_error < 0.02 + 4 * SCALE / math.sqrt(count)).all()), mean_error
        assert bool((std_error < 0.07 + 4 / math.sqrt(2 * count)).all()), std_error

    def test_deterministic_samplers_converge_to_the_exact_solution(self, case):
        name, make = case
        if make().stochastic:
            pytest.skip("stochastic: checked by its distribution")
        if name not in ORDER:
            pytest.fail(f"add {name!r} to ORDER with the order of accuracy it promises")
        for shift in (1.0, 3.0):
            coarse, fine = transport_error(make(), 20, shift), transport_error(make(), 80, shift)
            assert fine < 0.1 and fine < coarse / 3, (shift, coarse, fine)
        if ORDER[name] >= 2:
            coarse, fine = transport_error(make(), 20), transport_error(make(), 80)
            assert fine < coarse / 6, f"{name} should be second order: error {coarse:.2e} -> {fine:.2e} for 4× steps"

    def test_same_seed_same_samples_different_seed_differ(self, case):
        _, make = case
        _, first = sample_from_noise(make(), 6, shift=2.0, seed=7)
        _, again = sample_from_noise(make(), 6, shift=2.0, seed=7)
        _, other = sample_from_noise(make(), 6, shift=2.0, seed=8)
        assert torch.equal(first, again)
        assert not torch.allclose(first, other)

    def test_randomness_comes_only_from_the_generator(self, case):
        _, make = case
        sampler = make()
        torch.manual_seed(1)
        _, first = sample_from_noise(sampler, 6, seed=0, step_seed=10)
        torch.manual_seed(2)  # the global RNG must not matter
        _, again = sample_from_noise(sampler, 6, seed=0, step_seed=10)
        _, other_steps = sample_from_noise(sampler, 6, seed=0, step_seed=11)
        assert torch.equal(first, again)
        if sampler.stochastic:
            assert not torch.allclose(first, other_steps), "a stochastic sampler must draw from the generator"
        else:
            assert torch.equal(first, other_steps), "a deterministic sampler must not depend on the generator"

    def test_no_state_leaks_between_runs(self, case):
        _, make = case
        _, fresh = sample_from_noise(make(), 7, shift=2.0, seed=3)
        sampler = make()
        sample_from_noise(sampler, 4, seed=5)  # a finished run with another grid
        sampler.set_timesteps(5, shift=3.0)  # and an abandoned one, stopped mid-way
        x = torch.randn(256, 2, dtype=torch.float64)
        for t in sampler.timesteps[:3]:
            x = sampler.step(gaussian_velocity(x, t), t, x, generator=torch.Generator().manual_seed(0))
        _, reused = sample_from_noise(sampler, 7, shift=2.0, seed=3)
        assert torch.equal(reused, fresh)

    def test_a_run_started_part_way_continues_the_full_run(self, case):
        """set_begin_step(k), given the sample the full run had where step k begins (video
        editing starts so): deterministic samplers whose steps keep no history end exactly where
        the full run ends. DPM-Solver++(2M) restarts its history with a first-order step (0.03
        off on average), and the stochastic ones draw other noise: they land on the same
        distribution (means and spreads within 0.1 of the full run's over 1,024 samples; 0.06
        measured)."""
        name, factory = case
        full, part = factory(), factory()
        full.set_timesteps(6)
        part.set_timesteps(6)
        first = part.set_begin_step(2)
        assert float(part.timesteps[first]) == pytest.approx(float(flow_time_grid(6)[2]))
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(1024, 2, dtype=torch.float64, generator=generator)
        for index, t in enumerate(full.timesteps):
            if index == first:
                midway = sample
            sample = full.step(gaussian_velocity(sample, t), t, sample, generator=generator)
        resumed = midway
        for t in part.timesteps[first:]:
            resumed = part.step(gaussian_velocity(resumed, t), t, resumed, generator=generator)
        if name in ("euler", "heun", "ddim", "example-midpoint"):
            torch.testing.assert_close(resumed, sample, rtol=0, atol=1e-12)
        elif name == "dpmpp-2m":
            assert float((resumed - sample).abs().mean()) < 0.05
        else:
            torch.testing.assert_close(resumed.mean(0), sample.mean(0), rtol=0, atol=0.1)
            torch.testing.assert_close(resumed.std(0), sample.std(0), rtol=0, atol=0.1)

    def test_set_begin_step_is_checked(self, case):
        _, factory = case
        sampler = factory()
        sampler.set_timesteps(4)
        with pytest.raises(ValueError, match="step must be"):
            sampler.set_begin_step(4)
        sample = torch.zeros(4, 2, dtype=torch.float64)
        t = sampler.timesteps[0]
        sampler.step(gaussian_velocity(sample, t), t, sample)
        with pytest.raises(RuntimeError, match="right after set_timesteps"):
            sampler.set_begin_step(1)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_step_keeps_shape_and_dtype_of_a_latent_video(self, case, dtype):
        _, make = case
        sampler = make()
        sampler.set_timesteps(3)
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(1, 4, 3, 5, 7, generator=generator).to(dtype)  # (B, C, T, H, W)
        for t in sampler.timesteps:
            velocity = -sample.float()  # any velocity field will do; the model may answer in float32
            sample = sampler.step(velocity.to(dtype), t, sample, generator=generator)
            assert sample.shape == (1, 4, 3, 5, 7) and sample.dtype == dtype
            assert bool(torch.isfinite(sample).all())

    def test_step_before_set_timesteps_says_what_to_call(self, case):
        _, make = case
        sample = torch.zeros(2, 2)
        with pytest.raises(RuntimeError, match="set_timesteps"):
            make().step(sample, 1.0, sample)

    def test_step_after_the_run_says_what_to_call(self, case):
        _, make = case
        sampler = make()
        _, sample = sample_from_noise(sampler, 2)
        with pytest.raises(RuntimeError, match="set_timesteps"):
            sampler.step(sample, 0.0, sample)

    @pytest.mark.parametrize("num_steps", [0, -3, 2.5, "10", True])
    def test_rejects_bad_num_steps(self, case, num_steps):
        _, make = case
        with pytest.raises(ValueError, match="num_steps"):
            make().set_timesteps(num_steps)

    @pytest.mark.parametrize("shift", [0.0, -1.0, float("nan"), float("inf")])
    def test_rejects_bad_shift(self, case, shift):
        _, make = case
        with pytest.raises(ValueError, match="shift"):
            make().set_timesteps(10, shift=shift)


# --- the built-in samplers -----------------------------------------------------------------


def test_builtin_samplers_are_registered_with_their_aliases():
    assert {"euler", "heun", "dpmpp-2m", "ddim", "ddpm"} <= set(REGISTRY.names("sampler"))
    assert REGISTRY.get("sampler", "dpmpp_2m").name == "dpmpp-2m"
    assert REGISTRY.load_errors == []


@pytest.mark.parametrize("num_steps", [1, 2, 7])
def test_heun_evaluates_interior_times_twice(num_steps):
    sampler = REGISTRY.create("sampler", "heun")
    sampler.set_timesteps(num_steps, shift=3.0)
    grid = flow_time_grid(num_steps, 3.0).float()
    expected = [grid[0]] + [t for t in grid[1:-1] for _ in range(2)]
    assert len(sampler.timesteps) == 2 * num_steps - 1
    assert torch.equal(sampler.timesteps, torch.stack(expected))


def test_example_midpoint_evaluates_each_step_and_its_midpoint():
    sampler = ExampleSampler()
    sampler.set_timesteps(4)
    assert torch.allclose(sampler.timesteps, torch.tensor([1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]))


def test_deterministic_ddim_is_euler_on_the_flow():
    _, ddim = sample_from_noise(REGISTRY.create("sampler", "ddim"), 9, shift=3.0)
    _, euler = sample_from_noise(REGISTRY.create("sampler", "euler"), 9, shift=3.0)
    assert torch.allclose(ddim, euler, rtol=0, atol=1e-12)


def test_ddpm_is_ddim_with_eta_one():
    """The DDPM posterior and DDIM's η = 1 are one distribution written two ways; with one
    generator they draw the same noise, so they must agree."""
    _, ddpm = sample_from_noise(REGISTRY.create("sampler", "ddpm"), 12, shift=2.0, step_seed=4)
    _, ddim = sample_from_noise(REGISTRY.create("sampler", "ddim", eta=1.0), 12, shift=2.0, step_seed=4)
    assert torch.allclose(ddpm, ddim, rtol=0, atol=1e-10)


def test_dpmpp_2m_matches_the_papers_update_in_lambda():
    """Against DPM-Solver++(2M) written as in Lu et al. (Algorithm 2), with exp(-h) in λ, first
    order where an h is infinite (the first two steps and the last)."""
    num_steps, shift = 9, 2.0
    grid = flow_time_grid(num_steps, shift).tolist()
    lam = lambda t: math.log((1 - t) / t)  # noqa: E731
    noise, sample = sample_from_noise(REGISTRY.create("sampler", "dpmpp-2m"), num_steps, shift=shift)
    x, previous = noise, None
    for i in range(num_steps):
        t, t_next = grid[i], grid[i + 1]
        data = x - t * gaussian_velocity(x, torch.tensor(t, dtype=torch.float32))
        if t_next == 0:
            x = data
        elif t == 1:
            x = t_next * x + (1 - t_next) * data  # the limit λ_t -> -∞
        else:
            h = lam(t_next) - lam(t)
            D = data
            if i >= 2:
                r = (lam(t) - lam(grid[i - 1])) / h
                D = (1 + 1 / (2 * r)) * data - 1 / (2 * r) * previous
            x = (t_next / t) * x - (1 - t_next) * (math.exp(-h) - 1) * D
        previous = data
    assert torch.allclose(sample, x, rtol=0, atol=1e-10)


def test_ddim_eta_is_checked_and_sets_stochastic():
    assert REGISTRY.create("sampler", "ddim").stochastic is False
    assert REGISTRY.create("sampler", "ddim", eta=0.3).stochastic is True
    assert REGISTRY.create("sampler", "ddim", eta=0.3).config["eta"] == 0.3
    for eta in (-0.1, 1.5, float("nan"), "1"):
        with pytest.raises(ValueError, match="eta"):
            REGISTRY.create("sampler", "ddim", eta=eta)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp-2m", "ddim", "ddpm"])
def test_constructor_shift_is_the_default_for_set_timesteps(name):
    sampler = REGISTRY.create("sampler", name, shift=3.0)
    assert sampler.config["shift"] == 3.0
    sampler.set_timesteps(5)
    configured = sampler.timesteps.clone()
    sampler.set_timesteps(5, shift=3.0)
    assert torch.equal(sampler.timesteps, configured)
    sampler.set_timesteps(5, shift=1.0)  # a shift given to set_timesteps wins
    assert not torch.equal(sampler.timesteps, configured)
    with pytest.raises(ValueError, match="shift"):
        REGISTRY.create("sampler", name, shift=0)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp-2m", "ddim", "ddpm"])
def test_step_checks_it_is_given_the_next_timestep(name):
    sampler = REGISTRY.create("sampler", name)
    sampler.set_timesteps(4)
    sample = torch.zeros(3)
    with pytest.raises(ValueError, match="expected timestep 1.0"):
        sampler.step(sample, sampler.timesteps[1], sample)  # skipped the first
    sampler.step(sample, torch.full((3,), 1.0), sample)  # a per-sample batch of one time is fine
    with pytest.raises(ValueError, match="model_output has shape"):
        sampler.step(torch.zeros(4), sampler.timesteps[1], sample)


# --- skyloom.sampling ----------------------------------------------------------------------


@given(t=unit_times, shift=timestep_shifts)
def test_shift_fixes_the_endpoints_and_one_is_identity(t, shift):
    assert shift_time(0.0, shift) == 0.0 and shift_time(1.0, shift) == 1.0
    assert shift_time(t, 1.0) == t
    assert 0.0 <= shift_time(t, shift) <= 1.0


@given(a=unit_times, b=unit_times, shift=timestep_shifts)
def test_shift_is_increasing_in_time(a, b, shift):
    assume(a < b)
    assert shift_time(a, shift) <= shift_time(b, shift) + 1e-15  # up to rounding


@given(t=st.floats(0.01, 0.99), a=timestep_shifts, b=timestep_shifts)
def test_shifts_compose_by_multiplying(t, a, b):
    """t' = s·t/(1 + (s - 1)·t) multiplies the odds t/(1 - t) by s, so shifts compose by product
    and 1/s undoes s."""
    assert math.isclose(shift_time(shift_time(t, a), b), shift_time(t, a * b), rel_tol=1e-9)
    assert math.isclose(shift_time(shift_time(t, a), 1 / a), t, rel_tol=1e-9)
    if a > 1:
        assert shift_time(t, a) > t


@given(num_steps=sampler_num_steps, shift=timestep_shifts)
def test_time_grid_runs_from_one_to_zero(num_steps, shift):
    grid = flow_time_grid(num_steps, shift)
    assert grid.shape == (num_steps + 1,) and grid.dtype == torch.float64
    assert grid[0] == 1.0 and grid[-1] == 0.0
    assert bool((grid[1:] < grid[:-1]).all())


@given(a=token_counts, b=token_counts)
def test_resolution_shift_grows_with_the_number_of_tokens(a, b):
    assume(a < b)
    assert resolution_shift(a) < resolution_shift(b)


@given(tokens=token_counts, base_shift=st.floats(0.5, 5.0))
def test_resolution_shift_is_the_square_root_of_the_token_ratio(tokens, base_shift):
    assert resolution_shift(BASE_NUM_TOKENS, base_shift=base_shift) == base_shift
    assert math.isclose(resolution_shift(4 * tokens), 2 * resolution_shift(tokens), rel_tol=1e-12)
    assert math.isclose(resolution_shift(tokens, base_tokens=tokens, base_shift=base_shift), base_shift)


def test_resolution_shift_base_is_one_512px_frame():
    # 512×512 through an 8× autoencoder and 2×2 patches; a 4× longer sequence doubles the shift.
    assert BASE_NUM_TOKENS == (512 // 8 // 2) ** 2
    assert resolution_shift(4 * BASE_NUM_TOKENS) == 2.0
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="num_tokens"):
            resolution_shift(bad)
    with pytest.raises(ValueError, match="base_shift"):
        resolution_shift(100, base_shift=0.0)


@given(pair=velocity_pairs())
def test_guidance_scale_one_is_no_guidance(pair):
    cond, uncond = pair
    assert torch.equal(classifier_free_guidance(cond, uncond, 1.0), cond)
    assert torch.allclose(classifier_free_guidance(cond, uncond, 0.0), uncond, atol=1e-6)


@given(pair=velocity_pairs(), scale=guidance_scales)
def test_guidance_extrapolates_from_uncond_through_cond(pair, scale):
    cond, uncond = pair
    guided = classifier_free_guidance(cond, uncond, scale)
    assert guided.shape == cond.shape
    assert torch.allclose(guided, uncond + scale * (cond - uncond), atol=1e-4)
    assert torch.equal(classifier_free_guidance(cond, cond, scale), cond)  # agreeing predictions


def test_guidance_checks_its_inputs():
    with pytest.raises(ValueError, match="one shape"):
        classifier_free_guidance(torch.zeros(2, 3), torch.zeros(3, 2), 5.0)
    with pytest.raises(ValueError, match="finite"):
        classifier_free_guidance(torch.zeros(2), torch.zeros(2), float("nan"))
