"""The run directory: the only code that writes (and the backend's only reader of) `runs/<name>/`.

docs/run-format.md is the normative description of the format; backend/run/schema.py its table catalogue. In short:
    manifest.json                 format_version, identity, config, versions, stage status, keys and timings
    images/<gen_id:06d>.png       final image of each generation
    activations/<layer>/          part-NNNNNNN.npy [N, d] (float16, or bfloat16 bits for a bfloat16 run)
                                  + part-NNNNNNN.parquet (gen_id, step, position) + meta.json (d, dtype, count)
    tables/<table>/...            Parquet; large tables are hive-partitioned: layer=<layer>/kind=<kind>/part-*.parquet
    _done/<stage>/<batch>.json    markers: a batch of a stage is complete only once its marker exists

Every file is written to a temporary name and renamed. Shard names derive from the batch (its first gen_id),
so a resumed or repeated stage replaces files rather than adding new ones. Every table file is cast to its
catalogue schema on the way out (columns that differ from the schema are a ValueError: a bug in the writer).

Stage keys: each stage records `stages.<stage>.key = stage_key(inputs)`, a digest of its resolved inputs;
`begin_stage` clears the stage's batch markers when the recorded key differs, so the stage runs again.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from backend.fileio import WriteBehind, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_with
from backend.run import schema
from backend.run.manifest import MANIFEST
from sae.data import bfloat16_bits, shard_dtype_name

ROW_GROUP_ROWS = schema.ROW_GROUP_ROWS


TOKEN_DTYPES = ("float16", "bfloat16")
"""Token shard dtypes (meta.json "dtype"): bfloat16 for a run in bfloat16, float16 otherwise (token_dtype)."""
FLOAT16_MAX = 65504.0
"""The largest float16: float16 token shards clamp finite values beyond it (and count them)."""
TOKEN_CLAMPED_KEY = "difflens.clamped"
"""Key of a token index file's Parquet metadata: values of its shard clamped to +-FLOAT16_MAX (a decimal string)."""


def token_dtype(run_dtype: str) -> str:
    """The token shard dtype of a run in run_dtype ("float32", "bfloat16", ... or a torch dtype's name)."""
    return "bfloat16" if str(run_dtype).removeprefix("torch.") in ("bfloat16", "bf16") else "float16"


def clamp_to_float16(x: np.ndarray) -> tuple[np.ndarray, int]:
    """(x as float16 with finite values beyond +-FLOAT16_MAX clamped to it, how many were); inf and NaN stay."""
    x = np.asarray(x)
    if x.dtype == np.float16:
        return x, 0
    over = np.isfinite(x) & (np.abs(x) > FLOAT16_MAX)
    n = int(over.sum())
    if n:
        x = np.where(over, np.sign(x) * FLOAT16_MAX, x)
    return x.astype(np.float16), n


def shard_name(first_gen_id: int) -> str:
    return f"part-{first_gen_id:07d}"


