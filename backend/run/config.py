"""Run configuration: documented dataclasses, read from a TOML file and overridden by CLI options.

A run.toml looks like this (every key optional; these are the defaults for the demo model):

    name = "demo"                       # results go to <runs_dir>/<name>
    runs_dir = "runs"
    model = "demo"                      # `demo` or a local diffusers directory
    prompts = "data/prompts/demo.jsonl" # .txt or .jsonl
    device = "cpu"
    dtype = "float32"

    [capture]
    layers = ["mid_block.attentions.0", "up_blocks.1.attentions.1"]
    images_per_prompt = 2               # seeds seed, seed+1, ...: every prompt gets the same seeds
    seed = 0
    steps = 0                           # 0: the model's default
    guidance = -1.0                     # < 0: the model's default; <= 1 turns CFG off
    batch_size = 32
    tokens_per_step = 64                # token vectors sampled per (generation, step) for SAE training
    read = "output"                     # or "delta" (output - input: the block's residual update)
    half = "cond"                       # CFG half to record: cond, uncond or both
    negative_prompt = ""                # replaces CFG's empty unconditional prompt (JSONL `negative` per prompt)
    controlnet = ""                     # a ControlNetModel directory (SD 1.x/2.x), with control_image(s)

    [sae]                               # every field of SAEStageConfig (sae/train.py SAETrainConfig + below)
    architecture = "topk"
    expansion = 8                       # latents = expansion x channels
    k = 16
    total_tokens = 4_000_000
    splice_samples = 32                 # generations used by the splice test (0: skip it)

    [sae.variants.k8]                   # another SAE per layer, id k8 (kind feature.k8): [sae] with these changes
    k = 8
    expansion = 16

    [analysis]                          # every field of AnalysisConfig below
    top_k_channels = 20                 # a channel is active when among its step's top-k channels
    examples_top_n = 8                  # top generations per unit (over all steps and per peak step)

    [interventions]                     # every field of InterventionsConfig below
    top_units = 2                       # units per (layer, kind) steered and dreamed
    dream_iterations = 100
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import re
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from backend.errors import DifflensError
from sae.train import SAETrainConfig

DEMO_LAYERS = ["mid_block.attentions.0", "up_blocks.1.attentions.1"]


@dataclass
class CaptureConfig:
    """What `capture` records."""

    layers: list[str] = field(default_factory=list)
    """Hook points (see `python cli.py layers`); empty means the model's defaults (demo only)."""
    images_per_prompt: int = 2
    """Generations per prompt, with seeds seed, seed+1, ... (the same seeds for every prompt)."""
    seed: int = 0
    """Seed of each prompt's first image."""
    steps: int = 0
    """Denoising steps; 0 means the model's default."""
    guidance: float = -1.0
    """CFG scale; negative means the model's default; <= 1 turns CFG off."""
    batch_size: int = 32
    """Generations per batch (and per shard)."""
    tokens_per_step: int = 64
    """Token vectors sampled per (generation, step) per layer for SAE training (all positions if fewer)."""
    read: str = "output"
    """"output" of each block, or "delta" (output minus input)."""
    half: str = "cond"
    """CFG half recorded: "cond", "uncond" or "both"."""
    negative_prompt: str = ""
    """Negative prompt of every generation, in place of CFG's empty unconditional prompt (a JSONL prompt's
    `negative` field replaces it for that prompt); needs CFG (guidance > 1)."""
    controlnet: str = ""
    """A local ControlNetModel directory (SD 1.x / 2.x models): generate through it, one control image per prompt."""
    control_image: str = ""
    """Control image of every prompt (a JSONL prompt's `control_image` field replaces it for that prompt)."""
    controlnet_scale: float = 1.0
    """ControlNet conditioning scale (the pipeline's controlnet_conditioning_scale)."""
    tokens: str = "all"
    """Image classifiers: the tokens each layer is read at: cls (the CLS token), patch (the patch grid: heat-maps) or
    all (CLS, then the patch grid)."""


