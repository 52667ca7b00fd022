"""The run directory: the only code that writes (and the backend's only reader of) `runs/<name>/`.

Layout (see ../shared/DESIGN.md):
    manifest.json                 config, model spec, layers, versions, stage status and timings
    images/<gen_id:06d>.png       final image of each generation
    activations/<layer>/          part-NNNNNNN.npy fp16 [N, d] + part-NNNNNNN.parquet (gen_id, step, position)
                                  + meta.json (d, dtype, count)
    tables/<table>/...            Parquet; large tables are hive-partitioned: layer=<layer>/kind=<kind>/part-*.parquet
    _done/<stage>/<batch>.json    markers: a batch of a stage is complete only once its marker exists

Every file is written to a temporary name and renamed. Shard names derive from the batch (its first gen_id),
so a resumed or repeated stage replaces files rather than adding new ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from backend.run.fileio import atomic_path, atomic_write_json, atomic_write_with

MANIFEST = "manifest.json"


ROW_GROUP_ROWS = 8192
"""Parquet row-group size: tables are sorted by unit, so a reader asking for one unit decodes only the row groups
whose unit range covers it (DuckDB and pyarrow skip the rest by their min/max statistics)."""


def shard_name(first_gen_id: int) -> str:
    return f"part-{first_gen_id:07d}"


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ------------------------------------------------------------------ paths
    def table_dir(self, table: str) -> Path:
        return self.root / "tables" / table

    def partition_dir(self, table: str, layer: str, kind: str) -> Path:
        return self.table_dir(table) / f"layer={layer}" / f"kind={kind}"

    def activations_dir(self, layer: str) -> Path:
        return self.root / "activations" / layer

    def sae_dir(self, layer: str) -> Path:
        return self.root / "sae" / layer

    def image_path(self, gen_id: int) -> Path:
        return self.root / "images" / f"{gen_id:06d}.png"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def table_glob(self, table: str) -> str:
        """A DuckDB/polars glob over every Parquet file of a table."""
        return str(self.table_dir(table) / "**" / "*.parquet")

    # ------------------------------------------------------------------ manifest
    def read_manifest(self) -> dict | None:
        path = self.root / MANIFEST
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.root / MANIFEST, manifest)

    def update_stage(self, stage: str, **fields) -> dict:
        manifest = self.read_manifest() or {}
        manifest.setdefault("stages", {}).setdefault(stage, {}).update(fields)
        self.write_manifest(manifest)
        return manifest

    # ------------------------------------------------------------------ batch markers
    def _marker(self, stage: str, batch: str) -> Path:
        return self.root / "_done" / stage / f"{batch}.json"

    def batch_done(self, stage: str, batch: str) -> bool:
        return self._marker(stage, batch).exists()

    def mark_batch_done(self, stage: str, batch: str, **info) -> None:
        atomic_write_json(self._marker(stage, batch), {"finished": time.time(), **info})

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files a killed writer left behind (call before any writer of this run starts)."""
        stale = list(self.root.rglob(".*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def clear_stage_markers(self, stage: str) -> None:
        import shutil

        shutil.rmtree(self.root / "_done" / stage, ignore_errors=True)

    # ------------------------------------------------------------------ writers
    def write_parquet(self, path: Path, table: pa.Table) -> Path:
        atomic_write_with(path, lambda p: pq.write_table(table, p, compression="zstd", row_group_size=ROW_GROUP_ROWS),
                          suffix=".parquet")
        return path

    def write_table_shard(self, table: str, name: str, data: pa.Table, layer: str | None = None,
                          kind: str | None = None) -> Path:
        base = self.partition_dir(table, layer, kind) if layer is not None else self.table_dir(table)
        return self.write_parquet(base / f"{name}.parquet", data)

    def write_table(self, table: str, data: pa.Table) -> Path:
        """A small table in one file, tables/<table>.parquet."""
        return self.write_parquet(self.root / "tables" / f"{table}.parquet", data)

    def write_token_shard(self, layer: str, name: str, tokens_ND: np.ndarray, index: pa.Table) -> None:
        """fp16 token vectors [N, d] and their (gen_id, step, position) rows, under one shard name."""
        directory = self.activations_dir(layer)
        with atomic_path(directory / f"{name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(tokens_ND, dtype=np.float16))
        self.write_parquet(directory / f"{name}.parquet", index)

    def finish_token_meta(self, layer: str) -> dict:
        """Write activations/<layer>/meta.json from the shards on disk (d, dtype, count, shards)."""
        directory = self.activations_dir(layer)
        shards = sorted(directory.glob("part-*.npy"))
        count, d = 0, None
        for shard in shards:
            arr = np.load(shard, mmap_mode="r")
            count += arr.shape[0]
            d = arr.shape[1]
        meta = {"d": d, "dtype": "float16", "count": count, "shards": [s.stem for s in shards], "layout": "row-major"}
        atomic_write_json(directory / "meta.json", meta)
        return meta

    def write_image(self, gen_id: int, img_HW3: np.ndarray) -> str:
        return self.write_png(self.relative(self.image_path(gen_id)), img_HW3)

    def write_png(self, rel: str | Path, image) -> str:
        """Write a PNG (a uint8 [H, W, 3] array or a PIL image) at a run-relative path; returns that path."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, np.uint8))
        path = self.root / rel
        atomic_write_with(path, lambda p: image.save(p, format="PNG"), suffix=".png")
        return self.relative(path)

    # ------------------------------------------------------------------ readers
    def read_table(self, table: str):
        """A table as a polars DataFrame (partition columns included)."""
        import polars as pl

        single = self.root / "tables" / f"{table}.parquet"
        if single.exists():
            return pl.read_parquet(single)
        return pl.read_parquet(self.table_glob(table), hive_partitioning=True)
