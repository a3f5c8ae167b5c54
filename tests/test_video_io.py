import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from skyloom.video_io import VideoIOError, read_video, write_image, write_media, write_video


def gradient_video(frames: int = 9, height: int = 48, width: int = 80) -> torch.Tensor:
    """(T, H, W, 3) uint8: smooth colour ramps that move from frame to frame, like real footage."""
    t = torch.arange(frames, dtype=torch.float32)[:, None, None]
    y = torch.linspace(0, 1, height)[None, :, None]
    x = torch.linspace(0, 1, width)[None, None, :]
    red = 40 + 160 * x + 4 * t + 0 * y
    green = 30 + 180 * y + 3 * t + 0 * x
    blue = 200 - 100 * (x + y) / 2 + 2 * t
    return torch.stack([red, green, blue], -1).round().clamp(0, 255).to(torch.uint8)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean()
    return float(10 * torch.log10(255.0**2 / mse))


def encode_with_pyav(path: Path, frames: torch.Tensor, fps: int, codec: str, pix_fmt: str) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for image in frames.numpy():
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name not in keep)


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [8, 24, 12.5, 24000 / 1001])
def test_mp4_round_trip_keeps_count_size_fps_and_looks_the_same(tmp_path, fps):
    video = gradient_video()
    write_video(tmp_path / "clip.mp4", video, fps)
    frames, read_fps = read_video(tmp_path / "clip.mp4")
    assert frames.dtype == torch.uint8 and frames.shape == video.shape
    assert read_fps == pytest.approx(fps, rel=1e-6)
    assert psnr(frames, video) > 38


