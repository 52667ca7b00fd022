"""The run format's table catalogue: every table a run holds, its pyarrow schema, layout and producer.

Torch-free (the inspector imports it). docs/run-format.md is the normative description; this module is its code
form, and tests/run/test_schema.py checks that the two agree and that a demo run's files match.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

FORMAT_VERSION = 2
"""manifest.json `format_version`; a run written with another version is refused with a one-line error."""


# ------------------------------------------------------------------------------------------------ schemas

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

ABLATIONS = pa.schema([
    ("mode", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("n_steps", pa.int16()),
    ("guidance", pa.float32()), ("image", pa.string()), ("baseline_image", pa.string()), ("effect", pa.float32()),
    ("attributes", pa.string()), ("baseline_attributes", pa.string()), ("changed_attributes", pa.string()),
    ("spec", pa.string()),
])


@dataclass(frozen=True)
class TableSpec:
    name: str
    stage: str
    """The stage (manifest `stages` key) that writes it."""
    command: str
    """The command that (re)computes it; RUN stands for the run directory."""
    partitioned: bool
    """Hive-partitioned by layer=<layer>/kind=<kind>/ (the partition columns are not stored in the files)."""
    sort: tuple[str, ...]
    """Row order within each file."""
    doc: str
    """What one row means."""
    schema: pa.Schema | None = None
    """Columns stored in the files (without the partition columns)."""


_SPECS = [
    TableSpec("generations", "capture", "python cli.py capture", False, ("gen_id",), "one generated image"),
    TableSpec("steps", "capture", "python cli.py capture", False, ("step",), "one denoising step"),
    TableSpec("activity", "capture", "python cli.py capture", True, ("unit", "step", "gen_id"),
              "one unit's spatial mean and max in one generation at one step"),
    TableSpec("sae_training", "sae", "python cli.py train-sae --run RUN", True, ("step",),
              "one logged SAE training step"),
    TableSpec("sae_metrics", "sae", "python cli.py train-sae --run RUN", False, ("layer",),
              "one trained SAE's final metrics"),
    TableSpec("profiles", "analysis", "python cli.py analyze --run RUN", True, ("unit", "step"),
              "one unit's activity at one step over all generations"),
    TableSpec("units", "analysis", "python cli.py analyze --run RUN", True, ("unit",), "one unit's summary"),
    TableSpec("peaks", "analysis", "python cli.py analyze --run RUN", True, ("unit", "rank"), "one peak of a profile"),
    TableSpec("examples", "analysis", "python cli.py analyze --run RUN", True, ("unit", "step", "rank"),
              "one top generation of a unit, overall or at a peak step"),
    TableSpec("frequencies", "analysis", "python cli.py analyze --run RUN", True, ("unit", "step", "group"),
              "how often a unit is active for one prompt group at one step"),
    TableSpec("histograms", "analysis", "python cli.py analyze --run RUN", True, ("unit",),
              "one unit's activation histogram"),
    TableSpec("comparisons", "analysis", "python cli.py compare GROUP_A GROUP_B --run RUN", True, ("unit",),
              "one unit ranked for group A against group B"),
    TableSpec("concepts", "analysis", "python cli.py analyze --run RUN", True, ("concept", "rank"),
              "one unit's AUROC for one concept"),
    TableSpec("localisation", "analysis", "python cli.py analyze --run RUN", True, ("unit",),
              "how well one unit's heat-maps find the prompt's position"),
    TableSpec("concept_summary", "analysis", "python cli.py analyze --run RUN", False, ("layer", "kind"),
              "concept recovery of one (layer, kind)"),
    TableSpec("interventions", "interventions", "python cli.py steer --run RUN --layer LAYER --kind KIND --unit UNIT",
              True, ("seed",), "one steered or edited image beside its baseline", INTERVENTIONS),
    TableSpec("steering_success", "interventions", "python cli.py steer-report --run RUN", True, ("concept",),
              "one concept steered through its best unit", STEERING_SUCCESS),
    TableSpec("dreams", "interventions", "python cli.py dream --run RUN --layer LAYER --kind KIND --unit UNIT", True,
              ("step", "seed", "opt_step"), "one snapshot of a deep dream", DREAMS),
    TableSpec("ablations", "interventions", "python cli.py ablate --run RUN", True, ("seed",),
              "one image with one block skipped, beside its baseline", ABLATIONS),
]

TABLES: dict[str, TableSpec] = {s.name: s for s in _SPECS}
"""Every table of the run format, by name, in the order docs/run-format.md lists them."""


def producer(table: str, run: str = "RUN") -> str:
    """The command that computes a table, with the run directory filled in."""
    spec = TABLES.get(table)
    return spec.command.replace("RUN", run) if spec else "python cli.py run-all"


def tables_of_stage(stage: str) -> list[str]:
    return [name for name, spec in TABLES.items() if spec.stage == stage]
