"""Heat-map animations replay a run's generation as captured (backend/interventions/animations.py unit_maps_SHW):
on a run with negative prompts, a channel's replayed maps hold the token values capture sampled (they would not
without the generation's negative prompt)."""

from __future__ import annotations

import numpy as np
import polars as pl

from backend.interventions.animations import unit_maps_SHW
from backend.run.context import open_run


def test_replayed_maps_are_the_captured_tokens(negative_run):
    root, layer = negative_run
    ctx = open_run(root)
    store, gen_id, units = ctx.store, 1, [0, 5, 63]  # gen 1: the prompt with its own negative prompt
    index = pl.concat([pl.read_parquet(p) for p in sorted(store.activations_dir(layer).glob("part-*.parquet"))])
    tokens = np.concatenate([np.load(p) for p in sorted(store.activations_dir(layer).glob("part-*.npy"))])
    rows = index.with_row_index("row").filter(pl.col("gen_id") == gen_id)
    maps = unit_maps_SHW(ctx, layer, "channel", units, [gen_id] * len(units), 8, 8)  # 64 tokens on an 8x8 grid
    for i, unit in enumerate(units):
        replayed = maps[i].reshape(maps.shape[1], -1)[rows["step"].to_numpy(), rows["position"].to_numpy()]
        recorded = tokens[rows["row"].to_numpy(), unit].astype(np.float32)
        np.testing.assert_allclose(replayed, recorded, rtol=2e-3, atol=2e-3)
