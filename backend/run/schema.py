"""The run format's table catalogue: every table a run holds, its pyarrow schema, layout and producer.

Torch-free (the inspector imports it). docs/run-format.md is the normative description; this module is its code
form, and tests/run/test_schema.py checks that the two agree and that a demo run's files match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

FORMAT_VERSION = 3
"""manifest.json `format_version`, written by every manifest write. A run without one is format 1 (written before
the key existed); format 2 only adds to it (format_version, stage keys), so format-1 runs are read as they are.
Format 3 holds several SAEs per layer (sae/<layer>/<sae_id>/); a format-1/2 run's sae/<layer>/cfg.json is read as
the layer's `default` SAE (legacy_sae_dir). Any other version is refused with a one-line error
(check_format_version)."""

READABLE_VERSIONS = (1, 2, FORMAT_VERSION)


# ------------------------------------------------------------------------------------------------ unit kinds
DEFAULT_SAE = "default"
"""The id of a layer's first SAE (the one `train-sae` / run-all trains unless told otherwise)."""


def feature_kind(sae_id: str = DEFAULT_SAE) -> str:
    """The `kind` value of one SAE's latents: `feature` for the default SAE, `feature.<sae_id>` for another."""
    return "feature" if sae_id == DEFAULT_SAE else f"feature.{sae_id}"


def is_feature(kind: str) -> bool:
    """True for SAE latents of any SAE (`feature`, `feature.<sae_id>`), False for `channel`."""
    return kind == "feature" or kind.startswith("feature.")


def sae_id_of(kind: str) -> str | None:
    """The SAE id a kind names (None for `channel`)."""
    if kind == "feature":
        return DEFAULT_SAE
    return kind.split(".", 1)[1] if kind.startswith("feature.") else None


SAE_ID = re.compile(r"[a-z0-9][a-z0-9_.-]*")
"""An SAE id: lower-case letters, digits, '_', '.', '-', starting with a letter or digit, at most SAE_ID_MAX long."""
SAE_ID_MAX = 40


def check_sae_id(sae_id: str) -> str:
    """sae_id, or a one-line DifflensError saying what an SAE id may hold."""
    from backend.errors import DifflensError

    if not isinstance(sae_id, str) or not SAE_ID.fullmatch(sae_id) or len(sae_id) > SAE_ID_MAX:
        raise DifflensError(f"SAE id {sae_id!r} is not valid: use lower-case letters, digits, '_', '.' and '-', "
                            f"starting with a letter or digit, at most {SAE_ID_MAX} characters (e.g. k8)")
    return sae_id


# ------------------------------------------------------------------------------------------------ SAE layout
def sae_path(root, layer: str, sae_id: str = DEFAULT_SAE):
    """The directory of one SAE of a run: sae/<layer>/<sae_id>/. A format-1/2 run keeps its one SAE directly in
    sae/<layer>/ (cfg.json there): that directory is the layer's `default` SAE (read-compat)."""
    from pathlib import Path

    layer_dir = Path(root) / "sae" / layer
    if sae_id == DEFAULT_SAE and (layer_dir / "cfg.json").is_file():
        return layer_dir
    return layer_dir / sae_id


def run_saes(root) -> list[tuple[str, str]]:
    """Every (layer, sae_id) with an SAE in the run (a cfg.json in its directory), by layer, `default` first, then
    by id. In a format-1/2 layout (sae/<layer>/cfg.json) the subdirectories are exports unless they hold an
    sae.safetensors of their own."""
    from pathlib import Path

    out = []
    for layer_dir in sorted(p for p in (Path(root) / "sae").glob("*") if p.is_dir()):
        legacy = (layer_dir / "cfg.json").is_file()
        ids = {DEFAULT_SAE} if legacy else set()
        for sub in layer_dir.iterdir():
            if (sub / "cfg.json").is_file() and SAE_ID.fullmatch(sub.name) and (
                    not legacy or (sub / "sae.safetensors").is_file()):
                ids.add(sub.name)
        out += [(layer_dir.name, i) for i in sorted(ids, key=lambda i: (i != DEFAULT_SAE, i))]
    return out


