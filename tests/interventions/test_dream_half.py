"""Deep dream in half precision and in micro-batches (backend/interventions/dream.py): the demo model dreams in
bfloat16 and float16 on CPU; in float16 the backward pass is loss-scaled, so the gradient of a unit with tiny
activations does not underflow to zero (it does without scaling), and an overflowing scale backs off; micro-batches
(DreamConfig.micro_batch rows per backward) give the full batch's gradient."""

import pytest
import torch

from backend.interventions import dream
from backend.interventions.dream import default_config, dream_unit
from backend.models import load_model
from sae.model import SAE, SAEConfig

EARLY = "mid_block.attentions.0"
UNIT = 7


@pytest.fixture(scope="module")
def models():
    return {dtype: load_model("demo", dtype=dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)}


def quick(kind: str, **overrides):
    cfg = default_config(kind)
    cfg.opt_steps, cfg.snapshot_every, cfg.seeds = 3, 3, [0, 1]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def quiet_sae(factor: float = 1e-6) -> SAE:
    """A random SAE whose feature UNIT barely responds: its pre-activation, and so its gradient, is tiny."""
    sae = SAE(SAEConfig(d_in=64, n_latents=128, k=8))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_enc_T[UNIT] *= factor
        sae.b_enc[UNIT] = 0
    return sae.eval()


def gradient(model, kind: str, unit: int, sae=None, loss_scale: dream.LossScale | None = None, **overrides):
    """The dream's first gradient (penalties off: the objective's alone) at a fixed start."""
    cfg = dream.for_model(quick(kind, tv_weight=0.0, range_weight=0.0, moment_weight=0.0, seeds=[0, 1, 2],
                                **overrides), model)
    steps = [0, 5, 10]
    timestep_of = dict(zip(steps, dream.target_timesteps(model, steps, model.default_steps), strict=True))
    samples = [dream.DreamSample(unit, seed, tuple(steps)) for seed in cfg.seeds]
    with dream.frozen(model.denoiser, sae), dream.unguided(model):
        dreamer = dream._Dreamer(model, EARLY, kind, samples, timestep_of, cfg, sae, "output")
        if loss_scale is not None:
            dreamer.loss_scale = loss_scale
        x = dream.initial_latents_SCHW(model, cfg, None)
        return dreamer.gradient_SCHW(x), dreamer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_demo_dreams_in_half_precision_on_cpu(models, dtype):
    for kind, sae in (("channel", None), ("feature", quiet_sae(1.0))):
        result = dream_unit(models[dtype], EARLY, kind, 5, [0, 10], quick(kind), sae=sae)
        acts = [r["activation"] for r in result.rows]
        assert result.latents_SCHW.dtype == torch.float32 and torch.isfinite(result.latents_SCHW).all()
        assert all(a == a and abs(a) < float("inf") for a in acts)


def test_a_float16_gradient_of_tiny_activations_survives_with_loss_scaling(models):
    sae = quiet_sae()
    reference, _ = gradient(models[torch.float32], "feature", UNIT, sae)
    assert 0 < reference.abs().max() < 6e-8  # below float16's smallest subnormal (6e-8)
    unscaled, _ = gradient(models[torch.float16], "feature", UNIT, sae, loss_scale=dream.LossScale(enabled=False))
    assert unscaled.abs().max() == 0  # underflow: the dream would not move
    scaled, dreamer = gradient(models[torch.float16], "feature", UNIT, sae)
    assert dreamer.loss_scale.enabled and dreamer.loss_scale.scale >= 2 ** 16
    assert torch.isfinite(scaled).all() and scaled.abs().max() > 0
    cosine = torch.nn.functional.cosine_similarity(scaled.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.9, cosine


def test_loss_scaling_is_for_float16_only(models):
    for dtype in (torch.float32, torch.bfloat16):
        _, dreamer = gradient(models[dtype], "channel", 5)
        assert not dreamer.loss_scale.enabled


def test_an_overflowing_loss_scale_backs_off(models):
    """A scale that makes the float16 backward overflow (inf) is halved until the gradient is finite."""
    normal, _ = gradient(models[torch.float16], "channel", 5)
    huge = dream.LossScale(enabled=True, scale=2.0 ** 40)
    backed_off, dreamer = gradient(models[torch.float16], "channel", 5, loss_scale=huge)
    assert dreamer.loss_scale.scale < 2.0 ** 40 and dreamer.loss_scale.backoffs > 0
    assert torch.isfinite(backed_off).all()
    torch.testing.assert_close(backed_off, normal, rtol=2e-2, atol=2e-2 * float(normal.abs().max()))


@pytest.mark.parametrize("kind", ["channel", "feature"])
def test_micro_batches_give_the_full_batchs_gradient(models, kind):
    model = models[torch.float32]
    sae = quiet_sae(1.0) if kind == "feature" else None
    full, _ = gradient(model, kind, 5, sae)
    sizes = []
    handle = model.denoiser.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        chunked, _ = gradient(model, kind, 5, sae, micro_batch=2)
    finally:
        handle.remove()
    assert max(sizes) == 2 and sum(sizes) == 9  # 3 seeds x 3 target steps, 2 rows per backward
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-6 * float(full.abs().max()))


def test_a_micro_batched_dream_matches_the_full_one(models):
    model = models[torch.float32]
    full = dream_unit(model, EARLY, "channel", 5, [0, 10], quick("channel"))
    chunked = dream_unit(model, EARLY, "channel", 5, [0, 10], quick("channel", micro_batch=1))
    torch.testing.assert_close(chunked.latents_SCHW, full.latents_SCHW, rtol=1e-3, atol=1e-4)
    assert chunked.config.micro_batch == 1
