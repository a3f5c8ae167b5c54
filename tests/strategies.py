"""Hypothesis strategies shared by the tests: shapes bounded in size, with prime and size-1 axes.

Each area adds its strategies under its own header.
"""

from hypothesis import strategies as st

# Axis lengths that catch tiling and indexing bugs: 1, primes, and a few powers of two.
small_axis = st.sampled_from([1, 2, 3, 5, 7, 8, 11, 13, 16])

# --- requests ------------------------------------------------------------------------------


@st.composite
def valid_requests(draw, spatial_multiple: int = 8):
    from skyloom.request import GenerationRequest

    return GenerationRequest(
        prompt=draw(st.text(min_size=1, max_size=40).filter(str.strip)),
        negative_prompt=draw(st.text(max_size=20)),
        frames=draw(st.integers(1, 65)),
        width=spatial_multiple * draw(st.integers(1, 32)),
        height=spatial_multiple * draw(st.integers(1, 32)),
        fps=draw(st.floats(1, 60)),
        steps=draw(st.integers(1, 100)),
        guidance=draw(st.floats(0, 20)),
        guidance_interval=tuple(sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2)))),
        seed=draw(st.integers(0, 2**32)),
        sampler=draw(st.sampled_from(["euler", "heun"])),
    )

# --- ops -----------------------------------------------------------------------------------

low_precision_dtypes = st.sampled_from(["float16", "bfloat16"])  # names: strategies stay torch-free


@st.composite
def patch_problems(draw, max_numel=6000):
    """((B, C, T, H, W), (pt, ph, pw)) with T, H, W multiples of the patch size."""
    pt, ph, pw = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 4, 5]))
    B, C = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3, 4]))
    gt, gh, gw = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 5])), draw(st.sampled_from([1, 3, 7]))
    shape = (B, C, gt * pt, gh * ph, gw * pw)
    while B * C * gt * pt * gh * ph * gw * pw > max_numel and C > 1:
        C -= 1
        shape = (B, C, gt * pt, gh * ph, gw * pw)
    return shape, (pt, ph, pw)


@st.composite
def attention_problems(draw, max_tokens=160):
    """dict(shape=(B, T, S, heads, head_dim), mode, causal, valid_lengths list or None)."""
    mode = draw(st.sampled_from(["full", "spatial", "temporal"]))
    B = draw(st.sampled_from([1, 2]))
    T = draw(st.sampled_from([1, 2, 3, 5, 8]))
    S = draw(st.sampled_from([1, 2, 7, 13, 17, 31]))
    while T * S > max_tokens:
        S = max(1, S // 2)
    heads = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([1, 8, 16, 32, 59, 64]))
    causal = mode != "spatial" and draw(st.booleans())
    valid = None
    if mode == "full" and draw(st.booleans()):
        valid = [draw(st.integers(1, T)) for _ in range(B)]
    return dict(shape=(B, T, S, heads, head_dim), mode=mode, causal=causal, valid_lengths=valid)

# --- models --------------------------------------------------------------------------------

# Latent token grids (T', H', W'): size-1 axes, primes (that need padding to a 2x2 patch), small.
latent_grids = st.tuples(st.sampled_from([1, 2, 3, 5]), st.sampled_from([1, 2, 3, 5, 7]), st.sampled_from([1, 2, 3, 4, 7]))


@st.composite
def video_sizes(draw, temporal_compression: int, spatial_compression: int, max_latent: int = 3):
    """(frames, height, width) on a causal video autoencoder's grid: 1 + k·ct frames, multiples of cs."""
    k = draw(st.integers(0, max_latent - 1))
    h, w = draw(st.integers(1, max_latent)), draw(st.integers(1, max_latent))
    return 1 + k * temporal_compression, h * spatial_compression, w * spatial_compression

# --- samplers ------------------------------------------------------------------------------

# Times on the flow's axis, endpoints included: t = 1 is pure noise, t = 0 is data.
unit_times = st.floats(0.0, 1.0)
# Timestep shifts from well below 1 to well above (SD3 uses 3; long videos go past 10).
timestep_shifts = st.floats(0.05, 20.0)
sampler_num_steps = st.integers(1, 64)
# Transformer sequence lengths, from one token to a long high-resolution video.
token_counts = st.integers(1, 2**22)
guidance_scales = st.floats(-2.0, 20.0)


@st.composite
def velocity_pairs(draw, max_numel: int = 4096):
    """(cond, uncond): two float32 velocity tensors of one bounded shape, seeded by hypothesis."""
    import math

    import torch

    shape = draw(st.lists(small_axis, min_size=1, max_size=5).filter(lambda s: math.prod(s) <= max_numel))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
