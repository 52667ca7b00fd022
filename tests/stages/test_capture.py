"""Capture: table contents, resume after SIGKILL, torchrun equivalence, and the error paths."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import polars as pl
import pytest
import torch
from capture_runs import LAYERS, make_cfg
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.errors import DifflensError, PromptFileError, UnknownLayerError
from backend.models import load_model
from backend.models.hooks import read_activations
from backend.run.config import RunConfig, load_config, resolve
from backend.run.prompts import DEMO_PROMPTS, load_prompts
from backend.stages.capture import capture, plan_generations


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    lines = DEMO_PROMPTS.read_text().splitlines()[::30]  # 12 prompts, 4 colours
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path




def cli_args(model_dir, prompt_file, runs_dir, name):
    args = ["--model", str(model_dir), "--prompts", str(prompt_file), "--runs-dir", str(runs_dir), "--name", name,
            "--images-per-prompt", "2", "--steps", "3", "--batch-size", "8", "--tokens-per-step", "16"]
    for layer in LAYERS:
        args += ["--layer", layer]
    return args


def snapshot(run_dir):
    """Everything a capture wrote, in a canonical order."""
    run_dir = os.fspath(run_dir)
    out = {}
    for table, keys in [("activity", ["layer", "kind", "unit", "step", "gen_id"]), ("generations", ["gen_id"])]:
        out[table] = pl.read_parquet(f"{run_dir}/tables/{table}/**/*.parquet", hive_partitioning=True).sort(keys)
    out["steps"] = pl.read_parquet(f"{run_dir}/tables/steps.parquet")
    for layer in LAYERS:
        d = f"{run_dir}/activations/{layer}"
        index = pl.read_parquet(f"{d}/part-*.parquet")
        shards = sorted(f for f in os.listdir(d) if f.endswith(".npy"))
        toks = np.concatenate([np.load(f"{d}/{f}") for f in shards])
        order = np.lexsort((index["position"].to_numpy(), index["step"].to_numpy(), index["gen_id"].to_numpy()))
        out[f"tokens/{layer}"] = toks[order]
        out[f"index/{layer}"] = index[order]
        out[f"meta/{layer}"] = {k: v for k, v in json.load(open(f"{d}/meta.json")).items() if k != "shards"}
    out["images"] = {f: open(f"{run_dir}/images/{f}", "rb").read() for f in sorted(os.listdir(f"{run_dir}/images"))}
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], pl.DataFrame):
            assert a[k].equals(b[k]), k
        elif isinstance(a[k], np.ndarray):
            assert np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def reference_run(untrained_demo_dir, prompt_file, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    cfg = make_cfg(untrained_demo_dir, prompt_file, runs)
    summary = capture(cfg, progress=False)
    return cfg, summary


def test_tables_hold_what_the_hooks_saw(reference_run, untrained_demo_dir, prompt_file):
    cfg, summary = reference_run
    snap = snapshot(summary.out_dir)
    gens = plan_generations(load_prompts(prompt_file), 2, 0)
    g = gens[5]
    model = load_model(str(untrained_demo_dir))
    events = []
    with read_activations(model, LAYERS, events.append):
        image = model.generate([g.prompt.prompt], [g.seed], n_steps=3, guidance=model.default_guidance)
    act = snap["activity"]
    for ev in events:
        rows = act.filter((pl.col("layer") == ev.layer) & (pl.col("gen_id") == g.gen_id) & (pl.col("step") == ev.step))
        rows = rows.sort("unit")
        tok = ev.tokens[0]
        assert rows["kind"].unique().to_list() == ["channel"]
        np.testing.assert_allclose(rows["mean"].to_numpy(), tok.mean(0).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rows["max"].to_numpy(), tok.amax(0).numpy(), rtol=1e-4, atol=1e-5)
        idx = snap[f"index/{ev.layer}"]
        sel = ((idx["gen_id"] == g.gen_id) & (idx["step"] == ev.step)).to_numpy()
        positions = idx["position"].to_numpy()[sel]
        assert len(positions) == min(16, tok.shape[0]) and len(set(positions)) == len(positions)
        np.testing.assert_allclose(snap[f"tokens/{ev.layer}"][sel], tok[positions].half().numpy(), rtol=1e-3,
                                   atol=1e-3)
    from PIL import Image

    from backend.models.base import to_uint8

    saved = np.array(Image.open(summary.out_dir / "images" / f"{g.gen_id:06d}.png"))
    assert np.abs(saved.astype(int) - to_uint8(image)[0].astype(int)).max() <= 1
    gen_row = snap["generations"].filter(pl.col("gen_id") == g.gen_id).row(0, named=True)
    assert gen_row["prompt"] == g.prompt.prompt and gen_row["seed"] == g.seed
    assert json.loads(gen_row["attributes"]) == g.prompt.attributes and gen_row["image"] == "images/000005.png"


def test_counts_sorting_and_manifest(reference_run):
    cfg, summary = reference_run
    snap = snapshot(summary.out_dir)
    assert snap["generations"].height == 24 and snap["steps"].height == 3
    assert snap["activity"].height == 24 * 3 * 64 * 2
    assert snap["meta/mid_block.attentions.0"] == {"d": 64, "dtype": "float16", "count": 24 * 3 * 16,
                                                   "layout": "row-major"}
    shard = pl.read_parquet(summary.out_dir / "tables/activity/layer=mid_block.attentions.0/kind=channel"
                            / "part-0000000.parquet")
    assert shard.equals(shard.sort(["unit", "step", "gen_id"]))
    manifest = json.loads((summary.out_dir / "manifest.json").read_text())
    assert manifest["stages"]["capture"]["status"] == "done"
    assert manifest["config"]["capture"]["layers"] == LAYERS
    assert {"torch", "diffusers", "difflens"} <= set(manifest["versions"])


def test_rerun_is_a_no_op(reference_run):
    cfg, summary = reference_run
    before = snapshot(summary.out_dir)
    again = capture(cfg, progress=False)
    assert again.batches_run == 0 and again.batches_skipped == 3
    assert_same(before, snapshot(summary.out_dir))


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_markers", [0, 1])
def test_resume_after_sigkill_matches_uninterrupted(reference_run, untrained_demo_dir, prompt_file, tmp_path,
                                                    kill_after_markers):
    _, summary = reference_run
    args = [sys.executable, str(ROOT / "cli.py"), "capture", *cli_args(untrained_demo_dir, prompt_file, tmp_path,
                                                                       "k")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = tmp_path / "k" / "_done" / "capture"
    deadline = time.time() + 120
    while time.time() < deadline:
        n = len(list(markers.glob("*.json"))) if markers.exists() else 0
        if n > kill_after_markers or (kill_after_markers == 0 and (tmp_path / "k" / "images").exists()):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(markers.glob("*.json"))) < 3, "capture finished before it could be killed"
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same(snapshot(summary.out_dir), snapshot(tmp_path / "k"))
    assert not list((tmp_path / "k").rglob("*.tmp"))


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(reference_run, untrained_demo_dir, prompt_file, tmp_path):
    _, summary = reference_run
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "cli.py"), "capture", *cli_args(untrained_demo_dir, prompt_file, tmp_path, "t")]
    proc = subprocess.run(args, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "t" / "tables" / "generations").iterdir())
    one = sorted(p.name for p in (summary.out_dir / "tables" / "generations").iterdir())
    assert names == one and len(names) > 1  # the same batches as one process, shared out between the ranks
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["stages"]["capture"]["world_size"] == 2
    a, b = snapshot(summary.out_dir), snapshot(tmp_path / "t")
    for key in a:  # the same rows; float results may differ in the last bit between batch compositions
        if isinstance(a[key], pl.DataFrame):
            assert a[key].drop(["mean", "max"], strict=False).equals(b[key].drop(["mean", "max"], strict=False))
            if "mean" in a[key].columns:
                np.testing.assert_allclose(a[key]["mean"].to_numpy(), b[key]["mean"].to_numpy(), atol=1e-5)
        elif isinstance(a[key], np.ndarray):
            np.testing.assert_allclose(a[key].astype(np.float32), b[key].astype(np.float32), atol=2e-3)
        elif key != "images":
            assert a[key] == b[key]
    assert a["images"].keys() == b["images"].keys()


def test_a_different_config_is_refused_unless_overwrite(reference_run):
    cfg, summary = reference_run
    other = make_cfg(cfg.model, cfg.prompts, cfg.runs_dir, name=cfg.name, steps=4)
    with pytest.raises(DifflensError, match="different config.*--overwrite"):
        capture(other, progress=False)
    assert json.loads((summary.out_dir / "manifest.json").read_text())["identity"]["capture"]["steps"] == 3


def test_overwrite_replaces(untrained_demo_dir, prompt_file, tmp_path):
    capture(make_cfg(untrained_demo_dir, prompt_file, tmp_path, steps=2, images_per_prompt=1), progress=False)
    s = capture(make_cfg(untrained_demo_dir, prompt_file, tmp_path, steps=3, images_per_prompt=1),
                overwrite=True, progress=False)
    assert pl.read_parquet(s.out_dir / "tables/steps.parquet").height == 3


def test_a_non_run_directory_is_refused(untrained_demo_dir, prompt_file, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "thesis.tex").write_text("precious")
    with pytest.raises(DifflensError, match="not a difflens run"):
        capture(make_cfg(untrained_demo_dir, prompt_file, tmp_path), progress=False)
    assert (tmp_path / "r" / "thesis.tex").read_text() == "precious"


def test_unknown_layer_and_bad_prompts(untrained_demo_dir, prompt_file, tmp_path):
    cfg = make_cfg(untrained_demo_dir, prompt_file, tmp_path)
    cfg.capture.layers = ["up_blocks.1.attentions.9"]
    with pytest.raises(UnknownLayerError, match="did you mean"):
        capture(cfg, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(PromptFileError, match=r"bad.jsonl:2"):
        capture(make_cfg(untrained_demo_dir, bad, tmp_path, name="b"), progress=False)


def test_cli_errors_exit_non_zero(untrained_demo_dir, prompt_file, tmp_path):
    args = cli_args(untrained_demo_dir, prompt_file, tmp_path, "e") + ["--layer", "nope"]
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "capture", *args], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error: unknown layer 'nope'")
    assert "Traceback" not in proc.stderr


def test_config_file_and_overrides(tmp_path, untrained_demo_dir, prompt_file):
    toml = tmp_path / "run.toml"
    toml.write_text(f'name = "x"\nmodel = "{untrained_demo_dir}"\n[capture]\nsteps = 7\nlayers = ["mid_block"]\n')
    cfg = resolve(file=toml, overrides={"name": "y", "capture.steps": None, "capture.batch_size": 4})
    assert (cfg.name, cfg.capture.steps, cfg.capture.batch_size, cfg.capture.layers) == ("y", 7, 4, ["mid_block"])
    toml.write_text("[capture]\nstepz = 3\n")
    with pytest.raises(DifflensError, match="unknown key.*stepz"):
        load_config(toml)


def test_feature_encoder_rows_are_sparse(untrained_demo_dir, prompt_file, tmp_path):
    """With an encoder, feature activity holds active features only, with mean over all positions."""

    def relu_encoder(x):  # a stand-in SAE: 64 features = relu of the channels, k = 4 largest
        vals, idx = torch.relu(x).topk(4, dim=-1)
        return vals, idx

    cfg = make_cfg(untrained_demo_dir, prompt_file, tmp_path, images_per_prompt=1)
    s = capture(cfg, encoders={"mid_block.attentions.0": relu_encoder}, progress=False)
    feats = pl.read_parquet(f"{s.out_dir}/tables/activity/**/*.parquet", hive_partitioning=True).filter(
        pl.col("kind") == "feature")
    assert feats.height > 0 and (feats["max"] > 0).all() and (feats["mean"] <= feats["max"]).all()
    model = load_model(str(untrained_demo_dir))
    events = []
    g = plan_generations(load_prompts(prompt_file), 1, 0)[2]
    with read_activations(model, ["mid_block.attentions.0"], events.append):
        model.generate([g.prompt.prompt], [g.seed], n_steps=3, guidance=model.default_guidance)
    vals, idx = relu_encoder(events[1].tokens[0])
    dense = torch.zeros(vals.shape[0], 64).scatter_(1, idx, vals)
    rows = feats.filter((pl.col("gen_id") == g.gen_id) & (pl.col("step") == 1)).sort("unit")
    active = (dense.amax(0) > 0).nonzero().ravel().numpy()
    assert rows["unit"].to_list() == active.tolist()
    np.testing.assert_allclose(rows["mean"].to_numpy(), dense.mean(0)[active].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rows["max"].to_numpy(), dense.amax(0)[active].numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("failing", ["write_image", "write_token_shard"])
@pytest.mark.parametrize("background", [True, False], ids=["background writes", "inline writes"])
def test_a_failed_write_leaves_the_run_resumable(reference_run, untrained_demo_dir, prompt_file, tmp_path,
                                                 monkeypatch, background, failing):
    """A write that fails in the second batch (an image, or a layer's token shard: both are jobs of the write
    helpers) is a one-line error; the same command then finishes the run as an uninterrupted capture would."""
    from backend.run.store import RunStore
    from backend.stages import capture as capture_module

    monkeypatch.setattr(capture_module, "overlap_writes", lambda device: background)
    _, summary = reference_run
    real = getattr(RunStore, failing)
    calls, lock = {"n": 0}, threading.Lock()
    nth = {"write_image": 11, "write_token_shard": 3}[failing]  # in the second batch

    def flaky(self, *args, **kwargs):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == nth:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RunStore, failing, flaky)
    cfg = make_cfg(untrained_demo_dir, prompt_file, tmp_path, name="f")
    with pytest.raises(DifflensError, match="No space left on device.*rerun the same command"):
        capture(cfg, progress=False)
    monkeypatch.setattr(RunStore, failing, real)
    capture(cfg, progress=False)
    assert_same(snapshot(summary.out_dir), snapshot(tmp_path / "f"))


def _random_sae_dir(tmp_path, d_in, n=32, k=4):
    from sae.io import save_sae
    from sae.model import SAE, SAEConfig

    torch.manual_seed(0)
    return save_sae(SAE(SAEConfig(d_in=d_in, n_latents=n, k=k)), tmp_path / f"sae-{d_in}-{n}")


def test_sae_option_records_features_on_a_finished_run(reference_run, untrained_demo_dir, prompt_file, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    _, summary = reference_run
    runs = tmp_path / "runs"
    shutil_copy = __import__("shutil").copytree
    shutil_copy(summary.out_dir, runs / "s")
    sae_dir = _random_sae_dir(tmp_path, 64)
    args = ["capture", *cli_args(untrained_demo_dir, prompt_file, runs, "s"),
            "--sae", f"mid_block.attentions.0={sae_dir}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    feats = pl.read_parquet(f"{runs}/s/tables/activity/layer=mid_block.attentions.0/kind=feature/*.parquet")
    assert feats["gen_id"].n_unique() == 24 and feats["unit"].max() < 32
    assert (feats["max"] > 0).all()
    manifest = json.loads((runs / "s" / "manifest.json").read_text())
    assert manifest["stages"]["features"]["status"] == "done"
    before = snapshot(summary.out_dir)
    after = snapshot(runs / "s")
    after["activity"] = after["activity"].filter(pl.col("kind") == "channel")
    assert_same(before, after)  # the features pass touched nothing else

    from run_snapshots import tree_digest

    recorded = tree_digest(runs / "s")
    other = _random_sae_dir(tmp_path, 64, n=16)  # another SAE of the same layer
    args = ["capture", *cli_args(untrained_demo_dir, prompt_file, runs, "s"),
            "--sae", f"mid_block.attentions.0={other}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "replaces it" in result.output and "--overwrite" in result.output
    assert tree_digest(runs / "s") == recorded
    result = CliRunner().invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    feats = pl.read_parquet(f"{runs}/s/tables/activity/layer=mid_block.attentions.0/kind=feature/*.parquet")
    assert feats["unit"].max() < 16  # the new SAE's features replaced the old ones


def test_sae_errors(reference_run, untrained_demo_dir, prompt_file, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    runner = CliRunner()
    base = ["capture", *cli_args(untrained_demo_dir, prompt_file, tmp_path, "x")]
    wrong = _random_sae_dir(tmp_path, 32)
    r = runner.invoke(app, [*base, "--sae", f"mid_block.attentions.0={wrong}"])
    assert r.exit_code == 1 and "takes width 32, but the layer has 64 channels" in r.output
    assert not (tmp_path / "x").exists()  # refused before the run directory was made
    r = runner.invoke(app, [*base, "--sae", f"down_blocks.1.attentions.0={wrong}"])
    assert r.exit_code == 1 and "does not capture" in r.output
    r = runner.invoke(app, [*base, "--sae", "mid_block.attentions.0"])
    assert r.exit_code == 1 and "LAYER=PATH" in r.output
    r = runner.invoke(app, [*base, "--sae", f"mid_block.attentions.0={tmp_path}"])
    assert r.exit_code == 1 and "not an SAE directory" in r.output


def test_failed_validation_leaves_no_half_made_run(untrained_demo_dir, prompt_file, tmp_path):
    """An unknown layer or an out-of-vocabulary prompt is refused before the run directory exists, so the corrected
    command with the same --name then runs (it used to be refused as 'a run with a different config')."""
    runs = tmp_path / "runs"
    cfg = make_cfg(untrained_demo_dir, prompt_file, runs, name="v")
    cfg.capture.layers = ["up_blocks.1.attentions.9"]
    with pytest.raises(UnknownLayerError):
        capture(cfg, progress=False)
    oov = tmp_path / "oov.txt"
    oov.write_text("a large red circle on the left, gray background\na purple unicorn\n")
    with pytest.raises(DifflensError, match="unknown word.*purple"):
        capture(make_cfg(untrained_demo_dir, oov, runs, name="v"), progress=False)
    assert not (runs / "v").exists()
    summary = capture(make_cfg(untrained_demo_dir, prompt_file, runs, name="v", steps=2), progress=False)
    assert summary.generations > 0


def test_a_run_name_cannot_leave_the_runs_directory(untrained_demo_dir, prompt_file, tmp_path):
    runs = tmp_path / "runs"
    for name in ("../x", "a/b", "..", ""):
        proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "capture",
                               *cli_args(untrained_demo_dir, prompt_file, runs, name)], capture_output=True, text=True)
        assert proc.returncode == 1 and "is not a plain directory name" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not runs.exists()


def test_a_refused_capture_leaves_an_existing_run_byte_identical(reference_run, untrained_demo_dir, prompt_file):
    from run_snapshots import tree_digest

    cfg, _ = reference_run
    before = tree_digest(cfg.out_dir)
    other = make_cfg(untrained_demo_dir, prompt_file, cfg.runs_dir, name=cfg.name, steps=4)
    with pytest.raises(DifflensError, match="different config"):
        capture(other, progress=False)
    bad = make_cfg(untrained_demo_dir, prompt_file, cfg.runs_dir, name=cfg.name)
    bad.capture.layers = ["nope"]
    with pytest.raises(UnknownLayerError):
        capture(bad, progress=False)
    assert tree_digest(cfg.out_dir) == before


def test_a_scheduler_that_repeats_a_timestep_is_captured_whole(sd_dir, tmp_path):
    """SD 1.5 ships PNDM, which calls the denoiser n_steps + 1 times: every call is a step of the activity table,
    as of the steps table (capture used to overflow its buffers at the last call)."""
    import tiny_pipelines

    name = "sd15-pndm"
    _, cls, config = tiny_pipelines.REAL_SCHEDULERS[name]
    model_dir = tiny_pipelines.with_scheduler(sd_dir, tmp_path / name, cls, config)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\n")
    cfg = RunConfig(name="pndm", runs_dir=str(tmp_path / "runs"), model=str(model_dir), prompts=str(prompts))
    cfg.capture.layers = ["mid_block.attentions.0"]
    cfg.capture.images_per_prompt, cfg.capture.steps, cfg.capture.tokens_per_step = 1, 3, 4
    capture(cfg, progress=False)
    steps = pl.read_parquet(cfg.out_dir / "tables" / "steps.parquet")
    activity = pl.read_parquet(cfg.out_dir / "tables" / "activity" / "**" / "*.parquet", hive_partitioning=True)
    assert steps.height == 4 and sorted(activity["step"].unique()) == [0, 1, 2, 3]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 200), batch=st.integers(1, 40), world=st.integers(1, 8), other=st.integers(1, 8))
def test_batches_do_not_depend_on_the_number_of_processes(n, batch, world, other):
    """Resuming with another world size loses and duplicates nothing: every rank count cuts the same batches (the
    same shard names and markers), and the ranks share them out without overlap."""
    from backend.stages.capture import Generation, plan_batches

    gens = [Generation(i, None, 0) for i in range(n)]

    def names(w):
        per_rank = [[b[0].gen_id for b in plan_batches(gens, batch, r, w)] for r in range(w)]
        flat = [x for rank in per_rank for x in rank]
        assert len(flat) == len(set(flat))
        return sorted(flat), sorted(g.gen_id for r in range(w) for b in plan_batches(gens, batch, r, w) for g in b)

    assert names(world) == names(other) == names(1)
    assert names(1)[1] == list(range(n))


def test_sae_option_takes_another_librarys_checkpoint(untrained_demo_dir, prompt_file, tmp_path):
    """capture --sae LAYER=PATH with a SAELens folder: the format is detected, its weights file identifies it, and
    the layer's feature activity is recorded."""
    from typer.testing import CliRunner

    from cli import app
    from sae.io import export_saelens
    from sae.model import SAE, SAEConfig

    torch.manual_seed(0)
    export_saelens(SAE(SAEConfig(d_in=64, n_latents=32, k=4)).eval(), tmp_path / "lens")
    result = CliRunner().invoke(app, ["capture", *cli_args(untrained_demo_dir, prompt_file, tmp_path / "runs", "x"),
                                      "--sae", f"mid_block.attentions.0={tmp_path / 'lens'}"])
    assert result.exit_code == 0, result.output
    feats = pl.read_parquet(f"{tmp_path}/runs/x/tables/activity/layer=mid_block.attentions.0/kind=feature/*.parquet")
    assert feats["gen_id"].n_unique() == 24 and feats["unit"].max() < 32 and (feats["max"] > 0).all()


