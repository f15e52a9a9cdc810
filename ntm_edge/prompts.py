"""Prompt tokenisation, numpy only (the runtime tokenises too).

Every prompt encoder turns a list of prompts into token ids of shape (B, P) and a boolean mask of
shape (B, P), P the number of prefix tokens. One vocabulary per encoder kind, one interface
(``tokenize``, ``null``, ``check``, ``mask_of``, ``ids_for_labels``):

- ``LabelVocab`` (kind "label"): P = 1, one token per class name, id 0 for the empty prompt (the
  unconditional branch of classifier-free guidance).
- ``TextVocab`` (kind "minilm"): P = ``max_tokens`` word pieces of free text (text_tokenizer.py);
  the unconditional prompt is the tokenised '' ([CLS] [SEP]). Any text that fits is a prompt.

``make_vocab`` picks the one a model's ``PromptConfig`` names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import PromptError
from .text_tokenizer import TextTokenizer

NULL_ID = 0  # the unconditional prompt
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def normalize_prompt(prompt: str | None) -> str:
    """Lower case, single spaces, no surrounding whitespace; None means the empty prompt."""
    return " ".join((prompt or "").lower().split())


class LabelVocab:
    """Class name -> token id (1..K); '' -> NULL_ID. Digits also answer to their English names."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = tuple(class_names)
        self._ids: dict[str, int] = {}
        for i, name in enumerate(self.class_names):
            key = normalize_prompt(name)
            self._ids[key] = i + 1
            if key.isdigit() and int(key) < len(_NUMBER_WORDS):
                self._ids.setdefault(_NUMBER_WORDS[int(key)], i + 1)
        for prefix in ("digit ", "the digit ", "a "):  # "digit 3", "a 3"
            for key, i in list(self._ids.items()):
                self._ids.setdefault(prefix + key, i)

    @property
    def num_tokens(self) -> int:
        """Embedding rows: the K classes plus the null prompt."""
        return len(self.class_names) + 1

    def token_id(self, prompt: str | None) -> int:
        key = normalize_prompt(prompt)
        if key == "":
            return NULL_ID
        try:
            return self._ids[key]
        except KeyError:
            known = ", ".join(repr(n) for n in self.class_names)
            raise PromptError(f"unknown prompt {prompt!r}; this model knows: {known}") from None

    def tokenize(self, prompts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """prompts (B,) -> ids int64 (B, 1), mask bool (B, 1)."""
        ids = np.array([[self.token_id(p)] for p in prompts], dtype=np.int64).reshape(len(prompts), 1)
        return ids, np.ones_like(ids, dtype=bool)

    def ids_for_labels(self, labels: np.ndarray) -> np.ndarray:
        """Dataset labels 0..K-1 (B,) -> ids (B, 1)."""
        return (np.asarray(labels, dtype=np.int64) + 1).reshape(-1, 1)

    def null(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The unconditional prompt n times: ids (n, 1), mask (n, 1)."""
        return self.tokenize([""] * n)

    def check(self, prompt: str | None) -> None:
        """Raise the PromptError of a prompt this vocabulary cannot take, before any work."""
        self.token_id(prompt)

    @staticmethod
    def mask_of(ids):
        """The mask of ids (numpy or torch): every label id is a real token."""
        return ids >= 0


class TextVocab:
    """Free text -> MiniLM word-piece ids (B, max_tokens) and their mask; '' is the unconditional prompt.

    Dataset labels map to their class name as the prompt (what ``ids_for_labels`` scores), and a
    text model answers to any phrasing that fits in ``max_tokens``."""

    def __init__(self, class_names: Sequence[str], tokenizer_json, max_tokens: int):
        self.class_names = tuple(class_names)
        self.tokenizer = TextTokenizer(tokenizer_json, max_tokens)
        self.max_tokens = max_tokens

    def tokenize(self, prompts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """prompts (B,) -> ids int64 (B, max_tokens), mask bool (B, max_tokens)."""
        return self.tokenizer.tokenize(list(prompts))

    def null(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tokenize([""] * n)

    def check(self, prompt: str | None) -> None:
        self.tokenize([prompt])

    def mask_of(self, ids):
        """The mask of ids (numpy or torch): [PAD] never occurs inside a prompt."""
        return ids != self.tokenizer.pad_id

    def ids_for_labels(self, labels: np.ndarray) -> np.ndarray:
        """Dataset labels 0..K-1 (B,) -> the ids of their class names as prompts (B, max_tokens)."""
        ids, _ = self.tokenize(list(self.class_names))
        return ids[np.asarray(labels, dtype=np.int64)]


def make_vocab(prompt_config, tokenizer_json=None) -> LabelVocab | TextVocab:
    """The vocabulary of a ``PromptConfig``; a text model reads ``tokenizer_json`` (default: the packaged one)."""
    if prompt_config.kind == "label":
        return LabelVocab(prompt_config.class_names)
    if tokenizer_json is None:
        from .text_tokenizer import encoder_files

        tokenizer_json = encoder_files().tokenizer
    return TextVocab(prompt_config.class_names, tokenizer_json, prompt_config.max_tokens)
