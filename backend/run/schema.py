"""The run format's table catalogue: every table a run holds, its pyarrow schema, layout and producer.

Torch-free (the inspector imports it). docs/run-format.md is the normative description; this module is its code
form, and tests/run/test_schema.py checks that the two agree and that a demo run's files match.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

FORMAT_VERSION = 2
"""manifest.json `format_version`; a run written with another version is refused with a one-line error."""


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
              True, ("seed",), "one steered or edited image beside its baseline"),
    TableSpec("steering_success", "interventions", "python cli.py steer-report --run RUN", True, ("concept",),
              "one concept steered through its best unit"),
    TableSpec("dreams", "interventions", "python cli.py dream --run RUN --layer LAYER --kind KIND --unit UNIT", True,
              ("step", "seed", "opt_step"), "one snapshot of a deep dream"),
    TableSpec("ablations", "interventions", "python cli.py ablate --run RUN", True, ("seed",),
              "one image with one block skipped, beside its baseline"),
]

TABLES: dict[str, TableSpec] = {s.name: s for s in _SPECS}
"""Every table of the run format, by name, in the order docs/run-format.md lists them."""


def producer(table: str, run: str = "RUN") -> str:
    """The command that computes a table, with the run directory filled in."""
    spec = TABLES.get(table)
    return spec.command.replace("RUN", run) if spec else "python cli.py run-all"


def tables_of_stage(stage: str) -> list[str]:
    return [name for name, spec in TABLES.items() if spec.stage == stage]
