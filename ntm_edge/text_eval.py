"""Does a caption-trained model follow phrasing it never saw? Prompt accuracy under the evaluation
classifier (metrics.py) of images sampled from captions: the training templates against the
held-out paraphrases (captions.HELDOUT_PARAPHRASES), every class, every name, the same noise seeds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .captions import HELDOUT_PARAPHRASES, TEMPLATES, all_captions
from .exits import sample_images
from .metrics import classifier_predict
from .model import NTM


def caption_subset(per_class: Sequence[Sequence[str]], limit: int | None) -> tuple[list[str], np.ndarray]:
    """Every caption with its class index, class by class; with ``limit`` below their number, the first ``limit``
    of them in an order that cycles through the classes (so any prefix is class-balanced to within one) and,
    class by class, through the phrasings in a fixed shuffled order (so a prefix does not favour the first
    templates). -> (captions, labels (n,) int)."""
    pairs = [(c, k) for k, captions in enumerate(per_class) for c in captions]
    if limit is not None and limit < len(pairs):
        order = np.random.default_rng(0).permutation(max(map(len, per_class)))
        pairs = [(per_class[k][v], k) for v in order for k in range(len(per_class)) if v < len(per_class[k])][:limit]
    return [c for c, _ in pairs], np.array([k for _, k in pairs], dtype=np.int64)


def caption_accuracy(model: NTM, clf, templates: Sequence[str], guidance: float = 2.0, seed: int = 0,
                     repeats: int = 1, limit: int | None = None, **sample_kw) -> dict:
    """Sample ``repeats`` images per caption (every template x class x name; with ``limit``, at most that many
    captions, a class-balanced subset: ``caption_subset``) and score them. ``sample_kw``: more settings of
    ``sample_images`` (steps, final, denoiser); steps defaults to the model's own T.

    -> {"accuracy": fraction classified as the captioned class, "num_samples", "chance": 1 / K}."""
    per_class = all_captions(model.config.prompt.class_names, templates)
    captions, classes = caption_subset(per_class, limit)
    prompts, labels = captions * repeats, np.tile(classes, repeats)
    sample_kw.setdefault("steps", model.config.steps)
    images = sample_images(model, prompts, seed=seed, guidance=guidance, **sample_kw)
    correct = classifier_predict(clf, images) == labels
    return {"accuracy": float(correct.mean()), "num_samples": int(len(labels)), "chance": 1.0 / len(per_class)}


def paraphrase_report(model: NTM, clf, guidance: float = 2.0, seed: int = 0, repeats: int = 1, limit: int | None = None,
                      **sample_kw) -> dict:
    """Prompt accuracy on the training templates and on the held-out paraphrases, same settings, at most ``limit``
    captions from each set (``sample_kw`` as in ``caption_accuracy``)."""
    return {"templates": caption_accuracy(model, clf, TEMPLATES, guidance, seed, repeats, limit, **sample_kw),
            "heldout_paraphrases": caption_accuracy(model, clf, HELDOUT_PARAPHRASES, guidance, seed, repeats, limit,
                                                    **sample_kw),
            "guidance": guidance, "seed": seed}