@dataclass
class SAEStageConfig(SAETrainConfig):
    """SAE training settings of a run (see sae.train.SAETrainConfig), plus what the stage adds around it.

    Its SAETrainConfig fields are the settings of each layer's `default` SAE (unit kind `feature`). `variants`
    adds more SAEs per layer, each under its own id (sae/<layer>/<id>/, unit kind `feature.<id>`): in TOML a table
    `[sae.variants.<id>]` of the SAETrainConfig fields that differ from [sae] (e.g. `k = 8`, `expansion = 16`); on
    the command line `--set sae.variants.<id>.<field>=VALUE`.
    """

    layers: list[str] = field(default_factory=list)
    """Layers to train (empty: every captured layer)."""
    splice_samples: int = 32
    """Generations whose noise-prediction loss is measured with the SAE spliced in (0: skip the test)."""
    record_features: bool = True
    """After training, run the features capture pass (feature activity of every generation)."""
    variants: dict[str, dict] = field(default_factory=dict)
    """More SAEs per layer: {sae_id: {SAETrainConfig field: value}}, each trained with [sae]'s settings changed by
    its own (ids: lower-case letters, digits, '_', '.', '-'; not `default`)."""

    def __post_init__(self):
        check_variants(self.variants)

    def train_config(self, sae_id: str = "default") -> SAETrainConfig:
        """The training settings of one of the configured SAEs (`default`: [sae] itself; else a variant)."""
        own = {"layers", "splice_samples", "record_features", "variants"}
        base = {k: v for k, v in dataclasses.asdict(self).items() if k not in own}
        return SAETrainConfig(**(base | self.variants.get(sae_id, {})))

    def sae_ids(self) -> list[str]:
        """The ids of the SAEs run-all trains per layer: `default`, then the variants'."""
        return ["default", *self.variants]


def check_variants(variants) -> None:
    """One-line errors for [sae.variants]: a table of tables, ids spelled as SAE ids, keys and value types of
    SAETrainConfig fields."""
    from backend.run.schema import DEFAULT_SAE, check_sae_id

    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise DifflensError("[sae.variants] must be a table of tables, e.g. [sae.variants.k8] with k = 8")
    for sae_id, overrides in variants.items():
        if check_sae_id(sae_id) == DEFAULT_SAE:
            raise DifflensError("[sae.variants.default]: `default` is the [sae] settings' own SAE; give the variant "
                                "another id")
        _check_keys(overrides, SAETrainConfig, f"[sae.variants.{sae_id}]")
        _check_types(overrides, SAETrainConfig, f"[sae.variants.{sae_id}]")


