"""Sample-quality metrics for ``ntm-edge eval``: a Frechet distance and prompt accuracy.

Nothing may be downloaded, so there is no Inception network and no FID in the usual sense.
Instead ntm-edge trains its own evaluation classifier on the TRAINING split of the dataset only
(never the test split), with a fixed seed: a small CNN (three 3x3 conv blocks with batch norm
and ReLU, max pooling between them, global average pooling to a 128-d feature vector, then a
linear layer to the classes). Its accuracy on the held-out TEST split is stored with it and
reported with every eval, so a reader can judge how far its features can be trusted. Trained
classifiers are cached (see load_or_train_classifier).

* ``frechet``: the Frechet distance between Gaussians fitted to the classifier's penultimate
  features of the samples and of real reference images (the FID formula on other features).
  FD numbers are only comparable when computed with the same classifier (same dataset, image
  size, channels and cache version; a changed folder:/npz: training set means a new classifier);
  never compare them with published FID values or across classifiers.
* ``prompt_accuracy``: how often the classifier assigns a sample to the class it was prompted with.

Images given as uint8 (N, H, W, C) are mapped to [-1, 1] with (x + 0.5) / 128 - 1 (no random
dequantisation at eval).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from .data import load_dataset
from .errors import DataError
from .fileio import atomic_write, atomic_write_text, remove_stale_temporaries, sha256_file

CACHE_VERSION = 1
FEATURE_DIM = 128


class EvalClassifier(nn.Module):
    """Small CNN on float (B, C, H, W) images in [-1, 1]: conv blocks -> global pool -> features -> logits."""

    def __init__(self, image_size: int, channels: int, num_classes: int, dataset: str = "",
                 class_names: tuple[str, ...] = ()) -> None:
        super().__init__()
        if not 8 <= image_size <= 64 or channels not in (1, 3):
            raise DataError(f"The eval classifier needs 8..64 px images with 1 or 3 channels, got {image_size} px, {channels}c.")
        self.dataset, self.image_size, self.channels = dataset, image_size, channels
        self.class_names = tuple(class_names) or tuple(str(i) for i in range(num_classes))
        self.heldout_accuracy = float("nan")
        widths, strides = (channels, 32, 64, FEATURE_DIM), (2 if image_size > 16 else 1, 1, 1)  # stride-2 stem: big images
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())
            for a, b, s in zip(widths[:-1], widths[1:], strides, strict=True)
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.blocks) - 1:
                x = F.max_pool2d(x, 2)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _to_float(images_uint8: np.ndarray, clf: EvalClassifier) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1], checked against the classifier's input shape."""
    images = np.asarray(images_uint8)
    want = (clf.image_size, clf.image_size, clf.channels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want:
        raise DataError(f"The eval classifier takes uint8 images of shape (N, {', '.join(map(str, want))}); "
                        f"got {images.dtype} {images.shape}.")
    return (torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() + 0.5) / 128.0 - 1.0


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts by up to +-1 pixel: replicate-pad by 1, then crop back at a random offset per image."""
    b, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dy, dx = torch.randint(0, 3, (2, b, 1), generator=g)
    rows, cols = dy + torch.arange(h), dx + torch.arange(w)
    out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def default_epochs(n_train: int, batch_size: int = 128) -> int:
    """Enough epochs for ~600 optimizer steps, at most 24 (digits: 24 epochs, mnist5k: 17)."""
    return min(24, math.ceil(600 / math.ceil(n_train / batch_size)))


def train_classifier(dataset: str, image_size: int, channels: int, seed: int = 0, epochs: int | None = None,
                     device: str = "cpu", log: Callable[[str], object] = print) -> EvalClassifier:
    """Train an EvalClassifier on the train split of `dataset`; its accuracy on the test split -> heldout_accuracy.

    Adam (lr 1e-3, cosine-decayed to 0), batch 128, random +-1 pixel shifts; deterministic for a seed.
    """
    train = load_dataset(dataset, "train", image_size=image_size, channels=channels)
    test = load_dataset(dataset, "test", image_size=image_size, channels=channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = EvalClassifier(image_size, channels, len(train.class_names), dataset, train.class_names)
    clf.to(device)
    x_all = _to_float(train.images, clf)
    y_all = torch.from_numpy(train.labels)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    epochs = epochs or default_epochs(len(train))
    total_steps = epochs * math.ceil(len(train) / 128)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1.0 + math.cos(math.pi * k / total_steps)))
    start = time.perf_counter()
    for epoch in range(epochs):
        clf.train()
        perm, total = torch.randperm(len(train), generator=g), 0.0
        for i in range(0, len(train), 128):
            idx = perm[i : i + 128]
            loss = F.cross_entropy(clf(_shift(x_all[idx], g).to(device)), y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log(f"eval classifier {dataset} {image_size}px: epoch {epoch + 1}/{epochs}, loss {total / len(train):.4f}")
    clf.eval()
    clf.heldout_accuracy = float(np.mean(classifier_predict(clf, test.images) == test.labels))
    log(f"eval classifier {dataset} {image_size}px: held-out accuracy {clf.heldout_accuracy:.4f} "
        f"on {len(test)} test images ({time.perf_counter() - start:.1f} s)")
    return clf


def _cache_stem(dataset: str, image_size: int, channels: int) -> str:
    """File stem; folder:/npz: datasets are keyed by the spec string and a hash of their training images."""
    spec = str(dataset).strip()
    kind = spec.partition(":")[0].lower()
    if kind in ("digits", "mnist5k") and ":" not in spec:
        slug = kind
    else:
        train = load_dataset(spec, "train", image_size=image_size, channels=channels)
        h = hashlib.sha256(spec.encode())
        for part in (train.images, train.labels, np.asarray(train.class_names, dtype=str)):
            h.update(repr(part.shape).encode() + np.ascontiguousarray(part).tobytes())
        name = re.sub(r"[^a-z0-9]+", "-", Path(spec.partition(":")[2]).name.lower()).strip("-")[:40]
        slug = f"{kind}-{name}-{h.hexdigest()[:16]}"
    return f"{slug}-{image_size}px-{channels}c-v{CACHE_VERSION}"


def _load_cached(weights: Path, meta_path: Path, dataset: str, image_size: int, channels: int) -> EvalClassifier:
    """Rebuild a cached classifier; raises ValueError (or an I/O error) saying why it cannot be used."""
    from safetensors.torch import load_file

    meta = json.loads(meta_path.read_text())
    if meta.get("cache_version") != CACHE_VERSION or sha256_file(weights) != meta.get("weights_sha256"):
        raise ValueError(f"{weights.name} does not match its recorded sha256")
    clf = EvalClassifier(image_size, channels, len(meta["class_names"]), dataset, tuple(meta["class_names"]))
    clf.load_state_dict(load_file(weights))
    clf.heldout_accuracy = float(meta["heldout_accuracy"])
    return clf.eval()


def load_or_train_classifier(dataset: str, image_size: int, channels: int, cache_dir: str | Path | None = None,
                             device: str = "cpu", log: Callable[[str], object] = print) -> EvalClassifier:
    """The cached classifier for (dataset, image_size, channels), or a freshly trained (and cached) one.

    Cache: `cache_dir` (default $NTM_EDGE_CACHE or ~/.cache/ntm-edge)/classifiers/<stem>.safetensors + <stem>.json
    (class names, held-out accuracy, sha256 of the weights). A corrupt cache entry is retrained, not fatal.
    """
    from safetensors.torch import save_file

    root = Path(cache_dir or os.environ.get("NTM_EDGE_CACHE") or Path.home() / ".cache" / "ntm-edge").expanduser()
    stem = _cache_stem(dataset, image_size, channels)
    weights, meta_path = root / "classifiers" / f"{stem}.safetensors", root / "classifiers" / f"{stem}.json"
    if weights.exists() or meta_path.exists():
        try:
            return _load_cached(weights, meta_path, dataset, image_size, channels).to(device)
        except Exception as exc:  # any unreadable/mismatched cache entry is rebuilt
            log(f"cached eval classifier {weights} is unusable ({' '.join(str(exc).split())[:200]}); retraining")
    clf = train_classifier(dataset, image_size, channels, device=device, log=log)
    tensors = {k: v.detach().cpu().contiguous() for k, v in clf.state_dict().items()}
    try:  # weights first, then the json whose sha256 ties them to it
        remove_stale_temporaries(weights.parent)  # what a killed caching run left
        atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "ntm-edge-eval-classifier"}))
        meta = {"cache_version": CACHE_VERSION, "dataset": str(dataset), "image_size": image_size, "channels": channels,
                "class_names": list(clf.class_names), "heldout_accuracy": clf.heldout_accuracy,
                "weights_sha256": sha256_file(weights)}
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
    except OSError as exc:
        log(f"cannot cache the eval classifier in {weights.parent} ({' '.join(str(exc).split())}); continuing uncached")
    return clf


@torch.no_grad()
def classifier_features(clf: EvalClassifier, images_uint8: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Penultimate features (N, F) float64 of uint8 (N, H, W, C) images, in eval mode."""
    x, device = _to_float(images_uint8, clf), next(clf.parameters()).device
    was_training = clf.training
    clf.eval()
    out = [clf.features(x[i : i + batch_size].to(device)).double().cpu() for i in range(0, len(x), batch_size)]
    clf.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM))


