"""The inspector tests' run: tests/inspector_runs.py's small analysed run, built once per session under `runs/tiny`
(tests that change a run copy it first)."""

from __future__ import annotations

from pathlib import Path

import pytest
from inspector_runs import build_run


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inspector") / "runs"
    build_run(root, "tiny")
    return root


@pytest.fixture(scope="session")
def runs_dir_without_histograms(tmp_path_factory) -> Path:
    """The same run without the `histograms` table (histograms are then scanned from the activity)."""
    root = tmp_path_factory.mktemp("inspector-no-histograms") / "runs"
    build_run(root, "tiny", histograms=False)
    return root
