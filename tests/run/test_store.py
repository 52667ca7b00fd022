"""RunStore: format_version, stage keys and begin_stage, schema conformance of every table write, atomic writes."""

import hashlib
import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backend import fileio
from backend.errors import DifflensError
from backend.run import schema
from backend.run.store import RunStore, conform, stage_key
from sae.io import save_sae


@pytest.fixture
def store(tmp_path):
    s = RunStore(tmp_path / "run")
    s.root.mkdir()
    return s


def temporaries(root):
    return sorted(p.name for p in root.rglob("*.tmp"))


# ------------------------------------------------------------------------------------------------ format_version


def test_write_manifest_always_writes_the_format_version(store):
    store.write_manifest({"config": {}, "stages": {}})
    assert json.loads((store.root / "manifest.json").read_text())["format_version"] == schema.FORMAT_VERSION == 3
    store.write_manifest({"config": {}, "format_version": 1})  # a manifest read from an old run is relabelled
    assert store.read_manifest()["format_version"] == 3
    store.update_stage("capture", status="done")
    assert store.read_manifest()["format_version"] == 3


def test_a_format_1_run_is_read_as_it_is(store):
    old = {"config": {"model": "demo"}, "stages": {"capture": {"status": "done"}}}  # no format_version: format 1
    (store.root / "manifest.json").write_text(json.dumps(old))
    assert store.read_manifest() == old
    assert schema.format_version(old) == 1


@pytest.mark.parametrize("version", [4, 0, "2", None])
def test_another_format_is_a_one_line_error(store, version):
    (store.root / "manifest.json").write_text(json.dumps({"format_version": version, "stages": {}}))
    with pytest.raises(DifflensError) as err:
        store.read_manifest()
    message = str(err.value)
    assert "\n" not in message
    assert f"{store.root} was written by difflens run format {version}; this difflens reads format 3" in message
    assert "python cli.py run-all" in message and "--name" in message
    if version == 4:
        assert "a newer difflens" in message


def test_no_manifest_is_none(store):
    assert store.read_manifest() is None


# ------------------------------------------------------------------------------------------------ stage keys


def test_stage_key_is_sha256_of_the_canonical_json():
    inputs = {"config": {"b": 1, "a": [1, 2.5, "x"]}, "capture": "0123456789abcdef"}
    canonical = '{"capture":"0123456789abcdef","config":{"a":[1,2.5,"x"],"b":1}}'
    assert stage_key(inputs) == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert stage_key({"capture": "0123456789abcdef", "config": {"a": [1, 2.5, "x"], "b": 1}}) == stage_key(inputs)
    assert stage_key({**inputs, "capture": "other"}) != stage_key(inputs)
    assert len(stage_key(None)) == 16 and all(c in "0123456789abcdef" for c in stage_key(None))
    with pytest.raises(TypeError):
        stage_key({"path": object()})  # inputs must be JSON


def test_begin_stage_new_key_clears_markers_outputs_and_record(store):
    assert store.begin_stage("analysis", "k1", started=1.0, results={"old": 1}) is True  # never ran: from scratch
    record = store.read_manifest()["stages"]["analysis"]
    assert record == {"status": "running", "key": "k1", "started": 1.0, "results": {"old": 1}}
    store.mark_batch_done("analysis", "profiles")
    store.update_stage("analysis", status="done", finished=2.0)
    out = store.root / "tables" / "profiles" / "layer=l" / "kind=channel"
    out.mkdir(parents=True)
    (out / "part-0000000.parquet").write_bytes(b"x")
    (store.root / "tables" / "concept_summary.parquet").write_bytes(b"x")

    # same key: resume, markers and outputs kept, record updated
    assert store.begin_stage("analysis", "k1", clear=["tables/profiles"], started=3.0) is False
    assert store.batch_done("analysis", "profiles")
    assert out.exists()
    record = store.read_manifest()["stages"]["analysis"]
    assert record["status"] == "running" and record["started"] == 3.0 and record["results"] == {"old": 1}

    # another key: markers, the listed outputs and the old record go
    other_marker = store.root / "_done" / "capture" / "part-0000000.json"
    store.mark_batch_done("capture", "part-0000000")
    changed = store.begin_stage("analysis", "k2", clear=["tables/profiles", "tables/concept_summary.parquet",
                                                         "media/plots"], started=4.0)
    assert changed is True
    assert not store.batch_done("analysis", "profiles")
    assert not (store.root / "tables" / "profiles").exists()
    assert not (store.root / "tables" / "concept_summary.parquet").exists()
    assert other_marker.exists()  # other stages untouched
    assert store.read_manifest()["stages"]["analysis"] == {"status": "running", "key": "k2", "started": 4.0}


