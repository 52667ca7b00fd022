"""backend/run/query.py: DuckDB views over a run's tables (`python cli.py query`)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from backend.run.query import connect
from backend.run.store import RunStore


def test_a_partitioned_table_whose_partitions_differ_in_later_columns_reads_them_all(tmp_path):
    """A run whose analysis redid one partition after a column was added (`units.label_step`) holds files with
    and without it: the view has the column, null where a file lacks it, and every partition's rows."""
    store = RunStore(tmp_path / "run")
    store.write_manifest({"config": {"model": "demo"}})
    full = {"unit": np.arange(3, dtype=np.int32), "density": np.full(3, 0.5, np.float32),
            "mean": np.zeros(3, np.float32), "max": np.ones(3, np.float32),
            "peak_steps": pa.array([[1]] * 3, pa.list_(pa.int16())), "first_active": np.zeros(3, np.int16),
            "last_active": np.ones(3, np.int16), "active_steps": np.full(3, 2, np.int16),
            "dead": np.zeros(3, bool), "dense": np.zeros(3, bool), "label": ["colour=red", None, None],
            "label_confidence": np.array([0.9, np.nan, np.nan], np.float32),
            "label_step": np.array([2, -1, -1], np.int16)}
    store.write_table_shard("units", "part-0000000", pa.table(full), layer="a", kind="channel")
    old = pa.table({k: v for k, v in full.items() if k != "label_step"})  # written before label_step existed
    path = store.partition_dir("units", "b", "channel") / "part-0000000.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(old, path)
    rows = connect(store.root).execute("SELECT layer, unit, label_step FROM units ORDER BY layer, unit").fetchall()
    assert rows == [("a", 0, 2), ("a", 1, -1), ("a", 2, -1), ("b", 0, None), ("b", 1, None), ("b", 2, None)]
