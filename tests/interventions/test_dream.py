"""Deep dream (backend/interventions/dream.py): activations rise over the optimisation for channels and features, each
regulariser does what it says, latent-space models (SD, PixArt) dream at their own fitted latent scale and in half
precision, the model is left as it was, bad input is a one-line DifflensError, and `dream_run` writes the dreams
table and its images into a real (tiny) run directory opened through its RunContext."""

import dataclasses
import json

import numpy as np
import polars as pl
import pytest
import torch

from backend.errors import DifflensError
from backend.interventions import dream
from backend.interventions.dream import DreamConfig, default_config, dream_run, dream_unit
from backend.models import load_model
from backend.run.config import RunConfig
from backend.run.context import open_run
from sae.model import SAE, SAEConfig

EARLY = "mid_block.attentions.0"  # 4x4 tokens, 64 channels: the forward stops half way, so dreams are quick
LATE = "up_blocks.1.attentions.1"  # 8x8 tokens, 64 channels


def quick(kind: str, **overrides) -> DreamConfig:
    cfg = default_config(kind)
    cfg.opt_steps, cfg.snapshot_every, cfg.seeds = 12, 4, [0, 1]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def random_sae(d_in: int = 64, n_latents: int = 128, k: int = 8) -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, n_latents=n_latents, k=k))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    return sae.eval()


def by_opt_step(rows: list[dict], key: str = "activation") -> dict[int, np.ndarray]:
    """opt_step -> values of every (target step, seed) row at that snapshot, in a fixed order."""
    out: dict[int, list] = {}
    for r in sorted(rows, key=lambda r: (r["opt_step"], r["step"], r["seed"])):
        value = r[key] if key == "activation" else json.loads(r["penalties"])[key]
        out.setdefault(r["opt_step"], []).append(value)
    return {k: np.asarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- objective
def test_channel_dream_raises_the_channel_at_every_target_step_and_seed(model):
    cfg = quick("channel")
    result = dream_unit(model, EARLY, "channel", 5, [0, 10], cfg)
    acts = by_opt_step(result.rows)
    assert sorted(acts) == [0, 4, 8, 12]
    assert len(result.rows) == 4 * 2 * 2  # snapshots x target steps x seeds
    assert (acts[12] > acts[0] + 0.2).all(), acts  # every (step, seed) row rises
    assert acts[12].mean() > acts[4].mean() > acts[0].mean()
    assert set(result.images) == {(s, k) for s in (0, 1) for k in (0, 4, 8, 12)}
    img = result.images[(1, 12)]
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert result.latents_SCHW.shape == (2, 3, 16, 16)
    assert result.timesteps == [999, 499]  # steps 0 and 10 of the demo's 20 DDIM steps
    assert not np.array_equal(result.images[(0, 0)], result.images[(0, 12)])


def test_recorded_activation_is_the_channels_spatial_mean_as_the_hooks_read_it(model):
    from backend.models.hooks import read_activations

    cfg = quick("channel", opt_steps=2, snapshot_every=2, see_through=1.0)  # no noise: the input is the latent
    result = dream_unit(model, LATE, "channel", 12, [10], cfg)
    events = []
    cond, _ = model.encode_prompts(["", ""], cfg=False)
    with torch.no_grad(), read_activations(model, [LATE], events.append):
        model.predict_noise(result.latents_SCHW, torch.tensor([499, 499]), cond)
    expected = events[0].tokens[:, :, 12].mean(1).numpy()
    got = [r["activation"] for r in sorted(result.rows, key=lambda r: r["seed"]) if r["opt_step"] == 2]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_minimising_the_negated_objective_would_fail_this_test(model, monkeypatch):
    """Guard on the test above: with the gradient's sign flipped the same activation falls."""
    real = dream._Dreamer.gradient_SCHW
    monkeypatch.setattr(dream._Dreamer, "gradient_SCHW", lambda self, x: -real(self, x))
    acts = by_opt_step(dream_unit(model, EARLY, "channel", 5, [0, 10], quick("channel", seeds=[0])).rows)
    assert acts[12].mean() < acts[0].mean()


def test_feature_dream_raises_the_sae_code_and_its_pre_activation(model):
    sae = random_sae()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    result = dream_unit(model, LATE, "feature", 7, [0, 10], quick("feature", opt_steps=16), sae=sae)
    objective = by_opt_step(result.rows, "objective")
    acts = by_opt_step(result.rows)
    assert (objective[16] > objective[0]).all(), objective
    assert acts[16].sum() > acts[0].sum() + 0.5, acts  # the real (top-k) SAE code, as capture records it
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())
    assert all(p.requires_grad for p in sae.parameters())  # frozen during the call only


