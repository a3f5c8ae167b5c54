"""skyloom: a plugin toolkit for Sora-style video generation.

The request path (docs/architecture.md): prompt safety -> prompt enhancement -> safety on the
enhanced prompt -> text encoding -> latent sampling -> decoding -> frame safety -> watermarking
-> container write with provenance. Each stage calls plugins of one kind (skyloom.kinds).
"""

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

try:
    from skyloom import _C  # noqa: F401  (registers the torch.ops.skyloom kernels)
except ImportError as error:  # pragma: no cover - exercised by tests/test_build.py in a subprocess
    raise ImportError(
        f"skyloom's compiled extension skyloom._C could not be loaded ({error}). "
        "Build it from the repository root with `make install` or "
        "`pip install --no-build-isolation -e .` (see docs/building.md)."
    ) from None

__version__ = "0.1.0"