@dataclass
class AnalysisConfig:
    """What `python cli.py analyze` computes and how; the defaults suit the demo run."""

    top_k_channels: int = 20
    """A channel is active in a (generation, step) when it is among that step's top-k channels by `pool`."""
    feature_threshold: float = 0.0
    """A feature is active in a (generation, step) when its spatial max code exceeds this."""
    pool: str = "mean"
    """Spatial pooling that ranks channels for top-k and scores concepts: "mean" or "max" of the map."""
    histogram_bins: int = 30
    """Bins of each unit's activation histograms (spatial max and mean; the `histograms` table)."""
    active_freq: float = 0.05
    """A step is an active step of a unit when the unit's freq there exceeds this (first/last_active)."""
    peak_on: str = "freq"
    """Profile the peaks are found on: "freq", "mean" or "max"."""
    peak_min_height: float = 0.05
    """find_peaks minimum height, in units of the `peak_on` profile."""
    peak_min_separation: float = 100.0
    """Minimum separation between two peaks in scheduler timesteps (converted to steps; at least 1 step)."""
    peaks_top_n: int = 3
    """Peaks kept per unit, highest first. Profile ends can be peaks (the profile is padded below its minimum)."""
    dense_density: float = 0.9
    """A unit is dense when active in more than this share of all (generation, step) pairs."""
    dead_density: float = 0.0
    """A unit is dead when active in at most this share of all (generation, step) pairs."""
    examples_top_n: int = 8
    """Top generations per unit, over all steps (step = -1) and at each peak step."""
    example_stat: str = "max"
    """Activity column that ranks examples: "max" (spatial max) or "mean"."""
    replay_batch_size: int = 32
    """Generations replayed per batch to record example heat-maps."""
    replay_tolerance: float = 1e-3
    """Relative tolerance between a replayed map's pooled value and the recorded activity (else an error); at least
    4 units in the last place of the run's dtype (bfloat16: 0.031, float16: 0.0039)."""
    replay_batches: str = "auto"
    """How the heat-map replay batches generations: "capture" (the capture's own batches, each whole: the same batch
    composition, so kernels that depend on the batch, as GPU kernels do, give the recorded values again),
    "requested" (only the example generations, replay_batch_size per batch: less work, exact where kernels do not
    depend on the batch, as float32 on CPU) or "auto" (capture for a run in float16 / bfloat16 or a replay on a
    GPU, else requested)."""
    compare_multiplier: float = 2.0
    """`compare` keeps units with freq_a > m * freq_b (m is this)."""
    compare_pseudo_count: float = 0.5
    """Pseudo-count added to active and inactive counts in the log-odds ratio."""
    compare_all_pairs_max_groups: int = 6
    """`analyze` writes comparisons for every ordered pair of prompt groups when there are at most this many."""
    concepts_top_n: int = 5
    """Best units per concept written to `concepts`."""
    spatial_attributes: list[str] = field(default_factory=lambda: ["position"])
    """Prompt attributes scored by heat-map localisation instead of AUROC."""
    localise_attribute: str = "shape"
    """The best unit of each value of this attribute is checked for localisation of the spatial attribute."""
    localise_min_positions: int = 3
    """The best-localising unit is chosen among units whose top examples span at least this many positions."""
    plot_top_units: int = 6
    """Units per (layer, kind) that get a profile figure: best concept units, then the highest peaks."""
    label_method: str = "breakeven"
    """How top prompts name a unit (backend/analysis/labels.py): "breakeven" (each candidate against the unit's top
    prompts as many as carry it, at every step) or "top_n" (the label_top_n top generations, the first method)."""
    label_top_n: int = 16
    """Top generations per unit whose prompts label it with label_method = "top_n" (backend/analysis/labels.py)."""
    label_pseudo_count: float = 0.5
    """Pseudo-count of the labels' log-odds ratio and of their confidence."""
    label_stat: str = "pool"
    """What ranks a unit's top generations for its label: "pool" (the spatial `pool` that concept recovery scores:
    what the unit reads over the whole map; per step with label_method = "breakeven", maximised over steps with
    "top_n") or "example" (`example_stat`, as the top examples rank them, maximised over steps)."""
    range_bins: int = 5
    """Equal-width activation bins over (0, max] per unit for its examples across the range (`range_examples`)."""
    range_per_bin: int = 3
    """Generations sampled per bin of the range examples."""
    duckdb_memory_limit: str = "2GB"
    """DuckDB memory_limit (it spills to a temp directory beyond it)."""
    duckdb_threads: int = 2
    """DuckDB worker threads."""
    device: str = ""
    """torch device for the heat-map replay; empty: the run's device."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate_analysis(cfg: AnalysisConfig) -> AnalysisConfig:
    """Raise a one-line DifflensError for a setting out of range."""
    choices = {"pool": ("mean", "max"), "peak_on": ("freq", "mean", "max"), "example_stat": ("mean", "max"),
               "replay_batches": ("auto", "capture", "requested")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise DifflensError(f"analysis.{name} is {getattr(cfg, name)!r}; use one of {', '.join(allowed)}")
    for name in ("top_k_channels", "histogram_bins", "peaks_top_n", "examples_top_n", "replay_batch_size",
                 "concepts_top_n", "duckdb_threads"):
        if getattr(cfg, name) < 1:
            raise DifflensError(f"analysis.{name} must be at least 1 (got {getattr(cfg, name)})")
    for name in ("label_top_n", "range_bins", "range_per_bin"):
        if getattr(cfg, name) < 1:
            raise DifflensError(f"analysis.{name} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.label_method not in ("breakeven", "top_n"):
        raise DifflensError(f"analysis.label_method is {cfg.label_method!r}; use one of breakeven, top_n")
    if cfg.label_stat not in ("pool", "example"):
        raise DifflensError(f"analysis.label_stat is {cfg.label_stat!r}; use one of pool, example")
    if cfg.label_pseudo_count <= 0:
        raise DifflensError(f"analysis.label_pseudo_count must be > 0 (got {cfg.label_pseudo_count})")
    if cfg.compare_pseudo_count <= 0:
        raise DifflensError(f"analysis.compare_pseudo_count must be > 0 (got {cfg.compare_pseudo_count})")
    return cfg


@dataclass
class InterventionsConfig:
    """What run-all's interventions stage does (the `[interventions]` section of a run config)."""

    enabled: bool = True
    """Run the stage at all."""
    top_units: int = 2
    """Units per (layer, kind) that get a steered prior and a deep dream."""
    sae_variants: bool = False
    """Also intervene on the features of a layer's other SAEs (kinds feature.<sae_id>); off: channels and the default
    SAE's features only (each variant adds its own priors, edits and dreams)."""
    steer_scale: float = 4.0
    """Steering strength as a multiple of the unit's max activation (units table)."""
    steer_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Seeds of the steered priors (and of the feature edits)."""
    edit_features: int = 8
    """Features zeroed by the `frequent` and `rare` edit presets."""
    concept_report: bool = True
    """On prompts with attributes (the demo), steer each colour's best feature and count hits."""
    concept_seeds: int = 10
    """Seeds per concept of the concept-steering report."""
    ablation: bool = True
    """Skip every candidate block in turn on the run's first prompts."""
    dream: bool = True
    """Deep-dream the top units."""
    dream_iterations: int = 100
    """Optimisation iterations per dream (`dream --iterations`)."""
    dream_seeds: int = 4
    """Dreams per unit (seeds 0..n-1)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate_interventions(cfg: InterventionsConfig) -> InterventionsConfig:
    for name in ("top_units", "edit_features", "concept_seeds", "dream_iterations", "dream_seeds"):
        if getattr(cfg, name) < 1:
            raise DifflensError(f"interventions.{name} must be at least 1 (got {getattr(cfg, name)})")
    if not cfg.steer_seeds:
        raise DifflensError("interventions.steer_seeds is empty; give at least one seed")
    return cfg


# ------------------------------------------------------------------------------------------ the causal map
@dataclass
class CausalMapConfig:
    """Where concepts are caused (the `[causal_map]` section; backend/interventions/causal_map.py): per concept,
    steer its best channel, best SAE feature, SAE feature set and diff-in-means direction at every layer and step
    window; choose the scale on the selection seeds, report flip and collateral rates on the held-out seeds."""

    enabled: bool = True
    """run-all computes the map (the demo model on prompts with attributes; skipped with a note elsewhere)."""
    reduced: bool = True
    """run-all's map is the reduced one: the last captured layer, the diff-in-means direction only, windows early and
    late, scales 8 and 20, 4 selection and 8 held-out seeds (about a minute on the demo). `python cli.py causal-map`
    computes the full map (these settings) unless given --reduced."""
    layers: list[str] = field(default_factory=list)
    """Layers (empty: every captured layer)."""
    attributes: list[str] = field(default_factory=list)
    """Attributes whose values are the concepts (empty: every attribute of the prompts, position included)."""
    directions: list[str] = field(default_factory=lambda: ["channel", "feature", "features", "mean", "matched"])
    """channel (the concept's best channel), feature (its best SAE feature), features (its SAE feature set), mean
    (its diff-in-means direction), matched (per step and token position, the concept's mean minus the prompt's current
    value's, among generations of the prompt's layout: shape, size, position; from the token shards)."""
    windows: list[str] = field(default_factory=lambda: ["early", "middle", "late", "all", "peaks"])
    """early (first third of the steps), middle, late (second half), all, peaks (the concept's peak step at the
    layer), or a window a-b."""
    masks: list[str] = field(default_factory=lambda: ["none", "object"])
    """none (every token), object (the shape in each unsteered image), background (everything but the shape)."""
    scales: list[float] = field(default_factory=lambda: [4.0, 10.0, 25.0])
    """Strengths tried, x the direction's size (a unit: its max activation, x its decoder-row norm; a direction: the
    norm of the difference); each cell keeps the best on the selection seeds."""
    selection_seeds: list[int] = field(default_factory=lambda: list(range(1000, 1008)))
    """Seeds that choose each cell's scale (one prompt lacking the concept per seed)."""
    heldout_seeds: list[int] = field(default_factory=lambda: list(range(2000, 2020)))
    """Seeds the rates are reported on: used to choose nothing (not selection seeds, not the run's seeds)."""
    feature_set_size: int = 8
    """Features in a feature-set direction (the top ones by AUROC)."""
    batch_size: int = 64
    """Steered images per forward pass."""
    matched_scales: list[float] = field(default_factory=lambda: [1.0, 2.0])
    """Strengths a matched direction tries, x its difference (1: move each prompt's generation by the whole
    difference between the concept's and its current value's mean activations)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CAUSAL_MAP_REDUCED = {"directions": ["mean"], "windows": ["early", "late"], "scales": [8.0, 20.0],
                      "selection_seeds": 4, "heldout_seeds": 8}
"""What `reduced` changes (seeds: the first n of each list; layers: the last captured one unless given)."""


def validate_causal_map(cfg: CausalMapConfig) -> CausalMapConfig:
    """One-line errors for causal-map settings out of range (before anything is written)."""
    import math

    known = {"directions": ("channel", "feature", "features", "mean", "matched"),
             "masks": ("none", "object", "background")}
    for name, allowed in known.items():
        for v in getattr(cfg, name):
            if v not in allowed:
                raise DifflensError(f"causal_map.{name}: unknown value {v!r}; use {', '.join(allowed)}")
    for name in ("directions", "windows", "masks", "scales", "matched_scales"):
        if not getattr(cfg, name):
            raise DifflensError(f"causal_map.{name} is empty; give at least one")
    for name in ("scales", "matched_scales"):
        for s in getattr(cfg, name):
            if not isinstance(s, int | float) or not math.isfinite(s) or s <= 0:
                raise DifflensError(f"causal_map.{name} must be finite numbers > 0 (got {s!r})")
    for name in ("feature_set_size", "batch_size"):
        if getattr(cfg, name) < 1:
            raise DifflensError(f"causal_map.{name} must be at least 1 (got {getattr(cfg, name)})")
    return cfg


# ------------------------------------------------------------------------------------------ steered priors, dreams
@dataclass
class PriorConfig:
    """How a unit's steered prior is made (the `[prior]` section: the atlas' priors; backend/interventions/priors.py):
    the empty prompt without guidance, generated while strength x the unit's unit-norm direction is added to the
    layer's output at the steering window's steps."""

    scale: float = 4.0
    """Relative strength: strength = scale x the unit's max activation (units table; a feature's x its decoder-row
    norm)."""
    strength: float | None = None
    """Absolute strength along the unit-norm direction; overrides scale."""
    steps: str = "active"
    """Steering window: active (the unit's first..last active step), all, late (second half), peaks (only the unit's
    peak steps, +- peak_radius) or an inclusive window such as 3-8. A unit never active (or without peaks, for peaks)
    is steered at every step."""
    peak_radius: int = 1
    """With steps = peaks: steps on either side of each peak that are steered too."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """One prior per seed (its initial noise)."""
    n_steps: int = 0
    """Denoising steps; 0: the run's (a window of the run's steps is rescaled to it)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


