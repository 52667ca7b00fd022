"""Model adapters: every family loads from a save_pretrained directory, generates deterministically, feeds
the denoiser [uncond; cond] under CFG, and matches the diffusers pipeline's own __call__."""

import pytest
import torch
from tiny_pipelines import REAL_SCHEDULERS, with_scheduler

from backend.errors import ModelLoadError
from backend.models import load_model
from backend.models.base import seed_generators

PROMPT = "a red cat on the house"


def family_dirs(request, names):
    return [request.getfixturevalue(n) for n in names]


FAMILIES = {
    "sd_dir": ("stable-diffusion", 5.0),
    "sd2_dir": ("stable-diffusion", 5.0),
    "sdxl_dir": ("sdxl", 5.0),
    "sdxl_turbo_dir": ("sdxl", 0.0),
    "pixart_dir": ("pixart-alpha", 4.5),
    "untrained_demo_dir": ("demo", 3.0),
    "sd3_dir": ("sd3", 5.0),
    "flux_dir": ("flux", 3.5),
    "flux_schnell_dir": ("flux", 0.0),
}
CFG_FAMILIES = [name for name in FAMILIES if not name.startswith("flux")]  # FLUX has no CFG batch (test_flux.py)


def pipeline_kwargs(name: str, model) -> dict:
    """What the pipeline's __call__ needs beyond the prompt to run as our loop does."""
    if name == "pixart_dir":
        return {"use_resolution_binning": False, "clean_caption": False}
    if name in ("sd3_dir", "flux_dir", "flux_schnell_dir"):
        h, w = model.default_resolution  # FluxPipeline's own default is 128 x vae_scale_factor, not the VAE's
        return {"max_sequence_length": model.max_sequence_length, "height": h, "width": w}
    return {}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    path = request.getfixturevalue(request.param)
    return request.param, path, load_model(str(path))


def test_family_is_recognised(family):
    name, _, model = family
    assert model.family == FAMILIES[name][0]


@pytest.mark.parametrize("guidance_on", [True, False])
def test_generation_is_deterministic(family, guidance_on):
    name, _, model = family
    prompt = "a large red circle on the left, gray background" if model.family == "demo" else PROMPT
    g = FAMILIES[name][1] if guidance_on else 1.0
    a = model.generate([prompt, prompt], [1, 2], n_steps=3, guidance=g)
    b = model.generate([prompt, prompt], [1, 2], n_steps=3, guidance=g)
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])  # different seeds, different images
    alone = model.generate([prompt], [2], n_steps=3, guidance=g)
    torch.testing.assert_close(alone[0], a[1], atol=1e-5, rtol=0)  # an image depends on its seed, not its batch


@pytest.mark.parametrize("name", CFG_FAMILIES)
def test_cfg_batch_is_uncond_then_cond(request, name):
    model = load_model(str(request.getfixturevalue(name)))
    prompt = "a large red circle on the left, gray background" if model.family == "demo" else PROMPT
    seen = []
    handle = model.denoiser.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        model.generate([prompt], [0], n_steps=1, guidance=3.0)
    finally:
        handle.remove()
    cond, uncond = model.encode_prompts([prompt], cfg=True)
    (states,) = seen
    assert states.shape[0] == 2
    torch.testing.assert_close(states[:1], uncond["encoder_hidden_states"])
    torch.testing.assert_close(states[1:], cond["encoder_hidden_states"])
    assert not torch.allclose(states[0], states[1])


@pytest.mark.parametrize("name", ["sd_dir", "sd2_dir", "sdxl_dir", "sdxl_turbo_dir", "pixart_dir", "sd3_dir",
                                  "flux_dir", "flux_schnell_dir"])
