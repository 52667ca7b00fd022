"""An analysed run with every optional table, shared by the inspector tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
from analysis_runs import dense_activity, gens_for, make_run, sparse_activity

L_MID, L_UP = "mid_block.attentions.0", "up_blocks.1.attentions.1"


N_STEPS, N_CHANNELS, N_FEATURES, N_GENS = 6, 6, 10, 8


GROUPS = ["red", "blue"]


def _attributes(p: int) -> dict:
    return {"colour": GROUPS[p % 2], "shape": ["circle", "square"][(p // 2) % 2], "position": "left"}


def build_run(root: Path, name: str = "tiny", optional: bool = True, histograms: bool = True) -> Path:
    """An analysed run: 2 layers x channels, features on the first layer; with interventions, dreams and
    ablations when optional; with the `histograms` table unless histograms is False (the inspector then scans the
    activity for a unit's histogram)."""
    from backend.analysis.compare import compare_groups
    from backend.analysis.concepts import best_auroc, concept_labels, concepts_table, unit_localisation
    from backend.analysis.examples import select_examples
    from backend.analysis.frequencies import frequencies_table
    from backend.analysis.histograms import histograms_table
    from backend.analysis.inputs import connect, load_inputs
    from backend.analysis.label_pass import label_pass
    from backend.analysis.peaks import peaks_and_units
    from backend.analysis.profiles import count_activity, profile_arrays, profiles_table
    from backend.demo import shapes
    from backend.run.config import AnalysisConfig

    rng = np.random.default_rng(0)
    gens = gens_for(N_GENS, GROUPS, seeds_per_prompt=2, attributes=_attributes)
    t = np.arange(N_STEPS)
    red = np.array([g["group"] == "red" for g in gens])
    activity = {}
    for layer in (L_MID, L_UP):
        mean = rng.random((N_GENS, N_STEPS, N_CHANNELS)).astype(np.float32)
        mean[:, :, 1] += 2.0 * np.exp(-((t - 2) ** 2))[None, :]  # channel 1 peaks at step 2
        mean[red, :, 3] += 3.0  # channel 3 fires for the red prompts
        activity[(layer, "channel")] = dense_activity(mean, mean + 0.5)
    codes = np.where(rng.random((N_GENS, N_STEPS, N_FEATURES)) < 0.3, rng.random((N_GENS, N_STEPS, N_FEATURES)), 0)
    codes[:, :, 0] = 0.0  # feature 0 is dead
    codes[red, 1:4, 2] = 2.0  # feature 2: red prompts, steps 1-3
    activity[(L_MID, "feature")] = sparse_activity(codes.astype(np.float32) * 0.5, codes.astype(np.float32))
    run = root / name
    store = make_run(run, gens, N_STEPS, activity, shard_gens=4, n_latents={L_MID: N_FEATURES})
    for g in gens:  # a red or blue square per generation
        img = np.zeros((16, 16, 3), np.uint8)
        img[4:12, 4:12, 0 if g["group"] == "red" else 2] = 255
        store.write_image(g["gen_id"], img)

    cfg = AnalysisConfig(top_k_channels=2, peak_min_separation=1.0, examples_top_n=4, label_top_n=3)
    inputs = load_inputs(run)
    con = connect(cfg)
    freqs = []
    for part in inputs.partitions:
        counts = count_activity(con, inputs, part, cfg, progress=False)
        store.write_table_shard("profiles", "part-0000000", profiles_table(counts), layer=part.layer, kind=part.kind)
        freq = frequencies_table(counts, inputs.groups)
        store.write_table_shard("frequencies", "part-0000000", freq, layer=part.layer, kind=part.kind)
        freqs.append(pl.from_arrow(freq).with_columns(layer=pl.lit(part.layer), kind=pl.lit(part.kind)))
        peaks, units = peaks_and_units(profile_arrays(counts), inputs.timesteps, cfg)
        store.write_table_shard("peaks", "part-0000000", peaks, layer=part.layer, kind=part.kind)
        store.write_table_shard("units", "part-0000000", units, layer=part.layer, kind=part.kind)
        if histograms:
            store.write_table_shard("histograms", "part-0000000", histograms_table(con, part, cfg.histogram_bins),
                                    layer=part.layer, kind=part.kind)
        chosen = select_examples(con, part, pl.from_arrow(peaks), cfg)
        maps = [rng.random(16).astype(np.float32) for _ in range(chosen.height)]
        table = chosen.to_arrow().append_column("heatmap", pa.array(maps, pa.list_(pa.float32())))
        table = table.append_column("height", pa.array(np.full(chosen.height, 4, np.int16)))
        table = table.append_column("width", pa.array(np.full(chosen.height, 4, np.int16)))
        store.write_table_shard("examples", "part-0000000", table, layer=part.layer, kind=part.kind)
        local = unit_localisation(pl.from_arrow(table), inputs.gens, "position", shapes.POSITION_CENTRES)
        store.write_table_shard("localisation", "part-0000000", local.to_arrow(), layer=part.layer, kind=part.kind)
    all_freqs = pl.concat(freqs)
    for a, b in (("red", "blue"), ("blue", "red")):
        ranked = compare_groups(all_freqs, a, b, N_STEPS, cfg)
        for (layer, kind), rows in ranked.group_by(["layer", "kind"]):
            store.write_table_shard("comparisons", f"{a}-vs-{b}", rows.drop("layer", "kind").to_arrow(), layer=layer,
                                    kind=kind)
    labels = concept_labels(inputs.gens, cfg.spatial_attributes)
    summary = []
    for part in inputs.partitions:
        best, step = best_auroc(con, inputs, part, labels, cfg)
        store.write_table_shard("concepts", "part-0000000", concepts_table(labels.names, best, step, 3),
                                layer=part.layer, kind=part.kind)
        summary.append({"layer": part.layer, "kind": part.kind, "concepts": len(labels.names),
                        "mean_best_auroc": float(best.max(0).mean()), "localisation": None,
                        "localised_examples": 0, "best_localisation": None, "best_localising_unit": None})
    store.write_table("concept_summary", pa.Table.from_pylist(summary, _schema("concept_summary")))
    label_pass(con, inputs, cfg, progress=False)  # units.label, range_examples, concept_summary's auroc_oos
    store.write_table_shard("sae_training", "part-0000000", pa.table({
        "step": np.arange(0, 500, 50, dtype=np.int32), "tokens": np.arange(1, 11, dtype=np.int64) * 4096,
        "fvu": np.linspace(1.0, 0.05, 10), "l0": np.full(10, 4.0, np.float32),
        "dead_frac": np.linspace(0.5, 0.0, 10).astype(np.float32), "lr": np.full(10, 1e-3, np.float32)}),
        layer=L_MID, kind="feature")
    store.write_table("sae_metrics", pa.Table.from_pylist([{
        "layer": L_MID, "sae_id": "default", "fvu": 0.05, "l0": 4.0, "dead_frac": 0.1, "dense_frac": 0.0,
        "tokens": 40960, "seconds": 3.5,
        "loss_clean": 0.01, "loss_spliced": 0.011, "loss_zero": 0.2, "frac_loss_recovered": 0.95,
        "splice_samples": 8}]))
    if optional:
        _write_optional(store, rng)
        write_atlas(store, L_MID, "feature", range(N_FEATURES), dreams=range(6))
        write_atlas(store, L_MID, "channel", range(N_CHANNELS), dreams=())
    store.update_stage("capture", layers=[L_MID, L_UP], n_steps=N_STEPS, guidance=1.0, generations=N_GENS,
                       seconds=1.5)
    store.update_stage("sae", status="done", seconds=3.5)
    store.update_stage("features", status="done", seconds=1.0)
    store.update_stage("analysis", status="done", seconds=2.0)
    return run


def _schema(table: str) -> pa.Schema:
    from backend.run.schema import TABLES

    return TABLES[table].schema


def _png(store, rel: str, colour: tuple[int, int, int]) -> str:
    from PIL import Image

    path = store.root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(path)
    return rel


def _write_optional(store, rng) -> None:
    base = _png(store, "media/steer/baseline/seed-000000.png", (128, 128, 128))
    rows = []
    for seed in (0, 1):
        rows.append({"unit": 2, "method": "steer", "mode": "prior", "prompt": "", "seed": seed, "strength": 3.0,
                     "scale": 1.0, "steps": "all", "mask": "", "features": None, "preset": None, "n_steps": N_STEPS,
                     "guidance": 1.0, "image": _png(store, f"media/steer/f2/seed-{seed}.png", (250, 0, 0)),
                     "baseline_image": base, "effect": 0.3, "attributes": None, "baseline_attributes": None,
                     "changed_attributes": None, "concept": None, "concept_hit": None, "spec": "abc"})
    store.write_table_shard("interventions", "steer-feature-00002-abc",
                            pa.Table.from_pylist(rows, _schema("interventions")), layer=L_MID, kind="feature")
    drows = []
    for opt in (0, 10, 20):
        for seed in (0, 1):
            rel = _png(store, f"media/dreams/{L_MID}/feature-00002/seed{seed}-opt{opt:04d}.png", (opt * 10, 0, 0))
            drows.append({"unit": 2, "step": 0, "seed": seed, "opt_step": opt, "activation": opt / 10,
                          "penalties": json.dumps({"tv": 0.1, "range": 0.0, "moment": 0.01, "total": 0.11}),
                          "image": rel})
    store.write_table_shard("dreams", "unit-000002", pa.Table.from_pylist(drows, _schema("dreams")), layer=L_MID,
                            kind="feature")
    for block, effect in (("mid_block", 0.4), ("up_blocks.1", 0.1)):
        arows = []
        for i, prompt in enumerate(("prompt 0", "prompt 1")):
            arows.append({"mode": "skip", "prompt": prompt, "seed": 0, "n_steps": N_STEPS, "guidance": 1.0,
                          "image": _png(store, f"media/ablation/k/skip/{block}/{i:03d}.png", (0, int(effect * 500), 0)),
                          "baseline_image": _png(store, f"media/ablation/k/baseline/{i:03d}.png", (90, 90, 90)),
                          "effect": effect + 0.01 * i, "attributes": None, "baseline_attributes": None,
                          "changed_attributes": None, "spec": "k"})
        store.write_parquet(store.table_dir("ablations") / f"layer={block}" / "skip-k.parquet",
                            pa.Table.from_pylist(arows, _schema("ablations")))




ATLAS_SEEDS = (0, 1)
ATLAS_DREAM_VARIANTS = ("default", "no-noise")


def _gif(store, rel: str, colours: list[tuple[int, int, int]]) -> str:
    from PIL import Image

    path = store.root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.fromarray(np.full((16, 16, 3), c, np.uint8)) for c in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return rel


def write_atlas(store, layer: str, kind: str, units, dreams=(), heatmap_units=(2,)) -> None:
    """`atlas` rows as the atlas stage writes them (docs/run-format.md): a default prior per unit and seed
    (ATLAS_SEEDS), for the units in `dreams` a dream per variant (ATLAS_DREAM_VARIANTS) and seed with its GIF and
    objective (unit / 10, so sorting by objective is sorting by unit), and heat-map-over-steps GIFs for
    heatmap_units. Each unit's pictures have their own colour (red = unit x 20, green = seed x 100)."""
    base = f"media/atlas/{layer}/{kind}"
    rows = []
    for unit in units:
        for seed in ATLAS_SEEDS:
            colour = (unit * 20 % 256, seed * 100, 60)
            rows.append({"unit": unit, "what": "prior", "variant": "default", "seed": seed, "animation": None,
                         "image": _png(store, f"{base}/prior-default/unit-{unit:05d}-seed{seed}.png", colour),
                         "objective": None, "target_steps": "1,2,3"})
            for variant in ATLAS_DREAM_VARIANTS if unit in dreams else ():
                stem = f"{base}/dream-{variant}/unit-{unit:05d}-seed{seed}"
                rows.append({"unit": unit, "what": "dream", "variant": variant, "seed": seed,
                             "image": _png(store, f"{stem}.png", colour[::-1]),
                             "animation": _gif(store, f"{stem}.gif", [(0, 0, 0), colour[::-1]]),
                             "objective": unit / 10, "target_steps": "0,2"})
    for unit in heatmap_units:
        _gif(store, f"{base}/heatmaps/unit-{unit:05d}.gif", [(0, 0, 0), (255, 255, 0), (255, 0, 0)])
    table = pa.Table.from_pylist(rows, _schema("atlas")).sort_by([("unit", "ascending"), ("seed", "ascending")])
    store.write_table_shard("atlas", f"batch-{min(units, default=0):06d}", table, layer=layer, kind=kind)


def open_page(root: Path, monkeypatch, view: str, **params):
    """An AppTest of the inspector on runs directory root, switched to views/<view>.py with the URL params, run, and
    checked free of exceptions and error messages."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DIFFLENS_RUNS", str(root))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "inspector" / "app.py"), default_timeout=60)
    at.query_params.update(params)
    at.run()
    at.switch_page(f"views/{view}.py")
    at = at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at