ROBUSTNESS = {"none": (0, 0.0, 0.0), "light": (1, 2.0, 0.02), "standard": (1, 5.0, 0.05), "strong": (2, 10.0, 0.1)}
"""Transformation-robustness presets: (jitter, rotate_degrees, scale_range) of each dream step's random augmentation."""

KIND_DREAM_DEFAULTS = {"channel": {"lr": 0.2, "see_through": 0.3, "tv_weight": 0.125, "blur_sigma_start": 1.0},
                       "feature": {"lr": 0.32, "see_through": 0.4, "tv_weight": 0.0625, "blur_sigma_start": 0.75}}
"""DreamConfig fields whose default depends on the unit kind (features: sparser and sharper, so more noise visible,
weaker smoothing and a larger step); None in a DreamConfig means the kind's value here."""


@dataclass
class DreamConfig:
    """How a unit is dreamed (the `[dream]` section; backend/interventions/dream.py). `dream.default_config(kind)`
    gives the documented defaults for channels and features: fields left None take the kind's value
    (KIND_DREAM_DEFAULTS) or the robustness preset's (ROBUSTNESS). moment_mean, moment_std and range_limit are in
    the model's latent units; None (the default) means the model's own (`latent_scale`). The other settings do not
    depend on the model's latent scale."""

    opt_steps: int = 100
    """Optimisation steps per dream."""
    lr: float | None = None
    """Step size in units of moment_std: each step moves the latent by lr * moment_std times its (blurred,
    preconditioned) gradient normalised to RMS 1 per seed, i.e. about that much per latent pixel. None: the kind's
    (channel 0.2, feature 0.32)."""
    lr_end: float = 0.04
    """Step size at the last step, in units of moment_std (decays linearly from lr)."""
    snapshot_every: int = 10
    """A snapshot (activation, penalties, image) every this many steps, plus the first and the last."""
    targets: str = "0,peaks"
    """Denoising steps the activation is measured at, comma-separated: step numbers, `peaks` (the unit's peak steps,
    highest first) and `active` (steps spread evenly over the unit's active window); repeats are dropped and at most
    max_target_steps are kept."""
    max_target_steps: int = 3
    """Target steps per dream at most (the first ones `targets` names)."""
    joint: bool = True
    """Optimise one latent for all target steps at once (their mean activation); false: one dream per target step."""
    noise: bool = True
    """See the latent through the scheduler's noise at each target step (false: the denoiser sees the latent itself,
    as if see_through were 1)."""
    see_through: float | None = None
    """Share of the scheduler noise made transparent: a' = abar_t + see_through * (1 - abar_t); 0 is exact
    scheduler noise (the image is then invisible at step 0), 1 is no noise. None: the kind's (channel 0.3,
    feature 0.4)."""
    fresh_noise: bool = True
    """Draw new noise every step (else one fixed noise per seed and target step throughout)."""
    init: str = "random"
    """Start of each dream: random (init_std around moment_mean) or prior (the unit's steered prior of the same
    seed, as the atlas saved it: run its priors first)."""
    tv_weight: float | None = None
    """Weight of the total-variation penalty (mean absolute difference of neighbouring values of x / moment_std,
    beyond tv_threshold). None: the kind's (channel 0.125, feature 0.0625)."""
    tv_threshold: float = 0.0
    """Differences of neighbouring values (in units of moment_std) up to this are free of the TV penalty."""
    range_weight: float = 0.625
    """Weight of the range penalty (mean squared excess of |x| over range_limit, in units of moment_std)."""
    range_limit: float | None = None
    """Latent values beyond +-range_limit are penalised. None: the model's (latent_scale: 1 for pixel-space models,
    whose images are in [-1, 1]; for latent-space models fitted to their latents, about 4 for SD)."""
    moment_weight: float = 0.0625
    """Weight of the moment penalty: ((mean - moment_mean)^2 + (std - moment_std)^2) / moment_std^2 per seed."""
    moment_mean: float | None = None
    """Target mean of the latent. None: the model's (latent_scale: 0.0 for pixel-space models; fitted otherwise)."""
    moment_std: float | None = None
    """Target standard deviation of the latent, and the unit of lr, lr_end, init_std and the penalties. None: the
    model's (latent_scale: 0.25 for pixel-space models, the demo's images; fitted otherwise, about 1 for SD)."""
    blur_sigma_start: float | None = None
    """Blur of the gradient (pixels of the latent) at the first step. None: the kind's (channel 1.0, feature
    0.75)."""
    blur_sigma_end: float = 0.0
    """Blur sigma at the last step (below 0.1 no blur)."""
    blur_schedule: str = "linear"
    """How the blur sigma goes from blur_sigma_start to blur_sigma_end: linear, cosine or constant (start
    throughout)."""
    blur_kernel: str = "gaussian"
    """Gradient blur kernel: gaussian (sigma) or box (width 2 * round(sigma) + 1)."""
    spectral: bool = True
    """Precondition the gradient in Fourier space (scale each frequency by 1 / f ** spectral_decay)."""
    spectral_decay: float = 1.0
    """Exponent of the 1 / frequency preconditioning (0: none)."""
    robustness: str = "standard"
    """Transformation-robustness preset setting jitter, rotate_degrees and scale_range where they are None: none,
    light, standard or strong (ROBUSTNESS)."""
    jitter: int | None = None
    """Random shift (torch.roll) of up to this many latent pixels per step and seed. None: the preset's."""
    rotate_degrees: float | None = None
    """Random rotation of up to this many degrees per step and seed. None: the preset's."""
    scale_range: float | None = None
    """Random scaling by a factor in [1 - scale_range, 1 + scale_range] per step and seed. None: the preset's."""
    init_std: float = 0.4
    """Standard deviation of the random start (around moment_mean) in units of moment_std, when no initial latent
    is given."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Seeds of the dreams run together (each seed: its own start, noise and augmentation)."""
    micro_batch: int = 0
    """Rows (seeds x target steps) the denoiser sees per forward and backward pass; 0: all at once. The gradients
    of the micro-batches are summed, so the result is the same: lower it when a dream runs out of memory (SDXL at
    1024 px holds every row's activations for the backward pass)."""
    channel: dict = field(default_factory=dict)
    """The `[dream.channel]` table: settings for channels only, over the ones above (any [dream] key but channel and
    feature, e.g. lr = 0.25, robustness = "strong"). Reachable from the command line with --set dream.channel.KEY=V."""
    feature: dict = field(default_factory=dict)
    """The `[dream.feature]` table: settings for SAE features only (every SAE of a layer), over the ones above."""

    def __post_init__(self):
        check_kind_tables(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DREAM_KIND_TABLES = ("channel", "feature")
"""DreamConfig's per-kind tables ([dream.channel], [dream.feature]): kind -> settings over [dream]'s."""


def check_kind_tables(cfg: DreamConfig) -> None:
    """One-line errors for a per-kind [dream] table that is not a table, names an unknown key, has a value of the
    wrong type or a non-finite number (its presets and ranges are checked with the kind's resolved settings)."""
    for name in DREAM_KIND_TABLES:
        table = getattr(cfg, name)
        where = f"[dream.{name}]"
        if not isinstance(table, dict):
            raise DifflensError(f"{where} must be a table of [dream] settings (got {table!r})")
        allowed = {f.name for f in dataclasses.fields(DreamConfig)} - set(DREAM_KIND_TABLES)
        unknown = set(table) - allowed
        if unknown:
            raise DifflensError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid keys: "
                                f"{', '.join(sorted(allowed))}")
        _check_types(table, DreamConfig, where)
        check_finite_settings(f"dream.{name}", table)


