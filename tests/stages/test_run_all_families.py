"""run-all end to end on every model family, through the CLI as a researcher runs it: a tiny random SD 1.x pipeline
with the documented SD config (configs/sd15.toml, only the model, prompts, layers and sizes changed) and a .txt prompt
file, a tiny PixArt pipeline (transformer denoiser, DPM-Solver) with prompts that carry attributes, SD3 (joint blocks,
a text stream, CFG; in bfloat16) and FLUX (double- and single-stream blocks, packed latents, guidance embedding),
each with its documented config (configs/sd3.toml, configs/flux.toml), and the demo.
Every stage finishes; the interventions tables are written; off the demo the demo-only parts are skipped with their
notes (manifest, results, output) and dreams run at the model's own latent scale; the demo still gets its concept
report; a rerun of the stage loads no model."""

import json
import tomllib
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from cli import app

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("capture", "sae", "features", "analysis", "interventions")
SMALL = [  # a few prompts x 1 image x 4 steps, a tiny SAE, one unit per (layer, kind), one-seed two-step dreams
    "--device", "cpu", "--dtype", "float32", "--images-per-prompt", "1", "--steps", "4", "--batch-size", "8",
    "--tokens-per-step", "16", "--sae-total-tokens", "2048", "--interventions-top-units", "1",
    "--interventions-dream-iterations", "2",
    "--set", "sae.batch_size=256", "--set", "sae.splice_samples=2", "--set", "analysis.examples_top_n=2",
    "--set", "interventions.steer_seeds=[0]", "--set", "interventions.edit_features=2",
    "--set", "interventions.concept_seeds=1", "--set", "interventions.dream_seeds=1",
    "--set", "atlas.units=top:1", "--set", "dream.opt_steps=2", "--set", "dream.seeds=[0]", "--set", "prior.seeds=[0]",
]
SD_PROMPTS = ["a red house", "a blue tree", "a photo of a cat", "a dog on the grass", "a green car", "the sea"]
PIXART_PROMPTS = [
    {"prompt": "a photo of a red cat", "group": "red", "attributes": {"colour": "red", "animal": "cat"}},
    {"prompt": "a red dog in the house", "group": "red", "attributes": {"colour": "red", "animal": "dog"}},
    {"prompt": "a photo of a red house", "group": "red", "attributes": {"colour": "red", "animal": "none"}},
    {"prompt": "a photo of a blue cat", "group": "blue", "attributes": {"colour": "blue", "animal": "cat"}},
    {"prompt": "a blue dog on the tree", "group": "blue", "attributes": {"colour": "blue", "animal": "dog"}},
    {"prompt": "a photo of a blue tree", "group": "blue", "attributes": {"colour": "blue", "animal": "none"}},
]


def run_all(tmp_path: Path, name: str, *options: str, dtype: str = "float32") -> tuple[Path, str]:
    small = [dtype if a == "float32" else a for a in SMALL]
    result = CliRunner().invoke(app, ["run-all", "--runs-dir", str(tmp_path / "runs"), "--name", name, *options,
                                      *small])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return tmp_path / "runs" / name, result.output


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def rows(run_dir: Path, table: str) -> pl.DataFrame:
    return pl.read_parquet(f"{run_dir}/tables/{table}/**/*.parquet", hive_partitioning=True)


def check_every_part(run_dir: Path, layers: list[str]) -> dict:
    """Every stage done, and every part of the interventions stage that runs on any model has its table."""
    stages = manifest(run_dir)["stages"]
    assert {s: stages[s]["status"] for s in STAGES} == dict.fromkeys(STAGES, "done")
    results = stages["interventions"]["results"]
    kinds = {(layer, kind) for layer in layers for kind in ("channel", "feature")}
    assert {(k.split("-")[1], k.split("-")[2]) for k in results if k.startswith("steer-")} == kinds
    assert {(k.split("-")[1], k.split("-")[2]) for k in results if k.startswith("dream-")} == kinds
    assert {f"edit-{layer}" for layer in layers} | {"ablation", "concept-report"} <= set(results)
    for table in ("interventions", "ablations", "dreams"):
        assert rows(run_dir, table).height > 0, table
    steered = rows(run_dir, "interventions")
    assert set(steered["method"]) >= {"steer", "zero"} and set(steered["layer"]) == set(layers)
    atlas = rows(run_dir, "atlas")  # run-all's atlas stage: a prior and both dream variants per (layer, kind)
    assert stages["atlas"]["status"] == "done"
    assert set(zip(atlas["layer"], atlas["kind"], strict=True)) == kinds
    assert set(zip(atlas["what"], atlas["variant"], strict=True)) == {
        ("prior", "default"), ("dream", "default"), ("dream", "no-noise")}
    images = steered["image"].to_list() + rows(run_dir, "dreams")["image"].to_list() + atlas["image"].to_list()
    assert all((run_dir / p).read_bytes()[:4] == b"\x89PNG" for p in images)
    return stages


