"""run-all: every stage in order on one config, each resuming where it stopped.

capture -> sae (train one SAE per layer, splice test) -> features (capture pass recording SAE feature activity)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from backend.config import RunConfig


@dataclass
class RunAllSummary:
    out_dir: Path
    stages: dict[str, object] = field(default_factory=dict)


def run_all(cfg: RunConfig, overwrite: bool = False, progress: bool = True) -> RunAllSummary:
    """Run every stage into cfg.out_dir; a finished stage is skipped, an interrupted one resumes."""
    from backend.capture import SAEEncoder, capture
    from backend.sae_stage import train_saes
    from backend.store import RunStore

    summary = RunAllSummary(cfg.out_dir)
    summary.stages["capture"] = capture(cfg, overwrite=overwrite, progress=progress)
    summary.stages["sae"] = train_saes(cfg.out_dir, cfg.sae, progress=progress)
    if cfg.sae.record_features:
        store = RunStore(cfg.out_dir)
        encoders = {layer: SAEEncoder(store.sae_dir(layer), device=cfg.device) for layer in summary.stages["sae"]}
        summary.stages["features"] = capture(cfg, encoders=encoders, progress=progress)
    return summary
