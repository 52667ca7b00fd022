"""Compare the SAEs of one layer (`python cli.py compare-saes`): which SAEs a layer has, their metrics side by
side, their activation-density histograms, and how their decoder directions match; written to the tables
`sae_comparison`, `sae_density` and `sae_matches` (docs/run-format.md) and one figure under media/sae_compare/.

Per SAE, on one fixed sample of the layer's captured tokens (backend/analysis/sae_stats.py): FVU, L0, dead and
dense shares and the density histogram; loss recovered by the splice test (backend/models/splice.py, on the
run's first `splice_samples` generations, as the sae stage runs it, so every SAE is scored on the same
generations); concept recovery (mean best AUROC) from `concept_summary` when the run's analysis scored that
SAE's features. Per ordered pair of SAEs, each latent of A's best decoder cosine in B (backend/analysis/sae_match
.py). Everything is computed before anything is written, so a failed comparison changes nothing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from backend.errors import DifflensError
from backend.run.schema import feature_kind, run_saes, sae_path

TABLES = ("sae_comparison", "sae_density", "sae_matches")
NO_SPLICE = dict.fromkeys(("loss_clean", "loss_spliced", "loss_zero", "frac_loss_recovered", "splice_samples"))
"""The splice-test columns of an SAE when the test was skipped."""
MEDIA = Path("media") / "sae_compare"


@dataclass
class SAECompareConfig:
    """Settings of `python cli.py compare-saes`."""

    saes: list[str] = field(default_factory=list)
    """SAE ids to compare (at least two; empty: every SAE of the layer)."""
    samples: int = 65536
    """Token vectors in the fixed sample the FVU, L0, dead/dense shares and densities are measured on (all the
    layer's tokens when it has fewer)."""
    batch_size: int = 4096
    """Token vectors per SAE forward pass."""
    seed: int = 0
    """Seed of the token sample."""
    splice_samples: int = -1
    """Generations the splice test (loss recovered) runs on; -1: the run's sae.splice_samples; 0: skip it."""
    bins_per_decade: int = 5
    """Density-histogram bins per decade of firing frequency."""


# ------------------------------------------------------------------------------------------------ the SAEs


def layer_saes(run_root: str | Path, layer: str) -> list[tuple[str, Path]]:
    """(sae_id, directory) of every SAE of a layer, the default first (the run format's listing, run_saes)."""
    return [(sae_id, Path(sae_path(run_root, layer, sae_id))) for lay, sae_id in run_saes(run_root) if lay == layer]


def chosen_saes(run_root: Path, layer: str, wanted: list[str]) -> list[tuple[str, Path]]:
    """The SAEs to compare, or a one-line error: fewer than two, or an id the layer does not have."""
    have = layer_saes(run_root, layer)
    ids = [i for i, _ in have]
    add = (f"add one with `python cli.py train-sae --run {run_root} --layer {layer} --name ID` or "
           f"`python cli.py import-sae PATH --run {run_root} --layer {layer} --name ID`")
    if len(have) < 2:
        what = f"one SAE ({ids[0]})" if ids else "no SAE"
        raise DifflensError(f"{layer} of {run_root} has {what}; comparing needs two or more: {add}")
    if not wanted:
        return have
    unknown = [w for w in wanted if w not in ids]
    if unknown:
        raise DifflensError(f"unknown SAE {', '.join(map(repr, unknown))} for {layer}; its SAEs: {', '.join(ids)}")
    if len(set(wanted)) < 2:
        raise DifflensError(f"--saes names {len(set(wanted))} SAE; compare two or more of {', '.join(ids)}")
    return [(i, d) for i, d in have if i in wanted]


def _load(directory: Path, d_in: int, layer: str, device: str):
    from sae.io import SAELoadError, load_sae

    try:
        sae = load_sae(directory, device=device)
    except SAELoadError as exc:
        raise DifflensError(str(exc)) from exc
    if sae.cfg.d_in != d_in:
        raise DifflensError(f"the SAE in {directory} takes {sae.cfg.d_in} channels but {layer} has {d_in}; it was "
                            "trained on another layer")
    return sae


def check_config(cfg: SAECompareConfig) -> SAECompareConfig:
    for name in ("samples", "batch_size", "bins_per_decade"):
        if getattr(cfg, name) < 1:
            raise DifflensError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.splice_samples < -1:
        raise DifflensError(f"--splice-samples must be >= 0, or -1 for the run's (got {cfg.splice_samples})")
    return cfg


# ------------------------------------------------------------------------------------------------ metrics


def splice_metrics(model, layer: str, sae, gens) -> dict:
    """The sae stage's splice test for one SAE on the given generations (backend/models/splice.py)."""
    from backend.models.splice import splice_test

    sae = sae.to(model.device)
    result = splice_test(model, layer, lambda x: sae(x.to(sae.W_dec.dtype)).to(x.dtype), gens["prompt"].to_list(),
                         gens["seed"].to_list(), int(gens["n_steps"][0]), float(gens["guidance"][0]))
    return result.to_dict()


def concept_recovery(store, layer: str, kind: str) -> dict:
    """concepts and mean_best_auroc of (layer, kind) from concept_summary (nulls when it was not scored)."""
    import polars as pl

    path = store.root / "tables" / "concept_summary.parquet"
    if path.is_file():
        row = pl.read_parquet(path).filter((pl.col("layer") == layer) & (pl.col("kind") == kind))
        if row.height:
            return {"concepts": int(row["concepts"][0]), "mean_best_auroc": float(row["mean_best_auroc"][0])}
    return {"concepts": None, "mean_best_auroc": None}


def _measure(ctx, layer: str, saes: dict, cfg: SAECompareConfig, progress: bool) -> dict:
    """SampleStats of every SAE over one pass of the token sample (each batch read once)."""
    from tqdm.auto import tqdm

    from backend.analysis.sae_stats import SampleStats, count_batches, sample_batches

    where = ctx.store.activations_dir(layer)
    stats = {i: SampleStats(s.cfg.n_latents) for i, s in saes.items()}
    total = count_batches(where, cfg.samples, cfg.batch_size, cfg.seed)
    with tqdm(total=total, desc=f"compare-saes {layer}", unit="batch", disable=not progress) as bar:
        for x in sample_batches(where, cfg.samples, cfg.batch_size, cfg.seed):
            for i, sae in saes.items():
                stats[i].add(sae, x)
            bar.update(1)
    return stats


def _matches(saes: dict, progress: bool) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(feature_b, cosine) per feature of A for every ordered pair (A, B) of different SAEs."""
    from tqdm.auto import tqdm

    from backend.analysis.sae_match import best_matches

    pairs = [(a, b) for a in saes for b in saes if a != b]
    out = {}
    total = sum(saes[a].cfg.n_latents for a, _ in pairs)
    with tqdm(total=total, desc="match decoders", unit="latent", disable=not progress) as bar:
        for a, b in pairs:
            index, cosine = best_matches(saes[a].W_dec, saes[b].W_dec, on_block=bar.update)
            out[(a, b)] = (index.cpu().numpy(), cosine.cpu().numpy())
    return out


# ------------------------------------------------------------------------------------------------ the command


def compare_saes(run, layer: str, cfg: SAECompareConfig | None = None, progress: bool = True) -> dict:
    """Compare the SAEs of a layer (see the module docstring); returns {"rows": [sae_comparison rows], "matches":
    {(a, b): summary}, "tables": [...], "figure": path}."""
    from backend.run.context import as_context

    cfg = check_config(cfg or SAECompareConfig())
    ctx = as_context(run, require="capture")
    store = ctx.store
    t0 = time.time()
    chosen, saes = _checked_saes(ctx, layer, cfg)
    splice_n = ctx.config.sae.splice_samples if cfg.splice_samples < 0 else cfg.splice_samples
    if ctx.model_kind == "classifier":  # the splice test measures a denoiser's loss: none on an image classifier
        splice_n = 0
    stats = _measure(ctx, layer, saes, cfg, progress)
    splice = _splice_all(ctx, layer, saes, splice_n, progress) if splice_n else {}
    matches = _matches(saes, progress)
    rows, edges, density = _rows(store, layer, chosen, saes, stats, splice, cfg)
    store.remove_stale_temporaries()
    written = _write(store, layer, rows, edges, density, matches)
    figure = store.write_png(MEDIA / layer / f"{'-vs-'.join(saes)}.png",
                             comparison_figure(layer, edges, density, matches))
    summary = {"layer": layer, "saes": list(saes), "tokens": rows[0]["tokens"], "splice_samples": splice_n,
               "seconds": round(time.time() - t0, 2), "figure": figure, "config": asdict(cfg)}
    store.update_stage("sae_compare", status="done", finished=time.time(), last=summary)
    return {"rows": rows, "matches": {pair: match_summary(cos) for pair, (_, cos) in matches.items()},
            "tables": written, "figure": store.root / figure}


def _checked_saes(ctx, layer: str, cfg: SAECompareConfig) -> tuple[list[tuple[str, Path]], dict]:
    """The chosen (sae_id, directory) pairs and their SAEs loaded on the run's device, or a one-line error: an
    unknown layer, too few SAEs, an unknown id, an SAE that does not load or does not fit the layer's width."""
    from sae.data import read_meta

    store = ctx.store
    if layer not in ctx.layers:
        raise DifflensError(f"unknown layer {layer!r} in {store.root}; its captured layers: {', '.join(ctx.layers)}")
    chosen = chosen_saes(store.root, layer, list(cfg.saes))
    d_in = read_meta(store.activations_dir(layer)).get("d")
    if d_in is None:
        raise DifflensError(f"{store.root} has no token shards for {layer}; rerun `python cli.py capture`")
    return chosen, {i: _load(d, d_in, layer, ctx.device) for i, d in chosen}


def _splice_all(ctx, layer: str, saes: dict, n: int, progress: bool) -> dict:
    """splice_metrics of every SAE on the run's first n generations."""
    from tqdm.auto import tqdm

    gens = ctx.generations().head(n)
    return {i: splice_metrics(ctx.model, layer, sae, gens)
            for i, sae in tqdm(saes.items(), desc="splice test", unit="SAE", disable=not progress)}


def _rows(store, layer: str, chosen: list, saes: dict, stats: dict, splice: dict, cfg: SAECompareConfig):
    """(sae_comparison rows, density bin edges, {sae_id: (counts, dead)})."""
    from backend.analysis.sae_stats import density_edges, density_histogram
    from backend.run.config import file_digest

    edges = density_edges(next(iter(stats.values())).tokens, cfg.bins_per_decade)
    rows, density = [], {}
    for sae_id, directory in chosen:
        sae, kind = saes[sae_id], feature_kind(sae_id)
        density[sae_id] = density_histogram(stats[sae_id].freq, edges)
        rows.append({"sae_id": sae_id, "kind": kind, "n_latents": sae.cfg.n_latents, "k": sae.cfg.k,
                     "architecture": sae.cfg.architecture, "sae_digest": file_digest(directory / "sae.safetensors")}
                    | stats[sae_id].metrics() | splice.get(sae_id, NO_SPLICE) | concept_recovery(store, layer, kind))
    return rows, edges, density


def match_summary(cosine: np.ndarray) -> dict:
    """Mean and median best cosine, and the share of latents whose best match is above 0.9 / 0.7."""
    return {"mean": float(cosine.mean()), "median": float(np.median(cosine)),
            "above_0.9": float((cosine > 0.9).mean()), "above_0.7": float((cosine > 0.7).mean())}


def _write(store, layer: str, rows: list[dict], edges: np.ndarray, density: dict, matches: dict) -> list[Path]:
    written = []
    for row in rows:
        sae_id = row["sae_id"]
        written.append(store.write_table_shard("sae_comparison", sae_id, store.table_from_rows("sae_comparison",
                                                                                                 [row]), layer=layer))
        counts, _ = density[sae_id]
        written.append(store.write_table_shard("sae_density", sae_id, pa.table({
            "sae_id": [sae_id] * len(counts), "lo": edges[:-1].astype(np.float32), "hi": edges[1:].astype(np.float32),
            "count": counts}), layer=layer))
    for (a, b), (index, cosine) in matches.items():
        written.append(store.write_table_shard("sae_matches", f"{a}-vs-{b}", pa.table({
            "sae_a": [a] * len(index), "sae_b": [b] * len(index), "feature_a": np.arange(len(index), dtype=np.int32),
            "feature_b": index.astype(np.int32), "cosine": cosine.astype(np.float32)}), layer=layer))
    return written


# ------------------------------------------------------------------------------------------------ the figure


def comparison_figure(layer: str, edges: np.ndarray, density: dict, matches: dict):
    """Two panels: the density histograms of the SAEs overlaid (dead latents in the legend), and the histogram of
    best-match cosines of each ordered pair."""
    from backend.analysis.draw import PALETTE, Axes, canvas

    img = canvas(760, 560)
    top = max((int(c.max(initial=0)) for c, _ in density.values()), default=1)
    ax = Axes(img, (70, 60, 740, 250), (float(edges[0]), float(edges[-1])), (0.0, float(max(top, 1))))
    ax.frame(title=f"{layer}: activation density", xlabel="log10 firing frequency (share of sample tokens)",
             ylabel="latents")
    for i, (counts, _) in enumerate(density.values()):
        ax.step_hist(edges, counts, PALETTE[i % len(PALETTE)])
    _legend(img, ax, [(f"{s} ({dead} dead)", PALETTE[i % len(PALETTE)])
                      for i, (s, (_, dead)) in enumerate(density.items())])
    low = min(0.0, min((float(c.min(initial=0)) for _, c in matches.values()), default=0.0))
    cos_edges = np.linspace(low, 1.0, 41)
    hists = {pair: np.histogram(c, cos_edges)[0] for pair, (_, c) in matches.items()}
    top = max((int(h.max(initial=0)) for h in hists.values()), default=1)
    ax = Axes(img, (70, 340, 740, 510), (low, 1.0), (0.0, float(max(top, 1))))
    ax.frame(title="decoder matching: best cosine of each latent of A with any latent of B",
             xlabel="best cosine", ylabel="latents of A")
    for i, counts in enumerate(hists.values()):
        ax.step_hist(cos_edges, counts, PALETTE[i % len(PALETTE)])
    _legend(img, ax, [(f"{a} -> {b}", PALETTE[i % len(PALETTE)]) for i, (a, b) in enumerate(hists)])
    return img


def _legend(img, ax, entries: list[tuple[str, tuple[int, int, int]]]) -> None:
    """Entries one per line inside the panel's top-left corner (names are longer than Axes.legend fits)."""
    from PIL import ImageDraw

    from backend.analysis.draw import INK, font

    draw = ImageDraw.Draw(img)
    left, t, _, _ = ax.box
    for row, (name, colour) in enumerate(entries):
        y = t + 10 + 14 * row
        draw.line([(left + 8, y), (left + 24, y)], fill=colour, width=3)
        draw.text((left + 28, y), name, fill=INK, font=font(11), anchor="lm")
