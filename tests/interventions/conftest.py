"""Fixtures shared by the interventions tests."""

import pytest
from intervention_runs import random_sae


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """The demo model's batches are tiny: one thread is as fast, and spares cores other jobs share."""


@pytest.fixture(scope="module")
def sae():
    """A random folded SAE of the demo layer with nonzero biases (intervention_runs.random_sae)."""
    return random_sae()


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
