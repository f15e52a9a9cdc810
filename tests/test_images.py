"""Image grids (ntm_edge.images): padding between cells, exact nearest upscaling, prompt labels per row."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ntm_edge.images import LABEL_BACKGROUND, LABEL_INK, MIN_CELL, PAD_VALUE, draw_label, make_grid, save_grid


def _images(n: int, size: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def test_cells_are_exact_nearest_upscales_framed_by_grey_padding():
    images = _images(6, 28)
    grid = make_grid(images, ncols=3)  # 28 px -> x3 = 84 px cells (the least factor reaching 64)
    s, cell = 3, 84
    assert grid.shape == (2 * (cell + 1) + 1, 3 * (cell + 1) + 1, 1)
    for i, img in enumerate(images):
        r, q = divmod(i, 3)
        top, left = 1 + r * (cell + 1), 1 + q * (cell + 1)
        block = grid[top : top + cell, left : left + cell, 0]
        np.testing.assert_array_equal(block, np.kron(img[:, :, 0], np.ones((s, s), dtype=np.uint8)))
    lines_y = [0, cell + 1, 2 * (cell + 1)]
    lines_x = [0, cell + 1, 2 * (cell + 1), 3 * (cell + 1)]
    assert (grid[lines_y] == PAD_VALUE).all() and (grid[:, lines_x] == PAD_VALUE).all()


def test_padding_is_visible_between_black_images_and_can_be_wider():
    grid = make_grid(np.zeros((4, 8, 8, 1), np.uint8), ncols=2, pad=3)
    cell = 64  # 8 px x8
    assert grid.shape[:2] == (2 * cell + 3 * 3, 2 * cell + 3 * 3)
    gap = grid[:, 3 + cell : 3 + cell + 3, 0]  # the column gap between the two cells
    assert (gap == PAD_VALUE).all() and (grid[3 : 3 + cell, 3 : 3 + cell] == 0).all()


@pytest.mark.parametrize(("size", "min_cell", "scale"), [(8, MIN_CELL, 8), (28, MIN_CELL, 3), (28, 28, 1),
                                                         (8, 100, 13), (100, MIN_CELL, 1)])
def test_min_cell_sets_the_least_integer_scale(size, min_cell, scale):
    img = _images(1, size)
    grid = make_grid(img, min_cell=min_cell)
    assert grid.shape[:2] == (size * scale + 2, size * scale + 2)
    np.testing.assert_array_equal(grid[1:-1, 1:-1], img[0].repeat(scale, 0).repeat(scale, 1))


def test_labels_are_drawn_in_a_band_under_each_row():
    images = _images(4, 8, channels=3)
    plain = make_grid(images, ncols=2)
    grid = make_grid(images, ncols=2, labels=["seven", "the number 3"])
    band_h = grid.shape[0] - plain.shape[0]
    assert band_h > 0 and band_h % 2 == 0 and grid.shape[1] == plain.shape[1]
    h = band_h // 2
    row = 64 + 1 + h  # one row: cells, label band, padding
    for r, text in enumerate(["seven", "the number 3"]):
        band = grid[1 + r * row + 64 : 1 + r * row + 64 + h, 1:-1]  # (h, width - 2, 3)
        assert set(np.unique(band)) == {LABEL_BACKGROUND, LABEL_INK}
        ink_cols = np.flatnonzero((band == LABEL_INK).any(axis=(0, 2)))
        np.testing.assert_array_equal(band[..., 0], draw_label(text, band.shape[1], h))
        assert ink_cols.max() > ink_cols.min() + 5 * len(text) // 2  # the text spans many columns
        # the cells above are untouched by the label
        np.testing.assert_array_equal(grid[1 + r * row : 1 + r * row + 64, 1:65], images[2 * r].repeat(8, 0).repeat(8, 1))
    longer = draw_label("the number 3", 200, h)
    assert (longer == LABEL_INK).any(axis=0).sum() > (draw_label("seven", 200, h) == LABEL_INK).any(axis=0).sum()


def test_a_label_too_wide_is_cut_to_fit_and_a_wrong_count_is_refused():
    wide = draw_label("a handwritten seven " * 10, 60, 15)
    assert wide.shape == (15, 60) and (wide == LABEL_INK).any()
    with pytest.raises(ValueError, match="2 labels for a grid of 1 rows"):
        make_grid(_images(2, 8), ncols=2, labels=["a", "b"])


def test_save_grid_writes_the_labelled_grid(tmp_path):
    images = _images(6, 8)
    shown = save_grid(images, tmp_path / "g.png", ncols=3, labels=["one", "two"])
    assert shown == 6
    with Image.open(tmp_path / "g.png") as img:
        np.testing.assert_array_equal(np.asarray(img), make_grid(images, ncols=3, labels=["one", "two"])[..., 0])