def test_begin_stage_refuses_to_clear_outside_the_run(store, tmp_path):
    outside = tmp_path / "keep.txt"
    outside.write_text("x")
    with pytest.raises(ValueError, match="not inside the run directory"):
        store.begin_stage("analysis", "k", clear=["../keep.txt"])
    assert outside.exists()


def test_begin_stage_on_a_stale_stage_starts_from_scratch(store):
    store.begin_stage("features", "k")
    store.mark_batch_done("features", "part-0000000")
    store.update_stage("features", status="stale", key=None, stale_because="the SAE of l was replaced")
    assert store.begin_stage("features", "k") is True
    assert not store.batch_done("features", "part-0000000")
    assert "stale_because" not in store.read_manifest()["stages"]["features"]


# ------------------------------------------------------------------------------------------------ schema conformance


def steps_table(**over):
    cols = {"step": np.arange(3, dtype=np.int64), "timestep": np.array([999.0, 500.0, 0.0])}
    return pa.table({**cols, **over})


def test_tables_are_cast_to_their_schema(store):
    path = store.write_table("steps", steps_table())  # int64 and float64 in
    assert pq.read_schema(path).equals(schema.STEPS)
    data = pa.table({"timestep": pa.array([1.0], pa.float64()), "step": pa.array([0], pa.int64())})  # reordered
    assert conform("steps", data).schema.equals(schema.STEPS)
    gens = pa.table({"gen_id": [0], "prompt": pa.array(["a"], pa.large_string()), "seed": [1], "group": ["g"],
                     "attributes": ["{}"], "image": ["images/000000.png"], "n_steps": [3], "guidance": [1.0],
                     "negative_prompt": pa.nulls(1, pa.string()), "control_image": ["c.png"],
                     "image_path": pa.nulls(1, pa.string()), "class_label": pa.nulls(1, pa.string())})
    path = store.write_table_shard("generations", "part-0000000", gens)
    assert pq.read_schema(path).equals(schema.GENERATIONS)
    empty = pa.table({k: np.array([], np.float32) for k in schema.ACTIVITY.names})  # an empty feature shard
    path = store.write_table_shard("activity", "part-0000000", empty, layer="l", kind="feature")
    assert path == store.root / "tables/activity/layer=l/kind=feature/part-0000000.parquet"
    assert pq.read_schema(path).equals(schema.ACTIVITY)


@pytest.mark.parametrize("data, words", [
    (steps_table().drop(["timestep"]), ["'steps'", "missing ['timestep']"]),
    (steps_table(extra=[1, 2, 3]), ["'steps'", "unexpected ['extra']"]),
])
def test_columns_that_differ_from_the_schema_are_a_value_error(store, data, words):
    with pytest.raises(ValueError) as err:
        store.write_table("steps", data)
    assert all(w in str(err.value) for w in words)
    assert not (store.root / "tables").exists()


def test_a_cast_that_changes_values_is_a_value_error(store):
    with pytest.raises(ValueError, match=r"'steps': column 'step'"):
        store.write_table("steps", steps_table(step=np.array([0, 1, 70000])))  # out of int16
    with pytest.raises(ValueError, match="'steps'"):
        store.write_table("steps", steps_table(step=np.array([0.5, 1.0, 2.0])))  # a fraction into an integer


