"""The unit atlas: every chosen unit's steered prior and deep dreams, many units per forward and backward pass.

This module owns
  - `AtlasPlan` and `plan_atlas`: the validated work of one (layer, kind) (units, [prior] settings, dream variants,
    target steps, the partition's stage key). Every check runs here, before anything is written: a unit range
    outside the layer, a target step outside the run, `init = "prior"` without priors, non-finite settings, an
    unknown preset or variant are one-line errors;
  - `run_plan`: the batches of a plan (priors, then each dream variant, then heat-map animations), each one table
    shard of `atlas` + its media + a marker under _done/atlas/<layer>/<kind>/, skipped when its marker is there
    (a killed atlas resumes at its first unfinished batch); under torchrun each rank does the units with
    `unit % world == rank`;
  - the `atlas` table's rows and paths (docs/run-format.md: `atlas`, media/atlas/, latents/).

Batching. A batch of U units x S seeds is one generation batch of U * S rows for the priors
(priors.steered_priors: each row its own direction and window) and one dream batch of U * S (x target steps) rows
(dream.dream_samples: each row its own unit's objective), so the model runs once per step for all of them.
Results do not depend on the batch: each row has its own seed's random draws (tests/interventions/test_atlas.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
import torch
from tqdm.auto import tqdm

from backend.errors import DifflensError
from backend.interventions import dream as dreams
from backend.interventions import priors
from backend.interventions.animations import (
    has_heatmaps,
    heatmap_frames,
    heatmap_gif_path,
    map_size,
    unit_maps_SHW,
    write_gif,
)
from backend.interventions.media import digest, write_with_thumbnail
from backend.run.config import AtlasConfig, DreamConfig, PriorConfig, check_finite_settings
from backend.run.context import RunContext
from backend.run.distributed import Dist
from backend.run.schema import ATLAS_VARIANTS, is_feature
from backend.run.store import stage_key

TABLE = STAGE = "atlas"
VARIANT_CHANGES = {"default": {}, "no-noise": {"noise": False}, "from-prior": {"init": "prior"},
                   "from-prior-no-noise": {"init": "prior", "noise": False}}
"""atlas.dream_variants entries: how each changes the [dream] settings."""
assert tuple(VARIANT_CHANGES) == ATLAS_VARIANTS


# ------------------------------------------------------------------------------------------------ units and variants
def parse_units(spec: str, n_units: int, top, where: str) -> list[int]:
    """The units a spec names: all, top:N (top(N): concept units, then peaks), or ranges and lists (0-127, 3,5,9).
    A unit outside 0..n_units-1 is a one-line error naming the valid range."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(n_units))
    if spec.startswith("top:"):
        count = spec[4:]
        if not count.isdigit() or int(count) < 1:
            raise DifflensError(f"units {spec!r}: top:N takes a positive count, e.g. top:8")
        return sorted(top(int(count)))
    units: set[int] = set()
    for part in spec.split(","):
        a, sep, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b) if sep else int(a)
        except ValueError:
            raise DifflensError(f"units {spec!r} not understood; use all, top:N, a range 0-127 or a list "
                                "3,5,9") from None
        if not 0 <= lo <= hi < n_units:
            raise DifflensError(f"units {part.strip()} are outside {where}: valid units are 0..{n_units - 1}")
        units.update(range(lo, hi + 1))
    return sorted(units)


def variant_name(cfg: DreamConfig) -> str:
    """The `variant` of a dream's settings: default, no-noise, from-prior or from-prior-no-noise."""
    parts = (["from-prior"] if cfg.init == "prior" else []) + ([] if cfg.noise else ["no-noise"])
    return "-".join(parts) or "default"


def dream_variants(cfg: DreamConfig, names: list[str]) -> dict[str, DreamConfig]:
    """{variant: settings} of atlas.dream_variants applied to the [dream] settings (equal results: kept once)."""
    out: dict[str, DreamConfig] = {}
    for name in names:
        if name not in VARIANT_CHANGES:
            raise DifflensError(f"unknown dream variant {name!r}; use {', '.join(VARIANT_CHANGES)}")
        variant = dataclasses.replace(cfg, **VARIANT_CHANGES[name])
        out.setdefault(variant_name(variant), variant)
    return out


