"""compare-saes (backend/analysis/sae_compare.py, sae_stats.py, sae_match.py): on a small demo run with two SAEs on
one layer, the metrics against a direct computation over the same tokens, the splice test against the sae stage's,
decoder matching (itself, a permuted copy), the density histogram, the tables and figure, the CLI and its one-line
errors (which leave the run as it was)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch
from capture_runs import make_cfg
from run_snapshots import tree_digest
from typer.testing import CliRunner

from backend.analysis.sae_compare import SAECompareConfig, compare_saes, layer_saes
from backend.analysis.sae_match import best_matches
from backend.analysis.sae_stats import DENSE_FREQ, density_edges, density_histogram
from backend.errors import DifflensError
from backend.run.config import SAEStageConfig
from backend.run.schema import sae_path
from cli import app
from sae.io import load_sae, save_sae
from sae.model import SAE, SAEConfig

LAYER, OTHER = "up_blocks.1.attentions.1", "mid_block.attentions.0"
SPLICE = 2


def _train_cfg(**kw) -> SAEStageConfig:
    base = dict(expansion=2, k=8, total_tokens=10_000, batch_size=512, lr=3e-3, warmup_steps=5, log_every=10,
                splice_samples=SPLICE, record_features=False)
    return SAEStageConfig(**(base | kw))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A demo capture with the sae stage's SAE on both layers and a second SAE (k = 4, expansion 4, trained with the
    same trainer) at sae/<LAYER>/k4/."""
    from backend.run.prompts import DEMO_PROMPTS
    from backend.stages.capture import capture
    from backend.stages.sae import train_saes
    from sae.data import ShardReader
    from sae.train import train

    prompts = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    prompts.write_text("\n".join(DEMO_PROMPTS.read_text().splitlines()[::40]) + "\n")
    cfg = make_cfg("demo", prompts, tmp_path_factory.mktemp("runs"), steps=3)
    capture(cfg, progress=False)
    train_saes(cfg.out_dir, _train_cfg(layers=[LAYER]), progress=False)
    train_saes(cfg.out_dir, _train_cfg(layers=[OTHER], splice_samples=0), progress=False)
    second = _train_cfg(expansion=4, k=4, seed=1).train_config()
    result = train(ShardReader.from_dir(cfg.out_dir / "activations" / LAYER, 512, seed=1), second, layer=LAYER,
                   progress=False)
    save_sae(result.sae, cfg.out_dir / "sae" / LAYER / "k4")
    return cfg.out_dir


@pytest.fixture(scope="module")
def compared(run):
    """compare-saes over every token of the layer (the sample is all of them) with the splice test."""
    return compare_saes(run, LAYER, SAECompareConfig(samples=10**9, batch_size=100, splice_samples=SPLICE),
                        progress=False)


def _all_tokens(run, layer: str = LAYER) -> torch.Tensor:
    from sae.data import as_float32

    shards = sorted((run / "activations" / layer).glob("part-*.npy"))
    return torch.from_numpy(np.concatenate([as_float32(np.load(s)) for s in shards]))


def _table(run, name: str) -> pl.DataFrame:
    return pl.read_parquet(run / "tables" / name / "**" / "*.parquet", hive_partitioning=True)


# ------------------------------------------------------------------------------------------------ the SAEs