def test_unknown_tables_and_wrong_layouts_are_value_errors(store):
    with pytest.raises(ValueError, match="'nope' is not a table"):
        store.write_table_shard("nope", "part-0000000", steps_table())
    with pytest.raises(ValueError, match="'nope' is not a table"):
        store.write_table("nope", steps_table())
    with pytest.raises(ValueError, match="use write_table_shard"):
        store.write_table("activity", steps_table())
    with pytest.raises(ValueError, match="use write_table"):
        store.write_table_shard("steps", "part-0000000", steps_table())
    ablation = store.table_from_rows("ablations", [{"mode": "skip", "seed": 0}])
    with pytest.raises(ValueError, match=r"takes partition columns \['layer'\]"):
        store.write_table_shard("ablations", "skip-x", ablation, layer="b", kind="channel")
    with pytest.raises(ValueError, match=r"\['layer', 'kind'\]"):
        store.write_table_shard("activity", "part-0000000", steps_table(), layer="l")
    path = store.write_table_shard("ablations", "skip-x", ablation, layer="b")
    assert path == store.root / "tables/ablations/layer=b/skip-x.parquet"


def test_write_parquet_under_tables_conforms_too(store):
    with pytest.raises(ValueError, match="'ablations'"):
        store.write_parquet(store.table_dir("ablations") / "layer=b" / "skip-x.parquet", steps_table())
    path = store.write_parquet(store.root / "tables" / "steps.parquet", steps_table())
    assert pq.read_schema(path).equals(schema.STEPS)
    work = store.write_parquet(store.root / "_work" / "x.parquet", steps_table())  # not a table: as given
    assert pq.read_schema(work).field("step").type == pa.int64()


def test_table_from_rows_fills_absent_columns_with_null(store):
    t = store.table_from_rows("sae_metrics", [{"layer": "l", "fvu": 0.1, "tokens": 5}])
    assert t.schema.equals(schema.SAE_METRICS)
    assert t.column("frac_loss_recovered").null_count == 1
    with pytest.raises(ValueError, match="unexpected"):
        store.table_from_rows("sae_metrics", [{"layer": "l", "bogus": 1}])


def test_token_shards_use_the_token_index_schema(store):
    index = pa.table({"position": np.arange(2), "gen_id": np.zeros(2, np.int64), "step": np.zeros(2, np.int64)})
    store.write_token_shard("l", "part-0000000", np.zeros((2, 3), np.float32), index)
    assert pq.read_schema(store.activations_dir("l") / "part-0000000.parquet").equals(schema.TOKEN_INDEX)
    with pytest.raises(ValueError, match="token index"):
        store.write_token_shard("l", "part-0000002", np.zeros((1, 3)), pa.table({"gen_id": [0]}))
    assert not (store.activations_dir("l") / "part-0000002.npy").exists()


# ------------------------------------------------------------------------------------------------ atomic writes


