"""Request validation: every invalid field is named; every valid request passes."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from skyloom.request import MAX_FRAMES, Conditioning, GenerationRequest, RequestError, parse_size
from tests.strategies import valid_requests

DEFAULTS = {"frames": 17, "width": 64, "height": 64, "fps": 8.0, "steps": 30, "guidance": 5.0, "sampler": "euler"}


@given(valid_requests())
def test_valid_requests_pass(request):
    request.validate(spatial_multiple=8)


@given(st.integers(0, 2**31 - 1) | st.none())
def test_defaults_fill_only_missing_fields_and_a_seed_is_always_set(seed):
    request = GenerationRequest("a red circle", frames=9, seed=seed).with_defaults(DEFAULTS)
    assert request.frames == 9 and request.width == 64 and request.sampler == "euler"
    assert request.seed == seed if seed is not None else 0 <= request.seed < 2**31
    request.validate(spatial_multiple=8)


def test_guidance_interval_comes_from_the_request_then_the_defaults_then_covers_every_step():
    assert GenerationRequest("x", guidance_interval=(0.3, 1.0)).with_defaults(DEFAULTS).guidance_interval == (0.3, 1.0)
    assert GenerationRequest("x").with_defaults({**DEFAULTS, "guidance_interval": [0.5, 1]}).guidance_interval == [0.5, 1]
    assert GenerationRequest("x").with_defaults(DEFAULTS).guidance_interval == (0.0, 1.0)


@given(st.integers(-5, 0) | st.integers(MAX_FRAMES + 1, 10**6))
def test_frame_count_out_of_range_is_named(frames):
    with pytest.raises(RequestError, match=f"frames must be between 1 and {MAX_FRAMES}, got {frames}"):
        GenerationRequest("x", frames=frames).with_defaults(DEFAULTS).validate(spatial_multiple=8)


@given(st.integers(9, 2047).filter(lambda v: v % 8))
def test_size_off_the_grid_suggests_the_neighbours(width):
    with pytest.raises(RequestError) as error:
        GenerationRequest("x", width=width).with_defaults(DEFAULTS).validate(spatial_multiple=8)
    lower = width // 8 * 8
    assert f"width {width} is not a multiple of 8" in str(error.value) and f"use {lower} or {lower + 8}" in str(error.value)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("prompt", "   ", "prompt is empty"),
        ("frames", 2.5, "frames must be an integer"),
        ("height", 0, "height must be between 8 and 2048"),
        ("fps", 0.0, "fps must be > 0.0"),
        ("fps", float("nan"), "fps must be a finite number"),
        ("steps", 0, "steps must be between 1 and 1000"),
        ("guidance", -1.0, "guidance must be >= 0.0"),
        ("seed", -3, "seed must be between 0"),
        ("guidance_interval", (0.3,), r"guidance_interval must be two numbers \(low, high\)"),
        ("guidance_interval", "0.3,1", r"guidance_interval must be two numbers \(low, high\)"),
        ("guidance_interval", {"low": 0.3, "high": 1.0}, r"guidance_interval must be two numbers \(low, high\)"),
        ("guidance_interval", (0.0, 1.5), "each end of guidance_interval must be >= 0.0 and <= 1.0, got 1.5"),
        ("guidance_interval", (float("nan"), 1.0), "each end of guidance_interval must be a finite number"),
        ("guidance_interval", (0.8, 0.2), r"guidance_interval \[0.8, 0.2\] runs backwards: give the lower time first, \(0.2, 0.8\)"),
        ("sampler_options", [1], "sampler_options must be a dict"),
    ],
)
def test_invalid_field_is_named(field, value, message):
    kwargs = {"prompt": "x", field: value} if field != "prompt" else {"prompt": value}
    with pytest.raises(RequestError, match=message):
        GenerationRequest(**kwargs).with_defaults(DEFAULTS).validate(spatial_multiple=8)


def test_conditioning_is_checked():
    bad = GenerationRequest("x", conditioning=(Conditioning(torch.zeros(2, 8, 8, 3)),))
    with pytest.raises(RequestError, match=r"conditioning\[0\].media must be a \(T, H, W, 3\) uint8 tensor"):
        bad.with_defaults(DEFAULTS).validate(spatial_multiple=8)
    late = GenerationRequest("x", frames=9, conditioning=(Conditioning(torch.zeros(3, 8, 8, 3, dtype=torch.uint8), start_frame=8),))
    with pytest.raises(RequestError, match="covers frames 8..10, outside the 9 requested frames"):
        late.with_defaults(DEFAULTS).validate(spatial_multiple=8)
    last = GenerationRequest("x", frames=9, conditioning=(Conditioning(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), start_frame=-1),))
    last.with_defaults(DEFAULTS).validate(spatial_multiple=8)


@given(st.integers(1, 4096), st.integers(1, 4096), st.sampled_from(["x", "X", "×"]))
def test_parse_size_reads_width_then_height(width, height, sep):
    assert parse_size(f"{width}{sep}{height}") == (width, height)


@pytest.mark.parametrize("text", ["64", "64x", "x64", "64x64x3", "sixty-four", "-64x64", "64.5x64", "²x64"])
def test_parse_size_rejects_malformed(text):
    with pytest.raises(RequestError, match="is not WIDTHxHEIGHT"):
        parse_size(text)


def test_conditioning_must_start_on_a_latent_frame_boundary():
    image = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    for start in (0, 1, 5, 9):
        GenerationRequest("x", frames=17, conditioning=(Conditioning(image, start),)).with_defaults(DEFAULTS).validate(temporal_multiple=4)
    with pytest.raises(RequestError, match=r"starts at frame 3, not on a latent frame boundary: use frame 0 or 1 \+ k·4 \(here 1, that is -16 from the end, or 5\)"):
        GenerationRequest("x", frames=17, conditioning=(Conditioning(image, 3),)).with_defaults(DEFAULTS).validate(temporal_multiple=4)


def test_a_video_to_edit_sets_the_default_frame_count_and_is_checked():
    video = torch.zeros(9, 8, 8, 3, dtype=torch.uint8)
    edit = GenerationRequest("x", video=video).with_defaults(DEFAULTS)
    assert edit.frames == 9 and edit.strength == 0.8 and edit.edit_steps == 24  # the last 80 % of 30 steps
    edit.validate(temporal_multiple=4)
    bad = [
        ({"video": video.float()}, r"video must be a \(T, H, W, 3\) uint8 tensor, got \(9, 8, 8, 3\)"),
        ({"video": video, "frames": 17}, "video has 9 frames but 17 frames were requested"),
        ({"video": video, "strength": 0.0}, "strength must be > 0.0 and <= 1.0, got 0.0"),
        ({"video": video, "strength": 1.5}, "strength must be > 0.0 and <= 1.0, got 1.5"),
        ({"video": video, "strength": 0.02}, "strength 0.02 of 30 steps runs no step: use strength >= 0.034 or more steps"),
    ]
    for fields, message in bad:
        with pytest.raises(RequestError, match=message):
            GenerationRequest("x", **fields).with_defaults(DEFAULTS).validate(temporal_multiple=4)


@pytest.mark.parametrize("steps, strength, expected", [(30, 0.5, 15), (10, 0.7, 7), (100, 0.29, 29), (4, 1.0, 4), (3, 0.5, 1)])
def test_edit_steps_are_the_strength_share_of_the_steps_rounded_down(steps, strength, expected):
    assert GenerationRequest("x", steps=steps, strength=strength).edit_steps == expected


def test_a_loop_needs_a_latent_frame_to_generate_between_its_ends():
    GenerationRequest("x", frames=6, loop=True).with_defaults(DEFAULTS).validate(temporal_multiple=4)
    with pytest.raises(RequestError, match="a loop needs at least 6 frames, got 5"):
        GenerationRequest("x", frames=5, loop=True).with_defaults(DEFAULTS).validate(temporal_multiple=4)
    with pytest.raises(RequestError, match="loop cannot be combined with a video to edit"):
        GenerationRequest("x", frames=9, loop=True, video=torch.zeros(9, 8, 8, 3, dtype=torch.uint8)).with_defaults(DEFAULTS).validate(temporal_multiple=4)
    clip = (Conditioning(torch.zeros(17, 8, 8, 3, dtype=torch.uint8)),)  # fills the video: any roll wraps it
    with pytest.raises(RequestError, match="no roll puts every known frame"):
        GenerationRequest("x", frames=17, loop=True, conditioning=clip).with_defaults(DEFAULTS).validate(temporal_multiple=4)


@pytest.mark.parametrize("frames", [6, 9, 13, 17, 33])
def test_a_loop_rolls_its_ends_to_the_middle_and_known_frames_onto_latent_frames(frames):
    image = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    kept = frames - (1 + (frames - 2) // 4 * 4)  # frames in the last latent frame
    m, moved = GenerationRequest("x", frames=frames, loop=True).loop_roll(4)
    assert moved == () and m == max(frames // 2, kept)
    for start in (0, -4):
        request = GenerationRequest("x", frames=frames, loop=True, conditioning=(Conditioning(image, start),))
        m, (cond,) = request.loop_roll(4)
        assert kept <= m < frames and cond.start_frame == (start - m) % frames
        assert cond.start_frame == 0 or (cond.start_frame - 1) % 4 == 0
    with pytest.raises(RequestError, match="loop must be True or False"):
        GenerationRequest("x", loop="yes").with_defaults(DEFAULTS).validate(temporal_multiple=4)
