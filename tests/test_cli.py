"""The CLI: --help everywhere, thin commands that work, and one-line errors with a non-zero exit."""

import subprocess
import sys

import pytest
from conftest import ROOT
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def _commands(group, prefix=()):
    import typer.main

    click_group = typer.main.get_command(group)
    for name, cmd in click_group.commands.items():
        if hasattr(cmd, "commands"):
            for sub in cmd.commands:
                yield (*prefix, name, sub)
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("command", list(_commands(app)))
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_layers_lists_hook_points_and_marks_targets(untrained_demo_dir):
    result = runner.invoke(app, ["layers", "--model", str(untrained_demo_dir)])
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if " up_blocks.1.attentions.1 " in ln)
    assert line.startswith("*") and "Transformer2DModel" in line and "64x8x8" in line


def test_unknown_model_is_one_line_error_exit_1():
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "layers", "--model", "/no/such/model"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: model '/no/such/model' not found")
    assert "Traceback" not in proc.stderr


def test_malformed_prompt_file_error(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    result = runner.invoke(app, ["prompts", str(f)])
    assert result.exit_code == 1
    assert f"{f}:2:" in result.output


def test_sample_writes_a_grid(untrained_demo_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["demo-model", "sample", "--model", str(untrained_demo_dir), "--out", str(out),
                                 "--n", "6", "--steps", "2"])
    assert result.exit_code == 0, result.output
    img = Image.open(out)
    assert img.size[0] == 6 * 96 and img.size[1] > 96


def test_evaluate_reports_every_attribute(untrained_demo_dir, tmp_path):
    import json

    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["demo-model", "evaluate", "--model", str(untrained_demo_dir), "--n", "8",
                                 "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["accuracy"]) == {"colour", "shape", "size", "position", "background"}


def test_unknown_dtype_error(untrained_demo_dir):
    result = runner.invoke(app, ["layers", "--model", str(untrained_demo_dir), "--dtype", "float8"])
    assert result.exit_code == 1 and "unknown dtype 'float8'" in result.output
