"""Image grids and arrays on disk (numpy + Pillow: the runtime writes its outputs with this too).

A grid is written in the format its suffix names (``validate.IMAGE_FORMATS``) and holds at most
``MAX_GRID_PIXELS`` pixels: past that the grid shows the first images only and says so, while the
``.npy`` array keeps every image. (A 100,000-image grid would be a 423-megapixel PNG, which Pillow
itself refuses to open.)

Layout: every image is scaled up by pixel repetition (nearest neighbour: a model's pixels exactly, no
blur) until a cell is at least ``MIN_CELL`` pixels wide, and framed by ``pad`` grey pixels, so that
neighbouring images never run into each other. A grid may carry one text label under each row (the
prompt of that row), drawn with Pillow's built-in bitmap font.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import NtmError
from .fileio import atomic_write, remove_stale_temporaries
from .validate import image_format

MAX_GRID_PIXELS = 1 << 24  # 16.8 megapixels: a 4096 x 4096 grid, far below Pillow's bomb limit (89 Mpx)
MIN_CELL = 64  # small images are scaled up (nearest) until each cell is at least this many pixels wide
PAD_VALUE = 128  # mid-grey gaps: visible between black-background digits and between white ones alike
LABEL_BACKGROUND, LABEL_INK = 0, 255


@dataclass(frozen=True)
class GridLayout:
    """Where the cells of a grid go: ``ncols`` x ``nrows`` cells of ``cell_h`` x ``cell_w`` pixels (the
    image scaled by the integer ``scale``), ``pad`` grey pixels around and between them, and under each
    row a label band of ``label_h`` pixels (0: no labels)."""

    ncols: int
    nrows: int
    scale: int
    cell_h: int
    cell_w: int
    pad: int
    label_h: int

    @property
    def row_h(self) -> int:
        """Pixels from the top of one row of cells to the top of the next."""
        return self.cell_h + self.label_h + self.pad

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the whole grid."""
        return self.nrows * self.row_h + self.pad, self.ncols * (self.cell_w + self.pad) + self.pad

    def cell_origin(self, i: int) -> tuple[int, int]:
        """(top, left) pixel of cell ``i`` (row-major)."""
        r, q = divmod(i, self.ncols)
        return self.pad + r * self.row_h, self.pad + q * (self.cell_w + self.pad)


def _layout(n: int, h: int, w: int, ncols: int | None, scale: int | None, pad: int, min_cell: int = MIN_CELL,
            labels: bool = False) -> GridLayout:
    """The layout of a grid of n images of h x w pixels. ``scale`` None: the smallest integer factor that
    makes each cell at least ``min_cell`` pixels on its longer side (1 for images that already are)."""
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    ncols = ncols or math.ceil(math.sqrt(n))
    scale = scale or max(1, math.ceil(min_cell / max(h, w)))
    label_h = _label_height() if labels else 0
    return GridLayout(ncols, math.ceil(n / ncols), scale, h * scale, w * scale, pad, label_h)


def make_grid(images: np.ndarray, ncols: int | None = None, scale: int | None = None, pad: int = 1,
              min_cell: int = MIN_CELL, labels: Sequence[str] | None = None) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 grid (height, width, C).

    Each image is scaled up by repeating pixels (nearest neighbour, exact) to at least ``min_cell``
    pixels (or by ``scale``); ``pad`` grey pixels (PAD_VALUE) frame every cell. ``labels``: one text
    per row (the prompt of that row), drawn in a band under the row; a text too wide for the grid is cut
    with "...".
    """
    n, h, w, c = images.shape
    if labels is not None:
        labels = list(labels)
    lay = _layout(n, h, w, ncols, scale, pad, min_cell, labels is not None)
    if labels is not None and len(labels) != lay.nrows:
        raise ValueError(f"got {len(labels)} labels for a grid of {lay.nrows} rows")
    cells = images.repeat(lay.scale, axis=1).repeat(lay.scale, axis=2)  # (N, h s, w s, C)
    grid = np.full((*lay.shape, c), PAD_VALUE, dtype=np.uint8)
    for i, cell in enumerate(cells):
        top, left = lay.cell_origin(i)
        grid[top : top + lay.cell_h, left : left + lay.cell_w] = cell
    for r, text in enumerate(labels or ()):
        top = lay.pad + r * lay.row_h + lay.cell_h
        band = grid[top : top + lay.label_h, lay.pad : lay.shape[1] - lay.pad]  # (label_h, width - 2 pad, C)
        band[...] = draw_label(text, band.shape[1], lay.label_h)[..., None]
    return grid


def _font():
    """Pillow's built-in bitmap font (no font file, the same pixels on every machine)."""
    loader = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1; load_default may be FreeType
    return loader() if loader is not None else ImageFont.load_default()


