"""Concept directions: steer along what separates two sets of a run's generations, not along one unit.

This module owns
  - the direction specs (`parse_direction`): `concept:ATTR=VALUE` (a concept's generations against the others that
    have the attribute), `groups:A-vs-B` (any two prompt groups of any run), each as a **diff-in-means** direction
    over the layer's channels, or with the prefix `features:` (`features:shape=circle`, `features:red-vs-blue`) as
    a **feature set**: the SAE features that best tell the two sets apart, their decoder rows summed with weights;
  - `layer_activity`: a layer's captured spatial-mean activity as a dense [generations, steps, units] array (the
    `activity` table: channels, or an SAE's features with inactive ones as 0), read once per (layer, kind);
  - `generation_sets` (which generations are in set A and set B), `unit_aurocs` (every unit's AUROC for A against
    B), `best_unit` (the concept's best unit at a window, as the causal map steers it) and `peak_step` (the step
    where the two sets' mean activations are furthest apart relative to their spread);
  - `concept_direction`, which makes a `Direction` (unit-norm vector [C] in the layer's raw activation space and its
    natural size) from a spec, a layer and a step window;
  - **matched** directions (the causal map's `matched` kind): `cell_means` averages a layer's token shards per
    (cell of generations sharing some attribute values, step, token position), and `matched_difference` makes, for
    one prompt, the per-step, per-position difference [S, T, C] between the concept's generations and those with
    the prompt's current value, among the generations that share the prompt's layout (`LAYOUT_ATTRIBUTES`: shape,
    size, position, but the attribute changed). A shape is a spatial pattern at a place and a size: one pooled
    vector added to every token cannot draw a circle where a square was, this difference can. `matched_direction`
    makes it for one of the run's prompts as a `Direction` whose `deltas_STC` `steer --direction matched:ATTR=VALUE`
    adds as it is (steer.steering_edit, per step and position).

Diff-in-means (activation addition): mean over A's generations of the window-averaged spatial mean, minus B's. Its
norm is the direction's natural size: strength = scale x norm, so scale 1 moves the average B generation to the
average A generation (in spatial mean). Feature set: the top `n` features by AUROC (A against B, above 0.5), each
weighted by its mean code difference (A - B, clipped at 0), summed as decoder rows of the folded SAE; its natural
size is the norm of that sum. Both are measured on the run's own generations (its capture seeds), never on the seeds
a causal map reports on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from backend.errors import DifflensError
from backend.run.context import RunContext
from backend.run.schema import feature_kind, is_feature

PREFIXES = ("concept:", "groups:", "features:")
FEATURE_SET_SIZE = 8
"""Features in a feature-set direction (the top ones by AUROC)."""
GROUPS_SEP = "-vs-"


@dataclass(frozen=True)
class DirectionSpec:
    """A parsed --direction: what sets of generations it separates and how."""

    text: str
    """As given (`concept:shape=circle`, `groups:red-vs-blue`, `features:shape=circle`)."""
    method: str
    """mean (diff-in-means over channels) or features (an SAE feature set)."""
    concept: str | None = None
    """ATTR=VALUE for a concept direction."""
    groups: tuple[str, str] | None = None
    """(A, B) for a groups direction."""

    @property
    def target(self) -> str:
        return self.concept if self.concept is not None else GROUPS_SEP.join(self.groups)


@dataclass
class Direction:
    """A steering direction at a layer: unit-norm vector [C] (raw activation space) and its natural size."""

    spec: DirectionSpec
    layer: str
    kind: str
    """channel (diff-in-means) or the SAE's kind (feature, feature.<id>) for a feature set."""
    window: tuple[int, int]
    """Run steps the means were taken over (inclusive)."""
    vector_C: torch.Tensor
    norm: float
    """The size of the difference: strength = scale x norm."""
    units: list[int] = field(default_factory=list)
    """Feature set: its features; diff-in-means: empty."""
    weights: list[float] = field(default_factory=list)
    deltas_STC: torch.Tensor | None = None
    """Matched direction: its per-run-step, per-position difference [S, T, C] (steered as it is, x strength; vector_C
    is then its unit-norm mean, for reference)."""
    matched: bool = True
    """Matched direction: False when no generation shared the prompt's layout (the difference over all of them)."""

    @property
    def name(self) -> str:
        return self.spec.text


