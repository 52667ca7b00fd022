"""The GPU path's plumbing, proven on a CPU: every command that runs a run's model loads it on the run's device and
dtype unless --device / --dtype say otherwise (model loads recorded by a stand-in for backend.models.load_model,
CUDA availability faked), `capture --sae` on a finished run keeps the run's device and puts the SAE on this rank's
GPU, and devices this machine lacks are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

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

    def fake_train(store, layer, cfg, progress, write=True, device="cpu", key="", sae_id="default"):
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


# ------------------------------------------------------------------------------------------------ set-up: Makefile

FAKE_PYTHON = r"""#!/bin/bash
# a stand-in python: logs its arguments (one with a space in quotes); `-m venv DIR` makes DIR/bin/python a stand-in
# too; `-c "import torch..."` succeeds when $HAS_TORCH is set (a venv with a torch already installed)
line="$(basename "$0")"
for a in "$@"; do case "$a" in *" "*|"") line="$line '$a'";; *) line="$line $a";; esac; done
echo "$line" >> "$LOG"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
if [ "$1" = "-c" ]; then
  case "$2" in
    *"import torch"*) [ -n "$HAS_TORCH" ] || exit 1; case "$2" in *print*) echo "2.13.0+cu128";; esac;;
  esac
fi
exit 0
"""


def _make(tmp_path, *args, has_torch=False, premade_venv=False, dry=False):
    """Run the project's Makefile in a scratch copy with stand-in pythons; (make's output, the pythons' calls)."""
    import os
    import shutil
    import subprocess
    import tempfile

    from conftest import ROOT

    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))  # one scratch copy per call
    work = tmp_path / "proj"
    work.mkdir()
    shutil.copy(ROOT / "Makefile", work / "Makefile")
    (work / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    if premade_venv:  # the GPU user's `python3 -m venv .venv && .venv/bin/pip install torch ...`
        (work / ".venv" / "bin").mkdir(parents=True)
        shutil.copy(fake, work / ".venv" / "bin" / "python")
    log = tmp_path / "calls.log"
    log.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    env |= dict(LOG=str(log), HAS_TORCH="1" if has_torch else "")
    done = subprocess.run(["make", "-C", str(work), *(["-n"] if dry else []), "setup", f"PYTHON={fake}", *args],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, log.read_text().splitlines()


def test_make_setup_installs_torch_first_on_a_fresh_machine(tmp_path):
    out, calls = _make(tmp_path)
    assert calls == ["python3 -m venv .venv", "python -m pip install --upgrade pip", "python -c 'import torch'",
                     "python -m pip install torch==2.13.0", "python -m pip install -e ."]


def test_make_setup_keeps_a_torch_already_in_the_venv(tmp_path):
    """The GPU set-up of the README: a CUDA build installed into .venv first is kept (it used to be replaced by
    `pip install torch==2.13.0`, i.e. whatever build the index serves, whenever the versions differed)."""
    out, calls = _make(tmp_path, has_torch=True, premade_venv=True)
    assert not any("pip install torch" in c for c in calls), calls
    assert calls[-1] == "python -m pip install -e ."
    assert "keeping the torch already in .venv: 2.13.0+cu128" in out


def test_make_setup_torch_may_carry_pip_options(tmp_path):
    url = "https://download.pytorch.org/whl/cu128"
    _, calls = _make(tmp_path, f"TORCH=torch==2.13.0 --index-url {url}")
    assert f"python -m pip install torch==2.13.0 --index-url {url}" in calls
    _, calls = _make(tmp_path, "TORCH=")
    assert calls == ["python3 -m venv .venv", "python -m pip install --upgrade pip", "python -c 'import torch'",
                     "python -m pip install -e ."]


def test_make_dry_run_shows_the_torch_step(tmp_path):
    """make -n: the recipe as it would run, TORCH expanded, nothing executed."""
    out, calls = _make(tmp_path, "TORCH=torch==2.13.0 --index-url https://example.org/whl/cu128", dry=True)
    assert calls == []
    assert "pip install torch==2.13.0 --index-url https://example.org/whl/cu128" in out
    assert 'import torch' in out and "pip install -e ." in out


# ------------------------------------------------------------------------------------------------ README: GPU


def gpu_section() -> str:
    from conftest import ROOT

    text = (ROOT / "README.md").read_text()
    start = text.index("\n## GPU\n")
    return text[start:text.index("\n## ", start + 1)]


def gpu_command_lines() -> list[list[str]]:
    """Every line of the GPU section's shell blocks that runs cli.py (comments dropped), split like a shell."""
    import re
    import shlex

    lines = []
    for block in re.findall(r"```sh\n(.*?)```", gpu_section(), flags=re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if "cli.py" in line.split():
                lines.append(shlex.split(line))
    return lines


def test_readme_gpu_set_up_matches_the_makefile():
    import re

    from conftest import ROOT

    section = gpu_section()
    default = re.search(r"^TORCH \?= (.+)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    pins = re.findall(r"pip install (torch==\S+)", section) + re.findall(r'TORCH="(torch==\S+)', section)
    assert pins and set(pins) == {default}
    assert "keeping the torch already in .venv" in section  # what make prints (test above)
    # these lines must not be run by tests/test_readme.py on a CPU: they sit in sh blocks, not bash
    assert "```bash" not in section


LAUNCH_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
               "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_STEPID", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID",
               "SLURM_LAUNCH_NODE_IPADDR"]


def _simulate_launcher(monkeypatch, launcher: list[str]) -> tuple[int, str]:
    """The environment one process of the launcher sees (its second process); (local rank, name)."""
    for var in LAUNCH_VARS:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    if not launcher or launcher[0] == "python":
        return 0, ""
    if launcher[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args([*launcher[1:], "cli.py"])  # torchrun accepts these options
        n = int(args.nproc_per_node)
        for k, v in dict(RANK=1, WORLD_SIZE=n, LOCAL_RANK=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=29400).items():
            monkeypatch.setenv(k, str(v))
        return 1, "torchrun"
    assert launcher[:2] == ["srun", "python"], launcher
    for k, v in dict(SLURM_STEP_ID=0, SLURM_PROCID=1, SLURM_NTASKS=4, SLURM_STEP_NUM_TASKS=4, SLURM_LOCALID=1,
                     SLURM_JOB_ID=4_123_457, SLURM_LAUNCH_NODE_IPADDR="10.0.0.7").items():
        monkeypatch.setenv(k, str(v))
    return 1, "srun"


def test_readme_gpu_command_lines(tmp_path, monkeypatch, loads, fake_gpus):
    """Each GPU command line of the README, as the process it starts sees it (launcher environment simulated, 4 GPUs
    faked, process group and model load recorded): its options parse, and the model is loaded on this process's
    GPU in the dtype the line asks for (or the run's)."""
    import shlex
    import shutil

    from conftest import ROOT

    from tests.run.test_distributed import FakeGroup

    lines = gpu_command_lines()
    launchers = {(line[: line.index("cli.py")] or ["python"])[0] for line in lines}
    assert launchers == {"python", "torchrun", "srun"}, lines
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "data" / "prompts", tmp_path / "data" / "prompts")
    monkeypatch.chdir(tmp_path)
    # the finished SD run the `--run runs/sd15` lines act on (made on cuda in float16, as configs/sd15.toml says)
    make_intervention_run(tmp_path / "runs" / "sd15", random_sae())
    _set_config(tmp_path / "runs" / "sd15", model="models/stable-diffusion-v1-5", device="cuda", dtype="float16")
    for line in lines:
        at = line.index("cli.py")
        local_rank, launcher = _simulate_launcher(monkeypatch, line[:at])
        group = FakeGroup(monkeypatch)
        args = line[at + 1:]
        loads.clear()
        result = runner.invoke(app, args)
        assert isinstance(result.exception, Loaded), (shlex.join(line), result.output, result.exception)
        opts = dict(zip(args, args[1:], strict=False))
        device = opts["--device"]
        if device == "cuda" and launcher:
            device = f"cuda:{local_rank}"
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[opts.get("--dtype", "float16")]
        assert loads == [("models/stable-diffusion-v1-5", device, dtype)], shlex.join(line)
        if launcher:  # one process group per process, bound to its GPU
            assert [c["backend"] for c in group.init] == ["nccl"] and group.set_device == [torch.device(device)]
        if launcher == "srun":
            import os

            assert os.environ["MASTER_PORT"] == "13457"