def run_feature_kinds(root) -> dict[str, list[str]]:
    """{layer: [its SAEs' kinds: feature, feature.<sae_id>, ...]} of a run."""
    out: dict[str, list[str]] = {}
    for layer, sae_id in run_saes(root):
        out.setdefault(layer, []).append(feature_kind(sae_id))
    return out


# ------------------------------------------------------------------------------------------------ schemas
# Columns stored in the files, in file order. Partition columns (layer, kind) live in the directory names only.

GENERATIONS = pa.schema([
    ("gen_id", pa.int32()),           # prompt_index * images_per_prompt + image_index
    ("prompt", pa.string()),
    ("seed", pa.int64()),
    ("group", pa.string()),           # the prompt's group ("" when the prompt file has none)
    ("attributes", pa.string()),      # JSON object of the prompt's attributes (sorted keys; "{}" when none)
    ("image", pa.string()),           # run-relative path of the final image, images/<gen_id:06d>.png
    ("n_steps", pa.int16()),
    ("guidance", pa.float32()),
    ("negative_prompt", pa.string()),  # the negative prompt CFG used in place of the empty prompt (null: none)
    ("control_image", pa.string()),   # the ControlNet control image's path (null: no ControlNet)
    ("image_path", pa.string()),      # an image classifier's input image, absolute (null: a diffusion run)
    ("class_label", pa.string()),     # that image's class (null: a diffusion run)
])

CLASS_SCORES = pa.schema([
    ("unit", pa.int32()),
    ("rank", pa.int16()),             # 1 = the class with the unit's highest AUROC
    ("class", pa.string()),           # an image class (generations.class_label)
    ("images", pa.int32()),           # images of the class
    ("freq", pa.float32()),           # share of the class's images in which the unit is active (frequencies)
    ("mean", pa.float32()),           # mean pooled activity over the class's images (frequencies)
    ("auroc", pa.float32()),          # AUROC of the unit's pooled activation for this class vs the rest, all images
    ("auroc_select", pa.float32()),   # the same on the selection half (even index within each class; NaN: no split)
    ("auroc_test", pa.float32()),     # the same on the held-out half (odd index within each class)
])

CLASS_BEST = pa.schema([
    ("class", pa.string()),
    ("images", pa.int32()),           # images of the class
    ("unit", pa.int32()),             # the unit with the best auroc_select for the class
    ("auroc_select", pa.float32()),   # its AUROC on the selection half
    ("auroc_test", pa.float32()),     # its AUROC on the held-out half: out-of-sample
])

STEPS = pa.schema([
    ("step", pa.int16()),             # 0 .. n_steps - 1, in denoising order
    ("timestep", pa.float32()),       # the scheduler's timestep at that step
])

ACTIVITY = pa.schema([
    ("gen_id", pa.int32()),
    ("step", pa.int16()),
    ("unit", pa.int32()),             # channel or SAE feature index
    ("mean", pa.float32()),           # spatial mean (features: inactive positions count as 0)
    ("max", pa.float32()),            # spatial max
])

SAE_TRAINING = pa.schema([
    ("step", pa.int32()),
    ("tokens", pa.int64()),           # tokens seen so far
    ("fvu", pa.float64()),
    ("l0", pa.float32()),
    ("dead_frac", pa.float32()),
    ("lr", pa.float32()),
])

SAE_METRICS = pa.schema([
    ("layer", pa.string()),
    ("sae_id", pa.string()),          # the SAE of the layer (`default`, or the id of another: kind feature.<sae_id>)
    ("fvu", pa.float64()),
    ("l0", pa.float64()),
    ("dead_frac", pa.float64()),
    ("dense_frac", pa.float64()),
    ("tokens", pa.int64()),
    ("seconds", pa.float64()),
    ("loss_clean", pa.float64()),     # splice test (null when it was skipped, splice_samples = 0)
    ("loss_spliced", pa.float64()),
    ("loss_zero", pa.float64()),
    ("frac_loss_recovered", pa.float64()),
    ("splice_samples", pa.int64()),
])

