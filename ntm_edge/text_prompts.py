"""The text prompt encoder of a model: tokenizer + frozen MiniLM behind the ids/mask interface.

A model's prompt encoder maps token ids (B, P) to prompt tokens (B, P, E); the mask (B, P) travels
beside them. The label encoder (model.py) is a learned table with P = 1. ``TextPromptEncoder`` is
the frozen sentence encoder: P = ``max_tokens`` word pieces, E = 384, the mask recovered from the
ids ([PAD] is id 0 and never occurs inside a prompt).

The encoder is frozen and its weights are not part of any checkpoint (they are the packaged
all-MiniLM-L6-v2, identified by their sha256). It remembers every distinct id row it has embedded,
so a training run embeds each caption once, however many steps draw it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from .text_encoder import MiniLM, load_minilm, weights_hash
from .text_tokenizer import DEFAULT_MAX_TOKENS, TextTokenizer, encoder_files


class TextPromptEncoder(nn.Module):
    """ids int64 (B, P) -> token states (B, P, 384), zero at padding. Holds no parameters of its own:
    the MiniLM sits outside the module tree (not in ``state_dict``, never trained, never saved)."""

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS, encoder: MiniLM | None = None):
        super().__init__()
        files = encoder_files()
        self.tokenizer = TextTokenizer(files.tokenizer, max_tokens)
        self._encoder = [encoder or shared_minilm()]  # a list keeps it out of the module tree
        self.encoder_sha256 = _hash(str(files.weights))
        self._cache: dict[bytes, torch.Tensor] = {}

    def __deepcopy__(self, memo):
        """A copy (an EMA model, a denoiser) shares the frozen encoder and its embedding cache."""
        twin = TextPromptEncoder.__new__(TextPromptEncoder)
        nn.Module.__init__(twin)
        twin.tokenizer, twin._encoder, twin.encoder_sha256, twin._cache = (
            self.tokenizer, self._encoder, self.encoder_sha256, self._cache)
        twin.train(self.training)
        return twin

    @property
    def minilm(self) -> MiniLM:
        return self._encoder[0]

    @property
    def dim(self) -> int:
        return self._encoder[0].dim

    @property
    def cached(self) -> int:
        """Distinct prompts embedded so far."""
        return len(self._cache)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ids.detach().cpu()
        keys = [r.numpy().tobytes() for r in rows]
        missing: dict[bytes, int] = {}  # key -> first row that holds it
        for i, key in enumerate(keys):
            if key not in self._cache:
                missing.setdefault(key, i)
        if missing:
            states = self.embed(rows[list(missing.values())])  # (M, P, E)
            self._cache.update(zip(missing, states, strict=True))
        return torch.stack([self._cache[k] for k in keys]).to(ids.device)  # (B, P, E)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The pure function behind the cache (what the exported graph is): ids (B, P) -> (B, P, E),
        the mask derived as ids != [PAD], padding zeroed."""
        mask = ids != self.tokenizer.pad_id  # (B, P)
        return self.minilm(ids, mask) * mask[..., None].to(torch.float32)


@functools.cache
def shared_minilm() -> MiniLM:
    """The packaged MiniLM, loaded once per process: every text prompt encoder (model, EMA, denoiser)
    reads the same frozen weights. Loading draws nothing from torch's global generator (the module's
    init would, before the weights replace it), so a model's own init does not depend on whether
    the MiniLM was already loaded in this process."""
    with torch.random.fork_rng(devices=[]):
        return load_minilm(encoder_files().weights)


@functools.cache
def _hash(weights: str) -> str:
    return weights_hash(Path(weights))
