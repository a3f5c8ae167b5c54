"""Robustness and false-positive benchmark for the `spreadspectrum` watermarker.

    .venv/bin/python benchmarks/bench_watermark.py            # full run (about ten minutes)
    .venv/bin/python benchmarks/bench_watermark.py --quick    # short run
    .venv/bin/python benchmarks/bench_watermark.py --only small --only small-null   # one section or more
    .venv/bin/python benchmarks/bench_watermark.py --anchor /tmp/iwm_venv/bin/python

Sections (--only picks):
- robustness: procedurally generated 256 x 256 (and 512 x 512) clips. PSNR of the marked clip
  against the original; per attack (H.264 at CRF 23/28/35/40, half-size downscale, 10% crop,
  brightness ×0.8 and ×1.3, dropping 30% of frames, 24 -> 30 fps re-time, and a few
  combinations): bit accuracy of the decoded 64-bit payload and the detection rate (CRC valid
  and sync above threshold);
- small: shapes-world clips (skyloom.datasets.shapes: what the trained embedded model makes) at
  64 x 64, 80 x 48 and 48 x 80, 17 frames, marked with the single-tile layout and written as
  `skyloom generate` writes them (H.264 CRF 18); then re-encodes at CRF 23/28/35 (x264
  defaults) and other edits of that file;
- null: detection on 1,000 unmarked 256 x 256 clips;
- small-null: detection on 1,000 unmarked clips at the embedded model's sizes (half
  shapes-world of 9, 17 and 33 frames, half procedural; lossless, CRF 18 or CRF 28).
The null sections print, per layout, the distribution of the sync statistic z (each clip's
best reading) that the layout's threshold is chosen from, and how many readings' CRC checked
by chance.

--anchor PYTHON runs invisible-watermark's dwtDct and dwtDctSvd on the same clips and attacks,
frame by frame (majority vote of the per-frame bits), through a subprocess in a separate venv.
That package lists torch as a dependency but only its rivaGan method uses it, so install it
without (the anchor script stubs `torch` out):

    python3 -m venv /tmp/iwm_venv
    /tmp/iwm_venv/bin/pip install numpy opencv-python-headless PyWavelets Pillow
    /tmp/iwm_venv/bin/pip install --no-deps invisible-watermark

Measured 2026-12-01 (CPU, one thread, niced beside a training run): robustness in 52 s, small
in 69 s, null in 257 s, small-null in 126 s. False positives 0 of 1,000 at 256 x 256 (tiled z
mean 4.22, std 0.32, max 5.58; single z mean 1.16, std 0.70, max 3.72) and 0 of 1,000 small
(single z mean 1.19, std 0.71, max 3.52; tiled, 64 x 64 only, max 5.23), no chance CRC match:
hence the default thresholds 6.0 (tiled) and 4.5 (single). Figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tempfile
import time
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F

from skyloom.datasets.shapes import BUCKETS
from skyloom.datasets.shapes import make_clip as make_shapes_clip
from skyloom.plugins.watermarker.spreadspectrum import LAYOUTS, SpreadSpectrumWatermarker
from skyloom.video_io import read_video, write_video

# --- procedural clips -------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """(size, size) noise with a Gaussian spectrum of width ~1/scale, zero mean, unit std."""
    freq = np.fft.fftfreq(size)
    fy, fx = np.meshgrid(freq, freq, indexing="ij")
    spectrum = np.fft.fft2(rng.standard_normal((size, size))) * np.exp(-0.5 * (fy**2 + fx**2) * (2 * np.pi * scale) ** 2)
    field = np.fft.ifft2(spectrum).real
    return (field - field.mean()) / (field.std() + 1e-9)


def _pink_noise(rng: np.random.Generator, size: int, slope: float = 2.0) -> np.ndarray:
    """(size, size) noise with a 1/f^slope power spectrum, like natural images."""
    freq = np.fft.fftfreq(size)
    fy, fx = np.meshgrid(freq, freq, indexing="ij")
    radius = np.sqrt(fy**2 + fx**2)
    radius[0, 0] = 1.0
    spectrum = np.fft.fft2(rng.standard_normal((size, size))) / radius ** (slope / 2)
    spectrum[0, 0] = 0
    field = np.fft.ifft2(spectrum).real
    return (field - field.mean()) / (field.std() + 1e-9)


def _pan(field: np.ndarray, t: int, frames: int, height: int, width: int, speed: tuple[float, float]) -> np.ndarray:
    """Window (height, width) of a larger periodic field, moved by `speed` pixels per frame."""
    oy, ox = int(round(speed[0] * t)) % field.shape[0], int(round(speed[1] * t)) % field.shape[1]
    rolled = np.roll(field, (-oy, -ox), axis=(0, 1))
    return rolled[:height, :width]


def _colourise(luma: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(T, H, W) values in 0..255 -> (T, H, W, 3) uint8 with a random tint per channel."""
    tint = rng.uniform(0.75, 1.15, size=3)
    offset = rng.uniform(-15, 15, size=3)
    rgb = luma[..., None] * tint + offset
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def clip_smooth_noise(rng, frames, size):
    """Drifting smooth noise field (the null-test staple)."""
    field = _smooth_noise(rng, 2 * size, rng.uniform(2, 20))
    speed = rng.uniform(-3, 3, size=2)
    mean, contrast = rng.uniform(60, 190), rng.uniform(10, 50)
    luma = np.stack([_pan(field, t, frames, size, size, speed) for t in range(frames)]) * contrast + mean
    return _colourise(luma, rng)


