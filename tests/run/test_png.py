"""backend/run/png.py: the PNG bytes capture writes decode (with PIL) to exactly the image given, at any size and
for extreme pixel values (the Sub filter's mod-256 wrap), and a wrong dtype or shape is refused."""

import io

import numpy as np
import pytest
from PIL import Image

from backend.run.png import png_bytes


@pytest.mark.parametrize("shape", [(1, 1, 3), (16, 16, 3), (7, 13, 3), (64, 48, 3)])
def test_decodes_to_the_same_pixels(shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    img[0, :, :] = 255  # a bright pixel left of a dark one wraps below zero in the Sub filter
    img[0, ::2, :] = 0
    with Image.open(io.BytesIO(png_bytes(img))) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), img)


def test_smooth_images_compress():
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (64, 256, 3))
    assert len(png_bytes(ramp)) < ramp.nbytes / 20


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8),
                                 np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4, 3), np.uint8)])
def test_other_arrays_are_refused(bad):
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        png_bytes(bad)
