"""Top examples: per unit, the generations with the highest activation, each with a spatial heat-map.

Selection (DuckDB, streaming): per (unit, step) the top-N generations by cfg.example_stat, kept as
`max_by(..., N)` lists, so memory is units x steps x N. From these,
  - step = -1 rows rank generations by their activation maximised over steps (a generation in the overall
    top N is in the top N of its best step, so the per-step lists hold every candidate); their heat-map is
    taken at that best step (`heatmap_step`);
  - rows at each peak step of the unit rank generations at that step (`heatmap_step` = step).

Heat-maps are recorded by replaying the chosen generations (same prompt, seed, steps and guidance as the
capture; generation is deterministic) under `read_activations` with the capture's read/half settings: for a
channel, its map at `heatmap_step`; for a feature, its SAE code map (sae/<layer>/). Each replayed map is
checked against the recorded activity (its pooled value must equal the recorded one, within
analysis.replay_tolerance and at least 4 ulps of the run's dtype), so a replay that does not reproduce the
capture is an error, not a silent wrong picture. GPU kernels (in half precision above all) round differently for
other batch sizes, so a half-precision run or a GPU replay replays the capture's own batches, whole
(analysis.replay_batches), with deterministic kernels (backend/models/base.py deterministic_kernels, as capture).

Heat-maps are stored in `examples` as a row-major list<float32> column `heatmap` with `height` x `width`.
Replay runs in batches of generations; each batch writes a work shard under _work/analysis/heatmaps/ and a
marker, so an interrupted replay resumes at the first unfinished batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from backend.analysis.inputs import Partition, RunInputs
from backend.errors import DifflensError
from backend.models.base import CONDITION_COLUMNS, condition_arguments
from backend.models.hooks import HookEvent, read_activations
from backend.run.config import AnalysisConfig
from backend.run.context import RunContext
from backend.run.schema import is_feature
from backend.run.store import RunStore, shard_name

REPLAY_STAGE = "analysis-heatmaps"

TOP_SQL = """
WITH top AS (
    SELECT unit, step, unnest(max_by({{'gen_id': gen_id, 'v': {stat}}}, {stat}, ?)) AS t
    FROM read_parquet(?) GROUP BY unit, step)