def test_mp4_is_h264_yuv420p(tmp_path):
    write_video(tmp_path / "clip.mp4", gradient_video(), 8)
    with av.open(str(tmp_path / "clip.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.frames == 9


def test_crf_trades_size_for_quality(tmp_path):
    video = gradient_video(frames=5, height=64, width=64)
    video = video ^ torch.randint(0, 8, video.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    write_video(tmp_path / "fine.mp4", video, 8, crf=10)
    write_video(tmp_path / "coarse.mp4", video, 8, crf=40)
    fine, coarse = read_video(tmp_path / "fine.mp4")[0], read_video(tmp_path / "coarse.mp4")[0]
    assert (tmp_path / "fine.mp4").stat().st_size > (tmp_path / "coarse.mp4").stat().st_size
    assert psnr(fine, video) > psnr(coarse, video) + 3


def test_the_same_frames_always_give_the_same_bytes(tmp_path):
    """Reproducible writes (datasets use them) are deterministic down to the file: no
    uninitialised memory (the padding of PyAV's frame rows, x264's macroblock tree) reaches
    the bytes, in this process or another."""
    script = (
        "import hashlib, sys; from skyloom.datasets.shapes import make_clip; from skyloom.video_io import write_video\n"
        "for i in (3, 6, 0):\n"  # 80x48, 48x80, 64x64: chroma rows of 40, 24 and 32 bytes
        "    print(hashlib.sha256(write_video(f'{sys.argv[1]}/{i}.mp4', make_clip(0, i)[1], 8.0, reproducible=True).read_bytes()).hexdigest())\n"
    )
    runs = []
    for attempt in range(3):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        done = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, check=True)
        runs.append(done.stdout.split())
    assert len(runs[0]) == 3 and runs[0] == runs[1] == runs[2]


def test_reproducible_writes_turn_off_the_macroblock_tree_and_only_they(tmp_path):
    """x264 writes its settings into the stream; mbtree reads uninitialised memory at 80×48."""
    video = gradient_video(frames=3, height=48, width=80)
    exact = write_video(tmp_path / "exact.mp4", video, 8, reproducible=True).read_bytes()
    default = write_video(tmp_path / "default.mp4", video, 8).read_bytes()
    assert b"x264 - core" in exact and b" mbtree=0 " in exact
    assert b"x264 - core" in default and b" mbtree=1 " in default
    with pytest.raises(ValueError, match="reproducible=True is only known to hold for codec='libx264'"):
        write_video(tmp_path / "other.mp4", video, 8, codec="libx265", reproducible=True)


def test_odd_sizes_are_padded_by_repeating_the_edge(tmp_path):
    video = gradient_video(frames=3, height=47, width=63)
    write_video(tmp_path / "odd.mp4", video, 8, crf=0)
    frames, _ = read_video(tmp_path / "odd.mp4")
    assert frames.shape == (3, 48, 64, 3)
    assert psnr(frames[:, :47, :63], video) > 38
    # the extra row and column copy the last ones, so nothing dark bleeds in at the border
    assert (frames[:, 47, :63].float() - video[:, 46].float()).abs().mean() < 4
    assert (frames[:, :47, 63].float() - video[:, :, 62].float()).abs().mean() < 4


def test_png_round_trip_is_exact(tmp_path):
    image = gradient_video(frames=1, height=37, width=53)
    image = image ^ torch.randint(0, 256, image.shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    write_image(tmp_path / "still.png", image[0])
    frames, fps = read_video(tmp_path / "still.png")
    assert torch.equal(frames, image)
    assert fps == 0.0
    assert (tmp_path / "still.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_numpy_frames_are_accepted(tmp_path):
    video = gradient_video(frames=2)
    write_video(tmp_path / "np.mp4", video.numpy(), 8)
    assert read_video(tmp_path / "np.mp4")[0].shape == video.shape


def test_metadata_is_stored_in_the_container(tmp_path):
    write_video(tmp_path / "tagged.mp4", gradient_video(frames=2), 8, metadata={"skyloom_request": "abc123"})
    with av.open(str(tmp_path / "tagged.mp4")) as container:
        assert container.metadata["skyloom_request"] == "abc123"


# --- write_media ---------------------------------------------------------------------------


def test_write_media_picks_the_writer_by_suffix(tmp_path):
    video = gradient_video(frames=4)
    write_media(tmp_path / "out.mp4", video, 8)
    write_media(tmp_path / "out.png", video[:1], 8)
    assert read_video(tmp_path / "out.mp4")[0].shape == video.shape
    assert torch.equal(read_video(tmp_path / "out.png")[0], video[:1])


def test_write_media_refuses_many_frames_to_png(tmp_path):
    with pytest.raises(VideoIOError, match=r"4 frames.*out\.png.*\.mp4"):
        write_media(tmp_path / "out.png", gradient_video(frames=4), 8)
    assert leftovers(tmp_path, set()) == []


def test_write_media_unknown_suffix_lists_the_supported_ones(tmp_path):
    with pytest.raises(VideoIOError, match=r"out\.avi.*\.mp4.*\.png"):
        write_media(tmp_path / "out.avi", gradient_video(frames=2), 8)


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames, message",
    [
        (torch.zeros(2, 16, 16, 3), "uint8"),
        (torch.zeros(16, 16, 3, dtype=torch.uint8), r"\(T, H, W, 3\)"),
        (torch.zeros(2, 16, 16, 4, dtype=torch.uint8), r"\(T, H, W, 3\).*\(2, 16, 16, 4\)"),
        (torch.zeros(0, 16, 16, 3, dtype=torch.uint8), "empty"),
    ],
)
def test_bad_frames_are_refused_with_the_reason(tmp_path, frames, message):
    with pytest.raises(ValueError, match=message):
        write_video(tmp_path / "bad.mp4", frames, 8)
    assert leftovers(tmp_path, set()) == []


@pytest.mark.parametrize("fps", [0, -1, float("nan"), "fast"])
def test_bad_fps_is_refused(tmp_path, fps):
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "bad.mp4", gradient_video(frames=2), fps)


# --- atomic writes -------------------------------------------------------------------------


class FailingVideoFrame:
    """Stands in for av.VideoFrame; raises `error` when the third frame is converted."""

    calls = 0
    error: BaseException = RuntimeError("encoder exploded")

    def __new__(cls, *args, **kwargs):  # building an empty frame works as usual
        return av.video.frame.VideoFrame(*args, **kwargs)

    @classmethod
    def from_ndarray(cls, *args, **kwargs):
        cls.calls += 1
        if cls.calls == 3:
            raise cls.error
        return av.video.frame.VideoFrame.from_ndarray(*args, **kwargs)


@pytest.mark.parametrize("error", [RuntimeError("encoder exploded"), KeyboardInterrupt()])
def test_interrupted_write_leaves_no_file_and_no_temp_file(tmp_path, monkeypatch, error):
    monkeypatch.setattr(FailingVideoFrame, "calls", 0)
    monkeypatch.setattr(FailingVideoFrame, "error", error)
    monkeypatch.setattr(av, "VideoFrame", FailingVideoFrame)
    with pytest.raises(type(error)):
        write_video(tmp_path / "clip.mp4", gradient_video(frames=6), 8)
    assert FailingVideoFrame.calls == 3  # it really failed mid-encode
    assert leftovers(tmp_path, set()) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path, monkeypatch):
    write_video(tmp_path / "clip.mp4", gradient_video(frames=2), 8)
    before = (tmp_path / "clip.mp4").read_bytes()
    monkeypatch.setattr(FailingVideoFrame, "calls", 0)
    monkeypatch.setattr(av, "VideoFrame", FailingVideoFrame)
    with pytest.raises(RuntimeError):
        write_video(tmp_path / "clip.mp4", gradient_video(frames=6), 8)
    assert (tmp_path / "clip.mp4").read_bytes() == before
    assert leftovers(tmp_path, {"clip.mp4"}) == []


def test_unknown_codec_is_a_clear_error_and_leaves_nothing(tmp_path):
    with pytest.raises((VideoIOError, ValueError), match="no-such-codec"):
        write_video(tmp_path / "clip.mp4", gradient_video(frames=2), 8, codec="no-such-codec")
    assert leftovers(tmp_path, set()) == []


def test_missing_directory_is_named(tmp_path):
    target = tmp_path / "nowhere" / "clip.mp4"
    with pytest.raises(VideoIOError, match=r"clip\.mp4.*nowhere.*does not exist"):
        write_video(target, gradient_video(frames=2), 8)


def test_parent_that_is_a_file_is_named(tmp_path):
    (tmp_path / "notadir").write_text("x")
    with pytest.raises(VideoIOError, match=r"notadir.*not a directory"):
        write_image(tmp_path / "notadir" / "still.png", gradient_video(frames=1)[0])


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to read-only directories")
def test_read_only_directory_is_an_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(VideoIOError, match=r"locked.*clip\.mp4.*[Pp]ermission"):
            write_video(locked / "clip.mp4", gradient_video(frames=2), 8)
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o700)


