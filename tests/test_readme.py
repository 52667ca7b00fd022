"""Every example in the README runs, in document order, in one scratch directory: each `python cli.py ...`
line of a bash block as a subprocess, and each python block in-process."""

import os
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
    ("demo-model", "train"): ["--train-steps", "2", "--batch-size", "4", "--out-dir", "scratch-model",
                              "--work-dir", "scratch-train"],
    ("run-all",): ["--sae-total-tokens", "200000", "--interventions-top-units", "1", "--interventions-dream-iterations",
                   "10", "--set", "dream.opt_steps=10", "--set", "atlas.units=top:1"],
    ("dream",): ["--iterations", "10", "--seeds", "2"],
    ("atlas",): ["--dream-iterations", "4", "--prior-seeds", "0", "--dream-seeds", "0", "--batch-units", "8"],
    ("steer-report",): ["--seeds", "0-1"],
    ("train-sae",): ["--total-tokens", "200000"],
    ("train-demo-vit",): ["--train-steps", "2", "--batch-size", "4", "--out", "scratch-vit"],
    ("demo-images",): ["--n", "96"],
    ("sweep",): ["--set", "capture.steps=3", "--set", "sae.total_tokens=20000", "--set", "sae.splice_samples=2",
                 "--set", "analysis.examples_top_n=1"],
}
PROMPT_SUBSAMPLE = 6  # the scratch copy of data/prompts/demo.jsonl keeps every 6th prompt (60 of 360)


def _shorter(args: list[str]) -> list[str]:
    return SHORTER.get(tuple(args[:2]), SHORTER.get(tuple(args[:1]), []))


def _examples():
    """(kind, text) in document order: kind is 'cli' (one command line) or 'python' (a block)."""
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", README, flags=re.S):
        if lang == "python":
            yield "python", body
            continue
        for line in body.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("python cli.py"):
                yield "cli", line


@pytest.mark.slow
def test_every_readme_example_runs(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    shutil.copytree(ROOT / "data" / "prompts", tmp_path / "data" / "prompts")
    demo_prompts = tmp_path / "data" / "prompts" / "demo.jsonl"
    demo_prompts.write_text("".join(demo_prompts.read_text().splitlines(keepends=True)[::PROMPT_SUBSAMPLE]))
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "data" / "demo-vit", tmp_path / "data" / "demo-vit")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    monkeypatch.chdir(tmp_path)
    ran = 0
    for kind, text in _examples():
        if kind == "cli":
            args = shlex.split(text)[2:]
            args += _shorter(args)
            proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"{text}\n{proc.stderr[-2000:]}"
        else:
            exec(compile(text, "README.md", "exec"), {})
        ran += 1
    assert ran >= 10


def test_readme_starts_with_the_two_setup_commands():
    first = re.findall(r"```bash\n(.*?)```", README, flags=re.S)[0].splitlines()
    assert first[0].startswith("make demo") and first[1].startswith("make test")
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_config_files_parse():
    from backend.run.config import load_config

    for path in (ROOT / "configs").glob("*.toml"):
        load_config(path)
