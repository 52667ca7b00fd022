"""run-all: every stage in order on one config, each resuming where it stopped."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from backend.config import RunConfig


@dataclass
class RunAllSummary:
    out_dir: Path
    stages: dict[str, object] = field(default_factory=dict)


def run_all(cfg: RunConfig, overwrite: bool = False, progress: bool = True) -> RunAllSummary:
    """Run the stages that exist (capture) into cfg.out_dir."""
    from backend.capture import capture

    summary = RunAllSummary(cfg.out_dir)
    summary.stages["capture"] = capture(cfg, overwrite=overwrite, progress=progress)
    return summary
