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



def test_write_behind_starts_writeback_and_drops_files_lag_files_later(tmp_path, monkeypatch):
    """WriteBehind: started(fd) advises DONTNEED on the open file (Linux then starts its writeback); once `lag` newer
    files are queued, the oldest is advised again (its clean pages leave the cache). A file removed meanwhile is
    skipped; the files' contents are untouched."""
    from backend.fileio import WriteBehind

    advised = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: advised.append(
        (os.fstat(fd).st_ino, offset, length, advice)), raising=False)
    monkeypatch.setattr(os, "POSIX_FADV_DONTNEED", 4, raising=False)
    wb = WriteBehind(lag=2)
    paths = [tmp_path / f"f{i}" for i in range(4)]
    inodes = []
    for i, path in enumerate(paths):
        with open(path, "wb") as f:
            f.write(bytes([i]) * 10_000)
            f.flush()
            wb.started(f.fileno())
        inodes.append(path.stat().st_ino)
        if i == 1:
            paths[0].unlink()  # gone before its turn comes: skipped
        wb.written(path)
        if i == 2:  # f0 is due (3 queued, lag 2) but removed: only the four starts so far
            assert [a[0] for a in advised] == inodes[:3]
    assert all(a[1:] == (0, 0, 4) for a in advised)
    assert [a[0] for a in advised] == [*inodes, inodes[1]]  # f1 dropped once f3 is queued
    assert [p.read_bytes() for p in paths[1:]] == [bytes([i]) * 10_000 for i in (1, 2, 3)]


def test_write_behind_does_nothing_without_posix_fadvise(tmp_path, monkeypatch):
    from backend.fileio import WriteBehind

    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    wb = WriteBehind(lag=0)
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with open(path, "rb") as f:
        wb.started(f.fileno())
    wb.written(path)
    assert path.read_bytes() == b"x"
