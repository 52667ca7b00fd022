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
