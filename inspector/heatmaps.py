"""The heat-map cache: every heat-map of an examples partition in memory, in display form.

The batch job writes each examples partition as one Parquet row group, so reading one unit's maps means decoding the
whole column (~0.5 s at Stable Diffusion scale). The first request for a (layer, kind) therefore loads every map of
the partition, 8 bits a cell (`display_maps`; ~150 MB for 20,480 features), found by (unit, step, rank) through a
sorted key array (`HeatCache`). Partitions up to HEATMAP_SYNC_BYTES load when first asked for; bigger ones in a
background thread while pages read the rows they need from the file; ones over HEATMAP_CACHE_MB are never cached.
Each run database (inspector/db.py) owns one `HeatMaps`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

HEATMAP_CACHE_MB = int(os.environ.get("DIFFLENS_HEATMAP_CACHE_MB", "1024"))
"""Memory the heat-maps of one (layer, kind) may take in the inspector's cache (one byte a cell); larger
partitions are read from their Parquet file per request instead."""
HEATMAP_SYNC_BYTES = 32 << 20
"""Partitions up to this many cells are loaded when first asked for; bigger ones in a background thread, while
pages read the rows they need from the file (slower) until it is done."""


def heat_key(unit, step, rank) -> np.ndarray:
    """One int64 per (unit, step >= -1, rank): unit in the high bits, then step + 1 and rank (12 bits each)."""
    unit, step, rank = (np.asarray(x, np.int64) for x in (unit, step, rank))
    return (unit << 24) | ((step + 1) << 12) | rank


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
    """One raw heat-map (a list of floats) in display form, as float32 in [0, 1] (8-bit precision, like the cache)."""
    values = np.asarray(raw, np.float32)
    return display_maps(values, np.array([len(values)])).astype(np.float32) / 255.0


@dataclass
class HeatCache:
    """Every heat-map of one examples partition in display form (uint8, see display_maps), found by (unit, step,
    rank) through a sorted key array."""

    keys: np.ndarray
    rows: np.ndarray
    offsets: np.ndarray
    values: np.ndarray

    @classmethod
    def from_table(cls, table: pa.Table) -> HeatCache:
        """From rows (unit, step, rank, heatmap)."""
        import pyarrow.compute as pc

        heat = table["heatmap"]
        lengths = pc.fill_null(pc.list_value_length(heat), 0).to_numpy().astype(np.int64)
        values = display_maps(pc.list_flatten(heat).to_numpy(zero_copy_only=False), lengths)
        keys = heat_key(table["unit"].to_numpy(), table["step"].to_numpy(), table["rank"].to_numpy())
        order = np.argsort(keys, kind="stable")
        return cls(keys[order], order.astype(np.int64), np.concatenate([[0], np.cumsum(lengths)]), values)

    def get(self, unit: int, step: int, rank: int) -> np.ndarray | None:
        key = int(heat_key(unit, step, rank))
        i = int(np.searchsorted(self.keys, key))
        if i >= len(self.keys) or self.keys[i] != key:
            return None
        row = self.rows[i]
        return self.values[self.offsets[row]:self.offsets[row + 1]].astype(np.float32) / 255.0

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.rows.nbytes + self.offsets.nbytes + self.values.nbytes)


class HeatMaps:
    """The heat-map caches of one run, by (layer, kind); None for a partition too big to cache. `read(key, files)`
    returns the partition's rows (unit, step, rank, heatmap) as an Arrow table."""

    def __init__(self, read: Callable[[tuple[str, str], list[str]], pa.Table]):
        self.read = read
        self.done: dict[tuple[str, str], HeatCache | None] = {}
        self.loading: dict[tuple[str, str], threading.Thread] = {}
        self.lock = threading.Lock()
        self.load_lock = threading.Lock()

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.done

    def __getitem__(self, key: tuple[str, str]) -> HeatCache | None:
        return self.done[key]

    def get(self, key: tuple[str, str], files: list[str], cells: int, wait: bool = True) -> HeatCache | None:
        """The cache of a partition of `cells` heat-map cells in all, loading it on first use (see the module
        docstring); None when it is too big, or (wait=False) while a big one is still loading."""
        if key in self.done:
            return self.done[key]
        if cells > HEATMAP_CACHE_MB << 20:
            self.done[key] = None
            return None
        if wait or cells <= HEATMAP_SYNC_BYTES:
            return self._load(key, files)
        with self.lock:
            if key not in self.loading:
                self.loading[key] = threading.Thread(target=self._load, args=(key, files), daemon=True,
                                                     name=f"heatmaps {key[0]}/{key[1]}")
                self.loading[key].start()
        return self.done.get(key)

    def _load(self, key: tuple[str, str], files: list[str]) -> HeatCache | None:
        with self.load_lock:
            if key in self.done:
                return self.done[key]
            cache = HeatCache.from_table(self.read(key, files))
            self.done[key] = cache
            return cache