# --- reading other formats -----------------------------------------------------------------


def test_webm_is_readable(tmp_path):
    video = gradient_video(frames=6, height=32, width=48)
    encode_with_pyav(tmp_path / "clip.webm", video, 10, "libvpx-vp9", "yuv420p")
    frames, fps = read_video(tmp_path / "clip.webm")
    assert frames.shape == video.shape and fps == pytest.approx(10)
    assert psnr(frames, video) > 30


def test_gif_is_readable(tmp_path):
    # One flat primary a frame, made as rgb8 bytes (3 bits red, 3 green, 2 blue) rather than
    # converted from rgb24: that conversion dithers, differently between PyAV releases.
    primaries = [(0b11100000, (252, 0, 0)), (0b00011100, (0, 252, 0)), (0b00000011, (0, 0, 255))]
    with av.open(str(tmp_path / "clip.gif"), "w") as container:
        stream = container.add_stream("gif", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "rgb8"
        for i in range(4):
            pixels = np.full((32, 48), primaries[i % 3][0], dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb8")))
        container.mux(stream.encode(None))
    frames, fps = read_video(tmp_path / "clip.gif")
    expected = torch.tensor([primaries[i % 3][1] for i in range(4)], dtype=torch.uint8)[:, None, None, :]
    assert frames.shape == (4, 32, 48, 3) and fps == pytest.approx(10)
    assert torch.equal(frames, expected.expand(4, 32, 48, 3))


def test_jpeg_is_readable_as_one_frame(tmp_path):
    image = gradient_video(frames=1, height=32, width=48)
    with av.open(str(tmp_path / "still.jpg"), "w", format="image2") as container:
        stream = container.add_stream("mjpeg", rate=1)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuvj444p"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(image[0].numpy(), format="rgb24").reformat(format="yuvj444p")))
        container.mux(stream.encode(None))
    frames, fps = read_video(tmp_path / "still.jpg")
    assert frames.shape == (1, 32, 48, 3) and fps == 0.0
    assert psnr(frames, image) > 30


# --- unreadable input ----------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    with pytest.raises(VideoIOError, match=r"ghost\.mp4.*no such file"):
        read_video(tmp_path / "ghost.mp4")


def test_empty_file_is_named(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoIOError, match=r"empty\.mp4.*empty"):
        read_video(tmp_path / "empty.mp4")


def test_directory_is_refused(tmp_path):
    with pytest.raises(VideoIOError, match="not a regular file"):
        read_video(tmp_path)


def test_garbage_is_named(tmp_path):
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoIOError, match=r"noise\.mp4"):
        read_video(tmp_path / "noise.mp4")


def test_text_file_with_video_suffix_is_named(tmp_path):
    (tmp_path / "notes.webm").write_text("this is not a video\n" * 20)
    with pytest.raises(VideoIOError, match=r"notes\.webm"):
        read_video(tmp_path / "notes.webm")


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.97])
def test_truncated_mp4_is_an_error_not_a_shorter_video(tmp_path, keep):
    write_video(tmp_path / "full.mp4", gradient_video(), 8)
    data = (tmp_path / "full.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(VideoIOError, match=r"cut\.mp4"):
        read_video(tmp_path / "cut.mp4")


def test_audio_only_file_has_no_video_stream(tmp_path):
    with av.open(str(tmp_path / "tone.wav"), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        samples = (np.sin(np.arange(800) / 5) * 10000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(VideoIOError, match=r"tone\.wav.*no video stream"):
        read_video(tmp_path / "tone.wav")
