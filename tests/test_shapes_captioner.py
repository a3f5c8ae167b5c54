"""The shapes-world analyser, the `shapes` captioner and the `caption-style` prompt enhancer.

Clips are drawn here with numpy (solid background, filled shapes moving linearly, hard edges),
independently of the dataset generator, and optionally round-tripped through H.264.
"""

import itertools
import re

import numpy as np
import pytest
import torch
from scipy import ndimage

from skyloom.kinds import Captioner, PromptEnhancer
from skyloom.registry import Registry
from skyloom.shapes_analysis import (
    SQUARE_CIRCLE_FILL,
    TIE_MARGIN,
    analyse,
    canonical_caption,
    classify_motion,
    classify_shape,
    corner_occupancy,
    nearest_name,
)
from skyloom.shapes_world import BACKGROUNDS, COLOURS, DURATIONS, MOTIONS, SHAPES, SIZES
from skyloom.video_io import read_video, write_video

from skyloom.plugins.captioner.shapes import MOTION_PHRASES, ShapesCaptioner
from skyloom.plugins.prompt_enhancer.caption_style import CaptionStyleEnhancer, parse

# --- drawing -----------------------------------------------------------------------------


def shape_mask(shape, height, width, cx, cy, size):
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    r = size / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    top = cy - r  # isosceles, pointing up, base = height = size
    return (ys >= top) & (ys <= cy + r) & (np.abs(xs - cx) <= (ys - top) / 2)


def position(obj, t, frames):
    s = t / max(frames - 1, 1)
    dx, dy = MOTIONS[obj["motion"]]
    return obj["start"][0] + dx * obj["travel"] * s, obj["start"][1] + dy * obj["travel"] * s


def draw_clip(objects, background, width, height, frames):
    """objects: dicts with shape, colour, motion, start (cx, cy), size, travel (pixels over the clip)."""
    video = np.empty((frames, height, width, 3), np.uint8)
    video[:] = BACKGROUNDS[background]
    for t in range(frames):
        for obj in objects:
            cx, cy = position(obj, t, frames)
            video[t][shape_mask(obj["shape"], height, width, cx, cy, obj["size"])] = COLOURS[obj["colour"]]
    return video


def random_object(rng, width, height, shape, colour, motion):
    size = float(rng.integers(10, 19))
    dx, dy = MOTIONS[motion]
    travel = 0.0 if motion == "stays still" else float(rng.uniform(0.25, 0.45)) * (width if dx else height)
    margin = size / 2 + 1

    def start(extent, d):
        lo, hi = margin + (travel if d < 0 else 0), extent - margin - (travel if d > 0 else 0)
        return float(rng.uniform(lo, hi))

    return {"shape": shape, "colour": colour, "motion": motion, "size": size, "travel": travel,
            "start": (start(width, dx), start(height, dy))}  # fmt: skip


def apart(objects, width, height, frames):
    """No two objects come within 3 pixels of each other in any frame."""
    for t in range(frames):
        masks = []
        for obj in objects:
            cx, cy = position(obj, t, frames)
            mask = shape_mask(obj["shape"], height, width, cx, cy, obj["size"])
            masks.append(ndimage.binary_dilation(mask, iterations=3))
        if any((a & b).any() for a, b in itertools.combinations(masks, 2)):
            return False
    return True


def random_scene(rng, count, width, height, frames):
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    colours = rng.permutation(list(COLOURS))
    while True:
        objects = [
            random_object(rng, width, height, SHAPES[rng.integers(len(SHAPES))], str(colours[i]),
                          list(MOTIONS)[rng.integers(len(MOTIONS))])
            for i in range(count)
        ]  # fmt: skip
        if apart(objects, width, height, frames):
            return objects, background


def h264(clip, tmp_path, crf=23):
    path = tmp_path / "clip.mp4"
    write_video(path, clip, fps=8, crf=crf)
    frames, _ = read_video(path)
    return frames


def truth(objects):
    return sorted((o["colour"], o["shape"], o["motion"]) for o in objects)


def found(analysis):
    return sorted((o.colour, o.shape, o.motion) for o in analysis.objects)


# --- analyser ----------------------------------------------------------------------------

ALL_COMBINATIONS = list(itertools.product(SHAPES, COLOURS, MOTIONS))


