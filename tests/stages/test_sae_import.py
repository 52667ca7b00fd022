"""Several SAEs per layer on a tiny real run: one trained, one imported under another id (import-sae), both recorded
and analysed without touching each other's tables; steering a feature of the second; import errors that leave the
run as it was; configured SAE variants."""

import json

import polars as pl
import pytest
import torch
from capture_runs import make_cfg
from run_snapshots import tree_digest
from typer.testing import CliRunner

from backend.errors import DifflensError
from backend.run.config import SAEStageConfig
from backend.run.context import open_run
from backend.run.prompts import DEMO_PROMPTS
from backend.stages.analysis import AnalysisConfig, analyze
from backend.stages.capture import SAEEncoder, capture, capture_with_saes
from backend.stages.sae import train_saes
from cli import app
from sae.io import save_sae
from sae.model import SAE, SAEConfig

LAYER = "up_blocks.1.attentions.1"  # 64 channels
TINY = dict(expansion=2, k=4, total_tokens=4096, batch_size=256, lr=3e-3, warmup_steps=2, log_every=8,
            splice_samples=0)
runner = CliRunner()


def random_sae(d_in=64, n_latents=96, seed=1) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, n_latents=n_latents, k=6, layer=LAYER)).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return sae


def partition_digests(run, kind: str) -> dict[str, str]:
    """sha256 of every file of one (LAYER, kind) partition of every table, and of its figures."""
    tables = {k: v for k, v in tree_digest(run / "tables").items() if f"layer={LAYER}/kind={kind}/" in k}
    plots = {k: v for k, v in tree_digest(run / "media" / "plots").items() if k.startswith(f"{LAYER}/{kind}-")}
    return tables | plots


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Captured (one layer), its default SAE trained and recorded, analysed."""
    prompts = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    prompts.write_text("\n".join(DEMO_PROMPTS.read_text().splitlines()[::45]) + "\n")  # 8 prompts
    cfg = make_cfg("demo", prompts, tmp_path_factory.mktemp("runs"), steps=3, layers=[LAYER])
    capture(cfg, progress=False)
    train_saes(cfg.out_dir, SAEStageConfig(**TINY), progress=False)
    capture(cfg, encoders={LAYER: SAEEncoder(cfg.out_dir / "sae" / LAYER / "default")}, progress=False)
    analyze(cfg.out_dir, AnalysisConfig(examples_top_n=2), progress=False)
    return cfg


@pytest.fixture(scope="module")
def imported(run, tmp_path_factory):
    """run with a second SAE of LAYER, `b`, imported, recorded and analysed; returns the first SAE's partition
    digests from before."""
    before = partition_digests(run.out_dir, "feature")
    source = save_sae(random_sae(), tmp_path_factory.mktemp("ckpt") / "b")
    r = runner.invoke(app, ["import-sae", str(source), "--run", str(run.out_dir), "--layer", LAYER, "--name", "b"])
    assert r.exit_code == 0, r.output
    assert "feature.b" in r.output
    capture_with_saes(run, [f"{LAYER}:b={run.out_dir}/sae/{LAYER}/b"], progress=False)
    analyze(run.out_dir, AnalysisConfig(examples_top_n=2), progress=False)
    return before, source


@pytest.mark.slow
def test_a_second_sae_is_recorded_and_analysed_beside_the_first(run, imported):
    before, source = imported
    root = run.out_dir
    assert open_run(root).saes() == [(LAYER, "default"), (LAYER, "b")]
    saved = json.loads((root / "sae" / LAYER / "b" / "cfg.json").read_text())
    assert saved["source_format"] == "difflens" and saved["source"] == str(source.resolve())
    assert saved["original_config"]["n_latents"] == 96
    for kind, n in (("feature", 128), ("feature.b", 96)):
        activity = pl.read_parquet(root / "tables" / "activity" / f"layer={LAYER}" / f"kind={kind}" / "*.parquet")
        assert activity.height and (activity["max"] > 0).all() and activity["unit"].max() < n
        units = pl.read_parquet(root / "tables" / "units" / f"layer={LAYER}" / f"kind={kind}" / "*.parquet")
        assert units.height == n, kind
    assert partition_digests(root, "feature") == before  # the first SAE's tables and figures: not one byte changed
    manifest = json.loads((root / "manifest.json").read_text())
    features = manifest["stages"]["features"]
    assert set(features["sae_ids"][LAYER]) == {"default", "b"} and features["recording"] == {LAYER: ["b"]}
    analysis = manifest["stages"]["analysis"]
    assert analysis["todo"] == [f"{LAYER}/feature.b"]
    assert set(analysis["partitions"]) == {f"{LAYER}/channel", f"{LAYER}/feature", f"{LAYER}/feature.b"}
    summary = pl.read_parquet(root / "tables" / "concept_summary.parquet")
    assert summary["kind"].to_list() == ["channel", "feature", "feature.b"]  # the first's row kept
    # recording the same SAEs again has nothing to do
    again = capture_with_saes(run, [f"{LAYER}={root}/sae/{LAYER}/default", f"{LAYER}:b={root}/sae/{LAYER}/b"],
                              progress=False)
    assert again.batches_run == 0 and partition_digests(root, "feature") == before


@pytest.mark.slow
def test_a_saelens_checkpoint_is_imported_with_its_provenance(run, imported, tmp_path):
    """import-sae reads a published format (here SAELens's own cfg.json + sae_weights.safetensors) through
    sae.formats: the run's copy computes the same codes, and its cfg.json names the source format."""
    from sae.io import export_saelens

    original = random_sae(seed=3)
    lens = export_saelens(original, tmp_path / "lens", hook_name=LAYER)
    r = runner.invoke(app, ["import-sae", str(lens), "--run", str(run.out_dir), "--layer", LAYER, "--name", "lens"])
    assert r.exit_code == 0, r.output
    saved = json.loads((run.out_dir / "sae" / LAYER / "lens" / "cfg.json").read_text())
    assert saved["source_format"] == "saelens" and saved["original_config"]["d_sae"] == 96
    x = torch.randn(32, 64)
    with torch.no_grad():
        want = original.encode(x, dense=True)
        got = open_run(run.out_dir).sae(LAYER, "lens").encode(x, dense=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_steering_a_feature_of_the_second_sae(run, imported):
    from backend.interventions.steer import steer_run

    ctx = open_run(run.out_dir)
    res = steer_run(ctx, LAYER, "feature.b", 5, strength=3.0, steps="all", seeds=[0])
    assert set(res.rows["kind"]) == {"feature.b"} and res.rows["effect"][0] > 0
    assert (run.out_dir / "tables" / "interventions" / f"layer={LAYER}" / "kind=feature.b").is_dir()
    assert ctx.n_units(LAYER, "feature.b") == 96 and ctx.n_units(LAYER, "feature") == 128
    with pytest.raises(DifflensError, match=r"no SAE for .* with id 'zz'.*default, .*:b") as err:
        steer_run(ctx, LAYER, "feature.zz", 5, strength=3.0, steps="all", seeds=[0])
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_import_errors_leave_the_run_unchanged(run, imported, tmp_path):
    root = run.out_dir
    untouched = tree_digest(root)
    narrow = save_sae(random_sae(d_in=32), tmp_path / "narrow")
    nan = random_sae()
    with torch.no_grad():
        nan.W_dec[3, 0] = float("nan")
    nan_dir = save_sae(nan, tmp_path / "nan")
    cases = [
        (["import-sae", str(save_sae(random_sae(seed=2), tmp_path / "c")), "--layer", LAYER, "--name", "b"],
         "already has an SAE 'b' for up_blocks.1.attentions.1; pass --overwrite"),
        (["import-sae", str(narrow), "--layer", LAYER, "--name", "n"], "takes width 32, but the layer has 64"),
        (["import-sae", str(tmp_path / "missing"), "--layer", LAYER, "--name", "m"], "does not exist"),
        (["import-sae", str(nan_dir), "--layer", LAYER, "--name", "m"], "NaN or inf"),
        (["import-sae", str(narrow), "--layer", LAYER, "--name", "Bad Id"], "is not valid"),
        (["import-sae", str(narrow), "--layer", "mid_block.attentions.0"], "no captured layer"),
        (["import-sae", str(tmp_path), "--layer", LAYER, "--name", "m"], "is not an SAE directory"),
    ]
    for args, message in cases:
        r = runner.invoke(app, [*args, "--run", str(root)])
        assert r.exit_code == 1 and message in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1, r.output
    assert tree_digest(root) == untouched


@pytest.mark.slow
def test_configured_variants_train_beside_the_default_sae(run, imported):
    root = run.out_dir
    default_weights = (root / "sae" / LAYER / "default" / "sae.safetensors").read_bytes()
    b_weights = (root / "sae" / LAYER / "b" / "sae.safetensors").read_bytes()
    results = train_saes(root, SAEStageConfig(**TINY, variants={"k2": {"k": 2}}), progress=False)
    assert set(results) == {LAYER, f"{LAYER}:k2"} and results[f"{LAYER}:k2"]["l0"] <= 2
    assert (root / "sae" / LAYER / "default" / "sae.safetensors").read_bytes() == default_weights  # kept
    assert (root / "sae" / LAYER / "b" / "sae.safetensors").read_bytes() == b_weights  # not configured: untouched
    metrics = pl.read_parquet(root / "tables" / "sae_metrics.parquet")
    assert metrics.select("layer", "sae_id").rows() == [(LAYER, "default"), (LAYER, "k2")]
    curve = pl.read_parquet(root / "tables" / "sae_training" / "**" / "*.parquet", hive_partitioning=True)
    assert set(curve["kind"]) == {"feature", "feature.k2"}
    with pytest.raises(DifflensError, match="already has SAEs for up_blocks.1.attentions.1:b imported from"):
        train_saes(root, SAEStageConfig(**TINY), sae_ids=["b"], progress=False)
