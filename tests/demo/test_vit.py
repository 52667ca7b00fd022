"""The demo ViT: classes, held-out split, preprocessing, deterministic training, and the shipped data/demo-vit."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from backend.demo import shapes, vit
from backend.errors import DifflensError
from cli import app

TINY = {"hidden": 16, "layers": 1, "heads": 2, "mlp": 32, "steps": 6, "batch_size": 8, "eval_images": 24,
        "warmup": 2}


def test_classes_and_the_held_out_split():
    assert vit.class_names("shape") == ["circle", "square", "triangle"]
    names = vit.class_names("shape-colour")
    assert len(names) == 12 and names[0] == "red-circle" and len(set(names)) == 12
    train, held = vit.split_specs()
    assert len(train) + len(held) == len(shapes.all_specs()) == 360 and not set(train) & set(held)
    # every class keeps 24 combinations for training and holds 6 out; the split is fixed
    for name in names:
        assert sum(vit.class_of(s, "shape-colour") == name for s in held) == 6
    assert vit.split_specs() == (train, held)


def test_the_saved_image_processor_gives_the_pixel_values_training_used(tmp_path):
    from transformers import AutoImageProcessor

    vit.image_processor().save_pretrained(tmp_path)
    images = vit.render_images(shapes.all_specs()[:5], np.random.default_rng(0))
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    got = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
    assert torch.allclose(got, vit.pixel_values(images), atol=1e-6)


def test_shifts_move_the_shape_and_repeat_the_edge():
    img = vit.render_images([shapes.ShapeSpec("red", "square", "small", "center", "black")],
                            np.random.default_rng(0), noise=0)
    moved = vit.shifted(img.astype(np.float32), np.array([[2, -3]]))
    assert np.array_equal(moved[0, 2:, :-3], img[0, :-2, 3:].astype(np.float32))
    assert np.array_equal(moved[0, :2], np.repeat(moved[0, 2:3], 2, axis=0))


def test_a_tiny_training_is_deterministic_and_saves_a_loadable_model(tmp_path):
    a = vit.train_demo_vit(vit.DemoViTConfig(out=str(tmp_path / "a"), classes="shape", **TINY), progress=False)
    b = vit.train_demo_vit(vit.DemoViTConfig(out=str(tmp_path / "b"), classes="shape", **TINY), progress=False)
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["heldout_accuracy"] == b["heldout_accuracy"] and a["n_classes"] == 3
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "config.json", "metrics.json", "model.safetensors", "preprocessor_config.json"]
    assert not list(tmp_path.glob(".*"))  # no staging directory left
    model = vit.load_demo_vit(tmp_path / "a")
    assert model.config.id2label == {0: "circle", 1: "square", 2: "triangle"}
    # the saved model is the trained one: it reproduces its recorded accuracy on the same held-out images
    assert vit.heldout_accuracy(model, 24, seed=1) == pytest.approx(a["heldout_accuracy"])
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["config"]["steps"] == 6


@pytest.mark.parametrize(("change", "message"), [
    ({"classes": "size"}, "unknown --classes 'size'"),
    ({"hidden": 30, "heads": 4}, "--hidden 30 must be a multiple of --heads 4"),
    ({"steps": 0}, "--steps must be at least 1"),
])
def test_bad_settings_are_one_line_errors_before_anything_is_written(tmp_path, change, message):
    with pytest.raises(DifflensError, match=message):
        vit.train_demo_vit(vit.DemoViTConfig(out=str(tmp_path / "m"), **{**TINY, **change}), progress=False)
    assert not (tmp_path / "m").exists()


def test_cli_refuses_an_out_that_is_a_file_and_a_missing_model_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    result = CliRunner().invoke(app, ["train-demo-vit", "--out", str(tmp_path / "f")])
    assert result.exit_code == 1 and "--out" in result.output and "is a file" in result.output
    with pytest.raises(DifflensError, match="no demo ViT in .*train one with `python cli.py train-demo-vit"):
        vit.load_demo_vit(tmp_path / "nothing")


@pytest.mark.slow
def test_the_shipped_demo_vit_is_small_and_classifies_fresh_held_out_images():
    files = {p.name: p.stat().st_size for p in vit.DEMO_VIT_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "metrics.json"} <= set(files)
    assert sum(files.values()) < 2_000_000
    model = vit.load_demo_vit()
    assert model.config.num_labels == 12
    # images it never saw: held-out attribute combinations, new noise (another seed than the recorded figure's)
    acc = vit.heldout_accuracy(model, n=600, seed=1234)
    assert acc >= 0.95
    assert vit.metrics_of()["heldout_accuracy"] >= 0.95