PROFILES = pa.schema([
    ("unit", pa.int32()),
    ("step", pa.int16()),
    ("mean", pa.float32()),           # mean over generations of the spatial mean
    ("max", pa.float32()),            # max over generations of the spatial max
    ("freq", pa.float32()),           # share of generations in which the unit is active
])

UNITS = pa.schema([
    ("unit", pa.int32()),
    ("density", pa.float32()),        # share of all (generation, step) pairs active
    ("mean", pa.float32()),
    ("max", pa.float32()),
    ("peak_steps", pa.list_(pa.int16())),
    ("first_active", pa.int16()),     # -1: never active
    ("last_active", pa.int16()),
    ("active_steps", pa.int16()),
    ("dead", pa.bool_()),
    ("dense", pa.bool_()),
    ("label", pa.string()),           # reserved (null)
    ("label_confidence", pa.float32()),  # backend/analysis/labels.py (null: no label)
    ("label_step", pa.int16()),  # the step the label scores best at (-1: no label, or a method ranking over all steps)
])

PEAKS = pa.schema([
    ("unit", pa.int32()),
    ("step", pa.int16()),
    ("height", pa.float32()),
    ("rank", pa.int16()),             # 1 = highest
])

EXAMPLES = pa.schema([
    ("unit", pa.int32()),
    ("step", pa.int16()),             # -1: over all steps; else a peak step
    ("rank", pa.int16()),             # 1 = highest activation
    ("gen_id", pa.int32()),
    ("activation", pa.float32()),
    ("heatmap_step", pa.int16()),     # the step the heat-map was taken at
    ("heatmap", pa.list_(pa.float32())),  # row-major height x width
    ("height", pa.int16()),
    ("width", pa.int16()),
])

RANGE_EXAMPLES = pa.schema([
    ("unit", pa.int32()),
    ("bin", pa.int16()),              # 1 = lowest of analysis.range_bins equal-width bins over (0, max]
    ("lo", pa.float32()),             # the bin's activation range (lo, hi]
    ("hi", pa.float32()),
    ("gen_id", pa.int32()),
    ("step", pa.int16()),             # the step of the generation's highest activation
    ("activation", pa.float32()),
])

FREQUENCIES = pa.schema([
    ("unit", pa.int32()),
    ("group", pa.string()),
    ("freq", pa.float32()),           # share of the group's (generation, step) pairs where the unit is active
    ("mean", pa.float32()),
    ("generations", pa.int32()),      # generations in the group
])

HISTOGRAMS = pa.schema([
    ("unit", pa.int32()),
    ("stat", pa.string()),            # max | mean
    ("lo", pa.float32()),             # bin edges
    ("hi", pa.float32()),
    ("count", pa.int64()),
])

COMPARISONS = pa.schema([
    ("group_a", pa.string()),
    ("group_b", pa.string()),
    ("unit", pa.int32()),
    ("freq_a", pa.float32()),
    ("freq_b", pa.float32()),
    ("ratio", pa.float64()),          # freq_a / freq_b (inf when freq_b = 0)
    ("score", pa.float64()),          # log-odds ratio with pseudo-counts
    ("rank", pa.int32()),             # 1 = highest score
])

CONCEPTS = pa.schema([
    ("concept", pa.string()),         # attribute=value
    ("unit", pa.int32()),
    ("auroc", pa.float32()),          # best over steps
    ("step", pa.int16()),             # the step of that best AUROC
    ("rank", pa.int16()),             # 1 = best unit for the concept
])

LOCALISATION = pa.schema([
    ("unit", pa.int32()),
    ("examples", pa.int32()),         # examples with a heat-map centroid
    ("positions", pa.int32()),        # distinct prompt positions among them
    ("hits", pa.int32()),             # centroid in the prompt's region
    ("share", pa.float64()),          # hits / examples
    ("rank", pa.int32()),             # by share, then examples
])

CONCEPT_SUMMARY = pa.schema([
    ("layer", pa.string()),
    ("kind", pa.string()),
    ("concepts", pa.int32()),
    ("mean_best_auroc", pa.float64()),
    ("localisation", pa.float64()),
    ("localised_examples", pa.int32()),
    ("best_localisation", pa.float64()),
    ("best_localising_unit", pa.int32()),
    ("auroc_choose", pa.float64()),   # out_of_sample.py: the chosen units' AUROC on the choosing half
    ("auroc_oos", pa.float64()),      # ... on the other half
    ("oos_split", pa.string()),
])


