"""FLUX adapter: packed 2x2 latent tokens mapped back to spatial positions, double- and single-stream blocks read by
their per-class stream table, guidance-distilled FLUX (no CFG batch; the guidance embedding) and schnell."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from backend.errors import DifflensError
from backend.interventions.masks import mask_tokens
from backend.models import load_model
from backend.models.flux import pack, token_position, unpack
from backend.models.hooks import read_activations

PROMPT = "a red cat on the house"


@pytest.fixture(scope="module")
def model(flux_dir):
    return load_model(str(flux_dir))


def test_pack_is_the_pipelines_and_unpack_inverts_it():
    x = torch.randn(2, 4, 6, 10)
    tokens = pack(x)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(x, 2, 4, 6, 10), atol=0, rtol=0)
    torch.testing.assert_close(unpack(tokens, 6, 10), x, atol=0, rtol=0)
    for index in (0, 4, 5, 14):  # a 3 x 5 grid of 2x2 patches, row-major
        row, col = token_position(index, (3, 5))
        patch = x[:, :, 2 * row:2 * row + 2, 2 * col:2 * col + 2]  # [B, C, 2, 2] -> C-major, then the 2x2
        torch.testing.assert_close(tokens[:, index], patch.reshape(2, 16))


def test_image_tokens_sit_where_their_latent_pixels_are(model):
    """On a wide image the transformer sees a (H/2) x (W/2) grid of packed tokens; the events carry that grid, and
    token (row, col) holds latent pixels [2row:2row+2, 2col:2col+2] (checked on the transformer's real input)."""
    seen, events = [], []
    handle = model.denoiser.x_embedder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        with read_activations(model, ["transformer_blocks.0", "single_transformer_blocks.1"], events.append):
            latents = model.initial_latents([torch.Generator().manual_seed(0)], 32, 64)
            model.generate([PROMPT], [0], n_steps=1, guidance=3.5, height=32, width=64)
    finally:
        handle.remove()
    assert latents.shape == (1, 4, 16, 32)
    packed = seen[0]
    assert packed.shape == (1, 8 * 16, 16)
    for index in (0, 17, 127):
        row, col = token_position(index, (8, 16))
        torch.testing.assert_close(packed[0, index], latents[0, :, 2 * row:2 * row + 2, 2 * col:2 * col + 2].flatten())
    assert [(e.spatial, e.tokens.shape[1]) for e in events] == [((8, 16), 128)] * 2
    image_mask = np.zeros((32, 64), np.float32)
    image_mask[16:, :16] = 1  # the image's bottom-left quarter lands on the grid's bottom-left quarter
    weights = mask_tokens(image_mask, 128).view(8, 16)
    assert weights[4:, :4].min() == 1 and weights.sum() == 16


def test_double_stream_blocks_read_image_and_text_by_their_table(model):
    """FluxTransformerBlock returns (text, image): image by default, `:text` on request; a single-stream block's
    hook point is its image part, and its text part is a one-line error."""
    raw, events = [], []
    block = model.denoiser.get_submodule("transformer_blocks.1")
    handle = block.register_forward_hook(lambda m, args, out: raw.append(tuple(o.clone() for o in out)))
    try:
        with read_activations(model, ["transformer_blocks.1", "transformer_blocks.1:text",
                                      "single_transformer_blocks.0"], events.append):
            model.generate([PROMPT], [0], n_steps=1, guidance=3.5)
    finally:
        handle.remove()
    text_out, image_out = raw[0]
    image, text, single = events
    assert image_out.shape[1] == 64 and text_out.shape[1] == 16
    torch.testing.assert_close(image.tokens, image_out)
    torch.testing.assert_close(text.tokens, text_out)
    assert single.tokens.shape == (1, 64, 32) and single.spatial == (4 * 2, 4 * 2)
    for bad in ("single_transformer_blocks.0:text", "x_embedder:text"):
        with pytest.raises(DifflensError) as exc:
            with read_activations(model, [bad], lambda e: None):
                pass
        assert "\n" not in str(exc.value) and bad in str(exc.value)


def test_guidance_distilled_flux_has_no_cfg_batch(model):
    """FLUX.1-dev: one denoiser row per image whatever the guidance, the guidance value is the transformer's
    guidance input (a different value, a different image), and hooks read the whole batch as the cond half."""
    seen = []
    handle = model.denoiser.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["hidden_states"].shape[0], kwargs["guidance"].clone())),
        with_kwargs=True)
    events = []
    try:
        with read_activations(model, ["transformer_blocks.0"], events.append):
            a = model.generate([PROMPT, PROMPT], [0, 1], n_steps=2, guidance=3.5)
        b = model.generate([PROMPT, PROMPT], [0, 1], n_steps=2, guidance=7.0)
    finally:
        handle.remove()
    assert [n for n, _ in seen] == [2] * 4
    assert [g.tolist() for _, g in seen] == [[3.5, 3.5]] * 2 + [[7.0, 7.0]] * 2
    assert model.cfg_active is False and events[0].tokens.shape[0] == 2
    assert not torch.allclose(a, b)


def test_schnell_takes_no_guidance(flux_schnell_dir):
    model = load_model(str(flux_schnell_dir))
    assert (model.default_steps, model.default_guidance) == (4, 0.0)
    a = model.generate([PROMPT], [0], n_steps=2, guidance=0.0)
    b = model.generate([PROMPT], [0], n_steps=2, guidance=5.0)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert model.timesteps(4).tolist() == [1000.0, 750.0, 500.0, 250.0]  # shift 1: sigmas linspace(1, 1/4)


def test_dev_schedule_shifts_with_the_image_size(model):
    """FLUX.1-dev's dynamic shift depends on the token count: the pipeline's timesteps at each size."""
    for h, w in ((32, 32), (64, 64)):
        model.pipe(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=3, height=h, width=w,
                   max_sequence_length=model.max_sequence_length, output_type="latent")
        expected = model.pipe.scheduler.timesteps.clone()
        model._size = (h, w)
        try:
            torch.testing.assert_close(model.timesteps(3), expected)
        finally:
            model._size = None
    assert not np.allclose(expected.numpy(), model.timesteps(3).numpy())
