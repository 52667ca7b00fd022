"""Steered priors (backend/interventions/priors.py): a batch whose units' windows open at different steps branches
each row off its own seed's unsteered trajectory at its own first steered step (the shared prefix), and gives what
every row generated on its own gives."""

from __future__ import annotations

import torch
from intervention_runs import LAYER, STEPS

from backend.interventions import priors
from backend.interventions.directions import unit_direction
from backend.interventions.priors import PriorPlan, steered_priors

SEEDS = [3, 0]
WINDOWS = [(2, 3), (0,), (3,), (1, 3), (1, 2)]  # first steered steps 2, 0, 3, 1, 1; a gap at step 2 of (1, 3)
"""Steered steps of the batch's plans (STEPS = 4): windows opening at every step, one at the last step only."""


def plans() -> list[PriorPlan]:
    return [PriorPlan(unit, unit_direction("channel", unit, 64), 6.0 + unit, steps)
            for unit, steps in enumerate(WINDOWS)]


def denoiser_rows(model, fn) -> tuple[object, list[int]]:
    """(fn(), the batch size of every denoiser call fn made)."""
    sizes: list[int] = []
    handle = model.denoiser.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
    try:
        return fn(), sizes
    finally:
        handle.remove()


def test_the_demo_scheduler_shares_the_prefix(model):
    assert priors.shares_prefix(model)


def test_rows_branch_at_their_own_first_steered_step_and_equal_every_row_alone(model):
    (latents, images), sizes = denoiser_rows(model, lambda: steered_priors(model, LAYER, plans(), SEEDS, STEPS))
    # at step i: the seeds' unsteered rows while some row has not joined yet, plus every row already joined
    starts = [min(w) for w in WINDOWS for _ in SEEDS]
    assert sizes == [(len(SEEDS) if max(starts) > i else 0) + sum(s <= i for s in starts) for i in range(STEPS)]
    assert sum(sizes) < len(starts) * STEPS
    for u, plan in enumerate(plans()):
        for k, seed in enumerate(SEEDS):
            alone, _ = steered_priors(model, LAYER, [plan], [seed], STEPS)
            torch.testing.assert_close(latents[u * len(SEEDS) + k], alone[0], rtol=1e-3, atol=1e-4)  # batched kernels


def test_the_shared_prefix_equals_every_row_running_every_step(model, monkeypatch):
    shared, shared_images = steered_priors(model, LAYER, plans(), SEEDS, STEPS)
    monkeypatch.setattr(priors, "shares_prefix", lambda _model: False)
    (full, full_images), sizes = denoiser_rows(model, lambda: steered_priors(model, LAYER, plans(), SEEDS, STEPS))
    assert sizes == [len(WINDOWS) * len(SEEDS)] * STEPS
    torch.testing.assert_close(shared, full, rtol=1e-3, atol=1e-4)  # batched kernels
    assert abs(shared_images.astype(int) - full_images.astype(int)).max() <= 1


def test_a_row_joining_a_step_late_or_off_another_seed_would_differ(model):
    """The comparisons above can fail: a row that misses its first steered step, or branches off another seed's
    trajectory, gives another prior."""
    plan = plans()[0]
    right, _ = steered_priors(model, LAYER, [plan], [SEEDS[0]], STEPS)
    late = PriorPlan(plan.unit, plan.direction_C, plan.strength, plan.steps[1:])
    assert (right - steered_priors(model, LAYER, [late], [SEEDS[0]], STEPS)[0]).abs().max() > 1e-2
    assert (right - steered_priors(model, LAYER, [plan], [SEEDS[1]], STEPS)[0]).abs().max() > 1e-2
