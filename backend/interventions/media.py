"""What run-level interventions write: table rows, images, grids, and the digests that name them.

This module owns
  - `digest`: a short hash of an intervention's settings; it names the intervention's table shard and media folder,
    so a repeat with the same settings replaces its files rather than adding new ones;
  - `safe_name` (a layer or preset name as a path component), `write_grid` (a captioned grid PNG of a run's images);
  - `to_json` (the JSON columns: attributes, changes), `with_partition` (a written shard as a frame with its
    layer / kind partition columns, as read_table returns it);
  - `InterventionResult`, what a run-level steering or edit returns;
  - `thumbnail_jpeg` / `write_with_thumbnail`: an atlas image's small JPEG beside its PNG (schema.atlas_thumbnail).

Table shards and PNGs go through RunStore (atomic temp + rename), at paths derived from the digest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from backend.run.store import RunStore


@dataclass
class InterventionResult:
    """What a run-level intervention wrote: its rows (as in the table), the grid PNG and the table shard."""

    rows: pl.DataFrame
    grid: Path
    shard: Path
    extra: dict = field(default_factory=dict)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def safe_name(name: str) -> str:
    return name.replace("/", "_").replace("=", "-").replace(" ", "_")


def write_grid(store: RunStore, rel: str, images_NHW3: np.ndarray, labels: list[str], cols: int) -> Path:
    from backend.grid import labelled_grid

    store.write_png(rel, labelled_grid(np.asarray(images_NHW3), labels, cols=max(1, cols)))
    return store.root / rel


def to_json(obj) -> str | None:
    return None if obj is None else json.dumps(obj, sort_keys=True)


def with_partition(table: pa.Table, layer: str, kind: str) -> pl.DataFrame:
    return pl.from_arrow(table).with_columns(layer=pl.lit(layer), kind=pl.lit(kind))


THUMB_QUALITY = 85
"""JPEG quality of the atlas thumbnails."""


def thumbnail_jpeg(image) -> bytes:
    """An image (uint8 [H, W, 3] array or PIL image) as a JPEG whose longer side is schema.ATLAS_THUMB_PX at most
    (a box filter when reducing; a smaller image keeps its size)."""
    import io

    from PIL import Image

    from backend.run.schema import ATLAS_THUMB_PX

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    img = img.convert("RGB")
    scale = ATLAS_THUMB_PX / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BOX)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=THUMB_QUALITY)
    return buf.getvalue()


def write_with_thumbnail(store: RunStore, rel: str, image_HW3: np.ndarray) -> str:
    """Write an atlas image as a PNG at rel and its thumbnail at schema.atlas_thumbnail(rel); returns rel."""
    from backend.fileio import atomic_write_bytes
    from backend.run.schema import atlas_thumbnail

    written = store.write_png(rel, image_HW3)
    atomic_write_bytes(store.root / atlas_thumbnail(written), thumbnail_jpeg(image_HW3))
    return written