# ------------------------------------------------------------------------------------------------ paths
def image_rel(layer: str, kind: str, what: str, variant: str, unit: int, seed: int, step: int | None = None,
              ext: str = "png") -> str:
    """media/atlas/<layer>/<kind>/<what>-<variant>/unit-<unit:05d>-seed<seed>[-step<step>].<ext>"""
    tail = "" if step is None else f"-step{step}"
    return f"media/atlas/{layer}/{kind}/{what}-{variant}/unit-{unit:05d}-seed{seed}{tail}.{ext}"


def latents_rel(layer: str, kind: str, unit: int) -> str:
    """The safetensors file of a unit's prior latents (one tensor seed-<seed> per seed)."""
    return f"latents/{layer}/{kind}/prior-{unit:05d}.safetensors"


def marker_stage(layer: str, kind: str) -> str:
    return f"{STAGE}/{layer}/{kind}"


def batch_name(what: str, variant: str, units: list[int]) -> str:
    return f"{what}-{variant}-{units[0]:06d}-{digest(units)[:8]}"


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class AtlasPlan:
    """The validated atlas work of one (layer, kind)."""

    layer: str
    kind: str
    units: list[int]
    """Every chosen unit (all ranks)."""
    prior: PriorConfig
    dreams: dict[str, DreamConfig]
    """{variant: settings resolved for the kind} (empty: no dreams)."""
    do_priors: bool
    heatmaps: bool
    batch_units: int
    frame_ms: int
    n_steps: int
    """Denoising steps of the run (dream targets are steps of it)."""
    prior_steps: int
    """Denoising steps of the priors."""
    key: str


def check_layer_kind(ctx: RunContext, layer: str, kind: str) -> None:
    if layer not in ctx.layers:
        raise DifflensError(f"{ctx.root} has no layer {layer!r}; its layers: {', '.join(ctx.layers)}")
    if not ctx.store.partition_dir("units", layer, kind).is_dir():
        raise DifflensError(f"{ctx.root} has no analysed {layer}/{kind} (no units table); run "
                            f"`python cli.py analyze --run {ctx.root}` first")


def check_targets(cfg: DreamConfig, n_steps: int) -> None:
    bad = [t for t in dreams.parse_targets(cfg.targets) if isinstance(t, int) and not 0 <= t < n_steps]
    if bad:
        raise DifflensError(f"dream target step(s) {bad} are outside the run's steps 0..{n_steps - 1}")


def check_settings(atlas: AtlasConfig, prior: PriorConfig, dream: DreamConfig) -> None:
    """The checks of the [atlas] / [prior] / [dream] settings that need no run (run-all makes them before it starts):
    finite values, presets, variants, choices."""
    check_finite_settings("atlas", atlas.to_dict())
    priors.validate_prior(prior)
    dreams.validate_config(dream)
    for cfg in dream_variants(dream, atlas.dream_variants).values():
        dreams.validate_config(dreams.for_kind(cfg, "channel"))
    if atlas.batch_units < 1 or atlas.frame_ms < 1:
        raise DifflensError(f"atlas.batch_units and atlas.frame_ms must be at least 1 (got {atlas.batch_units}, "
                            f"{atlas.frame_ms})")


def plan_atlas(ctx: RunContext, layer: str, kind: str, atlas: AtlasConfig, prior: PriorConfig,
               dream: DreamConfig, dist: Dist, top: Callable[[int], list[int]]) -> AtlasPlan:
    """Check everything the atlas of (layer, kind) needs and return its plan (nothing is written); top(n): the
    partition's top n units (units = "top:N")."""
    check_layer_kind(ctx, layer, kind)
    n_units = ctx.n_units(layer, kind)
    units = parse_units(atlas.units, n_units, top, f"{layer}/{kind}")
    n_steps = ctx.n_steps
    prior_steps = prior.n_steps or n_steps
    priors.validate_prior(prior, prior_steps)
    dreams.validate_config(dream)
    resolved = {name: dreams.validate_config(dreams.for_kind(cfg, kind))
                for name, cfg in dream_variants(dream, atlas.dream_variants).items()}
    for cfg in resolved.values():
        check_targets(cfg, n_steps)
    check_settings(atlas, prior, dream)
    wanted = resolved if atlas.dreams else {}
    for name, cfg in wanted.items():
        if cfg.init == "prior":
            check_priors_for(ctx, layer, kind, dist.mine(units), cfg.seeds, name,
                             prior.seeds if atlas.priors else None)
    key = stage_key({"prior": prior.to_dict(), "dream": {n: c.to_dict() for n, c in resolved.items()},
                     "analysis": ctx.stage("analysis").get("key"), "n_steps": n_steps})
    heatmaps = atlas.heatmap_animations and has_heatmaps(ctx, layer)  # a text stream has no spatial grid
    return AtlasPlan(layer, kind, units, prior, wanted, atlas.priors, heatmaps, atlas.batch_units,
                     atlas.frame_ms, n_steps, prior_steps, key)