@pytest.mark.parametrize("cfg_on", [True, False])
def test_our_loop_matches_the_diffusers_pipeline(request, name, cfg_on):
    """cfg_on: the family's guidance (FLUX.1-dev: the guidance embedding's value; schnell ignores it)."""
    path = request.getfixturevalue(name)
    model = load_model(str(path))
    guidance = FAMILIES[name][1] if cfg_on else 1.0
    if name in ("sdxl_turbo_dir", "flux_schnell_dir") and cfg_on:
        guidance = 2.0
    ours = model.generate([PROMPT], [7], n_steps=4, guidance=guidance)
    ref = model.pipe(PROMPT, generator=torch.Generator().manual_seed(7), num_inference_steps=4,
                     guidance_scale=guidance, output_type="pt", **pipeline_kwargs(name, model)).images
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=list(REAL_SCHEDULERS))
def shipped(request, tmp_path_factory):
    """A tiny pipeline of the family with the scheduler its real checkpoint ships: (variant, fixture, path)."""
    base, class_name, config = REAL_SCHEDULERS[request.param]
    path = with_scheduler(request.getfixturevalue(base), tmp_path_factory.mktemp(request.param), class_name, config)
    return request.param, base, path


def reference(model, base, guidance, n_steps, seed=7):
    extra = {"use_resolution_binning": False, "clean_caption": False} if base == "pixart_dir" else {}
    return model.pipe(PROMPT, generator=torch.Generator().manual_seed(seed), num_inference_steps=n_steps,
                      guidance_scale=guidance, output_type="pt", **extra).images.float()


@pytest.mark.parametrize("n_steps", [4, 7])
@pytest.mark.parametrize("cfg_on", [True, False])
def test_our_loop_matches_the_pipeline_with_the_shipped_scheduler(shipped, n_steps, cfg_on):
    variant, base, path = shipped
    model = load_model(str(path))
    assert type(model.scheduler).__name__ == REAL_SCHEDULERS[variant][1]
    guidance = (2.0 if base == "sdxl_turbo_dir" else FAMILIES[base][1]) if cfg_on else 1.0
    ours = model.generate([PROMPT], [7], n_steps=n_steps, guidance=guidance)
    torch.testing.assert_close(ours, reference(model, base, guidance, n_steps), atol=1e-5, rtol=1e-5)
    reference(model, base, guidance, n_steps + 5)  # the pipeline's own scheduler state must not leak into ours
    torch.testing.assert_close(model.generate([PROMPT], [7], n_steps=n_steps, guidance=guidance), ours,
                               atol=0, rtol=0)


def test_sdxl_base_starts_from_the_noise_scale_of_its_steps(sdxl_dir, tmp_path):
    """SDXL-base's Euler "leading" spacing: the first sigma depends on the step count (13.16 at 50 steps, 14.65 for
    the schedule before set_timesteps); our first latents must use the schedule that is stepped."""
    _, class_name, config = REAL_SCHEDULERS["sdxl-base-euler-leading"]
    model = load_model(str(with_scheduler(sdxl_dir, tmp_path / "sdxl-base", class_name, config)))
    assert model.pipe.scheduler.init_noise_sigma == pytest.approx(14.65, abs=0.01)
    first = []
    handle = model.denoiser.register_forward_pre_hook(lambda m, args: first.append(args[0].clone()) if not first
                                                      else None)
    try:
        ours = model.generate([PROMPT], [3], n_steps=50, guidance=1.0)
    finally:
        handle.remove()
    assert float(model.scheduler.init_noise_sigma) == pytest.approx(13.16, abs=0.01)
    # Euler feeds the denoiser latents / sqrt(sigma_0^2 + 1): exactly the unit-variance noise of the seed
    noise = torch.randn(first[0].shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first[0], noise)
    torch.testing.assert_close(ours, reference(model, "sdxl_dir", 1.0, 50, seed=3), atol=1e-5, rtol=1e-5)


def test_pndm_calls_the_denoiser_once_per_timestep(sd_dir, tmp_path):
    """SD 1.5's shipped PNDM runs n_steps + 1 denoiser calls (PLMS warm-up repeats its second timestep): hooks see
    step indices 0..len(timesteps) - 1, which is what per-step buffers must be sized by."""
    _, class_name, config = REAL_SCHEDULERS["sd15-pndm"]
    model = load_model(str(with_scheduler(sd_dir, tmp_path / "sd15", class_name, config)))
    assert model.timesteps(4).tolist() == [751, 501, 501, 251, 1]
    seen = []
    handle = model.denoiser.register_forward_pre_hook(lambda m, args: seen.append(model.step_index))
    try:
        model.generate([PROMPT], [0], n_steps=4, guidance=1.0)
    finally:
        handle.remove()
    assert seen == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["sd_dir", "sdxl_dir", "pixart_dir", "untrained_demo_dir", "sd3_dir", "flux_dir"])
