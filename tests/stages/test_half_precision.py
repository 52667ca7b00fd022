"""Half precision and GPU memory, on CPU, as the GPU path runs them (--dtype bfloat16 / float16): run-all on the
demo finishes in each, with small settings (capture -> sae -> features -> analysis with its heat-map replay ->
interventions); token shards keep activations beyond float16's 65504 (bfloat16 shards) or clamp and count them
(float16 shards); the features pass encodes in bounded row chunks."""

import json

import numpy as np
import polars as pl
import pytest
from capture_runs import make_cfg

from backend.run.prompts import DEMO_PROMPTS

STAGES = ("capture", "sae", "features", "analysis", "interventions")


def small_cfg(tmp_path, dtype: str):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(DEMO_PROMPTS.read_text().splitlines()[::60]) + "\n")  # 6 prompts
    cfg = make_cfg("demo", prompts, tmp_path / "runs", name=f"half-{dtype}", images_per_prompt=1, steps=3,
                   layers=["mid_block.attentions.0"])
    cfg.dtype = dtype
    cfg.sae.expansion, cfg.sae.k, cfg.sae.total_tokens, cfg.sae.batch_size = 2, 4, 1024, 128
    cfg.sae.splice_samples = 2
    cfg.analysis.examples_top_n = 2
    cfg.analysis.replay_batch_size = 4  # not the capture's batch size: the replay must still reproduce it
    i = cfg.interventions
    i.top_units, i.steer_seeds, i.edit_features, i.concept_seeds = 1, [0], 2, 1
    i.dream_iterations, i.dream_seeds, i.ablation = 2, 1, False
    cfg.atlas.units, cfg.atlas.dream_variants, cfg.dream.opt_steps, cfg.dream.seeds = "top:1", ["default"], 2, [0]
    cfg.prior.seeds = [0]
    return cfg


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_run_all_on_the_demo_in_half_precision(tmp_path, dtype, one_thread):
    from backend.stages.pipeline import run_all

    cfg = small_cfg(tmp_path, dtype)
    run_all(cfg, progress=False)
    run = cfg.out_dir
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["identity"]["dtype"] == dtype
    assert {s: manifest["stages"][s]["status"] for s in STAGES} == dict.fromkeys(STAGES, "done")
    meta = json.loads((run / "activations" / "mid_block.attentions.0" / "meta.json").read_text())
    assert meta["dtype"] == ("bfloat16" if dtype == "bfloat16" else "float16")
    activity = pl.read_parquet(f"{run}/tables/activity/**/*.parquet", hive_partitioning=True)
    assert np.isfinite(activity["max"].to_numpy()).all() and set(activity["kind"]) == {"channel", "feature"}
    examples = pl.read_parquet(f"{run}/tables/examples/**/*.parquet", hive_partitioning=True)
    assert examples.height > 0 and examples["heatmap"].null_count() == 0
    dreams = pl.read_parquet(f"{run}/tables/dreams/**/*.parquet", hive_partitioning=True)
    assert dreams.height > 0 and np.isfinite(dreams["activation"].to_numpy()).all()
    atlas = pl.read_parquet(f"{run}/tables/atlas/**/*.parquet", hive_partitioning=True)
    assert set(atlas["what"]) == {"prior", "dream"} and np.isfinite(atlas["objective"].drop_nulls().to_numpy()).all()


# ------------------------------------------------------------------------------------------------ token shards
def token_index(n: int):
    import pyarrow as pa

    return pa.table({"gen_id": np.zeros(n, np.int32), "step": np.zeros(n, np.int16),
                     "position": np.arange(n, dtype=np.int32)})


BIG = np.array([[1e5, -7e4, 100.0, 0.5], [65504.0, 65519.0, -1.25, 3e6]], np.float32)
"""Activations a transformer denoiser reaches: above 65504, the largest float16."""


def test_bfloat16_token_shards_keep_values_beyond_the_float16_range(tmp_path):
    from backend.run.store import RunStore
    from sae.data import ShardReader, from_bfloat16_bits

    store = RunStore(tmp_path)
    assert store.write_token_shard("l", "part-0000000", BIG, token_index(2), dtype="bfloat16") == 0
    meta = store.finish_token_meta("l")
    assert meta["dtype"] == "bfloat16" and meta["count"] == 2 and "clamped" not in meta
    raw = np.load(store.activations_dir("l") / "part-0000000.npy")
    assert raw.dtype == np.uint16
    import torch

    want = torch.from_numpy(BIG).to(torch.bfloat16).float().numpy()
    assert np.array_equal(from_bfloat16_bits(raw), want)
    got = next(iter(ShardReader.from_dir(store.activations_dir("l"), 2))).numpy()
    assert sorted(map(tuple, got)) == sorted(map(tuple, want)) and np.isfinite(got).all()