def test_feature_activation_is_the_sae_code_and_the_objective_its_pre_activation():
    sae = random_sae(d_in=8, n_latents=16, k=2)
    tokens = torch.randn(3, 5, 8)
    obj, act = dream.unit_activation_B(tokens, "feature", 4, sae)
    codes = sae.encode(tokens.reshape(15, 8), dense=True)[:, 4].view(3, 5)
    torch.testing.assert_close(act, codes.mean(1))
    torch.testing.assert_close(obj, sae.pre_acts(tokens.reshape(15, 8))[:, 4].view(3, 5).mean(1))
    x = tokens.clone().requires_grad_(True)
    dream.unit_activation_B(x, "feature", 4, sae)[0].sum().backward()
    assert x.grad.abs().sum() > 0  # gradients flow even where the latent is not in the top k
    obj, act = dream.unit_activation_B(tokens, "channel", 3)
    torch.testing.assert_close(obj, tokens[:, :, 3].mean(1))


def test_a_seed_dreams_the_same_whatever_its_batch(model):
    cfg = quick("channel", opt_steps=3, snapshot_every=3)
    both = dream_unit(model, EARLY, "channel", 9, [0, 10], cfg)
    alone = dream_unit(model, EARLY, "channel", 9, [0, 10], quick("channel", opt_steps=3, snapshot_every=3,
                                                                  seeds=[1]))
    torch.testing.assert_close(both.latents_SCHW[1:], alone.latents_SCHW, rtol=1e-4, atol=1e-4)


def test_init_latents_start_the_dream(model):
    start = torch.full((3, 16, 16), 0.3)
    result = dream_unit(model, EARLY, "channel", 5, [10], quick("channel", opt_steps=1, snapshot_every=1),
                        init_latents=start)
    assert np.all(result.images[(0, 0)] == result.images[(1, 0)])
    assert abs(result.images[(0, 0)].astype(float).mean() / 255 - 0.65) < 0.01  # pixels (x + 1) / 2


def test_a_latent_space_model_dreams_its_latents(sd2_dir):
    """Tiny SD 2.x (VAE latents, Euler, v-prediction): the latent is optimised and decoded through the VAE."""
    sd = load_model(str(sd2_dir))
    cfg = quick("channel", opt_steps=6, snapshot_every=6, range_limit=4.0)
    result = dream_unit(sd, "down_blocks.1.attentions.0", "channel", 1, [0, 3], cfg, n_steps=5)
    acts = by_opt_step(result.rows)
    assert acts[6].mean() > acts[0].mean()
    assert result.latents_SCHW.shape == (2, 4, 8, 8) and result.images[(0, 6)].shape == (16, 16, 3)
    assert result.config.range_limit == 4.0  # given: kept; the moments left None are the model's
    assert (result.config.moment_mean, result.config.moment_std) == (dream.latent_scale(sd).mean,
                                                                     dream.latent_scale(sd).std)


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_latent_space_defaults_are_fitted_to_the_models_latents(family, sd_dir, pixart_dir):
    """SD 1.x and PixArt (a transformer denoiser, DPM-Solver): the scale fields default to statistics of the
    model's own generated latents (not the demo's pixel values), fitted once per model, and dreams run at that
    scale: the random start and the step sizes are in units of the fitted std."""
    path, layer = (sd_dir, "mid_block.attentions.0") if family == "sd" else (pixart_dir, "transformer_blocks.1")
    model = load_model(str(path))
    final = []
    model.generate(["", ""], list(dream.FIT_SEEDS), min(model.default_steps, dream.FIT_STEPS), guidance=1.0,
                   on_step=lambda i, t, x: final.append(x))
    x = final[-1].flatten(1)
    scale = dream.latent_scale(model)
    assert scale.mean == pytest.approx(x.mean(1).mean().item(), rel=1e-3, abs=1e-3)
    assert scale.std == pytest.approx(x.std(1).mean().item(), rel=1e-3)
    assert scale.limit == pytest.approx(torch.quantile(x.abs().flatten(), dream.FIT_QUANTILE).item(), rel=1e-3)
    assert scale != dream.PIXEL_SCALE
    calls = []
    monkey = model.generate
    model.generate = lambda *a, **k: calls.append(1) or monkey(*a, **k)
    assert dream.latent_scale(model) is scale and not calls  # cached on the model
    model.generate = monkey
    timesteps = model.scheduler.timesteps.clone()
    cfg = quick("channel", opt_steps=4, snapshot_every=4)
    result = dream_unit(model, layer, "channel", 1, [0, 2], cfg, n_steps=4)
    assert (result.config.moment_mean, result.config.moment_std, result.config.range_limit) == (
        scale.mean, scale.std, scale.limit)
    assert torch.equal(model.scheduler.timesteps, timesteps)
    acts = by_opt_step(result.rows)
    assert acts[4].mean() > acts[0].mean()
    assert result.latents_SCHW.shape[1:] == model.initial_latents([torch.Generator()]).shape[1:]
    assert np.isfinite([r["activation"] for r in result.rows]).all()
    start = dream.initial_latents_SCHW(model, result.config, None)
    assert start.std().item() == pytest.approx(cfg.init_std * scale.std, rel=0.5)