def parse_direction(text: str) -> DirectionSpec:
    """`concept:ATTR=VALUE`, `groups:A-vs-B`, either after `features:`, or `matched:ATTR=VALUE`; else a one-line
    error."""
    raw = str(text).strip()
    if raw.startswith("matched:"):
        body = raw[len("matched:"):].removeprefix("concept:")
        attr, _, value = body.partition("=")
        if not attr or not value:
            raise DifflensError(f"direction {text!r}: a matched direction is matched:ATTR=VALUE, e.g. "
                                "matched:shape=circle (it is measured per prompt, so it takes a concept, not groups)")
        return DirectionSpec(raw, "matched", concept=f"{attr}={value}")
    method, body = ("features", raw[len("features:"):]) if raw.startswith("features:") else ("mean", raw)
    for prefix in ("concept:", "groups:"):
        if body.startswith(prefix):
            body, source = body[len(prefix):], prefix[:-1]
            break
    else:
        source = "concept" if "=" in body else "groups" if GROUPS_SEP in body else ""
        if method == "mean" or not source:
            raise DifflensError(f"direction {text!r} not understood; use concept:ATTR=VALUE (e.g. "
                                "concept:shape=circle), groups:A-vs-B (e.g. groups:red-vs-blue), or "
                                "features:ATTR=VALUE / features:A-vs-B for an SAE feature set")
    if source == "concept":
        attr, _, value = body.partition("=")
        if not attr or not value:
            raise DifflensError(f"direction {text!r}: a concept is ATTR=VALUE, e.g. concept:shape=circle")
        return DirectionSpec(raw, method, concept=f"{attr}={value}")
    a, sep, b = body.partition(GROUPS_SEP)
    if not sep or not a or not b:
        raise DifflensError(f"direction {text!r}: two groups are A-vs-B, e.g. groups:red-vs-blue")
    if a == b:
        raise DifflensError(f"direction {text!r} compares group {a!r} with itself; name two different groups")
    return DirectionSpec(raw, method, groups=(a, b))


# ------------------------------------------------------------------------------------------------ the run's data
def generation_sets(ctx: RunContext, spec: DirectionSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gen_ids [G], in_A [G] bool, in_B [G] bool) of the run's generations for a spec; unknown concepts and groups
    are one-line errors listing what the run has."""
    gens = ctx.generations()
    gen_ids = gens["gen_id"].to_numpy()
    if spec.groups is not None:
        groups = gens["group"].to_list()
        have = sorted(set(groups))
        for g in spec.groups:
            if g not in have:
                raise DifflensError(f"unknown group {g!r}; the run's prompt groups are {', '.join(have)}")
        return gen_ids, np.array([g == spec.groups[0] for g in groups]), np.array([g == spec.groups[1] for g in groups])
    attrs = [json.loads(a or "{}") for a in gens["attributes"].to_list()]
    key, _, value = spec.concept.partition("=")
    values = sorted({a[key] for a in attrs if key in a})
    if not values:
        known = sorted({k for a in attrs for k in a})
        raise DifflensError(f"unknown concept {spec.concept!r}: the run's prompts have no attribute {key!r} "
                            f"({'attributes: ' + ', '.join(known) if known else 'they carry no attributes'})")
    if value not in values:
        raise DifflensError(f"unknown concept {spec.concept!r}; the run's values of {key} are {', '.join(values)}")
    in_a = np.array([a.get(key) == value for a in attrs])
    in_b = np.array([key in a and a[key] != value for a in attrs])
    if not in_b.any():
        raise DifflensError(f"every generation has {spec.concept}, so nothing to contrast it with")
    return gen_ids, in_a, in_b


_ACTIVITY_CACHE: dict = {}


def layer_activity(ctx: RunContext, layer: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(gen_ids [G], spatial means [G, S, U] float32) of a (layer, kind)'s captured activity (features: inactive
    = 0); cached per run, layer and kind. No activity for it: a one-line error naming what the run captured."""
    import duckdb

    part = ctx.store.partition_dir("activity", layer, kind)
    files = sorted(part.glob("*.parquet"))
    key = (str(ctx.root), layer, kind, tuple((f.name, f.stat().st_mtime_ns) for f in files))
    if key in _ACTIVITY_CACHE:
        return _ACTIVITY_CACHE[key]
    if not files:
        adir = ctx.store.table_dir("activity")
        have = sorted(p.name.split("=", 1)[1] for p in adir.glob("layer=*")) if adir.is_dir() else []
        what = "features" if is_feature(kind) else "activity"
        raise DifflensError(f"{ctx.root} has no captured {what} for {layer} ({kind}); layers with activity: "
                            f"{', '.join(have) or 'none'} (capture it with `python cli.py capture --layer {layer}`"
                            f"{', or record features with capture --sae' if is_feature(kind) else ''})")
    n_steps = ctx.n_steps
    gen_ids = ctx.generations()["gen_id"].to_numpy()
    n_units = ctx.n_units(layer, kind) if is_feature(kind) else None
    con = duckdb.connect()
    rows = con.execute("SELECT gen_id, step, unit, mean FROM read_parquet(?)",
                       [[str(f) for f in files]]).fetchnumpy()
    n_units = n_units or int(rows["unit"].max()) + 1
    index = np.full(int(gen_ids.max()) + 1, -1, np.int64)
    index[gen_ids] = np.arange(len(gen_ids))
    values = np.zeros((len(gen_ids), n_steps, n_units), np.float32)
    values[index[rows["gen_id"].astype(np.int64)], rows["step"].astype(np.int64),
           rows["unit"].astype(np.int64)] = rows["mean"]
    _ACTIVITY_CACHE.clear()  # one (layer, kind) at a time: a map walks layer by layer
    _ACTIVITY_CACHE[key] = (gen_ids, values)
    return gen_ids, values


