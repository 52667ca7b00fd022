"""PNG bytes of a uint8 RGB image, encoded directly with zlib: the per-generation images capture writes.

PIL's PNG writer spends ~0.3 ms of Python per image (plugin dispatch, the ImageFile machinery) holding the GIL; on a
tiny model capture's writer thread then holds up the generating thread (benchmarks/capture_overhead.py). This is a
standard 8-bit RGB PNG (signature, IHDR, one IDAT, IEND): every row filtered with Sub (each byte minus the same
channel of the pixel to its left, mod 256), deflated at zlib level 6 (PIL's default; zlib releases the GIL while it
compresses). Any PNG reader decodes it to exactly the array given.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUB_FILTER = 1
LEVEL = 6


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def png_bytes(img_HW3: np.ndarray, level: int = LEVEL) -> bytes:
    """The PNG file of a uint8 [H, W, 3] array (a ValueError for another dtype or shape)."""
    img = np.asarray(img_HW3)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or 0 in img.shape:
        raise ValueError(f"png_bytes takes a non-empty uint8 [H, W, 3] image, got {img.dtype} {img.shape}")
    h, w, _ = img.shape
    rows = np.ascontiguousarray(img).reshape(h, w * 3)
    filtered = np.empty((h, 1 + w * 3), np.uint8)
    filtered[:, 0] = SUB_FILTER
    filtered[:, 1:4] = rows[:, :3]
    np.subtract(rows[:, 3:], rows[:, :-3], out=filtered[:, 4:])  # uint8 arithmetic wraps: mod 256
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, adaptive filters, no interlace
    return (SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(filtered.tobytes(), level))
            + _chunk(b"IEND", b""))