def clip_landscape(rng, frames, size):
    """Natural-looking: sky gradient over 1/f² 'terrain', camera panning."""
    terrain = _pink_noise(rng, 2 * size, rng.uniform(1.6, 2.4))
    speed = (rng.uniform(-1, 1), rng.uniform(-4, 4))
    yy = np.linspace(0, 1, size)[:, None] * np.ones((1, size))
    horizon = rng.uniform(0.3, 0.6)
    out = []
    for t in range(frames):
        ground = 90 + 40 * _pan(terrain, t, frames, size, size, speed)
        sky = 200 - 60 * yy
        out.append(np.where(yy < horizon, sky, ground))
    return _colourise(np.stack(out), rng)


def clip_moving_shapes(rng, frames, size):
    """Gradient background with discs and boxes moving across it."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    background = 128 + 60 * ((np.cos(angle) * xx + np.sin(angle) * yy) / size - 0.5)
    shapes = [
        (rng.uniform(0, size, 2), rng.uniform(-5, 5, 2), rng.uniform(size / 16, size / 5), rng.uniform(20, 235), rng.random() < 0.5)
        for _ in range(rng.integers(2, 7))
    ]
    out = []
    for t in range(frames):
        img = background.copy()
        for centre, velocity, radius, value, disc in shapes:
            cy, cx = (centre + velocity * t) % size
            if disc:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
            else:
                inside = (np.abs(yy - cy) < radius) & (np.abs(xx - cx) < radius * 0.7)
            img[inside] = value
        out.append(img)
    return _colourise(np.stack(out), rng)


def clip_texture(rng, frames, size):
    """Periodic textures: a few gratings plus fine grain, panning (hard for a tiled mark)."""
    yy, xx = np.mgrid[0 : 2 * size, 0 : 2 * size].astype(np.float64)
    field = np.zeros_like(yy)
    for _ in range(rng.integers(1, 4)):
        period = rng.uniform(4, 60)
        angle = rng.uniform(0, np.pi)
        field += np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period + rng.uniform(0, 6.3))
    field = field / (np.abs(field).max() + 1e-9) + 0.3 * rng.standard_normal(field.shape)
    speed = rng.uniform(-2, 2, size=2)
    luma = 128 + rng.uniform(15, 45) * np.stack([_pan(field, t, frames, size, size, speed) for t in range(frames)])
    return _colourise(luma, rng)


def clip_upscaled_generation(rng, frames, size):
    """Stand-in for a small model's output upscaled: a 64 x 64 clip of blobs, bicubic x(size/64)."""
    small = 64
    field = _smooth_noise(rng, 2 * small, rng.uniform(1.5, 5))
    speed = rng.uniform(-1, 1, size=2)
    luma = 128 + 55 * np.stack([_pan(field, t, frames, small, small, speed) for t in range(frames)])
    clip = torch.from_numpy(_colourise(luma, rng)).permute(0, 3, 1, 2).to(torch.float32)
    up = F.interpolate(clip, size=(size, size), mode="bicubic", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def clip_flat(rng, frames, size):
    """Nearly flat frames with sensor-like noise (hardest case for invisibility)."""
    level = rng.uniform(30, 225)
    luma = level + rng.normal(0, rng.uniform(0, 2), size=(frames, size, size))
    return _colourise(luma, rng)


CLIP_KINDS = {
    "smooth_noise": clip_smooth_noise,
    "landscape": clip_landscape,
    "moving_shapes": clip_moving_shapes,
    "texture": clip_texture,
    "upscaled_gen": clip_upscaled_generation,
    "flat": clip_flat,
}


def make_clip(kind: str, seed: int, frames: int, size: int | tuple[int, int]) -> torch.Tensor:
    """A procedural clip; size is a side or (width, height) (drawn square, then cropped)."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    clip = CLIP_KINDS[kind](rng, frames, max(width, height))[:, :height, :width]
    return torch.from_numpy(np.ascontiguousarray(clip))


SMALL_SIZES = ((64, 64), (80, 48), (48, 80))  # (width, height): what the embedded model makes


def shapes_clip(seed: int, index: int, size: tuple[int, int], frames: int = 17) -> torch.Tensor:
    """The index-th shapes-world clip of `size` and `frames`: what the (trained) embedded model
    makes, flat-coloured shapes moving on a flat background (skyloom.datasets.shapes)."""
    bucket = BUCKETS.index((tuple(size), frames))
    return make_shapes_clip(seed, len(BUCKETS) * index + bucket, split="all")[1]


# --- attacks ----------------------------------------------------------------------------------


def h264(frames: torch.Tensor, crf: int, fps: int = 24) -> torch.Tensor:
    """Encode with libx264 (yuv420p, preset medium) at `crf` and decode back to RGB."""
    t, h, w, _ = frames.shape
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        with av.open(path, "w") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps))
            stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            for frame in frames[:, : h - h % 2, : w - w % 2].numpy():
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        with av.open(path) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return torch.from_numpy(np.stack(decoded))


def rescale(frames: torch.Tensor, factor: float) -> torch.Tensor:
    t, h, w, _ = frames.shape
    x = frames.permute(0, 3, 1, 2).to(torch.float32)
    size = (int(round(h * factor)), int(round(w * factor)))
    y = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def crop(frames: torch.Tensor, fraction: float, anchor: tuple[float, float] = (0.3, 0.7)) -> torch.Tensor:
    """Remove `fraction` of each side's length, split between the two edges by `anchor`."""
    t, h, w, _ = frames.shape
    ch, cw = int(round(h * fraction)), int(round(w * fraction))
    top, left = int(round(ch * anchor[0])), int(round(cw * anchor[1]))
    return frames[:, top : top + h - ch, left : left + w - cw].contiguous()


def brightness(frames: torch.Tensor, gain: float) -> torch.Tensor:
    return (frames.to(torch.float32) * gain).round().clamp(0, 255).to(torch.uint8)


def skyloom_write(frames: torch.Tensor, crf: int = 18, fps: float = 8) -> torch.Tensor:
    """What `skyloom generate` writes (skyloom.video_io.write_video: libx264 yuv420p, preset
    medium, CRF 18 by default), read back as `skyloom verify` reads it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        write_video(path, frames, fps, crf=crf)
        return read_video(path)[0]


def drop_frames(frames: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    t = frames.shape[0]
    keep = max(1, int(round(t * (1 - fraction))))
    index = np.sort(np.random.default_rng(seed).choice(t, size=keep, replace=False))
    return frames[torch.from_numpy(index)]


def retime(frames: torch.Tensor, src_fps: float = 24, dst_fps: float = 30) -> torch.Tensor:
    """Nearest-frame re-time (what ffmpeg's fps filter does): frames repeat or drop."""
    t = frames.shape[0]
    n = int(math.floor(t * dst_fps / src_fps))
    index = np.minimum(np.floor(np.arange(n) * src_fps / dst_fps + 0.5).astype(np.int64), t - 1)
    return frames[torch.from_numpy(index)]


ATTACKS = {
    "none": lambda v: v,
    "h264_crf23": lambda v: h264(v, 23),
    "h264_crf28": lambda v: h264(v, 28),
    "h264_crf35": lambda v: h264(v, 35),
    "h264_crf40": lambda v: h264(v, 40),
    "downscale_half": lambda v: rescale(v, 0.5),
    "crop_10pct": lambda v: crop(v, 0.10),
    "crop_10pct_resized": lambda v: rescale(crop(v, 0.10), 1 / 0.9),
    "brightness_0.8": lambda v: brightness(v, 0.8),
    "brightness_1.3": lambda v: brightness(v, 1.3),
    "drop_30pct_frames": lambda v: drop_frames(v, 0.3),
    "retime_24_to_30": lambda v: retime(v),
    "half+crf28": lambda v: h264(rescale(v, 0.5), 28),
    "crop+bright1.3+crf28": lambda v: h264(brightness(crop(v, 0.1), 1.3), 28),
}
# Small frames: the first attack is skyloom's own write; the others start from what it wrote.
# Re-encodes use x264's defaults (macroblock-tree on), as someone else's encoder would.
SMALL_ATTACKS = {
    "skyloom_write_crf18": lambda v: v,
    "reencode_crf23": lambda v: h264(v, 23, fps=8),
    "reencode_crf28": lambda v: h264(v, 28, fps=8),
    "reencode_crf35": lambda v: h264(v, 35, fps=8),
    "downscale_half": lambda v: rescale(v, 0.5),
    "upscale_4x": lambda v: rescale(v, 4),
    "crop_10pct": lambda v: crop(v, 0.10),
    "brightness_0.8": lambda v: brightness(v, 0.8),
    "brightness_1.3": lambda v: brightness(v, 1.3),
    "drop_30pct_frames": lambda v: drop_frames(v, 0.3),
}
QUICK_ATTACKS = ("none", "h264_crf28", "h264_crf40", "downscale_half", "crop_10pct", "brightness_1.3", "drop_30pct_frames", "retime_24_to_30")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.to(torch.float64) - b.to(torch.float64)).square().mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def read_and_detect(marker: SpreadSpectrumWatermarker, frames: torch.Tensor):
    """-> (best-effort payload, detected with exactly that payload?); frames too small to read
    count as a miss with no payload."""
    try:
        reading, detection = marker.read(frames), marker.detect(frames)
    except ValueError:
        return None, False
    return reading.payload, detection.detected and detection.payload == reading.payload


def bit_accuracy(a: bytes | None, b: bytes) -> float:
    if a is None:
        return 0.5  # no guess: as good as a coin
    return 1 - float(np.unpackbits(np.frombuffer(bytes(x ^ y for x, y in zip(a, b)), dtype=np.uint8)).mean())


# --- the anchor: invisible-watermark in its own venv ------------------------------------------

ANCHOR_SCRIPT = r"""
import sys, types, json
import numpy as np
sys.modules.setdefault("torch", types.ModuleType("torch"))  # only rivaGan needs it
from imwatermark import WatermarkEncoder, WatermarkDecoder
job = json.loads(sys.stdin.readline())
data = np.load(job["path"])
payload = bytes.fromhex(job["payload"])
if job["op"] == "embed":
    enc = WatermarkEncoder()
    enc.set_watermark("bytes", payload)
    out = np.stack([enc.encode(f[..., ::-1].copy(), job["method"])[..., ::-1] for f in data["frames"]])
    np.save(job["out"], out)
else:
    dec = WatermarkDecoder("bits", 8 * len(payload))
    bits = []
    for f in data["frames"]:
        try:
            bits.append(dec.decode(f[..., ::-1].copy(), job["method"]))
        except Exception:
            bits.append([0] * (8 * len(payload)))
    np.save(job["out"], np.array(bits, dtype=np.uint8))
"""


class Anchor:
    """invisible-watermark's encoder/decoder, run in another interpreter."""

    def __init__(self, python: str, method: str):
        self.python, self.method = python, method

    def _call(self, op: str, frames: np.ndarray, payload: bytes) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npy")
            np.savez(src, frames=frames)
            job = json.dumps({"op": op, "path": src, "out": out, "payload": payload.hex(), "method": self.method})
            subprocess.run([self.python, "-c", ANCHOR_SCRIPT], input=job + "\n", text=True, check=True, capture_output=True)
            return np.load(out)

    def embed(self, frames: torch.Tensor, payload: bytes) -> torch.Tensor:
        return torch.from_numpy(self._call("embed", frames.numpy(), payload))

    def decode(self, frames: torch.Tensor, payload: bytes) -> bytes:
        bits = self._call("decode", frames.numpy(), payload)  # (T, 64) per-frame bits
        return np.packbits((bits.mean(axis=0) > 0.5).astype(np.uint8)).tobytes()


# --- the benchmark ----------------------------------------------------------------------------


def robustness(clips, attacks, marker, anchors, payloads):
    """-> {method: {attack: [(bit accuracy, detected), ...]}}, {method: [psnr, ...]}."""
    results = {name: {a: [] for a in attacks} for name in ["spreadspectrum", *anchors]}
    psnrs = {name: [] for name in results}
    for (name, clip), payload in zip(clips, payloads):
        marked = {"spreadspectrum": marker.embed(clip, payload)}
        for anchor_name, anchor in anchors.items():
            marked[anchor_name] = anchor.embed(clip, payload)
        for method, video in marked.items():
            psnrs[method].append(psnr(video, clip))
        for attack in attacks:
            for method, video in marked.items():
                attacked = ATTACKS[attack](video)
                if method == "spreadspectrum":
                    det = marker.detect(attacked)
                    results[method][attack].append((bit_accuracy(marker.read(attacked).payload, payload), det.detected and det.payload == payload))
                else:
                    guess = anchors[method].decode(attacked, payload)
                    results[method][attack].append((bit_accuracy(guess, payload), guess == payload))
    return results, psnrs


def small_frames(marker, per_size: int, frames: int, seed: int = 0):
    """Shapes-world clips at the embedded model's sizes, marked and written as skyloom writes
    them -> {size: {attack: [(bit accuracy, detected), ...]}}, {size: [psnr, ...]}."""
    rng = np.random.default_rng(2)
    results, psnrs = {}, {}
    for size in SMALL_SIZES:
        results[size], psnrs[size] = {a: [] for a in SMALL_ATTACKS}, []
        for i in range(per_size):
            clip, payload = shapes_clip(seed, i, size, frames), rng.bytes(8)
            marked = marker.embed(clip, payload)
            psnrs[size].append(psnr(marked, clip))
            written = skyloom_write(marked)
            for attack, edit in SMALL_ATTACKS.items():
                guess, found = read_and_detect(marker, edit(written))
                results[size][attack].append((bit_accuracy(guess, payload), found))
    return results, psnrs


def _null_record(marker, clip, zs, crc_ok) -> bool:
    """Every layout's best z on one unmarked clip into zs[layout]; -> whether it was detected."""
    best = {}
    for reading in marker.readings(clip):
        best[reading.layout] = max(best.get(reading.layout, -math.inf), reading.z)
        crc_ok[reading.layout] += reading.crc_ok
    for layout, z in best.items():
        zs[layout].append(z)
    return marker.detect(clip).detected


def false_positives(marker, n_clips: int, frames: int, size: int, seed: int = 10_000):
    """Unmarked procedural clips of size x size, a third re-encoded at CRF 28 ->
    ({layout: per-clip best z}, {layout: readings whose CRC checked by chance}, detections)."""
    zs, crc_ok, detections, kinds = {l.name: [] for l in LAYOUTS}, {l.name: 0 for l in LAYOUTS}, 0, list(CLIP_KINDS)
    for i in range(n_clips):
        clip = make_clip(kinds[i % len(kinds)], seed + i, frames, size)
        if i % 3 == 1:  # a third re-encoded, as real unmarked footage would be
            clip = h264(clip, 28)
        detections += _null_record(marker, clip, zs, crc_ok)
    return zs, crc_ok, detections


def small_false_positives(marker, n_clips: int, seed: int = 20_000):
    """Unmarked clips at the embedded model's sizes: half shapes-world (every size and length:
    9, 17, 33 frames), half procedural (the six kinds, 4 to 17 frames); a third of each kept
    lossless, a third written as skyloom writes (CRF 18), a third at CRF 28."""
    zs, crc_ok, detections, kinds = {l.name: [] for l in LAYOUTS}, {l.name: 0 for l in LAYOUTS}, 0, list(CLIP_KINDS)
    for i in range(n_clips):
        if i % 2 == 0:
            clip = make_shapes_clip(seed, i // 2, split="all")[1]
        else:
            j = i // 2
            clip = make_clip(kinds[j % len(kinds)], seed + j, (4, 9, 17)[j % 3], SMALL_SIZES[(j // 3) % 3])
        if (i // 2) % 3 == 1:
            clip = skyloom_write(clip, 18)
        elif (i // 2) % 3 == 2:
            clip = skyloom_write(clip, 28)
        detections += _null_record(marker, clip, zs, crc_ok)
    return zs, crc_ok, detections


def print_null(zs: dict, crc_ok: dict, marker) -> None:
    thresholds = {"tiled": marker.threshold, "single": marker.single_threshold}
    for layout, values in zs.items():
        if values:
            v = np.array(values)
            print(f"  {layout:<7} layout, {len(v)} clips read: sync z mean {v.mean():.2f}, std {v.std():.2f}, "
                  f"99th pct {np.percentile(v, 99):.2f}, max {v.max():.2f}; threshold {thresholds[layout]}; "
                  f"chance CRC matches {crc_ok[layout]}")


SECTIONS = ("robustness", "small", "null", "small-null")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer clips, attacks and null clips")
    parser.add_argument("--anchor", metavar="PYTHON", help="interpreter of a venv with invisible-watermark")
    parser.add_argument("--null-clips", type=int, default=None, help="unmarked 256x256 clips for the false-positive run")
    parser.add_argument("--small-clips", type=int, default=None, help="shapes-world clips per small size (default 20)")
    parser.add_argument("--small-null-clips", type=int, default=None, help="unmarked small clips for the false-positive run")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    parser.add_argument("--key", default=None, help="watermark key (default: the public default)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    sections = args.only or SECTIONS

    marker = SpreadSpectrumWatermarker(**({"key": args.key} if args.key else {}))
    frames = 8 if args.quick else 16
    if "robustness" in sections:
        robustness_section(marker, args, frames)
    if "small" in sections:
        per_size = args.small_clips or (5 if args.quick else 20)
        start = time.perf_counter()
        results, psnrs = small_frames(marker, per_size, frames=17)
        print(f"\nSmall frames: {per_size} shapes-world clips of 17 frames per size, marked, written by skyloom "
              f"(CRF 18) and read back; the other attacks start from that file, {time.perf_counter() - start:.0f} s")
        print_table(SMALL_ATTACKS, {f"{w}x{h}": results[(w, h)] for w, h in SMALL_SIZES})
        print("PSNR (dB)             " + "".join(f"{np.mean(psnrs[s]):>15.2f} (min {np.min(psnrs[s]):.1f})"[-22:].rjust(22) + " " * 6 for s in SMALL_SIZES))
    if "null" in sections:
        n_null = args.null_clips or (200 if args.quick else 1000)
        start = time.perf_counter()
        zs, crc_ok, false = false_positives(marker, n_null, frames=4, size=256)
        print(f"\nFalse positives: {false} of {n_null} unmarked clips (4 frames, 256x256, {len(CLIP_KINDS)} kinds, "
              f"a third H.264 CRF 28), {time.perf_counter() - start:.0f} s")
        print_null(zs, crc_ok, marker)
    if "small-null" in sections:
        n_null = args.small_null_clips or (200 if args.quick else 1000)
        start = time.perf_counter()
        zs, crc_ok, false = small_false_positives(marker, n_null)
        print(f"\nFalse positives, small frames: {false} of {n_null} unmarked clips (64x64, 80x48, 48x80; half "
              f"shapes-world, half procedural; a third each lossless, CRF 18, CRF 28), {time.perf_counter() - start:.0f} s")
        print_null(zs, crc_ok, marker)


def print_table(attacks, columns: dict) -> None:
    """One row per attack; per column (a method or a frame size) the mean bit accuracy, the worst
    clip's, and the share of clips whose payload was recovered. columns[name][attack]: [(bits, detected)]."""
    header = f"{'attack':<22}" + "".join(f"{name + ' bits':>22}{'det':>6}" for name in columns)
    print(header)
    print("-" * len(header))
    for attack in attacks:
        row = f"{attack:<22}"
        for outcomes in columns.values():
            acc = np.array([a for a, _ in outcomes[attack]])
            det = np.mean([d for _, d in outcomes[attack]])
            row += f"{acc.mean():>15.3f} (min {acc.min():.2f})"[-22:].rjust(22) + f"{det:>6.2f}"
        print(row)


def robustness_section(marker, args, frames) -> None:
    per_kind = 1 if args.quick else 2
    clips = [(f"{kind}#{i}", make_clip(kind, i, frames, 256)) for kind in CLIP_KINDS for i in range(per_kind)]
    if not args.quick:
        clips += [(f"landscape_512#{i}", make_clip("landscape", 100 + i, frames, 512)) for i in range(2)]
    rng = np.random.default_rng(1)
    payloads = [rng.bytes(8) for _ in clips]
    attacks = QUICK_ATTACKS if args.quick else tuple(ATTACKS)
    anchors = {}
    if args.anchor:
        anchors = {"iwm_dwtDct": Anchor(args.anchor, "dwtDct"), "iwm_dwtDctSvd": Anchor(args.anchor, "dwtDctSvd")}

    start = time.perf_counter()
    results, psnrs = robustness(clips, attacks, marker, anchors, payloads)
    print(f"\nRobustness: {len(clips)} clips ({', '.join(CLIP_KINDS)}; {frames} frames, 256x256"
          f"{' + 2 at 512x512' if not args.quick else ''}), {time.perf_counter() - start:.0f} s")
    methods = list(results)
    print_table(attacks, results)
    for m in methods:
        misses = {a: [clips[i][0] for i, (_, d) in enumerate(results[m][a]) if not d] for a in attacks}
        misses = {a: names for a, names in misses.items() if names}
        if misses:
            print(f"{m} missed: " + "; ".join(f"{a}: {', '.join(names)}" for a, names in misses.items()))
    print("PSNR (dB)             " + "".join(f"{np.mean(psnrs[m]):>15.2f} (min {np.min(psnrs[m]):.1f})"[-22:].rjust(22) + " " * 6 for m in methods))


if __name__ == "__main__":
    main()
