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


# ------------------------------------------------------------------------------------------------ shard dtypes
def test_bfloat16_bits_round_to_nearest_even_like_torch():
    import torch

    from sae.data import bfloat16_bits, from_bfloat16_bits

    x = np.concatenate([np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 65504.0, 1e5, -3.4e38, np.inf, -np.inf,
                                  1e-40], np.float32),
                        np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 1e4])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bfloat16_bits(x), want)
    assert np.array_equal(from_bfloat16_bits(want), torch.from_numpy(want.view(np.int16)).view(torch.bfloat16)
                          .float().numpy())
    assert np.isnan(from_bfloat16_bits(bfloat16_bits(np.array([np.nan], np.float32)))).all()


def test_bfloat16_shards_are_read_as_their_values(tmp_path):
    """A bfloat16 shard (uint16 bit patterns, meta.json "dtype": "bfloat16") holds values beyond float16's
    65504: the reader returns them exactly, as float32."""
    import json

    from sae.data import bfloat16_bits, from_bfloat16_bits

    values = (np.random.default_rng(1).standard_normal((64, 4)) * 1e5).astype(np.float32)
    bits = bfloat16_bits(values)
    np.save(tmp_path / "part-0000000.npy", bits)
    (tmp_path / "meta.json").write_text(json.dumps({"d": 4, "dtype": "bfloat16", "count": 64}))
    reader = ShardReader.from_dir(tmp_path, 64, chunk_rows=64)
    batch = next(iter(reader)).numpy()
    want = from_bfloat16_bits(bits)
    assert np.abs(want).max() > 65504
    assert sorted(map(tuple, batch)) == sorted(map(tuple, want))  # every row, shuffled, bit for bit
    mean, _ = reader.estimate_stats()
    np.testing.assert_allclose(mean, want.mean(0), rtol=1e-5)


def test_a_shard_of_another_dtype_than_its_meta_is_refused(tmp_path):
    import json

    np.save(tmp_path / "part-0000000.npy", np.zeros((10, 4), np.float16))
    (tmp_path / "meta.json").write_text(json.dumps({"d": 4, "dtype": "bfloat16", "count": 10}))
    with pytest.raises(SAEDataError, match=r"part-0000000.npy holds float16.*meta.json says bfloat16"):
        ShardReader.from_dir(tmp_path, 8)
    np.save(tmp_path / "part-0000000.npy", np.zeros((10, 4), np.int32))
    (tmp_path / "meta.json").unlink()
    with pytest.raises(SAEDataError, match="int32"):
        ShardReader.from_dir(tmp_path, 8)
