"""The demo model's parts: word-level tokenizer, save/load round trip, resumable training."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from backend.errors import UnknownWordError
from backend.models import demo, load_model


def test_tokenizer_is_word_level_with_bos_eos_padding():
    tok = demo.build_tokenizer()
    ids = demo.tokenize(tok, ["a large red circle on the left, gray background", ""])
    assert ids.shape == (2, demo.MAX_TOKENS)
    vocab = tok.get_vocab()
    words = ["[BOS]", "a", "large", "red", "circle", "on", "the", "left", ",", "gray", "background", "[EOS]"]
    assert ids[0, : len(words)].tolist() == [vocab[w] for w in words]
    assert ids[0, len(words):].eq(vocab["[PAD]"]).all()
    assert ids[1, :2].tolist() == [vocab["[BOS]"], vocab["[EOS]"]]


def test_unknown_word_lists_the_vocabulary():
    with pytest.raises(UnknownWordError) as exc:
        demo.tokenize(demo.build_tokenizer(), ["a purple circle"])
    msg = str(exc.value)
    assert "'purple'" in msg and "red" in msg and "triangle" in msg and "\n" not in msg


def test_too_long_prompt_is_refused():
    with pytest.raises(UnknownWordError, match="at most"):
        demo.tokenize(demo.build_tokenizer(), ["a " * 20])


def test_unet_has_cross_attention_at_two_resolutions(untrained_demo_dir):
    from backend.models.layers import hook_points

    model = load_model(str(untrained_demo_dir))
    res = {p.shape[1] for p in hook_points(model) if p.module_type == "Transformer2DModel"}
    assert res == {4, 8}
    assert "up_blocks.1.attentions.1" in {p.name for p in hook_points(model)}


def test_saved_in_diffusers_layout_with_safetensors(untrained_demo_dir):
    index = json.loads((untrained_demo_dir / "model_index.json").read_text())
    assert index["_class_name"] == "DemoShapesPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert (untrained_demo_dir / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(untrained_demo_dir.rglob("*.bin"))


def _train(tmp_path, name, stop_at=0):
    from backend.demo.train import DemoTrainConfig, train_demo_model

    cfg = DemoTrainConfig(steps=4, batch_size=4, warmup=2, checkpoint_every=3, out_dir=str(tmp_path / name),
                          work_dir=str(tmp_path / f"work-{name}"), stop_at=stop_at)
    return train_demo_model(cfg)


def test_training_resumes_exactly(tmp_path):
    """4 steps straight == stop at step 2, then resume to 4 (weights, EMA, optimizer, RNG, loss log)."""
    straight = _train(tmp_path, "a")
    assert _train(tmp_path, "b", stop_at=2) is None
    assert not (tmp_path / "b").exists()
    resumed = _train(tmp_path, "b")
    a = load_file(str(straight / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = json.loads((tmp_path / "work-a" / "checkpoint" / "state.json").read_text())["losses"]
    lb = json.loads((tmp_path / "work-b" / "checkpoint" / "state.json").read_text())["losses"]
    assert la == lb and len(la) == 4
    assert np.isfinite(la).all()
