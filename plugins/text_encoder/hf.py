"""`text_encoder` plugin `hf`: any local Hugging Face transformers text encoder.

Point `path` at a directory saved with `save_pretrained` (config.json, weights, tokenizer):
a T5, mT5 or umT5 encoder (the encoder half is loaded on its own), a CLIP text model, or any
BERT-like encoder that AutoModel loads. Only files in that directory are read; nothing is
fetched from the hub and no code from the directory is run.

`tokens` are the last hidden states with padding rows zeroed; `pooled` is CLIP's pooled
(end-of-text) output for CLIP models and the masked mean of the tokens for the others.

Weights load lazily, on the first encode, and once per process per (directory, dtype):
encoders built from the same weights share one model, so `to(device)` moves it for all of them.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path


import torch

from skyloom.hookspecs import hookimpl
from skyloom.kinds import CachingTextEncoder

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Any one of these marks a saved tokenizer (transformers would otherwise build an empty one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model", "vocab.txt", "vocab.json")
T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
CLIP_TYPES = ("clip", "clip_text_model")
DEFAULT_MAX_LENGTH = 128

# (directory, dtype) -> (tokenizer, model); filled on first use, shared by every encoder.
_MODELS: dict[tuple[str, torch.dtype], tuple[object, torch.nn.Module]] = {}
_MODELS_LOCK = threading.Lock()


def _offline() -> None:
    # Before transformers is imported, so huggingface_hub reads them; local_files_only is what
    # actually guarantees that nothing is fetched.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def read_config(path: Path):
    """The transformers config in `path`, or an error that says what is wrong with the directory."""
    if not path.exists():
        raise FileNotFoundError(
            f"hf text encoder: model directory {str(path)!r} does not exist; pass path= to a "
            "directory saved with save_pretrained (config.json, weights and tokenizer files)"
        )
    if not path.is_dir():
        raise ValueError(f"hf text encoder: {str(path)!r} is a file, not a model directory")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"hf text encoder: {str(path)!r} is not a transformers model directory: it has no config.json"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(
            f"hf text encoder: {str(path)!r} has a config.json but no weights "
            f"(expected one of {', '.join(WEIGHT_FILES)})"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"hf text encoder: {str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save it into the model directory with tokenizer.save_pretrained(path)"
        )
    _offline()
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError, KeyError) as error:
        raise ValueError(f"hf text encoder: cannot read the config in {str(path)!r}: {error}") from error


def _text_config(config):
    return config.text_config if config.model_type == "clip" else config


def _encoder_class(config):
    import transformers

    if config.model_type in T5_ENCODERS:
        return getattr(transformers, T5_ENCODERS[config.model_type])
    if config.model_type in CLIP_TYPES:
        return transformers.CLIPTextModel
    return transformers.AutoModel


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = "float32") -> tuple[object, torch.nn.Module]:
    """The (tokenizer, encoder) in `path`, loaded once per process per dtype, offline."""
    path = Path(path).expanduser().resolve()
    dtype = _resolve_dtype(dtype)
    key = (str(path), dtype)
    with _MODELS_LOCK:
        if key not in _MODELS:
            config = read_config(path)
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except (ValueError, OSError, TypeError) as error:
                raise ValueError(
                    f"hf text encoder: no usable tokenizer in {str(path)!r} ({error}); save the "
                    "tokenizer into the model directory with tokenizer.save_pretrained(path)"
                ) from error
            model = _encoder_class(config).from_pretrained(str(path), local_files_only=True, dtype=dtype)
            if getattr(model.config, "is_encoder_decoder", False):
                model = model.get_encoder()  # e.g. BART: keep only the half that reads text
            model.eval().requires_grad_(False)
            _MODELS[key] = (tokenizer, model)
        return _MODELS[key]


class HFTextEncoder(CachingTextEncoder):
    """A local transformers encoder as a skyloom text encoder.

    path: directory saved with save_pretrained (config.json, weights, tokenizer files).
    max_length: every prompt is padded or truncated to this many tokens (L); default 128, or
        the model's position limit when that is smaller (77 for CLIP).
    dtype: "float32", "float16" or "bfloat16"; the embeddings come out in this dtype
        (T5 overflows in float16: use bfloat16).
    device: where the model runs; outputs are returned there.
    cache_size: how many prompts' encodings to keep (least recently used go first); 0 disables.
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike,
        max_length: int | None = None,
        dtype: str | torch.dtype = "float32",
        device: torch.device | str = "cpu",
        cache_size: int = 256,
    ) -> None:
        self.path = Path(path).expanduser().resolve()
        config = _text_config(read_config(self.path))  # fails now, not at the first encode
        self.model_type = config.model_type
        self.dim = int(getattr(config, "d_model", None) or config.hidden_size)
        limit = getattr(config, "max_position_embeddings", None)  # None: relative positions (T5)
        if max_length is None:
            max_length = min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH
        if not isinstance(max_length, int) or max_length < 1 or (limit and max_length > limit):
            bound = f"[1, {limit}] (the model's position limit)" if limit else ">= 1"
            raise ValueError(f"max_length must be an int in {bound}, got {max_length!r}")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        self.max_length = max_length
        self.dtype = _resolve_dtype(dtype)
        self.device = torch.device(device)
        self.cache_size = cache_size

    def _loaded(self) -> tuple[object, torch.nn.Module]:
        tokenizer, model = load_model(self.path, self.dtype)
        if next(model.parameters()).device != self.device:
            model.to(self.device)
        return tokenizer, model

    @torch.no_grad()
    def encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokenizer, model = self._loaded()
        lengths = [len(ids) for ids in tokenizer(prompts, truncation=False)["input_ids"]]
        if max(lengths) > self.max_length:
            warnings.warn(
                f"hf text encoder: {sum(n > self.max_length for n in lengths)} prompt(s) truncated to "
                f"max_length={self.max_length} tokens (longest has {max(lengths)}); raise max_length to keep them whole",
                UserWarning,
                stacklevel=4,
            )
        batch = tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {name: batch[name].to(self.device) for name in ("input_ids", "attention_mask")}
        mask = batch["attention_mask"].bool()  # (B, L)
        out = model(**batch)
        tokens = out.last_hidden_state * mask[..., None]  # (B, L, D) padding rows are zero
        if self.model_type in CLIP_TYPES:
            pooled = out.pooler_output  # (B, D) the end-of-text token, as CLIP was trained
        else:
            pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, D) mean of real tokens
        return tokens, mask, pooled.to(tokens.dtype)

    def to(self, device: torch.device | str) -> "HFTextEncoder":
        self.device = torch.device(device)
        if (str(self.path), self.dtype) in _MODELS:  # otherwise the first encode moves it there
            self._loaded()
        return self


@hookimpl
def register_text_encoders(register) -> None:
    register("hf", HFTextEncoder)
