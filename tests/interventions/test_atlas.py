"""The unit atlas (backend/interventions/atlas.py, backend/stages/atlas.py) on a hand-made analysed run of the demo
model (4 steps): batched priors and dreams equal unit-at-a-time ones, a killed atlas resumes to identical files,
ranks split the units and together equal one process, settings reach the results, presets, prior -> dream chaining,
variants side by side, animations, and bad input is a one-line error that writes nothing."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from intervention_runs import LAYER, OTHER, STEPS, make_intervention_run
from PIL import Image

from backend.errors import DifflensError
from backend.interventions import atlas as atlas_mod
from backend.interventions import dream as dreams
from backend.run.config import AtlasConfig, DreamConfig, PriorConfig
from backend.run.distributed import Dist
from backend.stages.atlas import run_atlas


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, sae):
    """An analysed run (units of LAYER channel and feature, an SAE, top examples) as capture + analyze leave it."""
    store = make_intervention_run(tmp_path_factory.mktemp("atlas") / "run", sae)
    manifest = store.read_manifest()
    manifest["stages"]["capture"]["layers"] = [OTHER, LAYER]
    manifest["stages"]["analysis"] = {"status": "done", "key": "analysis-key",
                                      "partitions": [f"{LAYER}/channel", f"{LAYER}/feature"]}
    store.write_manifest(manifest)
    for kind in ("channel", "feature"):
        store.write_table_shard("examples", "part-0000000", pa.table({
            "unit": np.array([4, 5, 6], np.int32), "step": np.full(3, -1, np.int16), "rank": np.ones(3, np.int16),
            "gen_id": np.array([0, 1, 0], np.int32), "activation": np.ones(3, np.float32),
            "heatmap_step": np.zeros(3, np.int16), "heatmap": [[0.0] * 64] * 3, "height": np.full(3, 8, np.int16),
            "width": np.full(3, 8, np.int16)}), layer=LAYER, kind=kind)
    return store.root


@pytest.fixture
def run(base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"


def quick(units="4-7", batch_units=4, **atlas) -> tuple[AtlasConfig, PriorConfig, DreamConfig]:
    a = AtlasConfig(units=units, batch_units=batch_units, kinds=["channel"], heatmap_animations=False, **atlas)
    p = PriorConfig(seeds=[0, 1])
    d = DreamConfig(opt_steps=3, snapshot_every=1, seeds=[0, 1], max_target_steps=2)
    return a, p, d


def go(run, model, cfgs, dist=None, **kw):
    return run_atlas(run, *cfgs, progress=False, model=model, dist=dist or Dist(), **kw)


def table(run) -> pl.DataFrame:
    return pl.read_parquet(f"{run}/tables/atlas/**/*.parquet", hive_partitioning=True).sort(
        "kind", "what", "variant", "unit", "seed", "target_steps")


def pixels(run, rel) -> np.ndarray:
    return np.asarray(Image.open(run / rel).convert("RGB"), np.int16)


def media_bytes(run) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted((run / "media").rglob("*")) if p.is_file()}


def latents(run, unit, kind="channel") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / atlas_mod.latents_rel(LAYER, kind, unit)))


# ------------------------------------------------------------------------------------------------ batching
def test_batched_priors_and_dreams_equal_one_unit_at_a_time(run, tmp_path, model):
    other = tmp_path / "one-at-a-time"
    shutil.copytree(run, other)
    go(run, model, quick(batch_units=4))
    go(other, model, quick(batch_units=1))
    a, b = table(run), table(other)
    assert a.height == 4 * 2 + 2 * 4 * 2  # priors: 4 units x 2 seeds; dreams: 2 variants x 4 units x 2 seeds
    assert a.drop("objective").equals(b.drop("objective"))
    dream_rows = a.filter(pl.col("what") == "dream")
    np.testing.assert_allclose(dream_rows["objective"], b.filter(pl.col("what") == "dream")["objective"],
                               rtol=1e-4, atol=1e-5)
    for rel in a["image"]:
        assert np.abs(pixels(run, rel) - pixels(other, rel)).max() <= 1, rel
    for unit in range(4, 8):
        for name, x in latents(run, unit).items():
            torch.testing.assert_close(x, latents(other, unit)[name], rtol=1e-3, atol=1e-3)  # batched kernels
    assert len(list((run / "_done/atlas" / LAYER / "channel").glob("*.json"))) == 3  # one batch per job
    assert len(list((other / "_done/atlas" / LAYER / "channel").glob("*.json"))) == 3 * 4


def test_a_batched_prior_is_the_single_unit_steering_of_steer_py(run, model):
    """The row-wise edit of a batch gives what steer.steered_generate gives one unit alone."""
    from backend.interventions.directions import unit_direction
    from backend.interventions.steer import steered_generate

    cfgs = quick(units="5,9")
    go(run, model, cfgs)
    rows = table(run).filter((pl.col("what") == "prior") & (pl.col("unit") == 9))
    steps = [int(s) for s in rows["target_steps"][0].split(",")]
    assert steps == [1, 2]  # the unit's active window in the units table
    units = pl.read_parquet(run / "tables/units" / f"layer={LAYER}" / "kind=channel" / "part-0000000.parquet")
    strength = 4.0 * float(units.filter(pl.col("unit") == 9)["max"][0])
    schedule = [strength if s in steps else 0.0 for s in range(STEPS)]
    images = steered_generate(model, LAYER, ["", ""], [0, 1], unit_direction("channel", 9, 64), schedule,
                              n_steps=STEPS, guidance=1.0)
    for seed in (0, 1):
        want = (images[seed].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
        got = pixels(run, rows.filter(pl.col("seed") == seed)["image"][0])
        assert np.abs(got - want).max() <= 1


def test_dream_samples_of_many_units_equal_each_units_dream(model, sae):
    """The batched dream engine, features: samples of several units in one batch equal each unit alone."""
    cfg = DreamConfig(opt_steps=3, snapshot_every=3, seeds=[0])
    samples = [dreams.DreamSample(u, s, (0, 2)) for u in (3, 17, 40) for s in (0, 5)]
    together = dreams.dream_samples(model, LAYER, "feature", samples, cfg, sae, n_steps=STEPS)
    for sample, res in zip(samples, together, strict=True):
        (alone,) = dreams.dream_samples(model, LAYER, "feature", [sample], cfg, sae, n_steps=STEPS)
        assert res.objective == pytest.approx(alone.objective, rel=1e-4, abs=1e-5)
        torch.testing.assert_close(res.latent_CHW, alone.latent_CHW, rtol=1e-4, atol=1e-5)
    assert len({round(r.objective, 4) for r in together}) > 1  # each row maximised its own unit


# ------------------------------------------------------------------------------------------------ resume and ranks
def test_resume_after_an_interrupted_batch_gives_identical_files(run, tmp_path, model, monkeypatch):
    clean = tmp_path / "clean"
    shutil.copytree(run, clean)
    cfgs = quick(batch_units=2)
    go(clean, model, cfgs)

    real, calls = atlas_mod.run_dream_batch, []

    def dies_at_the_second(ctx, plan, batch):
        calls.append(batch.name)
        if len(calls) == 2:
            real(ctx, plan, batch)  # its files are written, its marker is not: the batch is redone
            raise KeyboardInterrupt
        return real(ctx, plan, batch)

    monkeypatch.setattr(atlas_mod, "run_dream_batch", dies_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        go(run, model, cfgs)
    monkeypatch.setattr(atlas_mod, "run_dream_batch", real)
    assert json.loads((run / "manifest.json").read_text())["stages"]["atlas"]["status"] == "running"
    summary = go(run, model, cfgs)
    part = summary["partitions"][f"{LAYER}/channel"]
    assert part["batches_skipped"] == 3 and part["batches_run"] == 3  # priors 2 + first dream batch; the rest
    assert table(run).equals(table(clean))
    assert media_bytes(run) == media_bytes(clean)
    assert json.loads((run / "manifest.json").read_text())["stages"]["atlas"]["status"] == "done"
    again = go(run, model, cfgs)["partitions"][f"{LAYER}/channel"]
    assert again["batches_run"] == 0  # a finished atlas is a no-op


def test_ranks_split_the_units_and_together_equal_one_process(run, tmp_path, model):
    one = tmp_path / "one"
    shutil.copytree(run, one)
    cfgs = quick(units="4-8")
    go(one, model, cfgs)
    first = go(run, model, cfgs, dist=Dist(0, 2))["partitions"][f"{LAYER}/channel"]
    assert first["rank_units"] == 3  # units 4, 6, 8
    assert sorted(set(table(run)["unit"])) == [4, 6, 8]
    assert json.loads((run / "manifest.json").read_text())["stages"]["atlas"]["status"] == "running"
    go(run, model, cfgs, dist=Dist(1, 2))
    assert table(run).drop("objective").equals(table(one).drop("objective"))
    np.testing.assert_allclose(table(run)["objective"].fill_null(0), table(one)["objective"].fill_null(0),
                               rtol=1e-4, atol=1e-5)
    go(run, model, cfgs, dist=Dist(0, 2))  # rank 0 again: nothing to do, and now every unit is done
    assert json.loads((run / "manifest.json").read_text())["stages"]["atlas"]["status"] == "done"


# ------------------------------------------------------------------------------------------------ knobs
def test_knobs_reach_the_results(run, model):
    a, p, d = quick(units="5")
    go(run, model, (a, p, d))
    before = table(run)
    prior_pixels = [pixels(run, rel) for rel in before.filter(pl.col("what") == "prior")["image"]]
    d.tv_weight, p.scale = 2.0, 1.0
    go(run, model, (a, p, d))  # another key: the partition is redone from scratch
    after = table(run)
    assert after.height == before.height
    changed = after["objective"].fill_null(0) - before["objective"].fill_null(0)
    assert (changed.filter(after["what"] == "dream").abs() > 1e-6).all()
    for old, rel in zip(prior_pixels, after.filter(pl.col("what") == "prior")["image"], strict=True):
        assert np.abs(pixels(run, rel) - old).max() > 10  # a quarter of the strength: another prior
    config = json.loads((run / "manifest.json").read_text())["config"]
    assert config["dream"]["tv_weight"] == 2.0 and config["prior"]["scale"] == 1.0


def test_command_line_options_reach_the_knobs(run, model, monkeypatch):
    from typer.testing import CliRunner

    from cli import app

    monkeypatch.setattr("backend.run.context.RunContext.model", property(lambda self: model))
    args = ["atlas", "--run", str(run), "--layer", LAYER, "--kind", "channel", "--units", "5",
            "--no-heatmap-animations", "--dream-iterations", "2", "--dream-seeds", "0", "--prior-seeds", "3",
            "--dream-robustness", "strong",
            "--dream-targets", "0", "--dream-lr", "0.5", "--variant", "default", "--prior-steps", "peaks"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = table(run)
    assert sorted(zip(rows["what"], rows["seed"], rows["target_steps"], strict=True)) == [
        ("dream", 0, "0"), ("prior", 3, "0,1,2")]  # peaks: the unit's peak step 1 +- 1
    part = json.loads((run / "manifest.json").read_text())["stages"]["atlas"]["partitions"][f"{LAYER}/channel"]
    assert part["config"]["dream"]["lr"] == 0.5 and part["config"]["dream"]["robustness"] == "strong"
    assert "channel: 1 units" in result.output.replace(f"{LAYER}/", "")


def test_robustness_presets_set_the_augmentation_group():
    for name, (jitter, degrees, scale) in dreams.ROBUSTNESS.items():
        cfg = dreams.for_kind(DreamConfig(robustness=name), "channel")
        assert (cfg.jitter, cfg.rotate_degrees, cfg.scale_range) == (jitter, degrees, scale)
    assert dreams.ROBUSTNESS["none"] == (0, 0.0, 0.0)
    own = dreams.for_kind(DreamConfig(robustness="strong", jitter=0), "feature")
    assert own.jitter == 0 and own.rotate_degrees == 10.0  # an explicit value wins over the preset
    assert dreams.for_kind(DreamConfig(), "feature").lr == 0.32 != dreams.for_kind(DreamConfig(), "channel").lr
    with pytest.raises(DifflensError, match="unknown dream robustness preset 'wild'"):
        dreams.for_kind(DreamConfig(robustness="wild"), "channel")


def test_dream_targets_one_at_a_time_give_one_dream_per_target_step(run, model):
    a, p, d = quick(units="5", dream_variants=["no-noise"], priors=False)
    d.joint, d.targets = False, "0,peaks"
    go(run, model, (a, p, d))
    rows = table(run)
    assert set(rows["what"]) == {"dream"} and set(rows["variant"]) == {"no-noise"}
    assert sorted(zip(rows["seed"], rows["target_steps"], strict=True)) == [(0, "0"), (0, "1"), (1, "0"), (1, "1")]
    assert all(rel.endswith(f"-step{t}.png") for rel, t in zip(rows["image"], rows["target_steps"], strict=True))


# ------------------------------------------------------------------------------------------------ chaining, variants
def test_dreams_from_the_prior_start_at_the_prior_and_variants_sit_side_by_side(run, model):
    a, p, d = quick(units="5", dream_variants=["default", "no-noise", "from-prior"])
    go(run, model, (a, p, d))
    rows = table(run)
    assert sorted(set(rows.filter(pl.col("what") == "dream")["variant"])) == ["default", "from-prior", "no-noise"]
    images = {(r["what"], r["variant"], r["seed"]): r for r in rows.iter_rows(named=True)}
    assert len({r["image"] for r in images.values()}) == len(images)  # every variant its own files
    for seed in (0, 1):
        prior = pixels(run, images[("prior", "default", seed)]["image"])
        gif = Image.open(run / images[("dream", "from-prior", seed)]["animation"])
        assert gif.n_frames == 4  # snapshots 0..3
        first = np.asarray(gif.convert("RGB"), np.int16)[::8, ::8]  # the GIF is upscaled x8 (nearest)
        assert np.abs(first - prior).max() <= 2  # the dream starts at the prior
        random_start = np.asarray(Image.open(run / images[("dream", "default", seed)]["animation"]).convert("RGB"),
                                  np.int16)[::8, ::8]
        assert np.abs(random_start - prior).max() > 10
    assert (images[("dream", "default", 0)]["objective"] != images[("dream", "no-noise", 0)]["objective"])


def test_the_dream_command_starts_from_the_atlas_prior(run, model):
    from backend.interventions.dream import dream_run

    cfg = DreamConfig(opt_steps=1, snapshot_every=1, seeds=[1], init="prior")
    with pytest.raises(DifflensError, match="init = prior needs the prior of channel 5.*python cli.py atlas"):
        dream_run(run, LAYER, "channel", 5, cfg, progress=False, model=model)
    go(run, model, quick(units="5", dreams=False))
    summary = dream_run(run, LAYER, "channel", 5, cfg, progress=False, model=model)
    start = pixels(run, f"media/dreams/{LAYER}/channel-00005/seed1-opt0000.png")
    prior = pixels(run, atlas_mod.image_rel(LAYER, "channel", "prior", "default", 5, 1))
    assert np.abs(start - prior).max() <= 1 and summary["seeds"] == [1]


def test_init_prior_without_a_prior_is_refused_and_writes_nothing(run, model):
    a, p, d = quick(units="5", priors=False)
    d.init = "prior"
    before = (run / "manifest.json").read_text()
    with pytest.raises(DifflensError, match="needs the prior of channel 5.*none is computed") as info:
        go(run, model, (a, p, d))
    assert "\n" not in str(info.value)
    assert not (run / "tables/atlas").exists() and not (run / "media").exists()
    assert (run / "manifest.json").read_text() == before


def test_heatmap_animation_of_the_top_example(run, model):
    a, p, d = quick(units="4-6", priors=False, dreams=False)
    a.heatmap_animations, a.kinds = True, ["channel", "feature"]
    go(run, model, (a, p, d))
    for unit in (4, 5, 6):
        gif = Image.open(run / f"media/atlas/{LAYER}/channel/heatmaps/unit-{unit:05d}.gif")
        assert gif.n_frames == STEPS and gif.size[0] >= 128  # one frame per denoising step
        frames = [np.asarray(gif.convert("RGB")) for _ in range(gif.n_frames) if gif.seek(_) is None]
        assert len({f.tobytes() for f in frames}) == STEPS
        # a feature of the random SAE that never fires: identical frames, which the GIF keeps as one
        assert (run / f"media/atlas/{LAYER}/feature/heatmaps/unit-{unit:05d}.gif").is_file()


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("change", "match"), [
    (lambda a, p, d: setattr(a, "units", "0-64"), r"units 0-64 are outside .*valid units are 0\.\.63"),
    (lambda a, p, d: setattr(a, "units", "top:x"), "top:N takes a positive count"),
    (lambda a, p, d: setattr(d, "targets", "0,7"), r"target step\(s\) \[7\] are outside the run's steps 0\.\.3"),
    (lambda a, p, d: setattr(d, "tv_weight", float("inf")), "dream.tv_weight must be a finite number"),
    (lambda a, p, d: setattr(p, "scale", float("nan")), "prior.scale must be a finite number"),
    (lambda a, p, d: setattr(d, "robustness", "extreme"), "unknown dream robustness preset 'extreme'"),
    (lambda a, p, d: setattr(a, "dream_variants", ["noisy"]), "unknown dream variant 'noisy'"),
    (lambda a, p, d: setattr(a, "layers", ["down_blocks.9"]), "no analysed layer 'down_blocks.9'"),
    (lambda a, p, d: setattr(p, "steps", "2-9"), "step window 2-9 is outside 0..3"),
])
def test_bad_input_is_one_line_and_writes_nothing(run, model, change, match):
    cfgs = quick()
    change(*cfgs)
    before = (run / "manifest.json").read_text()
    with pytest.raises(DifflensError, match=match) as info:
        go(run, model, cfgs)
    assert "\n" not in str(info.value)
    assert not (run / "tables/atlas").exists() and not (run / "media").exists() and not (run / "_done").exists()
    assert (run / "manifest.json").read_text() == before


def test_gif_writer_upscales_and_keeps_every_frame(tmp_path):
    from backend.interventions.animations import heatmap_frames, write_gif

    frames = heatmap_frames(np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4), size=(16, 16))
    assert frames[0].shape == (16, 16, 3) and frames[0].sum() < frames[-1].sum()  # one scale over all frames
    rel = write_gif(tmp_path, "a/b.gif", frames, 50)
    gif = Image.open(io.BytesIO(Path(tmp_path / rel).read_bytes()))
    assert gif.n_frames == 3 and gif.size == (128, 128)


# ------------------------------------------------------------------------------------------------ thumbnails
def test_every_atlas_image_has_its_thumbnail_beside_it(run, model):
    from backend.run.schema import ATLAS_THUMB_PX, atlas_thumbnail

    go(run, model, quick(units="5"))
    rows = table(run)
    assert rows.height == 2 + 2 * 2  # priors of 2 seeds, dreams of 2 variants x 2 seeds
    for rel in rows["image"]:
        thumb = run / atlas_thumbnail(rel)
        assert thumb.name == Path(rel).name.replace(".png", ".thumb.jpg")
        small = Image.open(thumb)
        assert small.format == "JPEG" and max(small.size) <= ATLAS_THUMB_PX
        image = pixels(run, rel)
        assert small.size == image.shape[1::-1]  # the demo's 16 px images keep their size
        assert np.abs(np.asarray(small.convert("RGB"), np.int16) - image).mean() < 12  # the same picture


def test_a_large_image_gets_a_reduced_thumbnail(tmp_path):
    from backend.interventions.media import thumbnail_jpeg, write_with_thumbnail
    from backend.run.schema import ATLAS_THUMB_PX, atlas_thumbnail
    from backend.run.store import RunStore

    image = np.zeros((512, 384, 3), np.uint8)
    image[:, 192:] = 255  # right half white
    rel = write_with_thumbnail(RunStore(tmp_path), "media/atlas/a/b.png", image)
    small = np.asarray(Image.open(tmp_path / atlas_thumbnail(rel)).convert("L"), np.int16)
    assert small.shape == (ATLAS_THUMB_PX, 96)
    assert small[:, :40].max() < 30 and small[:, -40:].min() > 225
    assert Image.open(io.BytesIO(thumbnail_jpeg(image[:64, :32]))).size == (32, 64)  # never enlarged
    assert atlas_thumbnail("media/atlas/l/k/dream-default/unit-00003-seed1-step4.png") == (
        "media/atlas/l/k/dream-default/unit-00003-seed1-step4.thumb.jpg")


# ------------------------------------------------------------------------------------------------ per-kind [dream]
def test_per_kind_dream_tables_set_their_kinds_settings_only(run, model):
    cfg = DreamConfig(lr=0.1, channel={"lr": 0.5, "robustness": "strong"}, feature={"tv_weight": 1.5})
    channel, feature, other_sae = (dreams.for_kind(cfg, k) for k in ("channel", "feature", "feature.k4"))
    assert (channel.lr, channel.jitter, channel.tv_weight) == (0.5, 2, 0.125)  # its table, its preset, kind default
    assert (feature.lr, feature.jitter, feature.tv_weight) == (0.1, 1, 1.5)
    assert other_sae == feature and channel.channel == channel.feature == {}
    a, p, d = quick(units="5", dream_variants=["default"])
    d.channel = {"opt_steps": 2, "seeds": [1]}
    go(run, model, (a, p, d))
    dreamt = table(run).filter(pl.col("what") == "dream")
    assert dreamt["seed"].to_list() == [1]
    snapshots = Image.open(run / dreamt["animation"][0])
    assert snapshots.n_frames == 3  # iterations 0, 1, 2: the channel table's opt_steps


@pytest.mark.parametrize(("table_", "match"), [
    ({"lr_start": 0.1}, r"\[dream.feature\]: unknown key\(s\) lr_start; valid keys: .*blur_kernel"),
    ({"tv_weight": float("inf")}, "dream.feature.tv_weight must be a finite number"),
    ({"robustness": "wild"}, "unknown dream robustness preset 'wild'"),
    ({"lr": "fast"}, r"\[dream.feature\]: lr must be float \| None"),
])
def test_bad_per_kind_dream_settings_are_one_line_errors_that_write_nothing(run, model, table_, match):
    a, p, d = quick()  # channels only: a bad [dream.feature] is refused all the same
    with pytest.raises(DifflensError, match=match) as info:
        d.feature = table_
        d.__post_init__()
        go(run, model, (a, p, d))
    assert "\n" not in str(info.value)
    assert not (run / "tables/atlas").exists() and not (run / "media").exists()
