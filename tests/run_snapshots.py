"""Byte-level snapshots of a directory tree, to check that a refused command changed nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(root: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (directories included as empty entries)."""
    root = Path(root)
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out
