"""The GPU path's plumbing, proven on a CPU: every command that runs a run's model loads it on the run's device and
dtype unless --device / --dtype say otherwise (model loads recorded by a stand-in for backend.models.load_model,
CUDA availability faked), `capture --sae` on a finished run keeps the run's device and puts the SAE on this rank's
GPU, and devices this machine lacks are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from analysis_runs import dense_activity, gens_for, make_run
from intervention_runs import LAYER, make_intervention_run, random_sae
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


class Loaded(Exception):
    """Raised by the stand-in load_model: the command got as far as loading the model, with these arguments."""


@pytest.fixture
def loads(monkeypatch):
    """Record every backend.models.load_model call as (spec, device, dtype) and stop the command there."""
    import backend.models

    calls = []

    def fake_load(spec="demo", device="cpu", dtype=torch.float32):
        calls.append((str(spec), str(device), dtype))
        raise Loaded(calls[-1])

    monkeypatch.setattr(backend.models, "load_model", fake_load)
    return calls


@pytest.fixture
def fake_gpus(monkeypatch):
    """A node with 4 visible GPUs (nothing runs on them: model loads are recorded, not done)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def _set_config(root, **config) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["config"].update(config)
    (root / "manifest.json").write_text(json.dumps(manifest))


def _set_stage(root, name: str, **fields) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["stages"].setdefault(name, {}).update(fields)
    (root / "manifest.json").write_text(json.dumps(manifest))


def intervention_run(root, device: str, dtype: str):
    """An analysed run with an SAE (tests/intervention_runs.py), saved with this device and dtype."""
    make_intervention_run(root, random_sae())
    _set_config(root, device=device, dtype=dtype)
    _set_stage(root, "analysis", status="done", partitions=[f"{LAYER}/channel", f"{LAYER}/feature"])
    return root


def sae_run(root, device: str, dtype: str):
    """A captured run without SAEs whose token shards are 64 wide (what train-sae checks before training)."""
    make_intervention_run(root, None)
    _set_config(root, device=device, dtype=dtype)
    _set_stage(root, "capture", layers=[LAYER])
    meta = root / "activations" / LAYER / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"d": 64, "dtype": "float16", "count": 1000}))
    return root


def analysis_run(root, device: str, dtype: str):
    """A captured run with channel activity: analyze computes the profiles, then replays examples with the model."""
    gens = gens_for(4, ["a", "b"])
    rng = np.random.default_rng(0)
    make_run(root, gens, 3, {(LAYER, "channel"): dense_activity(rng.uniform(0.1, 1, (4, 3, 2)).astype(np.float32))})
    _set_config(root, device=device, dtype=dtype)
    return root


# command -> (run builder, arguments after --run RUN)
COMMANDS = {
    "steer": (intervention_run, ["--layer", LAYER, "--unit", "5", "--kind", "channel", "--seeds", "0"]),
    "edit": (intervention_run, ["--layer", LAYER, "--seeds", "0"]),
    "ablate": (intervention_run, []),
    "steer-report": (intervention_run, ["--seeds", "0"]),
    "dream": (intervention_run, ["--layer", LAYER, "--kind", "channel", "--unit", "5"]),
    "intervene": (intervention_run, []),
    "train-sae": (sae_run, ["--splice-samples", "1"]),
    "analyze": (analysis_run, []),
}


def _invoke(command: str, run, *options: str):
    _, args = COMMANDS[command]
    return runner.invoke(app, [command, "--run", str(run), *args, *options])


@pytest.fixture
def stub_sae_training(monkeypatch):
    """train-sae trains nothing: the training of a layer records its device and returns metrics, so the command
    goes on to the splice test, which loads the run's model."""
    import backend.stages.sae

    devices = []

    def fake_train(store, layer, cfg, progress, write=True, device="cpu", key=""):
        devices.append(device)
        return {"fvu": 0.1, "l0": 16.0, "dead_frac": 0.0, "dense_frac": 0.0, "tokens": 1, "seconds": 0.0}

    monkeypatch.setattr(backend.stages.sae, "_train_layer", fake_train)
    return devices


@pytest.mark.parametrize("command", list(COMMANDS))
def test_options_reach_the_model_load(command, tmp_path, loads, stub_sae_training):
    """A run made on the CPU in float32; --device meta --dtype bfloat16 is what the model is loaded with."""
    run = COMMANDS[command][0](tmp_path / "run", "cpu", "float32")
    result = _invoke(command, run, "--device", "meta", "--dtype", "bfloat16")
    assert isinstance(result.exception, Loaded), result.output
    assert loads == [("demo", "meta", torch.bfloat16)]
    if command == "train-sae":
        assert stub_sae_training == ["meta"]  # the SAE trains on the chosen device too


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_runs_device_and_dtype_by_default(command, tmp_path, loads, stub_sae_training, fake_gpus):
    """A run made on a GPU node in float16: without options its model loads there again."""
    run = COMMANDS[command][0](tmp_path / "run", "cuda:3", "float16")
    result = _invoke(command, run)
    assert isinstance(result.exception, Loaded), result.output
    assert loads == [("demo", "cuda:3", torch.float16)]
    if command == "train-sae":
        assert stub_sae_training == ["cuda:3"]


def test_analysis_device_keeps_the_dtype(tmp_path, loads):
    """analyze --device is the [analysis] device of the heat-map replay; --dtype still reaches the model (a replay
    context made for another device used to fall back to the run's dtype)."""
    run = analysis_run(tmp_path / "run", "cpu", "float32")
    result = _invoke("analyze", run, "--device", "meta", "--dtype", "float16")
    assert isinstance(result.exception, Loaded), result.output
    assert loads == [("demo", "meta", torch.float16)]


