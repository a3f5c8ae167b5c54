"""Model bundles: a directory with model_index.json and one safetensors file per component.

model_index.json (format_version 1):

    {
      "format": "skyloom-bundle",
      "format_version": 1,
      "name": "skyloom-tiny",
      "trained": false,                 # true only when every component below has weights
      "init_seed": 0,                   # seeds the components that have no weights
      "text_encoder":      {"plugin": "minilm", "config": {}},
      "video_autoencoder": {"plugin": "causal3d", "config": {...},
                            "weights": "video_autoencoder.safetensors", "dtype": "float32"},
      "transformer":       {"config": {...DiTConfig fields...},
                            "weights": "transformer.safetensors", "dtype": "float32"},
      "defaults": {"sampler": "euler", "steps": 30, "guidance": 5.0, "shift": 1.0,
                   "frames": 17, "width": 64, "height": 64, "fps": 8}
    }

"weights" and "dtype" are optional: a component without weights is initialised from
init_seed (the same seed always gives the same weights), which is what an untrained bundle
is. Weights are read with safetensors only; pickle checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from skyloom.kinds import TextEncoder, VideoAutoencoder
from skyloom.registry import Registry, UnknownKindError, UnknownPluginError
from skyloom.request import RequestError, check_guidance_interval
from skyloom.transformer import DiTConfig, SpacetimeDiT

FORMAT = "skyloom-bundle"
FORMAT_VERSION = 1
INDEX_NAME = "model_index.json"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "default"

# Components with weights, in load (and hash) order; each gets its own seed offset.
WEIGHTED_COMPONENTS = ("video_autoencoder", "transformer")
SEED_OFFSETS = {"video_autoencoder": 1, "transformer": 2}
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BundleError(ValueError):
    """A model bundle is missing, malformed, or disagrees with its own configuration."""


@dataclass
class ModelBundle:
    path: Path
    name: str
    trained: bool  # False: weights were initialised from init_seed, the model has not learnt anything
    index: dict  # model_index.json as read
    text_encoder: TextEncoder
    video_autoencoder: VideoAutoencoder  # eval mode
    transformer: SpacetimeDiT  # eval mode
    defaults: dict  # generation defaults: sampler, steps, guidance, frames, width, height, fps, ...
    model_hash: str  # sha256 hex over model_index.json and every weight file


# --- reading -------------------------------------------------------------------------------


def read_index(path: str | os.PathLike) -> dict:
    """Read and validate a bundle's model_index.json; `path` is the bundle directory."""
    root = Path(path)
    index_path = root / INDEX_NAME
    if not root.is_dir():
        raise BundleError(f"model bundle {root} does not exist or is not a directory; pass a directory holding {INDEX_NAME}")
    if not index_path.is_file():
        raise BundleError(f"{index_path} is missing; a model bundle is a directory with {INDEX_NAME} (see skyloom.bundle)")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{index_path} is not valid JSON ({error}); fix or regenerate the file") from None
    _validate_index(index, index_path)
    return index


def _validate_index(index: Any, where: Path | str) -> None:
    if not isinstance(index, dict):
        raise BundleError(f"{where}: the top level must be a JSON object, got {type(index).__name__}")
    if index.get("format") != FORMAT:
        raise BundleError(f"{where}: 'format' must be {FORMAT!r}, got {index.get('format')!r}; is this a skyloom model bundle?")
    version = index.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{where}: format_version {version!r} is not supported (this skyloom reads version {FORMAT_VERSION}); "
            "upgrade skyloom or re-export the bundle"
        )
    for key in ("text_encoder", "video_autoencoder", "transformer"):
        part = index.get(key)
        if not isinstance(part, dict):
            raise BundleError(f"{where}: missing the {key!r} section (an object with 'config'{', plugin' if key != 'transformer' else ''})")
        if key != "transformer" and not isinstance(part.get("plugin"), str):
            raise BundleError(f"{where}: {key}.plugin must be the plugin's registered name, got {part.get('plugin')!r}")
        if not isinstance(part.get("config", {}), dict):
            raise BundleError(f"{where}: {key}.config must be an object of constructor arguments")
        if "dtype" in part and part["dtype"] not in DTYPES:
            raise BundleError(f"{where}: {key}.dtype must be one of {sorted(DTYPES)}, got {part['dtype']!r}")
    if not isinstance(index.get("trained", False), bool):
        raise BundleError(f"{where}: 'trained' must be true or false")
    if not isinstance(index.get("init_seed", 0), int):
        raise BundleError(f"{where}: 'init_seed' must be an integer")
    if not isinstance(index.get("defaults", {}), dict):
        raise BundleError(f"{where}: 'defaults' must be an object")
    if "guidance_interval" in index.get("defaults", {}):  # else every request would fail on it
        try:
            check_guidance_interval(index["defaults"]["guidance_interval"])
        except RequestError as error:
            raise BundleError(f"{where}: defaults.{error}") from None
    if index.get("trained", False):
        unweighted = [key for key in WEIGHTED_COMPONENTS if not index[key].get("weights")]
        if unweighted:
            raise BundleError(f"{where}: marked \"trained\": true but {', '.join(unweighted)} has no 'weights' file")


