"""Capture with negative prompts (backend/stages/capture.py with_run_conditions / check_conditions): the global
negative prompt and the per-prompt `negative` field reach CFG and the generations table, a changed negative prompt
is a changed run, the heat-map replay regenerates with them, and without CFG they are refused before any write."""

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from capture_runs import make_cfg
from conftest import ROOT
from PIL import Image

from backend.errors import DifflensError
from backend.models.base import to_uint8
from backend.run.config import resolve
from backend.stages.capture import capture, run_identity

PROMPTS = ["a large red circle on the left, gray background", "a small blue square at the top, white background"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    """The first prompt takes the run's negative prompt, the second gives its own."""
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    rows = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "negative": "a red square"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def cfg_with(model_dir, prompt_file, runs, **capture):
    return make_cfg(model_dir, prompt_file, runs, images_per_prompt=1, steps=2, guidance=3.0, **capture)


def test_negative_prompts_are_generated_with_and_recorded(untrained_demo_dir, prompt_file, tmp_path, one_thread):
    from backend.analysis.examples import generation_conditions
    from backend.run.context import open_run

    cfg = cfg_with(untrained_demo_dir, prompt_file, tmp_path, negative_prompt="a green triangle")
    capture(cfg, progress=False)
    gens = pl.read_parquet(cfg.out_dir / "tables" / "generations" / "*.parquet").sort("gen_id")
    assert gens["negative_prompt"].to_list() == ["a green triangle", "a red square"]
    assert gens["control_image"].to_list() == [None, None]
    ctx = open_run(cfg.out_dir)
    model = ctx.model
    recorded = np.stack([np.asarray(Image.open(cfg.out_dir / p)) for p in gens["image"]])
    # what the replay generates (the rows' negative prompts) is what capture generated; without them it is not
    args = (gens["prompt"].to_list(), gens["seed"].to_list(), ctx.n_steps, ctx.guidance)
    assert np.array_equal(to_uint8(model.generate(*args, **generation_conditions(gens))), recorded)
    assert not np.array_equal(to_uint8(model.generate(*args)), recorded)

    plain = cfg_with(untrained_demo_dir, prompt_file, tmp_path, name="plain")
    capture(plain, progress=False)
    plain_gens = pl.read_parquet(plain.out_dir / "tables" / "generations" / "*.parquet").sort("gen_id")
    assert plain_gens["negative_prompt"].to_list() == [None, "a red square"]
    assert "negative_prompt" not in run_identity(plain)["capture"]  # unset: a run's identity as before

    changed = cfg_with(untrained_demo_dir, prompt_file, tmp_path, negative_prompt="a green square")
    with pytest.raises(DifflensError, match="different config"):
        capture(changed, progress=False)


def test_the_option_config_and_set_forms_agree(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[capture]\nnegative_prompt = "blurry"\n')
    assert resolve(file=toml).capture.negative_prompt == "blurry"
    assert resolve(overrides={"capture.negative_prompt": "dark"}).capture.negative_prompt == "dark"


def test_a_negative_prompt_without_cfg_is_refused_in_one_line(untrained_demo_dir, prompt_file, tmp_path):
    """The per-prompt field alone is refused too (the second prompt gives one)."""
    args = ["--model", str(untrained_demo_dir), "--prompts", str(prompt_file), "--runs-dir", str(tmp_path),
            "--name", "n", "--layer", "mid_block.attentions.0", "--guidance", "1"]
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "capture", *args], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: a negative prompt is given ('a red square') but guidance is 1, so CFG is off and it would be "
        "ignored: raise --guidance above 1 or drop the negative prompt"]
    assert not (tmp_path / "n").exists()


def test_a_negative_prompt_the_demo_cannot_read_is_refused(untrained_demo_dir, prompt_file, tmp_path):
    cfg = cfg_with(untrained_demo_dir, prompt_file, tmp_path, negative_prompt="a purple unicorn")
    with pytest.raises(DifflensError, match="unknown word.*purple"):
        capture(cfg, progress=False)
    assert not cfg.out_dir.exists()