def check_demo_only_parts_skipped(run_dir: Path, output: str) -> None:
    """Off the demo: the concept report is a skip with its note (manifest notes, its result, the printed output), no
    steering_success table, effects without scored attributes, dreams at the model's fitted latent scale."""
    stage = manifest(run_dir)["stages"]["interventions"]
    assert "needs the demo model" in stage["results"]["concept-report"]["skipped"]
    assert any(n.startswith("concept-report skipped: ") and "demo model" in n for n in stage["notes"])
    assert any("pixel effects" in n for n in stage["notes"])
    assert "note: concept-report skipped" in output and "concept-report: {'skipped'" in output
    assert not (run_dir / "tables" / "steering_success").exists()
    assert rows(run_dir, "interventions")["attributes"].is_null().all()
    dream = manifest(run_dir)["stages"]["dream"]["last"]["config"]
    assert dream["moment_std"] != 0.25 and dream["range_limit"] != 1.0  # not the demo's pixel values


def test_run_all_on_stable_diffusion_with_the_sd15_config(sd_dir, tmp_path, monkeypatch):
    """The researcher's command: the SD config as documented, a tiny SD 1.x directory with the scheduler SD 1.5
    ships (PNDM: one more denoiser call than steps), a .txt prompt file."""
    from tiny_pipelines import REAL_SCHEDULERS, with_scheduler

    _, scheduler, scheduler_config = REAL_SCHEDULERS["sd15-pndm"]
    sd_dir = with_scheduler(sd_dir, tmp_path / "sd15", scheduler, scheduler_config)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(SD_PROMPTS) + "\n")
    layers = ["mid_block.attentions.0", "up_blocks.0.attentions.1"]  # the tiny UNet has 2 levels, not SD 1.5's 4
    run_dir, output = run_all(tmp_path, "sd", "--config", str(ROOT / "configs" / "sd15.toml"), "--model",
                              str(sd_dir), "--prompts", str(prompts), *[a for lyr in layers for a in ("--layer", lyr)])
    check_every_part(run_dir, layers)
    check_demo_only_parts_skipped(run_dir, output)
    assert manifest(run_dir)["config"]["capture"]["guidance"] == 7.5  # the rest of sd15.toml as written

    from backend.run.config import InterventionsConfig
    from backend.stages.interventions import run_interventions

    def no_model(*args, **kwargs):
        raise AssertionError("a finished stage must not load the model again")

    monkeypatch.setattr("backend.models.load_model", no_model)
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "tables").rglob("*.parquet")}
    saved = InterventionsConfig(**manifest(run_dir)["config"]["interventions"])
    summary = run_interventions(run_dir, saved, progress=False)
    assert summary["notes"] == manifest(run_dir)["stages"]["interventions"]["notes"]
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "tables").rglob("*.parquet")} == before


