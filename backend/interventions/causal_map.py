"""The causal map (demo model): where each concept is *caused* — which layer, step window and direction flip it.

This module owns
  - `MapCell` (one concept x layer x direction x window x mask: a vector and its natural size) and `plan_cells`,
    which makes a chunk's cells: per concept and layer, its best channel, its best SAE feature (the layer's default
    SAE), its SAE feature set, its diff-in-means direction and its matched direction (per row: the per-step,
    per-position difference from the row's prompt's current value, concept_directions.matched_difference; steered
    with `rowwise_spatial_edit`) (backend/interventions/concept_directions.py), each
    measured on the run's own generations at every window (`map_windows`: early, middle, late, all, and the
    concept's peak step);
  - `steered_batch`: many rows steered at once, each with its own direction, strength, step window, prompt, seed and
    mask, starting at its window's first step from the unsteered trajectory of its (prompt, seed) (DDIM keeps no
    per-sample state, so the steps before the window are the baseline's: computed once per concept);
  - `causal_map`, which walks the chunks (layer, concept), chooses each cell's scale on the selection seeds (the
    largest flip rate minus collateral rate; ties: the smaller scale) and reports it on held-out seeds that chose
    nothing, into the `causal_map` table; one shard and one marker per chunk, so a killed map resumes.

Flip: the attribute scorer (backend/demo/shapes.py score_image) reads the steered image's target attribute as the
concept. Collateral: any other attribute differs from the unsteered image of the same prompt and seed. Prompts lack
the concept (concepts.concept_prompts, one per seed, random other attributes).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from backend.errors import DifflensError
from backend.interventions import concept_directions as cd
from backend.interventions.concepts import concept_prompt_attributes
from backend.interventions.effects import is_demo
from backend.run.config import CAUSAL_MAP_REDUCED, CausalMapConfig, validate_causal_map
from backend.run.context import RunContext, as_context
from backend.run.schema import feature_kind
from backend.run.store import stage_key

STAGE = "causal_map"
TABLE = "causal_map"
WINDOW_NAMES = ("early", "middle", "late", "all", "peaks")
DIRECTIONS = ("channel", "feature", "features", "mean", "matched")
"""channel: the concept's best channel; feature: its best SAE feature; features: its SAE feature set; mean: its
diff-in-means direction; matched: its per-step, per-position difference from each prompt's current value among
generations of the same layout (concept_directions.matched_difference)."""
SELECTION_PROMPT_SEED, HELDOUT_PROMPT_SEED = 1, 2
"""The rng seeds of the selection and held-out prompts (concept_prompts), so the two prompt sets differ too."""


@dataclass
class MapCell:
    """One steered direction of a chunk: what it is, where and when it acts, and its natural size."""

    concept: str
    layer: str
    direction: str
    """channel, feature, features or mean (DIRECTIONS)."""
    kind: str
    unit: int
    """The unit steered (-1: a feature set or a diff-in-means direction)."""
    units: str
    """The feature set's features ("3,17,..."), else ""."""
    auroc: float
    """The unit's AUROC for the concept at the window (sets: the mean of their features'; mean: NaN)."""
    window_name: str
    window: tuple[int, int]
    mask: str
    vector_C: torch.Tensor
    size: float
    """strength = scale x size (a unit: its largest spatial max, x its decoder-row norm; a direction: its norm;
    matched: 1, so scale 1 adds the difference itself)."""
    means: cd.CellMeans | None = None
    """A matched cell's token means: each row's [S, T, C] difference is made from them and the row's prompt."""

    @property
    def spatial(self) -> bool:
        return self.means is not None


