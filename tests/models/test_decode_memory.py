"""Memory at decode time (backend/models/latent.py, base.py, splice.py): the VAE decodes a batch in slices of
`decode_batch` images (SDXL at 1024 px needs GBs per image) with the same images as one whole-batch decode, and
callers that only want latents (the splice test's x0, the dream's latent-scale fit) decode nothing."""

import pytest
import torch

from backend.models import load_model

PROMPTS = ["a red cat", "a blue dog", "a green house", "a cat on the tree", "the sea", "a car"]


@pytest.fixture(params=["sd_dir", "sdxl_dir", "pixart_dir"])
def model(request):
    return load_model(str(request.getfixturevalue(request.param)))


def count_decodes(model, monkeypatch) -> list[int]:
    """Batch sizes the VAE's decode is called with."""
    sizes = []
    real = model.pipe.vae.decode

    def decode(z, *args, **kwargs):
        sizes.append(z.shape[0])
        return real(z, *args, **kwargs)

    monkeypatch.setattr(model.pipe.vae, "decode", decode)
    return sizes


def test_the_vae_decodes_in_slices_with_the_same_images(model, monkeypatch):
    torch.manual_seed(0)
    latents = torch.randn(6, model.denoiser.config.in_channels, 8, 8)
    model.decode_batch = 0  # 0: the whole batch at once
    whole = model.decode(latents)
    sizes = count_decodes(model, monkeypatch)
    model.decode_batch = 4
    sliced = model.decode(latents)
    assert sizes == [4, 2]
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-6)
    assert type(model).decode_batch == 4  # the default: 4 images per VAE call


def test_generate_decodes_in_slices_and_not_at_all_for_latents(model, monkeypatch):
    sizes = count_decodes(model, monkeypatch)
    images = model.generate(PROMPTS, list(range(6)), n_steps=2, guidance=1.0)
    assert images.shape[0] == 6 and sizes == [4, 2]
    final = {}
    latents = model.generate(PROMPTS, list(range(6)), n_steps=2, guidance=1.0, output="latent",
                             on_step=lambda _i, _t, lat: final.__setitem__("x", lat))
    assert sizes == [4, 2]  # no decode for output="latent"
    assert torch.equal(latents, final["x"])
    with pytest.raises(ValueError, match="output"):
        model.generate(PROMPTS[:1], [0], n_steps=1, output="pil")


def test_the_splice_test_and_the_dream_scale_fit_decode_nothing(model, monkeypatch):
    from backend.interventions import dream
    from backend.models.splice import clean_latents

    sizes = count_decodes(model, monkeypatch)
    x0 = clean_latents(model, PROMPTS[:2], [0, 1], n_steps=2, guidance=1.0)
    assert x0.shape[0] == 2
    dream._fit_scale(model)
    assert sizes == []
