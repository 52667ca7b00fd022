"""The Lab's painted mask (inspector/live.py painted_mask): canvas strokes as a mask over the layer's token grid, and
that mask laid over the tokens by the steering's own code (backend/interventions/masks.py), painted cells only. The
page itself, painting in chromium, is tested in test_inspector_browser.py."""

from __future__ import annotations

import numpy as np
import pytest


def test_strokes_become_the_painted_share_of_each_cell():
    from inspector.live import painted_mask

    alpha = np.zeros((320, 320), np.uint8)  # a 320 px canvas over a 4 x 4 grid: 80 px a cell
    alpha[0:80, 0:80] = 153  # cell (0, 0) fully painted (a semi-transparent stroke colour)
    alpha[80:120, 240:320] = 255  # half of cell (1, 3)
    mask = painted_mask(alpha, (4, 4))
    assert mask.shape == (4, 4) and mask.dtype == np.float32
    expected = np.zeros((4, 4), np.float32)
    expected[0, 0], expected[1, 3] = 1.0, 0.5
    assert np.allclose(mask, expected, atol=1e-6)
    assert painted_mask(np.zeros((320, 320), np.uint8), (4, 4)) is None  # nothing painted: no mask


def test_a_canvas_of_another_size_or_shape_maps_to_the_grid():
    from inspector.live import painted_mask

    alpha = np.zeros((640, 640), np.uint8)  # a HiDPI canvas: twice the pixels
    alpha[:, 320:] = 255
    assert np.array_equal(painted_mask(alpha, (2, 4)), np.array([[0, 0, 1, 1], [0, 0, 1, 1]], np.float32))


@pytest.mark.parametrize("grid", [(4, 4), (8, 8)])
def test_the_painted_mask_weights_only_the_painted_tokens(grid):
    from backend.interventions.masks import token_weights
    from inspector.live import painted_mask

    alpha = np.zeros((320, 320), np.uint8)
    alpha[10:60, 10:150] = 200  # top-left stroke
    mask = painted_mask(alpha, grid)
    weights = token_weights(mask, grid[0] * grid[1], 1).numpy().reshape(grid)
    assert np.array_equal(weights > 0, mask > 0)
    rows, cols = np.nonzero(weights)
    assert rows.max() < grid[0] // 2 and cols.max() < grid[1] // 2 + 1  # stays top-left
