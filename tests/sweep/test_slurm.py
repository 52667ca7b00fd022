"""The SLURM executor without a cluster: the sbatch script submitit would submit (partition, array size, resources,
setup lines) from a profile, and the same job array run by submitit's LocalExecutor, then `sweep --status`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from backend.sweep.command import run_sweep, sweep_status
from cli import app


def test_dry_run_prints_the_submission_script_and_submits_nothing(tiny_config):
    result = CliRunner().invoke(app, ["sweep", "--config", str(tiny_config), "sae.k=4,8,16", "sae.expansion=2,4",
                                      "--executor", "slurm", "--profile", "example-cluster", "--dry-run"])
    assert result.exit_code == 0, result.output
    script = result.output
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=my-project", "#SBATCH --array=0-5%6",
                 "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=128GB", "#SBATCH --time=240",
                 "#SBATCH --job-name=difflens-t", "source .venv/bin/activate", "module load cuda/12.8"):
        assert line in script.splitlines(), line
    assert "-m submitit.core._submit" in script and script.index("# setup") < script.index("srun ")
    assert sum(" pending" in line for line in script.splitlines()) == 6
    assert not (tiny_config.parent / "runs").exists()


def test_array_parallelism_caps_the_array(tmp_path, tiny_config):
    profile = tmp_path / "small.toml"
    profile.write_text('partition = "debug"\narray_parallelism = 2\ntime_limit = "00:30:00"\nmem_gb = 1.5\n')
    result = run_sweep(["sae.k=2,4,8"], tiny_config, executor="slurm", profile=str(profile), dry_run=True)
    assert "#SBATCH --array=0-2%2" in result.script and "#SBATCH --time=30" in result.script
    assert "#SBATCH --mem=1536MB" in result.script and "gpus" not in result.script


@pytest.mark.slow
def test_the_job_array_runs_under_submitits_local_executor(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    profile = tmp_path / "here.toml"
    profile.write_text('cpus_per_task = 1\ntime_limit = "00:20:00"\n')
    result = run_sweep(["sae.k=4,8"], tiny_config, executor="slurm", profile=str(profile), cluster="local")
    assert [r["status"] for r in result.runs] == ["submitted", "submitted"]
    reports = [job.result() for job in result.jobs]  # waits for both tasks
    assert [r["status"] for r in reports] == ["done", "done"]
    status = sweep_status(tiny_config.parent / "runs", "t")
    assert [(r["name"], r["status"], r["job_state"]) for r in status.runs] == [("t-k4", "done", "FINISHED"),
                                                                             ("t-k8", "done", "FINISHED")]
    saved = json.loads(status.path.read_text())
    assert saved["executor"] == "slurm" and saved["cluster"] == "local"
    assert all(r["job_id"] for r in saved["runs"])
    for name in ("t-k4", "t-k8"):
        assert (tiny_config.parent / "runs" / name / "tables" / "concept_summary.parquet").is_file()
    # submitting again submits nothing: both runs are finished
    again = run_sweep(["sae.k=4,8"], tiny_config, executor="slurm", profile=str(profile), cluster="local")
    assert again.jobs == []