@pytest.mark.parametrize("command", ["steer", "dream", "ablate"])
def test_a_gpu_run_on_a_cpu_node_is_a_one_line_error(command, tmp_path, loads):
    """This machine has no CUDA (a CPU build of torch): the run's cuda device is refused before anything loads,
    saying how to use the CPU instead; --device cpu then works."""
    assert not torch.cuda.is_available()
    run = intervention_run(tmp_path / "run", "cuda", "bfloat16")
    result = _invoke(command, run)
    assert result.exit_code == 1 and loads == []
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error: device 'cuda' (the run's device; pass --device cpu")
    assert "CUDA" in line
    result = _invoke(command, run, "--device", "cpu")
    assert isinstance(result.exception, Loaded) and loads == [("demo", "cpu", torch.bfloat16)]


@pytest.mark.parametrize("options, message", [
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--device", "cuda"], "CPU build without CUDA"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
])
def test_bad_device_or_dtype_options(options, message, tmp_path, loads):
    run = intervention_run(tmp_path / "run", "cpu", "float32")
    result = _invoke("steer", run, *options)
    assert result.exit_code == 1 and loads == [], result.output
    assert message in result.output and result.output.count("\n") == 1


def test_more_gpus_asked_than_visible(tmp_path, loads, fake_gpus):
    run = intervention_run(tmp_path / "run", "cpu", "float32")
    result = _invoke("edit", run, "--device", "cuda:7")
    assert result.exit_code == 1 and "sees 4 GPU(s)" in result.output


def test_a_finished_stage_needs_no_device(tmp_path, loads):
    """intervene on a run whose interventions are done loads no model, so a GPU run's device is not checked on a
    CPU node (only an explicit --device is)."""
    run = intervention_run(tmp_path / "run", "cuda", "float16")
    first = runner.invoke(app, ["intervene", "--run", str(run), "--device", "cpu"])
    assert isinstance(first.exception, Loaded)
    _set_stage(run, "interventions", status="done")
    from backend.run.context import open_run
    from backend.stages.interventions import planned_parts

    ctx = open_run(run)
    cfg = ctx.resolve()
    for name, _ in planned_parts(ctx.store, cfg.interventions):
        ctx.store.mark_batch_done("interventions", name)
    loads.clear()
    result = runner.invoke(app, ["intervene", "--run", str(run)])
    assert result.exit_code == 0, result.output
    assert loads == []


# ------------------------------------------------------------------------------------------------ capture --sae


@pytest.fixture
def recorded_capture(monkeypatch):
    """capture_with_saes with its SAE loading and the capture itself recorded instead of done."""
    import backend.stages.capture as capture_module

    seen = {}

    class FakeEncoder:
        def __init__(self, path, device="cpu"):
            seen.setdefault("sae_devices", []).append(str(device))

    def fake_capture(cfg, overwrite=False, model=None, encoders=None, progress=True):
        seen.update(device=cfg.device, dtype=cfg.dtype, images_per_prompt=cfg.capture.images_per_prompt)
        raise Loaded(seen)

    monkeypatch.setattr(capture_module, "SAEEncoder", FakeEncoder)
    monkeypatch.setattr(capture_module, "capture", fake_capture)
    return seen


SRUN_TASK_2 = dict(SLURM_STEP_ID="0", SLURM_PROCID="2", SLURM_NTASKS="4", SLURM_STEP_NUM_TASKS="4",
                   SLURM_LOCALID="2")


def _finished_gpu_run(runs_dir):
    root = runs_dir / "gpu"
    make_intervention_run(root, random_sae())
    _set_config(root, name="gpu", runs_dir=str(runs_dir), device="cuda", dtype="bfloat16",
                capture={"images_per_prompt": 3, "layers": [LAYER]})
    return root


def test_capture_sae_on_a_finished_run_keeps_its_device(tmp_path, monkeypatch, recorded_capture, fake_gpus):
    """capture --sae LAYER=PATH on a run made with --device cuda --dtype bfloat16, as task 2 of an srun step:
    the run's settings are used (not the CPU defaults) and the SAE loads on this task's GPU."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for k, v in SRUN_TASK_2.items():
        monkeypatch.setenv(k, v)
    root = _finished_gpu_run(tmp_path / "runs")
    result = runner.invoke(app, ["capture", "--runs-dir", str(tmp_path / "runs"), "--name", "gpu",
                                 "--sae", f"{LAYER}={root}/sae/{LAYER}"])
    assert isinstance(result.exception, Loaded), result.output
    assert recorded_capture == {"sae_devices": ["cuda:2"], "device": "cuda", "dtype": "bfloat16",
                                "images_per_prompt": 3}


def test_capture_sae_options_still_win(tmp_path, recorded_capture, fake_gpus):
    root = _finished_gpu_run(tmp_path / "runs")
    result = runner.invoke(app, ["capture", "--runs-dir", str(tmp_path / "runs"), "--name", "gpu", "--device",
                                 "cuda:1", "--sae", f"{LAYER}={root}/sae/{LAYER}"])
    assert isinstance(result.exception, Loaded), result.output
    assert recorded_capture["sae_devices"] == ["cuda:1"] and recorded_capture["device"] == "cuda:1"


def test_capture_sae_of_a_gpu_run_on_a_cpu_node(tmp_path, recorded_capture):
    """No silent fall-back to the CPU: the run's cuda device on a machine without CUDA is an error that says so."""
    root = _finished_gpu_run(tmp_path / "runs")
    result = runner.invoke(app, ["capture", "--runs-dir", str(tmp_path / "runs"), "--name", "gpu",
                                 "--sae", f"{LAYER}={root}/sae/{LAYER}"])
    assert result.exit_code == 1 and "device 'cuda'" in result.output and recorded_capture == {}
