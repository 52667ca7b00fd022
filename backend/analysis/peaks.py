"""Peaks and the units table: where in the denoising trajectory each unit acts, and which units are dead or dense.

Peaks come from `scipy.signal.find_peaks` on one profile (cfg.peak_on) with a minimum height and a minimum
separation (given in scheduler timesteps, converted to steps). The profile is padded at both ends with a
value below its minimum, so a unit that is strongest at the first or last step has a peak there. Active steps
are the steps whose freq exceeds cfg.active_freq; density is the share of all (generation, step) pairs in
which the unit is active (the mean of its freq profile).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from scipy.signal import find_peaks

from backend.run.config import AnalysisConfig


def min_distance_steps(timesteps: np.ndarray, separation: float) -> int:
    """A separation in timesteps as a find_peaks distance in steps (at least 1)."""
    if len(timesteps) < 2:
        return 1
    spacing = float(np.median(np.abs(np.diff(timesteps.astype(np.float64)))))
    return max(1, math.ceil(separation / spacing)) if spacing > 0 else 1


def unit_peaks(profile_S: np.ndarray, min_height: float, distance: int, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps, heights) of the top_n highest peaks, highest first (ties: earlier step first)."""
    if len(profile_S) == 0:
        return np.array([], np.int64), np.array([], np.float64)
    low = float(np.min(profile_S)) - 1.0
    padded = np.concatenate([[low], profile_S, [low]])
    idx, props = find_peaks(padded, height=min_height, distance=distance)
    steps, heights = idx - 1, props["peak_heights"]
    order = np.lexsort((steps, -heights))[:top_n]
    return steps[order], heights[order]


def peaks_and_units(profiles: dict[str, np.ndarray], timesteps: np.ndarray,
                    cfg: AnalysisConfig) -> tuple[pa.Table, pa.Table]:
    """The peaks table (unit, step, height, rank) and the units table of one partition, from its [U, S] profiles."""
    freq_US, mean_US, max_US = profiles["freq"], profiles["mean"], profiles["max"]
    distance = min_distance_steps(timesteps, cfg.peak_min_separation)
    target_US = profiles[cfg.peak_on]
    n_units = freq_US.shape[0]
    p_unit, p_step, p_height, p_rank, unit_peak_steps = [], [], [], [], []
    for u in range(n_units):
        steps, heights = unit_peaks(target_US[u], cfg.peak_min_height, distance, cfg.peaks_top_n)
        p_unit.append(np.full(len(steps), u, np.int32))
        p_step.append(steps.astype(np.int16))
        p_height.append(heights.astype(np.float32))
        p_rank.append(np.arange(1, len(steps) + 1, dtype=np.int16))
        unit_peak_steps.append(steps.astype(np.int16).tolist())
    peaks = pa.table({"unit": np.concatenate(p_unit) if p_unit else np.array([], np.int32),
                      "step": np.concatenate(p_step) if p_step else np.array([], np.int16),
                      "height": np.concatenate(p_height) if p_height else np.array([], np.float32),
                      "rank": np.concatenate(p_rank) if p_rank else np.array([], np.int16)})
    active_US = freq_US > cfg.active_freq
    any_active = active_US.any(1)
    first = np.where(any_active, active_US.argmax(1), -1)
    last = np.where(any_active, freq_US.shape[1] - 1 - active_US[:, ::-1].argmax(1), -1)
    density = freq_US.mean(1) if freq_US.shape[1] else np.zeros(n_units)
    units = pa.table({
        "unit": np.arange(n_units, dtype=np.int32),
        "density": density.astype(np.float32),
        "mean": (mean_US.mean(1) if mean_US.shape[1] else np.zeros(n_units)).astype(np.float32),
        "max": (max_US.max(1) if max_US.shape[1] else np.zeros(n_units)).astype(np.float32),
        "peak_steps": pa.array(unit_peak_steps, type=pa.list_(pa.int16())),
        "first_active": first.astype(np.int16),
        "last_active": last.astype(np.int16),
        "active_steps": active_US.sum(1).astype(np.int16),
        "dead": density <= cfg.dead_density,
        "dense": density > cfg.dense_density,
        "label": pa.nulls(n_units, pa.string()),
        "label_confidence": pa.nulls(n_units, pa.float32()),
        "label_step": np.full(n_units, -1, np.int16),
    })
    return peaks, units