def window_means(values_GSU: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """Each generation's activity averaged over the inclusive step window: [G, U]."""
    first, last = window
    if not 0 <= first <= last < values_GSU.shape[1]:
        raise DifflensError(f"step window {first}-{last} is outside the run's steps 0..{values_GSU.shape[1] - 1}")
    return values_GSU[:, first:last + 1].mean(axis=1)


def unit_aurocs(x_GU: np.ndarray, in_a: np.ndarray, in_b: np.ndarray) -> np.ndarray:
    """Per unit, the AUROC of its value for A against B (ties count half): [U]."""
    from scipy.stats import rankdata

    x = x_GU[in_a | in_b]
    a = in_a[in_a | in_b]
    n_a, n_b = int(a.sum()), int((~a).sum())
    if n_a == 0 or n_b == 0:
        raise DifflensError("a direction needs generations on both sides; one set is empty")
    ranks = rankdata(x, axis=0)
    return (ranks[a].sum(axis=0) - n_a * (n_a + 1) / 2) / (n_a * n_b)


def mean_difference(x_GU: np.ndarray, in_a: np.ndarray, in_b: np.ndarray) -> np.ndarray:
    """Mean over A minus mean over B, per unit: [U]."""
    return x_GU[in_a].mean(axis=0) - x_GU[in_b].mean(axis=0)


def best_unit(x_GU: np.ndarray, in_a: np.ndarray, in_b: np.ndarray) -> tuple[int, float]:
    """(unit, AUROC) of the unit that best tells A from B: highest AUROC, ties (within 0.002) broken by the larger
    mean difference."""
    auroc = unit_aurocs(x_GU, in_a, in_b)
    diff = mean_difference(x_GU, in_a, in_b)
    tied = auroc >= auroc.max() - 0.002
    unit = int(np.flatnonzero(tied)[np.argmax(diff[tied])])
    return unit, float(auroc[unit])


def peak_step(values_GSU: np.ndarray, in_a: np.ndarray, in_b: np.ndarray) -> int:
    """The step where A and B are furthest apart: the largest ||mean_A - mean_B||^2 over the mean within-set
    variance (summed over units)."""
    scores = []
    for s in range(values_GSU.shape[1]):
        x = values_GSU[:, s]
        diff = mean_difference(x, in_a, in_b)
        spread = x[in_a].var(axis=0).sum() + x[in_b].var(axis=0).sum()
        scores.append(float(diff @ diff) / max(float(spread), 1e-12))
    return int(np.argmax(scores))


# ------------------------------------------------------------------------------------------------ directions
def concept_direction(ctx: RunContext, spec: DirectionSpec | str, layer: str, window: tuple[int, int],
                      sae_kind: str = "feature", n_features: int = FEATURE_SET_SIZE) -> Direction:
    """The direction of a spec at a layer, measured over the run's steps `window` (inclusive): diff-in-means over
    the channels, or (spec method features) the feature set of the layer's SAE `sae_kind`."""
    spec = parse_direction(spec) if isinstance(spec, str) else spec
    _, in_a, in_b = generation_sets(ctx, spec)
    if spec.method == "mean":
        return diff_in_means(ctx, spec, layer, window, in_a, in_b)
    return feature_set(ctx, spec, layer, window, in_a, in_b, sae_kind, n_features)


def diff_in_means(ctx: RunContext, spec: DirectionSpec, layer: str, window: tuple[int, int], in_a: np.ndarray,
                  in_b: np.ndarray) -> Direction:
    _, values = layer_activity(ctx, layer, "channel")
    diff_C = mean_difference(window_means(values, window), in_a, in_b)
    norm = float(np.linalg.norm(diff_C))
    if norm == 0:
        raise DifflensError(f"{spec.text} has no difference in means at {layer}, steps {window[0]}-{window[1]}")
    return Direction(spec, layer, "channel", window, torch.as_tensor(diff_C / norm, dtype=torch.float32), norm)


def feature_set(ctx: RunContext, spec: DirectionSpec, layer: str, window: tuple[int, int], in_a: np.ndarray,
                in_b: np.ndarray, sae_kind: str = "feature", n_features: int = FEATURE_SET_SIZE) -> Direction:
    """The top n_features by AUROC (above 0.5, positive mean difference), decoder rows weighted by their mean code
    difference."""
    sae_kind = feature_kind() if sae_kind in ("channel", "") else sae_kind
    sae = ctx.sae(layer, sae_kind)
    _, values = layer_activity(ctx, layer, sae_kind)
    x = window_means(values, window)
    auroc, diff = unit_aurocs(x, in_a, in_b), mean_difference(x, in_a, in_b)
    order = [int(u) for u in np.lexsort((-diff, -auroc)) if auroc[u] > 0.5 and diff[u] > 0][:n_features]
    if not order:
        raise DifflensError(f"no feature of {layer} ({sae_kind}) fires more for {spec.target} than for the others at "
                            f"steps {window[0]}-{window[1]}; try another window or layer")
    weights = [float(diff[u]) for u in order]
    w_dec = sae.W_dec.detach().float().cpu()
    vector_C = (torch.tensor(weights)[:, None] * w_dec[order]).sum(0)
    norm = float(vector_C.norm())
    return Direction(spec, layer, sae_kind, window, vector_C / norm, norm, order, weights)


def measured_window(steps, n_steps: int, run_steps: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(steering window in an n_steps generation, the run steps a direction is measured over) for a steps spec;
    "active" (a unit's window) means all steps for a direction."""
    from backend.interventions.windows import rescale_window, step_window

    window = step_window("all" if steps == "active" else steps, n_steps)
    return window, rescale_window(*window, n_steps, run_steps)


def steer_direction_run(run_dir, direction: str, layer: str, scale: float = 4.0, steps="all",
                        mask: str | None = None, mode: str = "prior", prompt: str | None = None, seeds=(0, 1, 2, 3),
                        strength: float | None = None, n_steps: int | None = None, guidance: float | None = None,
                        kind: str = "feature", model=None):
    """Steer a run's layer along a direction spec (parse_direction), measured over the steering window's run steps:
    what `python cli.py steer --direction ...` does. kind: the SAE of a features: direction. Returns the
    steer.InterventionResult (its extra["direction"]: the Direction)."""
    from backend.interventions.steer import SteerSpec, steer
    from backend.interventions.windows import parse_steps
    from backend.run.context import as_context

    spec = parse_direction(direction)
    ctx = as_context(run_dir, model=model)
    ctx.store.remove_stale_temporaries()
    if layer not in ctx.layers:
        raise DifflensError(f"{layer} has no captured activity in {ctx.root} (captured: {', '.join(ctx.layers)}); "
                            f"capture it with `python cli.py capture --layer {layer}`")
    steps = parse_steps(steps)
    window, measured = measured_window(steps, n_steps or ctx.n_steps, ctx.n_steps)
    if spec.method == "matched":
        if mode != "prompt":
            raise DifflensError(f"{spec.text} is measured from a prompt's own attributes; give one of the run's "
                                "prompts with --prompt")
        check_matched_steps(spec, n_steps, ctx.n_steps)
        d = matched_direction(ctx, spec, layer, prompt)
    else:
        d = concept_direction(ctx, spec, layer, measured, sae_kind=kind)
    sspec = SteerSpec(layer=layer, kind=d.kind, unit=-1, scale=float(scale), strength=strength, steps=window,
                      mask=mask, mode=mode, prompt=prompt, seeds=tuple(int(s) for s in seeds), n_steps=n_steps,
                      guidance=guidance)
    res = steer(ctx, sspec, concept=spec.concept, direction=d)
    res.extra["direction"] = d
    return res


# ------------------------------------------------------------------------------------------------ matched directions
LAYOUT_ATTRIBUTES = ("shape", "size", "position")
"""The demo attributes that draw an image's silhouette: a matched direction compares generations that share the
steered prompt's values of them (all but the attribute it changes)."""


@dataclass
class CellMeans:
    """A layer's mean token vector per (cell, step, position), from its token shards: a cell is the run's
    generations that share one value of each of `attributes`."""

    layer: str
    attributes: tuple[str, ...]
    cells: dict[tuple[str, ...], int]
    """Attribute values (in `attributes` order) -> cell index."""
    sums_KSTC: torch.Tensor
    counts_KST: torch.Tensor

    def mean_of(self, keep) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [S, T, C], token count [S, T]) over the cells whose values pass keep(values: dict)."""
        index = [k for values, k in self.cells.items() if keep(dict(zip(self.attributes, values, strict=True)))]
        sums = self.sums_KSTC[index].sum(0)
        counts = self.counts_KST[index].sum(0)
        return sums / counts.clamp(min=1)[..., None], counts


_CELL_CACHE: dict = {}


def cell_means(ctx: RunContext, layer: str, attributes: tuple[str, ...]) -> CellMeans:
    """The layer's token shards averaged per (cell of `attributes` values, step, position); cached per run, layer
    and attributes (one at a time). No token shards: a one-line error."""
    import pyarrow.parquet as pq

    from sae.data import as_float32

    folder = ctx.store.activations_dir(layer)
    shards = sorted(folder.glob("part-*.npy"))
    key = (str(ctx.root), layer, attributes, tuple((f.name, f.stat().st_mtime_ns) for f in shards))
    if key in _CELL_CACHE:
        return _CELL_CACHE[key]
    if not shards:
        raise DifflensError(f"{ctx.root} has no token shards for {layer} (activations/{layer}/); a matched direction "
                            f"needs them: capture the layer with `python cli.py capture --layer {layer}`")
    gens = ctx.generations()
    attrs = [json.loads(a or "{}") for a in gens["attributes"].to_list()]
    cells: dict[tuple[str, ...], int] = {}
    cell_of = np.full(int(gens["gen_id"].max()) + 1, -1, np.int64)
    for gen_id, a in zip(gens["gen_id"].to_list(), attrs, strict=True):
        if all(k in a for k in attributes):
            cell_of[gen_id] = cells.setdefault(tuple(a[k] for k in attributes), len(cells))
    index = [pq.read_table(f.with_suffix(".parquet")).to_pydict() for f in shards]
    n_tokens = 1 + max(max(ix["position"], default=0) for ix in index)
    n_steps = ctx.n_steps
    sums, counts = None, torch.zeros(len(cells) * n_steps * n_tokens)
    for shard, ix in zip(shards, index, strict=True):
        rows = torch.as_tensor(as_float32(np.load(shard)))
        cell = cell_of[np.asarray(ix["gen_id"], np.int64)]
        flat = (cell * n_steps + np.asarray(ix["step"], np.int64)) * n_tokens + np.asarray(ix["position"], np.int64)
        keep = torch.as_tensor(cell >= 0)
        flat_t = torch.as_tensor(flat)[keep]
        if sums is None:
            sums = torch.zeros(len(counts), rows.shape[1])
        sums.index_add_(0, flat_t, rows[keep])
        counts.index_add_(0, flat_t, torch.ones(len(flat_t)))
    shape = (len(cells), n_steps, n_tokens)
    out = CellMeans(layer, attributes, cells, sums.reshape(*shape, -1), counts.reshape(shape))
    _CELL_CACHE.clear()
    _CELL_CACHE[key] = out
    return out


def check_matched_steps(spec: DirectionSpec, n_steps: int | None, run_steps: int) -> None:
    """A matched direction holds one difference per run step: steering it with other steps is a one-line error."""
    if n_steps not in (None, run_steps):
        raise DifflensError(f"{spec.text} holds one difference per run step ({run_steps}); steer with the run's "
                            f"steps, not {n_steps}")


def matched_direction(ctx: RunContext, spec: DirectionSpec, layer: str, prompt: str | None) -> Direction:
    """The matched direction of spec.concept for one of the run's prompts (its first generation's attributes say the
    prompt's current value and layout): matched_difference over the layer's token shards, in deltas_STC; its size is
    1, so scale 1 adds the difference itself."""
    generation_sets(ctx, spec)  # an attribute or value the run does not have: a one-line error
    rows = ctx.generations().filter(pl.col("prompt") == (prompt or ""))
    if rows.is_empty():
        raise DifflensError(f"{spec.text} needs one of the run's prompts (its attributes give the current value); "
                            f"{prompt!r} is not in {ctx.root}'s generations table")
    attributes = json.loads(rows["attributes"][0] or "{}")
    key, _, value = spec.concept.partition("=")
    if attributes.get(key) == value:
        raise DifflensError(f"the prompt {prompt!r} already has {spec.concept}; give a prompt with another {key}")
    deltas_STC, matched = matched_difference(cell_means(ctx, layer, matched_attributes(spec.concept)), spec.concept,
                                             attributes)
    mean_C = deltas_STC.mean((0, 1))
    return Direction(spec, layer, "channel", (0, ctx.n_steps - 1), mean_C / mean_C.norm().clamp(min=1e-12), 1.0,
                     deltas_STC=deltas_STC, matched=matched)


def matched_attributes(concept: str, layout: tuple[str, ...] = LAYOUT_ATTRIBUTES) -> tuple[str, ...]:
    """The attributes a concept's matched direction groups generations by: its own, then the layout's others."""
    key = concept.partition("=")[0]
    return (key,) + tuple(a for a in layout if a != key)


def matched_difference(means: CellMeans, concept: str, prompt_attributes: dict) -> tuple[torch.Tensor, bool]:
    """(per-step, per-position difference [S, T, C], matched) that moves a prompt's generation to the concept: the
    mean of the run's generations with the concept minus the mean of those with the prompt's current value, both
    among the generations sharing the prompt's other layout attributes (matched True). When either group has no
    generations, the same difference over all of the run's generations (matched False). Steps or positions that
    either group never sampled are 0."""
    key, _, value = concept.partition("=")
    current = prompt_attributes.get(key)
    if current is None:
        raise DifflensError(f"the prompt's attributes {prompt_attributes} do not say its {key}")
    others = [a for a in means.attributes if a != key]

    def group(v, matched):
        return means.mean_of(lambda c: c[key] == v and (not matched or all(c[a] == prompt_attributes.get(a)
                                                                              for a in others)))

    for matched in (True, False):
        (mean_a, n_a), (mean_b, n_b) = group(value, matched), group(current, matched)
        if n_a.sum() > 0 and n_b.sum() > 0:
            both = ((n_a > 0) & (n_b > 0)).float()[..., None]
            return (mean_a - mean_b) * both, matched
    raise DifflensError(f"the run has no generations with {concept} or with {key}={current}, so no matched "
                        "direction; use prompts that carry both values")
