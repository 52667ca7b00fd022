"""inspector/heatmaps.py: heat-maps in display form, the in-memory cache of a partition, and the fallback that reads
a partition too big for it from its file."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from inspector_runs import L_MID


def test_display_maps_scale_each_map_by_its_own_maximum():
    from inspector.heatmaps import display_map, display_maps

    values = np.array([0, 1, 2, 4, -1, 0.5, np.nan, 1, 0, 0], np.float32)
    out = display_maps(values, np.array([4, 4, 2]))
    assert out.dtype == np.uint8
    assert out[:4].tolist() == [0, 64, 128, 255]
    assert out[4:8].tolist() == [0, 128, 0, 255]  # negative and NaN cells clipped to 0
    assert out[8:].tolist() == [0, 0]  # a map that never fires
    ragged = display_maps(np.array([1, 2, 3], np.float32), np.array([1, 2]))
    assert ragged.tolist() == [255, 170, 255]
    assert np.allclose(display_map([0.0, 2.0]), [0.0, 1.0])


def test_heat_cache_finds_maps_by_unit_step_and_rank():
    from inspector.heatmaps import HeatCache, HeatMaps

    table = pa.table({"unit": [3, 1, 1], "step": [-1, 2, -1], "rank": [1, 1, 2],
                      "heatmap": pa.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], pa.list_(pa.float32()))})
    cache = HeatCache.from_table(table)
    assert np.allclose(cache.get(1, 2, 1), [0.0, 1.0])
    assert np.allclose(cache.get(3, -1, 1), [1.0, 0.0])
    assert cache.get(1, -1, 1) is None and cache.get(2, -1, 1) is None
    reads = []
    store = HeatMaps(lambda key, files: reads.append(key) or table)
    assert store.get(("l", "k"), ["f"], cells=6) is not None
    assert store.get(("l", "k"), ["f"], cells=6) is store[("l", "k")] and reads == [("l", "k")]  # read once
    assert store.get(("l", "big"), ["f"], cells=1 << 40) is None and ("l", "big") in store  # never cached


def test_examples_without_the_heatmap_cache(runs_dir, monkeypatch):
    """Partitions too big for the in-memory heat-map cache are read from their file per request, same result."""
    from inspector import heatmaps
    from inspector import queries as q
    from inspector.db import Database

    db = Database(runs_dir / "tiny")
    cached = q.examples.on(db, L_MID, "feature", 2, -1)
    assert db.heatmaps(L_MID, "feature") is not None
    monkeypatch.setattr(heatmaps, "HEATMAP_CACHE_MB", 0)
    other = Database(runs_dir / "tiny")
    direct = q.examples.on(other, L_MID, "feature", 2, -1)
    assert other.heatmaps(L_MID, "feature") is None
    assert direct["rank"].to_list() == cached["rank"].to_list()
    for a, b in zip(direct["heatmap"].to_list(), cached["heatmap"].to_list(), strict=True):
        assert np.allclose(a, b)
