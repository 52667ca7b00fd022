"""inspector/unit_rows.py: one unit's rows read by row group equal a full filter, whatever the file's layout."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from inspector import unit_rows
from inspector.unit_rows import read_unit, unit_index


def examples(n_units: int, per_unit: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    units = np.repeat(np.arange(n_units, dtype=np.int32), per_unit)
    maps = rng.random((len(units), 4), dtype=np.float32)
    return pa.table({"unit": units, "step": np.tile(np.arange(per_unit, dtype=np.int16), n_units),
                     "rank": np.tile(np.arange(per_unit, dtype=np.int32), n_units),
                     "heatmap": pa.array(list(maps), pa.list_(pa.float32()))})


@pytest.mark.parametrize("row_group, statistics", [(7, True), (64, True), (10_000, True), (7, False)])
def test_one_units_rows_equal_a_full_filter(tmp_path, row_group, statistics):
    table = examples(50, 5)
    path = str(tmp_path / "e.parquet")
    pq.write_table(table, path, row_group_size=row_group, write_statistics=statistics)
    index = unit_index(path)
    assert index.complete == statistics
    for unit in (0, 3, 17, 49, 50, -1):
        got = read_unit(path, unit, ["step", "rank", "heatmap"])
        want = table.filter(pc.equal(table["unit"], unit)).select(["step", "rank", "heatmap"])
        assert got.equals(want), unit
        if statistics and 0 <= unit < 50:  # a unit's 5 rows span at most 2 groups of 7
            assert len(index.row_groups(unit)) <= (2 if row_group == 7 else 1)


def test_a_rewritten_file_is_indexed_again(tmp_path):
    path = str(tmp_path / "e.parquet")
    pq.write_table(examples(10, 3), path, row_group_size=4)
    assert read_unit(path, 2, ["rank"]).num_rows == 3
    pq.write_table(examples(10, 6), path, row_group_size=4)
    os.utime(path, ns=(1, 1))  # a new mtime even on a coarse clock
    assert read_unit(path, 2, ["rank"]).num_rows == 6


def test_the_index_cache_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(unit_rows, "CACHED_FILES", 3)
    for i in range(5):
        path = str(tmp_path / f"e{i}.parquet")
        pq.write_table(examples(4, 2, seed=i), path)
        unit_index(path)
    assert len(unit_rows._indexes) <= 3
