"""Class steering: a direction added at an image classifier's layer moves its predictions, measured per strength."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from backend.demo import vit
from backend.demo.images import write_demo_images
from backend.errors import DifflensError
from backend.interventions.class_steer import (
    class_steer_run,
    class_steering,
    mean_token_norm,
    resolve_module,
    steer_best_units,
    summary_rows,
)
from cli import app
from sae.io import save_sae
from sae.model import SAE, SAEConfig

LAST = "vit.encoder.layer.1"
SMALL = vit.DemoViTConfig(hidden=32, layers=2, heads=2, mlp=64)


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return vit.new_vit(SMALL).eval()


@pytest.fixture(scope="module")
def pixels():
    specs = vit.split_specs()[0][:: 24]
    return vit.pixel_values(vit.render_images(specs, np.random.default_rng(0)))


def test_strength_zero_is_the_unsteered_model_bit_for_bit(tiny_vit, pixels):
    r = class_steering(tiny_vit, pixels, "vit.encoder.layer.0", torch.randn(32), [0.0, 5.0])
    assert torch.equal(r.logits_SNC[0], r.baseline_logits_NC)
    assert torch.equal(r.baseline_logits_NC, tiny_vit(pixel_values=pixels).logits)
    assert not torch.equal(r.logits_SNC[1], r.baseline_logits_NC)


def test_patch_tokens_of_the_last_layer_cannot_move_the_cls_head(tiny_vit, pixels):
    """The head reads token 0 only: steering the patch tokens of the last layer leaves the logits as they were,
    steering the CLS token does not."""
    d = torch.randn(32)
    patch = class_steering(tiny_vit, pixels, LAST, d, [50.0], tokens="patch")
    cls = class_steering(tiny_vit, pixels, LAST, d, [50.0], tokens="cls")
    assert torch.equal(patch.logits_SNC[0], patch.baseline_logits_NC)
    assert (cls.logits_SNC[0] - cls.baseline_logits_NC).abs().max() > 0.01


def test_a_huge_step_along_a_head_row_makes_every_image_the_class_the_head_gives_that_row(tiny_vit, pixels):
    head, norm = tiny_vit.classifier, tiny_vit.vit.layernorm
    for c in range(3):
        d = head.weight[c].detach()
        with torch.no_grad():
            expected = int(head(norm(1e4 * d / d.norm())).argmax())
        r = class_steering(tiny_vit, pixels, LAST, d, [1e4], tokens="cls")
        assert (r.logits_SNC[0].argmax(-1) == expected).all()
        name = r.class_names[expected]
        away = float((r.baseline_pred_N != expected).float().mean())
        rows = [x for x in summary_rows(r, name) if x["class_label"] == name]
        assert rows[0]["target_share"] == 1.0 and rows[0]["changed"] == pytest.approx(away)
        assert rows[0]["flip_rate"] == 1.0 or (away == 0 and np.isnan(rows[0]["flip_rate"]))


def test_summary_has_one_row_per_strength_and_class_and_shares_add_up(tiny_vit, pixels):
    r = class_steering(tiny_vit, pixels, "vit.layers.0", torch.randn(32), [1.0, 30.0], tokens="all")
    rows = pl.DataFrame(summary_rows(r, r.class_names[2]))
    assert rows.height == 2 * len(r.class_names) == 24
    assert rows["class_label"].to_list()[:12] == vit.class_names("shape-colour")
    for (_,), part in rows.group_by(["strength"]):
        assert part["share"].sum() == pytest.approx(1.0) and part["baseline_share"].sum() == pytest.approx(1.0)
        assert part["changed"].n_unique() == 1 and part["images"][0] == len(pixels)
    gain = (r.logits_SNC[1] - r.baseline_logits_NC).mean(0)
    assert r.rising_class() == r.class_names[int(gain.argmax())]


def test_token_norm_is_the_mean_over_the_chosen_tokens(tiny_vit, pixels):
    out = {}
    h = resolve_module(tiny_vit, LAST).register_forward_hook(lambda m, i, o: out.setdefault("h", o))
    with torch.no_grad():
        tiny_vit(pixel_values=pixels)
    h.remove()
    assert mean_token_norm(tiny_vit, pixels, LAST, "cls") == pytest.approx(float(out["h"][:, 0].norm(dim=-1).mean()))
    assert mean_token_norm(tiny_vit, pixels, LAST, "patch") == pytest.approx(
        float(out["h"][:, 1:].norm(dim=-1).mean()))


def test_bad_input_is_a_one_line_error(tiny_vit, pixels):
    with pytest.raises(DifflensError, match=r"no layer 'vit.encoder.layer.9'; its encoder layers: vit.layers.0, "):
        class_steering(tiny_vit, pixels, "vit.encoder.layer.9", torch.randn(32), [1.0])
    with pytest.raises(DifflensError, match="the direction has 16 channels but vit.layers.0 has 32"):
        class_steering(tiny_vit, pixels, "vit.layers.0", torch.randn(16), [1.0])
    with pytest.raises(DifflensError, match="unknown token choice 'both'"):
        class_steering(tiny_vit, pixels, LAST, torch.randn(32), [1.0], tokens="both")
    with pytest.raises(DifflensError, match="at least one strength"):
        class_steering(tiny_vit, pixels, LAST, torch.randn(32), [])
    with pytest.raises(DifflensError, match="zero or not finite"):
        class_steering(tiny_vit, pixels, LAST, torch.zeros(32), [1.0])


# ------------------------------------------------------------------------------------------------ on a run
def make_classifier_run(root: Path, model_dir: Path, tokens: str = "all", kind: str = "classifier") -> Path:
    """A minimal image-classifier run by the run-format contract: manifest (model_kind, config.model / images /
    capture.tokens), generations with image_path (relative to the images dir) and class_label, one SAE."""
    images = root / "images-src"
    if not images.exists():
        write_demo_images(images, n=24, progress=False)
    run = root / f"run-{kind}-{tokens}"
    paths = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    gens = pa.table({"gen_id": pa.array(range(len(paths)), pa.int32()), "prompt": paths,
                     "group": [p.split("/")[0] for p in paths], "image_path": paths,
                     "class_label": [p.split("/")[0] for p in paths]})
    (run / "tables" / "generations").mkdir(parents=True)
    pq.write_table(gens, run / "tables" / "generations" / "part-0000000.parquet")
    manifest = {"format_version": 3, "config": {"model": str(model_dir), "images": str(images),
                                                "capture": {"tokens": tokens}}}
    if kind:
        manifest["model_kind"] = kind
    (run / "manifest.json").write_text(json.dumps(manifest))
    torch.manual_seed(1)
    save_sae(SAE(SAEConfig(d_in=32, n_latents=64, k=4, layer=LAST)).eval(), run / "sae" / LAST / "default")
    return run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_vit):
    out = tmp_path_factory.mktemp("tiny-vit")
    vit.save_demo_vit(tiny_vit, out, {})
    return out


def test_a_run_unit_is_steered_on_the_runs_images_into_a_table_and_figure(tmp_path, model_dir):
    run = make_classifier_run(tmp_path, model_dir)
    r = class_steer_run(run, LAST, "feature", 3, [1.0, 4.0], n_images=10)
    assert r.target_source == "rising"
    table = pl.read_parquet(r.table)
    assert r.table.parent == run / "tables" / "class_steering" / f"layer={LAST}" / "kind=feature"
    assert table.height == 2 * 12 and set(table["images"]) == {10} and set(table["tokens"]) == {"all"}
    assert table["scale"].unique().sort().to_list() == [1.0, 4.0]
    ratio = table["strength"] / table["scale"]
    assert ratio.max() == pytest.approx(ratio.min(), rel=1e-5) and ratio.min() > 0  # x the mean token norm
    assert Image.open(r.figure).size == (760, 330)
    # a concepts table naming the unit's best class gives the default target
    concepts = run / "tables" / "concepts" / f"layer={LAST}" / "kind=feature"
    concepts.mkdir(parents=True)
    pl.DataFrame({"concept": ["class=blue-square", "class=red-circle", "class=green-square"], "unit": [3, 3, 4],
                  "auroc": [0.7, 0.9, 0.99], "step": [0, 0, 0], "rank": [1, 1, 1]}).write_parquet(
        concepts / "part-0000000.parquet")
    r2 = class_steer_run(run, LAST, "feature", 3, [2.0], n_images=4)
    assert (r2.target, r2.target_source) == ("red-circle", "concepts")



def test_every_class_best_unit_is_steered_towards_its_class(tmp_path, model_dir):
    run = make_classifier_run(tmp_path, model_dir)
    with pytest.raises(DifflensError, match="has no concepts table for vit.encoder.layer.1/channel; run `python cli"):
        steer_best_units(run, LAST, "channel")
    concepts = run / "tables" / "concepts" / f"layer={LAST}" / "kind=channel"
    concepts.mkdir(parents=True)
    pl.DataFrame({"concept": ["class=blue-square", "class=blue-square", "class=red-circle", "shape=circle"],
                  "unit": [4, 9, 7, 1], "auroc": [0.9, 0.8, 0.7, 0.99], "step": [0] * 4, "rank": [1, 2, 1, 1]}
                 ).write_parquet(concepts / "part-0000000.parquet")
    out = steer_best_units(run, LAST, "channel", scales=[1.0, 3.0], n_images=8)
    assert out.select("class_label", "unit", "scale").rows() == [
        ("blue-square", 4, 1.0), ("blue-square", 4, 3.0), ("red-circle", 7, 1.0), ("red-circle", 7, 3.0)]
    shards = sorted((run / "tables" / "class_steering" / f"layer={LAST}" / "kind=channel").glob("*.parquet"))
    assert [f.name[:13] for f in shards] == ["channel-00004", "channel-00007"]
    written = pl.read_parquet(shards[0]).filter(pl.col("class_label") == "blue-square")
    assert written["flip_rate"].to_list() == out["flip_rate"].to_list()[:2]
    assert set(written["target_source"]) == {"given"}

def test_the_cli_prints_the_target_row_per_strength(tmp_path, model_dir):
    run = make_classifier_run(tmp_path, model_dir, tokens="cls")
    result = CliRunner().invoke(app, ["steer-classes", "--run", str(run), "--layer", LAST, "--kind", "channel",
                                      "--unit", "5", "--strengths", "1,8", "--target", "green-circle",
                                      "--images", "6"])
    assert result.exit_code == 0, result.output
    assert "steered channel 5 of vit.encoder.layer.1 on 6 images (cls tokens); target green-circle (given)" \
        in result.output
    assert len([ln for ln in result.output.splitlines() if ln.strip().startswith(("1 ", "8 "))]) == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--kind", "channel", "--unit", "32"], "unknown channel 32 of vit.encoder.layer.1: valid channels are 0..31"),
    (["--kind", "feature", "--unit", "64"], "unknown feature 64"),
    (["--kind", "feature.k8", "--unit", "1"], "has no SAE for vit.encoder.layer.1 (kind feature.k8)"),
    (["--unit", "1", "--target", "purple-star"], "unknown class 'purple-star'; the model's classes: red-circle"),
    (["--unit", "1", "--strengths", "1,x"], "--strengths '1,x' not understood"),
    (["--unit", "1", "--tokens", "both"], "unknown token choice 'both'"),
    (["--unit", "1", "--layer", "vit.encoder.layer.7"], "no layer 'vit.encoder.layer.7'"),
    (["--unit", "1", "--strengths", ","], "give finite strengths"),
    (["--unit", "1", "--images", "0"], "--images must be at least 1"),
])
def test_bad_run_input_is_one_line_and_writes_nothing(tmp_path, model_dir, args, message):
    run = make_classifier_run(tmp_path, model_dir)
    result = CliRunner().invoke(app, ["steer-classes", "--run", str(run), "--layer", LAST, *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (run / "tables" / "class_steering").exists() and not (run / "media").exists()


def test_a_diffusion_run_and_a_plain_directory_are_refused(tmp_path, model_dir):
    run = make_classifier_run(tmp_path, model_dir, kind="")
    with pytest.raises(DifflensError, match="is a diffusion run; steer-classes needs an image-classifier run"):
        class_steer_run(run, LAST, "channel", 0)
    with pytest.raises(DifflensError, match="is not a run directory"):
        class_steer_run(tmp_path, LAST, "channel", 0)


@pytest.mark.slow
def test_on_the_demo_vit_a_class_mean_difference_direction_flips_other_classes_to_it():
    """The shipped demo ViT, its middle layer: the mean CLS activation of a class minus that of the others
    (measured on one set of held-out images) added at the CLS token of another set turns most of those images
    into that class; a random direction of the same strength turns almost none."""
    model = vit.load_demo_vit()
    names = vit.class_names("shape-colour")
    _, held = vit.split_specs()
    layer = "vit.encoder.layer.2"

    def images(seed):
        rng = np.random.default_rng(seed)
        specs = [held[i] for i in rng.integers(len(held), size=240)]
        labels = torch.tensor([names.index(vit.class_of(s, "shape-colour")) for s in specs])
        return vit.pixel_values(vit.render_images(specs, rng)), labels

    fit_px, fit_labels = images(11)
    acts = {}
    hook = resolve_module(model, layer).register_forward_hook(lambda m, i, o: acts.setdefault("h", o))
    with torch.no_grad():
        model(pixel_values=fit_px)
    hook.remove()
    cls_ND = acts["h"][:, 0]
    px, labels = images(12)
    strength = 2 * mean_token_norm(model, px, layer, "cls")
    torch.manual_seed(0)
    flips, controls = [], []
    for t, target in enumerate(names):
        d = cls_ND[fit_labels == t].mean(0) - cls_ND[fit_labels != t].mean(0)
        others = px[labels != t]
        r = class_steering(model, others, layer, d, [strength], tokens="cls")
        control = class_steering(model, others, layer, torch.randn(64), [strength], tokens="cls")
        assert r.rising_class() == target
        flips.append(r.flip_rate(target, 0))
        controls.append(control.flip_rate(target, 0))
    assert min(flips) >= 0.8 and np.mean(flips) >= 0.9, flips
    assert np.mean(controls) <= 0.05, controls
