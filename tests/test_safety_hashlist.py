"""The `hashlist` frame safety filter (PDQ blocklist matching) and the image-classifier adapter.

The "prohibited" images are synthetic: an off-centre spiral over stripes, drawn from a seed
(prohibited_image). The other content is smooth random colour fields drifting across the frame
(scene_clip). Blocklists are built from PNGs in tmp_path with build_blocklist, except the
checked-in tests/data/blocklist/synthetic.txt, which pins the hashes PDQ gave these images
when it was written (a pdqhash upgrade that changes hashes would break deployed blocklists).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pdqhash
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from skyloom.registry import Registry
from skyloom.video_io import read_video, write_image, write_video
from skyloom.plugins.safety_filter import hashlist
from skyloom.plugins.safety_filter.hashlist import (
    DEFAULT_CATEGORY,
    ENV_VAR,
    BlocklistError,
    HashlistFilter,
    build_blocklist,
    load_blocklist,
    pdq_hash,
    similarity,
)
from skyloom.frame_classifier import (
    ClassifierFrameFilter,
    FrameClassifier,
    sample_frames,
    sampled_frame_indices,
)

DATA = Path(__file__).parent / "data" / "blocklist"
CATEGORY = "test_prohibited"
OTHER_CATEGORY = "test_other"
SIZE = (144, 176)  # (H, W) of the test videos
T = 17  # frames: with every=8 the sampled positions are 0, 8, 16


# --- synthetic content --------------------------------------------------------------------


def prohibited_image(seed: int = 7, size=(192, 256)) -> np.ndarray:
    """A distinctive synthetic (H, W, 3) uint8 image: an off-centre spiral over stripes."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    cx, cy = 0.25 + 0.5 * rng.random(2)
    r, a = np.hypot(x - cx, y - cy), np.arctan2(y - cy, x - cx)
    k = 8 + 8 * rng.random(3)
    lum = 0.5 + 0.3 * np.sin(r * k[0] * 2 + a * 3) + 0.2 * np.cos(x * k[1]) * (y > 0.3 + 0.2 * rng.random())
    image = np.stack([lum, 0.6 * lum + 0.4 * y, 1 - lum * x], -1)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def resize(image: np.ndarray, size=SIZE) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    out = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def scene_clip(rng: np.random.Generator, frames: int = T, size=SIZE) -> np.ndarray:
    """Other content: a smooth random colour field drifting across the frame, (T, H, W, 3) uint8."""
    h, w = size
    grid = int(rng.integers(6, 16))
    field = torch.from_numpy(rng.random((1, 3, grid, grid))).float()
    big = F.interpolate(field, size=(2 * h, 2 * w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    dy, dx = (int(v) for v in rng.integers(-4, 5, size=2))
    clip = np.stack([np.roll(big, (t * dy, t * dx), axis=(0, 1))[:h, :w] for t in range(frames)])
    return (np.clip(clip, 0, 1) * 255).round().astype(np.uint8)


def with_frames(clip: np.ndarray, positions, image: np.ndarray) -> torch.Tensor:
    clip = clip.copy()
    for p in positions:
        clip[p] = image
    return torch.from_numpy(clip)


def distance_in(reason: str) -> int:
    return int(re.search(r"\(distance (\d+)\)", reason).group(1))


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blocklists(tmp_path_factory):
    """A text blocklist of prohibited_image(7) and a JSONL one of prohibited_image(99)."""
    folder = tmp_path_factory.mktemp("blocklist")
    first = write_image(folder / "spiral-7.png", prohibited_image(7))
    second = write_image(folder / "spiral-99.png", prohibited_image(99))
    return [
        build_blocklist([first], CATEGORY, folder / "first.txt"),
        build_blocklist([second], OTHER_CATEGORY, folder / "second.jsonl"),
    ]


@pytest.fixture(scope="module")
def flt(blocklists):
    return HashlistFilter(blocklist=blocklists)


@pytest.fixture
def clip():
    return scene_clip(np.random.default_rng(1234))


# --- matching ---------------------------------------------------------------------------

EDITS = {
    "as_is": lambda im: resize(im),
    "mirrored": lambda im: resize(im)[:, ::-1],
    "upside_down": lambda im: resize(im)[::-1],
    "rotated_180": lambda im: resize(im)[::-1, ::-1],
    "brighter": lambda im: np.clip(resize(im).astype(int) + 40, 0, 255).astype(np.uint8),
    "darker": lambda im: np.clip(resize(im).astype(int) - 40, 0, 255).astype(np.uint8),
}


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("position", [0, 8, 16], ids=["first", "middle", "last"])
def test_prohibited_frame_is_refused_with_its_category(flt, clip, edit, position):
    frames = with_frames(clip, [position], EDITS[edit](prohibited_image(7)))
    decision = flt.check_frames(frames)
    assert decision.allowed is False
    assert decision.category == CATEGORY
    assert decision.reason.startswith(f"frame {position} matches blocklisted image spiral-7 (distance ")
    assert distance_in(decision.reason) <= 16  # measured 0-2; the threshold is 31
    assert decision.score == similarity(distance_in(decision.reason))


def test_each_entry_reports_its_own_category(flt, clip):
    decision = flt.check_frames(with_frames(clip, [8], resize(prohibited_image(99))))
    assert (decision.allowed, decision.category) == (False, OTHER_CATEGORY)
    assert "spiral-99" in decision.reason


def test_mirror_is_caught_by_the_dihedral_hashes(blocklists, clip):
    mirrored = with_frames(clip, [8], resize(prohibited_image(7))[:, ::-1])
    plain = HashlistFilter(blocklist=blocklists, dihedral=False)
    assert plain.check_frames(mirrored).allowed is True  # a mirror image is ~128 bits away
    assert plain.check_frames(with_frames(clip, [8], resize(prohibited_image(7)))).allowed is False
    assert HashlistFilter(blocklist=blocklists).check_frames(mirrored).allowed is False


def test_rotated_portrait_video_is_refused(flt):
    portrait = scene_clip(np.random.default_rng(5), size=SIZE[::-1])  # (T, 176, 144, 3)
    for turns in (1, 3):
        rotated = np.rot90(resize(prohibited_image(7)), turns)
        decision = flt.check_frames(with_frames(portrait, [8], rotated))
        assert (decision.allowed, decision.category) == (False, CATEGORY), turns


def test_resized_and_h264_reencoded_video_is_refused(flt, clip, tmp_path):
    # Source 192x256 -> 144x176 frames -> H.264 crf 28 (yuv420p halves the colour resolution).
    path = write_video(tmp_path / "clip.mp4", with_frames(clip, range(6, 11), resize(prohibited_image(7))), fps=8, crf=28)
    frames, _ = read_video(path)
    assert tuple(frames.shape) == (T, *SIZE, 3)
    decision = flt.check_frames(frames)
    assert (decision.allowed, decision.category) == (False, CATEGORY)
    assert decision.reason.startswith("frame 8 matches")
    assert distance_in(decision.reason) <= 16  # measured 2 at crf 28, 6-8 at crf 35


def test_other_content_passes(flt):
    rng = np.random.default_rng(2026)
    closest = []
    for _ in range(50):
        decision = flt.check_frames(torch.from_numpy(scene_clip(rng)))
        assert decision.allowed is True, decision.reason
        if decision.score is not None:  # None when every sampled frame was too flat to hash
            closest.append(round((1 - decision.score) * 256))
    assert len(closest) >= 40  # most clips were really compared, not skipped
    assert min(closest) > 64  # measured: nothing nearer than 94 bits


def test_similar_looking_images_do_not_match(flt, clip):
    # Same generator, other seeds: spirals and stripes too, but other images. PDQ matches the
    # image, not the style (measured: nearest 92 bits).
    for seed in range(100, 120):
        decision = flt.check_frames(with_frames(clip, [0, 8, 16], resize(prohibited_image(seed))))
        assert decision.allowed is True, (seed, decision.reason)


# --- which frames are judged --------------------------------------------------------------


def test_frames_between_sampled_positions_are_not_judged(blocklists, clip):
    # Documented gap: every=8 judges frames 0, 8 and 16 of 17. A prohibited image shown only
    # at frame 3 is not seen; every=1 sees it; shown for 8 consecutive frames anywhere, it is
    # always seen.
    image = resize(prohibited_image(7))
    assert HashlistFilter(blocklist=blocklists, every=8).check_frames(with_frames(clip, [3], image)).allowed is True
    every_frame = HashlistFilter(blocklist=blocklists, every=1).check_frames(with_frames(clip, [3], image))
    assert every_frame.allowed is False and every_frame.reason.startswith("frame 3 ")
    sampled = HashlistFilter(blocklist=blocklists, every=8)
    for start in range(0, T - 7):
        assert sampled.check_frames(with_frames(clip, range(start, start + 8), image)).allowed is False, start


@given(num_frames=st.integers(1, 200), every=st.integers(1, 40))
def test_sampled_positions(num_frames, every):
    indices = sampled_frame_indices(num_frames, every)
    assert indices == sorted(set(indices))
    assert indices[0] == 0 and indices[-1] == num_frames - 1
    assert set(range(0, num_frames, every)) <= set(indices)
    assert len(indices) <= -(-num_frames // every) + 1
    # any `every` consecutive frames include a sampled one
    for start in range(0, max(1, num_frames - every + 1)):
        assert any(start <= i < start + every for i in indices), start


def test_sampled_frames_are_read_only_views():
    frames = torch.arange(5 * 2 * 2 * 3, dtype=torch.uint8).reshape(5, 2, 2, 3)
    sampled = list(sample_frames(frames, every=3))
    assert [i for i, _ in sampled] == [0, 3, 4]
    assert all(np.array_equal(f, frames[i].numpy()) for i, f in sampled)
    with pytest.raises(ValueError, match="read-only"):
        sampled[0][1][0, 0, 0] = 1


# --- quality --------------------------------------------------------------------------------


def test_flat_frames_are_skipped_not_matched(tmp_path):
    # A blocklist that (wrongly) holds the hash of a flat grey frame: PDQ quality 0, the hash
    # of noise in the last bits. Skipping low-quality frames is what keeps it from matching.
    grey = np.full((*SIZE, 3), 128, np.uint8)
    grey_hash, quality = pdq_hash(grey)
    assert quality < 50
    path = tmp_path / "flat.txt"
    path.write_text(f"{grey_hash} flat grey\n")
    frames = torch.from_numpy(np.stack([grey] * 20))
    decision = HashlistFilter(blocklist=path).check_frames(frames)
    assert decision.allowed is True and decision.score is None
    assert "frames [0, 8, 16, 19] skipped, PDQ quality below 50" in decision.reason
    unguarded = HashlistFilter(blocklist=path, min_quality=0).check_frames(frames)
    assert unguarded.allowed is False and unguarded.reason == "frame 0 matches blocklisted image grey (distance 0)"


def test_flat_frames_do_not_hide_the_others(flt, clip):
    frames = with_frames(clip, [0, 16], np.zeros((*SIZE, 3), np.uint8))
    frames[8] = torch.from_numpy(resize(prohibited_image(7)))
    assert flt.check_frames(frames).category == CATEGORY


# --- blocklist files -------------------------------------------------------------------------

HEX = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"


def test_blocklist_text_and_jsonl_lines(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes(
        (
            "\ufeff# comment\r\n"
            "\r\n"
            f"{HEX.upper()} violence case 12, frame 7\r\n"
            f"   {HEX}\n"
            f'{{"pdq": "{HEX}", "category": "extremism", "label": "poster", "source": "ncmec"}}\n'
            f'{{"pdq": "{HEX}"}}\n'
            f"{HEX} nudity\n"
        ).encode("utf-8")
    )
    entries = load_blocklist(path).entries
    assert [(e.pdq, e.category, e.label) for e in entries] == [
        (HEX, "violence", "case 12, frame 7"),
        (HEX, DEFAULT_CATEGORY, "list.txt:4"),
        (HEX, "extremism", "poster"),
        (HEX, DEFAULT_CATEGORY, "list.txt:6"),
        (HEX, "nudity", "list.txt:7"),
    ]
    assert entries[0].source == f"{path}:3"


MALFORMED = {
    "short": (HEX[:-1], "63 characters"),
    "not_hex": ("g" * 64, "not a PDQ hash"),
    "bad_json": ('{"pdq": ', "not valid JSON"),
    "json_list": (f'["{HEX}"]', "not a PDQ hash"),  # does not start with "{": read as text
    "json_no_pdq": ('{"category": "x"}', 'no "pdq" key'),
    "json_number": ('{"pdq": 5}', "not a PDQ hash"),
    "json_category": (f'{{"pdq": "{HEX}", "category": 3}}', '"category" must be a string'),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_line_names_file_and_line(tmp_path, case):
    line, problem = MALFORMED[case]
    path = tmp_path / "bad.txt"
    path.write_text(f"# header\n{HEX} ok first\n\n{HEX} ok second\n{line}\n{HEX} ok after\n")
    with pytest.raises(BlocklistError) as error:
        HashlistFilter(blocklist=path)  # fails when the filter is built, not at generation
    assert str(error.value).startswith(f"{path}:5: ")
    assert problem in str(error.value)


def test_missing_blocklist_file_is_an_error(tmp_path):
    with pytest.raises(BlocklistError, match="no such file"):
        HashlistFilter(blocklist=[tmp_path / "absent.txt"])


def test_no_blocklist_means_no_judgement(monkeypatch, clip):
    monkeypatch.delenv(ENV_VAR, raising=False)
    for flt in (HashlistFilter(), HashlistFilter(blocklist=[])):
        assert flt.check_frames(torch.from_numpy(clip)) is None
        assert flt.check_text("anything") is None


def test_environment_names_the_default_blocklists(monkeypatch, blocklists, clip):
    monkeypatch.setenv(ENV_VAR, os.pathsep.join(str(p) for p in blocklists))
    flt = HashlistFilter()
    assert len(flt.blocklist) == 2
    assert flt.check_frames(with_frames(clip, [8], resize(prohibited_image(99)))).category == OTHER_CATEGORY
    assert flt.check_text("anything") is None


def test_hex_is_the_threatexchange_form():
    # ThreatExchange writes the hash vector as one binary number, first bit most significant.
    image = prohibited_image(7)
    bits, quality = pdqhash.compute(image)
    assert pdq_hash(image) == (format(int("".join(str(b) for b in bits), 2), "064x"), quality)


def test_checked_in_blocklist_still_matches():
    flt = HashlistFilter(blocklist=DATA / "synthetic.txt")
    assert len(flt.blocklist) == 3
    clip = scene_clip(np.random.default_rng(9))
    first = flt.check_frames(with_frames(clip, [0], resize(prohibited_image(7))))
    assert (first.allowed, first.category) == (False, CATEGORY)
    second = flt.check_frames(with_frames(clip, [8], resize(prohibited_image(99))))
    assert (second.allowed, second.category) == (False, OTHER_CATEGORY)
    assert flt.check_frames(torch.from_numpy(clip)).allowed is True


# --- building blocklists ----------------------------------------------------------------------


def test_build_blocklist_hashes_the_decoded_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in (7, 99):
        write_image(folder / f"spiral {seed}.png", prohibited_image(seed))
    (folder / "notes.md").write_text("not an image")
    out = build_blocklist([folder], "violence", tmp_path / "list.txt")
    entries = load_blocklist(out).entries
    assert [(e.category, e.label) for e in entries] == [("violence", "spiral 7"), ("violence", "spiral 99")]
    assert [e.pdq for e in entries] == [pdq_hash(prohibited_image(s))[0] for s in (7, 99)]
    jsonl = build_blocklist([folder / "spiral 7.png"], "violence", tmp_path / "list.jsonl")
    assert json.loads(jsonl.read_text()) == {"pdq": entries[0].pdq, "category": "violence", "label": "spiral 7"}


def test_build_blocklist_fails_without_touching_the_old_file(tmp_path):
    good = write_image(tmp_path / "good.png", prohibited_image(7))
    flat = write_image(tmp_path / "flat.png", np.full((64, 64, 3), 90, np.uint8))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    out = tmp_path / "list.txt"
    out.write_text("previous\n")
    with pytest.raises(BlocklistError, match=r"flat\.png.*PDQ quality 0 < 50"):
        build_blocklist([good, flat], "violence", out)
    with pytest.raises(ValueError, match=r"broken\.png"):
        build_blocklist([good, broken], "violence", out)
    with pytest.raises(ValueError, match="category"):
        build_blocklist([good], "two words", out)
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png", "flat.png", "good.png", "list.txt"]


def test_command_line_builds_and_checks(tmp_path, capsys):
    image = write_image(tmp_path / "spiral.png", prohibited_image(7))
    other = write_image(tmp_path / "scene.png", scene_clip(np.random.default_rng(3), frames=1)[0])
    out = tmp_path / "list.txt"
    assert hashlist.main(["build", str(out), str(image), "--category", CATEGORY]) == 0
    assert hashlist.main(["check", str(image), "--blocklist", str(out)]) == 1
    assert f"refused ({CATEGORY}): frame 0 matches blocklisted image spiral" in capsys.readouterr().out
    assert hashlist.main(["check", str(other), "--blocklist", str(out)]) == 0


# --- the filter's inputs and registration ----------------------------------------------------


def test_frames_must_be_uint8_thwc(flt):
    with pytest.raises(ValueError, match="uint8"):
        flt.check_frames(torch.zeros(3, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        flt.check_frames(torch.zeros(8, 8, 3, dtype=torch.uint8))


@pytest.mark.parametrize(
    "config", [{"threshold": -1}, {"threshold": 257}, {"threshold": True}, {"every": 0}, {"min_quality": 101}]
)
def test_bad_settings_are_rejected(blocklists, config):
    with pytest.raises(ValueError, match=next(iter(config))):
        HashlistFilter(blocklist=blocklists, **config)


def test_registered_as_hashlist(blocklists):
    registry = Registry.load(builtins=("skyloom.plugins.safety_filter.hashlist",), entry_points=False)
    assert "hashlist" in registry.names("safety_filter")
    flt = registry.create("safety_filter", "pdq-hashlist", blocklist=blocklists[0])
    assert isinstance(flt, HashlistFilter) and len(flt.blocklist) == 1


# --- the classifier adapter ------------------------------------------------------------------


class RedClassifier:
    """A toy in-house classifier: the share of strongly red pixels is the score of "red_alert"."""

    def __init__(self):
        self.seen: list[int] = []

    def classify(self, frame):
        self.seen.append(int(frame[-1, -1, 1]))  # indexed_clip writes each frame's index there
        red = (frame[..., 0] > 200) & (frame[..., 1] < 80) & (frame[..., 2] < 80)
        score = float(red.mean())
        return ("red_alert" if score > 0 else None), score


def indexed_clip(frames: int, red: dict[int, float] | None = None) -> torch.Tensor:
    """Grey 10x10 frames; the green of the bottom-right pixel holds the frame's index, and
    red[i] (at most 0.9) is the share of frame i painted red, from the left."""
    clip = np.full((frames, 10, 10, 3), 120, np.uint8)
    for i, share in (red or {}).items():
        clip[i, :, : int(round(10 * share))] = (255, 0, 0)
    clip[:, -1, -1, 1] = np.arange(frames)
    return torch.from_numpy(clip)


def test_classifier_is_a_frame_classifier():
    assert isinstance(RedClassifier(), FrameClassifier)


def test_classifier_sees_the_same_frames_as_the_hashlist():
    classifier = RedClassifier()
    ClassifierFrameFilter(classifier, every=8).check_frames(indexed_clip(20))
    assert classifier.seen == [0, 8, 16, 19] == sampled_frame_indices(20, 8)


def test_classifier_refusal():
    classifier = RedClassifier()
    decision = ClassifierFrameFilter(classifier, threshold=0.5).check_frames(indexed_clip(T, {8: 0.8}))
    assert (decision.allowed, decision.category, decision.score) == (False, "red_alert", pytest.approx(0.8))
    assert decision.reason == "frame 8 classified red_alert by RedClassifier (score 0.8 >= 0.5)"
    assert classifier.seen == [0, 8]  # stops at the first refusing frame


def test_classifier_below_threshold_or_unsampled_passes():
    flt = ClassifierFrameFilter(RedClassifier(), threshold=0.5)
    below = flt.check_frames(indexed_clip(T, {8: 0.3}))
    assert below.allowed is True and below.score == pytest.approx(0.3)
    assert flt.check_frames(indexed_clip(T, {3: 1.0})).allowed is True  # frame 3 is not sampled
    assert ClassifierFrameFilter(RedClassifier(), every=1).check_frames(indexed_clip(T, {3: 1.0})).allowed is False
    assert flt.check_text("red") is None


class Returns:
    def __init__(self, result):
        self.result = result

    def classify(self, frame):
        return self.result


@pytest.mark.parametrize(
    "result, error",
    [
        (0.9, TypeError),  # not a pair
        (("red", "high"), TypeError),
        ((3, 0.9), TypeError),  # category not a str
        (("red", float("nan")), ValueError),
    ],
)
def test_classifier_results_are_checked(result, error):
    with pytest.raises(error, match="Returns.classify"):
        ClassifierFrameFilter(Returns(result)).check_frames(indexed_clip(3))


def test_classifier_adapter_rejects_non_classifiers():
    with pytest.raises(TypeError, match="classify"):
        ClassifierFrameFilter(object())
    with pytest.raises(ValueError, match="threshold"):
        ClassifierFrameFilter(RedClassifier(), threshold=float("inf"))


def test_threshold_is_inclusive(tmp_path, clip):
    # An entry exactly 31 bits from the frame's own hash matches at threshold 31, not at 30.
    frame = resize(prohibited_image(7))
    bits = np.array([int(c) for c in format(int(pdq_hash(frame)[0], 16), "0256b")])
    bits[np.random.default_rng(0).choice(256, size=31, replace=False)] ^= 1
    path = tmp_path / "near.txt"
    path.write_text(f"{format(int(''.join(map(str, bits)), 2), '064x')} {CATEGORY} near\n")
    frames = with_frames(clip, [8], frame)
    at = HashlistFilter(blocklist=path, threshold=31).check_frames(frames)
    assert (at.allowed, at.reason) == (False, "frame 8 matches blocklisted image near (distance 31)")
    below = HashlistFilter(blocklist=path, threshold=30).check_frames(frames)
    assert below.allowed is True and "(closest 31)" in below.reason
