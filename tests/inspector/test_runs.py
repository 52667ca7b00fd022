"""inspector/runs.py: the runs directory, run discovery, path safety, the manifest read."""

from __future__ import annotations

import pytest


def test_safe_path_refuses_escapes(tmp_path):
    from inspector.runs import UnsafePath, safe_path

    root = tmp_path / "runs"
    (root / "a" / "images").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("no")
    assert safe_path(root, "a/images") == (root / "a" / "images").resolve()
    assert safe_path(root, ".") == root.resolve()
    assert safe_path(root, "a/../a/images") == (root / "a" / "images").resolve()
    for bad in ("..", "../secret.txt", "a/../../secret.txt", str(tmp_path / "secret.txt"), "a/\x00x"):
        with pytest.raises(UnsafePath):
            safe_path(root, bad)
    (root / "a" / "out").symlink_to(tmp_path)  # a symlink inside that points outside
    with pytest.raises(UnsafePath):
        safe_path(root, "a/out/secret.txt")
    (root / "a" / "in").symlink_to(root / "a" / "images")  # one that stays inside is fine
    assert safe_path(root, "a/in") == (root / "a" / "images").resolve()


def test_list_runs_and_open_run(tmp_path, runs_dir):
    from inspector import runs

    root = tmp_path / "runs"
    root.mkdir()
    assert runs.list_runs(root) == []
    assert runs.list_runs(tmp_path / "nope") == []
    (root / "not-a-run").mkdir()
    (root / "outside").symlink_to(runs_dir / "tiny")  # a run, but outside this runs directory
    (root / "r1").mkdir()
    (root / "r1" / "manifest.json").write_text("{}")
    assert runs.list_runs(root) == ["r1"]
    assert runs.list_runs(runs_dir / "tiny") == ["."]  # --runs pointing at a run
    with pytest.raises(runs.RunError):
        runs.open_run(root, "not-a-run")
    with pytest.raises(runs.UnsafePath):
        runs.open_run(root, "../x")
    with pytest.raises(runs.UnsafePath):
        runs.open_run(root, "outside")


def test_runs_argument(monkeypatch, tmp_path):
    from inspector.runs import parse_runs_arg, runs_root

    assert parse_runs_arg(["--runs", "x/y"]) == "x/y"
    assert parse_runs_arg(["-x", "--other", "1"]) is None
    assert parse_runs_arg(["--run", "x"]) is None  # no abbreviations
    monkeypatch.setenv("DIFFLENS_RUNS", str(tmp_path))
    assert runs_root([]) == tmp_path.resolve()
    assert runs_root(["--runs", str(tmp_path / "a")]) == (tmp_path / "a").resolve()


def test_read_manifest_and_run_file(tmp_path):
    from inspector import runs

    root = tmp_path / "runs"
    (root / "r" / "images").mkdir(parents=True)
    (root / "r" / "manifest.json").write_text('{"config": {"model": "demo"}}')
    (root / "r" / "images" / "a.png").write_bytes(b"x")
    run = runs.open_run(root, "r")
    assert runs.read_manifest(run.path) == {"config": {"model": "demo"}}
    assert runs.run_file(run, "images/a.png") == (root / "r" / "images" / "a.png").resolve()
    with pytest.raises(runs.RunError):
        runs.run_file(run, "images/missing.png")
    (root / "other.png").write_bytes(b"x")  # inside the runs directory, but not in this run
    with pytest.raises(runs.UnsafePath):
        runs.run_file(run, "../other.png")
    for text in ("{ not json", "[1, 2]"):
        (root / "r" / "manifest.json").write_text(text)
        with pytest.raises(runs.RunError, match="manifest"):
            runs.read_manifest(run.path)
