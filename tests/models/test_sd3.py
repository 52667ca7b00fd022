"""SD3 adapter: joint blocks read by their per-class stream table (image default, `:text` on request), the CFG
batch's conditional half recorded, the flow-matching schedule (timesteps = sigmas x 1000) as the pipeline sets it,
and the patch grid as the events' spatial shape."""

import pytest
import torch

from backend.errors import DifflensError
from backend.models import load_model
from backend.models.hooks import read_activations

PROMPT = "a red cat on the house"


@pytest.fixture(scope="module")
def model(sd3_dir):
    return load_model(str(sd3_dir))


def raw_outputs(model, block: str, fn) -> list[tuple]:
    """Every raw output tuple of a block during fn()."""
    seen = []
    handle = model.denoiser.get_submodule(block).register_forward_hook(
        lambda m, args, out: seen.append(tuple(o if o is None else o.clone() for o in out)))
    try:
        fn()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_image_and_text_streams_and_the_conditional_half(model, guidance):
    """JointTransformerBlock returns (text, image): the hook point is the image stream (index 1, not tuple[0]), the
    `:text` point the text stream; under CFG ([uncond; cond]) the conditional half."""
    events = []
    layers = ["transformer_blocks.1", "transformer_blocks.1:text"]
    with read_activations(model, layers, events.append):
        raw = raw_outputs(model, "transformer_blocks.1",
                          lambda: model.generate([PROMPT, PROMPT], [0, 1], n_steps=3, guidance=guidance))
    assert [(e.layer, e.step) for e in events] == [(layer, s) for s in range(3) for layer in layers]
    for step, (text_out, image_out) in enumerate(raw):
        image, text = events[2 * step], events[2 * step + 1]
        half = slice(2, 4) if guidance > 1 else slice(0, 2)
        assert image_out.shape[0] == (4 if guidance > 1 else 2)
        torch.testing.assert_close(image.tokens, image_out[half])
        torch.testing.assert_close(text.tokens, text_out[half])
        assert image.tokens.shape == (2, 16, 32) and text.tokens.shape == (2, 32, 32)  # 4x4 patches; 16 + 16 text
        assert image.spatial == (4, 4) and text.spatial is None
        if guidance > 1:
            assert not torch.allclose(image.tokens, image_out[:2])


def test_the_last_joint_block_has_no_text_stream(model):
    last = f"transformer_blocks.{len(model.denoiser.transformer_blocks) - 1}"
    with pytest.raises(DifflensError, match="outputs no text stream") as exc:
        with read_activations(model, [last + ":text"], lambda e: None):
            pass
    assert "\n" not in str(exc.value)
    assert not model.denoiser.get_submodule(last)._forward_hooks
    events = []
    with read_activations(model, [last], events.append):  # its image stream is there (tuple[0] is None)
        model.generate([PROMPT], [0], n_steps=1, guidance=1.0)
    assert events[0].tokens.shape == (1, 16, 32)


def test_flow_matching_timesteps_and_sigmas_match_the_pipeline(model):
    """Our schedule is the one the pipeline steps (SD3's shift 3), timesteps = 1000 x sigmas, one per step."""
    ts = model.timesteps(6)
    model.pipe(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=6, guidance_scale=1.0,
               max_sequence_length=model.max_sequence_length, output_type="latent")
    torch.testing.assert_close(ts, model.pipe.scheduler.timesteps)
    torch.testing.assert_close(model.sigmas(6) * 1000, ts)
    assert len(ts) == 6 and float(ts[0]) == 1000.0 and (ts.diff() < 0).all()
    seen = []
    handle = model.denoiser.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((model.step_index, kwargs["timestep"][0].item())), with_kwargs=True)
    try:
        model.generate([PROMPT], [0], n_steps=6, guidance=1.0)
    finally:
        handle.remove()
    assert seen == [(i, pytest.approx(float(t))) for i, t in enumerate(ts)]


def test_a_wide_image_has_a_wide_patch_grid(model):
    events = []
    with read_activations(model, ["transformer_blocks.0"], events.append):
        image = model.generate([PROMPT], [0], n_steps=1, guidance=1.0, height=16, width=32)
    assert image.shape == (1, 3, 16, 32)
    assert events[0].spatial == (4, 8) and events[0].tokens.shape[1] == 32


def test_an_edit_of_the_text_stream_leaves_the_image_stream_of_its_block(model):
    """edit_activations on `transformer_blocks.0:text` replaces that output only (the image stream of the block
    passes through as computed); the next block sees the edited text."""
    from backend.models.hooks import edit_activations

    with edit_activations(model, "transformer_blocks.0:text", lambda tok, step: tok * 0):
        raw = raw_outputs(model, "transformer_blocks.0",
                          lambda: model.generate([PROMPT], [0], n_steps=1, guidance=1.0))
        seen = []
        handle = model.denoiser.get_submodule("transformer_blocks.1").register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
        try:
            model.generate([PROMPT], [0], n_steps=1, guidance=1.0)
        finally:
            handle.remove()
    plain = raw_outputs(model, "transformer_blocks.0", lambda: model.generate([PROMPT], [0], n_steps=1, guidance=1.0))
    # the raw hook runs after the edit's, so it sees the edited output: text zeroed, image as computed
    assert raw[0][0].abs().max() == 0 and plain[0][0].abs().max() > 0
    torch.testing.assert_close(raw[0][1], plain[0][1])
    assert seen[0].abs().max() == 0