def test_scale_free_settings_carry_the_demo_tuning_to_any_latent_scale(model):
    """Penalties are those of x / moment_std, so a latent c times the demo's, with moments and limit c times the
    demo's, has the demo's penalty values: the weights mean the same on every model."""
    pixel = dream.for_model(default_config("channel"), model)
    assert (pixel.moment_mean, pixel.moment_std, pixel.range_limit) == (0.0, 0.25, 1.0)  # the demo's pixels
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.4 + 0.1
    big = dataclasses.replace(pixel, moment_mean=0.0, moment_std=0.25 * 16, range_limit=16.0)
    for name, value in dream.penalties_S(x, pixel).items():
        torch.testing.assert_close(dream.penalties_S(x * 16, big)[name], value, rtol=1e-5, atol=1e-7)
    given = dream.for_model(quick("channel", moment_std=0.5), model)
    assert given.moment_std == 0.5 and given.range_limit == 1.0  # a given value wins, the rest is the model's


def test_half_precision_dreams_run_in_the_models_dtype(sd_dir):
    """A bfloat16 model (as --dtype float16 / bfloat16 loads it): the noised float32 latent is fed in the
    denoiser's dtype, and the latent itself stays float32."""
    sd = load_model(str(sd_dir), dtype=torch.bfloat16)
    result = dream_unit(sd, "mid_block.attentions.0", "channel", 3, [0, 2],
                        quick("channel", opt_steps=2, snapshot_every=2, seeds=[0]), n_steps=4)
    assert result.latents_SCHW.dtype == torch.float32
    assert np.isfinite([r["activation"] for r in result.rows]).all()


# ---------------------------------------------------------------------------------------------- model hygiene
def assert_model_untouched(model, params_before, flags_before):
    for name, p in model.denoiser.named_parameters():
        assert torch.equal(p, params_before[name]), name
        assert p.requires_grad == flags_before[name], name
    for name, m in model.denoiser.named_modules():
        assert not m._forward_hooks, name
        assert not m._forward_pre_hooks, name
    assert model.cfg_active is False and model.step_index == 0


def test_the_denoiser_is_unchanged_and_no_hook_remains(model, monkeypatch):
    params = {n: p.detach().clone() for n, p in model.denoiser.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.denoiser.named_parameters()}
    timesteps = model.scheduler.timesteps.clone()
    dream_unit(model, EARLY, "channel", 1, [0], quick("channel", opt_steps=2, snapshot_every=1, seeds=[0]))
    assert_model_untouched(model, params, flags)
    assert torch.equal(model.scheduler.timesteps, timesteps)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(dream, "unit_activation_B", broken)
    with pytest.raises(RuntimeError, match="boom"):
        dream_unit(model, EARLY, "channel", 1, [0], quick("channel", opt_steps=2, seeds=[0]))
    assert_model_untouched(model, params, flags)


# ---------------------------------------------------------------------------------------------- regularisers
def test_total_variation_is_lower_for_a_smooth_image():
    ramp = torch.linspace(-1, 1, 16).view(1, 1, 1, 16).expand(1, 3, 16, 16)
    noise = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert dream.total_variation_S(torch.zeros(1, 3, 16, 16)).item() == 0
    assert dream.total_variation_S(ramp).item() < dream.total_variation_S(noise).item() / 5
    # horizontal ramp: 15 steps of 2/15 per row, mean over the 15 x 16 horizontal pairs; no vertical change
    assert dream.total_variation_S(ramp).item() == pytest.approx(2 / 15, rel=1e-5)