def test_layer_saes_reads_both_layouts(tmp_path):
    def sae_dir(path):
        path.mkdir(parents=True)
        (path / "cfg.json").write_text("{}")
        (path / "sae.safetensors").write_bytes(b"")

    base = tmp_path / "sae" / LAYER
    sae_dir(base)  # a format-2 run's only SAE, at sae/<layer>/ itself
    sae_dir(base / "wide")
    (base / "saelens").mkdir()  # an export: not one of ours
    (base / "saelens" / "cfg.json").write_text("{}")
    assert layer_saes(tmp_path, LAYER) == [("default", base), ("wide", base / "wide")]
    sae_dir(tmp_path / "sae" / OTHER / "default")
    sae_dir(tmp_path / "sae" / OTHER / "a")
    assert [i for i, _ in layer_saes(tmp_path, OTHER)] == ["default", "a"]
    assert layer_saes(tmp_path, "nowhere") == []


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_agree_with_a_direct_computation(run, compared):
    x = _all_tokens(run).double()
    rows = {r["sae_id"]: r for r in compared["rows"]}
    assert list(rows) == ["default", "k4"]
    for sae_id, directory in layer_saes(run, LAYER):
        sae = load_sae(directory)
        with torch.no_grad():
            codes = sae.encode(x.float(), dense=True).double()
            x_hat = sae(x.float()).double()
        fvu = float(((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        freq = (codes > 0).double().mean(0).numpy()
        r = rows[sae_id]
        assert r["tokens"] == x.shape[0]
        assert r["fvu"] == pytest.approx(fvu, rel=1e-6)
        assert r["l0"] == pytest.approx(float((codes > 0).sum(1).double().mean()), rel=1e-9)
        assert r["dead"] == int((freq == 0).sum()) and r["dead_frac"] == pytest.approx((freq == 0).mean())
        assert r["dense_frac"] == pytest.approx((freq > DENSE_FREQ).mean())
        assert r["n_latents"] == sae.cfg.n_latents and r["k"] == sae.cfg.k
        assert r["kind"] == ("feature" if sae_id == "default" else "feature.k4")
        density = _table(run, "sae_density").filter(pl.col("sae_id") == sae_id).sort("lo")
        assert int(density["count"].sum()) + r["dead"] == sae.cfg.n_latents
        expect, _ = np.histogram(np.log10(freq[freq > 0]), density_edges(x.shape[0]))
        assert density["count"].to_list() == expect.tolist()
    assert rows["k4"]["l0"] <= 4 < rows["default"]["l0"] <= 8


def test_loss_recovered_is_the_sae_stage_splice_test(run, compared):
    """The default SAE's splice test on the same generations gives the number the sae stage recorded."""
    stage = json.loads((sae_path(run, LAYER) / "cfg.json").read_text())["metrics"]
    rows = {r["sae_id"]: r for r in compared["rows"]}
    assert rows["default"]["splice_samples"] == stage["splice_samples"] > 0
    assert rows["default"]["frac_loss_recovered"] == pytest.approx(stage["frac_loss_recovered"], rel=1e-5)
    assert rows["k4"]["loss_clean"] == pytest.approx(rows["default"]["loss_clean"], rel=1e-6)
    assert rows["k4"]["loss_clean"] < rows["k4"]["loss_spliced"] < rows["k4"]["loss_zero"]


def test_tables_and_figure_are_written(run, compared):
    metrics = _table(run, "sae_comparison")
    assert metrics["layer"].unique().to_list() == [LAYER] and sorted(metrics["sae_id"]) == ["default", "k4"]
    assert metrics["concepts"].is_null().all()  # this run was not analysed
    matches = _table(run, "sae_matches")
    n = {i: load_sae(d).cfg.n_latents for i, d in layer_saes(run, LAYER)}
    for (a, b), group in matches.group_by(["sae_a", "sae_b"]):
        assert group.height == n[a] and group["feature_a"].sort().to_list() == list(range(n[a]))
        assert group["feature_b"].is_between(0, n[b] - 1).all() and group["cosine"].is_between(-1, 1.0001).all()
    assert compared["figure"].is_file() and compared["figure"].stat().st_size > 5000
    last = json.loads((run / "manifest.json").read_text())["stages"]["sae_compare"]["last"]
    assert last["saes"] == ["default", "k4"] and last["layer"] == LAYER


def test_concept_recovery_is_read_for_each_sae_kind(run, tmp_path):
    from backend.run.store import RunStore

    copy = tmp_path / "r"
    shutil.copytree(run, copy)
    store = RunStore(copy)
    store.write_table("concept_summary", store.table_from_rows("concept_summary", [
        {"layer": LAYER, "kind": "feature.k4", "concepts": 3, "mean_best_auroc": 0.75},
        {"layer": LAYER, "kind": "channel", "concepts": 3, "mean_best_auroc": 0.6}]))
    out = compare_saes(copy, LAYER, SAECompareConfig(samples=500, splice_samples=0), progress=False)
    rows = {r["sae_id"]: r for r in out["rows"]}
    assert rows["k4"]["concepts"] == 3 and rows["k4"]["mean_best_auroc"] == 0.75
    assert rows["default"]["mean_best_auroc"] is None and rows["default"]["frac_loss_recovered"] is None
    assert rows["k4"]["tokens"] == 500


# ------------------------------------------------------------------------------------------------ matching


def test_matching_an_sae_with_itself_is_the_identity():
    w = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)) * 3
    index, cosine = best_matches(w, w)
    assert index.tolist() == list(range(300))
    assert torch.allclose(cosine, torch.ones(300), atol=1e-5)


def test_a_permuted_copy_is_matched_back_in_small_blocks():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(257, 12, generator=gen)
    perm = torch.randperm(257, generator=gen)
    blocks = []
    index, cosine = best_matches(w, w[perm] * 0.5, block_elems=257 * 10, on_block=blocks.append)
    assert (perm[index] == torch.arange(257)).all()  # A's latent i is B's latent index[i], which holds w[i]
    assert torch.allclose(cosine, torch.ones(257), atol=1e-5)
    assert sum(blocks) == 257 and len(blocks) == 26  # 10 rows per block


def test_a_permuted_copy_in_the_run_matches_back_with_equal_metrics(run, tmp_path):
    copy = tmp_path / "r"
    shutil.copytree(run, copy)
    sae = load_sae(sae_path(copy, LAYER))
    perm = torch.randperm(sae.cfg.n_latents, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for name in ("W_dec", "W_enc_T", "b_enc"):
            getattr(sae, name).copy_(getattr(sae, name)[perm])
    save_sae(sae, copy / "sae" / LAYER / "perm")
    out = compare_saes(copy, LAYER, SAECompareConfig(saes=["default", "perm"], samples=800, splice_samples=0),
                       progress=False)
    rows = {r["sae_id"]: r for r in out["rows"]}
    for key in ("fvu", "l0", "dead", "dense_frac"):
        assert rows["perm"][key] == pytest.approx(rows["default"][key], rel=1e-6), key
    matched = pl.read_parquet(copy / "tables" / "sae_matches" / f"layer={LAYER}" / "perm-vs-default.parquet")
    assert matched["feature_b"].to_list() == perm.tolist()
    assert matched["cosine"].min() > 0.99999
    assert out["matches"][("default", "perm")]["above_0.9"] == 1.0
    assert set(out["matches"]) == {("default", "perm"), ("perm", "default")}  # --saes: k4 left out


def test_density_histogram_counts_every_latent():
    freq = np.array([0, 0, 1 / 1000, 0.01, 0.5, 1.0])
    counts, dead = density_histogram(freq, density_edges(1000))
    assert dead == 2 and counts.sum() == 4 and counts.sum() + dead == len(freq)
    assert density_edges(1000)[0] == -3 and density_edges(1000)[-1] == 0


# ------------------------------------------------------------------------------------------------ bad input, CLI


@pytest.mark.parametrize(("args", "message"), [
    ([OTHER], "has one SAE (default); comparing needs two or more: add one with `python cli.py train-sae"),
    ([LAYER, ["default", "nope"]], "unknown SAE 'nope' for up_blocks.1.attentions.1; its SAEs: default, k4"),
    ([LAYER, ["k4"]], "--saes names 1 SAE; compare two or more of default, k4"),
    (["down_blocks.9"], "unknown layer 'down_blocks.9'"),
])
def test_bad_input_is_one_line_and_changes_nothing(run, args, message):
    before = tree_digest(run)
    cfg = SAECompareConfig(saes=args[1] if len(args) > 1 else [], splice_samples=0)
    with pytest.raises(DifflensError) as exc:
        compare_saes(run, args[0], cfg, progress=False)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert tree_digest(run) == before


def test_an_sae_of_another_width_is_refused(run, tmp_path):
    copy = tmp_path / "r"
    shutil.copytree(run, copy)
    save_sae(SAE(SAEConfig(d_in=32, n_latents=64, k=4)), copy / "sae" / LAYER / "wrong")
    before = tree_digest(copy)
    with pytest.raises(DifflensError, match="takes 32 channels but up_blocks.1.attentions.1 has 64; it was trained on "
                                            "another layer"):
        compare_saes(copy, LAYER, SAECompareConfig(splice_samples=0), progress=False)
    assert tree_digest(copy) == before


def test_cli_prints_the_metrics_and_where_they_went(run, compared):
    runner = CliRunner()
    result = runner.invoke(app, ["compare-saes", "--run", str(run), "--layer", LAYER, "--saes", "k4,default",
                                 "--samples", "600", "--splice-samples", "0"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(ln.split()[:3] == ["default", "128", "8"] for ln in lines), result.output
    assert any(ln.split()[:3] == ["k4", "256", "4"] for ln in lines), result.output
    assert "default -> k4: best decoder cosine median" in result.output
    assert f"{run}/tables (sae_comparison, sae_density, sae_matches)" in result.output
    bad = runner.invoke(app, ["compare-saes", "--run", str(run), "--layer", OTHER])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "import-sae" in bad.output
    bad = runner.invoke(app, ["compare-saes", "--run", str(run), "--layer", LAYER, "--samples", "0"])
    assert bad.exit_code == 1 and "--samples must be at least 1" in bad.output