INTERVENTIONS = pa.schema([
    ("unit", pa.int32()),             # -1: an edit of several features (see `features`)
    ("method", pa.string()),          # steer | zero | scale
    ("mode", pa.string()),            # prior | prompt (steering), edit
    ("prompt", pa.string()),
    ("seed", pa.int64()),
    ("strength", pa.float32()),       # absolute steering strength (NaN for edits)
    ("scale", pa.float32()),          # relative steering scale, or the scaling factor of an edit
    ("steps", pa.string()),           # the steps the edit applied at, e.g. "all" or "3-12"
    ("mask", pa.string()),            # region name / "array" / "" (none)
    ("features", pa.list_(pa.int32())),
    ("preset", pa.string()),          # edits: none | frequent | rare | all | custom
    ("n_steps", pa.int16()),
    ("guidance", pa.float32()),
    ("image", pa.string()),
    ("baseline_image", pa.string()),
    ("effect", pa.float32()),         # mean |image - baseline| on [0, 1]
    ("attributes", pa.string()),      # JSON: demo attributes of the image (null off the demo)
    ("baseline_attributes", pa.string()),
    ("changed_attributes", pa.string()),  # JSON {attribute: [before, after]} (null off the demo)
    ("concept", pa.string()),         # concept_steering_report: the concept steered towards
    ("concept_hit", pa.bool_()),      # ... and whether the image took it
    ("spec", pa.string()),            # the digest naming this intervention's shard and media folder
])

STEERING_SUCCESS = pa.schema([
    ("concept", pa.string()), ("unit", pa.int32()), ("auroc", pa.float32()), ("rank", pa.int16()),
    ("scale", pa.float32()), ("strength", pa.float32()), ("steps", pa.string()), ("mask", pa.string()),
    ("n_steps", pa.int16()), ("guidance", pa.float32()), ("seeds", pa.int32()), ("hits", pa.int32()),
    ("rate", pa.float32()), ("clean_hits", pa.int32()), ("clean_rate", pa.float32()), ("baseline_hits", pa.int32()),
])

DREAMS = pa.schema([
    ("unit", pa.int32()), ("step", pa.int16()), ("seed", pa.int64()), ("opt_step", pa.int32()),
    ("activation", pa.float32()), ("penalties", pa.string()), ("image", pa.string()),
])

ATLAS = pa.schema([
    ("unit", pa.int32()),
    ("what", pa.string()),            # prior | dream
    ("variant", pa.string()),         # default | no-noise | from-prior | from-prior-no-noise (ATLAS_VARIANTS)
    ("seed", pa.int32()),
    ("image", pa.string()),           # media/atlas/<layer>/<kind>/<what>-<variant>/unit-<unit:05d>-...png
    ("animation", pa.string()),       # a GIF of the dream's snapshots (null for priors)
    ("objective", pa.float32()),      # final dream objective, mean over its target steps (null for priors)
    ("target_steps", pa.string()),    # "0,7": dreams: the steps maximised; priors: the steps steered
])

CAUSAL_MAP = pa.schema([
    ("concept", pa.string()), ("attribute", pa.string()), ("direction", pa.string()), ("kind", pa.string()),
    ("unit", pa.int32()), ("units", pa.string()), ("auroc", pa.float32()), ("window", pa.string()),
    ("steps", pa.string()), ("mask", pa.string()), ("scale", pa.float32()), ("strength", pa.float32()),
    ("selection_seeds", pa.int32()), ("selection_flip_rate", pa.float32()),
    ("selection_collateral_rate", pa.float32()), ("seeds", pa.int32()), ("flip_rate", pa.float32()),
    ("collateral_rate", pa.float32()), ("clean_rate", pa.float32()), ("baseline_rate", pa.float32()),
])

CAUSAL_MAP_DIRECTIONS = ("channel", "feature", "features", "mean", "matched")
"""`causal_map.direction` values: a concept's best channel, best SAE feature, SAE feature set, diff-in-means,
matched (per-step, per-position difference among generations of the prompt's layout)."""

