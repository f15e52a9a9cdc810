"""Tests for ntm_edge.metrics: a real eval classifier trained on digits (~5 s), real images, no mocks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ntm_edge import metrics
from ntm_edge.data import load_dataset
from ntm_edge.errors import DataError
from ntm_edge.metrics import (
    classifier_features,
    classifier_predict,
    frechet_distance,
    load_or_train_classifier,
    sample_quality,
)

STEM = "digits-8px-1c-v1"


@pytest.fixture(scope="module")
def digits_clf(tmp_path_factory):
    """(classifier, cache dir, log lines) of the digits classifier, trained once into $NTM_EDGE_CACHE."""
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("cache")
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NTM_EDGE_CACHE", str(cache))
        clf = load_or_train_classifier("digits", 8, 1, log=lines.append)
    return clf, cache, lines


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def test_classifier_accuracy_and_cache_round_trip(digits_clf, splits, monkeypatch):
    clf, cache, lines = digits_clf
    _, test = splits
    assert any("epoch" in line for line in lines)  # it was trained
    assert clf.heldout_accuracy >= 0.9
    assert clf.heldout_accuracy == pytest.approx(np.mean(classifier_predict(clf, test.images) == test.labels))
    assert (clf.dataset, clf.image_size, clf.channels, clf.class_names) == ("digits", 8, 1, tuple("0123456789"))
    meta = json.loads((cache / "classifiers" / f"{STEM}.json").read_text())
    assert meta["heldout_accuracy"] == clf.heldout_accuracy and meta["class_names"] == list(clf.class_names)

    monkeypatch.setenv("NTM_EDGE_CACHE", str(cache))
    again: list[str] = []
    loaded = load_or_train_classifier("digits", 8, 1, log=again.append)
    assert again == []  # loaded, not retrained
    assert loaded.heldout_accuracy == clf.heldout_accuracy
    feats = classifier_features(clf, test.images)
    assert feats.dtype == np.float64 and feats.shape == (len(test), metrics.FEATURE_DIM)
    np.testing.assert_array_equal(classifier_features(loaded, test.images), feats)


def test_corrupt_cache_retrains_identically(digits_clf, splits, tmp_path):
    clf, cache, _ = digits_clf
    shutil.copytree(cache, tmp_path / "c")
    weights = tmp_path / "c" / "classifiers" / f"{STEM}.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    lines: list[str] = []
    again = load_or_train_classifier("digits", 8, 1, cache_dir=tmp_path / "c", log=lines.append)
    assert "unusable" in lines[0] and "retraining" in lines[0]
    images = splits[1].images
    np.testing.assert_array_equal(classifier_features(again, images), classifier_features(clf, images))  # deterministic
    quiet: list[str] = []
    load_or_train_classifier("digits", 8, 1, cache_dir=tmp_path / "c", log=quiet.append)
    assert quiet == []  # the rewritten cache entry is valid


def test_folder_and_npz_cache_key_follows_content(tmp_path):
    images, labels = load_dataset("digits", "train").images[:40], np.arange(40) % 10
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    stem = metrics._cache_stem(f"npz:{tmp_path / 'a.npz'}", 8, 1)
    assert stem.startswith("npz-a-npz-") and stem.endswith("-8px-1c-v1")
    assert metrics._cache_stem(f"npz:{tmp_path / 'a.npz'}", 8, 1) == stem
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    np.savez(tmp_path / "a.npz", images=changed, labels=labels)
    assert metrics._cache_stem(f"npz:{tmp_path / 'a.npz'}", 8, 1) != stem


def _with_moments(rng: np.random.Generator, n: int, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n samples whose sample mean and (unbiased) sample covariance are exactly mu and cov."""
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance exactly I
    return mu + z @ np.linalg.cholesky(cov).T


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2, exact moments
    mu1, mu2 = np.zeros(4), np.array([1.0, -2.0, 0.5, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 1.0, 2.0])
    x, y = _with_moments(rng, 300, mu1, np.diag(s1)), _with_moments(rng, 500, mu2, np.diag(s2))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(y, x) == pytest.approx(frechet_distance(x, y), rel=1e-9)
    # full covariances: Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), computed here with eigh
    m1, m2 = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    c1, c2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    x, y = _with_moments(rng, 200, mu1[:1].repeat(5), c1), _with_moments(rng, 200, np.ones(5), c2)
    r1 = _psd_sqrt(c1)
    expected = 5.0 + np.trace(c1) + np.trace(c2) - 2 * np.trace(_psd_sqrt(r1 @ c2 @ r1))
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-7)
    # large samples of two Gaussians: within sampling tolerance of the population value
    x = rng.standard_normal((20000, 3)) * np.sqrt([1.0, 4.0, 0.25])
    y = 1.0 + rng.standard_normal((20000, 3)) * np.sqrt([4.0, 4.0, 1.0])
    assert frechet_distance(x, y) == pytest.approx(3.0 + 1.0 + 0.0 + 0.25, abs=0.05)


def test_frechet_distance_singular_and_bad_input():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((50, 4)), rng.standard_normal((60, 4))
    a[:, 3] = b[:, 3] = 0.0  # a dead feature: singular covariances, as dead ReLU units give
    fd = frechet_distance(a, b)
    assert np.isfinite(fd) and fd == pytest.approx(frechet_distance(a[:, :3], b[:, :3]), abs=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :3])


def test_sample_quality_separates_real_from_fake(digits_clf, splits):
    clf, _, _ = digits_clf
    train, test = splits
    rng = np.random.default_rng(0)
    real = sample_quality(clf, test.images, test.labels, train.images)
    noise = sample_quality(clf, rng.integers(0, 256, test.images.shape, dtype=np.uint8), None, train.images)
    flat = test.images.reshape(len(test), -1)
    shuffled = rng.permuted(flat, axis=1).reshape(test.images.shape)  # each image's own pixels, scrambled
    scrambled = sample_quality(clf, shuffled, test.labels, train.images)
    assert real["num_samples"] == len(test) and noise["prompt_accuracy"] is None
    assert 10 * real["frechet"] < noise["frechet"] and 10 * real["frechet"] < scrambled["frechet"]
    assert real["prompt_accuracy"] >= 0.9
    assert sample_quality(clf, test.images, (test.labels + 1) % 10, train.images)["prompt_accuracy"] <= 0.2


def test_wrong_image_shape_is_one_line_data_error(digits_clf):
    with pytest.raises(DataError) as info:
        classifier_features(digits_clf[0], np.zeros((3, 28, 28, 1), np.uint8))
    assert "\n" not in str(info.value) and "(N, 8, 8, 1)" in str(info.value)
