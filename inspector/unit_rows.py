"""One unit's rows of a Parquet file, read by its row groups' `unit` statistics: the heat-maps a unit page shows.

The run format sorts a layer's tables by unit and keeps the examples table in small row groups
(docs/run-format.md, Parquet), so one unit's examples sit in one or two row groups. A SQL engine scanning the file
still plans a task per row group (about a thousand at Stable Diffusion scale), which costs more than decoding the
one group that matters; here each file's footer is parsed once (`unit_index`, cached by path, size and mtime) and only
the row groups whose [min, max] unit covers the unit are decoded (pyarrow). A file without unit statistics is read
whole, still filtered to the unit.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

CACHED_FILES = 64


@dataclass(frozen=True)
class UnitIndex:
    """A Parquet file's footer and the unit range of each row group (None: a row group without statistics)."""

    metadata: pq.FileMetaData
    low: np.ndarray
    high: np.ndarray
    complete: bool
    """Every row group has unit statistics (otherwise every row group is read)."""

    def row_groups(self, unit: int) -> list[int]:
        if not self.complete:
            return list(range(self.metadata.num_row_groups))
        return np.nonzero((self.low <= unit) & (self.high >= unit))[0].tolist()


_indexes: OrderedDict[tuple[str, int, int], UnitIndex] = OrderedDict()
_lock = threading.Lock()


def unit_index(path: str) -> UnitIndex:
    """The file's UnitIndex, parsed once per (path, size, mtime) (a small LRU shared by every session)."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _indexes:
            _indexes.move_to_end(key)
            return _indexes[key]
    metadata = pq.read_metadata(path)
    column = metadata.schema.to_arrow_schema().get_field_index("unit")
    n = metadata.num_row_groups
    low, high, complete = np.zeros(n, np.int64), np.zeros(n, np.int64), column >= 0
    for i in range(n if complete else 0):
        stats = metadata.row_group(i).column(column).statistics
        if stats is None or not stats.has_min_max:
            complete = False
            break
        low[i], high[i] = stats.min, stats.max
    index = UnitIndex(metadata, low, high, bool(complete))
    with _lock:
        _indexes[key] = index
        while len(_indexes) > CACHED_FILES:
            _indexes.popitem(last=False)
    return index


def read_unit(path: str, unit: int, columns: list[str]) -> pa.Table:
    """The file's rows of `unit` (its columns `columns`), decoding only the row groups that can hold them."""
    index = unit_index(path)
    groups = index.row_groups(unit)
    wanted = list(dict.fromkeys([*columns, "unit"]))
    if not groups:
        schema = index.metadata.schema.to_arrow_schema()
        return pa.table({c: pa.array([], schema.field(c).type) for c in columns})
    table = pq.ParquetFile(path, metadata=index.metadata).read_row_groups(groups, columns=wanted)
    return table.filter(pc.equal(table["unit"], unit)).select(columns)
