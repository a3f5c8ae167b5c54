"""`hashlist`: refuses videos that show a known prohibited image, matched by PDQ perceptual hash.

PDQ (Meta's photo hash, used by ThreatExchange and the industry hash-sharing programmes) turns
an image into 256 bits that change little when the image is resized, re-encoded, or its
brightness shifted. A sampled frame whose hash is within `threshold` bits (Hamming distance) of
a blocklisted hash is refused. PDQ's recommended threshold is 31 of 256 bits; PDQ also reports
a quality (0-100) per hash, and a frame below `min_quality` (flat or nearly flat, default 50, as
PDQ recommends) is skipped: its hash is too unstable to match on. With `dihedral` (the default)
the frame's eight rotations and reflections are hashed too, so a mirrored or rotated copy
matches (8 PDQ hashes per sampled frame: measured 7 ms at 144x176, 0.1 s at 480x832 and
0.3 s at 720x1280 on one CPU core; dihedral=False hashes once).

Frames judged: the first, the last and every `every`-th (skyloom.plugins.safety_filter.
skyloom.frame_classifier.sample_frames). An image on screen for fewer than `every` frames between two
sampled positions is not seen; set every=1 to hash every frame. PDQ matches whole frames: an
image cropped, or shown small inside a larger scene, is not matched.

Blocklist files, one entry a line; blank lines and lines starting with # are ignored:

    # text: <64 hex digits> [category] [label, the rest of the line]
    f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22 violence case-1234 frame 7
    # JSON lines: {"pdq": ..., "category": ..., "label": ...}; other keys are ignored
    {"pdq": "e64cc9d91c623882f8d1f1d9a398e78c9f199b3bd83924f2b7e11e0bf861b064", "category": "extremism"}

The hex is PDQ's standard form (ThreatExchange's): bit 0 of the hash vector is the most
significant bit of the first digit. A missing category is "blocklisted_image"; a missing label
is the file name and line number. Where the blocklist comes from: the `blocklist` argument (a
path or a list of paths), else SKYLOOM_HASHLIST (paths separated by os.pathsep). With neither,
the filter does not judge: check_frames returns None, and no decision is recorded.

Build a blocklist from images (PNG, JPEG, ... decoded by PyAV):

    python -m skyloom.plugins.safety_filter.hashlist build OUT.txt --category C IMAGE_OR_DIR ...
    python -m skyloom.plugins.safety_filter.hashlist check VIDEO --blocklist OUT.txt
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pdqhash
import torch

from skyloom.atomic_write import write_atomic
from skyloom.hookspecs import hookimpl
from skyloom.kinds import SafetyDecision, SafetyFilter
from skyloom.frame_classifier import DEFAULT_EVERY, check_every, sample_frames
from skyloom.video_io import STILL_SUFFIXES, read_video

ENV_VAR = "SKYLOOM_HASHLIST"
DEFAULT_THRESHOLD = 31  # PDQ's recommended match distance, of 256 bits
DEFAULT_MIN_QUALITY = 50  # PDQ's recommendation: hashes below quality 50 are too unreliable
DEFAULT_CATEGORY = "blocklisted_image"
HASH_BITS = 256

_HEX = re.compile(r"[0-9a-fA-F]{64}")
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)  # bits set per byte


class BlocklistError(ValueError):
    """A blocklist file is missing, unreadable or malformed; the message names the file and line."""


@dataclass(frozen=True)
class BlocklistEntry:
    pdq: str  # 64 lowercase hex digits
    category: str
    label: str
    source: str  # "file:line", where the entry was read


# --- hashing -----------------------------------------------------------------------------


def pdq_hash(image: np.ndarray) -> tuple[str, int]:
    """(H, W, 3) uint8 RGB image -> (PDQ hash as 64 hex digits, quality 0..100)."""
    bits, quality = pdqhash.compute(np.ascontiguousarray(_as_image(image)))
    return _pack(bits).tobytes().hex(), int(quality)


def _as_image(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        described = f"{image.dtype} array of shape {tuple(image.shape)}" if hasattr(image, "shape") else type(image).__name__
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got {described}")
    return image


def _pack(bits: np.ndarray) -> np.ndarray:
    """PDQ's 256 0/1 values -> 32 bytes, the first bit as the most significant (the hex order)."""
    return np.packbits(np.asarray(bits, dtype=np.uint8), axis=-1)


