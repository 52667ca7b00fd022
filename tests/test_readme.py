"""Every example in the README runs: each `python cli.py ...` line of a bash block (in a scratch directory),
and each python block."""

import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

README = (ROOT / "README.md").read_text()
# Long-running examples run with extra options appended (the last value of an option wins).
SHORTER = {
    ("demo-model", "train"): ["--steps", "2", "--batch-size", "4", "--out-dir", "scratch-model",
                              "--work-dir", "scratch-train"],
}


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _cli_lines():
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("python cli.py"):
                yield line


@pytest.fixture
def scratch(tmp_path):
    (tmp_path / "data").mkdir()
    shutil.copytree(ROOT / "data" / "prompts", tmp_path / "data" / "prompts")
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("line", list(_cli_lines()))
def test_cli_example_runs(line, scratch):
    args = shlex.split(line)[2:]
    args += SHORTER.get(tuple(args[:2]), [])
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=scratch, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("block", _blocks("python"))
def test_python_example_runs(block):
    exec(compile(block, "README.md", "exec"), {})


def test_readme_starts_with_the_two_setup_commands():
    first = _blocks("bash")[0].splitlines()
    assert first[0].startswith("make demo") and first[1].startswith("make test")
    assert "make test" in (ROOT / ".ci" / "run").read_text()
