"""What analysis reads from a run: its generations, steps, activity partitions, and a DuckDB connection.

A partition is one (layer, kind) of the activity table. Feature partitions are analysed only once the pass
that wrote them finished; an unfinished one is reported as pending rather than analysed half-written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from backend.errors import DifflensError
from backend.run.config import AnalysisConfig
from backend.run.context import RunContext, as_context
from backend.run.schema import DEFAULT_SAE, is_feature, sae_id_of
from backend.run.store import RunStore


@dataclass
class Partition:
    """The activity of one (layer, kind)."""

    layer: str
    kind: str
    files: list[str]
    n_units: int

    @property
    def name(self) -> str:
        return f"{self.layer}/{self.kind}"


@dataclass
class RunInputs:
    ctx: RunContext
    gens: pl.DataFrame
    """generations sorted by gen_id, plus `g` (index of its group in `groups`) and `p` (index of its prompt)."""
    groups: list[str]
    timesteps: np.ndarray
    partitions: list[Partition]
    pending: list[str]
    """Why some partitions were left out (e.g. a feature pass still running)."""

    @property
    def n_steps(self) -> int:
        return len(self.timesteps)

    @property
    def store(self) -> RunStore:
        return self.ctx.store

    @property
    def manifest(self) -> dict:
        return self.ctx.manifest


def connect(cfg: AnalysisConfig) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(config={"memory_limit": cfg.duckdb_memory_limit, "threads": cfg.duckdb_threads})


def load_inputs(run) -> RunInputs:
    """The analysis inputs of a run (a directory or a RunContext) whose capture has finished."""
    ctx = as_context(run, require="capture")
    store, manifest = ctx.store, ctx.manifest
    gens = store.read_table("generations").sort("gen_id")
    groups = sorted(gens["group"].unique().to_list())
    prompts = gens["prompt"].unique(maintain_order=True).to_list()
    gens = gens.with_columns(
        g=pl.col("group").replace_strict(groups, list(range(len(groups))), return_dtype=pl.Int32),
        p=pl.col("prompt").replace_strict(prompts, list(range(len(prompts))), return_dtype=pl.Int32),
    )
    timesteps = store.read_table("steps").sort("step")["timestep"].to_numpy()
    partitions, pending = _partitions(store, manifest)
    if not partitions:
        raise DifflensError(f"{store.root} has no activity tables; rerun `python cli.py capture`")
    return RunInputs(ctx, gens, groups, timesteps, partitions, pending)


def _partitions(store: RunStore, manifest: dict) -> tuple[list[Partition], list[str]]:
    stages = manifest.get("stages", {})
    features_stage = stages.get("features")
    out, pending = [], []
    for kind_dir in sorted(store.table_dir("activity").glob("layer=*/kind=*")):
        layer, kind = kind_dir.parent.name.split("=", 1)[1], kind_dir.name.split("=", 1)[1]
        files = sorted(str(p) for p in kind_dir.glob("*.parquet"))
        if not files:
            continue
        if is_feature(kind) and _being_recorded(features_stage, layer, sae_id_of(kind)):
            pending.append(f"{layer}/{kind}: the feature pass has not finished (rerun run-all)")
            continue
        out.append(Partition(layer, kind, files, _n_units(store, layer, kind, files)))
    return out, pending


def _being_recorded(record: dict | None, layer: str, sae_id: str) -> bool:
    """An unfinished features pass is recording this SAE (a format-2 record names none: then every SAE)."""
    if record is None or record.get("status") == "done":
        return False
    recording = record.get("recording")
    return recording is None or sae_id in recording.get(layer, [])


def _n_units(store: RunStore, layer: str, kind: str, files: list[str]) -> int:
    """Channels: as recorded; features: the SAE's width (never-active features still count as units)."""
    cfg_path = store.sae_dir(layer, sae_id_of(kind) or DEFAULT_SAE) / "cfg.json"
    if is_feature(kind) and cfg_path.is_file():
        return int(json.loads(cfg_path.read_text())["n_latents"])
    with duckdb.connect() as con:
        top = con.execute("SELECT max(unit) FROM read_parquet(?)", [files]).fetchone()[0]
    return int(top) + 1 if top is not None else 0


def fingerprint(inputs: RunInputs, partitions: list[Partition] | None = None) -> str:
    """Changes whenever an input table file changes (name, size or modification time): the activity files of the
    partitions (default: every partition) and the generations files."""
    h = hashlib.sha256()
    paths = [f for p in (inputs.partitions if partitions is None else partitions) for f in p.files]
    paths += sorted(str(p) for p in inputs.store.table_dir("generations").glob("*.parquet"))
    for path in paths:
        st = Path(path).stat()
        h.update(f"{Path(path).relative_to(inputs.store.root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


SHARD = "part-0000000"
"""The one shard of each analysis table partition."""


def read_part(store: RunStore, table: str, part: Partition) -> pl.DataFrame:
    path = store.partition_dir(table, part.layer, part.kind) / f"{SHARD}.parquet"
    if not path.is_file():
        raise DifflensError(f"{store.root} has no {table} table for {part.name}; run `python cli.py analyze` first")
    return pl.read_parquet(path)