SELECT unit, step, t.gen_id AS gen_id, t.v AS activation FROM top
"""


def heatmap_dir(store: RunStore) -> Path:
    return store.root / "_work" / "analysis" / "heatmaps"


def select_examples(con: duckdb.DuckDBPyConnection, part: Partition, peaks: pl.DataFrame,
                    cfg: AnalysisConfig) -> pl.DataFrame:
    """Rows (unit, step, rank, gen_id, activation, heatmap_step) of one partition, sorted by (unit, step, rank)."""
    n = cfg.examples_top_n
    top = pl.DataFrame(con.execute(TOP_SQL.format(stat=cfg.example_stat), [n, part.files]).fetchnumpy())
    top = top.select(pl.col("unit").cast(pl.Int32), pl.col("step").cast(pl.Int16), pl.col("gen_id").cast(pl.Int32),
                     pl.col("activation").cast(pl.Float32))
    ranked = top.sort(["activation", "gen_id"], descending=[True, False])
    overall = (ranked.unique(["unit", "gen_id"], keep="first", maintain_order=True)
               .with_columns(rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int16).over("unit"))
               .filter(pl.col("rank") <= n)
               .select("unit", pl.lit(-1, pl.Int16).alias("step"), "rank", "gen_id", "activation",
                       pl.col("step").alias("heatmap_step")))
    at_peaks = (ranked.join(peaks.select(pl.col("unit").cast(pl.Int32), pl.col("step").cast(pl.Int16)),
                            on=["unit", "step"], how="semi", maintain_order="left")
                .with_columns(rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int16).over(["unit", "step"]))
                .filter(pl.col("rank") <= n)
                .select("unit", "step", "rank", "gen_id", "activation", pl.col("step").alias("heatmap_step")))
    return pl.concat([overall, at_peaks]).sort(["unit", "step", "rank"])


class _Keeper:
    """Hook callback: keeps the token maps [T, C] of the wanted (layer, batch index, step) triples."""

    def __init__(self, wanted: dict[tuple[str, int], list[int]]):
        self.wanted = wanted
        self.tokens: dict[tuple[str, int, int], torch.Tensor] = {}
        self.spatial: dict[str, tuple[int, int] | None] = {}
        self.prefix: dict[str, int] = {}
        """Per layer, the tokens before its grid (an image classifier's CLS when reading all tokens)."""

    def __call__(self, ev: HookEvent) -> None:
        self.spatial[ev.layer] = ev.spatial
        self.prefix[ev.layer] = ev.prefix
        for b in self.wanted.get((ev.layer, ev.step), ()):
            self.tokens[(ev.layer, b, ev.step)] = ev.tokens[b].float().cpu()


def grid_shape(spatial: tuple[int, int] | None, n_tokens: int) -> tuple[int, int]:
    """(H, W) of a map; a sequence is shown as a square when it is one, else as one row."""
    if spatial is not None:
        return int(spatial[0]), int(spatial[1])
    side = math.isqrt(n_tokens)
    return (side, side) if side * side == n_tokens else (1, n_tokens)


def replay_tolerance(cfg: AnalysisConfig, run_dtype: str, model_dtype: torch.dtype) -> float:
    """The relative tolerance of the replay check: cfg.replay_tolerance, but at least 4 units in the last place
    (4 eps) of the coarser of the run's dtype and the replaying model's: half-precision kernels round differently
    from run to run where torch has no deterministic one."""
    from backend.models import parse_dtype

    eps = max(torch.finfo(parse_dtype(run_dtype)).eps, torch.finfo(model_dtype).eps)
    return max(cfg.replay_tolerance, 4 * eps)


def replay_by_capture_batches(cfg: AnalysisConfig, run_dtype: str, device: torch.device | str) -> bool:
    """Whether the replay runs the capture's batches (analysis.replay_batches; "auto": for a run in half
    precision or a replay on a GPU, where kernels depend on the batch's size and composition)."""
    if cfg.replay_batches != "auto":
        return cfg.replay_batches == "capture"
    return run_dtype not in ("float32", "fp32") or torch.device(device).type == "cuda"


def replay_batches(gens: pl.DataFrame, requested: pl.Series, cfg: AnalysisConfig, capture_batch_size: int | None,
                   ) -> list[pl.DataFrame]:
    """The batches the replay generates: with capture_batch_size, the capture's batches (backend/stages/capture.py
    plan_batches: every generation of the run cut into batches of that size in gen_id order) that hold a requested
    generation, whole; else the requested generations, cfg.replay_batch_size per batch (grouped by steps and
    guidance)."""
    gens = gens.sort("gen_id")
    if capture_batch_size:
        batches = [gens.slice(i, capture_batch_size) for i in range(0, len(gens), capture_batch_size)]
        return [b for b in batches if b["gen_id"].is_in(requested.implode()).any()]
    wanted = gens.filter(pl.col("gen_id").is_in(requested.implode()))
    batches = []
    for _, same in wanted.group_by(["n_steps", "guidance"], maintain_order=True):
        batches += [same.slice(i, cfg.replay_batch_size) for i in range(0, len(same), cfg.replay_batch_size)]
    return batches


def generation_conditions(rows: pl.DataFrame) -> dict:
    """generate() keyword arguments that reproduce these generations rows' negative prompts and control images
    (columns a run captured before they existed lacks: none)."""
    return condition_arguments(**{c: rows[c].to_list() for c in CONDITION_COLUMNS if c in rows.columns})


def generation_inputs(rows: pl.DataFrame) -> list[str]:
    """What generate() takes to replay these generations rows: their prompts, or an image classifier's image paths
    (`image_path`; runs captured before the column existed have none)."""
    if "image_path" in rows.columns and rows["image_path"].null_count() < len(rows):
        return [path or prompt for path, prompt in zip(rows["image_path"], rows["prompt"], strict=True)]
    return rows["prompt"].to_list()


def replay_heatmaps(inputs: RunInputs, requests: pl.DataFrame, cfg: AnalysisConfig, progress: bool = True) -> int:
    """Replay the generations of requests (layer, kind, unit, gen_id, heatmap_step, activation) and write their
    heat-maps as work shards; returns the number of batches replayed (0 when all were done)."""
    ctx = inputs.ctx
    store = ctx.store
    identity = ctx.manifest.get("identity") or {}
    run_dtype = identity.get("dtype") or ctx.config.dtype
    device = cfg.device or ctx.device
    capture_batch_size = None
    if replay_by_capture_batches(cfg, run_dtype, device):
        capture_batch_size = int((identity.get("capture") or {}).get("batch_size") or ctx.config.capture.batch_size)
    batches = replay_batches(inputs.gens, requests["gen_id"].unique(), cfg, capture_batch_size)
    plan = f"capture-{capture_batch_size}" if capture_batch_size else f"requested-{cfg.replay_batch_size}"
    restart_other_plan(store, plan)
    todo = [b for b in batches if not store.batch_done(REPLAY_STAGE, shard_name(int(b["gen_id"][0])))]
    if not todo:
        return 0
    if cfg.device and cfg.device != ctx.device:
        ctx = RunContext(ctx.store, ctx.manifest, device=cfg.device, dtype=ctx.dtype)
    model = ctx.model
    tolerance = replay_tolerance(cfg, run_dtype, model.dtype)
    saes = _load_saes(ctx, requests)
    layers = sorted(requests["layer"].unique().to_list())
    with tqdm(total=sum(len(b) for b in todo), desc="replay heat-maps", unit="img", disable=not progress) as bar:
        for batch in todo:
            mine = requests.join(batch.select("gen_id").with_row_index("b"), on="gen_id")
            wanted: dict[tuple[str, int], list[int]] = {}
            for (layer, step, b), _ in mine.group_by(["layer", "heatmap_step", "b"]):
                wanted.setdefault((layer, int(step)), []).append(int(b))
            keeper = _Keeper(wanted)
            with read_activations(model, layers, keeper, read=ctx.read, half=ctx.half):
                model.generate(generation_inputs(batch), batch["seed"].to_list(), int(batch["n_steps"][0]),
                               float(batch["guidance"][0]), **generation_conditions(batch))
            table = _maps_table(mine, keeper, saes, cfg, tolerance)
            name = shard_name(int(batch["gen_id"][0]))
            store.write_parquet(heatmap_dir(store) / f"{name}.parquet", table)
            store.mark_batch_done(REPLAY_STAGE, name, n=len(batch), plan=plan)
            bar.update(len(batch))
    return len(todo)


def restart_other_plan(store: RunStore, plan: str) -> bool:
    """Delete the replay's markers and work shards when any marker was written under another batch plan (its
    `plan`: "capture-<capture batch size>" or "requested-<replay_batch_size>"; both settings, and the device "auto"
    looks at, are outside the analysis stage key). A marker is named by its batch's first generation, and another
    plan's batch of that name covers other generations: resuming over it would skip some. True when it did."""
    import json
    import shutil

    markers = sorted((store.root / "_done" / REPLAY_STAGE).glob("*.json"))
    if all(json.loads(m.read_text()).get("plan") == plan for m in markers):
        return False
    store.clear_stage_markers(REPLAY_STAGE)
    shutil.rmtree(heatmap_dir(store), ignore_errors=True)
    return True


def _load_saes(ctx, requests: pl.DataFrame) -> dict:
    """{(layer, kind): its SAE} for the feature kinds requested."""
    pairs = requests.select("layer", "kind").unique().rows()
    return {(layer, kind): ctx.sae(layer, kind) for layer, kind in pairs if is_feature(kind)}


@torch.no_grad()
def _maps_table(mine: pl.DataFrame, keeper: _Keeper, saes: dict, cfg: AnalysisConfig,
                tolerance: float | None = None) -> pa.Table:
    """The heat-maps of one replayed batch, each checked against its recorded pooled value within tolerance
    (relative; default cfg.replay_tolerance)."""
    tolerance = cfg.replay_tolerance if tolerance is None else tolerance
    cols: dict[str, list] = {k: [] for k in ("layer", "kind", "unit", "gen_id", "heatmap_step", "heatmap",
                                              "height", "width")}
    for (layer, kind, b, step), rows in mine.group_by(["layer", "kind", "b", "heatmap_step"]):
        tok_TC = keeper.tokens[(layer, int(b), int(step))]
        units = torch.as_tensor(rows["unit"].to_numpy().astype(np.int64))
        if kind == "channel":
            maps_UT = tok_TC[:, units].T
        else:
            sae = saes[(layer, kind)]
            maps_UT = sae.encode(tok_TC.to(sae.W_dec.device, sae.W_dec.dtype), dense=True)[:, units.to(
                sae.W_dec.device)].T.float().cpu()
        maps = maps_UT.numpy()
        pooled = maps.max(1) if cfg.example_stat == "max" else maps.mean(1)
        recorded = rows["activation"].to_numpy()
        scale = max(1.0, float(np.abs(recorded).max()))
        if not np.allclose(pooled, recorded, rtol=tolerance, atol=tolerance * scale):
            worst = int(np.abs(pooled - recorded).argmax())
            raise DifflensError(
                f"replaying generation {rows['gen_id'][worst]} did not reproduce its recorded {layer}/{kind} "
                f"activity (unit {rows['unit'][worst]}: {pooled[worst]:.5g} vs {recorded[worst]:.5g}, relative "
                f"tolerance {tolerance:.3g}); generation is not deterministic here: run analyze on the capture's "
                "device and dtype with analysis.replay_batches = 'capture', or raise analysis.replay_tolerance")
        prefix = keeper.prefix.get(layer, 0)  # checked over every token above; shown: the grid only
        maps = maps[:, prefix:]
        h, w = grid_shape(keeper.spatial[layer], maps.shape[1])
        n = len(rows)
        cols["layer"] += [layer] * n
        cols["kind"] += [kind] * n
        cols["unit"].append(rows["unit"].to_numpy())
        cols["gen_id"].append(rows["gen_id"].to_numpy())
        cols["heatmap_step"].append(np.full(n, step, np.int16))
        cols["heatmap"] += list(maps.astype(np.float32))
        cols["height"].append(np.full(n, h, np.int16))
        cols["width"].append(np.full(n, w, np.int16))
    return pa.table({
        "layer": pa.array(cols["layer"], pa.string()),
        "kind": pa.array(cols["kind"], pa.string()),
        "unit": np.concatenate(cols["unit"]).astype(np.int32),
        "gen_id": np.concatenate(cols["gen_id"]).astype(np.int32),
        "heatmap_step": np.concatenate(cols["heatmap_step"]),
        "heatmap": pa.array(cols["heatmap"], pa.list_(pa.float32())),
        "height": np.concatenate(cols["height"]),
        "width": np.concatenate(cols["width"]),
    })


def examples_with_heatmaps(store: RunStore, part: Partition, examples: pl.DataFrame) -> pa.Table:
    """The examples rows of one partition joined with their replayed heat-maps."""
    maps = (pl.scan_parquet(str(heatmap_dir(store) / "*.parquet"))
            .filter((pl.col("layer") == part.layer) & (pl.col("kind") == part.kind))
            .select("unit", "gen_id", "heatmap_step", "heatmap", "height", "width")
            .unique(["unit", "gen_id", "heatmap_step"]).collect())
    out = examples.join(maps, on=["unit", "gen_id", "heatmap_step"], how="left", maintain_order="left")
    if out["heatmap"].null_count():
        raise DifflensError(f"{store.root}: {out['heatmap'].null_count()} {part.name} examples have no replayed "
                            "heat-map; delete _work/analysis and _done/analysis* and rerun analyze")
    return out.to_arrow()