def _weights_path(root: Path, component: str, name: str) -> Path:
    index_path = root / INDEX_NAME
    if not isinstance(name, str) or not name:
        raise BundleError(f"{index_path}: {component}.weights must be a file name, got {name!r}")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise BundleError(f"{index_path}: {component}.weights {name!r} must be a file inside the bundle directory")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise BundleError(
            f"{index_path}: {component}.weights {name!r} is a pickle checkpoint, which can run arbitrary code when "
            "loaded; skyloom reads safetensors only; convert with (only if you trust the file) "
            f"`python -c \"import torch, safetensors.torch as st; st.save_file(torch.load('{name}', weights_only=True), "
            f"'{component}.safetensors')\"` and set {component}.weights to \"{component}.safetensors\""
        )
    path = root / name
    if not path.is_file():
        raise BundleError(f"{path} is missing ({component}.weights in {index_path}); restore the file or re-save the bundle")
    return path


def _build(index: dict, component: str, registry: Registry, index_path: Path):
    part = index[component]
    config = part.get("config", {})
    try:
        if component == "transformer":
            return SpacetimeDiT(DiTConfig.from_dict(config))
        return registry.create(component, part["plugin"], **config)
    except (UnknownPluginError, UnknownKindError) as error:
        raise BundleError(f"{index_path}: {component}: {error}") from error
    except (TypeError, ValueError) as error:
        raise BundleError(f"{index_path}: {component}.config is not valid for this component: {error}") from error


