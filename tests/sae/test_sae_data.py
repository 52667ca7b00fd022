"""The shuffling shard reader: property tests for coverage, determinism and resume; bad shards."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sae.data import ReaderState, SAEDataError, ShardReader


def write_shards(tmp_path, sizes, d=4):
    paths, start = [], 0
    for i, n in enumerate(sizes):
        rows = np.arange(start, start + n, dtype=np.float16)[:, None].repeat(d, 1)
        p = tmp_path / f"part-{i:07d}.npy"
        np.save(p, rows)
        paths.append(p)
        start += n
    return paths


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=6), batch=st.integers(1, 64),
       chunk=st.integers(8, 128), window=st.integers(1, 6), seed=st.integers(0, 5))
def test_an_epoch_yields_each_row_at_most_once_and_resume_is_exact(tmp_path_factory, sizes, batch, chunk, window,
                                                                     seed):
    tmp = tmp_path_factory.mktemp("shards")
    paths = write_shards(tmp, sizes)
    total = sum(sizes)
    if total < batch:
        with pytest.raises(SAEDataError, match="fewer than one batch"):
            ShardReader(paths, batch)
        return
    reader = ShardReader(paths, batch, seed=seed, chunk_rows=chunk, window_chunks=window)
    it = iter(reader)
    seen, states = [], []
    try:
        while reader.state.epoch == 0 and len(seen) < 10_000:
            states.append(ReaderState(**vars(reader.state)))
            seen.append(next(it)[:, 0].numpy().astype(int))
    except SAEDataError:
        return  # no window fills a batch: a clear error, not a hang
    rows = np.concatenate(seen[:-1]) if len(seen) > 1 else np.array([], dtype=int)
    assert len(set(rows.tolist())) == len(rows) and (rows < total).all()
    if len(seen) > 2:
        mid = len(seen) // 2
        resumed = ShardReader(paths, batch, seed=seed, chunk_rows=chunk, window_chunks=window)
        resumed.state = states[mid]
        again = next(iter(resumed))[:, 0].numpy().astype(int)
        assert np.array_equal(again, seen[mid])


def test_nan_shard_is_named(tmp_path):
    paths = write_shards(tmp_path, [100, 100])
    bad = np.load(paths[1])
    bad[37, 2] = np.nan
    np.save(paths[1], bad)
    reader = ShardReader(paths, 50)
    with pytest.raises(SAEDataError, match=r"part-0000001.npy holds NaN/Inf activations \(first at row 37\)"):
        for _ in range(10):
            next(iter(reader))


def test_empty_and_mismatched_shards(tmp_path):
    with pytest.raises(SAEDataError, match="no activation shards"):
        ShardReader.from_dir(tmp_path, 8)
    np.save(tmp_path / "part-0000000.npy", np.zeros((10, 4), np.float16))
    np.save(tmp_path / "part-0000001.npy", np.zeros((10, 5), np.float16))
    with pytest.raises(SAEDataError, match="one width"):
        ShardReader.from_dir(tmp_path, 8)
