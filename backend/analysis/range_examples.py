"""Examples across the activation range (the sae-vis convention): beside a unit's top examples, generations
sampled from equal-width bins of its activation over (0, max], so one sees whether the unit means the same thing
at low activation as at the top.

A generation's activation is the example statistic maximised over steps (as the top examples rank them); bin b of
B (1 = lowest, B = the top bin) holds the generations with activation in (max (b - 1) / B, max b / B]. From each
bin cfg.range_per_bin generations are taken, deterministically: sorted by activation, the ones at evenly spaced
ranks (the j-th of k at rank floor((j + 1/2) n / k) of the bin's n), all of them when the bin has no more. All in
numpy over a chunk of units at once.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def range_examples(best_UN: np.ndarray, step_UN: np.ndarray, gen_ids: np.ndarray, first_unit: int, bins: int,
                   per_bin: int) -> pa.Table:
    """Rows (unit, bin, lo, hi, gen_id, step, activation) of a chunk of units, sorted by (unit, bin,
    activation)."""
    n_units, n_gens = best_UN.shape
    top_U = best_UN.max(1, initial=0.0)
    u, g = np.nonzero(best_UN > 0)
    act = best_UN[u, g]
    b = np.clip(np.ceil(act / top_U[u] * bins), 1, bins).astype(np.int64)
    order = np.lexsort((g, act, b, u))
    u, g, act, b = u[order], g[order], act[order], b[order]
    key = u * bins + (b - 1)
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, len(key)])
    take = np.minimum(sizes, per_bin)
    group = np.repeat(np.arange(len(starts)), take)
    j = np.arange(take.sum()) - np.repeat(np.cumsum(take) - take, take)
    picked = starts[group] + np.floor((j + 0.5) * sizes[group] / take[group]).astype(np.int64)
    u, g, act, b = u[picked], g[picked], act[picked], b[picked]
    width = top_U[u] / bins
    return pa.table({
        "unit": (u + first_unit).astype(np.int32),
        "bin": b.astype(np.int16),
        "lo": (width * (b - 1)).astype(np.float32),
        "hi": (width * b).astype(np.float32),
        "gen_id": gen_ids[g].astype(np.int32),
        "step": step_UN[u, g].astype(np.int16),
        "activation": act.astype(np.float32),
    })