def stage_key(inputs) -> str:
    """The stage key of a stage's resolved inputs (JSON-able: its config section, the keys of the stages it reads,
    ...): the first 16 hex digits of sha256 over their canonical JSON (sorted keys, no spaces, ASCII)."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def table_spec(table: str) -> schema.TableSpec:
    """The catalogue entry of a table; a name not in the catalogue is a ValueError (a bug in the writer)."""
    spec = schema.TABLES.get(table)
    if spec is None:
        raise ValueError(f"{table!r} is not a table of the run format (backend/run/schema.py TABLES)")
    return spec


def conform(table: str, data: pa.Table) -> pa.Table:
    """data cast to the catalogue schema of `table` (columns reordered to the schema's order).

    A table not in the catalogue, or data whose column names differ from the schema's, is a ValueError (a bug in
    the writer); so is a value the cast would change (a fraction into an integer, an integer out of range).
    """
    want = table_spec(table).schema
    missing = [n for n in want.names if n not in data.column_names]
    extra = [n for n in data.column_names if n not in want.names]
    if missing or extra or len(set(data.column_names)) != data.num_columns:
        raise ValueError(f"table {table!r}: columns differ from its schema (missing {missing}, unexpected {extra}"
                         f"{', duplicated' if len(set(data.column_names)) != data.num_columns else ''})")
    data = data.select(want.names)
    if data.schema.remove_metadata().equals(want):
        return data
    columns = []
    for field, column in zip(want, data.columns, strict=True):
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"table {table!r}: column {field.name!r} ({column.type}) does not cast to "
                             f"{field.type}: {exc}") from exc
    return pa.Table.from_arrays(columns, schema=want)


def delta_columns(schema: pa.Schema) -> list[str]:
    """The integer columns (gen_id, step, unit, position, rank, ...): DELTA_BINARY_PACKED. Sorted or repeating
    integers pack into a few bits per value at a fraction of a dictionary's write time (capture writes its shards
    while generating: benchmarks/capture_overhead.py)."""
    return [f.name for f in schema if pa.types.is_integer(f.type)]


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth dictionary-encoding: all but the integer ones (delta_columns) and the floating-point ones
    (and lists of them). Activations rarely repeat, so a dictionary on them costs pyarrow 4x the write time and
    makes the file larger."""
    def floating(t: pa.DataType) -> bool:
        while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            t = t.value_type
        return pa.types.is_floating(t)

    delta = set(delta_columns(schema))
    return [f.name for f in schema if not floating(f.type) and f.name not in delta]