def test_run_all_on_pixart(pixart_dir, tmp_path):
    """A transformer family (token-sequence layers, DPM-Solver), prompts with attributes: the concept report is
    still the demo's only."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PIXART_PROMPTS))
    layers = ["transformer_blocks.1", "transformer_blocks.3"]
    run_dir, output = run_all(tmp_path, "pixart", "--model", str(pixart_dir), "--prompts", str(prompts),
                              *[a for lyr in layers for a in ("--layer", lyr)])
    check_every_part(run_dir, layers)
    check_demo_only_parts_skipped(run_dir, output)
    assert rows(run_dir, "concepts").height > 0  # attributes were analysed; only the steering report is demo-only


def test_run_all_on_the_demo_still_writes_the_concept_report(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    demo = (ROOT / "data" / "prompts" / "demo.jsonl").read_text().splitlines()
    prompts.write_text("\n".join(demo[::30]) + "\n")  # 12 prompts, 4 colours
    run_dir, output = run_all(tmp_path, "demo", "--prompts", str(prompts), "--set", "sae.expansion=2",
                              "--set", "sae.k=4")
    stages = check_every_part(run_dir, ["mid_block.attentions.0", "up_blocks.1.attentions.1"])
    report = stages["interventions"]["results"]["concept-report"]
    assert "skipped" not in report and any(k.startswith("colour=") for k in report)
    assert stages["interventions"]["notes"] == [] and "note:" not in output
    assert rows(run_dir, "steering_success").height > 0
    assert rows(run_dir, "interventions")["attributes"].is_not_null().any()  # scored from pixels on the demo
    assert manifest(run_dir)["stages"]["dream"]["last"]["config"]["moment_std"] == 0.25  # the demo's pixels


def test_the_sd15_config_is_valid_and_its_layers_are_sd15_hook_points():
    """configs/sd15.toml as written: every key known and valid, and its layers exist in a UNet of SD 1.5's block
    layout (tiny widths; no weights needed) with the channel count its [sae] comment assumes."""
    from diffusers import UNet2DConditionModel

    from backend.run.config import load_config, validate

    cfg = validate(load_config(ROOT / "configs" / "sd15.toml"))
    unet = UNet2DConditionModel(  # SD 1.5's blocks at 1/40 of its widths
        sample_size=16, block_out_channels=(8, 16, 32, 32), layers_per_block=2, cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=4, norm_num_groups=4)
    names = {name: type(m).__name__ for name, m in unet.named_modules()}
    assert {names.get(layer) for layer in cfg.capture.layers} == {"Transformer2DModel"}
    widths = {unet.get_submodule(layer).config.in_channels * 40 for layer in cfg.capture.layers}
    assert widths == {1280} and cfg.sae.expansion * 1280 == 5120  # "1280 channels -> 5120 latents"
    raw = tomllib.loads((ROOT / "configs" / "sd15.toml").read_text())
    assert raw["model"].startswith("models/") and raw["prompts"]  # only the model path is the researcher's


def heatmap_grids(run_dir: Path) -> dict[str, tuple[int, int]]:
    examples = rows(run_dir, "examples")
    return {layer: (int(g["height"][0]), int(g["width"][0]))
            for (layer,), g in examples.group_by("layer")}


@pytest.mark.slow
def test_run_all_on_sd3_in_bfloat16_with_its_config(sd3_dir, tmp_path):
    """SD3 with configs/sd3.toml in bfloat16 on the CPU (model, prompts, layers and sizes changed): a joint block's
    image stream and an earlier block's text stream (`:text`), CFG on; heat-maps on the 4x4 patch grid, the text
    stream's as one row."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PIXART_PROMPTS))
    layers = ["transformer_blocks.1", "transformer_blocks.0:text"]
    run_dir, output = run_all(tmp_path, "sd3", "--config", str(ROOT / "configs" / "sd3.toml"), "--model",
                              str(sd3_dir), "--prompts", str(prompts), *[a for lyr in layers for a in ("--layer", lyr)],
                              dtype="bfloat16")
    check_every_part(run_dir, layers)
    check_demo_only_parts_skipped(run_dir, output)
    assert manifest(run_dir)["config"]["capture"]["guidance"] > 1  # sd3.toml's CFG
    assert manifest(run_dir)["config"]["dtype"] == "bfloat16"
    assert heatmap_grids(run_dir) == {"transformer_blocks.1": (4, 4), "transformer_blocks.0:text": (1, 32)}
    steps = pl.read_parquet(run_dir / "tables" / "steps.parquet").sort("step")  # flow matching: 1000 x sigma
    assert steps["timestep"][0] == 1000.0 and (steps["timestep"].diff().drop_nulls() < 0).all()


@pytest.mark.slow
def test_run_all_on_flux_with_its_config(flux_dir, tmp_path):
    """FLUX.1-dev (guidance-distilled) with configs/flux.toml (in float32: bfloat16 matmuls are slow on CPUs): a
    double- and a single-stream block; heat-maps on the 8x8 grid of packed tokens (a 32 px image, 16x16 latents)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PIXART_PROMPTS))
    layers = ["transformer_blocks.1", "single_transformer_blocks.0"]
    layer_options = [a for lyr in layers for a in ("--layer", lyr)]
    run_dir, output = run_all(tmp_path, "flux", "--config", str(ROOT / "configs" / "flux.toml"), "--model",
                              str(flux_dir), "--prompts", str(prompts), *layer_options)
    check_every_part(run_dir, layers)
    check_demo_only_parts_skipped(run_dir, output)
    assert manifest(run_dir)["config"]["capture"]["guidance"] == 3.5  # flux.toml's guidance embedding value
    assert heatmap_grids(run_dir) == dict.fromkeys(layers, (8, 8))


def test_the_sd3_and_flux_configs_are_valid_and_name_hook_points_of_the_real_layouts():
    """configs/sd3.toml and configs/flux.toml as written: every key known and valid, and their layers are image
    streams of joint blocks in transformers of SD3 Medium's (24 joint blocks) and FLUX.1's (19 double-, 38
    single-stream blocks) layout (tiny widths; no weights needed), with the channel counts their [sae] comments
    assume (SD3 Medium: 24 heads x 64; FLUX.1: 24 x 128)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from backend.models.hooks import BLOCK_STREAMS, split_layer
    from backend.run.config import load_config, validate

    sd3 = SD3Transformer2DModel(num_layers=24, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
                                caption_projection_dim=16, pooled_projection_dim=8, sample_size=8)
    flux = FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=16, num_attention_heads=1,
                                  joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=[4, 4, 8],
                                  guidance_embeds=True)
    for name, transformer, channels, expected in (("sd3", sd3, 1536, 6144), ("flux", flux, 3072, 12288)):
        cfg = validate(load_config(ROOT / "configs" / f"{name}.toml"))
        for layer in cfg.capture.layers:
            block, stream = split_layer(layer)
            assert stream == "image" and type(transformer.get_submodule(block)).__name__ in BLOCK_STREAMS
        assert cfg.sae.expansion * channels == expected and cfg.dtype == "bfloat16" and cfg.device == "cuda"
        raw = tomllib.loads((ROOT / "configs" / f"{name}.toml").read_text())
        assert raw["model"].startswith("models/") and raw["prompts"]
