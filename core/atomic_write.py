"""Atomic file writes: a temporary file beside the target, then one rename.

A reader never sees a half-written file, and an interrupted write (Ctrl-C included) leaves the
old file, or none, and no temporary file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically; the directory must exist. Returns the path."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return write_atomic_with(path, lambda temporary: temporary.write_bytes(payload))


def write_atomic_with(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Run `write(temporary)` on an empty temporary file beside `path`, then rename it onto `path`:
    for writers that take a file name (safetensors' save_file), so that large data is never held
    in memory as one bytes object. The directory must exist. Returns the path."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
