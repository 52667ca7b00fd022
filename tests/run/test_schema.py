"""The table catalogue (backend/run/schema.py), docs/run-format.md and the files a real run writes agree."""

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from capture_runs import make_cfg

from backend.run import schema
from backend.run.prompts import DEMO_PROMPTS
from backend.run.store import RunStore

DOC = Path(__file__).resolve().parents[2] / "docs" / "run-format.md"

# The tables the small run below writes itself; the others are written by the interventions stage, which it
# skips (too slow for this test): interventions, steering_success, dreams and ablations. Their files are
# covered by test_tables_written_through_the_store_match_their_schemas (RunStore casts every table file to its
# schema, and tests/interventions/ run the real writers through it).
RUN_TABLES = {"generations", "steps", "activity", "sae_training", "sae_metrics", "profiles", "units", "peaks",
              "examples", "range_examples", "frequencies", "histograms", "comparisons", "concepts", "localisation",
              "concept_summary",
              "atlas"}


def doc_tables() -> dict[str, list[tuple[str, str]]]:
    """{table: [(column, type), ...]} as docs/run-format.md lists them (the `### \\`table\\`` sections of its
    "## Tables" chapter, each with a `| \\`column\\` | \\`type\\` | meaning |` table)."""
    text = DOC.read_text()
    chapter = text.split("\n## Tables\n", 1)[1].split("\n## ", 1)[0]
    out = {}
    for section in re.split(r"\n(?=### )", chapter)[1:]:
        name = re.match(r"### `([a-z_]+)`\n", section)
        assert name, f"a table heading that is not ### `name`: {section.splitlines()[0]!r}"
        out[name.group(1)] = re.findall(r"^\| `([a-z_0-9]+)` \| `([^`]+)` \|", section, re.M)
    return out


def test_every_table_has_a_schema_and_a_layout():
    assert schema.FORMAT_VERSION == 3
    for name, spec in schema.TABLES.items():
        assert spec.name == name
        assert isinstance(spec.schema, pa.Schema) and len(spec.schema) > 0, name
        assert spec.layout in schema.LAYOUTS, name
        assert not set(spec.partitions) & set(spec.schema.names), f"{name}: partition columns are not in files"
        assert set(spec.sort) <= set(spec.schema.names), name
        assert spec.sort or spec.order, f"{name}: say the row order"
        assert len(set(spec.schema.names)) == len(spec.schema), name
        assert spec.files and spec.doc and spec.command.startswith("python cli.py "), name


def test_the_doc_names_every_table_and_column_with_its_type():
    documented = doc_tables()
    assert sorted(set(documented) - set(schema.TABLES)) == [], "tables in the doc but not in the catalogue"
    assert sorted(set(schema.TABLES) - set(documented)) == [], "tables in the catalogue but not in the doc"
    assert list(documented) == list(schema.TABLES), "the doc lists the tables in catalogue order"
    for name, spec in schema.TABLES.items():
        want = [(f.name, schema.type_name(f.type)) for f in spec.schema]
        assert documented[name] == want, f"docs/run-format.md, table {name}: columns/types differ from the schema"


def test_the_doc_states_each_tables_layout_sort_and_stage():
    text = DOC.read_text()
    for name, spec in schema.TABLES.items():
        section = text.split(f"### `{name}`\n", 1)[1].split("\n### ", 1)[0]
        assert f"Layout: `{spec.layout}`" in section, name
        assert f"the `{spec.stage}` stage" in section, name
        assert spec.files in section, name
        sort = ", ".join(f"`{c}`" for c in spec.sort) or spec.order
        assert f"Sort: {sort}" in section, name
    assert f"This is run format **{schema.FORMAT_VERSION}**." in text
    for word in ("format_version", "stages.<stage>.key", "_done/<stage>/<batch>.json", "_work/analysis/heatmaps",
                 "meta.json", "sae.safetensors", "cfg.json", "media/plots", "media/steer", "media/edit",
                 "media/dreams", "media/ablation", "media/compare", "images/<gen_id:06d>.png", "begin_stage",
                 "code that disagrees with this document is a bug"):
        assert word in text, word
    for col in list(schema.TOKEN_INDEX.names) + list(schema.HEATMAP_WORK.names):
        assert f"`{col}`" in text, col


