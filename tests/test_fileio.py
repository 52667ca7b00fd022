"""backend/fileio.py: atomic writes leave either the old file or the new one, never a part, and no temporaries."""

import os
import stat

import pytest

from backend.fileio import atomic_write_bytes, atomic_write_json


def test_atomic_write_bytes_replaces_creates_folders_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "a" / "b" / "image.png"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["image.png"]
    assert stat.S_IMODE(target.stat().st_mode) & 0o044 == 0o044  # readable by others (inspector, tunnels)


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "t.json"
    atomic_write_json(target, {"v": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert os.listdir(tmp_path) == ["t.json"]


def test_written_files_are_readable_by_others_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_bytes(tmp_path / "image.png", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "image.png").stat().st_mode) == 0o644
