"""Captions for class-labelled datasets, so that a text-conditioned model learns phrasing, not a table.

Each training example gets a fresh template per step (``caption``), filled with one of the class's
names: for a digit class "7" those are "7" and "seven"; any other class name is used as it is. A
dataset can bring its own captions instead (``folder:`` with captions.jsonl, ``npz:`` with a
``captions`` array; see data.py). numpy only.

The held-out paraphrases that evaluation uses (``HELDOUT_PARAPHRASES``) were written before any
model was trained with these templates, and share none of them: they measure whether phrasing
generalises rather than whether a template was memorised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {name} is filled with one of the class's names ("7" or "seven" for digits)
TEMPLATES = (
    "{name}",
    "a {name}",
    "the number {name}",
    "the digit {name}",
    "a handwritten digit {name}",
    "a handwritten {name}",
    "a sketch of the digit {name}",
    "a drawing of a {name}",
    "an image of the number {name}",
    "{name}, written by hand",
    "a picture of a {name}",
    "digit {name}",
)

# Never used in training: the paraphrase test of a caption-trained model (issue: free-form prompts).
HELDOUT_PARAPHRASES = (
    "someone wrote a {name} here",
    "the numeral {name} in ink",
    "a scribbled {name}",
    "hand-drawn figure {name}",
    "a quick pen stroke forming {name}",
    "black and white {name} digit",
    "my handwriting of {name}",
    "a single {name} on paper",
    "a messy {name}",
    "this shows {name}",
    "an old scan of a {name}",
    "the symbol for {name}",
)


def class_names_for(name: str) -> tuple[str, ...]:
    """The names a class answers to: a digit also by its English word."""
    key = name.strip()
    if key.isdigit() and int(key) < len(NUMBER_WORDS):
        return key, NUMBER_WORDS[int(key)]
    return (key,)


def caption(name: str, rng: np.random.Generator, templates: Sequence[str] = TEMPLATES) -> str:
    """One random caption of the class ``name``: a random template with a random one of its names."""
    names = class_names_for(name)
    return templates[int(rng.integers(len(templates)))].format(name=names[int(rng.integers(len(names)))])


def all_captions(class_names: Sequence[str], templates: Sequence[str] = TEMPLATES) -> list[list[str]]:
    """Every caption of every class: [class][variant] (what training embeds once and caches)."""
    return [[t.format(name=n) for t in templates for n in class_names_for(c)] for c in class_names]


@dataclass(frozen=True)
class CaptionTable:
    """Every caption of every owner (a class, or an image of a dataset with its own captions),
    tokenised once: rows start[k] .. start[k] + count[k] - 1 of ids / mask (N, P) are owner k's."""

    ids: np.ndarray
    mask: np.ndarray
    start: np.ndarray  # (K,) int64
    count: np.ndarray  # (K,) int64


def caption_table(vocab, per_owner: Sequence[Sequence[str]]) -> CaptionTable:
    """Captions per owner (``all_captions(class_names)``, or a dataset's per image) through
    ``vocab.tokenize``: what a caption-trained model draws its prompts from."""
    count = np.array([len(c) for c in per_owner], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    ids, mask = vocab.tokenize([c for captions in per_owner for c in captions])
    return CaptionTable(ids, mask, start, count)
