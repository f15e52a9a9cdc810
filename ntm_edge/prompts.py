"""Prompt tokenisation, numpy only (the runtime tokenises too).

Every prompt encoder turns a list of prompts into token ids of shape (B, P) and a boolean mask of
shape (B, P), P the number of prefix tokens. The label encoder has P = 1: one token per class name,
id 0 for the empty prompt (the unconditional branch of classifier-free guidance). A sentence
encoder slots in behind the same interface with P > 1 and a real mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import PromptError

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
