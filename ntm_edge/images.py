"""Image grids and arrays on disk (numpy + Pillow: the runtime writes its outputs with this too)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from .fileio import atomic_write


def make_grid(images: np.ndarray, ncols: int | None = None, scale: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (rows, cols, C) grid, each cell scaled up to >= 64 pixels."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    scale = scale or max(1, 64 // max(h, w))
    cells = images.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, h s, w s, C)
    H, W = h * scale + pad, w * scale + pad
    grid = np.zeros((nrows * H + pad, ncols * W + pad, c), dtype=np.uint8)
    for i, cell in enumerate(cells):
        r, q = divmod(i, ncols)
        grid[pad + r * H : pad + r * H + h * scale, pad + q * W : pad + q * W + w * scale] = cell
    return grid


def save_grid(images: np.ndarray, path, **kw) -> None:
    grid = make_grid(images, **kw)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"))


def save_array(images: np.ndarray, path) -> None:
    """uint8 (N, H, W, C) -> .npy, atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, images)

    atomic_write(Path(path), write)
