"""Heat-map overlays: a unit's spatial map, upsampled to the image and alpha-blended over it (PIL + numpy only).

The map is shown where the unit fires: values are clipped at 0 and divided by the map's maximum, so a map's
brightest cell is fully coloured and cells at or below 0 leave the image untouched.

Speed: images are decoded and resized once (`thumbnail`, cached by file and size), blended at display size and sent
as JPEG (Streamlit sends RGB images as JPEG anyway; handing it JPEG bytes avoids a decode and re-encode per image).
"""

from __future__ import annotations

import io

import numpy as np
import streamlit as st
from PIL import Image

# a perceptual dark-to-bright ramp (inferno-like anchors), interpolated to 256 entries
_ANCHORS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                     [250, 193, 39], [252, 255, 164]], np.float32)
LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c])
                for c in range(3)], axis=1).astype(np.uint8)
JPEG_QUALITY = 92


def normalise(heat_HW: np.ndarray) -> np.ndarray:
    """The map clipped at 0 and scaled to [0, 1] by its maximum (all zeros when it never fires)."""
    heat = np.nan_to_num(np.asarray(heat_HW, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    heat = np.clip(heat, 0, None)
    top = float(heat.max()) if heat.size else 0.0
    return heat / top if top > 0 else np.zeros_like(heat)


def display_size(width: int, height: int, target: int) -> tuple[int, int]:
    """(w, h) with the longer side = target, aspect kept."""
    scale = target / max(width, height, 1)
    return max(1, round(width * scale)), max(1, round(height * scale))


def thumbnail(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w, 3], longer side = size: nearest-neighbour when enlarging (small images stay crisp), a box
    filter when reducing (decoding already reduces big JPEGs cheaply)."""
    img = Image.fromarray(np.asarray(image, np.uint8)) if isinstance(image, np.ndarray) else image
    img = img.convert("RGB")
    w, h = display_size(img.width, img.height, size)
    if (w, h) == img.size:
        return np.asarray(img)
    if w >= img.width:
        return np.asarray(img.resize((w, h), Image.Resampling.NEAREST))
    img.draft("RGB", (w, h))  # JPEG: decode at a reduced scale
    return np.asarray(img.resize((w, h), Image.Resampling.BOX))


def blend(base_HW3: np.ndarray, heat_HW: np.ndarray | None, alpha: float = 0.65) -> np.ndarray:
    """The heat-map, upsampled bilinearly to the base image, blended over it (opacity grows with the value)."""
    if heat_HW is None or np.asarray(heat_HW).size == 0:
        return base_HW3
    h, w = base_HW3.shape[:2]
    v = normalise(heat_HW)
    up = np.asarray(Image.fromarray(v.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR), np.float32)
    up = np.clip(up, 0, 1)
    colour = LUT[(up * 255).astype(np.uint8)].astype(np.float32)
    a = (alpha * up)[..., None]
    return (base_HW3.astype(np.float32) * (1 - a) + colour * a).round().clip(0, 255).astype(np.uint8)


def heat_only(heat_HW: np.ndarray, size: int = 192) -> np.ndarray:
    """The heat-map alone, coloured (for examples whose image is missing)."""
    v = normalise(heat_HW)
    return thumbnail(LUT[(v * 255).astype(np.uint8)], size)


def to_jpeg(img_HW3: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img_HW3, np.uint8)).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def to_png(img_HW3: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img_HW3, np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def as_map(values, height: int, width: int) -> np.ndarray | None:
    """A stored heat-map (row-major list) as [height, width]; None when it does not have height x width values."""
    if values is None:
        return None
    arr = np.asarray(values, np.float32)
    if height <= 0 or width <= 0 or arr.size != height * width:
        return None
    return arr.reshape(int(height), int(width))


@st.cache_data(max_entries=4096, show_spinner=False)
def overlay_jpeg(base_HW3: np.ndarray | None, heat: bytes | None, height: int, width: int, size: int = 192,
                 alpha: float = 0.65) -> bytes:
    """JPEG bytes of a display-size image (uint8 array) with a float32 heat-map (raw bytes, row-major height x
    width) blended over it; the heat-map alone when there is no image, a grey tile when there is neither."""
    heat_HW = None if heat is None else as_map(np.frombuffer(heat, np.float32), height, width)
    if base_HW3 is None:
        if heat_HW is None:
            return to_jpeg(np.full((size, size, 3), 230, np.uint8))
        return to_jpeg(heat_only(heat_HW, size))
    return to_jpeg(blend(base_HW3, heat_HW, alpha))
