"""Image grids and arrays on disk (numpy + Pillow: the runtime writes its outputs with this too).

A grid is written in the format its suffix names (``validate.IMAGE_FORMATS``) and holds at most
``MAX_GRID_PIXELS`` pixels: past that the grid shows the first images only and says so, while the
``.npy`` array keeps every image. (A 100,000-image grid would be a 423-megapixel PNG, which Pillow
itself refuses to open.)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import NtmError
from .fileio import atomic_write, remove_stale_temporaries
from .validate import image_format

MAX_GRID_PIXELS = 1 << 24  # 16.8 megapixels: a 4096 x 4096 grid, far below Pillow's bomb limit (89 Mpx)


def _layout(n: int, h: int, w: int, ncols: int | None, scale: int | None, pad: int) -> tuple[int, int, int]:
    """(columns, rows, scale) of a grid of n cells of h x w pixels."""
    ncols = ncols or math.ceil(math.sqrt(n))
    return ncols, math.ceil(n / ncols), scale or max(1, 64 // max(h, w))


def make_grid(images: np.ndarray, ncols: int | None = None, scale: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (rows, cols, C) grid, each cell scaled up to >= 64 pixels."""
    n, h, w, c = images.shape
    ncols, nrows, scale = _layout(n, h, w, ncols, scale, pad)
    cells = images.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, h s, w s, C)
    H, W = h * scale + pad, w * scale + pad
    grid = np.zeros((nrows * H + pad, ncols * W + pad, c), dtype=np.uint8)
    for i, cell in enumerate(cells):
        r, q = divmod(i, ncols)
        grid[pad + r * H : pad + r * H + h * scale, pad + q * W : pad + q * W + w * scale] = cell
    return grid


def grid_capacity(images: np.ndarray, ncols: int | None = None, scale: int | None = None, pad: int = 1) -> int:
    """How many of ``images`` (N, H, W, C) a grid of at most MAX_GRID_PIXELS pixels shows (at least one)."""
    n, h, w, _ = images.shape

    def pixels(k: int) -> int:
        cols, rows, s = _layout(k, h, w, ncols, scale, pad)
        return (rows * (h * s + pad) + pad) * (cols * (w * s + pad) + pad)

    if pixels(n) <= MAX_GRID_PIXELS:
        return n
    lo, hi = 1, n  # pixels(k) grows with k: the largest k that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if pixels(mid) <= MAX_GRID_PIXELS else (lo, mid - 1)
    return lo


def save_grid(images: np.ndarray, path, **kw) -> int:
    """The first ``grid_capacity`` images as one grid, in the format the suffix names -> images shown."""
    shown = grid_capacity(images, **kw)
    grid = make_grid(images[:shown], **kw)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    _write(Path(path), lambda tmp: img.save(tmp, format=image_format(path)))
    return shown


def save_array(images: np.ndarray, path) -> None:
    """uint8 (N, H, W, C) -> .npy, atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, images)

    _write(Path(path), write)


def save_images(images: np.ndarray, out, array_to=None, log=print) -> None:
    """What `sample` and `run` write: the grid ``out`` and, with ``array_to``, every image as .npy
    (both paths checked before the work by ``validate.image_path`` / ``validate.array_path``). The
    temporaries that a killed earlier write of the same names left are removed first."""
    for path in (out, array_to):
        if path:
            remove_stale_temporaries(Path(path).parent, Path(path).name)
    if array_to:
        save_array(images, Path(array_to))
    shown = save_grid(images, Path(out))
    if shown < len(images):
        kept = f"all {len(images)} are in {array_to}" if array_to else "pass --save-array to keep them all"
        log(f"the grid {out} shows the first {shown} of {len(images)} images (at most {MAX_GRID_PIXELS / 1e6:.1f} "
            f"megapixels); {kept}")


def _write(path: Path, write) -> None:
    try:
        atomic_write(path, write)
    except OSError as e:  # a full disk, a lost permission: one line, and the temporary is gone
        raise NtmError(f"cannot write {path} ({e.strerror or e})") from None