@dataclass
class AtlasConfig:
    """The unit atlas (the `[atlas]` section; run-all's atlas stage and `python cli.py atlas`): every chosen unit's
    steered prior ([prior]) and deep dreams ([dream]), many units per forward and backward pass."""

    enabled: bool = True
    """Run the atlas stage in run-all."""
    units: str = "top:2"
    """Units of each (layer, kind): all, top:N (each concept's best unit, then the highest peaks), or ranges and
    lists such as 0-127 or 3,5,9."""
    layers: list[str] = field(default_factory=list)
    """Layers (empty: every analysed layer)."""
    kinds: list[str] = field(default_factory=list)
    """Kinds (empty: every analysed kind of the layer: channel, feature)."""
    sae_variants: bool = False
    """With kinds empty, also the features of a layer's other SAEs (feature.<sae_id>); off: channel and feature."""
    priors: bool = True
    """Make the steered priors."""
    dreams: bool = True
    """Make the deep dreams."""
    dream_variants: list[str] = field(default_factory=lambda: ["default", "no-noise"])
    """Dream variants kept side by side: default (the [dream] settings), no-noise (noise = false), from-prior
    (init = prior), from-prior-no-noise (both)."""
    batch_units: int = 32
    """Units per batch: one batch is one forward (and backward) pass per step, one table shard and one marker."""
    heatmap_animations: bool = True
    """Write a GIF of each unit's heat-map over the denoising steps of its top example (media/atlas/.../heatmaps/)."""
    frame_ms: int = 120
    """Duration of an animation frame in milliseconds."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_finite_settings(section: str, values: dict) -> None:
    """A one-line DifflensError for a float setting that is inf or NaN."""
    import math

    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise DifflensError(f"{section}.{name} must be a finite number (got {value})")


@dataclass
class RunConfig:
    """Everything a run needs; stored resolved in manifest.json."""

    name: str = "demo"
    """Run name: results go to <runs_dir>/<name> (letters, digits, '.', '_', '-')."""
    runs_dir: str = "runs"
    """Directory holding the runs."""
    model: str = "demo"
    """`demo` or a local diffusers pipeline directory."""
    prompts: str = "data/prompts/demo.jsonl"
    """Prompt file: .txt (one prompt per line) or .jsonl (prompt, group, attributes)."""
    device: str = "cpu"
    """torch device: cpu, cuda, cuda:1 ..."""
    dtype: str = "float32"
    """float32, float16 or bfloat16."""
    images: str = ""
    """Image classifiers: the images instead of prompts: a folder with one sub-folder of images per class, or a CSV /
    JSONL labels file (columns path, class; paths relative to the file)."""
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    sae: SAEStageConfig = field(default_factory=SAEStageConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    interventions: InterventionsConfig = field(default_factory=InterventionsConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    dream: DreamConfig = field(default_factory=DreamConfig)
    atlas: AtlasConfig = field(default_factory=AtlasConfig)
    causal_map: CausalMapConfig = field(default_factory=CausalMapConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"capture": CaptureConfig, "sae": SAEStageConfig, "analysis": AnalysisConfig,
            "interventions": InterventionsConfig, "prior": PriorConfig, "dream": DreamConfig, "atlas": AtlasConfig,
            "causal_map": CausalMapConfig}
TOP_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS)


def section_class(section: str):
    """The dataclass of a config section ("" for the top level)."""
    return RunConfig if section == "" else SECTIONS[section]


def field_docs(cls) -> dict[str, str]:
    """The docstrings written under each dataclass field (of cls and its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:] + [None], strict=True):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _check_keys(obj: dict, cls, where: str) -> None:
    allowed = {f.name for f in dataclasses.fields(cls)} - (set(SECTIONS) if cls is RunConfig else set())
    unknown = set(obj) - allowed
    if unknown:
        names, allowed_names = ", ".join(sorted(unknown)), ", ".join(sorted(allowed))
        raise DifflensError(f"{where}: unknown key(s) {names}; valid keys: {allowed_names}")


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list[str]": (list,),
          "list[int]": (list,), "float | None": (int, float, type(None)), "int | None": (int, type(None))}


