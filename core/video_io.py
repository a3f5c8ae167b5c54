"""Reading and writing videos and stills with PyAV (FFmpeg).

Frames are (T, H, W, 3) uint8 RGB tensors, as every stage after decoding sees them.

Writing: `write_video` encodes H.264 in yuv420p, the format every player and browser plays;
`write_image` writes one frame as a lossless PNG; `write_media` picks one by the suffix. A write
never leaves a partial file behind: it goes to a hidden temporary file in the same directory,
which replaces the target only once it is complete, and is deleted on any error or Ctrl-C.

yuv420p stores colour at half resolution, so H.264 needs an even height and width. An odd one
gains one row or column that repeats the last (so 63×47 frames are written as 64×48); the
models' sizes (64×64, 80×48, ...) are even and are written exactly as they are.

Reading: `read_video` decodes MP4, WebM, MOV, MKV, GIF and still images (PNG, JPEG) into
frames and a frame rate. Anything it cannot read raises VideoIOError naming the file.
"""

from __future__ import annotations

import os
import secrets
from fractions import Fraction
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

VIDEO_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}  # suffix -> muxer
IMAGE_SUFFIXES = (".png",)
STILL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # read as one frame, fps 0


class VideoIOError(ValueError):
    """A file could not be read or written; the message names the file and the problem."""


# --- validation --------------------------------------------------------------------------


def as_frames(frames, *, name: str = "frames") -> np.ndarray:
    """(T, H, W, 3) uint8 tensor or array -> contiguous numpy array, or a ValueError saying why not."""
    if isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            raise ValueError(
                f"{name} must be uint8 (0..255), got {frames.dtype}; from [-1, 1] floats use "
                "((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)"
            )
        array = frames.detach().cpu().numpy()
    elif isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise ValueError(f"{name} must be uint8 (0..255), got {frames.dtype}")
        array = frames
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(frames).__name__}")
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"{name} must be (T, H, W, 3) RGB, got shape {tuple(array.shape)}")
    if 0 in array.shape:
        raise ValueError(f"{name} is empty: shape {tuple(array.shape)}")
    return np.ascontiguousarray(array)


def _pad_to_even(array: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) -> (T, H + H%2, W + W%2, 3), repeating the last row and column."""
    t, h, w, _ = array.shape
    if h % 2 == 0 and w % 2 == 0:
        return array
    return np.pad(array, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _check_fps(fps) -> Fraction:
    try:
        rate = Fraction(fps).limit_denominator(1001 * 1000)
    except (TypeError, ValueError):
        raise ValueError(f"fps must be a positive number, got {fps!r}") from None
    if not rate > 0 or rate > 1000:
        raise ValueError(f"fps must be in (0, 1000], got {fps!r}")
    return rate


# --- atomic writes -----------------------------------------------------------------------


def _atomic_write(path, write) -> Path:
    """Run `write(temp_path)` on a temporary file beside `path`, then move it onto `path`.

    On any exception (Ctrl-C included) the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise VideoIOError(f"cannot write {str(path)!r}: the directory {str(directory)!r} {problem}")
    temp = directory / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        # O_EXCL: never clobber anything; mode 0o666 so the umask, not us, sets permissions.
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as error:
        raise VideoIOError(f"cannot write {str(path)!r}: {error.strerror or error}") from error
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, VideoIOError):
            raise VideoIOError(f"cannot write {str(path)!r}: {error}") from error
        raise
    return path


# --- writing -----------------------------------------------------------------------------