def test_loads_in_the_requested_dtype(request, name, dtype):
    model = load_model(str(request.getfixturevalue(name)), dtype=dtype)
    assert model.dtype == dtype
    modules = {k: v for k, v in model.pipe.components.items() if isinstance(v, torch.nn.Module)}
    assert {k: v.dtype for k, v in modules.items()} == dict.fromkeys(modules, dtype)
    if dtype == torch.bfloat16:  # a step and a decode run in it (float16 kernels are a GPU matter)
        image = model.generate(["a red cat" if name != "untrained_demo_dir" else "a red circle"], [0], n_steps=1,
                               guidance=2.0)
        assert image.dtype == torch.float32 and torch.isfinite(image).all()


def test_a_dtype_the_loader_ignored_is_a_one_line_error(sd_dir, monkeypatch):
    """diffusers < 0.40 takes no dtype= (it warns and loads float32): a model in the wrong dtype must not pass."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    original = StableDiffusionPipeline.from_pretrained.__func__

    def old_diffusers(cls, path, dtype=None, torch_dtype=None, **kwargs):
        return original(cls, path, **kwargs)  # the dtype arguments ignored

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(old_diffusers))
    monkeypatch.setattr(diffusers, "__version__", "0.35.2")
    with pytest.raises(ModelLoadError, match=r"float32, not the requested bfloat16.*diffusers>=0\.40") as exc:
        load_model(str(sd_dir), dtype=torch.bfloat16)
    assert "\n" not in str(exc.value)


def test_diffusers_floor_accepts_the_dtype_argument():
    """pyproject's floor is the first diffusers whose from_pretrained takes dtype= (0.40; torch_dtype= is
    deprecated from there on), and the installed diffusers meets it."""
    import tomllib
    from importlib.metadata import version

    from conftest import ROOT
    from packaging.version import Version

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (floor,) = [d.split(">=")[1] for d in deps if d.startswith("diffusers>=")]
    assert Version(floor) >= Version("0.40")
    assert Version(version("diffusers")) >= Version(floor)


def test_demo_reference_pipeline_call_matches_adapter(untrained_demo_dir):
    model = load_model(str(untrained_demo_dir))
    prompt = "a small blue square at the top, white background"
    ref = model.pipe([prompt], [5], num_inference_steps=3, guidance_scale=2.0)
    from backend.models.base import to_uint8

    ours = to_uint8(model.generate([prompt], [5], n_steps=3, guidance=2.0))
    assert (ours == ref).all()


def test_pixart_hook_points_are_transformer_blocks(pixart_dir):
    from backend.models.layers import hook_points

    model = load_model(str(pixart_dir))
    points = {p.name: p for p in hook_points(model)}
    assert "transformer_blocks.3" in points and points["transformer_blocks.3"].sae_target
    assert points["transformer_blocks.3"].shape == (16, 24)  # 4x4 patches of an 8x8 latent, 24 channels


def test_seed_generators_are_independent():
    a, b = seed_generators([1, 1])
    assert torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b))


@pytest.mark.parametrize(
    "spec, message",
    [("/no/such/dir", "not found"), ("{tmp}", "no model_index.json"), ("{bad}", "supported pipelines")],
)
def test_bad_model_specs_give_one_line_errors(tmp_path, spec, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text('{"_class_name": "KandinskyV22Pipeline"}')
    spec = spec.format(tmp=tmp_path, bad=bad)
    with pytest.raises(ModelLoadError, match=message) as exc:
        load_model(spec)
    assert "\n" not in str(exc.value)


def test_an_unsupported_pipeline_class_names_it_and_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyV22Pipeline"}')
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(tmp_path))
    msg = str(exc.value)
    assert "KandinskyV22Pipeline" in msg and "\n" not in msg
    for supported in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "PixArtAlphaPipeline",
                      "StableDiffusion3Pipeline", "FluxPipeline"):
        assert supported in msg
