"""Inspector latency on a synthetic run shaped like Stable Diffusion: unit-page queries and full unit-page runs.

    python benchmarks/inspector_latency.py [--out DIR] [--features 20480] [--steps 50] [--generations 10000]
                                           [--density 0.002] [--row-group-size 0] [--units 200] [--page-runs 30]

The run (written once under --out and reused while the shape arguments are the same): one SD 1.5 hook point
(`up_blocks.1.attentions.1`, 16x16 tokens) with --features SAE features, --steps denoising steps and --generations
images in 4 prompt groups; sparse feature activity (each feature active in a log-uniform 0.01%..1% of (generation,
step) pairs, 5% dead; mean --density), shards of 32 generations like capture writes them; profiles, frequencies,
peaks and units from that activity with the backend's own functions; top examples (8 over all steps + 8 per peak)
with 16x16 heat-maps; comparisons of every group pair; concepts; SAE curves; interventions, dreams and ablations for
a few units; the `histograms` table, computed from that activity by the backend's own function as analysis does; an
`atlas` of every unit (4 prior seeds; 2 dream variants x 2 seeds, each dream with a GIF); 512x512 PNG images (48
distinct pictures, hard-linked so that each generation, prior and dream has its own file).
Tables are written through RunStore, i.e. exactly as the batch job writes them
(row groups of RunStore's ROW_GROUP_ROWS rows); --row-group-size N rewrites the large tables with N-row groups
instead, to measure that layout.

Measured:
  - first open of the run: its database and every table the unit page reads loaded into DuckDB (no heat-map:
    those are read per unit page);
  - each unit-page query (inspector/queries/, uncached: the SQL runs every time) over --units random live units:
    p50 / p95 / max, after the run's tables are loaded (the one-time load is reported separately);
  - the unit page's full script run under streamlit.testing AppTest: --page-runs clicks on "Next" (a new unit each
    time: every query misses the cache), and reruns of the same unit (warm cache);
  - with --browser N: N clicks on Next in Debian's chromium (playwright) against a served app, until the new unit
    and its example images are shown;
  - the Atlas page: its grid query (uncached) and full script runs (AppTest), and with --browser its first grid in
    chromium (until the page's 48 tiles, prior and dream each, are shown; and until its heading shows): loaded by
    URL on a fresh server (cold), opened from the sidebar on a fresh server, and loaded by URL on a server that has
    the run open (browser_atlas); and a blank Streamlit page by URL in the same harness, the floor of any page
    opened by URL (browser_blank).
The activation histogram is read from the `histograms` table; its scan of the activity (what a run without that table
costs, on request) is reported apart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYER, KIND = "up_blocks.1.attentions.1", "feature"
GROUPS = ["animals", "landscapes", "people", "objects"]
HEAT = (16, 16)
N_IMAGES = 48
BUILD = 2
"""The synthetic run's layout version (part of its shape: a run built by an older benchmark is rebuilt); 2: atlas
images have their thumbnails."""
SHARD_GENS = 32


# ------------------------------------------------------------------------------------------------ the synthetic run


def build(run_dir: Path, n_units: int, n_steps: int, n_gens: int, density: float, row_group: int,
          seed: int = 0) -> dict:
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from backend.analysis.compare import compare_groups
    from backend.analysis.peaks import peaks_and_units
    from backend.run.config import AnalysisConfig
    from backend.run.schema import TABLES
    from backend.run.store import RunStore

    t0 = time.time()
    rng = np.random.default_rng(seed)
    store = RunStore(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    def write(table: str, name: str, data: pa.Table, layer: str | None = LAYER, kind: str | None = KIND) -> None:
        if row_group and data.num_rows > row_group:
            base = store.partition_dir(table, layer, kind) if layer is not None else store.table_dir(table)
            base.mkdir(parents=True, exist_ok=True)
            pq.write_table(data, base / f"{name}.parquet", compression="zstd", row_group_size=row_group)
        else:
            store.write_table_shard(table, name, data, layer=layer, kind=kind)

    # generations, steps, images
    seeds_per_prompt = 4
    gen_id = np.arange(n_gens, dtype=np.int32)
    prompt_ix = gen_id // seeds_per_prompt
    group_ix = prompt_ix % len(GROUPS)
    store.write_table_shard("generations", "part-0000000", pa.table({
        "gen_id": gen_id, "prompt": [f"a photo of {GROUPS[g]} #{p}" for p, g in zip(prompt_ix, group_ix, strict=True)],
        "seed": (gen_id % seeds_per_prompt).astype(np.int64), "group": [GROUPS[g] for g in group_ix],
        "attributes": ["{}"] * n_gens, "image": [f"images/{g:06d}.png" for g in gen_id],
        "n_steps": np.full(n_gens, n_steps, np.int16), "guidance": np.full(n_gens, 7.5, np.float32),
        "negative_prompt": pa.nulls(n_gens, pa.string()), "control_image": pa.nulls(n_gens, pa.string()),
        "image_path": pa.nulls(n_gens, pa.string()), "class_label": pa.nulls(n_gens, pa.string())}))
    timesteps = np.linspace(981, 1, n_steps).round().astype(np.float32)
    store.write_table("steps", pa.table({"step": np.arange(n_steps, dtype=np.int16), "timestep": timesteps}))
    yy, xx = np.mgrid[0:512, 0:512] / 512.0
    for i in range(N_IMAGES):
        c = rng.random(6)
        img = np.stack([np.sin(6 * xx * c[0] + c[3] * 6) * 0.5 + 0.5, np.cos(5 * yy * c[1] + c[4] * 6) * 0.5 + 0.5,
                        (xx * c[2] + yy * c[5]) / 2], axis=-1)
        noise = rng.normal(0, 0.03, img.shape)
        store.write_image(i, ((img + noise).clip(0, 1) * 255).astype(np.uint8))
    for g in range(N_IMAGES, n_gens):  # every generation has its own file (hard links: distinct paths, so the
        os.link(store.image_path(g % N_IMAGES), store.image_path(g))  # inspector decodes each like a real image)

    # sparse feature activity: per unit a rate, a preferred step and a scale
    rate = np.exp(rng.uniform(np.log(1e-4), np.log(1e-2), n_units)) * (density / 0.00215)
    rate[rng.random(n_units) < 0.05] = 0.0
    mu, sigma, scale = rng.uniform(0, n_steps - 1, n_units), rng.uniform(2, 10, n_units), rng.uniform(0.5, 5, n_units)
    k = rng.binomial(n_gens * n_steps, np.clip(rate, 0, 1))
    unit = np.repeat(np.arange(n_units, dtype=np.int32), k)
    step = np.where(rng.random(len(unit)) < 0.9, np.rint(np.repeat(mu, k) + np.repeat(sigma, k) *
                                                          rng.standard_normal(len(unit))), rng.integers(0, n_steps,
                                                                                                    len(unit)))
    step = np.clip(step, 0, n_steps - 1).astype(np.int16)
    gen = rng.integers(0, n_gens, len(unit)).astype(np.int32)
    vmax = (rng.exponential(1.0, len(unit)) * np.repeat(scale, k)).astype(np.float32)
    vmean = (vmax * rng.uniform(0.1, 0.5, len(unit))).astype(np.float32)
    order = np.lexsort((gen, step, unit, gen // SHARD_GENS))
    unit, step, gen, vmax, vmean = unit[order], step[order], gen[order], vmax[order], vmean[order]
    shard_of = gen // SHARD_GENS
    starts = np.searchsorted(shard_of, np.arange(shard_of.max() + 2) if len(shard_of) else [0])
    for s in range(len(starts) - 1):
        a, b = starts[s], starts[s + 1]
        write("activity", f"part-{s * SHARD_GENS:07d}", pa.table({
            "gen_id": gen[a:b], "step": step[a:b], "unit": unit[a:b], "mean": vmean[a:b], "max": vmax[a:b]}))
    rows_activity = len(unit)
    write_histograms(store, run_dir, n_units)

    # profiles, units, peaks, frequencies (as analysis computes them, from the same rows)
    cell = unit.astype(np.int64) * n_steps + step
    count = np.bincount(cell, minlength=n_units * n_steps).reshape(n_units, n_steps)
    total = np.bincount(cell, weights=vmean, minlength=n_units * n_steps).reshape(n_units, n_steps)
    mx = np.zeros(n_units * n_steps, np.float32)
    np.maximum.at(mx, cell, vmax)
    profiles = {"freq": count / n_gens, "mean": total / n_gens, "max": mx.reshape(n_units, n_steps)}
    write("profiles", "part-0000000", pa.table({
        "unit": np.repeat(np.arange(n_units, dtype=np.int32), n_steps),
        "step": np.tile(np.arange(n_steps, dtype=np.int16), n_units),
        "mean": profiles["mean"].ravel().astype(np.float32), "max": profiles["max"].ravel(),
        "freq": profiles["freq"].ravel().astype(np.float32)}))
    cfg = AnalysisConfig(peak_min_height=0.0005)
    peaks, units = peaks_and_units(profiles, timesteps, cfg)
    write("peaks", "part-0000000", peaks)
    write("units", "part-0000000", units)
    g_of_row = group_ix[gen]
    gens_per_group = np.bincount(group_ix, minlength=len(GROUPS))
    fcount = np.bincount(unit.astype(np.int64) * len(GROUPS) + g_of_row, minlength=n_units * len(GROUPS))
    fsum = np.bincount(unit.astype(np.int64) * len(GROUPS) + g_of_row, weights=vmean,
                       minlength=n_units * len(GROUPS))
    pairs = np.tile(gens_per_group * n_steps, n_units)
    freqs = pa.table({"unit": np.repeat(np.arange(n_units, dtype=np.int32), len(GROUPS)),
                      "group": np.tile(np.array(GROUPS, dtype=object), n_units),
                      "freq": (fcount / pairs).astype(np.float32), "mean": (fsum / pairs).astype(np.float32),
                      "generations": np.tile(gens_per_group.astype(np.int32), n_units)})
    write("frequencies", "part-0000000", freqs)
    all_freqs = pl.from_arrow(freqs).with_columns(layer=pl.lit(LAYER), kind=pl.lit(KIND))
    for a in GROUPS:
        for b in GROUPS:
            if a != b:
                ranked = compare_groups(all_freqs, a, b, n_steps, cfg)
                write("comparisons", f"{a}-vs-{b}", ranked.drop("layer", "kind").to_arrow())

    # examples: 8 over all steps + 8 at each peak, with 16x16 heat-maps (a blob at a random place)
    peaks_pl = pl.from_arrow(peaks)
    alive = units["dead"].to_numpy() == False  # noqa: E712 - numpy bool array
    ex_unit, ex_step = [], []
    peak_steps = peaks_pl.group_by("unit", maintain_order=True).agg(pl.col("step"))
    steps_of = dict(zip(peak_steps["unit"].to_list(), peak_steps["step"].to_list(), strict=True))
    for u in np.flatnonzero(alive):
        for s in [-1, *steps_of.get(int(u), [])]:
            ex_unit.append(np.full(8, u, np.int32))
            ex_step.append(np.full(8, s, np.int16))
    ex_unit, ex_step = np.concatenate(ex_unit), np.concatenate(ex_step)
    n_ex = len(ex_unit)
    h, w = HEAT
    cy, cx = rng.uniform(0, h, n_ex), rng.uniform(0, w, n_ex)
    yy, xx = np.mgrid[0:h, 0:w]
    maps = np.empty((n_ex, h * w), np.float32)
    for lo in range(0, n_ex, 65536):
        hi = min(lo + 65536, n_ex)
        d2 = (yy[None] - cy[lo:hi, None, None]) ** 2 + (xx[None] - cx[lo:hi, None, None]) ** 2
        maps[lo:hi] = (np.exp(-d2 / 8.0) * 3 + rng.normal(0, 0.05, d2.shape)).reshape(hi - lo, -1)
    heat = pa.ListArray.from_arrays(pa.array(np.arange(0, n_ex * h * w + 1, h * w, dtype=np.int32)),
                                    pa.array(maps.ravel()))
    write("examples", "part-0000000", pa.table({
        "unit": ex_unit, "step": ex_step, "rank": np.tile(np.arange(1, 9, dtype=np.int16), n_ex // 8),
        "gen_id": rng.integers(0, n_gens, n_ex).astype(np.int32),
        "activation": np.sort(rng.exponential(2, n_ex).astype(np.float32)),
        "heatmap_step": np.where(ex_step < 0, rng.integers(0, n_steps, n_ex), ex_step).astype(np.int16),
        "heatmap": heat, "height": np.full(n_ex, h, np.int16), "width": np.full(n_ex, w, np.int16)}))
    del maps, heat

    # concepts, SAE, interventions, dreams, ablations
    concepts = [f"{g}" for g in GROUPS] + [f"style={s}" for s in ("photo", "painting", "sketch", "render")]
    best = rng.choice(np.flatnonzero(alive), (len(concepts), 5))
    write("concepts", "part-0000000", pa.table({
        "concept": np.repeat(np.array(concepts, dtype=object), 5), "unit": best.ravel().astype(np.int32),
        "auroc": np.sort(rng.uniform(0.6, 1.0, (len(concepts), 5)))[:, ::-1].ravel().astype(np.float32),
        "step": rng.integers(0, n_steps, best.size).astype(np.int16),
        "rank": np.tile(np.arange(1, 6, dtype=np.int16), len(concepts))}))
    store.write_table("concept_summary", pa.Table.from_pylist([{
        "layer": LAYER, "kind": KIND, "concepts": len(concepts), "mean_best_auroc": 0.93, "localised_examples": 0}],
        schema=TABLES["concept_summary"].schema))
    n_log = 400
    write("sae_training", "part-0000000", pa.table({
        "step": np.arange(n_log, dtype=np.int32) * 50, "tokens": (np.arange(n_log, dtype=np.int64) + 1) * 204800,
        "fvu": 0.05 + np.exp(-np.arange(n_log) / 60.0), "l0": np.full(n_log, 32.0, np.float32),
        "dead_frac": np.linspace(0.3, 0.02, n_log).astype(np.float32), "lr": np.full(n_log, 2e-4, np.float32)}))
    store.write_table("sae_metrics", pa.Table.from_pylist([{
        "layer": LAYER, "fvu": 0.11, "l0": 32.0, "dead_frac": 0.02, "dense_frac": 0.001, "tokens": n_log * 204800,
        "seconds": 5400.0, "loss_clean": 0.1, "loss_spliced": 0.104, "loss_zero": 0.4,
        "frac_loss_recovered": 0.98, "splice_samples": 128}], schema=TABLES["sae_metrics"].schema))
    some = np.flatnonzero(alive)[:200]
    rows = []
    for u in some:
        for s in range(4):
            rows.append({"unit": int(u), "method": "steer", "mode": "prior", "prompt": "", "seed": s, "strength": 8.0,
                         "scale": 1.0, "steps": "all", "mask": "", "n_steps": n_steps, "guidance": 1.0,
                         "image": f"images/{(u + s) % N_IMAGES:06d}.png", "baseline_image": f"images/{s:06d}.png",
                         "effect": float(rng.uniform(0, 0.3)), "spec": f"u{u}"})
    write("interventions", "part-0000000", pa.Table.from_pylist(rows, schema=TABLES["interventions"].schema))
    drows = []
    for u in some:
        for target in (0, int(mu[u])):
            for s in range(4):
                for opt in range(0, 301, 60):
                    drows.append({"unit": int(u), "step": target, "seed": s, "opt_step": opt,
                                  "activation": opt / 100.0, "penalties": json.dumps({"tv": 0.1, "range": 0.01,
                                                                                      "total": 0.11}),
                                  "image": f"images/{(u + opt) % N_IMAGES:06d}.png"})
    write("dreams", "part-0000000", pa.Table.from_pylist(drows, schema=TABLES["dreams"].schema))
    for b in range(16):
        block = f"up_blocks.{b // 4}.attentions.{b % 4}"
        arows = [{"mode": "skip", "prompt": f"prompt {i}", "seed": 0, "n_steps": n_steps, "guidance": 7.5,
                  "image": f"images/{(b + i) % N_IMAGES:06d}.png", "baseline_image": f"images/{i:06d}.png",
                  "effect": float(rng.uniform(0, 0.2)), "spec": "k"} for i in range(4)]
        store.write_parquet(store.table_dir("ablations") / f"layer={block}" / "skip-k.parquet",
                            pa.Table.from_pylist(arows, schema=TABLES["ablations"].schema))
    write_atlas(store, n_units, int(n_units * 0.05) + 1, rng)
    stages = {"capture": {"status": "done", "seconds": 36000.0, "layers": [LAYER], "n_steps": n_steps,
                          "guidance": 7.5, "generations": n_gens},
              "sae": {"status": "done", LAYER: {"seconds": 5400.0}}, "features": {"status": "done", "seconds": 7200.0},
              "analysis": {"status": "done", "seconds": 3600.0}}
    store.write_manifest({"config": {"model": str(run_dir / "no-model-here"), "capture": {"layers": [LAYER]}},
                          "stages": stages})
    return {"seconds": round(time.time() - t0, 1), "activity_rows": int(rows_activity), "examples_rows": int(n_ex),
            "live_units": int(alive.sum()), "peaks": int(peaks.num_rows)}


def write_histograms(store, run_dir: Path, n_units: int) -> None:
    """The `histograms` table as analysis builds it (backend/analysis/histograms.py over the activity shards)."""
    from backend.analysis.histograms import histograms_table
    from backend.analysis.inputs import Partition, connect
    from backend.run.config import AnalysisConfig

    cfg = AnalysisConfig()
    files = sorted(str(f) for f in store.partition_dir("activity", LAYER, KIND).glob("*.parquet"))
    con = connect(cfg)
    try:
        table = histograms_table(con, Partition(LAYER, KIND, files, n_units), cfg.histogram_bins)
    finally:
        con.close()
    store.write_table_shard("histograms", "part-0000000", table, layer=LAYER, kind=KIND)


ATLAS_PRIOR_SEEDS = (0, 1, 2, 3)
ATLAS_DREAMS = (("default", (0, 1)), ("no-noise", (0, 1)))


def write_atlas(store, n_units: int, batch: int, rng) -> None:
    """An `atlas` of every unit, as the atlas stage lays it out (docs/run-format.md): priors and dreams as PNGs
    hard-linked from the 48 pictures (each its own file, so the inspector decodes each like a real one), dreams
    with a GIF each (hard links of 8 distinct 8-frame GIFs), each PNG with its thumbnail beside it (hard links of the
    48 pictures' thumbnails, made by the atlas's own function), written in batches of units."""
    import pyarrow as pa
    from PIL import Image

    from backend.interventions.media import thumbnail_jpeg
    from backend.run.schema import TABLES, atlas_thumbnail

    base = f"media/atlas/{LAYER}/{KIND}"
    gifs = []
    for g in range(8):
        path = store.root / base / f"_gif-{g}.gif"
        path.parent.mkdir(parents=True, exist_ok=True)
        frames = [Image.open(store.image_path((g * 8 + f) % N_IMAGES)).convert("RGB").resize((128, 128))
                  for f in range(8)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=120, loop=0)
        gifs.append(path)

    thumbs = []  # each picture's thumbnail, made as the atlas makes them (media.thumbnail_jpeg)
    for i in range(N_IMAGES):
        path = store.root / base / f"_thumb-{i}.jpg"
        path.write_bytes(thumbnail_jpeg(Image.open(store.image_path(i))))
        thumbs.append(path)

    def link(source: Path, rel: str) -> str:
        target = store.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target)
        if source.suffix == ".png":  # its thumbnail beside it, as the atlas writes them (schema.atlas_thumbnail)
            os.link(thumbs[int(source.stem)], store.root / atlas_thumbnail(rel))
        return rel

    for first in range(0, n_units, batch):
        rows = []
        for u in range(first, min(first + batch, n_units)):
            steps = ",".join(str(int(s)) for s in sorted(rng.choice(50, 4, replace=False)))
            for seed in ATLAS_PRIOR_SEEDS:
                rows.append({"unit": u, "what": "prior", "variant": "default", "seed": seed, "animation": None,
                             "image": link(store.image_path((u + seed) % N_IMAGES),
                                           f"{base}/prior-default/unit-{u:05d}-seed{seed}.png"),
                             "objective": None, "target_steps": steps})
            for variant, seeds in ATLAS_DREAMS:
                for seed in seeds:
                    stem = f"{base}/dream-{variant}/unit-{u:05d}-seed{seed}"
                    rows.append({"unit": u, "what": "dream", "variant": variant, "seed": seed,
                                 "image": link(store.image_path((3 * u + seed + 7) % N_IMAGES), f"{stem}.png"),
                                 "animation": link(gifs[(u + seed) % len(gifs)], f"{stem}.gif"),
                                 "objective": float(rng.uniform(0, 10)),
                                 "target_steps": f"0,{steps.split(',')[-1]}"})
        table = pa.Table.from_pylist(rows, schema=TABLES["atlas"].schema)
        store.write_table_shard("atlas", f"batch-{first:06d}", table, layer=LAYER, kind=KIND)


# ------------------------------------------------------------------------------------------------ measurements


def stats(values: list[float]) -> dict:
    arr = np.asarray(values) * 1000.0
    return {"n": len(arr), "p50_ms": round(float(np.percentile(arr, 50)), 2),
            "p95_ms": round(float(np.percentile(arr, 95)), 2), "max_ms": round(float(arr.max()), 2)}


def histogram_scan(db, unit: int) -> np.ndarray:
    """A unit's histogram from a scan of the layer's activity: what the unit page costs on request for a run without
    the `histograms` table (inspector/queries/unit_detail.py's fallback)."""
    values = db.read_files('SELECT "max" AS v FROM {src} WHERE unit = ?', db.partition_files("activity", LAYER, KIND),
                           [unit])
    return np.histogram(values["v"].to_numpy(), bins=30)[0]


def query_latency(root: Path, name: str, n_units: int, seed: int = 1) -> dict:
    from inspector import queries as q
    from inspector.db import database

    run = q.open_run(root, name)
    t0 = time.perf_counter()
    db = database(run)
    loads = {}
    for table in ("steps", "generations", "units", "profiles", "peaks", "examples", "frequencies", "histograms",
                  "concepts", "interventions", "dreams", "atlas"):
        t = time.perf_counter()
        db.load(table)
        loads[table] = round((time.perf_counter() - t) * 1000, 1)
    first_open_ms = round((time.perf_counter() - t0) * 1000, 1)
    loads["heat-map rows read"] = db.heatmap_rows_read  # none: they are read per unit page
    live = q.live_units.uncached(run, LAYER, KIND)
    rng = np.random.default_rng(seed)
    picks = rng.choice(live, min(n_units, len(live)), replace=False)
    timings: dict[str, list[float]] = {}

    def timed(label, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        timings.setdefault(label, []).append(time.perf_counter() - t)
        return out

    totals, bundles = [], []
    for u in picks:
        u = int(u)
        t_all = time.perf_counter()
        timed("tables", q.tables.uncached, run)
        timed("partitions", q.partitions.uncached, run)
        timed("steps", q.steps.uncached, run)
        timed("unit_range", q.unit_range.uncached, run, LAYER, KIND)
        timed("unit_row", q.unit_row.uncached, run, LAYER, KIND, u)
        timed("unit_concepts", q.unit_concepts.uncached, run, LAYER, KIND, u)
        timed("profile", q.profile.uncached, run, LAYER, KIND, u)
        pk = timed("peaks", q.peaks.uncached, run, LAYER, KIND, u)
        timed("activity_bytes", q.activity_bytes.uncached, run, LAYER, KIND)
        timed("unit_frequencies", q.unit_frequencies.uncached, run, LAYER, KIND, u)
        timed("example_steps", q.example_steps.uncached, run, LAYER, KIND, u)
        timed("example_count", q.example_count.uncached, run, LAYER, KIND, u, -1)
        timed("examples (all steps, 8 with heat-maps)", q.examples.uncached, run, LAYER, KIND, u, -1, 1, 8)
        if pk.height:
            timed("examples (at a peak, 8 with heat-maps)", q.examples.uncached, run, LAYER, KIND, u,
                  int(pk["step"][0]), 1, 8)
        timed("unit_interventions", q.unit_interventions.uncached, run, LAYER, KIND, u)
        timed("unit_dreams", q.unit_dreams.uncached, run, LAYER, KIND, u)
        timed("neighbour", q.neighbour.uncached, run, LAYER, KIND, u, 1, True)
        timed("activation_histogram (histograms table)", q.activation_histogram.uncached, run, LAYER, KIND, u)
        timed("unit_atlas", q.unit_atlas.uncached, run, LAYER, KIND, u)
        totals.append(time.perf_counter() - t_all)
        t = time.perf_counter()
        q.unit_page.uncached(run, LAYER, KIND, u)
        bundles.append(time.perf_counter() - t)
    hist = []
    for u in picks[: max(5, len(picks) // 10)]:
        t = time.perf_counter()
        histogram_scan(db, int(u))
        hist.append(time.perf_counter() - t)
    for sort in q.ATLAS_SORTS:
        for page in (1, 2, 100):
            timed(f"atlas_grid ({sort}, page {page})", q.atlas_grid.uncached, run, LAYER, KIND,
                  ("default", 0), ("default", 0), sort, sort != "unit", "live", None, page)
    return {"first_open_ms": first_open_ms, "table_load_ms": loads,
            "queries": {k: stats(v) for k, v in timings.items()}, "all_queries_of_one_unit": stats(totals),
            "unit_page_bundle": stats(bundles),
            "activation_histogram_scan_without_the_table": stats(hist),
            "activity_mb": round(q.activity_bytes.uncached(run, LAYER, KIND) / 1e6, 1)}


def open_page(root: Path, page: str, params: dict) -> tuple[object, float]:
    """(AppTest of the inspector on `page` with URL params, seconds its first run took)."""
    from streamlit.testing.v1 import AppTest

    os.environ["DIFFLENS_RUNS"] = str(root)
    at = AppTest.from_file(str(ROOT / "inspector" / "app.py"), default_timeout=120)
    at.query_params.update(params)
    at.run()
    at.switch_page(f"views/{page}.py")
    t = time.perf_counter()
    at.run()
    first = time.perf_counter() - t
    if at.exception:
        raise RuntimeError(f"the {page} page failed: {at.exception[0].value}")
    return at, first


def page_runs(root: Path, name: str, n_runs: int) -> dict:
    at, first = open_page(root, "unit", {"run": name, "layer": LAYER, "kind": KIND, "unit": "100"})
    nexts, reruns = [], []
    for _ in range(n_runs):
        button = next(b for b in at.button if b.label == "Next ▶")
        t = time.perf_counter()
        button.click().run()
        nexts.append(time.perf_counter() - t)
        if at.exception:
            raise RuntimeError(f"the unit page failed: {at.exception[0].value}")
    for _ in range(max(5, n_runs // 3)):
        t = time.perf_counter()
        at.run()
        reruns.append(time.perf_counter() - t)
    return {"first_page_run_ms": round(first * 1000, 1), "next_new_unit": stats(nexts),
            "rerun_same_unit": stats(reruns), "last_unit": at.title[0].value if at.title else None}


def atlas_page_runs(root: Path, name: str, n_runs: int) -> dict:
    """The Atlas page under AppTest: its first run, then n_runs moves to another page of the grid (new units, new
    thumbnails each time) and changes of the sort."""
    at, first = open_page(root, "atlas", {"run": name, "layer": LAYER, "kind": KIND})
    tiles = sum(h.proto.body.count('class="atlas-tile"') for h in at.get("html"))  # the grid: one HTML element
    pages, sorts = [], []
    for i in range(n_runs):
        t = time.perf_counter()
        at.get("pagination")[0].set_value(2 + 7 * i).run()
        pages.append(time.perf_counter() - t)
    for sort in ATLAS_SORTS_SHOWN:
        t = time.perf_counter()
        at.selectbox(key="atlas.sort").set_value(sort).run()
        sorts.append(time.perf_counter() - t)
    if at.exception:
        raise RuntimeError(f"the atlas page failed: {at.exception[0].value}")
    return {"first_page_run_ms": round(first * 1000, 1), "tiles": tiles, "next_page": stats(pages),
            "change_sort": stats(sorts)}


CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def chromium_path() -> str:
    """Debian's chromium, which the browser timings drive through playwright."""
    chromium = shutil.which("chromium")
    if chromium is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium chromium-driver)")
    return chromium


def browser_runs(root: Path, name: str, n_runs: int, warmup_s: float = 30.0) -> dict:
    """Serve the app on 127.0.0.1 and time Next in Debian's chromium (playwright): from the click until the new
    unit's heading and its example images are shown. The first units warm the server up (its tables load, the
    first pages run) for warmup_s seconds; they are not counted."""
    from playwright.sync_api import expect, sync_playwright

    chromium = chromium_path()
    with served(root) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.goto(f"{url}/unit?run={name}&layer={LAYER}&kind={KIND}&unit=100")
            expect(page.get_by_role("heading", name="feature 100")).to_be_visible(timeout=120_000)
            times, warm = [], []
            started = time.time()
            while len(times) < n_runs:
                current = page.get_by_role("heading", level=1).first.inner_text()
                t = time.perf_counter()
                page.get_by_role("button", name="Next ▶").click()
                expect(page.get_by_role("heading", level=1).first).not_to_have_text(current, timeout=60_000)
                page.wait_for_function(ALL_IMAGES_SHOWN, arg=1, timeout=60_000)
                (warm if time.time() - started < warmup_s else times).append(time.perf_counter() - t)
            browser.close()
    return {"next_in_browser": stats(times), "warmup_clicks": len(warm),
            "warmup_max_ms": round(max(warm) * 1000, 1) if warm else None}


@contextlib.contextmanager
def served(root: Path, app: Path | None = None) -> Iterator[str]:
    """The url of a fresh server (_serve) for the `with` block; stopped after it."""
    proc, url = _serve(root, app)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _serve(root: Path, app: Path | None = None):
    """A streamlit server of the inspector (or of the script `app`) on 127.0.0.1 (a fresh process: nothing loaded);
    returns (proc, url)."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(app or "inspector/app.py"), "--server.port",
                             str(port), "--server.address", "127.0.0.1", "--server.headless", "true", "--", "--runs",
                             str(root)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.3)
    return proc, url


ATLAS_SORTS_SHOWN = ("density", "peak step", "best concept (AUROC)", "max activation", "dream objective")
"""Sorts whose first pages the `open` browser timings show, one each (none shown before: new thumbnails)."""
GRID_IMAGES = 96
"""Images of the Atlas page's first grid: 48 tiles, each the unit's prior and dream side by side (the grid is one
HTML element, `.atlas-grid`, its tiles' images the thumbnails' inline JPEGs)."""
ALL_IMAGES_SHOWN = ("n => { const imgs = [...document.querySelectorAll('[data-testid=\"stImage\"] img, "
                    "[data-testid=\"stImageContainer\"] img, .atlas-grid img')]; return imgs.length >= n && "
                    "imgs.every(i => i.complete && i.naturalWidth > 0); }")


def browser_atlas(root: Path, name: str, repeats: int) -> dict:
    """The Atlas page's first grid in chromium: from page.goto(atlas URL) until its tiles' thumbnails (GRID_IMAGES)
    are all shown.
    `cold`: a fresh server per try (the run not open; its tables load on this first page), the app loaded by this
    URL; `navigate`: a fresh server per try, the app open on Overview, timed from the click on Atlas in the sidebar
    (the atlas tables and thumbnails are read then); `open`: a server that already has the run open (an earlier
    session opened it), each try a new browser page on a sort whose first page was never shown (thumbnails decoded
    for the first time)."""
    from urllib.parse import urlencode

    from playwright.sync_api import sync_playwright

    chromium = chromium_path()
    query = urlencode({"run": name, "layer": LAYER, "kind": KIND})
    out: dict[str, list[float]] = {"cold": [], "open": [], "navigate": [], "cold: its heading": [],
                                   "open: its heading": []}

    def first_grid(url: str, params: str, label: str | None = None) -> float:
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        t = time.perf_counter()
        page.goto(f"{url}/atlas?{params}")
        page.get_by_role("heading", name="Atlas").wait_for(timeout=120_000)
        heading = time.perf_counter() - t
        page.wait_for_function(ALL_IMAGES_SHOWN, arg=GRID_IMAGES, timeout=120_000)
        seconds = time.perf_counter() - t
        page.close()
        if label is not None:
            out[f"{label}: its heading"].append(heading)
        return seconds

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            for _ in range(repeats):  # cold: a new server each time
                with served(root) as url:
                    out["cold"].append(first_grid(url, query, "cold"))
            for _ in range(repeats):  # navigate: a new server, the app open on Overview, then a click on Atlas
                with served(root) as url:
                    page = browser.new_page(viewport={"width": 1600, "height": 1200})
                    page.goto(f"{url}/?{urlencode({'run': name})}")
                    page.get_by_role("heading", name="Overview").wait_for(timeout=120_000)
                    page.wait_for_timeout(1000)
                    t = time.perf_counter()
                    page.get_by_role("link", name="Atlas").click()
                    page.wait_for_function(ALL_IMAGES_SHOWN, arg=GRID_IMAGES, timeout=120_000)
                    out["navigate"].append(time.perf_counter() - t)
                    page.close()
            with served(root) as url:
                first_grid(url, query)  # opens the run (not counted)
                for sort in list(ATLAS_SORTS_SHOWN)[:repeats]:
                    out["open"].append(first_grid(url, f"{query}&{urlencode({'sort': sort})}", "open"))
        finally:
            browser.close()
    return {k: stats(v) for k, v in out.items()}


BLANK_APP = 'import streamlit as st\n\nst.title("Blank")\n'
"""The floor of a page opened by URL: a Streamlit app of one heading, nothing imported or read."""


def browser_blank(repeats: int) -> dict:
    """A blank Streamlit page (BLANK_APP) opened by URL in the same chromium harness as browser_atlas, from
    page.goto until its heading shows: `fresh server` (a new server per try, its first page) and `warm server` (a
    server that has served the page before, each try a new browser page). No app opened by URL on this machine can
    beat these; the Atlas page's `open` and `cold` figures less these are what the app adds."""
    import tempfile

    from playwright.sync_api import sync_playwright

    chromium = chromium_path()
    out: dict[str, list[float]] = {"fresh server": [], "warm server": []}
    with tempfile.TemporaryDirectory() as d, sync_playwright() as p:
        app = Path(d) / "blank.py"
        app.write_text(BLANK_APP)
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            for _ in range(repeats):
                with served(Path(d), app) as url:
                    for label in ("fresh server", "warm server"):  # each page a new browser context, no cache
                        page = browser.new_page(viewport={"width": 1600, "height": 1200})
                        t = time.perf_counter()
                        page.goto(url)
                        page.get_by_role("heading", name="Blank").wait_for(timeout=120_000)
                        out[label].append(time.perf_counter() - t)
                        page.close()
        finally:
            browser.close()
    return {k: stats(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/difflens-inspector-bench"))
    ap.add_argument("--features", type=int, default=20480)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--generations", type=int, default=10000)
    ap.add_argument("--density", type=float, default=0.00215, help="mean share of (generation, step) pairs active")
    ap.add_argument("--row-group-size", type=int, default=0,
                    help="0: write tables like the batch job (RunStore defaults); N: N-row Parquet row groups")
    ap.add_argument("--units", type=int, default=200, help="random units whose queries are timed")
    ap.add_argument("--page-runs", type=int, default=30, help="AppTest unit-page runs (Next clicks)")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--pages-only", action="store_true", help="skip the query timings (the page runs still load "
                    "the run's tables first)")
    ap.add_argument("--browser", type=int, default=0, metavar="N",
                    help="also time N Next clicks and the Atlas page's first grid (up to 5 tries each, cold and "
                    "with the run open) in chromium (needs chromium and playwright)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import logging

    logging.getLogger("streamlit").setLevel(logging.ERROR)
    shape = {"features": args.features, "steps": args.steps, "generations": args.generations,
             "density": args.density, "row_group_size": args.row_group_size,
             "build": BUILD}
    name = "sd-synthetic" + (f"-rg{args.row_group_size}" if args.row_group_size else "")
    root = args.out / "runs"
    run_dir = root / name
    marker = args.out / f"{name}.json"
    built = None
    if (args.rebuild or not marker.exists() or not (run_dir / "manifest.json").exists()
            or json.loads(marker.read_text()).get("shape") != shape):
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"writing the synthetic run to {run_dir} ...", flush=True)
        built = build(run_dir, args.features, args.steps, args.generations, args.density, args.row_group_size)
        marker.write_text(json.dumps({"shape": shape, "built": built}))
    else:
        built = json.loads(marker.read_text())["built"]
    print(f"run: {json.dumps(shape)}; {json.dumps(built)}", flush=True)
    load = os.getloadavg()[0]
    res = {"shape": shape, "built": built, "cpus": os.cpu_count(), "load_before": round(load, 2)}
    res["queries"] = query_latency(root, name, 5 if args.pages_only else args.units)
    res["page"] = page_runs(root, name, args.page_runs)
    res["atlas_page"] = atlas_page_runs(root, name, max(3, args.page_runs // 3))
    if args.browser:
        res["browser"] = browser_runs(root, name, args.browser)
        res["browser_atlas"] = browser_atlas(root, name, min(args.browser, len(ATLAS_SORTS_SHOWN)))
        res["browser_blank"] = browser_blank(min(args.browser, len(ATLAS_SORTS_SHOWN)))
    res["load_after"] = round(os.getloadavg()[0], 2)

    qres = res["queries"]
    print(f"\nfirst open of the run (loading its tables into DuckDB, no heat-map): {qres['first_open_ms']:.0f} ms "
          f"{qres['table_load_ms']}")
    if not args.pages_only:
        print(f"\n{'unit-page query (uncached)':44s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s}")
        for label, s in qres["queries"].items():
            print(f"{label:44s} {s['p50_ms']:8.2f} {s['p95_ms']:8.2f} {s['max_ms']:8.2f}")
        s = qres["all_queries_of_one_unit"]
        print(f"{'all of the above for one unit':44s} {s['p50_ms']:8.2f} {s['p95_ms']:8.2f} {s['max_ms']:8.2f}")
        s = qres["unit_page_bundle"]
        print(f"{'unit_page (one cached bundle of the above)':44s} {s['p50_ms']:8.2f} {s['p95_ms']:8.2f} "
              f"{s['max_ms']:8.2f}")
        s = qres["activation_histogram_scan_without_the_table"]
        print(f"{'histogram scan (a run without `histograms`)':44s} {s['p50_ms']:8.2f} {s['p95_ms']:8.2f} "
              f"{s['max_ms']:8.2f}   scans {qres['activity_mb']} MB")
    p = res["page"]
    print(f"\nunit page, full script run (AppTest): first {p['first_page_run_ms']:.0f} ms")
    for label in ("next_new_unit", "rerun_same_unit"):
        s = p[label]
        print(f"  {label:20s} p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms, max {s['max_ms']:.0f} ms "
              f"(n={s['n']})")
    if "browser" in res:
        s = res["browser"]["next_in_browser"]
        print(f"  in chromium: Next -> new unit with its images p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms, "
              f"max {s['max_ms']:.0f} ms (n={s['n']}; after {res['browser']['warmup_clicks']} warm-up clicks, "
              f"slowest {res['browser']['warmup_max_ms']} ms)")
    a = res["atlas_page"]
    print(f"\natlas page, full script run (AppTest, {a['tiles']} tiles): first {a['first_page_run_ms']:.0f} ms; "
          f"next page p50 {a['next_page']['p50_ms']:.0f} ms, p95 {a['next_page']['p95_ms']:.0f} ms; change sort p50 "
          f"{a['change_sort']['p50_ms']:.0f} ms, p95 {a['change_sort']['p95_ms']:.0f} ms")
    if "browser_atlas" in res:
        for label, s in res["browser_atlas"].items():
            print(f"  in chromium, first grid ({label}): p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms, "
                  f"max {s['max_ms']:.0f} ms (n={s['n']}; goal < 1000)")
    if "browser_blank" in res:
        for label, s in res["browser_blank"].items():
            print(f"  in chromium, a blank Streamlit page by URL ({label}; the floor): p50 {s['p50_ms']:.0f} ms, "
                  f"p95 {s['p95_ms']:.0f} ms (n={s['n']})")
    print(f"\nfirst open goal < 2000 ms: {qres['first_open_ms']:.0f} ms")
    worst = max(v["p95_ms"] for k, v in qres["queries"].items() if not k.startswith("atlas_grid"))
    grid = max(v["p95_ms"] for k, v in qres["queries"].items() if k.startswith("atlas_grid"))
    print(f"atlas grid query p95 (worst sort and page): {grid:.1f} ms")
    sampled = (" over 5 units only (--pages-only: the goal's figure needs the full query timings)"
               if args.pages_only else "")
    print(f"\nworst unit-page query p95{sampled}: {worst:.1f} ms (goal < 20); page run p95 (Next): "
          f"{p['next_new_unit']['p95_ms']:.0f} ms (goal < 300); load average {res['load_before']} -> "
          f"{res['load_after']} on {res['cpus']} CPUs")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