def test_range_penalty_is_zero_inside_and_grows_outside():
    inside = torch.rand(2, 3, 4, 4) * 2 - 1
    assert (dream.range_penalty_S(inside, 1.0) == 0).all()
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.5
    x[0, 0, 1, 1] = -3.0
    assert dream.range_penalty_S(x, 1.0).item() == pytest.approx((0.5 ** 2 + 2.0 ** 2) / 4)
    assert dream.range_penalty_S(x, 4.0).item() == 0


def test_moment_penalty_pulls_mean_and_std_toward_the_data():
    base = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    on_target = (base - base.mean()) / base.std() * 0.25 + 0.1
    assert dream.moment_penalty_S(on_target, 0.1, 0.25).item() == pytest.approx(0, abs=1e-10)
    assert dream.moment_penalty_S(on_target + 0.5, 0.1, 0.25).item() == pytest.approx(0.25, rel=1e-4)
    assert dream.moment_penalty_S(on_target * 2 - 0.1, 0.1, 0.25).item() == pytest.approx(0.25 ** 2, rel=1e-4)


def test_blur_sigma_decays_and_blurring_smooths():
    sigmas = dream.blur_sigmas(DreamConfig(opt_steps=50, blur_sigma_start=1.0, blur_sigma_end=0.0))
    assert len(sigmas) == 50 and sigmas[0] == 1.0 and sigmas[-1] == 0.0 and (np.diff(sigmas) < 0).all()
    lrs = dream.step_sizes(DreamConfig(opt_steps=5, lr=0.1, lr_end=0.02))
    assert lrs[0] == 0.1 and lrs[-1] == pytest.approx(0.02) and (np.diff(lrs) < 0).all()
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    blurred = dream.gaussian_blur(noise, 1.0)
    assert blurred.shape == noise.shape
    assert dream.total_variation_S(blurred).mean() < dream.total_variation_S(noise).mean() / 2
    assert torch.equal(dream.gaussian_blur(noise, 0.0), noise)
    const = torch.full((1, 3, 16, 16), 0.7)
    torch.testing.assert_close(dream.gaussian_blur(const, 2.0), const)


def test_spectral_preconditioning_keeps_shape_and_favours_low_frequencies():
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    checker = ((yy + xx) % 2 * 2 - 1).expand(1, 3, 16, 16)  # the highest frequency
    slow = torch.cos(2 * torch.pi * xx / 16).expand(1, 3, 16, 16)  # one cycle per image
    pre_checker = dream.spectral_precondition(checker, 1.0)
    pre_slow = dream.spectral_precondition(slow, 1.0)
    assert pre_checker.shape == checker.shape and pre_slow.shape == slow.shape
    ratio = (pre_slow.norm() / slow.norm()) / (pre_checker.norm() / checker.norm())
    assert ratio > 10  # 1/f: f = 1/16 vs f = sqrt(2)/2
    torch.testing.assert_close(pre_slow / pre_slow.norm(), slow / slow.norm(), rtol=1e-4, atol=1e-5)  # eigenvector
    assert torch.equal(dream.spectral_precondition(checker, 0.0), checker)
    scale = dream.spectral_scale_HF(16, 16, 1.0)
    assert scale.shape == (16, 9) and scale.pow(2).mean().item() == pytest.approx(1.0, rel=1e-5)


def test_augmentation_jitters_rotates_and_scales_differentiably():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    none = DreamConfig(jitter=0, rotate_degrees=0, scale_range=0)
    torch.testing.assert_close(dream.augmented(x, none, gens), x)  # identity affine map samples the pixels
    rolled = dream.augmented(x, DreamConfig(jitter=2, rotate_degrees=0, scale_range=0), gens)
    for i in range(2):  # a roll only permutes the pixels
        assert torch.equal(rolled[i].flatten().sort().values, x[i].flatten().sort().values)
    moved = [not torch.equal(dream.augmented(x, DreamConfig(jitter=2, rotate_degrees=0, scale_range=0), gens), x)
             for _ in range(5)]
    assert any(moved)
    leaf = x.clone().requires_grad_(True)
    out = dream.augmented(leaf, DreamConfig(jitter=1, rotate_degrees=10, scale_range=0.1), gens)
    assert out.shape == x.shape and not torch.allclose(out, x)
    out[:, :, 4:8, 4:8].sum().backward()
    assert leaf.grad.abs().sum() > 0


