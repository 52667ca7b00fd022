"""The shipped demo model loads through the common loader and follows its prompts."""

import pytest

from backend.demo.evaluate import evaluate
from backend.models import load_model


@pytest.mark.slow
def test_shipped_demo_model_follows_prompts():
    model = load_model("demo")
    assert model.family == "demo" and model.default_guidance > 1  # CFG on by default
    report = evaluate(model, n=120, seed=2024)
    acc = report["accuracy"]
    assert acc["colour"] >= 0.9 and acc["shape"] >= 0.9 and acc["position"] >= 0.9, acc


def test_shipped_weights_are_safetensors_only():
    from backend.models.demo import DEMO_DIR

    files = {p.suffix for p in DEMO_DIR.rglob("*") if p.is_file()}
    assert ".safetensors" in files and not files & {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