def _check_types(obj, cls, where: str) -> None:
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in obj.items():
        want = _TYPES.get(str(hints.get(key)))
        if want is None or key in SECTIONS:
            continue
        bad = not isinstance(value, want) or (bool not in want and isinstance(value, bool))
        if bad:
            raise DifflensError(f"{where}: {key} must be {hints[key]} (got {value!r})")


def from_dict(data: dict, where: str = "config") -> RunConfig:
    """A RunConfig from a (possibly partial) dict; unknown keys and wrong types are one-line errors."""
    top = {k: v for k, v in data.items() if k not in SECTIONS}
    _check_keys(top, RunConfig, where)
    _check_types(top, RunConfig, where)
    sections = {}
    for name, cls in SECTIONS.items():
        sec = data.get(name, {})
        if not isinstance(sec, dict):
            raise DifflensError(f"{where}: [{name}] must be a table")
        _check_keys(sec, cls, f"{where} [{name}]")
        _check_types(sec, cls, f"{where} [{name}]")
        sections[name] = cls(**sec)
    return RunConfig(**top, **sections)


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DifflensError(f"config file {path} not found; give a run.toml (see configs/demo.toml)")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise DifflensError(f"{path} is not valid TOML: {exc}") from exc


def load_config(path: str | Path | None) -> RunConfig:
    """Defaults, or a TOML file over the defaults."""
    return RunConfig() if path is None else from_dict(read_toml(path), str(path))