# The frame's eight rotations and reflections. Each is hashed from its own pixels: PDQ's
# compute_dihedral derives the eight hashes from one DCT instead, but its 64x64 downsampling is
# not symmetric, so for a 128-256 px image those hashes are 16-44 bits from the hash of the
# actually rotated or mirrored image (measured), and a mirrored copy could miss at 31 bits.
_DIHEDRAL = (
    lambda a: a,
    lambda a: a[:, ::-1],  # mirrored left-right
    lambda a: a[::-1],  # upside down
    lambda a: a[::-1, ::-1],  # rotated 180 degrees
    lambda a: a.transpose(1, 0, 2),  # reflected about the main diagonal
    lambda a: np.rot90(a, 1),
    lambda a: np.rot90(a, 3),
    lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # reflected about the other diagonal
)


def _variant_hashes(frame: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """The frame's PDQ `bits` and those of its other 7 dihedral variants -> (8, 32) packed."""
    # pdqhash needs C-contiguous input: it misreads transposed views.
    variants = [pdqhash.compute(np.ascontiguousarray(t(frame)))[0] for t in _DIHEDRAL[1:]]
    return _pack(np.stack([bits, *variants]))


def hamming_distances(hashes: np.ndarray, blocklist: np.ndarray) -> np.ndarray:
    """(M, 32) and (N, 32) packed hashes -> (M, N) bit distances, computed in slices of N."""
    out = np.empty((hashes.shape[0], blocklist.shape[0]), dtype=np.int32)
    step = max(1, (1 << 22) // max(1, hashes.shape[0] * 32))  # ~4M bytes of XOR at a time
    for start in range(0, blocklist.shape[0], step):
        xor = hashes[:, None, :] ^ blocklist[None, start : start + step, :]  # (M, n, 32)
        out[:, start : start + step] = _POPCOUNT[xor].sum(-1)
    return out


# --- blocklists --------------------------------------------------------------------------


class Blocklist:
    """PDQ hashes of prohibited images with their categories and labels."""

    def __init__(self, entries: Sequence[BlocklistEntry]):
        self.entries = list(entries)
        self.hashes = np.array([bytearray.fromhex(e.pdq) for e in self.entries], dtype=np.uint8).reshape(-1, 32)

    def __len__(self) -> int:
        return len(self.entries)

    def nearest(self, hashes: np.ndarray) -> tuple[int, int]:
        """The closest (distance, entry index) to any of the (M, 32) packed hashes; (257, -1) if empty."""
        if not self.entries:
            return HASH_BITS + 1, -1
        distances = hamming_distances(hashes, self.hashes).min(axis=0)  # (N,)
        index = int(distances.argmin())
        return int(distances[index]), index


def load_blocklist(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> Blocklist:
    """Read one or more blocklist files (format in the module docstring) into one Blocklist."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    entries: list[BlocklistEntry] = []
    for path in paths:
        entries.extend(_read_blocklist_file(Path(path)))
    return Blocklist(entries)


def _read_blocklist_file(path: Path) -> list[BlocklistEntry]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BlocklistError(f"cannot read blocklist {str(path)!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BlocklistError(f"cannot read blocklist {str(path)!r}: {error}") from error
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        pdq, category, label = _parse_json_line(line, where) if line.startswith("{") else _parse_text_line(line, where)
        entries.append(BlocklistEntry(pdq.lower(), category or DEFAULT_CATEGORY, label or f"{path.name}:{number}", where))
    return entries


_FORMAT_HINT = 'expected "<64 hex digits> [category] [label]" or {"pdq": "<64 hex digits>", "category": ..., "label": ...}'


def _check_hex(value, where: str) -> str:
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        shown = value if not isinstance(value, str) or len(value) <= 80 else value[:77] + "..."
        length = f" ({len(value)} characters)" if isinstance(value, str) else ""
        raise BlocklistError(f"{where}: {shown!r}{length} is not a PDQ hash of 64 hex digits; {_FORMAT_HINT}")
    return value


def _parse_text_line(line: str, where: str) -> tuple[str, str | None, str | None]:
    parts = line.split(None, 2)
    pdq = _check_hex(parts[0], where)
    category = parts[1] if len(parts) > 1 else None
    label = parts[2] if len(parts) > 2 else None
    return pdq, category, label


def _parse_json_line(line: str, where: str) -> tuple[str, str | None, str | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise BlocklistError(f"{where}: not valid JSON ({error.msg} at column {error.colno}); {_FORMAT_HINT}") from None
    if not isinstance(record, dict):
        raise BlocklistError(f"{where}: a JSON line must be an object; {_FORMAT_HINT}")
    if "pdq" not in record:
        raise BlocklistError(f"{where}: the JSON object has no \"pdq\" key; {_FORMAT_HINT}")
    pdq = _check_hex(record["pdq"], where)
    fields = []
    for key in ("category", "label"):
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise BlocklistError(f"{where}: \"{key}\" must be a string, got {value!r}")
        fields.append(value or None)
    return pdq, fields[0], fields[1]


def _configured_paths(blocklist) -> list[Path]:
    """The `blocklist` argument as paths, else SKYLOOM_HASHLIST's; [] when neither is set."""
    if blocklist is None:
        blocklist = [part for part in os.environ.get(ENV_VAR, "").split(os.pathsep) if part.strip()]
    elif isinstance(blocklist, (str, os.PathLike)):
        blocklist = [blocklist]
    paths = []
    for item in blocklist:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"blocklist must be a path or a list of paths, got an item {item!r}")
        paths.append(Path(item))
    return paths


# --- the filter --------------------------------------------------------------------------


class HashlistFilter(SafetyFilter):
    """Refuses frames that match a blocklisted image's PDQ hash.

    blocklist: a blocklist file or a list of them (default: SKYLOOM_HASHLIST). With none, the
        filter does not judge: check_frames returns None.
    threshold: the largest Hamming distance, of 256 bits, that counts as a match (PDQ: 31).
    every: judge the first, the last and every `every`-th frame; 1 judges every frame.
    min_quality: frames whose PDQ quality is below this (flat, near-uniform frames) are skipped.
    dihedral: also match the frame's rotations by 90/180/270 degrees and its mirror images.
    A malformed or missing blocklist file raises BlocklistError here, when the filter is built.
    """

    def __init__(
        self,
        *,
        blocklist: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        threshold: int = DEFAULT_THRESHOLD,
        every: int = DEFAULT_EVERY,
        min_quality: int = DEFAULT_MIN_QUALITY,
        dihedral: bool = True,
    ):
        if isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 <= threshold <= HASH_BITS:
            raise ValueError(f"threshold must be an int number of bits in [0, {HASH_BITS}], got {threshold!r}")
        if isinstance(min_quality, bool) or not isinstance(min_quality, int) or not 0 <= min_quality <= 100:
            raise ValueError(f"min_quality must be an int in [0, 100], got {min_quality!r}")
        self.threshold, self.every, self.min_quality = threshold, check_every(every), min_quality
        self.dihedral = bool(dihedral)
        self.paths = _configured_paths(blocklist)
        self.blocklist = load_blocklist(self.paths) if self.paths else None

    def check_text(self, text: str) -> None:
        return None

    def check_frames(self, frames: torch.Tensor) -> SafetyDecision | None:
        if self.blocklist is None:
            return None
        hashed, skipped = 0, []
        closest = HASH_BITS + 1
        for index, frame in sample_frames(frames, self.every):
            bits, quality = pdqhash.compute(frame)  # sample_frames gives C-contiguous frames
            if quality < self.min_quality:
                skipped.append(index)
                continue
            hashes = _variant_hashes(frame, bits) if self.dihedral else _pack(bits)[None]  # (8 or 1, 32)
            hashed += 1
            distance, entry_index = self.blocklist.nearest(hashes)
            closest = min(closest, distance)
            if distance <= self.threshold:
                entry = self.blocklist.entries[entry_index]
                return SafetyDecision(
                    allowed=False,
                    category=entry.category,
                    reason=f"frame {index} matches blocklisted image {entry.label} (distance {distance})",
                    score=similarity(distance),
                )
        reason = f"no match within distance {self.threshold} among {hashed} hashed frames"
        reason += f" and {len(self.blocklist)} blocklisted images"
        if closest <= HASH_BITS:
            reason += f" (closest {closest})"
        if skipped:
            reason += f"; frames {skipped} skipped, PDQ quality below {self.min_quality} (too flat to hash)"
        return SafetyDecision(allowed=True, reason=reason, score=similarity(closest) if closest <= HASH_BITS else None)


def similarity(distance: int) -> float:
    """The decision's score: 1 - distance/256, so 1.0 is an identical hash (31 bits -> 0.879)."""
    return 1.0 - distance / HASH_BITS


@hookimpl
def register_safety_filters(register):
    register("hashlist", HashlistFilter, aliases=("pdq-hashlist",))


# --- building blocklists ------------------------------------------------------------------


def _expand_images(images: Iterable[str | os.PathLike]) -> list[Path]:
    paths = []
    for item in images:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in STILL_SUFFIXES)
            if not found:
                raise BlocklistError(f"no images ({', '.join(STILL_SUFFIXES)}) in the folder {str(path)!r}")
            paths.extend(found)
        else:
            paths.append(path)
    return paths


def build_blocklist(
    images: Iterable[str | os.PathLike],
    category: str,
    out_path: str | os.PathLike,
    *,
    min_quality: int = DEFAULT_MIN_QUALITY,
) -> Path:
    """Hash images (files, or folders whose images are all taken) into a blocklist file.

    Each image is decoded with PyAV and must be a single frame. Its label is its file name
    without the suffix. out_path ending in .jsonl gets JSON lines, anything else the text
    format. An image whose PDQ quality is below min_quality is an error (its hash would be
    unreliable to match on). The file is written to a temporary file beside out_path and
    renamed over it only when complete. Returns out_path.
    """
    if not isinstance(category, str) or not category or any(ch.isspace() for ch in category):
        raise ValueError(f"category must be a non-empty string without spaces, got {category!r}")
    out_path = Path(out_path)
    lines = []
    jsonl = out_path.suffix.lower() == ".jsonl"
    for path in _expand_images(images):
        frames, _ = read_video(path)
        if frames.shape[0] != 1:
            raise BlocklistError(f"{str(path)!r} has {frames.shape[0]} frames; build_blocklist takes still images")
        pdq, quality = pdq_hash(frames[0].numpy())
        if quality < min_quality:
            raise BlocklistError(
                f"{str(path)!r} has PDQ quality {quality} < {min_quality}: too flat to match reliably; "
                "leave it out, or lower min_quality"
            )
        label = " ".join(path.stem.split()) or path.name
        if jsonl:
            lines.append(json.dumps({"pdq": pdq, "category": category, "label": label}))
        else:
            lines.append(f"{pdq} {category} {label}")
    if not lines:
        raise BlocklistError("no images given to build_blocklist")
    header = [] if jsonl else [f"# PDQ blocklist: {len(lines)} images, category {category}"]
    _atomic_write_text(out_path, "\n".join(header + lines) + "\n")
    return out_path


def _atomic_write_text(path: Path, text: str) -> None:
    if not path.parent.is_dir():
        raise BlocklistError(f"cannot write {str(path)!r}: the directory {str(path.parent)!r} does not exist")
    write_atomic(path, text)


# --- command line -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skyloom.plugins.safety_filter.hashlist", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="hash images into a blocklist file")
    build.add_argument("out", help="the blocklist to write (.jsonl for JSON lines, else text)")
    build.add_argument("images", nargs="+", help="image files or folders of images")
    build.add_argument("--category", required=True, help="the category refusals report, e.g. violence")
    build.add_argument("--min-quality", type=int, default=DEFAULT_MIN_QUALITY)
    check = commands.add_parser("check", help="run the filter on a video or image file")
    check.add_argument("media")
    check.add_argument("--blocklist", action="append", help="a blocklist file (repeatable; default: $" + ENV_VAR + ")")
    check.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD)
    check.add_argument("--every", type=int, default=DEFAULT_EVERY)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            path = build_blocklist(args.images, args.category, args.out, min_quality=args.min_quality)
            print(f"wrote {path}")
            return 0
        flt = HashlistFilter(blocklist=args.blocklist, threshold=args.threshold, every=args.every)
        decision = flt.check_frames(read_video(args.media)[0])
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if decision is None:
        print(f"error: no blocklist: pass --blocklist or set {ENV_VAR}", file=sys.stderr)
        return 2
    print(("allowed: " if decision.allowed else f"refused ({decision.category}): ") + decision.reason)
    return 0 if decision.allowed else 1


if __name__ == "__main__":
    sys.exit(main())