def test_see_through_zero_is_the_schedulers_add_noise(model):
    alphas = model.scheduler.alphas_cumprod
    x = torch.randn(2, 3, 16, 16)
    eps = torch.randn(2, 3, 16, 16)
    signal, noise = dream.see_through_weights(alphas, [700, 700], 0.0)
    expected = model.scheduler.add_noise(x, eps, torch.tensor([700, 700]))
    torch.testing.assert_close(signal.view(-1, 1, 1, 1) * x + noise.view(-1, 1, 1, 1) * eps, expected)
    signal, noise = dream.see_through_weights(alphas, [999], 1.0)
    assert signal.item() == pytest.approx(1.0) and noise.item() == pytest.approx(0.0, abs=1e-6)
    signal, noise = dream.see_through_weights(alphas, [999], 0.3)  # step 0: abar ~ 0, the image still shows
    assert signal.item() == pytest.approx(0.3 ** 0.5, rel=1e-3)
    assert signal.item() ** 2 + noise.item() ** 2 == pytest.approx(1.0)


def test_defaults_differ_for_channels_and_features_and_are_documented():
    import inspect

    channel, feature = default_config("channel"), default_config("feature")
    assert channel != feature
    assert channel.opt_steps == feature.opt_steps == 100 and len(channel.seeds) == 4
    for name in dream.SCALE_FIELDS:  # the model's (latent_scale), never the demo's pixel values
        assert getattr(channel, name) is None and getattr(feature, name) is None
    source = inspect.getsource(DreamConfig)
    for name in DreamConfig.__dataclass_fields__:
        after = source.split(f"    {name}:", 1)[1].split("\n", 2)
        assert after[1].strip().startswith('"""'), f"{name} has no docstring line"
    assert dream.snapshot_steps(DreamConfig(opt_steps=25, snapshot_every=10)) == [0, 10, 20, 25]
    assert dream.choose_target_steps([7, 0, 12, 3], 3) == [0, 7, 12]
    assert dream.choose_target_steps(None, 3) == [0]