def _yuv420p_frame(image: np.ndarray):
    """An RGB image as a yuv420p frame whose every byte is set. PyAV's frames pad each row to an
    aligned stride and leave the padding uninitialised; x264 reads it, so the same frames would
    not always encode to the same bytes. Here the padding is written as zeros."""
    import av

    height, width, _ = image.shape
    yuv = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p").to_ndarray()  # (H·3/2, W)
    quarter = height * width // 4
    chroma = yuv[height:].reshape(-1)  # U then V, each (H/2)·(W/2) bytes
    planes = (yuv[:height], chroma[:quarter].reshape(height // 2, width // 2), chroma[quarter:].reshape(height // 2, width // 2))
    frame = av.VideoFrame(width, height, "yuv420p")
    for plane, data in zip(frame.planes, planes):
        padded = np.zeros((plane.height, plane.line_size), dtype=np.uint8)
        padded[:, : plane.width] = data
        plane.update(padded)
    return frame


def write_video(
    path,
    frames,
    fps: float,
    *,
    crf: int = 18,
    codec: str = "libx264",
    preset: str = "medium",
    metadata: Mapping[str, str] | None = None,
    reproducible: bool = False,
) -> Path:
    """Write (T, H, W, 3) uint8 frames as H.264 yuv420p video (.mp4, .m4v, .mov or .mkv).

    crf: libx264 quality, 0 (lossless luma) to 51; 18 is visually near-lossless.
    fps: frames per second, any positive number (fractions such as 23.976 are kept to 1/1001).
    preset: libx264 speed/size trade-off ("ultrafast" ... "veryslow").
    metadata: container tags, e.g. {"comment": "..."}; arbitrary keys are kept in MP4/MOV.
    reproducible: the same frames always give the same bytes (libx264 only). This turns off x264's
        macroblock-tree rate control, which reads uninitialised memory when a frame's macroblock
        count is not a multiple of 8 (80×48 and 48×80 among them). Files are 3-39% larger at
        the same CRF (PSNR within -0.01..+0.27 dB), and a watermark survives re-encoding less
        well (docs/performance.md).
    An odd height or width is padded by one repeated row or column (see the module docstring).
    Returns the path written.
    """
    array = _pad_to_even(as_frames(frames))
    rate = _check_fps(fps)
    if not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an int in [0, 51], got {crf!r}")
    if reproducible and codec != "libx264":
        raise ValueError(f"reproducible=True is only known to hold for codec='libx264', got codec={codec!r}")
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise VideoIOError(
            f"cannot write video {str(path)!r}: unsupported suffix {suffix or '(none)'!r}; "
            f"use one of {', '.join(VIDEO_FORMATS)}"
        )
    import av

    _, height, width, _ = array.shape

    def write(temp: Path) -> None:
        options = {"movflags": "+faststart+use_metadata_tags"} if VIDEO_FORMATS[suffix] in ("mp4", "mov") else {}
        with av.open(str(temp), mode="w", format=VIDEO_FORMATS[suffix], options=options) as container:
            for key, value in (metadata or {}).items():
                container.metadata[str(key)] = str(value)
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if codec in ("libx264", "libx265"):
                stream.options = {"crf": str(crf), "preset": preset}
            if reproducible:  # libx264 only, checked above
                stream.options["x264-params"] = "mbtree=0"  # found with valgrind: see the docstring
            for image in array:
                container.mux(stream.encode(_yuv420p_frame(image)))
            container.mux(stream.encode(None))  # flush the encoder's delayed frames

    try:
        return _atomic_write(path, write)
    except av.FFmpegError as error:
        raise VideoIOError(f"cannot write video {str(path)!r} with {codec}: {error}") from error


def _png_bytes(image: np.ndarray) -> bytes:
    import av

    encoder = av.CodecContext.create("png", "w")
    encoder.width, encoder.height, encoder.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    packets = encoder.encode(av.VideoFrame.from_ndarray(image, format="rgb24")) + encoder.encode(None)
    return b"".join(bytes(packet) for packet in packets)


def write_image(path, frame) -> Path:
    """Write one frame, (H, W, 3) or (1, H, W, 3) uint8, as a lossless PNG. Returns the path."""
    if isinstance(frame, (torch.Tensor, np.ndarray)) and frame.ndim == 3:
        frame = frame[None]
    array = as_frames(frame, name="frame")
    if array.shape[0] != 1:
        raise ValueError(f"write_image writes one frame, got {array.shape[0]}; use write_video for more")
    if Path(path).suffix.lower() not in IMAGE_SUFFIXES:
        raise VideoIOError(f"cannot write image {str(path)!r}: only {', '.join(IMAGE_SUFFIXES)} is supported")
    data = _png_bytes(array[0])
    return _atomic_write(path, lambda temp: temp.write_bytes(data))


def write_media(path, frames, fps: float, **video_options) -> Path:
    """Write frames by the path's suffix: a video container, or .png for a single frame.

    video_options (crf, codec, preset, metadata, reproducible) go to write_video. Returns the path.
    """
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        array = as_frames(frames)
        if array.shape[0] != 1:
            raise VideoIOError(
                f"cannot write {array.shape[0]} frames to {str(path)!r}: {suffix} holds one frame; "
                f"use a video suffix ({', '.join(VIDEO_FORMATS)})"
            )
        return write_image(path, array)
    if suffix in VIDEO_FORMATS:
        return write_video(path, frames, fps, **video_options)
    supported = ", ".join((*VIDEO_FORMATS, *IMAGE_SUFFIXES))
    raise VideoIOError(f"cannot write {str(path)!r}: unsupported suffix {suffix or '(none)'!r}; use one of {supported}")


# --- reading -----------------------------------------------------------------------------


def read_video(path) -> tuple[torch.Tensor, float]:
    """Decode a video or still image into ((T, H, W, 3) uint8 RGB frames, fps).

    Reads what FFmpeg reads: MP4, MOV, MKV, WebM, GIF, PNG, JPEG, ... A still image is one
    frame with fps 0.0 (it has no frame rate). A missing, empty, corrupt or truncated file,
    or one without a video stream, raises VideoIOError.
    """
    import av

    path = Path(path)
    if not path.exists():
        raise VideoIOError(f"cannot read {str(path)!r}: no such file")
    if not path.is_file():
        raise VideoIOError(f"cannot read {str(path)!r}: not a regular file")
    if path.stat().st_size == 0:
        raise VideoIOError(f"cannot read {str(path)!r}: the file is empty")
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise VideoIOError(f"cannot read {str(path)!r}: not a video or image FFmpeg can decode ({error})") from error
    with container:
        if not container.streams.video:
            raise VideoIOError(f"cannot read {str(path)!r}: it has no video stream (an audio file, or truncated?)")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        declared = stream.frames  # 0 when the container does not say
        frames = []
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
        except av.FFmpegError as error:
            raise VideoIOError(
                f"cannot read {str(path)!r}: corrupt or truncated after {len(frames)} frame(s) ({error})"
            ) from error
        if not frames:
            raise VideoIOError(f"cannot read {str(path)!r}: it contains no decodable frames")
        if declared and len(frames) < declared:
            raise VideoIOError(
                f"cannot read {str(path)!r}: truncated, the container declares {declared} frames "
                f"but only {len(frames)} could be decoded"
            )
        still = path.suffix.lower() in STILL_SUFFIXES or container.format.name.endswith("_pipe")
        rate = stream.average_rate or stream.guessed_rate
        fps = 0.0 if still and len(frames) == 1 else float(rate) if rate else 0.0
    if len({f.shape for f in frames}) > 1:
        raise VideoIOError(f"cannot read {str(path)!r}: the frame size changes mid-stream")
    return torch.from_numpy(np.stack(frames)), fps


def resize_frames(frames, width: int, height: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, height, width, 3) uint8 with a Lanczos filter (FFmpeg's swscale)."""
    import av

    array = as_frames(frames)
    out = np.empty((array.shape[0], height, width, 3), dtype=np.uint8)
    for index, frame in enumerate(array):
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        out[index] = video_frame.reformat(width=width, height=height, interpolation="LANCZOS").to_ndarray()
    return torch.from_numpy(out)
