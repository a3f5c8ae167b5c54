"""SpacetimeDiT: shapes on any latent grid, adaLN-Zero init, conditioning paths, RoPE, config errors."""

import math

import pytest
import torch
from hypothesis import given, settings

from skyloom import ops
from skyloom.transformer import (
    DIT_CONFIGS, SAMPLE_PREDICTION_MIN_T, DiTConfig, SpacetimeDiT, apply_rope, dit_config, text_attention,
)

from .strategies import latent_grids

C, TEXT_DIM = 4, 16
TINY = dict(in_channels=C, text_dim=TEXT_DIM, hidden_size=32, depth=2, num_heads=2, patch_size=(1, 2, 2))


def make(seed=0, **overrides) -> SpacetimeDiT:
    torch.manual_seed(seed)
    return SpacetimeDiT(DiTConfig(**{**TINY, **overrides}))


def randomize_(model: SpacetimeDiT, seed=1) -> SpacetimeDiT:
    """Give every zero-initialised layer random weights, as a trained model would have."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(B=2, T=3, H=4, W=4, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, T, H, W, generator=g)
    t = torch.rand(B, generator=g)
    text = torch.randn(B, L, TEXT_DIM, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    return x, t, text, mask


@pytest.fixture(scope="module", params=["cross", "joint"])
def trained_like(request):
    modes = ("spatial", "temporal") if request.param == "cross" else ("full",)
    return randomize_(make(attention_modes=modes, text_conditioning=request.param)).eval()


@given(grid=latent_grids)
@settings(max_examples=15)
def test_output_shape_equals_input_shape_on_any_grid(trained_like, grid):
    T, H, W = grid
    x, t, text, mask = inputs(B=1, T=T, H=H, W=W)
    with torch.no_grad():
        v = trained_like(x, t, text, mask)
    assert v.shape == x.shape
    assert torch.isfinite(v).all()


@given(grid=latent_grids)
@settings(max_examples=15)
def test_token_count_is_the_padded_patch_grid(grid):
    T, H, W = grid
    pt, ph, pw = TINY["patch_size"]
    padded = torch.zeros(1, 2 * C + 1, math.ceil(T / pt) * pt, math.ceil(H / ph) * ph, math.ceil(W / pw) * pw)
    tokens = ops.patchify(padded, TINY["patch_size"])
    assert tokens.shape == (1, math.ceil(T / pt) * math.ceil(H / ph) * math.ceil(W / pw), (2 * C + 1) * pt * ph * pw)
    assert DiTConfig.from_dict(TINY).num_tokens(T, H, W) == tokens.shape[1]
    # And with patch (1, 1, 1) the token count is exactly T'·H'·W'.
    assert ops.patchify(torch.zeros(1, 2 * C + 1, T, H, W), (1, 1, 1)).shape[1] == T * H * W


def test_model_embeds_one_token_per_patch(monkeypatch):
    seen = []
    real = ops.patchify
    monkeypatch.setattr(ops, "patchify", lambda x, p: seen.append(real(x, p)) or seen[-1])
    model = make(patch_size=(1, 1, 1)).eval()
    x, t, text, mask = inputs(B=1, T=2, H=3, W=5)
    with torch.no_grad():
        model(x, t, text, mask)
    assert seen[0].shape == (1, 2 * 3 * 5, 2 * C + 1)


@pytest.mark.parametrize("text_conditioning", ["cross", "joint"])
def test_adaln_zero_init_gives_exactly_zero_velocity(text_conditioning):
    model = make(attention_modes=("full",), text_conditioning=text_conditioning).eval()
    x, t, text, mask = inputs()
    with torch.no_grad():
        v = model(x, t, text, mask, cond_latent=torch.randn_like(x), cond_mask=torch.ones(2, 3))
    assert torch.equal(v, torch.zeros_like(x))


@pytest.mark.parametrize("text_conditioning", ["cross", "joint"])
def test_blocks_start_as_the_identity(text_conditioning):
    model = make(attention_modes=("full",), text_conditioning=text_conditioning).eval()
    h = torch.randn(2, 3, 4, TINY["hidden_size"])
    c = torch.randn(2, TINY["hidden_size"])
    text, mask = torch.randn(2, 5, TINY["hidden_size"]), torch.ones(2, 5, dtype=torch.bool)
    rope = model.rope((3, 2, 2), h.device)
    with torch.no_grad():
        for block in model.blocks:
            out, out_text = block(h, c, text, mask, rope)
            assert torch.equal(out, h) and torch.equal(out_text, text)


def test_joint_blocks_carry_what_the_video_made_of_the_text_to_the_next_block():
    model = randomize_(make(attention_modes=("full",), text_conditioning="joint", depth=3)).eval()
    h, h2 = torch.randn(2, 2, 3, 4, TINY["hidden_size"])
    c = torch.randn(2, TINY["hidden_size"])
    text, mask = torch.randn(2, 5, TINY["hidden_size"]), torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    rope = model.rope((3, 2, 2), h.device)
    with torch.no_grad():
        first, last = model.blocks[0], model.blocks[-1]
        _, text_a = first(h, c, text, mask, rope)
        _, text_b = first(h2, c, text, mask, rope)
        assert not torch.allclose(text_a, text_b)  # the text tokens read the video
        noisy = text.clone()
        noisy[0, 3:] += 10
        _, text_c = first(h, c, noisy, mask, rope)
        torch.testing.assert_close(text_c[0, :3], text_a[0, :3])  # and not the padding
        out, text_d = last(h, c, text, mask, rope)
        assert torch.equal(text_d, text) and not torch.allclose(out, h)  # the last block only reads the text
    assert not hasattr(last, "text_mlp") and last.attn.text_proj is None


def test_a_joint_model_drops_the_prompt_columns_that_are_padding_in_every_prompt():
    model = randomize_(make(attention_modes=("full",), text_conditioning="joint")).eval()
    x, t, text, mask = inputs(L=4)
    mask[0, 3] = False
    padded_text = torch.cat([text, torch.randn(2, 60, TEXT_DIM)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 60, dtype=torch.bool)], dim=1)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[2].shape[1]))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, padded_text, padded_mask), model(x, t, text, mask))
        model(x, t, padded_text, torch.zeros_like(padded_mask))  # empty prompts keep one masked column
    assert seen == [4, 4, 1]  # the blocks saw only the columns where some prompt has a token


def test_joint_text_conditioning_needs_full_attention_and_old_configs_stay_cross():
    with pytest.raises(ValueError, match='text_conditioning "joint" .* needs attention_modes \\["full"\\]'):
        DiTConfig(**{**TINY, "text_conditioning": "joint", "attention_modes": ("spatial", "full")})
    with pytest.raises(ValueError, match=r"text_conditioning must be one of \('cross', 'joint'\), got 'concat'"):
        DiTConfig(**{**TINY, "text_conditioning": "concat"})
    old = {k: v for k, v in DiTConfig(**TINY).to_dict().items() if k != "text_conditioning"}
    assert DiTConfig.from_dict(old).text_conditioning == "cross"  # bundles from before the option load as they were


def test_one_training_step_makes_the_output_depend_on_the_condition():
    model = make()
    x, t, text, mask = inputs()
    cond, cond_mask = torch.randn_like(x), torch.tensor([[1.0, 0, 0], [1.0, 1, 0]])
    loss = (model(x, t, text, mask, cond, cond_mask) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    model.eval()
    with torch.no_grad():
        a = model(x, t, text, mask, cond, cond_mask)
        cond2 = cond.clone()
        cond2[:, :, 0] += 1.0  # a given frame changes
        b = model(x, t, text, mask, cond2, cond_mask)
    assert not torch.allclose(a, b)


def test_cond_latent_and_cond_mask_both_matter(trained_like):
    x, t, text, mask = inputs()
    cond = torch.zeros_like(x)
    cond[:, :, 0] = torch.randn_like(x[:, :, 0])
    given = torch.tensor([[1.0, 0, 0], [1.0, 0, 0]])
    with torch.no_grad():
        plain = trained_like(x, t, text, mask)
        none_given = trained_like(x, t, text, mask, torch.zeros_like(x), torch.zeros(2, 3))
        with_frame = trained_like(x, t, text, mask, cond, given)
        mask_only = trained_like(x, t, text, mask, torch.zeros_like(x), given)
        bool_mask = trained_like(x, t, text, mask, cond, given.bool())
    torch.testing.assert_close(plain, none_given)  # None means zeros
    assert not torch.allclose(with_frame, plain)
    assert not torch.allclose(mask_only, plain)  # the mask channel itself is seen
    torch.testing.assert_close(bool_mask, with_frame)


def test_text_and_timestep_condition_the_output(trained_like):
    x, t, text, mask = inputs()
    with torch.no_grad():
        base = trained_like(x, t, text, mask)
        other_text = trained_like(x, t, torch.randn_like(text), mask)
        other_t = trained_like(x, 1 - t, text, mask)
        scalar_t = trained_like(x[:1], float(t[0]), text[:1], mask[:1])
    assert not torch.allclose(base, other_text)
    assert not torch.allclose(base, other_t)
    torch.testing.assert_close(scalar_t, base[:1])


def test_padded_text_tokens_are_ignored(trained_like):
    x, t, text, _ = inputs(L=6)
    mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
    noisy = text.clone()
    noisy[0, 3:] = torch.randn(3, TEXT_DIM) * 10
    with torch.no_grad():
        a, b = trained_like(x, t, text, mask), trained_like(x, t, noisy, mask)
    torch.testing.assert_close(a, b)


def test_text_attention_is_scaled_dot_product_attention_with_its_mask():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 3, 5, 16, generator=g, requires_grad=True) for _ in range(2))
    mask = torch.tensor([[True] * 2 + [False] * 3, [True] * 5])[:, None, None, :]
    ours = text_attention(q, k, v, mask)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, theirs)
    cotangent = torch.randn(ours.shape, generator=g)
    grads = [torch.autograd.grad(out, (q, k, v), cotangent) for out in (ours, theirs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert grads[0][1][0, :, 2:].abs().max() == 0  # masked keys get no gradient


def test_an_all_padding_prompt_gives_finite_output(trained_like):
    x, t, text, mask = inputs()
    mask[0] = False
    with torch.no_grad():
        v = trained_like(x, t, text, mask)
    assert torch.isfinite(v).all()
    # Its tokens are not looked at: changing them changes nothing.
    text2 = text.clone()
    text2[0] = torch.randn_like(text2[0])
    with torch.no_grad():
        torch.testing.assert_close(trained_like(x, t, text2, mask)[0], v[0])


def test_batch_elements_are_independent(trained_like):
    x, t, text, mask = inputs(B=3)
    with torch.no_grad():
        whole = trained_like(x, t, text, mask)
        one = trained_like(x[1:2], t[1:2], text[1:2], mask[1:2])
    torch.testing.assert_close(whole[1:2], one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("modes", [("full",), ("spatial",), ("temporal",), ("spatial", "temporal", "full")])
def test_every_attention_mode_runs(modes):
    model = randomize_(make(attention_modes=modes, depth=3)).eval()
    assert [b.attn.mode for b in model.blocks] == [modes[i % len(modes)] for i in range(3)]
    x, t, text, mask = inputs(T=2, H=3, W=5)
    with torch.no_grad():
        assert model(x, t, text, mask).shape == x.shape


def test_spatial_only_model_keeps_frames_apart():
    """With only spatial attention and pt=1 no information crosses frames."""
    model = randomize_(make(attention_modes=("spatial",))).eval()
    x, t, text, mask = inputs()
    y = x.clone()
    y[:, :, 2] = torch.randn_like(y[:, :, 2])
    with torch.no_grad():
        a, b = model(x, t, text, mask), model(y, t, text, mask)
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2])
    assert not torch.allclose(a[:, :, 2], b[:, :, 2])


def test_rope_rotations_preserve_norm_and_depend_on_relative_position():
    model = make()
    cos, sin = model.rope((4, 3, 5), torch.device("cpu"))
    head_dim = model.config.head_dim
    assert cos.shape == (4, 15, 1, head_dim // 2)
    q = torch.randn(1, 4, 15, 2, head_dim)
    rq = apply_rope(q, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    # q·k after rotation depends only on the offset between positions: shift both by one frame.
    q1, k1 = torch.randn(head_dim), torch.randn(head_dim)
    q_all = q1.expand(1, 4, 15, 1, head_dim)
    k_all = k1.expand(1, 4, 15, 1, head_dim)
    rq, rk = apply_rope(q_all, cos, sin), apply_rope(k_all, cos, sin)
    dot = lambda a, b: (a * b).sum()
    torch.testing.assert_close(dot(rq[0, 0, 0], rk[0, 1, 2]), dot(rq[0, 2, 0], rk[0, 3, 2]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(dot(rq[0, 0, 0], rk[0, 1, 2]), dot(rq[0, 0, 0], rk[0, 2, 2]))


def test_without_absolute_positions_a_uniform_input_gives_a_uniform_output():
    # RoPE is relative: with every token alike, no token can tell where it is, so none can be
    # told to differ. Fractional positions break that symmetry (the frame's edges, the clip's start).
    x = torch.randn(1, C, 1, 1, 1).expand(1, C, 3, 4, 4)
    _, t, text, mask = inputs(B=1)
    for flag in (False, True):
        model = randomize_(make(patch_size=(1, 1, 1), attention_modes=("full",), absolute_position=flag)).eval()
        with torch.no_grad():
            v = model(x, t, text, mask)
        spread = (v - v[:, :, :1, :1, :1]).abs().max()
        assert (spread < 1e-4) != flag, (flag, spread)


def test_fractional_positions_name_the_same_place_at_every_size():
    model = make(absolute_position=True)
    small, large = model.position((3, 2, 2), torch.device("cpu")), model.position((9, 6, 6), torch.device("cpu"))
    assert small.shape == (3, 4, TINY["hidden_size"]) and large.shape == (9, 36, TINY["hidden_size"])
    # First and last latent frame, the top-left cell's centre at (1/4, 1/4) of the frame: index 1 on a 6-cell side.
    torch.testing.assert_close(small[0, 0], large[0, 1 * 6 + 1])
    torch.testing.assert_close(small[-1, 3], large[-1, 4 * 6 + 4])
    assert not torch.allclose(large[0, 0], large[0, 1 * 6 + 1])
    with pytest.raises(ValueError, match="absolute_position needs an even hidden_size"):
        DiTConfig(**{**TINY, "hidden_size": 33, "num_heads": 3, "absolute_position": True})
    assert make(absolute_position=False).position is None  # bundles from before the option load as they were


def test_a_sample_prediction_head_returns_the_velocity_its_clean_latents_imply():
    # The same weights read as a velocity head and as a clean-latent ("sample") head: the second's
    # velocity is (x_t - head output) / t, with t floored at SAMPLE_PREDICTION_MIN_T.
    velocity_head = randomize_(make()).eval()
    sample_head = make(prediction="sample").eval()
    sample_head.load_state_dict(velocity_head.state_dict())
    x, _, text, mask = inputs(B=3)
    t = torch.tensor([1.0, 0.3, 0.01])
    with torch.no_grad():
        head, velocity = velocity_head(x, t, text, mask), sample_head(x, t, text, mask)
    floored = t.clamp(min=SAMPLE_PREDICTION_MIN_T).view(3, 1, 1, 1, 1)
    torch.testing.assert_close(velocity, (x - head) / floored)
    # The velocity carries the sample back to the head's clean latents at t = 0.
    torch.testing.assert_close(x[:2] - t[:2].view(2, 1, 1, 1, 1) * velocity[:2], head[:2])
    with pytest.raises(ValueError, match=r"prediction must be one of \('velocity', 'sample'\), got 'epsilon'"):
        DiTConfig(**{**TINY, "prediction": "epsilon"})
    assert DiTConfig.from_dict({k: v for k, v in DiTConfig(**TINY).to_dict().items() if k != "prediction"}).prediction == "velocity"


def test_a_convolutional_head_lets_neighbouring_tokens_shape_each_others_output():
    # Change the final layer's output for one token only. DiT's linear head changes that token's
    # own latent voxels and nothing else; the convolutional head also changes the voxels across
    # the token's border in its frame (two 3x3 convolutions: two voxels deep), but no farther.
    x, t, text, mask = inputs(B=1, T=3, H=8, W=8)
    nudge_token = 4 * 2 + 1  # frame 0, token row 2, column 1: latent rows 4-5, columns 2-3
    reach = {}
    for k in (0, 6):
        model = randomize_(make(output_conv=k)).eval()
        with torch.no_grad():
            plain = model(x, t, text, mask)
            nudged_layer = model.final_layer.forward
            model.final_layer.forward = lambda h, c: nudged_layer(h, c).index_add(
                1, torch.tensor([nudge_token]), torch.ones(1, 1, model.final_layer.linear.out_features)
            )
            changed = (model(x, t, text, mask) - plain).abs().amax(dim=(0, 1)) > 0  # (T, H, W)
        reach[k] = [idx.unique().tolist() for idx in changed.nonzero(as_tuple=True)]
    assert reach[0] == [[0], [4, 5], [2, 3]]
    assert reach[6] == [[0], [2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5]]
    # It starts at exactly zero output, as the linear head does, and its last convolution still
    # gets a gradient (had the linear been zeroed as well, neither would get one).
    model = make(output_conv=6)
    out = model(x, t, text, mask)
    assert torch.equal(out, torch.zeros_like(x))
    out.sum().backward()
    assert model.output_conv[-1].weight.grad.abs().sum() > 0
    assert model.output_conv[-1].weight.shape[:2] == (C, 6) and model.final_layer.linear.out_features == 6 * 4
    with pytest.raises(ValueError, match="output_conv must be 0"):
        DiTConfig(**{**TINY, "output_conv": -1})
    with pytest.raises(ValueError, match="output_conv must be 0"):
        DiTConfig(**{**TINY, "output_conv": True})
    assert DiTConfig.from_dict({k: v for k, v in DiTConfig(**TINY).to_dict().items() if k != "output_conv"}).output_conv == 0


@pytest.mark.parametrize("text_conditioning", ["cross", "joint"])
def test_gradient_checkpointing_gives_the_same_gradients(text_conditioning):
    x, t, text, mask = inputs()
    grads = []
    for flag in (False, True):
        model = make(gradient_checkpointing=flag, attention_modes=("full",), text_conditioning=text_conditioning)
        model = randomize_(model).train()
        model(x, t, text, mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_size_variants_and_config_round_trip():
    assert {"DiT-XS", "DiT-S", "DiT-B"} <= set(DIT_CONFIGS)
    cfg = dit_config("DiT-S", in_channels=8, text_dim=384, patch_size=(1, 1, 1))
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size) == (384, 12, 6, (1, 1, 1))
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg
    assert sum(cfg.rope_dims) == cfg.head_dim and all(d % 2 == 0 for d in cfg.rope_dims)
    with pytest.raises(KeyError, match="DiT-B"):
        dit_config("DiT-Z")


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(hidden_size=30, num_heads=4), "divisible by num_heads"),
        (dict(attention_modes=("spatial", "diagonal")), "attention_modes"),
        (dict(patch_size=(1, 2)), "patch_size"),
        (dict(rope_axes_dim=(4, 4, 4)), "rope_axes_dim"),
    ],
)
def test_bad_config_is_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        DiTConfig(**{**TINY, **overrides})
    with pytest.raises(ValueError, match="unknown DiTConfig field"):
        DiTConfig.from_dict({**TINY, "hiden_size": 3})


def test_bad_inputs_are_refused_with_clear_errors():
    model = make().eval()
    x, t, text, mask = inputs()
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :3], t, text, mask)
    with pytest.raises(ValueError, match="t must be"):
        model(x, t[:1], text, mask)
    with pytest.raises(ValueError, match="text_tokens must be"):
        model(x, t, text[..., :3], mask)
    with pytest.raises(ValueError, match="text_mask must be"):
        model(x, t, text, mask[:, :2])
    with pytest.raises(ValueError, match="cond_latent must"):
        model(x, t, text, mask, cond_latent=x[:, :, :1])
    with pytest.raises(ValueError, match="cond_mask must"):
        model(x, t, text, mask, cond_mask=torch.ones(2, 4))
