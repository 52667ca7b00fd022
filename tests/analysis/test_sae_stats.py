"""backend/analysis/sae_stats.py: the fixed token sample over shards (seeded, every shard dtype, NaN refused) and
the running metrics against one direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.analysis.sae_stats import SampleStats, sample_batches, sample_rows
from backend.errors import DifflensError
from sae.data import bfloat16_bits
from sae.model import SAE, SAEConfig


def _shards(tmp_path, sizes=(50, 0, 70), d=8, bf16=False):
    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate(sizes):
        x = rng.standard_normal((n, d)).astype(np.float32)
        rows.append(x)
        np.save(tmp_path / f"part-{i:07d}.npy", bfloat16_bits(x) if bf16 else x.astype(np.float16))
    return np.concatenate(rows)


def test_sample_is_seeded_sorted_and_spans_the_shards(tmp_path):
    _shards(tmp_path)
    shards = sorted(tmp_path.glob("part-*.npy"))
    picked = sample_rows(shards, 40, seed=3)
    again = sample_rows(shards, 40, seed=3)
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(picked, again, strict=True))
    assert sum(len(r) for _, r in picked) == 40
    assert [s.name for s, _ in picked] == ["part-0000000.npy", "part-0000002.npy"]  # the empty shard has none
    assert all((np.diff(r) > 0).all() and r.min() >= 0 for _, r in picked)
    everything = sample_rows(shards, 10**6)
    assert [len(r) for _, r in everything] == [50, 70]


@pytest.mark.parametrize("bf16", [False, True])
def test_batches_decode_every_shard_dtype(tmp_path, bf16):
    x = _shards(tmp_path, bf16=bf16)
    got = torch.cat(list(sample_batches(tmp_path, 10**6, batch_size=16)))
    tol = 1e-2 if bf16 else 2e-3
    assert got.shape == (120, 8) and np.allclose(got.numpy(), x, atol=tol * 4, rtol=tol)


def test_nan_tokens_are_a_one_line_error(tmp_path):
    x = np.ones((10, 4), np.float16)
    x[3, 1] = np.nan
    np.save(tmp_path / "part-0000000.npy", x)
    with pytest.raises(DifflensError, match="holds NaN/Inf activations; recapture") as exc:
        list(sample_batches(tmp_path, 100, 4))
    assert "\n" not in str(exc.value)
    with pytest.raises(DifflensError, match="no activation shards"):
        list(sample_batches(tmp_path / "none", 100, 4))


def test_running_sums_equal_one_pass_over_all_rows():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, n_latents=32, k=3))
    x = torch.randn(100, 8) * 2 + 1
    stats = SampleStats(32)
    for chunk in x.split(7):
        stats.add(sae, chunk)
    with torch.no_grad():
        x_hat = sae(x).double()
        codes = sae.encode(x, dense=True)
    xd = x.double()
    assert stats.fvu == pytest.approx(float(((x_hat - xd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()), rel=1e-6)
    assert stats.l0 == pytest.approx(float((codes > 0).sum()) / 100)
    assert np.array_equal(stats.fired, (codes > 0).sum(0).numpy())