def check_priors_for(ctx: RunContext, layer: str, kind: str, units: list[int], seeds: list[int], variant: str,
                     prior_seeds: list[int] | None) -> None:
    """init = prior needs each unit's prior latent of each dream seed: made in this call (prior_seeds) or saved."""
    if prior_seeds is not None:
        missing = sorted(set(seeds) - set(prior_seeds))
        if missing:
            raise DifflensError(f"dream variant {variant} starts from the priors, but prior.seeds {prior_seeds} lack "
                                f"the dream seed(s) {missing}; give the dreams seeds the priors have")
        return
    for unit in units:
        have = saved_prior_seeds(ctx, layer, kind, unit)
        if not set(seeds) <= have:
            raise DifflensError(f"dream variant {variant} (init = prior) needs the prior of {kind} {unit} of {layer} "
                                f"for seeds {seeds}, but none is computed; run `python cli.py atlas` with priors "
                                "(atlas.priors = true) first")


def saved_prior_seeds(ctx: RunContext, layer: str, kind: str, unit: int) -> set[int]:
    from safetensors import safe_open

    path = ctx.root / latents_rel(layer, kind, unit)
    if not path.is_file():
        return set()
    with safe_open(str(path), "pt") as f:
        return {int(name.split("-", 1)[1]) for name in f.keys()}


