"""The query layer: every read a page makes of a run. Pages (inspector/views/) and their helpers (ui.py, app.py)
import this package only; it reads precomputed tables and never computes anything heavy.

Queries take a Run and are cached on (query, run, signature, arguments) (registry.py); `.uncached` runs the SQL
every time (benchmarks). They are grouped by what they read:
  - overview.py       the run as a whole: tables, generations and groups, steps, partitions, SAE training, concepts
  - run_info.py       the manifest: stages, layers, model, step count and guidance (backend/run/manifest.py)
  - unit_list.py      the units of a (layer, kind) and moving between them (Units page, unit navigation)
  - unit_detail.py    one unit's concepts, profile, peaks, frequencies, histogram and the unit page's bundle
  - unit_examples.py  one unit's top examples with their heat-maps
  - interventions.py  steering, edits, dreams and block ablation
  - compare.py        two prompt groups
  - atlas.py          the unit atlas: every unit's prior and dreams, a grid page at a time
  - sae_compare.py    a layer's SAEs compared (`compare-saes`; imported by its page as a module)
Underneath: inspector/runs.py (runs, paths, errors), inspector/tables.py (the run format's catalogue as the inspector
reads it), inspector/db.py (the DuckDB sandbox and its cache), inspector/heatmaps.py (heat-maps in display form). This
package re-exports what pages need of them: Run, the errors, the runs directory and run discovery, run files.
"""

from inspector.queries.atlas import FLAGS as ATLAS_FLAGS
from inspector.queries.atlas import PAGE_SIZE as ATLAS_PAGE_SIZE
from inspector.queries.atlas import SORTS as ATLAS_SORTS
from inspector.queries.atlas import atlas_grid, atlas_options, atlas_partitions, concept_names, unit_atlas
from inspector.queries.compare import comparison, comparison_pairs, group_frequencies
from inspector.queries.interventions import (
    ablations,
    steering_success,
    unit_dreams,
    unit_interventions,
    unit_steering_success,
)
from inspector.queries.overview import (
    concept_summary,
    first_prompts,
    generation_counts,
    groups,
    input_images,
    partitions,
    sae_metrics,
    sae_training,
    saes,
    steps,
    tables,
)
from inspector.queries.registry import QUERIES, query
from inspector.queries.run_info import (
    analysis_done,
    analysis_status,
    captured_guidance,
    captured_steps,
    manifest,
    run_layers,
    run_model,
    stage_table,
)
from inspector.queries.unit_detail import (
    HIST_AUTO_BYTES,
    HIST_STATS,
    activation_histogram,
    activity_bytes,
    peaks,
    profile,
    unit_concepts,
    unit_frequencies,
    unit_localisation,
    unit_page,
)
from inspector.queries.unit_examples import example_count, example_counts, example_steps, examples
from inspector.queries.unit_list import live_units, neighbour, unit_range, unit_row, units
from inspector.runs import (
    InspectorError,
    Run,
    RunError,
    UnsafePath,
    display_path,
    list_runs,
    open_run,
    run_file,
    runs_root,
    safe_path,
)
from inspector.tables import TableMissing

__all__ = [
    "HIST_AUTO_BYTES", "HIST_STATS", "QUERIES", "InspectorError", "Run", "RunError", "TableMissing", "UnsafePath",
    "ablations", "activation_histogram", "activity_bytes", "analysis_done", "analysis_status", "captured_guidance",
    "captured_steps", "comparison", "comparison_pairs", "concept_summary", "display_path", "example_count",
    "example_counts", "example_steps", "examples", "first_prompts", "generation_counts", "group_frequencies",
    "groups", "input_images", "list_runs", "live_units", "manifest", "neighbour", "open_run", "partitions", "peaks",
    "profile",
    "query", "run_file", "run_layers", "run_model", "runs_root", "safe_path", "sae_metrics", "sae_training", "saes",
    "stage_table", "steering_success", "steps", "tables", "unit_concepts", "unit_dreams", "unit_frequencies",
    "unit_interventions", "unit_localisation", "unit_page", "unit_range", "unit_row", "unit_steering_success",
    "units",
]
__all__ += [
    "ATLAS_FLAGS", "ATLAS_PAGE_SIZE", "ATLAS_SORTS", "atlas_grid", "atlas_options", "atlas_partitions", "concept_names",
    "unit_atlas",
]