@pytest.mark.parametrize("index", range(0, len(ALL_COMBINATIONS), 10))
def test_analyser_is_exact_on_clean_clips_of_every_combination(index):
    """Every shape x colour x motion, across backgrounds, sizes and durations, one object each."""
    for shape, colour, motion in ALL_COMBINATIONS[index : index + 10]:
        k = SHAPES.index(shape) + 3 * list(COLOURS).index(colour) + list(MOTIONS).index(motion)
        (width, height), frames = SIZES[k % 3], DURATIONS[(k // 3) % 3]
        background = list(BACKGROUNDS)[(k // 9 + k) % 3]
        obj = random_object(np.random.default_rng(k), width, height, shape, colour, motion)
        clip = draw_clip([obj], background, width, height, frames)
        analysis = analyse(torch.from_numpy(clip), 8)
        assert found(analysis) == [(colour, shape, motion)], (obj, background, width, height, frames)
        assert analysis.background == background
        assert analysis.objects[0].persistence == 1.0
        assert (analysis.frames, analysis.height, analysis.width) == (frames, height, width)


def test_analyser_is_exact_on_clean_two_object_clips():
    rng = np.random.default_rng(1)
    for i in range(18):
        (width, height), frames = SIZES[i % 3], DURATIONS[(i // 3) % 3]
        objects, background = random_scene(rng, 2, width, height, frames)
        analysis = analyse(draw_clip(objects, background, width, height, frames), 8)
        assert found(analysis) == truth(objects), (objects, background, width, height, frames)
        assert analysis.background == background


def measure_accuracy(clips: int, seed: int, tmp_path, crf: int = 23) -> dict:
    """Fraction of colour/shape/motion attributes (and backgrounds) the analyser gets right on
    `clips` random scenes (sizes, durations, one or two objects cycled), clean and after H.264."""
    rng = np.random.default_rng(seed)
    tally = {name: {"right": 0, "total": 0, "backgrounds": 0} for name in ("clean", "h264")}
    for i in range(clips):
        (width, height), frames, count = SIZES[i % 3], DURATIONS[(i // 3) % 3], 1 + (i // 9) % 2
        objects, background = random_scene(rng, count, width, height, frames)
        clip = draw_clip(objects, background, width, height, frames)
        for name, video in (("clean", clip), ("h264", h264(clip, tmp_path, crf))):
            analysis = analyse(video, 8)
            want, got = truth(objects), found(analysis)
            tally[name]["total"] += 3 * count
            tally[name]["backgrounds"] += analysis.background == background
            if len(got) == count:
                tally[name]["right"] += sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
    return {name: {**t, "accuracy": t["right"] / t["total"]} for name, t in tally.items()}


def test_analyser_accuracy_after_h264_crf23(tmp_path):
    """Exact on clean clips and >= 90% of attributes right after an H.264 CRF 23 round trip
    (measured: 100% of 1341 attributes over 300 clips, seeds 1 and 7; run this file as a script)."""
    tally = measure_accuracy(36, seed=2, tmp_path=tmp_path)
    assert tally["clean"]["accuracy"] == 1.0, tally
    assert tally["h264"]["accuracy"] >= 0.9, tally
    assert tally["clean"]["backgrounds"] == tally["h264"]["backgrounds"] == 36, tally


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_analyser_splits_overlapping_objects_by_colour(background, tmp_path):
    """A circle passes over a square: colours and motions survive the overlap, clean and after
    H.264; shapes are exact on clean frames (overlapping frames do not vote on shape)."""
    shape_right = shape_total = 0
    for first, second in (("red", "blue"), ("yellow", "white"), ("purple", "blue"), ("green", "yellow")):
        mover = {"shape": "circle", "colour": first, "motion": "moves right", "size": 14, "travel": 40, "start": (10, 32)}
        still = {"shape": "square", "colour": second, "motion": "stays still", "size": 14, "travel": 0, "start": (34, 36)}
        clip = draw_clip([still, mover], background, 64, 64, 17)
        assert found(analyse(clip, 8)) == truth([mover, still])
        coded = found(analyse(h264(clip, tmp_path), 8))
        assert [(c, m) for c, _, m in coded] == [(c, m) for c, _, m in truth([mover, still])]
        shape_right += sum(g[1] == w[1] for g, w in zip(coded, truth([mover, still])))
        shape_total += 2
    assert shape_right / shape_total >= 0.75


@pytest.mark.parametrize("shape, low, high", [("circle", 0.0, 0.0), ("square", 1.0, 1.0), ("triangle", 0.25, 0.5)])
def test_corner_occupancy_of_drawn_shapes(shape, low, high):
    for size in (8, 14, 21):
        alpha = np.pad(shape_mask(shape, size, size, size / 2, size / 2, size).astype(float), 2)
        assert low <= corner_occupancy(alpha) <= high, (shape, size)  # a triangle: 1/3, coarser at 8 px
    assert corner_occupancy(np.ones((4, 4))) is None  # every pixel centre lies inside the corner line
    assert corner_occupancy(np.zeros((9, 9))) is None


def test_square_or_circle_by_fill_and_corners():
    assert classify_shape(0.85, 1 / 6, 0.5)[0] == "square"  # bowed sides, corners half covered
    assert classify_shape(0.85, 1 / 6, 0.1)[0] == "circle"  # a blurred circle: empty corners
    assert classify_shape(0.85, 1 / 6)[0] == "circle"  # no corners measured: the fill alone
    assert classify_shape(0.97, 1 / 6, 0.9)[0] == "square"
    assert classify_shape(0.60, 7 / 36, 0.6)[0] == "triangle"  # the fill's triangle stays one


def bowed_square(size, bow):
    """A square whose four sides curve inwards by `bow` pixels at their middles (hard edges)."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    u, v = 2 * xs / size - 1, 2 * ys / size - 1  # -1..1 across the box
    inset = bow * 2 / size  # the sides' inset at their middles, in the same units
    return (np.abs(u) <= 1 - inset * (1 - v**2)) & (np.abs(v) <= 1 - inset * (1 - u**2))


def test_square_with_bowed_sides_and_soft_edges_reads_square():
    """What the trained model draws for "square": bowed sides and blurred edges bring the
    bounding-box fill under the fill-only line, and the corners still tell it from a circle
    blurred the same way."""
    for background, colour in (("black", "red"), ("navy", "yellow"), ("gray", "white")):
        objects = {"square": bowed_square(22, 2.6), "circle": shape_mask("circle", 22, 22, 11, 11, 22)}
        for shape, mask in objects.items():
            frame = np.zeros((64, 64), float)
            frame[20:42, 20:42] = mask
            alpha = ndimage.gaussian_filter(frame, 1.0)[None, :, :, None]
            clip = BACKGROUNDS[background] * (1 - alpha) + np.array(COLOURS[colour]) * alpha
            clip = np.repeat(np.round(clip).astype(np.uint8), 9, axis=0)
            (obj,) = analyse(clip, 8).objects
            assert obj.shape == shape, (background, shape, obj.fill_ratio, obj.corner_occupancy)
            if shape == "square":
                assert obj.fill_ratio < SQUARE_CIRCLE_FILL - TIE_MARGIN  # the fill alone calls it a circle


def test_analyser_ignores_specks_and_measures_flicker():
    rng = np.random.default_rng(3)
    obj = random_object(rng, 64, 64, "square", "red", "moves right")
    clip = draw_clip([obj], "gray", 64, 64, 9)
    steady = analyse(clip, 8)
    assert steady.flicker == 0.0
    # Single-pixel white specks, different in every frame, and background noise of +-6 levels.
    noisy = clip.astype(np.int16) + rng.integers(-6, 7, size=clip.shape)
    for t in range(9):
        y, x = rng.integers(0, 64, size=(2, 3))
        noisy[t, y, x] = 255
    noisy = np.clip(noisy, 0, 255).astype(np.uint8)
    analysis = analyse(noisy, 8)
    assert found(analysis) == [("red", "square", "moves right")]
    assert 2.0 < analysis.flicker < 8.0  # mean |difference| of two uniform +-6 noises is ~4.3
    # Noise everywhere (an untrained model's frames) leaves no background: the whole frame counts.
    static = rng.integers(0, 256, size=(9, 64, 64, 3), dtype=np.uint8)
    assert 70.0 < analyse(static, 8).flicker < 100.0  # mean |difference| of two uniform 0..255 is ~85


def test_analyser_persistence_counts_the_frames_an_object_is_in():
    obj = random_object(np.random.default_rng(4), 64, 64, "circle", "blue", "stays still")
    clip = draw_clip([obj], "black", 64, 64, 17)
    clip[9:] = BACKGROUNDS["black"]  # the object vanishes after frame 8
    (found_object,) = analyse(clip, 8).objects
    assert found_object.persistence == pytest.approx(9 / 17)
    assert [t for t, _, _ in found_object.track] == list(range(9))
    clip[3:] = BACKGROUNDS["black"]  # seen in 3 of 17 frames: below MIN_PERSISTENCE, dropped
    assert analyse(clip, 8).objects == ()


def test_motion_thresholds_and_colour_names():
    assert classify_motion(0.05, 0.05)[0] == "stays still"  # |d| = 7% of the side
    assert classify_motion(-0.1, 0.02)[0] == "moves left"
    assert classify_motion(0.02, -0.3)[0] == "moves up"
    assert classify_motion(0.0, 0.09)[0] == "moves down"
    for name, rgb in COLOURS.items():
        assert nearest_name(rgb, COLOURS)[0] == name
        jittered = tuple(int(np.clip(v + d, 0, 255)) for v, d in zip(rgb, (12, -12, 10)))
        assert nearest_name(jittered, COLOURS)[0] == name


@pytest.mark.parametrize(
    "frames, error",
    [
        (np.zeros((4, 16, 16, 3), np.float32), ValueError),  # dtype
        (torch.zeros(4, 16, 16, 3, dtype=torch.int64), ValueError),
        (np.zeros((16, 16, 3), np.uint8), ValueError),  # rank
        (np.zeros((4, 16, 16, 4), np.uint8), ValueError),  # channels
        (np.zeros((4, 2, 16, 3), np.uint8), ValueError),  # no border to speak of
        ([[[[0, 0, 0]]]], TypeError),
    ],
)
def test_bad_input_is_refused_with_a_reason(frames, error):
    with pytest.raises(error):
        analyse(frames, 8)
    with pytest.raises(error):
        ShapesCaptioner().caption(frames, 8)


# --- captioner ---------------------------------------------------------------------------


def one_clip(shape="circle", colour="red", motion="moves left", background="gray", seed=5):
    obj = random_object(np.random.default_rng(seed), 64, 64, shape, colour, motion)
    return draw_clip([obj], background, 64, 64, 9)


def test_caption_states_every_attribute_and_parses_back_to_the_truth():
    rng = np.random.default_rng(6)
    captioner = ShapesCaptioner()
    for i in range(12):
        (width, height), frames, count = SIZES[i % 3], DURATIONS[i % 3], 1 + i % 2
        objects, background = random_scene(rng, count, width, height, frames)
        caption = captioner.caption(torch.from_numpy(draw_clip(objects, background, width, height, frames)), 8)
        words = set(re.findall(r"[a-z]+", caption.lower()))
        for obj in objects:
            assert {obj["colour"], obj["shape"]} <= words, caption
            # Each object's own colour sits right before its own shape.
            assert f"{obj['colour']} {obj['shape']}" in caption, caption
        assert background in words, caption
        parsed, parsed_background = parse(caption)
        assert sorted((o["colour"], o["shape"], o["motion"]) for o in parsed) == truth(objects), caption
        assert parsed_background == background


def test_caption_phrasing_varies_with_the_seed_and_is_reproducible():
    clip = one_clip()
    captions = {ShapesCaptioner(seed=s).caption(clip, 8) for s in range(30)}
    assert len(captions) >= 10
    assert "A red circle moves left on a gray background." in captions  # the canonical phrasing
    for caption in captions:
        assert "red circle" in caption and "gray" in caption
    motion_phrases = {p for p in MOTION_PHRASES["moves left"] if any(p in c for c in captions)}
    assert len(motion_phrases) >= 3
    # Without a seed, the phrasing follows the content: same clip, same caption; others vary.
    assert ShapesCaptioner().caption(clip, 8) == ShapesCaptioner().caption(torch.from_numpy(clip.copy()), 8)
    per_clip = {ShapesCaptioner().caption(one_clip(seed=s), 8) for s in range(12)}
    assert len(per_clip) >= 4


def test_two_object_caption_keeps_each_objects_attributes():
    left = {"shape": "circle", "colour": "red", "motion": "moves left", "size": 12, "travel": 24, "start": (48, 16)}
    still = {"shape": "square", "colour": "blue", "motion": "stays still", "size": 12, "travel": 0, "start": (20, 48)}
    clip = draw_clip([left, still], "gray", 64, 64, 17)
    for seed in range(10):
        parsed, background = parse(ShapesCaptioner(seed=seed).caption(clip, 8))
        assert sorted((o["colour"], o["shape"], o["motion"]) for o in parsed) == [
            ("blue", "square", "stays still"),
            ("red", "circle", "moves left"),
        ]
        assert background == "gray"
    # Objects are described left to right (by first position): the still square is at x = 20.
    analysis = analyse(clip, 8)
    texts = {ShapesCaptioner.describe(analysis, seed=s) for s in range(200)}
    assert "A blue square stays still while a red circle moves left on a gray background." in texts
    assert canonical_caption(analysis.objects, analysis.background) in texts
    assert len(texts) >= 20


def test_empty_clip_caption_names_the_background():
    clip = np.broadcast_to(np.array(BACKGROUNDS["navy"], np.uint8), (5, 32, 32, 3))
    assert "navy" in ShapesCaptioner(seed=0).caption(clip, 8)


# --- prompt enhancer ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, enhanced",
    [
        ("red circle going left", "A red circle moves left on a black background."),
        ("a blue box rising on a grey background", "A blue square moves up on a gray background."),
        ("Yellow ball, static, black backdrop", "A yellow circle stays still on a black background."),
        ("green triangle", "A green triangle stays still on a black background."),
        ("white pyramid falling on a dark blue background", "A white triangle moves down on a navy background."),
        (
            "a violet disc drifting rightwards and a red cube that does not move",
            "A purple circle moves right while a red square stays still on a black background.",
        ),
        ("red thing moving up", "A red shape moves up on a black background."),
        # "at rest" is read as a motion, so the left-moving square does not lend it its motion.
        (
            "a red circle at rest and a left-moving blue square",
            "A red circle stays still while a blue square moves left on a black background.",
        ),
        (
            "Two shapes on a navy background: one green triangle sinks downward, and one white square sits motionless.",
            "A green triangle moves down while a white square stays still on a navy background.",
        ),
    ],
)
def test_enhancer_writes_the_canonical_caption(prompt, enhanced):
    enhancer = CaptionStyleEnhancer()
    assert enhancer.enhance(prompt) == enhanced
    assert enhancer.enhance(enhanced) == enhanced  # idempotent on its own output


def test_enhancer_leaves_unparseable_prompts_alone_and_uses_configured_defaults():
    enhancer = CaptionStyleEnhancer()
    for prompt in ("a cat playing the piano", "", "a shape on a dark blue background", "moving left"):
        assert enhancer.enhance(prompt) == prompt
    configured = CaptionStyleEnhancer(default_motion="moves up", default_background="navy")
    assert configured.enhance("red square") == "A red square moves up on a navy background."
    assert CaptionStyleEnhancer(default_background=None).enhance("red square") == "A red square stays still."
    assert configured.enhance("red square going left on gray") == "A red square moves left on a gray background."
    with pytest.raises(ValueError, match="default_motion"):
        CaptionStyleEnhancer(default_motion="spins")
    with pytest.raises(ValueError, match="default_background"):
        CaptionStyleEnhancer(default_background="pink")
    with pytest.raises(TypeError):
        enhancer.enhance(None)


def test_enhancer_output_matches_the_captioner_on_the_same_clip():
    """A prompt enhanced for a clip's content reads exactly as the captioner's canonical caption."""
    clip = one_clip("triangle", "yellow", "moves up", "navy")
    analysis = analyse(clip, 8)
    assert CaptionStyleEnhancer().enhance("yellow triangle rising, navy background") == canonical_caption(
        analysis.objects, analysis.background
    )


# --- registration ------------------------------------------------------------------------


def test_plugins_register_through_the_registry():
    registry = Registry.load(
        builtins=("skyloom.plugins.captioner.shapes", "skyloom.plugins.prompt_enhancer.caption_style"),
        entry_points=False,
        strict=True,
    )
    captioner = registry.create("captioner", "shapes", seed=3)
    assert isinstance(captioner, Captioner) and captioner.seed == 3
    assert registry.get("prompt_enhancer", "caption_style").name == "caption-style"
    enhancer = registry.create("prompt_enhancer", "caption-style")
    assert isinstance(enhancer, PromptEnhancer)
    assert enhancer.enhance("blue circle going down") == "A blue circle moves down on a black background."
    with pytest.raises(TypeError):
        registry.create("captioner", "shapes", seed="three")


if __name__ == "__main__":  # measure: python tests/test_shapes_captioner.py [clips] [seed] [crf]
    import sys
    import tempfile
    from pathlib import Path

    clips, seed, crf = (int(a) for a in (sys.argv[1:] + ["300", "1", "23"][len(sys.argv) - 1 :]))
    with tempfile.TemporaryDirectory() as directory:
        print(measure_accuracy(clips, seed, Path(directory), crf))
