"""Examples' heat-maps in display form, read lazily: only the maps of the rows a page shows.

The examples table is loaded without its heat-maps (inspector/tables.py HEAVY_COLUMNS), so opening a run reads none
of them. A unit page asks for its few examples' maps; `Database.heatmaps` (inspector/db.py) reads exactly those rows
from the partition's files (the batch job writes examples sorted by unit in 512-row groups, and only the row groups
holding the unit are decoded: inspector/unit_rows.py, about 1-2 ms at Stable Diffusion scale) and this module turns
them into what the overlay draws (`display_maps`: clipped at 0, each map scaled by its own maximum, 8-bit precision).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def display_maps(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat heat-map values (maps of the given lengths, concatenated) as uint8: each map clipped at 0 and scaled by
    its own maximum to 0..255 (what the overlay draws; a map that never fires is all 0)."""
    values = np.nan_to_num(np.asarray(values, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    np.clip(values, 0, None, out=values)
    out = np.zeros(len(values), np.uint8)
    if len(lengths) and (lengths == lengths[0]).all() and lengths[0] > 0:
        maps = values.reshape(len(lengths), int(lengths[0]))
        top = maps.max(axis=1, keepdims=True)
        scaled = np.divide(maps, top, out=np.zeros_like(maps), where=top > 0)
        out[:] = np.rint(scaled * 255).astype(np.uint8).ravel()
        return out
    start = 0
    for n in lengths:
        m = values[start:start + n]
        top = float(m.max()) if n else 0.0
        if top > 0:
            out[start:start + n] = np.rint(m / top * 255).astype(np.uint8)
        start += n
    return out


def display_map(raw) -> np.ndarray:
    """One raw heat-map (a list of floats) in display form, as float32 in [0, 1] (8-bit precision)."""
    values = np.asarray(raw, np.float32)
    return display_maps(values, np.array([len(values)])).astype(np.float32) / 255.0


def maps_by_rank(table: pa.Table) -> dict[int, np.ndarray | None]:
    """{rank: display map as float32 in [0, 1]} of rows (rank, heatmap); None for a row without a map."""
    import pyarrow.compute as pc

    heat = table["heatmap"]
    lengths = pc.fill_null(pc.list_value_length(heat), 0).to_numpy().astype(np.int64)
    values = display_maps(pc.list_flatten(heat).to_numpy(zero_copy_only=False), lengths).astype(np.float32) / 255.0
    ends = np.cumsum(lengths)
    ranks = table["rank"].to_pylist()
    valid = heat.is_valid().to_numpy(zero_copy_only=False)
    return {int(r): (values[e - n:e] if ok else None)
            for r, n, e, ok in zip(ranks, lengths, ends, valid, strict=True)}