def _label_height() -> int:
    """Pixels of a label band: the font's line height plus 2 pixels above and below."""
    left, top, right, bottom = _font().getbbox("Ag|")
    return int(bottom) + 4


def draw_label(text: str, width: int, height: int) -> np.ndarray:
    """``text`` in white on black, left-aligned: uint8 (height, width). Cut with "..." to fit ``width``."""
    font = _font()

    def fits(s: str) -> bool:
        return 2 + font.getbbox(s)[2] <= width

    if not fits(text):
        while text and not fits(text + "..."):
            text = text[:-1]
        text += "..."
    img = Image.new("L", (max(width, 1), height), LABEL_BACKGROUND)
    ImageDraw.Draw(img).text((2, 2), text, fill=LABEL_INK, font=font)
    return np.asarray(img)[:, :width]


def grid_capacity(images: np.ndarray, ncols: int | None = None, scale: int | None = None, pad: int = 1,
                  min_cell: int = MIN_CELL, labels: Sequence[str] | None = None) -> int:
    """How many of ``images`` (N, H, W, C) a grid of at most MAX_GRID_PIXELS pixels shows (at least one)."""
    n, h, w, _ = images.shape

    def pixels(k: int) -> int:
        height, width = _layout(k, h, w, ncols, scale, pad, min_cell, labels is not None).shape
        return height * width

    if pixels(n) <= MAX_GRID_PIXELS:
        return n
    lo, hi = 1, n  # pixels(k) grows with k: the largest k that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if pixels(mid) <= MAX_GRID_PIXELS else (lo, mid - 1)
    return lo


def save_grid(images: np.ndarray, path, labels: Sequence[str] | None = None, **kw) -> int:
    """The first ``grid_capacity`` images as one grid, in the format the suffix names -> images shown.
    ``labels``: one per row of the full grid; a capped grid keeps those of the rows it shows."""
    shown = grid_capacity(images, labels=labels, **kw)
    if labels is not None:
        n, h, w, _ = images.shape
        ncols = _layout(n, h, w, kw.get("ncols"), kw.get("scale"), kw.get("pad", 1)).ncols
        labels = list(labels)[: math.ceil(shown / ncols)]
    grid = make_grid(images[:shown], labels=labels, **kw)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    _write(Path(path), lambda tmp: img.save(tmp, format=image_format(path)))
    return shown


def save_array(images: np.ndarray, path) -> None:
    """uint8 (N, H, W, C) -> .npy, atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, images)

    _write(Path(path), write)


def save_images(images: np.ndarray, out, array_to=None, log=print, **grid) -> None:
    """What `sample` and `run` write: the grid ``out`` and, with ``array_to``, every image as .npy
    (both paths checked before the work by ``validate.image_path`` / ``validate.array_path``). The
    temporaries that a killed earlier write of the same names left are removed first. ``grid``: the
    layout options of ``save_grid`` (ncols, labels, min_cell, ...)."""
    for path in (out, array_to):
        if path:
            remove_stale_temporaries(Path(path).parent, Path(path).name)
    if array_to:
        save_array(images, Path(array_to))
    shown = save_grid(images, Path(out), **grid)
    if shown < len(images):
        kept = f"all {len(images)} are in {array_to}" if array_to else "pass --save-array to keep them all"
        log(f"the grid {out} shows the first {shown} of {len(images)} images (at most {MAX_GRID_PIXELS / 1e6:.1f} "
            f"megapixels); {kept}")


def _write(path: Path, write) -> None:
    try:
        atomic_write(path, write)
    except OSError as e:  # a full disk, a lost permission: one line, and the temporary is gone
        raise NtmError(f"cannot write {path} ({e.strerror or e})") from None
