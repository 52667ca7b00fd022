"""inspector/heatmaps.py and `Database.heatmaps`: heat-maps in display form, read lazily (only the rows a page shows;
opening a run reads none)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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


def test_maps_by_rank_in_display_form():
    from inspector.heatmaps import maps_by_rank

    table = pa.table({"rank": pa.array([2, 1, 3], pa.int32()),
                      "heatmap": pa.array([[1.0, 0.0], [0.0, 2.0], None], pa.list_(pa.float32()))})
    maps = maps_by_rank(table)
    assert sorted(maps) == [1, 2, 3]
    assert np.allclose(maps[1], [0.0, 1.0]) and np.allclose(maps[2], [1.0, 0.0]) and maps[3] is None


def test_a_units_heatmaps_are_read_for_its_rows_only(runs_dir):
    """The maps of one unit's examples, the same as the stored ones in display form, and nothing else is read."""
    from inspector import queries as q
    from inspector.db import Database
    from inspector.heatmaps import display_map

    db = Database(runs_dir / "tiny")
    for table in ("units", "examples", "generations", "profiles", "peaks"):
        db.load(table)
    assert db.heatmap_rows_read == 0  # loading the tables reads no heat-map
    shown = q.examples.on(db, L_MID, "feature", 2, -1, 1, 3)
    assert db.heatmap_rows_read == shown.height == 3
    files = db.partition_files("examples", L_MID, "feature")
    stored = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
    raw = {r["rank"]: r["heatmap"] for r in stored if r["unit"] == 2 and r["step"] == -1}
    for rank, heat in zip(shown["rank"].to_list(), shown["heatmap"].to_list(), strict=True):
        assert np.allclose(heat, display_map(raw[rank]))
    assert q.examples.on(db, L_MID, "feature", 2, -1, 90, 99).is_empty() and db.heatmap_rows_read == 3


def test_a_corrupt_examples_file_is_a_one_line_error(runs_dir, tmp_path):
    import shutil

    import pytest

    from inspector.db import Database
    from inspector.runs import RunError

    shutil.copytree(runs_dir / "tiny", tmp_path / "run")
    db = Database(tmp_path / "run")
    db.load("examples")
    path = db.partition_files("examples", L_MID, "feature")[0]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(RunError, match=r"examples of .* cannot be read \(a corrupt or partially written file\?\)"):
        db.heatmaps(L_MID, "feature", 2, -1, 1, 3)