def write_parquet_file(table: pa.Table, path, row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """pq.write_table with the run format's settings (docs/run-format.md, Parquet)."""
    pq.write_table(table, path, compression="zstd", row_group_size=row_group_rows,
                   use_dictionary=dictionary_columns(table.schema),
                   column_encoding=dict.fromkeys(delta_columns(table.schema), "DELTA_BINARY_PACKED"))


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.write_behind = WriteBehind()
        """Token shards are written behind: read again only by SAE training, they do not stay in the page cache."""

    # ------------------------------------------------------------------ paths
    def table_dir(self, table: str) -> Path:
        return self.root / "tables" / table

    def partition_dir(self, table: str, layer: str, kind: str) -> Path:
        return self.table_dir(table) / f"layer={layer}" / f"kind={kind}"

    def activations_dir(self, layer: str) -> Path:
        return self.root / "activations" / layer

    def sae_dir(self, layer: str, sae_id: str = schema.DEFAULT_SAE) -> Path:
        """sae/<layer>/<sae_id>/ (a format-1/2 run's sae/<layer>/ for its default SAE: schema.sae_path)."""
        return schema.sae_path(self.root, layer, sae_id)

    def saes(self) -> list[tuple[str, str]]:
        """Every (layer, sae_id) with an SAE in the run (schema.run_saes)."""
        return schema.run_saes(self.root)

    def image_path(self, gen_id: int) -> Path:
        return self.root / "images" / f"{gen_id:06d}.png"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def table_glob(self, table: str) -> str:
        """A DuckDB/polars glob over every Parquet file of a table."""
        return str(self.table_dir(table) / "**" / "*.parquet")

    # ------------------------------------------------------------------ manifest
    def read_manifest(self) -> dict | None:
        """manifest.json, or None when there is none; a run of another format version is a DifflensError."""
        path = self.root / MANIFEST
        if not path.exists():
            return None
        manifest = json.loads(path.read_text())
        schema.check_format_version(manifest, self.root)
        return manifest

    def write_manifest(self, manifest: dict) -> None:
        """Write manifest.json, with `format_version` set to this difflens' format."""
        atomic_write_json(self.root / MANIFEST, {**manifest, "format_version": schema.FORMAT_VERSION})

    def update_stage(self, stage: str, **fields) -> dict:
        manifest = self.read_manifest() or {}
        manifest.setdefault("stages", {}).setdefault(stage, {}).update(fields)
        self.write_manifest(manifest)
        return manifest

    def begin_stage(self, stage: str, key: str, clear: Iterable[str | Path] = (), **fields) -> bool:
        """Start (or resume) a stage whose resolved inputs have stage_key `key`.

        When the manifest records another key for the stage (or none: it never ran, or ran before stage keys),
        its batch markers `_done/<stage>/` are deleted, so are the run-relative paths in `clear` (the stage's
        outputs: files or directories), and its manifest record is replaced; otherwise the record is updated and
        the stage resumes after its last marker. Either way the record gets status "running", the key and
        `fields`. Returns True when the stage starts from scratch (the key differed).
        """
        manifest = self.read_manifest() or {}
        stages = manifest.setdefault("stages", {})
        changed = (stages.get(stage) or {}).get("key") != key
        if changed:
            self.clear_stage_markers(stage)
            for rel in clear:
                self._remove(rel)
            stages[stage] = {}
        stages.setdefault(stage, {}).update(fields, status="running", key=key)
        self.write_manifest(manifest)
        return changed

    def _remove(self, rel: str | Path) -> None:
        path = self.root / rel
        if self.root.resolve() not in path.resolve().parents:
            raise ValueError(f"{rel} is not inside the run directory {self.root}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

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
        shutil.rmtree(self.root / "_done" / stage, ignore_errors=True)

    # ------------------------------------------------------------------ writers
    def write_parquet(self, path: Path, table: pa.Table) -> Path:
        """Write a Parquet file atomically. A file under tables/ is a catalogue table's: it is conformed to its
        schema (the table is the first directory under tables/, or the file's stem)."""
        rel = Path(path).relative_to(self.root) if Path(path).is_relative_to(self.root) else None
        rows = ROW_GROUP_ROWS
        if rel is not None and len(rel.parts) >= 2 and rel.parts[0] == "tables":
            name = rel.parts[1][: -len(".parquet")] if len(rel.parts) == 2 else rel.parts[1]
            table = conform(name, table)
            rows = table_spec(name).row_group_rows
        atomic_write_with(path, lambda p: write_parquet_file(table, p, rows), suffix=".parquet")
        return path

    def write_table_shard(self, table: str, name: str, data: pa.Table, layer: str | None = None,
                          kind: str | None = None) -> Path:
        """One file of a sharded or partitioned table: tables/<table>[/layer=<layer>[/kind=<kind>]]/<name>.parquet.

        layer and kind must be given exactly when the table's layout has them (schema.LAYOUTS)."""
        spec = table_spec(table)
        given = tuple(c for c, v in (("layer", layer), ("kind", kind)) if v is not None)
        if spec.layout == "file":
            raise ValueError(f"table {table!r} is one file, tables/{table}.parquet; use write_table")
        if given != spec.partitions:
            raise ValueError(f"table {table!r} is laid out as {spec.layout!r}: it takes partition columns "
                             f"{list(spec.partitions)} (got {list(given)})")
        base = self.table_dir(table)
        for col, value in (("layer", layer), ("kind", kind)):
            if value is not None:
                base = base / f"{col}={value}"
        return self.write_parquet(base / f"{name}.parquet", data)

    def write_table(self, table: str, data: pa.Table) -> Path:
        """A small table in one file, tables/<table>.parquet."""
        spec = table_spec(table)
        if spec.layout != "file":
            raise ValueError(f"table {table!r} is laid out as {spec.layout!r}, not one file; use write_table_shard")
        return self.write_parquet(self.root / "tables" / f"{table}.parquet", data)

    def table_from_rows(self, table: str, rows: list[dict]) -> pa.Table:
        """Rows (dicts) as a table of the catalogue schema; a column absent from every row is null."""
        spec = table_spec(table)
        unknown = sorted({k for r in rows for k in r} - set(spec.schema.names))
        if unknown:
            raise ValueError(f"table {table!r}: columns differ from its schema (unexpected {unknown})")
        return pa.Table.from_pylist(rows, schema=spec.schema)

    def write_token_shard(self, layer: str, name: str, tokens_ND: np.ndarray, index: pa.Table,
                          dtype: str = "float16", clamped: int = 0) -> int:
        """Token vectors [N, d] and their (gen_id, step, position) rows, under one shard name; returns the number
        of values clamped to the float16 range.

        dtype is the shard's (docs/run-format.md, token shards): "float16", or "bfloat16" (a run in bfloat16:
        stored as uint16 bit patterns; tokens_ND is then float values, rounded to nearest even, or already bit
        patterns as uint16). A float16 shard clamps finite values beyond +-65504 (FLOAT16_MAX) to it and counts
        them; `clamped` adds the values a caller clamped before (capture clamps on the device to keep its buffers
        small). The count is kept in the index file's metadata (TOKEN_CLAMPED_KEY) for finish_token_meta."""
        if sorted(index.column_names) != sorted(schema.TOKEN_INDEX.names):
            raise ValueError(f"token index columns {index.column_names} differ from {schema.TOKEN_INDEX.names}")
        if dtype not in TOKEN_DTYPES:
            raise ValueError(f"token shard dtype {dtype!r}; use one of {', '.join(TOKEN_DTYPES)}")
        tokens = np.asarray(tokens_ND)
        if dtype == "bfloat16":
            data = tokens if tokens.dtype == np.uint16 else bfloat16_bits(tokens)
        else:
            data, clamped_here = clamp_to_float16(tokens)
            clamped += clamped_here
        index = index.select(schema.TOKEN_INDEX.names).cast(schema.TOKEN_INDEX)
        index = index.replace_schema_metadata({TOKEN_CLAMPED_KEY: str(int(clamped))})
        directory = self.activations_dir(layer)
        with atomic_path(directory / f"{name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(data))
                f.flush()
                self.write_behind.started(f.fileno())
        self.write_behind.written(directory / f"{name}.npy")
        self.write_parquet(directory / f"{name}.parquet", index)
        return int(clamped)

    def finish_token_meta(self, layer: str) -> dict:
        """Write activations/<layer>/meta.json from the shards on disk (d, dtype, count, shards, and clamped when
        values were clamped to the float16 range: then a warning says how many)."""
        directory = self.activations_dir(layer)
        shards = sorted(directory.glob("part-*.npy"))
        count, d, dtypes, clamped = 0, None, set(), 0
        for shard in shards:
            arr = np.load(shard, mmap_mode="r")
            count += arr.shape[0]
            d = arr.shape[1]
            dtypes.add(shard_dtype_name(arr))
            index = shard.with_suffix(".parquet")
            if index.exists():
                clamped += int((pq.read_schema(index).metadata or {}).get(TOKEN_CLAMPED_KEY.encode(), b"0"))
        if len(dtypes) > 1 or None in dtypes:
            raise ValueError(f"{directory}: token shards of different or unknown dtypes ({sorted(map(str, dtypes))})")
        meta = {"d": d, "dtype": dtypes.pop() if dtypes else "float16", "count": count,
                "shards": [s.stem for s in shards], "layout": "row-major"}
        if clamped:
            meta["clamped"] = clamped
            warnings.warn(f"{clamped} token values of layer {layer} ({clamped / max(count * (d or 1), 1):.2%}) were "
                          f"beyond the float16 range and clamped to +-{FLOAT16_MAX:g} in its token shards; capture "
                          "with --dtype bfloat16 to store them as they are", UserWarning, stacklevel=2)
        atomic_write_json(directory / "meta.json", meta)
        return meta

    def write_image(self, gen_id: int, img_HW3: np.ndarray) -> str:
        """A generation's image (uint8 [H, W, 3]) as images/<gen_id>.png, encoded by backend/run/png.py (capture
        writes one per generation: PIL's per-image overhead shows on a tiny model); returns its run path."""
        from backend.run.png import png_bytes

        path = self.image_path(gen_id)
        atomic_write_bytes(path, png_bytes(img_HW3))
        return self.relative(path)

    def write_png(self, rel: str | Path, image) -> str:
        """Write a PNG (a uint8 [H, W, 3] array or a PIL image) at a run-relative path; returns that path."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, np.uint8))
        path = self.root / rel
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())
        return self.relative(path)

    # ------------------------------------------------------------------ readers
    def read_table(self, table: str):
        """A table as a polars DataFrame (partition columns included)."""
        import polars as pl

        single = self.root / "tables" / f"{table}.parquet"
        if single.exists():
            return pl.read_parquet(single)
        return pl.read_parquet(self.table_glob(table), hive_partitioning=True)