def test_a_failed_write_leaves_neither_file_nor_temporary(store, monkeypatch):
    target = store.root / "tables" / "steps.parquet"

    def half_then_fail(table, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        store.write_table("steps", steps_table())
    assert not target.exists()
    assert temporaries(store.root) == []

    def boom(path):
        path.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        fileio.atomic_write_with(store.root / "a.json", boom)
    assert not (store.root / "a.json").exists() and temporaries(store.root) == []


def test_a_failed_rewrite_keeps_the_old_file(store, monkeypatch):
    store.write_manifest({"stages": {}})
    before = (store.root / "manifest.json").read_text()
    monkeypatch.setattr(fileio.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(ValueError("no")))
    with pytest.raises(ValueError):
        store.write_manifest({"stages": {"x": {}}})
    assert (store.root / "manifest.json").read_text() == before
    assert temporaries(store.root) == []


def test_temporaries_are_hidden_and_removed_by_the_next_writer(store):
    with fileio.atomic_path(store.root / "images" / "000000.png", suffix=".png") as tmp:
        assert tmp.name.startswith(".000000.png.") and tmp.name.endswith(".png.tmp")
        assert tmp.parent == store.root / "images"
        leftover = tmp.with_name(".part-0000000.parquet.abc.parquet.tmp")
        leftover.write_bytes(b"x")  # what a killed writer leaves
        tmp.write_bytes(b"png")
    assert (store.root / "images" / "000000.png").read_bytes() == b"png"
    assert store.remove_stale_temporaries() == 1
    assert temporaries(store.root) == []


# ------------------------------------------------------------------------------------------------ SAE layout


def test_several_saes_per_layer_and_a_format_2_layer_read_as_default(store):
    from intervention_runs import random_sae

    from backend.run.context import RunContext

    root = store.root
    assert store.sae_dir("a") == root / "sae" / "a" / "default" and store.sae_dir("a", "k8") == root / "sae/a/k8"
    save_sae(random_sae(), store.sae_dir("a"))
    save_sae(random_sae(), store.sae_dir("a", "k8"))
    legacy = root / "sae" / "b"  # format 2: the layer's one SAE in sae/<layer>/, an export beside it
    save_sae(random_sae(), legacy)
    (legacy / "saelens").mkdir()
    (legacy / "saelens" / "cfg.json").write_text("{}")
    save_sae(random_sae(), legacy / "k4")  # an SAE added to a format-2 layer
    assert store.saes() == [("a", "default"), ("a", "k8"), ("b", "default"), ("b", "k4")]
    assert store.sae_dir("b") == legacy and store.sae_dir("b", "k4") == legacy / "k4"
    store.write_manifest({"config": {}, "stages": {}})
    ctx = RunContext(store, store.read_manifest())
    assert ctx.sae("b").cfg.n_latents == ctx.sae("b", "feature.k4").cfg.n_latents == 128
    assert ctx.feature_kinds("a") == ["feature", "feature.k8"] and ctx.check_kind("b", "feature.k4") == "feature.k4"
    with pytest.raises(DifflensError, match=r"no SAE for a with id 'k4'.*a:default, a:k8, b:default, b:k4"):
        ctx.check_kind("a", "feature.k4")
    with pytest.raises(DifflensError, match="unknown unit kind 'feature.K4'"):
        ctx.check_kind("a", "feature.K4")


def test_parquet_files_delta_encode_integers_and_dictionary_encode_the_rest_but_floats(tmp_path):
    table = pa.table({"unit": pa.array([1, 2, 1, 2] * 50, pa.int32()), "name": ["a", "b"] * 100,
                      "mean": np.linspace(0, 1, 200, dtype=np.float32),
                      "heatmap": pa.array([[0.5, 1.5]] * 200, pa.list_(pa.float32()))})
    path = RunStore(tmp_path).write_parquet(tmp_path / "t.parquet", table)
    row_group = pq.ParquetFile(path).metadata.row_group(0)
    columns = [row_group.column(i) for i in range(row_group.num_columns)]
    assert {c.path_in_schema: c.has_dictionary_page for c in columns} == {
        "unit": False, "name": True, "mean": False, "heatmap.list.element": False}
    assert "DELTA_BINARY_PACKED" in columns[0].encodings
    assert pq.read_table(path).equals(table)
    assert duckdb.sql("SELECT sum(unit), count(*) FROM read_parquet(?) WHERE unit = 2",
                      params=[str(path)]).fetchall() == [(200, 100)]


def test_a_tables_row_groups_follow_its_catalogue_entry(tmp_path):
    """examples (heat-maps) in small row groups, so a unit page decodes few maps; other tables in 8192-row ones."""
    from backend.run.schema import EXAMPLES_ROW_GROUP_ROWS, ROW_GROUP_ROWS, TABLES

    store = RunStore(tmp_path)
    for table, rows in (("examples", EXAMPLES_ROW_GROUP_ROWS), ("peaks", ROW_GROUP_ROWS)):
        n = 3 * rows
        data = pa.Table.from_pylist([{}] * n, schema=TABLES[table].schema)
        data = data.set_column(data.schema.get_field_index("unit"), "unit", pa.array(np.arange(n), pa.int32()))
        path = store.write_table_shard(table, "part-0000000", data, layer="L", kind="channel")
        meta = pq.ParquetFile(path).metadata
        assert meta.num_row_groups == 3 and meta.row_group(0).num_rows == rows