ATLAS_WHAT = ("prior", "dream")
"""`atlas.what` values."""
ATLAS_VARIANTS = ("default", "no-noise", "from-prior", "from-prior-no-noise")
"""`atlas.variant` values: priors are `default`; a dream's variant names how it differs from the [dream] settings:
`no-noise` (no scheduler noise: the denoiser sees the latent itself), `from-prior` (started from the unit's
steered prior of the same seed), both."""

ATLAS_THUMB_PX = 128
"""Longer side of an atlas image's thumbnail (smaller images keep their size)."""


def atlas_thumbnail(image: str) -> str:
    """The run-relative path of an `atlas.image`'s thumbnail (the Atlas page's grid shows these): beside the image,
    `.thumb.jpg` in place of its extension; a JPEG whose longer side is ATLAS_THUMB_PX at most. Runs written before
    thumbnails existed have none: readers fall back to the image."""
    stem, dot, _ = image.rpartition(".")
    return f"{stem if dot else image}.thumb.jpg"


ABLATIONS = pa.schema([
    ("mode", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("n_steps", pa.int16()),
    ("guidance", pa.float32()), ("image", pa.string()), ("baseline_image", pa.string()), ("effect", pa.float32()),
    ("attributes", pa.string()), ("baseline_attributes", pa.string()), ("changed_attributes", pa.string()),
    ("spec", pa.string()),
])

CLASS_STEERING = pa.schema([
    ("unit", pa.int32()),
    ("strength", pa.float32()),       # absolute strength along the unit-norm direction
    ("scale", pa.float32()),          # the same in multiples of the layer's mean token norm (as given)
    ("tokens", pa.string()),          # cls | patch | all: the tokens the direction was added to
    ("images", pa.int32()),           # images steered
    ("target", pa.string()),          # the class the flip rate counts towards
    ("target_source", pa.string()),   # given | concepts (the unit's best class) | rising (largest logit gain)
    ("changed", pa.float32()),        # share of images whose predicted class changed
    ("flip_rate", pa.float32()),      # share of images not predicted as target unsteered that are now
    ("target_share", pa.float32()),   # share of images predicted as target when steered
    ("class_label", pa.string()),     # one class of the model
    ("logit_change", pa.float32()),   # mean change of its logit
    ("share", pa.float32()),          # share of images predicted as it when steered
    ("baseline_share", pa.float32()),  # ... unsteered
    ("spec", pa.string()),            # digest naming the shard and figure
])


SAE_COMPARISON = pa.schema([
    ("sae_id", pa.string()),
    ("kind", pa.string()),            # the unit kind of its latents: feature | feature.<sae_id>
    ("n_latents", pa.int32()),
    ("k", pa.int32()),
    ("architecture", pa.string()),
    ("sae_digest", pa.string()),      # sha256 of its sae.safetensors, 16 hex (tells a replaced SAE's rows apart)
    ("tokens", pa.int64()),           # token vectors in the sample
    ("fvu", pa.float64()),
    ("l0", pa.float64()),
    ("dead", pa.int32()),             # latents never active on the sample
    ("dead_frac", pa.float64()),
    ("dense_frac", pa.float64()),
    ("loss_clean", pa.float64()),     # splice test (null when skipped)
    ("loss_spliced", pa.float64()),
    ("loss_zero", pa.float64()),
    ("frac_loss_recovered", pa.float64()),
    ("splice_samples", pa.int64()),
    ("concepts", pa.int32()),         # concept recovery from concept_summary (null when not scored)
    ("mean_best_auroc", pa.float64()),
])

SAE_DENSITY = pa.schema([
    ("sae_id", pa.string()),
    ("lo", pa.float32()),             # bin edges, log10 of the firing frequency
    ("hi", pa.float32()),
    ("count", pa.int64()),            # live latents in the bin (dead ones: sae_comparison.dead)
])

SAE_MATCHES = pa.schema([
    ("sae_a", pa.string()),
    ("sae_b", pa.string()),
    ("feature_a", pa.int32()),
    ("feature_b", pa.int32()),        # A's latent's best match in B
    ("cosine", pa.float32()),         # cosine of their decoder rows
])


# Files that are not tables but have a fixed schema too.

TOKEN_INDEX = pa.schema([
    ("gen_id", pa.int32()),
    ("step", pa.int16()),
    ("position", pa.int32()),         # row-major token index in the layer's spatial grid
])
"""activations/<layer>/part-NNNNNNN.parquet: one row per token vector of the .npy shard of the same name."""

HEATMAP_WORK = pa.schema([
    ("layer", pa.string()),
    ("kind", pa.string()),
    ("unit", pa.int32()),
    ("gen_id", pa.int32()),
    ("heatmap_step", pa.int16()),
    ("heatmap", pa.list_(pa.float32())),
    ("height", pa.int16()),
    ("width", pa.int16()),
])
"""_work/analysis/heatmaps/part-NNNNNNN.parquet: replayed heat-maps of one batch of generations (work files)."""


LAYOUTS = {
    "file": (),
    "shards": (),
    "layer": ("layer",),
    "layer/kind": ("layer", "kind"),
}
"""How a table's files are laid out, and the partition columns each layout puts in the directory names:
file: tables/<table>.parquet; shards: tables/<table>/<shard>.parquet; layer: tables/<table>/layer=<layer>/<shard>
.parquet; layer/kind: tables/<table>/layer=<layer>/kind=<kind>/<shard>.parquet."""


ROW_GROUP_ROWS = 8192
"""Parquet row-group size of a table (TableSpec.row_group_rows): tables are sorted by unit, so a reader asking for one
unit decodes only the row groups whose unit range covers it (DuckDB and pyarrow skip the rest by their min/max
statistics)."""


@dataclass(frozen=True)
class TableSpec:
    name: str
    stage: str
    """The stage (manifest `stages` key) that writes it."""
    command: str
    """The command that (re)computes it; RUN stands for the run directory."""
    layout: str
    """A key of LAYOUTS."""
    files: str
    """File name(s) inside the table's directory (or partition directory)."""
    sort: tuple[str, ...]
    """Row order within each file (ascending); empty: the order given by `order`."""
    doc: str
    """What one row means."""
    schema: pa.Schema
    """Columns stored in the files (without the partition columns)."""
    order: str = ""
    """Row order in words, where `sort` does not say it all."""
    row_group_rows: int = ROW_GROUP_ROWS
    """Rows per Parquet row group (a reader asking for one unit decodes the row groups that hold it: tables with a
    heavy column, such as examples' heat-maps, keep them small)."""

    @property
    def partitions(self) -> tuple[str, ...]:
        """The hive partition columns (in the path, not in the files)."""
        return LAYOUTS[self.layout]

    @property
    def partitioned(self) -> bool:
        return bool(self.partitions)


EXAMPLES_ROW_GROUP_ROWS = 512
"""Row groups of the examples table: a unit page reads one unit's 8 heat-maps, and DuckDB decodes the whole row
group holding them (8192 rows: about 280 units' maps of 16x16 float32, 8 MB)."""

_ANALYZE = "python cli.py analyze --run RUN"
_PART = "part-0000000.parquet"
_BATCH = "part-<first gen_id:07d>.parquet, one per capture batch"
_SPECS = [
    TableSpec("generations", "capture", "python cli.py capture", "shards", _BATCH, ("gen_id",),
              "one generated image", GENERATIONS),
    TableSpec("steps", "capture", "python cli.py capture", "file", "steps.parquet", ("step",),
              "one denoising step", STEPS),
    TableSpec("activity", "capture", "python cli.py capture", "layer/kind",
              _BATCH + " (feature kinds: written by the features pass when the SAEs come after the capture)",
              ("unit", "step", "gen_id"), "one unit's spatial mean and max in one generation at one step "
              "(feature kinds: active features only)", ACTIVITY),
    TableSpec("sae_training", "sae", "python cli.py train-sae --run RUN", "layer/kind",
              _PART + " (kind = the SAE's kind: feature, or feature.<sae_id>)", ("step",),
              "one logged SAE training step", SAE_TRAINING),
    TableSpec("sae_metrics", "sae", "python cli.py train-sae --run RUN", "file", "sae_metrics.parquet",
              (), "one trained SAE's final metrics", SAE_METRICS,
              "the layers in the order trained (the capture's), each layer's SAEs by id (`default` first)"),
    TableSpec("profiles", "analysis", _ANALYZE, "layer/kind", _PART, ("unit", "step"),
              "one unit's activity at one step over all generations", PROFILES),
    TableSpec("units", "analysis", _ANALYZE, "layer/kind", _PART, ("unit",), "one unit's summary", UNITS),
    TableSpec("peaks", "analysis", _ANALYZE, "layer/kind", _PART, ("unit", "rank"), "one peak of a profile",
              PEAKS),
    TableSpec("examples", "analysis", _ANALYZE, "layer/kind", _PART, ("unit", "step", "rank"),
              "one top generation of a unit, overall (step -1) or at a peak step, with its heat-map", EXAMPLES,
              row_group_rows=EXAMPLES_ROW_GROUP_ROWS),
    TableSpec("range_examples", "analysis", _ANALYZE, "layer/kind", _PART, ("unit", "bin", "activation"),
              "one generation sampled from one bin of a unit's activation range", RANGE_EXAMPLES),
    TableSpec("frequencies", "analysis", _ANALYZE, "layer/kind", _PART, ("unit", "group"),
              "how often a unit is active for one prompt group", FREQUENCIES),
    TableSpec("histograms", "analysis", _ANALYZE, "layer/kind", _PART, ("unit", "stat", "lo"),
              "one bin of a unit's activation histogram (spatial max or mean per generation and step)", HISTOGRAMS),
    TableSpec("comparisons", "analysis", "python cli.py compare GROUP_A GROUP_B --run RUN", "layer/kind",
              "<group_a>-vs-<group_b>-<sha1 of the pair, 8 hex>.parquet, one per ordered pair of groups", ("rank",),
              "one unit more active for group A than for group B", COMPARISONS, "by score descending, then unit"),
    TableSpec("concepts", "analysis", _ANALYZE, "layer/kind", _PART, ("concept", "rank"),
              "one of the best units of one concept (attribute=value), by AUROC", CONCEPTS),
    TableSpec("localisation", "analysis", _ANALYZE, "layer/kind", _PART, ("rank",),
              "how well one unit's example heat-maps find the prompt's position", LOCALISATION,
              "by share descending, then examples descending, then unit"),
    TableSpec("concept_summary", "analysis", _ANALYZE, "file", "concept_summary.parquet", ("layer", "kind"),
              "concept recovery of one (layer, kind)", CONCEPT_SUMMARY),
    TableSpec("class_scores", "analysis", _ANALYZE, "layer/kind", _PART, ("unit", "rank"),
              "how well one unit tells one image class (image-classifier runs)", CLASS_SCORES),
    TableSpec("class_best", "analysis", _ANALYZE, "layer/kind", _PART, ("class",),
              "one image class's best unit, chosen on half the images and scored on the other half "
              "(image-classifier runs)", CLASS_BEST),
    TableSpec("interventions", "interventions", "python cli.py steer --run RUN --layer LAYER --kind KIND --unit UNIT",
              "layer/kind", "steer-<kind>-<unit:05d>-<spec>.parquet (steering) or edit-<spec>.parquet "
              "(feature edits, a feature kind)", (), "one steered or edited image beside its baseline",
              INTERVENTIONS, "as generated: steering, one row per seed in the order given; edits, per edit "
              "(none, frequent, rare, all, custom) then per (prompt, seed) sample"),
    TableSpec("steering_success", "interventions", "python cli.py steer-report --run RUN", "layer/kind",
              "part-<digest of the report settings>.parquet", ("concept",),
              "one concept steered through its best unit", STEERING_SUCCESS),
    TableSpec("dreams", "interventions", "python cli.py dream --run RUN --layer LAYER --kind KIND --unit UNIT",
              "layer/kind", "unit-<unit:06d>.parquet", ("step", "seed", "opt_step"),
              "one snapshot of a deep dream, at one of its target steps",
              DREAMS),
    TableSpec("atlas", "atlas", "python cli.py atlas --run RUN --layer LAYER --kind KIND --units all", "layer/kind",
              "<what>-<variant>-<first unit:06d>-<digest of the batch's units, 8 hex>.parquet, one per batch of units",
              ("unit", "seed", "target_steps"), "one unit's steered prior or deep dream for one seed (and, for "
              "dreams of one target step at a time, one target step)", ATLAS),
    TableSpec("ablations", "interventions", "python cli.py ablate --run RUN", "layer",
              "<mode>-<digest of prompts, seeds, steps, guidance>.parquet (layer = the ablated block)", (),
              "one image with one block ablated, beside its baseline", ABLATIONS,
              "per prompt, then per seed, in the order given"),
    TableSpec("class_steering", "interventions",
              "python cli.py steer-classes --run RUN --layer LAYER --kind KIND --unit UNIT", "layer/kind",
              "<kind>-<unit:05d>-<spec>.parquet", (), "one class of an image classifier at one steering strength of "
              "one unit", CLASS_STEERING, "per strength in the order given, then per class in the model's label "
              "order"),
    TableSpec("sae_comparison", "sae_compare", "python cli.py compare-saes --run RUN --layer LAYER", "layer",
              "<sae_id>.parquet, one per SAE of the layer", ("sae_id",), "one SAE's metrics on a fixed token sample "
              "of its layer, with its loss recovered and concept recovery", SAE_COMPARISON),
    TableSpec("sae_density", "sae_compare", "python cli.py compare-saes --run RUN --layer LAYER", "layer",
              "<sae_id>.parquet, one per SAE of the layer", ("lo",),
              "one bin of an SAE's activation-density histogram (log10 of its latents' firing frequency)", SAE_DENSITY),
    TableSpec("sae_matches", "sae_compare", "python cli.py compare-saes --run RUN --layer LAYER", "layer",
              "<sae_a>-vs-<sae_b>.parquet, one per ordered pair of SAEs compared", ("feature_a",),
              "one latent of SAE A and its best decoder-direction match in SAE B", SAE_MATCHES),
    TableSpec("causal_map", "causal_map", "python cli.py causal-map --run RUN", "layer",
              "<attribute>-<value>.parquet, one per concept (the map's chunk)", (),
              "one concept steered along one direction at one layer, step window and mask: its scale chosen on the "
              "selection seeds, its flip and collateral rates on the held-out seeds", CAUSAL_MAP,
              "per window, then direction, then mask, in the order of the map's settings"),
]

TABLES: dict[str, TableSpec] = {s.name: s for s in _SPECS}
"""Every table of the run format, by name, in the order docs/run-format.md lists them."""


def type_name(t: pa.DataType) -> str:
    """The type as docs/run-format.md writes it: Arrow's name, with float32/float64 and list<T>."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{type_name(t.value_type)}>"
    names = {"float": "float32", "double": "float64", "halffloat": "float16", "large_string": "string"}
    return names.get(str(t), str(t))


def format_version(manifest: dict) -> int | object:
    """A manifest's run-format version (1 when it has none)."""
    return manifest.get("format_version", 1)


def check_format_version(manifest: dict, root) -> None:
    """Raise a one-line DifflensError unless this difflens reads the run's format."""
    from backend.errors import DifflensError

    version = format_version(manifest)
    if version in READABLE_VERSIONS and not isinstance(version, bool):
        return
    newer = isinstance(version, int) and version > FORMAT_VERSION
    raise DifflensError(f"{root} was written by difflens run format {version}; this difflens reads format "
                        f"{FORMAT_VERSION}: rerun `python cli.py run-all` into a new --name (or read it with "
                        f"{'a newer' if newer else 'an older'} difflens)")


def producer(table: str, run: str = "RUN") -> str:
    """The command that computes a table, with the run directory filled in."""
    spec = TABLES.get(table)
    return spec.command.replace("RUN", run) if spec else "python cli.py run-all"


def tables_of_stage(stage: str) -> list[str]:
    return [name for name, spec in TABLES.items() if spec.stage == stage]
