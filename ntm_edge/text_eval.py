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


def caption_accuracy(model: NTM, clf, templates: Sequence[str], guidance: float = 2.0, seed: int = 0,
                     repeats: int = 1, **sample_kw) -> dict:
    """Sample ``repeats`` images per caption (every template x class x name) and score them.
    ``sample_kw``: more settings of ``sample_images`` (steps, final, denoiser); steps defaults to the
    model's own T.

    -> {"accuracy": fraction classified as the captioned class, "num_samples", "chance": 1 / K}."""
    per_class = all_captions(model.config.prompt.class_names, templates)
    prompts = [c for captions in per_class for c in captions] * repeats
    labels = np.array([k for k, captions in enumerate(per_class) for _ in captions] * repeats)
    sample_kw.setdefault("steps", model.config.steps)
    images = sample_images(model, prompts, seed=seed, guidance=guidance, **sample_kw)
    correct = classifier_predict(clf, images) == labels
    return {"accuracy": float(correct.mean()), "num_samples": int(len(labels)), "chance": 1.0 / len(per_class)}


def paraphrase_report(model: NTM, clf, guidance: float = 2.0, seed: int = 0, repeats: int = 1, **sample_kw) -> dict:
    """Prompt accuracy on the training templates and on the held-out paraphrases, same settings
    (``sample_kw`` as in ``caption_accuracy``)."""
    return {"templates": caption_accuracy(model, clf, TEMPLATES, guidance, seed, repeats, **sample_kw),
            "heldout_paraphrases": caption_accuracy(model, clf, HELDOUT_PARAPHRASES, guidance, seed, repeats,
                                                    **sample_kw),
            "guidance": guidance, "seed": seed}
