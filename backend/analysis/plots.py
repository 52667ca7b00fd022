"""Static figures (PNG): activity profiles of top units with their peaks marked, and the frequency histogram
of a group comparison. Written under media/ of the run; paths in tables are relative to the run directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from backend.analysis.draw import PALETTE, Axes, canvas


def profile_figure(title: str, profile: pl.DataFrame, peaks: pl.DataFrame, peak_on: str) -> Image.Image:
    """Two panels over steps: freq (top) and mean/max (bottom); peaks (of the `peak_on` profile) marked."""
    img = canvas(720, 480)
    steps = profile["step"].to_numpy()
    xlim = (float(steps.min()), float(steps.max())) if len(steps) else (0.0, 1.0)
    top = Axes(img, (70, 56, 700, 216), xlim, (0.0, 1.0))
    top.frame(title=title, ylabel="freq (share of generations active)")
    top.line(steps, profile["freq"].to_numpy(), PALETTE[0])
    values = np.concatenate([profile["mean"].to_numpy(), profile["max"].to_numpy()])
    bottom = Axes(img, (70, 272, 700, 432), xlim, (float(values.min(initial=0)), float(values.max(initial=1))))
    bottom.frame(xlabel="denoising step", ylabel="activation (mean and max over generations)")
    bottom.line(steps, profile["mean"].to_numpy(), PALETTE[0])
    bottom.line(steps, profile["max"].to_numpy(), PALETTE[1])
    bottom.legend([("mean", PALETTE[0]), ("max", PALETTE[1])])
    axes = top if peak_on == "freq" else bottom
    column = profile.sort("step")[peak_on].to_numpy()
    for rank, step in zip(peaks["rank"].to_list(), peaks["step"].to_list(), strict=True):
        top.vline(step, label=f"peak {rank}")
        bottom.vline(step)
        axes.points([step], [column[int(np.searchsorted(steps, step))]])
    return img


def frequency_histogram(panels: list[tuple[str, np.ndarray, np.ndarray, list[tuple[int, float]]]], group_a: str,
                        group_b: str) -> Image.Image:
    """One panel per (layer, kind): histograms of units' freq in A and in B; top differential units marked."""
    height = 70 + 236 * max(len(panels), 1)
    img = canvas(720, height)
    for i, (title, fa, fb, marked) in enumerate(panels):
        hi = float(max(fa.max(initial=0), fb.max(initial=0), 1e-6))
        edges = np.linspace(0, hi, 26)
        ca, _ = np.histogram(fa, edges)
        cb, _ = np.histogram(fb, edges)
        ax = Axes(img, (70, 56 + 236 * i, 700, 216 + 236 * i), (0.0, hi), (0.0, float(max(ca.max(), cb.max(), 1))))
        ax.frame(title=title, xlabel="activation frequency", ylabel="units")
        ax.step_hist(edges, cb, PALETTE[1])
        ax.step_hist(edges, ca, PALETTE[0])
        ax.legend([(group_a, PALETTE[0]), (group_b, PALETTE[1])])
        for row, (unit, freq) in enumerate(marked):
            ax.vline(freq, label=f"unit {unit}", row=row)
    return img


def top_units(units: pl.DataFrame, peaks: pl.DataFrame, concept_units: list[int], n: int) -> list[int]:
    """The concepts' best units first, then the highest-peaked units that are neither dead nor dense."""
    live = units.filter(~pl.col("dead") & ~pl.col("dense"))["unit"].implode()
    by_peak = (peaks.filter((pl.col("rank") == 1) & pl.col("unit").is_in(live))
               .sort(["height", "unit"], descending=[True, False])["unit"].to_list())
    out: list[int] = []
    for u in [*concept_units, *by_peak]:
        if u not in out:
            out.append(int(u))
    return out[:n]


def write_profile_plots(store, layer: str, kind: str, profiles: pl.DataFrame, peaks: pl.DataFrame,
                        units: list[int], peak_on: str) -> list[Path]:
    """media/plots/<layer>/<kind>-<unit>.png for each unit."""
    paths = []
    for unit in units:
        fig = profile_figure(f"{layer} {kind} {unit}", profiles.filter(pl.col("unit") == unit).sort("step"),
                             peaks.filter(pl.col("unit") == unit).sort("rank"), peak_on)
        rel = Path("media") / "plots" / layer / f"{kind}-{unit:05d}.png"
        store.write_png(rel, fig)
        paths.append(store.root / rel)
    return paths


def write_run_plots(run, cfg, partitions=None) -> list[Path]:
    """Profile figures of the top units of every analysed (layer, kind) of a run (directory or RunContext); needs
    `analyze` first."""
    from backend.analysis.inputs import load_inputs, read_part

    inputs = load_inputs(run)
    out = []
    for part in partitions or inputs.partitions:
        profiles = read_part(inputs.store, "profiles", part)
        peaks = read_part(inputs.store, "peaks", part)
        units = read_part(inputs.store, "units", part)
        concepts_path = inputs.store.partition_dir("concepts", part.layer, part.kind) / "part-0000000.parquet"
        concept_units = []
        if concepts_path.is_file():
            concept_units = pl.read_parquet(concepts_path).filter(pl.col("rank") == 1).sort("auroc", descending=True)[
                "unit"].to_list()
        chosen = top_units(units, peaks, concept_units, cfg.plot_top_units)
        out += write_profile_plots(inputs.store, part.layer, part.kind, profiles, peaks, chosen, cfg.peak_on)
    return out