def test_float16_token_shards_clamp_to_the_float16_range_and_count(tmp_path):
    from backend.run.store import RunStore
    from sae.data import ShardReader

    store = RunStore(tmp_path)
    assert store.write_token_shard("l", "part-0000000", BIG, token_index(2)) == 4  # 1e5, -7e4, 65519, 3e6
    assert store.write_token_shard("l", "part-0000002", BIG[:1] / 10, token_index(1), clamped=3) == 3
    with pytest.warns(UserWarning, match=r"7 token values of layer l .*clamped to .*65504"):
        meta = store.finish_token_meta("l")
    assert meta["dtype"] == "float16" and meta["clamped"] == 7 and meta["count"] == 3
    raw = np.load(store.activations_dir("l") / "part-0000000.npy")
    assert raw.dtype == np.float16 and np.isfinite(raw).all()
    assert raw.tolist() == [[65504, -65504, 100, 0.5], [65504, 65504, -1.25, 65504]]
    assert next(iter(ShardReader.from_dir(store.activations_dir("l"), 3))).isfinite().all()


@pytest.fixture(scope="module")
def loud_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("\n".join(DEMO_PROMPTS.read_text().splitlines()[::90]) + "\n")  # 4 prompts
    return path


def loud_model(dtype):
    """The demo model with mid_block.attentions.0's output projection scaled up: its outputs pass 65504."""
    import torch

    from backend.models import load_model

    model = load_model("demo", dtype=dtype)
    proj = model.denoiser.get_submodule("mid_block.attentions.0.proj_out")
    with torch.no_grad():
        proj.weight.mul_(3e4)
        proj.bias.mul_(3e4)
    return model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_capture_of_activations_beyond_65504(tmp_path, loud_prompts, dtype, one_thread):
    """A float32 capture clamps the token samples to the float16 range, counts them in meta.json and warns; a
    bfloat16 capture stores its tokens as they are, in bfloat16."""
    import warnings

    import torch

    from backend.models.hooks import read_activations
    from backend.stages.capture import capture
    from sae.data import ShardReader

    model = loud_model(getattr(torch, dtype))
    cfg = make_cfg("demo", loud_prompts, tmp_path / "runs", name=dtype, images_per_prompt=1, steps=2,
                   layers=["mid_block.attentions.0"], tokens_per_step=16)
    cfg.dtype = dtype
    biggest = []
    with read_activations(model, ["mid_block.attentions.0"], lambda ev: biggest.append(ev.tokens.abs().amax())):
        model.generate(["a red circle"], [0], 2)
    assert float(max(biggest)) > 65504
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        capture(cfg, model=model, progress=False)
    directory = cfg.out_dir / "activations" / "mid_block.attentions.0"
    meta = json.loads((directory / "meta.json").read_text())
    tokens = next(iter(ShardReader.from_dir(directory, meta["count"]))).numpy()
    assert np.isfinite(tokens).all()
    clamp_warnings = [w for w in caught if "clamped" in str(w.message)]
    if dtype == "float32":
        assert meta["dtype"] == "float16" and meta["clamped"] > 0 and len(clamp_warnings) == 1
        assert np.abs(tokens).max() == 65504
    else:
        assert meta["dtype"] == "bfloat16" and "clamped" not in meta and not clamp_warnings
        assert np.abs(tokens).max() > 65504


# ------------------------------------------------------------------------------------------------ GPU memory
@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_the_features_pass_encodes_in_row_chunks_with_identical_results(tmp_path, architecture, monkeypatch):
    """feature_stats never builds the dense [B*T, n_latents] pre-activation of a whole batch (SDXL: GBs): it
    encodes row chunks of at most FEATURE_CHUNK_BYTES, with the same sparse activity as one whole encode (the same
    active (generation, feature) pairs; values to float32 rounding)."""
    import torch

    from backend.stages import capture
    from sae.io import save_sae
    from sae.model import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=16, n_latents=96, k=4, architecture=architecture))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    save_sae(sae, tmp_path / "sae")
    encoder = capture.SAEEncoder(tmp_path / "sae")
    assert encoder.n_latents == 96
    tokens = torch.randn(5, 37, 16, generator=torch.Generator().manual_seed(1))  # 5 generations x 37 positions
    whole = capture.feature_stats(encoder, tokens, max_bytes=1 << 40)
    shapes = []
    real = encoder.sae._pre_acts_normalised  # the one dense product of encode
    monkeypatch.setattr(encoder.sae, "_pre_acts_normalised", lambda x: shapes.append(tuple(x.shape)) or real(x))
    budget = 10 * 96 * 4  # 10 rows of dense pre-activations
    chunked = capture.feature_stats(encoder, tokens, max_bytes=budget)
    assert max(r for r, _ in shapes) * 96 * 4 <= budget and sum(r for r, _ in shapes) == 5 * 37
    assert np.array_equal(whole[0], chunked[0]) and np.array_equal(whole[1], chunked[1])  # the same active pairs
    for a, b in zip(whole[2:], chunked[2:], strict=True):  # means and maxes: float32 matmuls of other row counts
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=0)
    assert capture.FEATURE_CHUNK_BYTES == 64 << 20
