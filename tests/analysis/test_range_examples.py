"""Examples across the activation range (backend/analysis/range_examples.py): bins cover (0, max], are ordered,
and the sampled generations are the evenly spaced ones of each bin, against a per-unit brute force."""

import numpy as np
import polars as pl
import pytest

from backend.analysis.range_examples import range_examples


def brute(best_N, bins, per_bin):
    top = best_N.max()
    bin_of = [min(bins, max(1, int(np.ceil(v / top * bins)))) if v > 0 else 0 for v in best_N]  # (lo, hi]
    out = []
    for b in range(1, bins + 1):
        inside = [g for g in range(len(best_N)) if bin_of[g] == b]
        inside.sort(key=lambda g: (best_N[g], g))
        n, k = len(inside), min(len(inside), per_bin)
        out += [(b, inside[int(np.floor((j + 0.5) * n / k))]) for j in range(k)]
    return out


@pytest.mark.parametrize("seed", range(4))
def test_range_bins_cover_the_range_in_order_and_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_units, n_gens, bins, per_bin = 6, 40, 5, 3
    best = rng.random((n_units, n_gens)) ** 3 * rng.uniform(0.5, 5, (n_units, 1))
    best[rng.random(best.shape) < 0.3] = 0.0  # inactive generations are never sampled
    best[4] = 0.0  # a dead unit has no rows
    best = best.astype(np.float32)
    steps = rng.integers(0, 9, best.shape)
    gen_ids = np.arange(100, 100 + n_gens)
    table = pl.from_arrow(range_examples(best, steps, gen_ids, 10, bins, per_bin))
    assert 14 not in table["unit"].to_list()
    for u in range(n_units):
        mine = table.filter(pl.col("unit") == u + 10)
        if u == 4:
            continue
        top = best[u].max()
        assert mine["bin"].is_sorted() and mine["bin"].min() >= 1 and mine["bin"].max() == bins
        assert (mine["lo"] < mine["hi"]).all()
        assert ((mine["activation"] > mine["lo"]) & (mine["activation"] <= mine["hi"] * (1 + 1e-6))).all()
        assert mine.filter(pl.col("bin") == bins)["hi"][0] == pytest.approx(top)
        assert mine["lo"].min() == 0.0
        got = [(b, g - 100) for b, g in zip(mine["bin"].to_list(), mine["gen_id"].to_list(), strict=True)]
        assert got == brute(best[u], bins, per_bin)
        assert mine["step"].to_list() == [int(steps[u, g]) for _, g in got]


def test_a_bin_with_few_generations_gives_all_and_an_empty_bin_none():
    best = np.array([[10.0, 9.5, 1.0, 0.0, 9.9]], np.float32)
    table = pl.from_arrow(range_examples(best, np.zeros((1, 5), np.int16), np.arange(5), 0, 5, 2))
    assert table.select("bin", "gen_id").rows() == [(1, 2), (5, 1), (5, 0)]  # bins 2-4 empty; top bin: 2 of 3
