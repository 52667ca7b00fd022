"""Image classifiers as models: recognition, loading, hook points, the token choice and the hidden-state table."""

import pytest
import torch
from tiny_classifiers import build_tiny_siglip
from typer.testing import CliRunner

from backend.errors import DifflensError
from backend.models import load_model, model_kind
from backend.models.classifier import is_image_classifier
from backend.models.hooks import HIDDEN_OUTPUT, Stream, edit_activations, read_activations
from backend.models.layers import hook_points


def images(folder, n=2):
    return [str(p) for p in sorted(folder.rglob("*.png"))[:n]]


def test_a_classifier_directory_is_recognised_from_its_config(vit_dir, untrained_demo_dir, tmp_path):
    assert is_image_classifier(vit_dir) and model_kind(str(vit_dir)) == "classifier"
    assert not is_image_classifier(untrained_demo_dir) and model_kind(str(untrained_demo_dir)) == "diffusion"
    assert model_kind("demo") == "diffusion" and not is_image_classifier(tmp_path / "missing")
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    assert not is_image_classifier(tmp_path)


def test_layers_lists_blocks_with_their_attention_and_mlp(vit_dir):
    model = load_model(str(vit_dir))
    assert model.model_kind == "classifier" and model.labels == ["red", "blue"]
    points = {p.name: p for p in hook_points(model)}
    assert list(points) == ["vit.layers.0", "vit.layers.0.attention", "vit.layers.0.mlp",
                            "vit.layers.1", "vit.layers.1.attention", "vit.layers.1.mlp"]
    assert points["vit.layers.1"].shape == (17, 16) and points["vit.layers.1"].sae_target  # CLS + 4x4 patches
    assert not points["vit.layers.1.attention"].sae_target
    result = CliRunner().invoke(__import__("cli").app, ["layers", "--model", str(vit_dir)])
    assert result.exit_code == 0, result.output
    assert "* vit.layers.1 " in result.output and "vit.layers.1.attention" in result.output


def test_the_attention_output_is_its_hidden_state_by_the_class_table(vit_dir):
    model = load_model(str(vit_dir))
    assert HIDDEN_OUTPUT["ViTAttention"] == 0
    stream = Stream.of(model, "vit.layers.0.attention")
    assert stream.hidden == 0
    hidden, weights = torch.ones(1, 17, 16), torch.zeros(1, 2, 17, 17)
    assert stream.output((hidden, weights)) is hidden
    new = stream.replace((hidden, weights), hidden * 2)
    assert torch.equal(new[0], hidden * 2) and new[1] is weights


@pytest.mark.parametrize("choice, n_tokens, spatial, prefix", [("cls", 1, None, 0), ("patch", 16, (4, 4), 0),
                                                               ("all", 17, (4, 4), 1)])
def test_the_token_choice_picks_cls_patches_or_both(vit_dir, image_folder, choice, n_tokens, spatial, prefix):
    model = load_model(str(vit_dir))
    model.check_tokens(choice)
    events, full = [], []
    with read_activations(model, ["vit.layers.1"], events.append):
        model.generate(images(image_folder))
    handle = model.denoiser.get_submodule("vit.layers.1").register_forward_hook(lambda m, a, out: full.append(out))
    model.generate(images(image_folder))
    handle.remove()
    ev = events[0]
    assert ev.tokens.shape == (2, n_tokens, 16) and ev.spatial == spatial and ev.prefix == prefix and ev.step == 0
    want = {"cls": full[0][:, :1], "patch": full[0][:, 1:], "all": full[0]}[choice]
    assert torch.equal(ev.tokens, want)  # patch tokens keep their row-major grid order


def test_generate_returns_the_inputs_as_seen_and_keeps_the_logits(vit_dir, image_folder):
    from PIL import Image

    model = load_model(str(vit_dir))
    paths = images(image_folder)
    shown = model.generate(paths)
    assert shown.shape == (2, 3, 16, 16) and 0 <= float(shown.min()) and float(shown.max()) <= 1
    assert model.last_logits.shape == (2, 2)
    resized = torch.tensor(list(Image.open(paths[0]).convert("RGB").resize((16, 16), 2).getdata())).float() / 255
    assert torch.allclose(shown[0].permute(1, 2, 0).reshape(-1, 3), resized, atol=1 / 255 + 1e-6)


def test_steering_edits_reach_the_logits(vit_dir, image_folder):
    model = load_model(str(vit_dir))
    pixels = model.pixel_values(images(image_folder))
    clean = model.classify(pixels)
    with edit_activations(model, "vit.layers.1", lambda tok, step: tok + 5.0):
        edited = model.classify(pixels)
    assert not torch.allclose(clean, edited)
    assert torch.equal(model.classify(pixels), clean)  # the hook is gone


def test_a_model_without_cls_refuses_the_cls_token_in_one_line(tmp_path):
    model = load_model(str(build_tiny_siglip(tmp_path / "siglip")))
    assert model.blocks() == ["vision_model.encoder.layers.0", "vision_model.encoder.layers.1"]
    assert model.prefix_tokens == 0 and not model.has_cls
    with pytest.raises(DifflensError) as exc:
        model.check_tokens("cls")
    assert "has no CLS token" in str(exc.value) and "--tokens patch" in str(exc.value) and "\n" not in str(exc.value)
    assert model.check_tokens("patch") == "patch"
    with pytest.raises(DifflensError, match="unknown token choice"):
        model.check_tokens("pooled")


def test_an_unreadable_or_missing_weights_directory_is_one_line(vit_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(vit_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(DifflensError) as exc:
        load_model(str(broken))
    assert "could not load" in str(exc.value) and "\n" not in str(exc.value)


def test_the_splice_test_scores_the_classes(vit_dir, image_folder):
    from backend.models.classifier import splice_test

    model = load_model(str(vit_dir))
    paths = images(image_folder, 4)
    classes = ["blue" if "blue" in p else "red" for p in paths]
    model.check_tokens("patch")  # the patch tokens of the first block: the last block's reach no logit
    same = splice_test(model, "vit.layers.0", lambda x: x, paths, classes, batch_size=3)
    assert same.loss_spliced == pytest.approx(same.loss_clean, rel=1e-5) and same.n_samples == 4
    zero = splice_test(model, "vit.layers.0", torch.zeros_like, paths, classes)
    assert zero.loss_spliced == pytest.approx(zero.loss_zero) and zero.loss_zero != pytest.approx(zero.loss_clean)
    other = splice_test(model, "vit.layers.0", lambda x: x, paths, ["a", "b", "a", "b"])  # not the model's labels
    assert other.loss_clean < same.loss_clean or other.loss_clean == pytest.approx(same.loss_clean)