@torch.no_grad()
def classifier_predict(clf: EvalClassifier, images_uint8: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Predicted class indices (N,) int64 of uint8 (N, H, W, C) images."""
    feats = torch.from_numpy(classifier_features(clf, images_uint8, batch_size)).to(next(clf.parameters()))
    return clf.head(feats).argmax(dim=1).cpu().numpy().astype(np.int64)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 (Sa Sb)^(1/2)) of Gaussians fitted to two feature sets (N, F)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"Feature sets must be (N, F) with the same F, got {a.shape} and {b.shape}.")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"The Frechet distance needs at least 2 samples per set, got {len(a)} and {len(b)}.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s_a @ s_b)
        if caught or not np.isfinite(covmean).all():  # singular product: add eps*I as the standard FID code does
            offset = np.eye(len(s_a)) * eps
            covmean = scipy.linalg.sqrtm((s_a + offset) @ (s_b + offset))
    fd = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(np.real(covmean)))
    return max(fd, 0.0)


def sample_quality(clf: EvalClassifier, images_uint8: np.ndarray, prompt_labels: np.ndarray | None,
                   reference_uint8: np.ndarray) -> dict:
    """Frechet distance of samples to reference images in classifier features, and prompt accuracy (None without labels)."""
    feats = classifier_features(clf, images_uint8)
    prompt_accuracy = None
    if prompt_labels is not None:
        labels = np.asarray(prompt_labels).reshape(-1)
        if len(labels) != len(feats):
            raise ValueError(f"Got {len(labels)} prompt labels for {len(feats)} images.")
        logits = clf.head(torch.from_numpy(feats).to(next(clf.parameters())))
        prompt_accuracy = float(np.mean(logits.argmax(1).cpu().numpy() == labels))
    frechet = frechet_distance(feats, classifier_features(clf, reference_uint8))
    return {"frechet": frechet, "prompt_accuracy": prompt_accuracy, "num_samples": int(len(feats))}