def merge(base: dict, layer: dict) -> dict:
    """layer over base, section by section (a [sae] table with only k keeps base's other [sae] keys), and table by
    table within a section (a [sae.variants.k8] with only k keeps the variant's other keys)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in layer.items():
        if key in SECTIONS and isinstance(value, dict):
            out[key] = _merge_tables(out.get(key, {}), value)
        else:
            out[key] = value
    return out


def _merge_tables(base: dict, layer: dict) -> dict:
    out = dict(base)
    for key, value in layer.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge_tables(out[key], value) if both else value
    return out


def parse_set(items: list[str] | None) -> dict:
    """--set KEY=VALUE options -> {"section.key": value}; the value is read as TOML (10, 1e-3, true, "x", [1, 2])
    and as a plain string when it is not TOML."""
    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise DifflensError(f"--set takes KEY=VALUE, e.g. --set sae.k=32 or --set analysis.pool=max; got {item!r}")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        out[key.strip()] = value
    return out


def nest(overrides: dict) -> dict:
    """{"capture.steps": 10, "name": "x"} -> {"capture": {"steps": 10}, "name": "x"}; unknown sections and keys are
    one-line errors listing the valid ones."""
    out: dict = {}
    for key, value in overrides.items():
        head, *path = key.split(".")
        if head in SECTIONS and len(path) > 1:  # a table inside a section: sae.variants.k8.k
            table = out.setdefault(head, {})
            for part in path[:-1]:
                table = table.setdefault(part, {})
            table[path[-1]] = value
            continue
        section, _, name = key.rpartition(".")
        if section and section not in SECTIONS:
            raise DifflensError(f"unknown config section {section!r} in {key!r}; valid sections: "
                                f"{', '.join(SECTIONS)} (top-level keys: {', '.join(TOP_KEYS)})")
        if section:
            out.setdefault(section, {})[name] = value
        else:
            out[name] = value
    return out


RENAMED = {("interventions", "dream_steps"): "dream_iterations"}
"""Config keys renamed since run format 1: (section, old) -> new."""


def upgrade_saved(saved: dict) -> dict:
    """A saved run config with keys of older difflens versions renamed (format-1 runs are read as they are)."""
    out = merge({}, saved or {})  # fresh section dicts
    for (section, old), new in RENAMED.items():
        if old in out.get(section, {}):
            out[section].setdefault(new, out[section].pop(old))
    return out


def resolve(saved: dict | None = None, file: str | Path | None = None, overrides: dict | None = None,
            where: str = "options") -> RunConfig:
    """The one config rule of every command: dataclass defaults < the run's saved config (commands acting on an
    existing run) < --config FILE < command-line options (dotted keys, None = not given)."""
    data: dict = {}
    if saved:
        data = merge(data, upgrade_saved(saved))
    if file is not None:
        toml = read_toml(file)
        from_dict(toml, str(file))  # its own errors name the file
        data = merge(data, toml)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    data = merge(data, nest(given))
    return from_dict(data, where if given else (str(file) if file else "config"))


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate(cfg: RunConfig) -> RunConfig:
    """One-line errors for settings out of range; fills in the demo's default layers."""
    if not RUN_NAME.fullmatch(cfg.name):
        raise DifflensError(f"run name {cfg.name!r} is not a plain directory name: use letters, digits, '.', '_' and "
                            f"'-' (the run goes to {cfg.runs_dir}/<name>)")
    validate_analysis(cfg.analysis)
    validate_interventions(cfg.interventions)
    validate_causal_map(cfg.causal_map)
    c = cfg.capture
    if c.read not in ("output", "delta"):
        raise DifflensError(f"capture.read is {c.read!r}; use output or delta")
    if c.half not in ("cond", "uncond", "both"):
        raise DifflensError(f"capture.half is {c.half!r}; use cond, uncond or both")
    for name in ("images_per_prompt", "batch_size", "tokens_per_step"):
        if getattr(c, name) < 1:
            raise DifflensError(f"capture.{name} must be at least 1 (got {getattr(c, name)})")
    if c.steps < 0:
        raise DifflensError(f"capture.steps must be >= 0 (got {c.steps})")
    if c.tokens not in ("cls", "patch", "all"):
        raise DifflensError(f"capture.tokens is {c.tokens!r}; use cls, patch or all")
    if not c.layers:
        if cfg.model != "demo":
            raise DifflensError("no layers given: pass --layer (see `python cli.py layers --model ...`)")
        c.layers = list(DEMO_LAYERS)
    return cfg


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
