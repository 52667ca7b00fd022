"""A sweep run whose capture would repeat an earlier run's (same model, prompts, dtype and capture settings: the run
identity of backend/stages/capture.py) starts from that capture instead of generating again.

The new run directory gets hard links to the finished capture's files (images, token shards, the generations, steps
and channel activity tables, the capture's batch markers) and a manifest whose capture stage is the source's record
(same stage key), with the new run's own config. The capture stage then finds every batch done, and every later
stage runs on the run's own settings. Sharing files is safe because nothing in a run is changed in place: every
writer writes a new file and renames it over the old name, which replaces the link in that run only. Where hard
links are impossible (another filesystem) the files are copied.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from backend.run.config import RunConfig
from backend.run.manifest import is_run
from backend.run.manifest import stage as stage_record
from backend.run.store import RunStore

CAPTURE_PARTS = ("images", "activations", "tables/generations", "tables/steps.parquet", "_done/capture")
"""What a capture writes, run-relative, besides the channel activity partitions (tables/activity/*/kind=channel)."""


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _share(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy)
    elif src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(str(src), str(dst))


def capture_parts(root: Path) -> list[Path]:
    """The run-relative paths a finished capture consists of."""
    parts = [Path(p) for p in CAPTURE_PARTS]
    activity = root / "tables" / "activity"
    parts += [p.relative_to(root) for p in sorted(activity.glob("layer=*/kind=channel"))]
    return parts


def shared_capture_source(cfg: RunConfig, candidates: list[Path]) -> Path | None:
    """The first candidate run directory holding a finished capture of cfg's run identity."""
    from backend.stages.capture import run_identity

    identity = run_identity(cfg)
    for root in candidates:
        if not is_run(root):
            continue
        manifest = RunStore(root).read_manifest() or {}
        if manifest.get("identity") == identity and stage_record(manifest, "capture").get("status") == "done":
            return root
    return None


def start_from_capture(cfg: RunConfig, source: Path) -> Path:
    """Make cfg's run directory (which must not exist) from source's finished capture; returns it. The directory is
    built under a temporary name and renamed into place, so a kill leaves no half-made run."""
    from backend.stages.capture import versions

    target = cfg.out_dir
    work = target.with_name(f".{target.name}.sharing")
    shutil.rmtree(work, ignore_errors=True)
    for rel in capture_parts(source):
        _share(source / rel, work / rel)
    manifest = RunStore(source).read_manifest() or {}
    RunStore(work).write_manifest({
        "identity": manifest["identity"], "config": cfg.to_dict(), "versions": versions(), "created": time.time(),
        "stages": {"capture": dict(stage_record(manifest, "capture"), shared_from=source.name)},
    })
    os.replace(work, target)
    return target
