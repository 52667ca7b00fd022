"""A tiny base config for sweep tests: the shipped demo model on 4 of its prompts, one layer, 3 steps, small SAEs,
no interventions (a run-all of it takes seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.run.prompts import DEMO_PROMPTS

TINY = """\
name = "t"
runs_dir = "{runs}"
prompts = "{prompts}"

[capture]
layers = ["up_blocks.1.attentions.1"]
images_per_prompt = 1
steps = 3
batch_size = 4
tokens_per_step = 16

[sae]
total_tokens = 1024
batch_size = 64
splice_samples = 2

[analysis]
examples_top_n = 1
replay_batch_size = 4
plot_top_units = 1

[interventions]
enabled = false
"""


@pytest.fixture()
def tiny_config(tmp_path) -> Path:
    """A base run.toml whose runs go to tmp_path/runs (which does not exist yet)."""
    prompts = tmp_path / "prompts.jsonl"
    lines = Path(DEMO_PROMPTS).read_text().splitlines(keepends=True)
    prompts.write_text("".join(lines[::61]))  # 6 prompts: every colour, shapes, sizes, positions, backgrounds
    path = tmp_path / "base.toml"
    path.write_text(TINY.format(runs=tmp_path / "runs", prompts=prompts))
    return path
