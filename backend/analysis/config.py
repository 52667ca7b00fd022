"""AnalysisConfig: every setting of the analysis stage (the `[analysis]` section of a run config)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class AnalysisConfig:
    """What `python cli.py analyze` computes and how; the defaults suit the demo run."""

    top_k_channels: int = 20
    """A channel is active in a (generation, step) when it is among that step's top-k channels by `pool`."""
    feature_threshold: float = 0.0
    """A feature is active in a (generation, step) when its spatial max code exceeds this."""
    pool: str = "mean"
    """Spatial pooling that ranks channels for top-k and scores concepts: "mean" or "max" of the map."""
    histogram_bins: int = 30
    """Bins of each unit's activation histograms (spatial max and mean; the `histograms` table)."""
    active_freq: float = 0.05
    """A step is an active step of a unit when the unit's freq there exceeds this (first/last_active)."""
    peak_on: str = "freq"
    """Profile the peaks are found on: "freq", "mean" or "max"."""
    peak_min_height: float = 0.05
    """find_peaks minimum height, in units of the `peak_on` profile."""
    peak_min_separation: float = 100.0
    """Minimum separation between two peaks in scheduler timesteps (converted to steps; at least 1 step)."""
    peaks_top_n: int = 3
    """Peaks kept per unit, highest first. Profile ends can be peaks (the profile is padded below its minimum)."""
    dense_density: float = 0.9
    """A unit is dense when active in more than this share of all (generation, step) pairs."""
    dead_density: float = 0.0
    """A unit is dead when active in at most this share of all (generation, step) pairs."""
    examples_top_n: int = 8
    """Top generations per unit, over all steps (step = -1) and at each peak step."""
    example_stat: str = "max"
    """Activity column that ranks examples: "max" (spatial max) or "mean"."""
    replay_batch_size: int = 32
    """Generations replayed per batch to record example heat-maps."""
    replay_tolerance: float = 1e-3
    """Relative tolerance between a replayed map's pooled value and the recorded activity (else an error)."""
    compare_multiplier: float = 2.0
    """`compare` keeps units with freq_a > m * freq_b (m is this)."""
    compare_pseudo_count: float = 0.5
    """Pseudo-count added to active and inactive counts in the log-odds ratio."""
    compare_all_pairs_max_groups: int = 6
    """`analyze` writes comparisons for every ordered pair of prompt groups when there are at most this many."""
    concepts_top_n: int = 5
    """Best units per concept written to `concepts`."""
    spatial_attributes: list[str] = field(default_factory=lambda: ["position"])
    """Prompt attributes scored by heat-map localisation instead of AUROC."""
    localise_attribute: str = "shape"
    """The best unit of each value of this attribute is checked for localisation of the spatial attribute."""
    localise_min_positions: int = 3
    """The best-localising unit is chosen among units whose top examples span at least this many positions."""
    plot_top_units: int = 6
    """Units per (layer, kind) that get a profile figure: best concept units, then the highest peaks."""
    duckdb_memory_limit: str = "2GB"
    """DuckDB memory_limit (it spills to a temp directory beyond it)."""
    duckdb_threads: int = 2
    """DuckDB worker threads."""
    device: str = ""
    """torch device for the heat-map replay; empty: the run's device."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate(cfg: AnalysisConfig) -> AnalysisConfig:
    """Raise a one-line DifflensError for a setting out of range."""
    from backend.errors import DifflensError

    choices = {"pool": ("mean", "max"), "peak_on": ("freq", "mean", "max"), "example_stat": ("mean", "max")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise DifflensError(f"analysis.{name} is {getattr(cfg, name)!r}; use one of {', '.join(allowed)}")
    for name in ("top_k_channels", "histogram_bins", "peaks_top_n", "examples_top_n", "replay_batch_size",
                 "concepts_top_n", "duckdb_threads"):
        if getattr(cfg, name) < 1:
            raise DifflensError(f"analysis.{name} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.compare_pseudo_count <= 0:
        raise DifflensError(f"analysis.compare_pseudo_count must be > 0 (got {cfg.compare_pseudo_count})")
    return cfg
