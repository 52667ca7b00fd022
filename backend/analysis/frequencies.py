"""Frequencies: each unit's activation frequency per prompt group.

freq is the share of the group's (generation, step) pairs in which the unit is active (the same "active" as
profiles), i.e. the per-step share of the group's generations, averaged over steps; mean is the pooled
activity averaged the same way. `generations` is the group's size, so counts can be recovered for tests of
proportions (compare.py).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from backend.analysis.profiles import Counts


def frequencies_table(counts: Counts, groups: list[str]) -> pa.Table:
    """Rows (unit, group, freq, mean, generations), sorted by (unit, group)."""
    u, s, g = counts.active_USG.shape
    pairs_G = np.maximum(counts.gens_G * s, 1)
    freq_UG = counts.active_USG.sum(1) / pairs_G
    mean_UG = counts.sum_USG.sum(1) / pairs_G
    return pa.table({
        "unit": np.repeat(np.arange(u, dtype=np.int32), g),
        "group": np.tile(np.array(groups, dtype=object), u),
        "freq": freq_UG.ravel().astype(np.float32),
        "mean": mean_UG.ravel().astype(np.float32),
        "generations": np.tile(counts.gens_G.astype(np.int32), u),
    })