def map_windows(n_steps: int) -> dict[str, tuple[int, int]]:
    """The named windows of an n-step generation: early (first third), middle (second third), late (the second half,
    as steer --window late), all."""
    third = math.ceil(n_steps / 3)
    return {"early": (0, third - 1), "middle": (third, min(n_steps - 1, 2 * third - 1)),
            "late": (n_steps // 2, n_steps - 1), "all": (0, n_steps - 1)}


def run_concepts(ctx: RunContext, attributes: Sequence[str]) -> list[str]:
    """ATTR=VALUE of every value of the given attributes (empty: all) that the run's prompts carry, in the demo's
    order, for the attributes with at least two values among them (one value: no contrast); an attribute the prompts
    do not carry is a one-line error."""
    from backend.demo import shapes

    have = {}
    for text in ctx.generations()["attributes"].unique().to_list():
        for k, v in json.loads(text or "{}").items():
            have.setdefault(k, set()).add(v)
    if not have:
        raise DifflensError(f"the prompts of {ctx.root} carry no attributes; the causal map needs prompts with "
                            "attributes (a .jsonl prompt file like data/prompts/demo.jsonl)")
    for a in attributes:
        if a not in have:
            raise DifflensError(f"unknown attribute {a!r}; the run's prompts have {', '.join(sorted(have))}")
    keys = [k for k in (list(attributes) or [k for k in shapes.ATTRIBUTES if k in have]) if len(have[k]) > 1]
    if not keys:  # every prompt has the same value: nothing to contrast a concept with
        raise DifflensError(f"the prompts of {ctx.root} have one value of each attribute asked for, so no concept "
                            "can be contrasted with another value; use prompts that vary them")
    return [f"{k}={v}" for k in keys for v in shapes.ATTRIBUTES.get(k, sorted(have[k])) if v in have[k]]


# ------------------------------------------------------------------------------------------------ cells
def unit_maxima(ctx: RunContext, layer: str, kind: str) -> np.ndarray:
    """Each unit's largest spatial max over the run's generations and steps (the units table's `max`), [U]."""
    import duckdb

    files = [str(f) for f in sorted(ctx.store.partition_dir("activity", layer, kind).glob("*.parquet"))]
    rows = duckdb.connect().execute("SELECT unit, max(max) AS m FROM read_parquet(?) GROUP BY unit",
                                    [files]).fetchnumpy()
    out = np.zeros(int(rows["unit"].max()) + 1 if len(rows["unit"]) else 0, np.float32)
    out[rows["unit"].astype(np.int64)] = rows["m"]
    return out


def _unit_cell(ctx, concept, layer, kind, x_GU, in_a, in_b, maxima, wname, window, mask) -> MapCell:
    unit, auroc = cd.best_unit(x_GU, in_a, in_b)
    if kind == "channel":
        vec = torch.zeros(x_GU.shape[1])
        vec[unit] = 1.0
        size = float(maxima[unit])
        direction = "channel"
    else:
        row = ctx.sae(layer, kind).W_dec[unit].detach().float().cpu()
        vec, size, direction = row / row.norm(), float(maxima[unit] * row.norm()), "feature"
    return MapCell(concept, layer, direction, kind, unit, "", auroc, wname, window, mask, vec, size)


def plan_cells(ctx: RunContext, layer: str, concept: str, directions: Sequence[str], windows: dict,
               masks: Sequence[str], n_features: int) -> list[MapCell]:
    """Every cell of a chunk (layer, concept): each direction kind at each window (peaks: the concept's peak step
    at this layer) under each mask. Feature kinds are skipped at a layer without an SAE."""
    spec = cd.parse_direction(f"concept:{concept}")
    _, in_a, in_b = cd.generation_sets(ctx, spec)
    _, chan = cd.layer_activity(ctx, layer, "channel")
    has_sae = (layer, "default") in ctx.saes()
    feat = cd.layer_activity(ctx, layer, feature_kind())[1] if has_sae and (
        {"feature", "features"} & set(directions)) else None
    matched = cd.cell_means(ctx, layer, cd.matched_attributes(concept)) if "matched" in directions else None
    wins = dict(windows)
    if "peaks" in wins:
        p = cd.peak_step(chan, in_a, in_b)
        wins["peaks"] = (p, p)
    cells = []
    maxima = {k: unit_maxima(ctx, layer, k) for k in ("channel", "feature")
              if k == "channel" or feat is not None}
    for wname, window in wins.items():
        x_chan = cd.window_means(chan, window)
        x_feat = None if feat is None else cd.window_means(feat, window)
        for direction in directions:
            if direction in ("feature", "features") and x_feat is None:
                continue
            for mask in masks:
                if direction == "channel":
                    cells.append(_unit_cell(ctx, concept, layer, "channel", x_chan, in_a, in_b, maxima["channel"],
                                            wname, window, mask))
                elif direction == "feature":
                    cells.append(_unit_cell(ctx, concept, layer, "feature", x_feat, in_a, in_b, maxima["feature"],
                                            wname, window, mask))
                elif direction == "matched":
                    cells.append(MapCell(concept, layer, "matched", "channel", -1, "", float("nan"), wname, window,
                                         mask, torch.zeros(chan.shape[2]), 1.0, means=matched))
                elif direction == "mean":
                    d = cd.diff_in_means(ctx, spec, layer, window, in_a, in_b)
                    cells.append(MapCell(concept, layer, "mean", "channel", -1, "", float("nan"), wname, window, mask,
                                         d.vector_C, d.norm))
                else:
                    try:
                        d = cd.feature_set(ctx, spec, layer, window, in_a, in_b, "feature", n_features)
                    except DifflensError:
                        continue  # no feature fires more for the concept here: no cell
                    aurocs = cd.unit_aurocs(x_feat[:, d.units], in_a, in_b)
                    cells.append(MapCell(concept, layer, "features", "feature", -1, ",".join(map(str, d.units)),
                                         float(aurocs.mean()), wname, window, mask, d.vector_C, d.norm))
    return cells


# ------------------------------------------------------------------------------------------------ generation
@dataclass
class Baseline:
    """The unsteered generations of a concept's prompts and seeds: latents after every step, images, attributes."""

    prompts: list[str]
    seeds: list[int]
    latents_S: list[torch.Tensor]
    """latents_S[i]: the latents before step i (i = 0: the initial noise)."""
    images: np.ndarray
    attributes: list[dict]
    masks: np.ndarray
    """Object masks [N, H, W] of the images (masks.object_masks)."""
    prompt_attributes: list[dict] = field(default_factory=list)
    """The attributes each prompt was written from (matched directions start from them)."""


@torch.no_grad()
def baseline(model, prompts: list[str], seeds: list[int], n_steps: int, guidance: float,
             prompt_attributes: list[dict] | None = None) -> Baseline:
    from backend.demo import shapes
    from backend.interventions.masks import object_masks
    from backend.models.base import to_uint8

    before: list[torch.Tensor] = []
    model.timesteps(n_steps)  # initial_latents needs the schedule set up (as generate does)

    def record(i, _t, latents):
        before.append(latents.detach().clone())

    from backend.models.base import seed_generators

    first = model.initial_latents(seed_generators(seeds))
    latents = model.generate(prompts, seeds, n_steps, guidance, on_step=record, output="latent")
    images = to_uint8(model.decode(latents))
    return Baseline(prompts, seeds, [first] + before[:-1], images, [shapes.score_image(im) for im in images],
                    object_masks(images), list(prompt_attributes or []))


def rowwise_masked_edit(directions_RC: torch.Tensor, strengths_RS: np.ndarray, masks_RHW: np.ndarray):
    """An edit adding strengths_RS[row, step] x directions_RC[row], weighted per token by the row's mask, to each
    row (with CFG on both halves, the hooked batch is [uncond; cond]: the rows repeat)."""
    from backend.interventions.masks import token_weights

    strengths = torch.as_tensor(np.asarray(strengths_RS, np.float32))
    cache: dict = {}

    def edit(tokens_BTC: torch.Tensor, step: int) -> torch.Tensor:
        if not 0 <= step < strengths.shape[1] or not bool(strengths[:, step].any()):
            return tokens_BTC
        b, t, _ = tokens_BTC.shape
        reps = b // directions_RC.shape[0]
        key = (tokens_BTC.device, tokens_BTC.dtype, b, t)
        if key not in cache:
            w_BT1 = token_weights(masks_RHW, t, b).to(tokens_BTC)
            cache[key] = w_BT1 * directions_RC.repeat(reps, 1).to(tokens_BTC)[:, None, :]
        s_B = strengths[:, step].repeat(reps).to(tokens_BTC)
        return tokens_BTC + s_B[:, None, None] * cache[key]

    return edit


def rowwise_spatial_edit(deltas_RSTC: torch.Tensor, masks_RHW: np.ndarray):
    """An edit adding deltas_RSTC[row, step] (one vector per token position), weighted per token by the row's mask,
    to each row (both CFG halves, as rowwise_masked_edit)."""
    from backend.interventions.masks import token_weights

    def edit(tokens_BTC: torch.Tensor, step: int) -> torch.Tensor:
        if not 0 <= step < deltas_RSTC.shape[1]:
            return tokens_BTC
        b, t, _ = tokens_BTC.shape
        if deltas_RSTC.shape[2] != t:
            raise DifflensError(f"the matched direction has {deltas_RSTC.shape[2]} token positions but the layer has "
                                f"{t} at this resolution; steer at the run's resolution")
        w_BT1 = token_weights(masks_RHW, t, b).to(tokens_BTC)
        reps = b // deltas_RSTC.shape[0]
        return tokens_BTC + w_BT1 * deltas_RSTC[:, step].repeat(reps, 1, 1).to(tokens_BTC)

    return edit


@torch.no_grad()
def steered_batch(model, layer: str, base: Baseline, rows: list[int], directions_RC: torch.Tensor,
                  strengths_RS: np.ndarray, starts_R: list[int], masks_RHW: np.ndarray, n_steps: int,
                  guidance: float, deltas_RSTC: torch.Tensor | None = None) -> np.ndarray:
    """Images uint8 [R, H, W, 3] of rows (indices into base's prompts / seeds), each with its own direction,
    strength schedule and mask, all starting at the same step starts_R[0] from the baseline latents there (with a
    scheduler that keeps per-sample state every row starts at 0 from the noise: the same images). With
    deltas_RSTC, each row adds its own per-step, per-position vectors (rowwise_spatial_edit) instead."""
    from backend.interventions.priors import shares_prefix
    from backend.models.base import deterministic_kernels, to_uint8
    from backend.models.hooks import edit_activations

    start = starts_R[0] if shares_prefix(model) else 0
    prompts = [base.prompts[r] for r in rows]
    with deterministic_kernels(model.device):
        cond, uncond = model.encode_prompts(prompts, guidance > 1.0)
        timesteps = model.timesteps(n_steps)
        x = base.latents_S[start][rows].clone()
        edit = (rowwise_masked_edit(directions_RC, strengths_RS, masks_RHW) if deltas_RSTC is None
                else rowwise_spatial_edit(deltas_RSTC, masks_RHW))
        with edit_activations(model, layer, edit):
            for i in range(start, len(timesteps)):
                model.step_index = i
                x = model.step(x, timesteps[i], cond, uncond, guidance)
        return to_uint8(model.decode(x))


# ------------------------------------------------------------------------------------------------ scoring
def flip_and_collateral(attrs: dict, base: dict, concept: str) -> tuple[bool, bool]:
    """(the image shows the concept, another attribute changed from the baseline's)."""
    key, _, value = concept.partition("=")
    return attrs.get(key) == value, any(attrs.get(k) != v for k, v in base.items() if k != key)


@dataclass
class Job:
    """One steered image to make: a cell, a scale, a baseline row."""

    cell: int
    scale: float
    row: int


def run_jobs(model, layer: str, cells: list[MapCell], jobs: list[Job], base: Baseline, n_steps: int,
             guidance: float, batch: int, bar) -> list[tuple[bool, bool]]:
    """(flip, collateral) of every job, generated in batches of rows that start at the same step."""
    out: list[tuple[bool, bool] | None] = [None] * len(jobs)
    res = base.images.shape[1]
    ones = np.ones((res, res), np.float32)
    order = sorted(range(len(jobs)), key=lambda j: cells[jobs[j].cell].window[0])
    groups: dict[tuple[int, bool], list[int]] = {}
    for j in order:
        groups.setdefault((cells[jobs[j].cell].window[0], cells[jobs[j].cell].spatial), []).append(j)
    for (start, spatial), members in groups.items():
        for b in range(0, len(members), batch):
            part = members[b:b + batch]
            cs = [cells[jobs[j].cell] for j in part]
            dirs = torch.stack([c.vector_C for c in cs])
            strengths = np.zeros((len(part), n_steps), np.float32)
            for k, (j, c) in enumerate(zip(part, cs, strict=True)):
                strengths[k, c.window[0]:c.window[1] + 1] = jobs[j].scale * c.size
            masks = np.stack([region_mask(base.masks[jobs[j].row], c.mask, ones)
                              for j, c in zip(part, cs, strict=True)])
            deltas = spatial_deltas(cs, [jobs[j].row for j in part], strengths, base) if spatial else None
            images = steered_batch(model, layer, base, [jobs[j].row for j in part], dirs, strengths,
                                   [start] * len(part), masks, n_steps, guidance, deltas)
            from backend.demo import shapes

            for k, j in enumerate(part):
                out[j] = flip_and_collateral(shapes.score_image(images[k]), base.attributes[jobs[j].row],
                                             cs[k].concept)
            bar.update(len(part))
    return out


def spatial_deltas(cells: list[MapCell], rows: list[int], strengths_RS: np.ndarray, base: Baseline) -> torch.Tensor:
    """[R, S, T, C]: each matched row's difference (from its prompt's attributes) times its strength schedule."""
    out = []
    for cell, row, strength_S in zip(cells, rows, strengths_RS, strict=True):
        diff_STC, _ = cd.matched_difference(cell.means, cell.concept, base.prompt_attributes[row])
        out.append(diff_STC * torch.as_tensor(strength_S)[:, None, None])
    return torch.stack(out)


def region_mask(object_HW: np.ndarray, mask: str, ones: np.ndarray) -> np.ndarray:
    """A row's mask: none (every token), object (the shape in its unsteered image) or background (everything
    else; every token when the shape covers the image)."""
    if mask == "object":
        return object_HW
    if mask == "background":
        rest = np.clip(1.0 - object_HW, 0.0, 1.0)
        return rest if rest.sum() > 0 else ones
    return ones


def rates(results: list[tuple[bool, bool]]) -> tuple[float, float, float]:
    """(flip rate, collateral rate, clean rate: flipped with no collateral)."""
    n = max(len(results), 1)
    return (sum(f for f, _ in results) / n, sum(c for _, c in results) / n,
            sum(f and not c for f, c in results) / n)


# ------------------------------------------------------------------------------------------------ the map
def chunk_name(layer: str, concept: str) -> str:
    return f"{layer}/{concept.replace('=', '-')}"


def chunk_key(ctx: RunContext, layer: str, concept: str) -> str | None:
    """The settings key a chunk was computed with (its marker's), or None when it was not."""
    marker = ctx.root / "_done" / STAGE / f"{chunk_name(layer, concept)}.json"
    try:
        return json.loads(marker.read_text()).get("key")
    except (OSError, ValueError):
        return None


def effective(ctx: RunContext, cfg: CausalMapConfig) -> CausalMapConfig:
    """cfg with `reduced` applied (config.CAUSAL_MAP_REDUCED; layers: the last captured layer unless given)."""
    if not cfg.reduced:
        return cfg
    r = CAUSAL_MAP_REDUCED
    return replace(cfg, directions=list(r["directions"]), windows=list(r["windows"]), scales=list(r["scales"]),
                   selection_seeds=list(cfg.selection_seeds[:r["selection_seeds"]]),
                   heldout_seeds=list(cfg.heldout_seeds[:r["heldout_seeds"]]),
                   layers=list(cfg.layers) or ctx.layers[-1:])


def check_seeds(ctx: RunContext, cfg: CausalMapConfig) -> None:
    """Held-out seeds must be neither selection seeds nor seeds of the run's generations (which chose the units)."""
    run_seeds = set(ctx.generations()["seed"].unique().to_list())
    for name, seeds in (("selection", cfg.selection_seeds), ("held-out", cfg.heldout_seeds)):
        if not seeds:
            raise DifflensError(f"give at least one {name} seed (causal_map.{name.replace('-', '')}_seeds)")
    clash = (set(cfg.heldout_seeds) & set(cfg.selection_seeds)) | (set(cfg.heldout_seeds) & run_seeds)
    if clash:
        raise DifflensError(f"held-out seeds {sorted(clash)[:5]} were also used to choose units or scales (selection "
                            f"seeds or the run's seeds {sorted(run_seeds)[:5]}); give held-out seeds of their own, "
                            "e.g. --heldout-seeds 2000-2019")


def resolve_plan(ctx: RunContext, cfg: CausalMapConfig) -> tuple[list[str], list[str], dict[str, tuple[int, int]]]:
    """(layers, concepts, named windows) of a map, validated before anything is written."""
    from backend.interventions.windows import parse_steps, step_window

    captured = ctx.layers
    layers = list(cfg.layers) or captured
    for layer in layers:
        if layer not in captured:
            raise DifflensError(f"{layer} has no captured activity in {ctx.root} (captured: {', '.join(captured)}); "
                                f"capture it with `python cli.py capture --layer {layer}`")
    concepts = run_concepts(ctx, cfg.attributes)
    n = ctx.n_steps
    named = map_windows(n)
    windows: dict[str, tuple[int, int]] = {}
    for w in cfg.windows:
        if w in named:
            windows[w] = named[w]
        elif w == "peaks":
            windows[w] = (0, 0)  # per concept and layer (plan_cells)
        else:
            try:
                windows[w] = step_window(parse_steps(w), n)
            except DifflensError as exc:
                raise DifflensError(f"window {w!r}: {exc} (the run has {n} steps); use early, middle, late, all, "
                                    "peaks or a window a-b") from None
    check_seeds(ctx, cfg)
    return layers, concepts, windows


def causal_map(run, cfg: CausalMapConfig | None = None, progress: bool = True, model=None) -> pl.DataFrame:
    """Compute (or resume) the causal map of a demo run (see the module docstring); returns the `causal_map`
    table. A chunk (layer, concept) is computed unless its marker holds this map's settings key (the settings but
    layers, attributes, batch size): so a map resumes at its first unfinished chunk, and a map with other settings
    replaces only the chunks it covers (each row says how it was computed)."""
    cfg = validate_causal_map(cfg or CausalMapConfig())
    ctx = as_context(run, model=model).require("capture")
    ctx.store.remove_stale_temporaries()
    if not is_demo(ctx.model):
        raise DifflensError("the causal map needs the demo model (flips are read from pixels by its attribute scorer)")
    cfg = effective(ctx, cfg)
    layers, concepts, windows = resolve_plan(ctx, cfg)
    key = stage_key({"config": {k: v for k, v in cfg.to_dict().items() if k not in ("layers", "attributes",
                                                                                  "enabled", "batch_size")},
                     "capture": ctx.stage("capture").get("key"), "saes": sorted(f"{a}/{b}" for a, b in ctx.saes())})
    ctx.store.update_stage(STAGE, status="running", config=cfg.to_dict())
    t0 = time.time()
    chunks = [(layer, c) for layer in layers for c in concepts]
    todo = [(layer, c) for layer, c in chunks if chunk_key(ctx, layer, c) != key]
    n_steps, guidance, model = ctx.n_steps, ctx.guidance, ctx.model
    per_chunk = estimate_images(ctx, cfg, windows)
    baselines: dict[tuple[str, str], Baseline] = {}
    with tqdm(total=per_chunk * len(todo), desc="causal map", unit="img", disable=not progress) as bar:
        for layer, concept in todo:
            bar.set_postfix_str(f"{chunk_name(layer, concept)} ({len(chunks) - len(todo)} chunks done before)"[:60])
            rows = map_chunk(ctx, cfg, layer, concept, windows, n_steps, guidance, baselines, bar)
            table = ctx.store.table_from_rows(TABLE, rows)
            ctx.store.write_table_shard(TABLE, concept.replace("=", "-"), table, layer=layer)
            ctx.store.mark_batch_done(STAGE, chunk_name(layer, concept), rows=len(rows), key=key)
    ctx.store.update_stage(STAGE, status="done", finished=time.time(), seconds=round(time.time() - t0, 3),
                           chunks=len(chunks))
    return ctx.store.read_table(TABLE)


def estimate_images(ctx: RunContext, cfg: CausalMapConfig, windows: dict) -> int:
    """Steered images per chunk, for the progress bar (the feature kinds count only at a layer with an SAE)."""
    per_window = len(windows) * len(cfg.masks)
    return sum(per_window * (len(direction_scales(cfg, d)) * len(cfg.selection_seeds) + len(cfg.heldout_seeds))
               for d in cfg.directions)


def concept_baselines(model, concept: str, cfg: CausalMapConfig, n_steps: int, guidance: float,
                      cache: dict) -> tuple[Baseline, Baseline]:
    """The unsteered selection and held-out generations of a concept's prompts (computed once per concept)."""
    from backend.demo import shapes

    for name, seeds, prompt_seed in (("selection", cfg.selection_seeds, SELECTION_PROMPT_SEED),
                                     ("heldout", cfg.heldout_seeds, HELDOUT_PROMPT_SEED)):
        if (concept, name) not in cache:
            attrs = concept_prompt_attributes(concept, seeds, seed=prompt_seed)
            prompts = [shapes.prompt_for(a) for a in attrs]
            cache[(concept, name)] = baseline(model, prompts, [int(s) for s in seeds], n_steps, guidance, attrs)
    return cache[(concept, "selection")], cache[(concept, "heldout")]


def direction_scales(cfg: CausalMapConfig, direction: str) -> list[float]:
    """The scales a direction's cells try: matched_scales for matched (its size is the difference itself), else
    scales."""
    return list(cfg.matched_scales) if direction == "matched" else list(cfg.scales)


def map_chunk(ctx: RunContext, cfg: CausalMapConfig, layer: str, concept: str, windows: dict, n_steps: int,
              guidance: float, baselines: dict, bar) -> list[dict]:
    """The rows of one chunk: every cell's scale chosen on the selection seeds, its rates on the held-out seeds."""
    model = ctx.model
    cells = plan_cells(ctx, layer, concept, cfg.directions, windows, cfg.masks, cfg.feature_set_size)
    select, held = concept_baselines(model, concept, cfg, n_steps, guidance, baselines)
    jobs = [Job(c, s, r) for c in range(len(cells)) for s in direction_scales(cfg, cells[c].direction)
            for r in range(len(select.seeds))]
    results = run_jobs(model, layer, cells, jobs, select, n_steps, guidance, cfg.batch_size, bar)
    chosen = []
    for c in range(len(cells)):
        best = None
        for s in direction_scales(cfg, cells[c].direction):
            f, col, _ = rates([res for job, res in zip(jobs, results, strict=True) if job.cell == c and job.scale == s])
            if best is None or f - col > best[1] - best[2] + 1e-9:
                best = (s, f, col)
        chosen.append(best)
    jobs = [Job(c, chosen[c][0], r) for c in range(len(cells)) for r in range(len(held.seeds))]
    results = run_jobs(model, layer, cells, jobs, held, n_steps, guidance, cfg.batch_size, bar)
    key, _, value = concept.partition("=")
    base_rate = sum(a.get(key) == value for a in held.attributes) / len(held.attributes)
    rows = []
    for c, cell in enumerate(cells):
        flip, col, clean = rates([res for job, res in zip(jobs, results, strict=True) if job.cell == c])
        scale, sel_flip, sel_col = chosen[c]
        rows.append({"concept": concept, "attribute": key, "direction": cell.direction, "kind": cell.kind,
                     "unit": cell.unit, "units": cell.units, "auroc": cell.auroc, "window": cell.window_name,
                     "steps": f"{cell.window[0]}-{cell.window[1]}", "mask": cell.mask, "scale": scale,
                     "strength": scale * cell.size, "selection_seeds": len(select.seeds),
                     "selection_flip_rate": sel_flip, "selection_collateral_rate": sel_col,
                     "seeds": len(held.seeds), "flip_rate": flip, "collateral_rate": col, "clean_rate": clean,
                     "baseline_rate": base_rate})
    return rows


def best_per_concept(table: pl.DataFrame, max_collateral: float = 0.2) -> pl.DataFrame:
    """Per concept, the cell with the highest held-out flip rate among those with collateral <= max_collateral
    (none such: the highest flip rate overall), with its layer, window and direction."""
    ok = table.with_columns(ok=pl.col("collateral_rate").cast(pl.Float64) <= max_collateral + 1e-6)  # float32 rates
    return (ok.sort(["concept", "ok", "flip_rate", "collateral_rate"], descending=[False, True, True, False])
            .unique("concept", keep="first", maintain_order=True))
