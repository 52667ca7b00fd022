"""capture --sae LAYER=PATH takes an SAE checkpoint of another library's format (here a SAELens folder): the
format is detected, its weights file identifies it, and the layer's feature activity is recorded."""

import polars as pl
import pytest
import torch
from capture_runs import LAYERS

from backend.run.prompts import DEMO_PROMPTS


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(DEMO_PROMPTS.read_text().splitlines()[::30]) + "\n")
    return path


def cli_args(model_dir, prompt_file, runs_dir, name):
    """As tests/stages/test_capture.py's (a small capture of the demo model's two layers)."""
    args = ["--model", str(model_dir), "--prompts", str(prompt_file), "--runs-dir", str(runs_dir), "--name", name,
            "--images-per-prompt", "2", "--steps", "3", "--batch-size", "8", "--tokens-per-step", "16"]
    for layer in LAYERS:
        args += ["--layer", layer]
    return args


def test_capture_with_an_imported_saelens_sae(untrained_demo_dir, prompt_file, tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from sae.io import export_saelens
    from sae.model import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=64, n_latents=32, k=4)).eval()
    export_saelens(sae, tmp_path / "lens", hook_name="mid_block.attentions.0")
    result = CliRunner().invoke(app, ["capture", *cli_args(untrained_demo_dir, prompt_file, tmp_path / "runs", "x"),
                                      "--sae", f"mid_block.attentions.0={tmp_path / 'lens'}"])
    assert result.exit_code == 0, result.output
    feats = pl.read_parquet(f"{tmp_path}/runs/x/tables/activity/layer=mid_block.attentions.0/kind=feature/*.parquet")
    assert feats["gen_id"].n_unique() == 24 and feats["unit"].max() < 32 and (feats["max"] > 0).all()