def _load_weights(module: nn.Module, path: Path, component: str, dtype_name: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise BundleError(f"{path} is not a readable safetensors file ({error}); re-save the bundle") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_names(unexpected)}")
        raise BundleError(
            f"{path}: {' and '.join(parts)} for the {component} config in {INDEX_NAME}; "
            "the weights were saved from a different architecture"
        )
    want_float = DTYPES[dtype_name]
    for name, tensor in tensors.items():
        ref = expected[name]
        if tensor.shape != ref.shape:
            raise BundleError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the {component} config expects {tuple(ref.shape)}"
            )
        want = want_float if ref.is_floating_point() else ref.dtype
        if tensor.dtype != want:
            raise BundleError(
                f"{path}: tensor {name!r} has dtype {_dtype_name(tensor.dtype)}, expected {_dtype_name(want)} "
                f"({component}.dtype is {dtype_name!r})"
            )
    module.load_state_dict(tensors, strict=True)


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _hash_files(paths: list[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for label, path in paths:
        digest.update(label.encode() + b"\0")
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def load_bundle(
    path: str | os.PathLike,
    registry: Registry,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ModelBundle:
    """Load a model bundle: build each component from its plugin and config, load its weights
    (or initialise it from init_seed), move it to `device` and `dtype`, and put it in eval mode."""
    root = Path(path)
    index = read_index(root)
    index_path = root / INDEX_NAME
    seed = index.get("init_seed", 0)

    text_encoder = _build(index, "text_encoder", registry, index_path)
    if not isinstance(text_encoder, TextEncoder):
        raise BundleError(f"{index_path}: text_encoder plugin {index['text_encoder']['plugin']!r} did not build a TextEncoder")

    hashed: list[tuple[str, Path]] = [(INDEX_NAME, index_path)]
    modules: dict[str, nn.Module] = {}
    for component in WEIGHTED_COMPONENTS:
        part = index[component]
        weights = part.get("weights")
        weights_path = _weights_path(root, component, weights) if weights else None  # errors before building
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + SEED_OFFSETS[component])  # deterministic init, one stream per component
            module = _build(index, component, registry, index_path)
        if weights_path is not None:
            _load_weights(module, weights_path, component, part.get("dtype", "float32"))
            hashed.append((component, weights_path))
        modules[component] = module.to(device=device, dtype=dtype).eval()

    vae, dit = modules["video_autoencoder"], modules["transformer"]
    if not isinstance(vae, VideoAutoencoder):
        raise BundleError(f"{index_path}: video_autoencoder plugin {index['video_autoencoder']['plugin']!r} did not build a VideoAutoencoder")
    if vae.latent_channels != dit.config.in_channels:
        raise BundleError(
            f"{index_path}: video_autoencoder.latent_channels is {vae.latent_channels} but transformer.config.in_channels "
            f"is {dit.config.in_channels}; they must match"
        )
    if getattr(text_encoder, "dim", dit.config.text_dim) != dit.config.text_dim:
        raise BundleError(
            f"{index_path}: the text encoder's width is {text_encoder.dim} but transformer.config.text_dim is "
            f"{dit.config.text_dim}; they must match"
        )
    text_encoder = text_encoder.to(device) or text_encoder

    return ModelBundle(
        path=root,
        name=str(index.get("name", root.name)),
        trained=bool(index.get("trained", False)),
        index=index,
        text_encoder=text_encoder,
        video_autoencoder=vae,
        transformer=dit,
        defaults=dict(index.get("defaults", {})),
        model_hash=_hash_files(hashed),
    )


# --- writing -------------------------------------------------------------------------------


def safetensors_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state as safetensors takes it: CPU copies, contiguous, no shared storage."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_bundle(
    path: str | os.PathLike, index: dict, components: dict[str, nn.Module], *, extra_files: dict[str, bytes] | None = None
) -> Path:
    """Write a bundle: each module in `components` (keyed "video_autoencoder", "transformer") as
    <name>.safetensors, and model_index.json naming them. Files are written to a temporary
    directory and renamed into place, the index last, so a reader never sees a half-written file.
    extra_files: more files for the bundle (relative path -> bytes), e.g. the training log.
    Returns the bundle directory."""
    from safetensors.torch import save_file

    root = Path(path)
    index = json.loads(json.dumps(index))  # a deep copy that is certainly JSON
    index.setdefault("format", FORMAT)
    index.setdefault("format_version", FORMAT_VERSION)
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if Path(name).is_absolute() or ".." in Path(name).parts or name in (INDEX_NAME, *(f"{c}.safetensors" for c in components)):
            raise BundleError(f"save_bundle: extra file {name!r} must be a relative path inside the bundle, not one of its own files")
    unknown = sorted(set(components) - set(WEIGHTED_COMPONENTS))
    if unknown:
        raise BundleError(f"save_bundle: unknown component(s) {unknown}; components with weights are {list(WEIGHTED_COMPONENTS)}")
    for name, module in components.items():
        part = index.setdefault(name, {})
        part["weights"] = f"{name}.safetensors"
        part["dtype"] = _dtype_name(next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32))
    _validate_index(index, f"save_bundle({root})")

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for name, module in components.items():
            save_file(safetensors_state(module), str(staging / f"{name}.safetensors"), metadata={"format": "pt"})  # one key: safetensors orders metadata arbitrarily, and the hash covers the bytes
        for name, data in extra_files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if not root.exists():
            umask = os.umask(0)
            os.umask(umask)
            staging.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; a bundle is shared like any directory
            os.replace(staging, root)  # one rename: the bundle appears whole
            return root
        for name in [*extra_files, *(f"{c}.safetensors" for c in components)]:  # an existing bundle: the index last
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, root / name)
        os.replace(staging / INDEX_NAME, root / INDEX_NAME)
        return root
    finally:
        shutil.rmtree(staging, ignore_errors=True)