@pytest.mark.parametrize("beyond", ["in range", "beyond float16", "inf and nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_batch_kept_whole_records_what_per_step_reduction_does(beyond, dtype):
    """_Recorder: a layer whose every token is sampled (reduced once per batch, in finish) gets the mean, max,
    samples (float16, or bfloat16 for a bfloat16 model) and clamp count that reducing each step gives (checked
    against the samples' own positions), whether or not a value is beyond float16 (finish's one-pass conversion is
    only for batches within its range; a float16 or bfloat16 model's tokens are the samples as they are)."""
    from backend.models.hooks import HookEvent
    from backend.run.prompts import PromptRecord
    from backend.stages.capture import Generation, _Recorder

    gens = [Generation(i, PromptRecord("p"), 0) for i in range(3)]
    torch.manual_seed(0)
    tokens = [torch.randn(3, 16, 8) * 10 for _ in range(4)]
    tokens[2][1, 5, 3], tokens[3][0, 0, 0] = 1e6, -7e4  # beyond float16: clamped and counted (float32 tokens)
    if beyond == "in range":
        tokens[2][1, 5, 3], tokens[3][0, 0, 0] = 65504, -65504
    elif beyond == "inf and nan":
        tokens[0][2, 1, 1], tokens[1][0, 3, 2] = float("inf"), float("nan")
    tokens = [t.to(dtype) for t in tokens]
    whole, stepwise = _Recorder(gens, 4, 16, {}), _Recorder(gens, 4, 15, {})
    for step, tok in enumerate(tokens):
        for rec in (whole, stepwise):
            rec(HookEvent("L", step, tok, (4, 4)))
    assert "L" in whole.whole and not stepwise.whole  # 16 of 16 tokens sampled: kept whole
    whole.finish(), stepwise.finish()
    assert not whole.whole
    torch.testing.assert_close(whole.mean["L"], stepwise.mean["L"], equal_nan=True)
    torch.testing.assert_close(whole.max["L"], stepwise.max["L"], equal_nan=True)
    pos = stepwise.positions["L"]  # [B, S, 15] of the 16 positions
    picked = torch.gather(whole.samples["L"], 2, pos[..., None].expand(-1, -1, -1, 8))
    torch.testing.assert_close(picked, stepwise.samples["L"], rtol=0, atol=0, equal_nan=True)
    assert whole.samples["L"].dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    clamped = {"in range": 0, "beyond float16": 2, "inf and nan": 2}[beyond] if dtype == torch.float32 else 0
    assert int(whole.clamped["L"]) == int(stepwise.clamped["L"]) == clamped
    if dtype != torch.bfloat16:
        assert whole.samples["L"][1, 2, 5, 3] == (65504 if dtype == torch.float32 or beyond == "in range"
                                                  else float("inf"))  # float16 tokens hold inf beyond 65504
    assert (whole.samples["L"][2, 0, 1, 1] == float("inf")) == (beyond == "inf and nan")


def test_later_batches_reuse_the_first_batchs_buffers(untrained_demo_dir, prompt_file, tmp_path, monkeypatch):
    """capture: the recorder's big buffers (a layer's tokens over all steps, its samples) go back to one pool per
    capture and the next batches take them again, instead of allocating (and page-faulting) their own."""
    from backend.buffers import BufferPool

    taken = []
    take = BufferPool.take

    def counting_take(self, shape, dtype, device):
        free = len(self)
        taken.append(free)
        return take(self, shape, dtype, device)

    monkeypatch.setattr(BufferPool, "take", counting_take)
    cfg = make_cfg(untrained_demo_dir, prompt_file, tmp_path, name="pooled")
    summary = capture(cfg, progress=False)
    assert summary.batches_run >= 3 and taken
    batches, layers = summary.batches_run, len(cfg.capture.layers)
    assert len(taken) >= batches * layers
    assert taken[0] == 0  # the first batch allocates
    assert sum(f > 0 for f in taken) >= (batches - 1) * layers  # every later batch found buffers given back


def test_background_and_inline_writes_make_the_same_run(reference_run, untrained_demo_dir, prompt_file, tmp_path,
                                                        monkeypatch):
    from backend.stages import capture as capture_module

    _, summary = reference_run
    for background in (True, False):
        monkeypatch.setattr(capture_module, "overlap_writes", lambda device, b=background: b)
        capture(make_cfg(untrained_demo_dir, prompt_file, tmp_path, name=f"w{background}"), progress=False)
        assert_same(snapshot(summary.out_dir), snapshot(tmp_path / f"w{background}"))


def test_writes_overlap_generation_unless_torch_uses_every_core(monkeypatch):
    from backend.stages.capture import overlap_writes

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not overlap_writes("cpu")
    assert overlap_writes("meta") and overlap_writes("cuda:1")  # an accelerator: the CPU is free while it computes
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert overlap_writes("cpu")
