"""Shared fixtures: tiny pipelines of every family, built once per session into a temp dir."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_pipelines  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def sd_dir(tiny_root) -> Path:
    return tiny_pipelines.build_sd(tiny_root)


@pytest.fixture(scope="session")
def sd2_dir(tiny_root) -> Path:
    """SD 2.x flavour: v-prediction with an Euler scheduler."""
    return tiny_pipelines.build_sd(tiny_root, scheduler="euler", v_prediction=True)


@pytest.fixture(scope="session")
def sdxl_dir(tiny_root) -> Path:
    return tiny_pipelines.build_sdxl(tiny_root)


@pytest.fixture(scope="session")
def sdxl_turbo_dir(tiny_root) -> Path:
    return tiny_pipelines.build_sdxl(tiny_root, turbo=True)


@pytest.fixture(scope="session")
def pixart_dir(tiny_root) -> Path:
    return tiny_pipelines.build_pixart(tiny_root)


@pytest.fixture(scope="session")
def sd3_dir(tiny_root) -> Path:
    return tiny_pipelines.build_sd3(tiny_root)


@pytest.fixture(scope="session")
def flux_dir(tiny_root) -> Path:
    """FLUX.1-dev flavour: guidance embedding, dynamic shift."""
    return tiny_pipelines.build_flux(tiny_root)


@pytest.fixture(scope="session")
def flux_schnell_dir(tiny_root) -> Path:
    """FLUX.1-schnell flavour: no guidance input, fixed shift."""
    return tiny_pipelines.build_flux(tiny_root, guidance_distilled=False)


@pytest.fixture(scope="session")
def untrained_demo_dir(tiny_root) -> Path:
    """The demo architecture with random weights, saved like the shipped model."""
    from backend.models import demo

    torch.manual_seed(0)
    out = tiny_root / "demo-untrained"
    demo.new_pipeline().save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (restored after): for tests of the tiny demo model."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    """The shipped demo model, loaded once per module."""
    from backend.models import load_model

    return load_model("demo")


@pytest.fixture(scope="session")
def vit_dir(tiny_root) -> Path:
    """A tiny random ViTForImageClassification (16x16 images, 4x4 patches + CLS, width 16) with a preprocessor."""
    from tiny_classifiers import build_tiny_vit

    return build_tiny_vit(tiny_root / "tiny-vit")


@pytest.fixture(scope="session")
def image_folder(tiny_root) -> Path:
    """Two classes (red, blue) of 4 images each, one sub-folder per class."""
    from tiny_classifiers import write_image_folder

    return write_image_folder(tiny_root / "images", per_class=4)


@pytest.fixture(scope="session")
def negative_run(untrained_demo_dir, tmp_path_factory):
    """(run dir, layer): a demo run with negative prompts (condition_runs.negative_prompt_run); copy before writing."""
    from condition_runs import negative_prompt_run

    return negative_prompt_run(untrained_demo_dir, tmp_path_factory.mktemp("negative"))


@pytest.fixture(scope="session")
def controlnet_run(sd_dir, tmp_path_factory):
    """(run dir, layer): a tiny SD run through a ControlNet (condition_runs.controlnet_run); copy before writing."""
    from condition_runs import controlnet_run

    return controlnet_run(sd_dir, tmp_path_factory.mktemp("controlnet"))
