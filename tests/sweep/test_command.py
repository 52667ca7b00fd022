"""`python cli.py sweep`: a bad key, a bad value and an unknown profile are one-line errors that create nothing; a
dry run writes nothing; a sweep of the same name with another grid is refused."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


@pytest.mark.parametrize("args, message", [
    (["sae.kk=8,16"], "error: sweep grid [sae]: unknown key(s) kk; valid keys:"),
    (["sae.k=8,abc"], "error: sweep grid [sae]: k must be int (got 'abc')"),
    (["sae.k=8,100000"], "error: sae.k = 100000 is out of range for up_blocks.1.attentions.1"),
    (["sae.k=8,16", "--executor", "slurm", "--profile", "nope"], "error: unknown profile 'nope'; profiles: "),
    (["sae.k=8,16", "--executor", "slurm"], "error: --executor slurm needs --profile NAME"),
    (["sae.k=8,16", "--executor", "pbs"], "error: unknown executor 'pbs'; use one of local, slurm"),
])
def test_bad_sweeps_are_one_line_errors_and_create_nothing(tiny_config, args, message):
    result = runner.invoke(app, ["sweep", "--config", str(tiny_config), *args])
    assert result.exit_code == 1
    assert result.output.startswith(message) and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tiny_config.parent / "runs").exists()


def test_dry_run_lists_the_runs_and_writes_nothing(tiny_config):
    result = runner.invoke(app, ["sweep", "--config", str(tiny_config), "--name", "grid", "sae.k=4,8",
                                 "sae.expansion=2,4", "--dry-run"])
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.output.splitlines()[1:]]
    assert names == ["grid-k4-expansion2", "grid-k4-expansion4", "grid-k8-expansion2", "grid-k8-expansion4"]
    assert not (tiny_config.parent / "runs").exists()


def test_a_sweep_name_holding_another_grid_is_refused(tiny_config):
    from backend.fileio import atomic_write_json
    from backend.sweep.grid import plan_sweep
    from backend.sweep.manifest import new_manifest, sweep_path

    plan = plan_sweep(["sae.k=4,8"], tiny_config)
    atomic_write_json(sweep_path(plan.runs_dir, plan.name), new_manifest(plan))
    result = runner.invoke(app, ["sweep", "--config", str(tiny_config), "sae.k=4,16", "--dry-run"])
    assert result.exit_code == 1 and "holds a sweep with another base config or grid" in result.output
