"""The `spreadspectrum` watermarker: round trips, the edits it must survive, and the videos it
must not claim (unmarked, or marked under another key), at 256 x 256 and at the embedded
model's own sizes (64 x 64, 80 x 48, 48 x 80)."""

from fractions import Fraction
import os
import tempfile

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from skyloom.datasets.shapes import make_clip
from skyloom.kinds import WatermarkDetection, Watermarker
from skyloom.plugins.watermarker import spreadspectrum
from skyloom.plugins.watermarker.spreadspectrum import (
    CODED_BITS,
    SpreadSpectrumWatermarker,
    conv_encode,
    crc16_ccitt,
    viterbi_decode,
)
from skyloom.registry import Registry
from skyloom.video_io import read_video, write_video

PAYLOAD = bytes.fromhex("5e1f00a7c3d2b401")  # model id + generation id, as the pipeline passes


def scene(seed: int, frames: int = 6, size: int = 256) -> torch.Tensor:
    """A natural-looking moving clip: smooth 1/f² 'terrain' panning under a sky gradient, with
    a disc crossing it, colour-tinted. (T, size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    n = 2 * size
    freq = np.fft.fftfreq(n)
    radius = np.hypot(*np.meshgrid(freq, freq, indexing="ij"))
    radius[0, 0] = 1
    terrain = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) / radius).real
    terrain = (terrain - terrain.mean()) / terrain.std()
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for t in range(frames):
        ground = 100 + 35 * np.roll(terrain, (-t, -3 * t), axis=(0, 1))[:size, :size]
        img = np.where(yy < size * 0.35, 210 - 80 * yy / size, ground)
        img = np.where((yy - size / 2) ** 2 + (xx - 20 - 9 * t) ** 2 < (size / 8) ** 2, 60.0, img)
        out.append(img)
    rgb = np.stack(out)[..., None] * np.array([1.0, 0.95, 0.85]) + np.array([0, 5, 10])
    return torch.from_numpy(np.clip(np.round(rgb), 0, 255).astype(np.uint8))


def h264(frames: torch.Tensor, crf: int) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        with av.open(path, "w") as container:
            stream = container.add_stream("libx264", rate=Fraction(24))
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames.numpy():
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        with av.open(path) as container:
            return torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]))


def skyloom_write(frames: torch.Tensor, tmp_path, crf: int = 18) -> torch.Tensor:
    """Written as `skyloom generate` writes (H.264 CRF 18 by default) and read back as `skyloom
    verify` reads."""
    path = tmp_path / f"clip-crf{crf}.mp4"
    write_video(path, frames, 8, crf=crf)
    return read_video(path)[0]


def shapes(index: int) -> torch.Tensor:
    """Shapes-world clip `index` of seed 0 (what the trained embedded model makes): flat shapes
    on a flat background. 19: a static yellow square on black, the hardest of these for the
    mark (hard edges, and half the chips clip at black); 1 and 46: two moving shapes on navy;
    4: 80 x 48, static green square on navy; 31: 80 x 48, on black; 7 and 43: 48 x 80."""
    return make_clip(0, index)[1]


SMALL_CLIPS = {"64x64 black": 19, "64x64 navy": 1, "64x64 two moving": 46, "80x48 navy": 4, "80x48 black": 31,
               "48x80 black": 7, "48x80 gray": 43}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).square().mean().item()
    return 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def marker() -> SpreadSpectrumWatermarker:
    return SpreadSpectrumWatermarker()


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return scene(0, frames=10)  # 10 frames: with 6, CRF 28 on this fast pan is not reliable


@pytest.fixture(scope="module")
def marked(marker, clip) -> torch.Tensor:
    return marker.embed(clip, PAYLOAD)


def assert_found(marker: SpreadSpectrumWatermarker, frames: torch.Tensor) -> None:
    result = marker.detect(frames)
    assert isinstance(result, WatermarkDetection)
    assert result.detected, marker.read(frames)
    assert result.payload == PAYLOAD
    assert 0.5 <= result.confidence <= 1.0


# --- coding -----------------------------------------------------------------------------------


def test_crc16_matches_the_ccitt_false_check_value():
    assert crc16_ccitt(b"123456789") == 0x29B1


def test_viterbi_corrects_flipped_coded_bits():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, 80).astype(np.uint8)
    coded = conv_encode(bits)
    assert coded.shape == (CODED_BITS,)
    soft = 2.0 * coded - 1
    soft[rng.choice(CODED_BITS, 8, replace=False)] *= -1  # 8 hard errors, spread out
    assert np.array_equal(viterbi_decode(soft), bits)


@given(payload=st.binary(min_size=8, max_size=8))
def test_tile_chips_decode_back_to_the_payload(payload):
    marker = SpreadSpectrumWatermarker(key="property")
    chips = marker.tile(payload).reshape(-1)
    # Despread: each coded bit's chips times their keyed signs, summed.
    soft = np.bincount(marker._bit_of_chip, weights=chips * marker._signs, minlength=CODED_BITS)
    assert np.all(np.abs(soft) >= 5)  # every coded bit has at least five chips
    assert spreadspectrum._decode(soft) == (payload, True)


# --- round trip and invisibility ---------------------------------------------------------------


def test_round_trip_is_exact_on_clean_frames(marker, marked):
    assert marked.shape == (10, 256, 256, 3) and marked.dtype == torch.uint8
    assert_found(marker, marked)
    assert marker.read(marked).z > 2 * marker.threshold


def test_psnr_is_at_least_38_db(marker, clip, marked):
    assert psnr(marked, clip) >= 38.0
    flat = torch.full((3, 256, 320, 3), 128, dtype=torch.uint8)  # nothing to hide the mark in
    flat_marked = marker.embed(flat, PAYLOAD)
    assert psnr(flat_marked, flat) >= 38.0
    assert_found(marker, flat_marked)


def test_same_payload_same_mark_and_different_payloads_differ(marker, clip, marked):
    assert torch.equal(marker.embed(clip, PAYLOAD), marked)
    other = marker.embed(clip, bytes(8))
    assert not torch.equal(other, marked)
    assert marker.detect(other).payload == bytes(8)


# --- the embedded model's sizes: one tile over the frame ---------------------------------------


@pytest.mark.parametrize("index", SMALL_CLIPS.values(), ids=SMALL_CLIPS.keys())
def test_small_frames_round_trip_through_skyloom_write(marker, index, tmp_path):
    clip = shapes(index)
    assert clip.shape[0] == 17 and min(clip.shape[1:3]) < 128
    written = skyloom_write(marker.embed(clip, PAYLOAD), tmp_path)
    assert written.shape == clip.shape
    assert_found(marker, written)
    assert marker.read(written).layout == "single"


@pytest.mark.parametrize("index", SMALL_CLIPS.values(), ids=SMALL_CLIPS.keys())
def test_small_frames_psnr_is_at_least_38_db(marker, index):
    clip = shapes(index)
    assert psnr(marker.embed(clip, PAYLOAD), clip) >= 38.0


def test_black_frames_keep_the_mark_at_the_same_psnr(marker):
    # Half the chips clip at 0; the rest are raised so that the RMS change stays `strength`.
    black = torch.zeros(9, 64, 64, 3, dtype=torch.uint8)
    marked = marker.embed(black, PAYLOAD)
    assert 38.0 <= psnr(marked, black) <= 40.0
    assert_found(marker, marked)


def test_small_frames_survive_crf_23_and_brightness(marker, tmp_path):
    written = skyloom_write(marker.embed(shapes(1), PAYLOAD), tmp_path)
    assert_found(marker, skyloom_write(written, tmp_path, crf=23))
    assert_found(marker, (written.float() * 1.3).round().clamp(0, 255).byte())


def test_rescaled_copies_of_small_frames_are_read_with_the_layout_they_carry(marker):
    marked = marker.embed(shapes(19), PAYLOAD)
    up = F.interpolate(marked.permute(0, 3, 1, 2).float(), scale_factor=4, mode="bicubic")
    up = up.round().clamp(0, 255).byte().permute(0, 2, 3, 1).contiguous()  # 256 x 256
    assert_found(marker, up)
    assert marker.read(up).layout == "single"
    assert marker.read(marker.embed(up, PAYLOAD)).layout == "tiled"  # 256 x 256 is marked tiled


@pytest.mark.parametrize("index", [19, 31, 7, 10, 58, 61])
def test_unmarked_small_clips_are_not_detected(marker, index, tmp_path):
    clip = shapes(index)
    for frames in (clip, skyloom_write(clip, tmp_path)):
        result = marker.detect(frames)
        assert not result.detected and result.payload is None
        assert result.confidence < 0.5


def test_single_tile_sync_on_unmarked_clips_stays_far_below_its_threshold(marker, tmp_path):
    # The lower threshold for small frames holds because only alignments within a pixel of
    # none are searched (a search of all 4,096 would put unmarked clips near z = 4).
    zs = [r.z for i in (19, 31, 7, 10, 58, 61) for r in marker.readings(skyloom_write(shapes(i), tmp_path)) if r.layout == "single"]
    assert len(zs) == 6 and np.mean(zs) < 2.5 and max(zs) < marker.single_threshold


def test_wrong_key_does_not_see_a_small_mark(marker):
    video = SpreadSpectrumWatermarker(key="a deployment's own secret").embed(shapes(1), PAYLOAD)
    assert not marker.detect(video).detected


def test_min_frame_side_is_48_and_smaller_frames_are_refused(marker):
    assert SpreadSpectrumWatermarker.min_frame_side == 48
    marker.embed(torch.zeros(1, 48, 80, 3, dtype=torch.uint8), PAYLOAD)
    with pytest.raises(ValueError, match="at least 48 x 48"):
        marker.embed(torch.zeros(1, 40, 80, 3, dtype=torch.uint8), PAYLOAD)


# --- attacks ----------------------------------------------------------------------------------


def test_survives_h264_crf_28(marker, marked):
    assert_found(marker, h264(marked, 28))


def test_survives_half_size_downscale(marker, marked):
    half = F.interpolate(marked.permute(0, 3, 1, 2).float(), scale_factor=0.5, mode="bilinear", antialias=True)
    assert_found(marker, half.round().clamp(0, 255).byte().permute(0, 2, 3, 1).contiguous())


@pytest.mark.parametrize("top, left", [(8, 17), (26, 0)])
def test_survives_a_10_percent_crop(marker, marked, top, left):
    cropped = marked[:, top : top + 230, left : left + 230]  # 10% of each side removed
    assert_found(marker, cropped.contiguous())


@pytest.mark.parametrize("gain", [0.8, 1.3])
def test_survives_brightness_change(marker, marked, gain):
    assert_found(marker, (marked.float() * gain).round().clamp(0, 255).byte())


def test_survives_dropping_30_percent_of_frames(marker):
    video = marker.embed(scene(1, frames=10), PAYLOAD)
    kept = torch.tensor([0, 2, 3, 5, 6, 8, 9])  # 3 of 10 dropped
    assert_found(marker, video[kept])


def test_survives_24_to_30_fps_retime(marker):
    video = marker.embed(scene(2, frames=8), PAYLOAD)
    index = torch.tensor([min(7, int(j * 24 / 30 + 0.5)) for j in range(10)])  # frames repeat
    assert_found(marker, video[index])


# --- no false claims --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_unmarked_clips_are_not_detected(marker, seed):
    result = marker.detect(scene(seed, frames=4))
    assert not result.detected and result.payload is None
    assert result.confidence < 0.5


def test_unmarked_flat_and_reencoded_clips_are_not_detected(marker):
    assert not marker.detect(torch.full((2, 256, 256, 3), 90, dtype=torch.uint8)).detected
    assert not marker.detect(h264(scene(5, frames=4), 28)).detected


def test_wrong_key_is_not_detected(marked):
    other = SpreadSpectrumWatermarker(key="a deployment's own secret")
    result = other.detect(marked)
    assert not result.detected and result.payload is None


def test_own_key_round_trips_and_default_key_does_not_see_it(marker, clip):
    keyed = SpreadSpectrumWatermarker(key=b"\x01secret")
    video = keyed.embed(clip, PAYLOAD)
    assert_found(keyed, video)
    assert not marker.detect(video).detected


# --- input checks and registration -------------------------------------------------------------


@pytest.mark.parametrize(
    "frames, error, match",
    [
        (torch.zeros(2, 256, 256, 3, dtype=torch.float32), TypeError, "uint8"),
        (np.zeros((2, 256, 256, 3), dtype=np.int16), TypeError, "uint8"),
        (torch.zeros(256, 256, 3, dtype=torch.uint8), ValueError, r"\(T, H, W, 3\)"),
        (torch.zeros(2, 256, 256, 4, dtype=torch.uint8), ValueError, r"\(T, H, W, 3\)"),
        (torch.zeros(0, 256, 256, 3, dtype=torch.uint8), ValueError, "at least one frame"),
        (torch.zeros(2, 40, 256, 3, dtype=torch.uint8), ValueError, "at least 48 x 48"),
        ([[0]], TypeError, "torch.Tensor"),
    ],
)
def test_embed_rejects_bad_frames(marker, frames, error, match):
    with pytest.raises(error, match=match):
        marker.embed(frames, PAYLOAD)


def test_detect_minimum_size_is_32(marker):
    with pytest.raises(ValueError, match="at least 32 x 32"):
        marker.detect(torch.zeros(1, 31, 128, 3, dtype=torch.uint8))
    assert not marker.detect(torch.zeros(1, 32, 32, 3, dtype=torch.uint8)).detected


@pytest.mark.parametrize("payload, error", [(b"1234567", ValueError), (b"123456789", ValueError), ("12345678", TypeError)])
def test_payload_must_be_exactly_8_bytes(marker, payload, error):
    with pytest.raises(error, match="payload"):
        marker.embed(torch.zeros(1, 128, 128, 3, dtype=torch.uint8), payload)


@pytest.mark.parametrize("config", [{"strength": 0}, {"strength": 11}, {"key": ""}, {"masking": 2}, {"threshold": -1},
                                    {"single_threshold": 0}])
def test_bad_config_is_rejected(config):
    with pytest.raises(ValueError):
        SpreadSpectrumWatermarker(**config)


def test_registered_as_spreadspectrum_and_ss():
    registry = Registry.load(builtins=(), entry_points=False, extra_plugins=[spreadspectrum])
    assert registry.names("watermarker") == ["spreadspectrum"]
    built = registry.create("watermarker", "ss", key="k", strength=2.0)
    assert isinstance(built, Watermarker) and built.strength == 2.0