# ---------------------------------------------------------------------------------------------- bad input
def one_line_error(fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(DifflensError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_bad_input_is_a_one_line_difflens_error(model):
    cfg = quick("channel", opt_steps=1)
    msg = one_line_error(dream_unit, model, EARLY, "channel", 64, [0], cfg, match="unknown channel 64")
    assert "0..63" in msg
    one_line_error(dream_unit, model, EARLY, "channel", -1, [0], cfg, match="unknown channel -1")
    one_line_error(dream_unit, model, EARLY, "feature", 3, [0], quick("feature"), match="need an SAE")
    one_line_error(dream_unit, model, EARLY, "feature", 128, [0], quick("feature"), sae=random_sae(),
                   match="unknown feature 128.*0..127")
    one_line_error(dream_unit, model, EARLY, "feature", 3, [0], quick("feature"), sae=random_sae(d_in=32),
                   match="32-dim")
    one_line_error(dream_unit, model, EARLY, "neuron", 3, [0], cfg, match="unknown unit kind")
    one_line_error(dream_unit, model, "mid_block.attention", "channel", 3, [0], cfg, match="unknown layer")
    one_line_error(dream_unit, model, EARLY, "channel", 3, [20], cfg, match="out of range")
    one_line_error(dream_unit, model, EARLY, "channel", 3, [0], quick("channel", see_through=2.0),
                   match="see_through")
    one_line_error(dream_unit, model, EARLY, "channel", 3, [0], cfg, init_latents=torch.zeros(3, 3, 16, 16),
                   match="init_latents")


# ---------------------------------------------------------------------------------------------- a run directory
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from backend.run.prompts import DEMO_PROMPTS
    from backend.stages.capture import capture

    prompts = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    prompts.write_text("\n".join(DEMO_PROMPTS.read_text().splitlines()[::60]) + "\n")  # 6 prompts
    cfg = RunConfig(name="dream", runs_dir=str(tmp_path_factory.mktemp("runs")), model="demo", prompts=str(prompts))
    cfg.capture.layers = [EARLY, LATE]
    cfg.capture.images_per_prompt = 1
    cfg.capture.steps = 4
    cfg.capture.batch_size = 8
    cfg.capture.tokens_per_step = 8
    capture(cfg, progress=False)
    return cfg.out_dir


def dreams_rows(run_dir) -> pl.DataFrame:
    return pl.read_parquet(f"{run_dir}/tables/dreams/**/*.parquet", hive_partitioning=True)


def test_dream_run_writes_the_dreams_table_and_images(tiny_run, model):
    import pyarrow as pa

    from backend.run.store import RunStore
    from sae.io import save_sae

    store = RunStore(tiny_run)
    cfg = quick("channel", opt_steps=4, snapshot_every=2, seeds=[0, 3])
    summary = dream_run(tiny_run, EARLY, "channel", 5, cfg, progress=False)
    assert summary["target_steps"] == [0] and "not analysed" in summary["notes"][0]
    rows = dreams_rows(tiny_run)
    assert rows.columns == ["unit", "step", "seed", "opt_step", "activation", "penalties", "image", "layer", "kind"]
    assert rows.height == 3 * 2  # snapshots 0, 2, 4 x seeds
    assert set(rows["layer"]) == {EARLY} and set(rows["kind"]) == {"channel"} and set(rows["unit"]) == {5}
    assert set(json.loads(rows["penalties"][0])) == {"tv", "range", "moment", "total"}
    for rel in rows["image"]:
        assert rel.startswith(f"media/dreams/{EARLY}/channel-00005/seed")
        assert (tiny_run / rel).read_bytes()[:4] == b"\x89PNG"
    assert (tiny_run / "tables/dreams" / f"layer={EARLY}" / "kind=channel" / "unit-000005.parquet").exists()

    # once analysed (a peaks partition, as `analyze` writes it), the unit's peaks are targeted too; a repeat
    # replaces the unit's shard and images rather than adding to them
    store.write_table_shard("peaks", "part-0000000", pa.table({
        "unit": np.array([5, 5, 6], np.int32), "step": np.array([3, 2, 1], np.int16),
        "height": np.array([0.9, 0.5, 0.7], np.float32), "rank": np.array([1, 2, 1], np.int16)}),
        layer=EARLY, kind="channel")
    cfg = quick("channel", opt_steps=3, snapshot_every=3, seeds=[0])
    summary = dream_run(tiny_run, EARLY, "channel", 5, cfg, progress=False)
    assert summary["target_steps"] == [0, 3, 2] and summary["notes"] == []
    assert summary["timesteps"] == [999, 249, 499]  # the run's 4-step schedule
    rows = dreams_rows(tiny_run)
    assert rows.height == 2 * 3 and sorted(set(rows["step"])) == [0, 2, 3] and set(rows["seed"]) == {0}
    images = sorted(p.name for p in (tiny_run / "media/dreams" / EARLY / "channel-00005").glob("*.png"))
    assert images == ["seed0-opt0000.png", "seed0-opt0003.png"]
    assert json.loads((tiny_run / "manifest.json").read_text())["stages"]["dream"]["last"]["unit"] == 5
    assert summary["config"]["moment_std"] == 0.25 and summary["config"]["opt_steps"] == 3  # the settings used

    msg = one_line_error(dream_run, tiny_run, LATE, "feature", 3, quick("feature"), progress=False,
                         match="no SAE for")
    assert LATE in msg
    one_line_error(dream_run, tiny_run, EARLY, "channel", 99, cfg, progress=False, match="unknown channel 99")
    one_line_error(dream_run, tiny_run.parent / "missing", EARLY, "channel", 1, cfg, progress=False,
                   match="not a run directory")

    save_sae(random_sae(), store.sae_dir(LATE))
    ctx = open_run(tiny_run, model=model)  # an open run: its model (and SAE) are used, nothing is loaded again
    summary = dream_run(ctx, LATE, "feature", 7, quick("feature", opt_steps=2, snapshot_every=2),
                        seeds=[1], progress=False)
    assert ctx.model is model and set(ctx._saes) == {(LATE, "default")}
    feats = dreams_rows(tiny_run).filter(pl.col("kind") == "feature")
    assert feats.height == 2 and set(feats["layer"]) == {LATE} and set(feats["unit"]) == {7}
    assert "objective" in json.loads(feats["penalties"][0])
    assert dreams_rows(tiny_run).filter(pl.col("kind") == "channel").height == 6  # other partitions untouched
