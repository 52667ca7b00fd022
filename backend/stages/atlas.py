"""The atlas stage of run-all (and `python cli.py atlas`): steered priors and deep dreams of the chosen units of
every analysed (layer, kind), batched across units (backend/interventions/atlas.py).

Every partition is planned (and so checked) before any is written; then each runs or resumes its batches. A
partition's stage key is kept in `stages.atlas.partitions["<layer>/<kind>"]` (docs/run-format.md): a changed
[prior] / [dream] setting redoes that partition only. Under torchrun (the `atlas` command) rank 0 records the keys,
every rank does its units (`unit % world`), and rank 0 marks the stage done once every unit has its markers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from backend.run import distributed
from backend.run.config import AtlasConfig, DreamConfig, PriorConfig

if TYPE_CHECKING:
    from backend.run.context import RunContext
    from backend.run.distributed import Dist


def atlas_partitions(ctx: RunContext, atlas: AtlasConfig) -> list[tuple[str, str]]:
    """The analysed (layer, kind) partitions atlas.layers / atlas.kinds select (empty lists: every one)."""
    from backend.errors import DifflensError
    from backend.stages.interventions import analysed_partitions

    parts = analysed_partitions(ctx.store)
    for layer in atlas.layers:
        if layer not in {p[0] for p in parts}:
            have = ", ".join(sorted({p[0] for p in parts})) or "none"
            raise DifflensError(f"{ctx.root} has no analysed layer {layer!r} (analysed: {have})")
    for kind in atlas.kinds:
        if kind not in {p[1] for p in parts if not atlas.layers or p[0] in atlas.layers}:
            raise DifflensError(f"{ctx.root} has no analysed {kind} units in the chosen layers; use channel or "
                                "feature (features need the layer's SAE and the features pass)")
    default_kinds = ("channel", "feature")
    return [(layer, kind) for layer, kind in parts
            if (not atlas.layers or layer in atlas.layers)
            and (kind in atlas.kinds if atlas.kinds else atlas.sae_variants or kind in default_kinds)]


def run_atlas(run: str | Path | RunContext, atlas: AtlasConfig | None = None, prior: PriorConfig | None = None,
              dream: DreamConfig | None = None, progress: bool = True, model=None, dist: Dist | None = None) -> dict:
    """Plan every selected partition, then run (or resume) this rank's batches of each; returns a summary (also in
    the manifest, stages.atlas)."""
    from backend.interventions.atlas import begin_partition, partition_complete, plan_atlas, run_plan, update_partition
    from backend.run.context import as_context

    atlas, prior, dream = atlas or AtlasConfig(), prior or PriorConfig(), dream or DreamConfig()
    dist = dist or distributed.from_env()
    ctx = as_context(run, model=model).require("analysis").require_generator("the atlas")
    from backend.stages.interventions import chosen_units

    plans = [plan_atlas(ctx, layer, kind, atlas, prior, dream, dist,
                        lambda n, layer=layer, kind=kind: chosen_units(ctx.store, layer, kind, n))
             for layer, kind in atlas_partitions(ctx, atlas)]
    config = {"atlas": atlas.to_dict(), "prior": prior.to_dict(), "dream": dream.to_dict()}
    if dist.is_main:
        ctx.store.remove_stale_temporaries()
        for section, values in config.items():
            ctx.record_config(section, values)
        for plan in plans:
            begin_partition(ctx, plan, config)
        ctx.store.update_stage("atlas", status="running")
    dist.barrier()
    t0 = time.time()
    results = {}
    for plan in plans:
        results[f"{plan.layer}/{plan.kind}"] = run_plan(ctx, plan, dist, progress)
    dist.barrier()
    if dist.is_main:
        for plan in plans:
            if partition_complete(ctx, plan):
                update_partition(ctx, plan.layer, plan.kind, status="done", finished=time.time(),
                                 units=len(plan.units), seconds=results[f"{plan.layer}/{plan.kind}"]["seconds"])
        done = all(partition_complete(ctx, p) for p in plans)
        ctx.store.update_stage("atlas", status="done" if done else "running", finished=time.time())
    if progress and not plans:
        tqdm.write("note: the atlas found no analysed (layer, kind) to work on")
    return {"partitions": results, "seconds": round(time.time() - t0, 3), "rank": dist.rank, "world": dist.world}
