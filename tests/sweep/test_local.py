"""The local executor end to end: a 2-point sweep of SAE k on the demo model (the second run starts from the first
run's capture), an interrupted sweep resumes without redoing its finished run, and a failed run is recorded and
makes the command exit non-zero at the end."""

from __future__ import annotations

import json

import polars as pl
import pytest
from typer.testing import CliRunner

from backend.errors import DifflensError
from backend.sweep import local
from backend.sweep.command import run_sweep
from cli import app


@pytest.mark.slow
def test_two_point_sweep_runs_resumes_and_shares_the_capture(tiny_config, monkeypatch, one_thread):
    real, calls = local.run_one, []

    def interrupt_second(plan, name, **kw):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the sweep is killed during its second run
        return real(plan, name, **kw)

    monkeypatch.setattr(local, "run_one", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(["sae.k=4,8"], tiny_config, progress=False)
    runs = tiny_config.parent / "runs"
    sweep = json.loads((runs / "sweeps" / "t" / "sweep.json").read_text())
    assert [(r["name"], r["status"]) for r in sweep["runs"]] == [("t-k4", "done"), ("t-k8", "running")]

    calls.clear()
    monkeypatch.setattr(local, "run_one", lambda plan, name, **kw: calls.append(name) or real(plan, name, **kw))
    lines = []
    result = run_sweep(["sae.k=4,8"], tiny_config, progress=False, echo=lines.append)
    assert calls == ["t-k8"], "the finished run is skipped, the interrupted one resumed"
    assert lines[0] == "[1/2] t-k4: finished already, skipped" and "(resuming)" in lines[1]
    assert [r["status"] for r in result.runs] == ["done", "done"] and not result.failed
    sweep = json.loads(result.path.read_text())
    assert sweep["grid"] == {"sae.k": [4, 8]} and sweep["base"]["name"] == "t"

    metrics = {name: pl.read_parquet(runs / name / "tables" / "sae_metrics.parquet") for name in ("t-k4", "t-k8")}
    assert metrics["t-k4"]["l0"][0] == pytest.approx(4) and metrics["t-k8"]["l0"][0] == pytest.approx(8)
    manifests = {n: json.loads((runs / n / "manifest.json").read_text()) for n in ("t-k4", "t-k8")}
    assert manifests["t-k8"]["config"]["sae"]["k"] == 8
    assert manifests["t-k8"]["stages"]["capture"]["shared_from"] == "t-k4"  # captured once
    assert manifests["t-k8"]["stages"]["capture"]["key"] == manifests["t-k4"]["stages"]["capture"]["key"]
    first, second = (runs / n / "images" / "000000.png" for n in ("t-k4", "t-k8"))
    assert first.stat().st_ino == second.stat().st_ino  # hard links, not copies
    assert (runs / "t-k8" / "tables" / "concept_summary.parquet").is_file()
    assert lines[-1] == f"figure: {runs / 'sweeps' / 't' / 'metrics.png'}"  # drawn once every run is done

    calls.clear()
    again = run_sweep(["sae.k=4,8"], tiny_config, progress=False, echo=lines.append)
    assert calls == [] and [r["status"] for r in again.runs] == ["done", "done"]


def test_a_failed_run_is_recorded_and_the_command_exits_non_zero(tiny_config, monkeypatch):
    def fail_k8(plan, name, **kw):
        if name == "t-k8":
            raise DifflensError("something the user can fix")
        return 0.0

    monkeypatch.setattr(local, "run_one", fail_k8)
    monkeypatch.setattr(local, "run_finished", lambda cfg: False)
    result = CliRunner().invoke(app, ["sweep", "--config", str(tiny_config), "sae.k=4,8,16"])
    assert result.exit_code == 1, result.output
    sweep = json.loads((tiny_config.parent / "runs" / "sweeps" / "t" / "sweep.json").read_text())
    assert [r["status"] for r in sweep["runs"]] == ["done", "failed", "done"]  # the sweep went on after the failure
    assert sweep["runs"][1]["error"] == "something the user can fix"
    assert "t-k8" in result.output and "failed: something the user can fix" in result.output
