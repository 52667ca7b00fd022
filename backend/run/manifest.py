"""manifest.json read without torch: the run's stages and generation settings, for the backend and the inspector.

RunContext (backend/run/context.py) is built on these; the inspector uses them directly (it must not import
torch). docs/run-format.md lists the manifest's keys.
"""

from __future__ import annotations

from pathlib import Path

MANIFEST = "manifest.json"


def stage(manifest: dict, name: str) -> dict:
    """The manifest record of a stage ({} when it never ran)."""
    return (manifest.get("stages") or {}).get(name) or {}


def captured_steps(manifest: dict) -> int | None:
    """Denoising steps of the run's generations: as captured, else as configured (None: the model's default)."""
    n = stage(manifest, "capture").get("n_steps") or ((manifest.get("config") or {}).get("capture") or {}).get("steps")
    return int(n) if n else None


def captured_guidance(manifest: dict) -> float | None:
    """CFG scale of the run's generations: as captured, else as configured (None: the model's default)."""
    g = stage(manifest, "capture").get("guidance")
    if g is None:
        g = ((manifest.get("config") or {}).get("capture") or {}).get("guidance")
        if g is not None and g < 0:
            g = None
    return None if g is None else float(g)


def manifest_path(root: str | Path) -> Path:
    return Path(root) / MANIFEST


def is_run(path: str | Path) -> bool:
    """The one test of "is this a run directory": it holds a manifest.json."""
    return manifest_path(path).is_file()


def not_a_run_message(path: str | Path) -> str:
    return (f"{path} is not a run directory (no manifest.json); make one with `python cli.py run-all` or "
            "`python cli.py capture`")


def not_a_run(path: str | Path):
    from backend.errors import DifflensError

    return DifflensError(not_a_run_message(path))