def file_schema_problems(root: Path) -> tuple[set[str], list[str]]:
    """(tables seen, problems) for every Parquet file under root/tables."""
    seen, problems = set(), []
    for path in sorted((root / "tables").rglob("*.parquet")):
        rel = path.relative_to(root / "tables")
        name = rel.parts[0].removesuffix(".parquet")
        spec = schema.TABLES.get(name)
        if spec is None:
            problems.append(f"{rel}: not a table of the catalogue")
            continue
        seen.add(name)
        partitions = [p.split("=", 1)[0] for p in rel.parts[1:-1]]
        if spec.layout == "file" and len(rel.parts) != 1 or partitions != list(spec.partitions):
            problems.append(f"{rel}: not laid out as {spec.layout}")
        got = pq.read_schema(path).remove_metadata()
        if not got.equals(spec.schema):
            problems.append(f"{rel}: {got} differs from {spec.schema}")
    return seen, problems


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """capture -> sae (with its splice test) -> features -> analysis on the demo model: 8 prompts x 1 image x
    3 steps, one layer, a tiny SAE."""
    from backend.stages.pipeline import run_all

    prompts = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    prompts.write_text("\n".join(DEMO_PROMPTS.read_text().splitlines()[::45]) + "\n")
    cfg = make_cfg("demo", prompts, tmp_path_factory.mktemp("runs"), images_per_prompt=1, steps=3,
                   layers=["mid_block.attentions.0"])
    cfg.sae.expansion, cfg.sae.k, cfg.sae.total_tokens, cfg.sae.batch_size = 2, 4, 2048, 256
    cfg.sae.splice_samples = 2
    cfg.analysis.examples_top_n = 2
    cfg.interventions.enabled = False
    cfg.atlas.units, cfg.dream.opt_steps, cfg.dream.seeds, cfg.prior.seeds = "top:1", 2, [0], [0]
    run_all(cfg, progress=False)
    return cfg.out_dir


@pytest.mark.slow
def test_a_small_runs_files_match_the_schemas(small_run):
    seen, problems = file_schema_problems(small_run)
    assert problems == []
    assert seen == RUN_TABLES
    manifest = RunStore(small_run).read_manifest()
    assert manifest["format_version"] == schema.FORMAT_VERSION
    for stage in ("capture", "sae", "features", "analysis"):
        assert manifest["stages"][stage]["status"] == "done", stage
        assert re.fullmatch(r"[0-9a-f]{16}", manifest["stages"][stage].get("key") or ""), f"{stage} has no key"
    tokens = sorted((small_run / "activations" / "mid_block.attentions.0").glob("part-*.parquet"))
    assert tokens and all(pq.read_schema(p).remove_metadata().equals(schema.TOKEN_INDEX) for p in tokens)


def test_tables_written_through_the_store_match_their_schemas(tmp_path):
    """Every table, written the way its writer writes it (rows with Python values, partitioned as its layout
    says), lands with exactly its schema; this covers interventions, steering_success, dreams and ablations,
    which the small run above does not write."""
    store = RunStore(tmp_path)
    samples = {pa.int16(): 3, pa.int32(): 7, pa.int64(): 11, pa.float32(): 0.5, pa.float64(): 0.25,
               pa.string(): "x", pa.bool_(): True, pa.list_(pa.int32()): [1, 2], pa.list_(pa.int16()): [1],
               pa.list_(pa.float32()): [0.5, 1.0]}
    for name, spec in schema.TABLES.items():
        rows = [{f.name: samples[f.type] for f in spec.schema}]
        data = pa.Table.from_pylist(rows)  # inferred types: int64, double, string, list<int64> ...
        if spec.layout == "file":
            store.write_table(name, data)
        else:
            parts = {"layer": "mid_block.attentions.0", "kind": "feature"}
            store.write_table_shard(name, "part-0000000", data, **{p: parts[p] for p in spec.partitions})
    seen, problems = file_schema_problems(tmp_path)
    assert problems == []
    assert seen == set(schema.TABLES)