def load_prior_latents(ctx: RunContext, layer: str, kind: str, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """The saved prior latents of (unit, seed) pairs, stacked [pairs, C, H, W]."""
    from safetensors.torch import load_file

    files: dict[int, dict] = {}
    out = []
    for unit, seed in pairs:
        if unit not in files:
            files[unit] = load_file(str(ctx.root / latents_rel(layer, kind, unit)))
        out.append(files[unit][f"seed-{seed}"])
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ the partition
def partition_record(ctx: RunContext, layer: str, kind: str) -> dict:
    manifest = ctx.store.read_manifest() or {}
    return ((manifest.get("stages", {}).get(STAGE) or {}).get("partitions") or {}).get(f"{layer}/{kind}") or {}


def update_partition(ctx: RunContext, layer: str, kind: str, replace: bool = False, **fields) -> None:
    manifest = ctx.store.read_manifest() or {}
    parts = manifest.setdefault("stages", {}).setdefault(STAGE, {}).setdefault("partitions", {})
    name = f"{layer}/{kind}"
    parts[name] = {**({} if replace else parts.get(name) or {}), **fields}
    ctx.store.write_manifest(manifest)


def begin_partition(ctx: RunContext, plan: AtlasPlan, config: dict) -> bool:
    """Record the partition's key (rank 0); a different key first deletes its markers, table files, media and
    latents (the stage-key rule, per (layer, kind)). Returns True when it starts from scratch."""
    layer, kind = plan.layer, plan.kind
    changed = partition_record(ctx, layer, kind).get("key") != plan.key
    if changed:
        ctx.store.clear_stage_markers(marker_stage(layer, kind))
        for path in (ctx.store.partition_dir(TABLE, layer, kind), ctx.root / "media" / "atlas" / layer / kind,
                     ctx.root / "latents" / layer / kind):
            shutil.rmtree(path, ignore_errors=True)
    update_partition(ctx, layer, kind, replace=changed, key=plan.key, status="running", started=time.time(),
                     config=config)
    return changed


def done_units(ctx: RunContext, plan: AtlasPlan, what: str, variant: str) -> set[int]:
    """Units whose (what, variant) batch has its marker."""
    directory = ctx.root / "_done" / marker_stage(plan.layer, plan.kind)
    done: set[int] = set()
    for path in directory.glob("*.json") if directory.is_dir() else []:
        info = json.loads(path.read_text())
        if info.get("what") == what and info.get("variant") == variant:
            done.update(int(u) for u in info.get("units", []))
    return done


# ------------------------------------------------------------------------------------------------ the batches
@dataclass(frozen=True)
class Batch:
    what: str
    """prior, dream or heatmap."""
    variant: str
    units: list[int]

    @property
    def name(self) -> str:
        return batch_name(self.what, self.variant, self.units)


def planned_batches(ctx: RunContext, plan: AtlasPlan, mine: list[int]) -> tuple[list[Batch], int]:
    """(batches still to do, batches already done) of this rank's units: priors, each dream variant, heat-maps."""
    jobs = ([("prior", "default")] if plan.do_priors else []) + [("dream", v) for v in plan.dreams] + (
        [("heatmap", "top-example")] if plan.heatmaps else [])
    todo, skipped = [], 0
    for what, variant in jobs:
        done = done_units(ctx, plan, what, variant)
        left = [u for u in mine if u not in done]
        skipped += -(-len([u for u in mine if u in done]) // plan.batch_units)
        todo += [Batch(what, variant, left[i:i + plan.batch_units]) for i in range(0, len(left), plan.batch_units)]
    return todo, skipped


def write_rows(ctx: RunContext, plan: AtlasPlan, batch: Batch, rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: (r["unit"], r["seed"], r["target_steps"]))
    ctx.store.write_table_shard(TABLE, batch.name, ctx.store.table_from_rows(TABLE, rows), layer=plan.layer,
                                kind=plan.kind)


def run_prior_batch(ctx: RunContext, plan: AtlasPlan, batch: Batch) -> None:
    """The steered priors of a batch of units: images, latents (safetensors), table shard."""
    from safetensors.torch import save_file

    from backend.fileio import atomic_write_with

    layer, kind, seeds = plan.layer, plan.kind, [int(s) for s in plan.prior.seeds]
    sae = ctx.sae(layer, kind) if is_feature(kind) else None
    plans = priors.plan_priors(ctx.units(layer, kind), kind, batch.units, plan.prior, ctx.n_channels(layer), sae,
                               plan.prior_steps, plan.n_steps)
    latents, images = priors.steered_priors(ctx.model, layer, plans, seeds, plan.prior_steps)
    rows = []
    for ui, p in enumerate(plans):
        tensors = {}
        for si, seed in enumerate(seeds):
            r = ui * len(seeds) + si
            tensors[f"seed-{seed}"] = latents[r].contiguous()
            rows.append({"unit": p.unit, "what": "prior", "variant": "default", "seed": seed,
                         "image": write_with_thumbnail(ctx.store, image_rel(layer, kind, "prior", "default", p.unit,
                                                                            seed), images[r]),
                         "target_steps": ",".join(map(str, p.steps))})
        meta = {"format": "difflens-prior-latents", "target_steps": ",".join(map(str, p.steps))}
        atomic_write_with(ctx.root / latents_rel(layer, kind, p.unit),
                          lambda path, t=tensors, m=meta: save_file(t, str(path), metadata=m), suffix=".safetensors")
    write_rows(ctx, plan, batch, rows)


def unit_targets(units: pl.DataFrame, cfg: DreamConfig, unit_ids: list[int]) -> dict[int, list[int]]:
    """Each unit's target steps ([0] when its targets name none: no peaks, never active)."""
    wanted = dreams.parse_targets(cfg.targets)
    out = {}
    for row in units.filter(pl.col("unit").is_in(unit_ids)).iter_rows(named=True):
        active = (int(row["first_active"]), int(row["last_active"]))
        steps = dreams.resolve_targets(wanted, [int(s) for s in row["peak_steps"] or []], active,
                                       cfg.max_target_steps)
        out[int(row["unit"])] = steps or [0]
    return out


def run_dream_batch(ctx: RunContext, plan: AtlasPlan, batch: Batch) -> None:
    """The dreams of one variant for a batch of units: final images, snapshot GIFs, table shard."""
    layer, kind, cfg = plan.layer, plan.kind, plan.dreams[batch.variant]
    targets = unit_targets(ctx.units(layer, kind), cfg, batch.units)
    samples = [dreams.DreamSample(unit, int(seed), group) for unit in batch.units for seed in cfg.seeds
               for group in ([tuple(targets[unit])] if cfg.joint else [(t,) for t in targets[unit]])]
    init = (load_prior_latents(ctx, layer, kind, [(s.unit, s.seed) for s in samples])
            if cfg.init == "prior" else None)
    sae = ctx.sae(layer, kind) if is_feature(kind) else None
    results = dreams.dream_samples(ctx.model, layer, kind, samples, cfg, sae, ctx.read, plan.n_steps, init)
    rows = []
    for res in results:
        s = res.sample
        step = None if cfg.joint else s.targets[0]
        frames = [res.images[k] for k in sorted(res.images)]
        rows.append({"unit": s.unit, "what": "dream", "variant": batch.variant, "seed": s.seed,
                     "image": write_with_thumbnail(ctx.store, image_rel(layer, kind, "dream", batch.variant, s.unit,
                                                                        s.seed, step), frames[-1]),
                     "animation": write_gif(ctx.root, image_rel(layer, kind, "dream", batch.variant, s.unit, s.seed,
                                                                step, "gif"), frames, plan.frame_ms),
                     "objective": res.objective, "target_steps": ",".join(map(str, s.targets))})
    write_rows(ctx, plan, batch, rows)


def run_heatmap_batch(ctx: RunContext, plan: AtlasPlan, batch: Batch) -> int:
    """Heat-map animations of a batch of units over their top example's denoising steps; returns how many."""
    part = ctx.store.partition_dir("examples", plan.layer, plan.kind)
    files = sorted(part.glob("*.parquet")) if part.is_dir() else []
    if not files:
        return 0
    top = (pl.read_parquet(files).filter((pl.col("step") == -1) & (pl.col("rank") == 1)
                                         & pl.col("unit").is_in(batch.units)).sort("unit"))
    if not top.height:
        return 0
    height, width = map_size(ctx, plan.layer)
    units, gen_ids = top["unit"].to_list(), top["gen_id"].to_list()
    maps = unit_maps_SHW(ctx, plan.layer, plan.kind, units, gen_ids, height, width)
    size = tuple(ctx.model.default_resolution)
    for unit, unit_maps in zip(units, maps, strict=True):
        write_gif(ctx.root, heatmap_gif_path(plan.layer, plan.kind, unit), heatmap_frames(unit_maps, size),
                  plan.frame_ms)
    return len(units)


def run_plan(ctx: RunContext, plan: AtlasPlan, dist: Dist, progress: bool = True) -> dict:
    """Run (or resume) this rank's batches of a plan; returns a summary of this rank's work."""
    t0 = time.time()
    mine = dist.mine(plan.units)
    todo, skipped = planned_batches(ctx, plan, mine)
    run = {"prior": run_prior_batch, "dream": run_dream_batch, "heatmap": run_heatmap_batch}
    with tqdm(total=len(todo), desc=f"atlas {plan.layer} {plan.kind}", unit="batch", disable=not progress) as bar:
        for batch in todo:
            bar.set_postfix_str(f"{batch.what} {batch.variant} units {batch.units[0]}..{batch.units[-1]}")
            run[batch.what](ctx, plan, batch)
            ctx.store.mark_batch_done(marker_stage(plan.layer, plan.kind), batch.name, what=batch.what,
                                      variant=batch.variant, units=batch.units)
            bar.update(1)
    return {"layer": plan.layer, "kind": plan.kind, "units": len(plan.units), "rank_units": len(mine),
            "batches_run": len(todo), "batches_skipped": skipped, "seconds": round(time.time() - t0, 3),
            "variants": ["default"] * plan.do_priors + list(plan.dreams)}


def partition_complete(ctx: RunContext, plan: AtlasPlan) -> bool:
    """Every chosen unit (all ranks) has its markers."""
    jobs = ([("prior", "default")] if plan.do_priors else []) + [("dream", v) for v in plan.dreams]
    return all(set(plan.units) <= done_units(ctx, plan, what, variant) for what, variant in jobs)

