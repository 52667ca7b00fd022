"""What a run's manifest says, as the pages show it: the manifest itself (cached), its stages, layers, model, and the
run's step count and guidance.

The step count and guidance come from backend/run/manifest.py (`captured_steps`, `captured_guidance`: as captured,
else as configured), the same precedence RunContext uses; nothing in the inspector counts steps another way.
"""

from __future__ import annotations

import polars as pl
import streamlit as st

from backend.run.manifest import captured_guidance, captured_steps, stage
from inspector.runs import Run, read_manifest

__all__ = ["analysis_done", "analysis_status", "captured_guidance", "captured_steps", "manifest", "run_layers",
           "run_model", "stage_table"]


def manifest(run: Run) -> dict:
    """The run's manifest.json (RunError when it is not valid JSON, e.g. half-written by hand)."""
    return _manifest(run.path, run.sig)


@st.cache_data(max_entries=64, show_spinner=False)
def _manifest(path: str, sig: str) -> dict:
    return read_manifest(path)


def stage_table(man: dict) -> pl.DataFrame:
    """stage, status, seconds from a manifest's stages (the sae stage's per-layer entries summed)."""
    rows = []
    for name, info in (man.get("stages") or {}).items():
        if not isinstance(info, dict):
            continue
        seconds = info.get("seconds")
        if seconds is None:
            per_layer = [v.get("seconds") for v in info.values() if isinstance(v, dict) and "seconds" in v]
            seconds = float(sum(per_layer)) if per_layer else None
        rows.append({"stage": name, "status": str(info.get("status", "?")),
                     "seconds": float(seconds) if isinstance(seconds, int | float) else None})
    return pl.DataFrame(rows, schema={"stage": pl.String, "status": pl.String, "seconds": pl.Float64})


def run_layers(man: dict) -> list[str]:
    """The run's hook points: as captured, else as configured."""
    config = man.get("config") or {}
    return list(stage(man, "capture").get("layers") or (config.get("capture") or {}).get("layers") or [])


def run_model(man: dict) -> str:
    return str((man.get("config") or {}).get("model", "?"))


def analysis_status(man: dict) -> str:
    return str(stage(man, "analysis").get("status", "not run"))


def analysis_done(man: dict) -> bool:
    return analysis_status(man) == "done"
