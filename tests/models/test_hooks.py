"""Hooks: conditional CFG half, delta = output - input, token layout, always unregistered."""

import pytest
import torch

from backend.errors import DifflensError, UnknownLayerError
from backend.models import load_model
from backend.models.hooks import edit_activations, from_tokens, read_activations, to_tokens

LAYER = "up_blocks.1.attentions.1"
PROMPT = "a large red circle on the left, gray background"


@pytest.fixture(scope="module")
def model(untrained_demo_dir):
    return load_model(str(untrained_demo_dir))


def _raw_outputs(model, layer, fn):
    """Every raw (un-normalised) output and input of layer during fn()."""
    seen = []
    mod = model.denoiser.get_submodule(layer)
    h = mod.register_forward_hook(lambda m, args, kwargs, out: seen.append((args[0].clone(), out[0].clone())),
                                  with_kwargs=True)
    try:
        fn()
    finally:
        h.remove()
    return seen


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_reads_the_conditional_half(model, guidance):
    events = []
    with read_activations(model, [LAYER], events.append):
        raw = _raw_outputs(model, LAYER, lambda: model.generate([PROMPT, PROMPT], [0, 1], n_steps=3,
                                                                  guidance=guidance))
    assert [e.step for e in events] == [0, 1, 2]
    for ev, (_, out) in zip(events, raw, strict=True):
        expected = out[2:] if guidance > 1 else out  # [uncond; cond] under CFG
        assert ev.tokens.shape == (2, 64, 64) and ev.spatial == (8, 8)
        torch.testing.assert_close(ev.tokens, to_tokens(expected))
        if guidance > 1:
            assert not torch.allclose(ev.tokens, to_tokens(out[:2]))


def test_uncond_and_both_halves(model):
    got = {}
    for half in ("uncond", "both"):
        events = []
        with read_activations(model, [LAYER], events.append, half=half):
            raw = _raw_outputs(model, LAYER, lambda: model.generate([PROMPT], [0], n_steps=1, guidance=3.0))
        got[half] = (events[0].tokens, raw[0][1])
    torch.testing.assert_close(got["uncond"][0], to_tokens(got["uncond"][1][:1]))
    torch.testing.assert_close(got["both"][0], to_tokens(got["both"][1]))


def test_delta_is_output_minus_input(model):
    events = []
    with read_activations(model, [LAYER], events.append, read="delta"):
        raw = _raw_outputs(model, LAYER, lambda: model.generate([PROMPT], [0], n_steps=2, guidance=1.0))
    for ev, (inp, out) in zip(events, raw, strict=True):
        torch.testing.assert_close(ev.tokens, to_tokens(out - inp))


def test_delta_of_a_resizing_block_is_an_error(model):
    with pytest.raises(DifflensError, match="changes shape"):
        with read_activations(model, ["down_blocks.0"], lambda e: None, read="delta"):
            model.generate([PROMPT], [0], n_steps=1, guidance=1.0)
    assert not model.denoiser.get_submodule("down_blocks.0")._forward_hooks


def test_hooks_are_removed_even_on_error(model):
    mod = model.denoiser.get_submodule(LAYER)

    def boom(_ev):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        with read_activations(model, [LAYER], boom):
            model.generate([PROMPT], [0], n_steps=1)
    assert not mod._forward_hooks
    with pytest.raises(ZeroDivisionError):
        with edit_activations(model, LAYER, lambda t, s: 1 / 0):
            model.generate([PROMPT], [0], n_steps=1)
    assert not mod._forward_hooks


def test_identity_edit_changes_nothing_and_cond_edit_leaves_uncond(model):
    base = model.generate([PROMPT], [3], n_steps=3, guidance=3.0)
    with edit_activations(model, LAYER, lambda t, s: t):
        same = model.generate([PROMPT], [3], n_steps=3, guidance=3.0)
    assert torch.equal(base, same)
    events = []
    with edit_activations(model, LAYER, lambda t, s: t * 0, half="cond"), \
            read_activations(model, [LAYER], events.append, half="both"):
        model.generate([PROMPT], [3], n_steps=1, guidance=3.0)
    uncond, cond = events[0].tokens.chunk(2)
    assert cond.abs().max() == 0 and uncond.abs().max() > 0


def test_token_layout_round_trip():
    x = torch.randn(2, 5, 3, 4)
    tok = to_tokens(x)
    assert tok.shape == (2, 12, 5)
    torch.testing.assert_close(tok[1, 4 + 2], x[1, :, 1, 2])  # row-major positions: y * W + x
    torch.testing.assert_close(from_tokens(tok, x), x)


def test_unknown_layer(model):
    with pytest.raises(UnknownLayerError, match="did you mean"):
        with read_activations(model, ["up_blocks.1.attention.1"], lambda e: None):
            pass


def test_the_stream_table_agrees_with_diffusers_own_block_metadata():
    """BLOCK_STREAMS is what diffusers' hook helpers say of each joint block class in the installed version."""
    import diffusers
    from diffusers.hooks._helpers import TransformerBlockRegistry

    from backend.models.hooks import BLOCK_STREAMS

    classes = {"JointTransformerBlock": diffusers.models.attention.JointTransformerBlock,
               "FluxTransformerBlock": diffusers.models.transformers.transformer_flux.FluxTransformerBlock,
               "FluxSingleTransformerBlock": diffusers.models.transformers.transformer_flux.FluxSingleTransformerBlock}
    assert set(classes) == set(BLOCK_STREAMS)
    for name, cls in classes.items():
        meta = TransformerBlockRegistry.get(cls)
        assert (BLOCK_STREAMS[name].image, BLOCK_STREAMS[name].text) == (
            meta.return_hidden_states_index, meta.return_encoder_hidden_states_index), name


def test_a_single_stream_block_returning_one_joint_sequence_is_split_by_the_text_length():
    """Diffusers before the split single-stream API returned [text; image] as one tensor: the image part is read and
    replaced, the text part passes through."""
    from types import SimpleNamespace

    from backend.models.hooks import BLOCK_STREAMS, Stream

    stream = Stream(BLOCK_STREAMS["FluxSingleTransformerBlock"], "image", SimpleNamespace(text_tokens=3))
    joint = torch.randn(2, 3 + 8, 4)
    torch.testing.assert_close(stream.output(joint), joint[:, 3:])
    torch.testing.assert_close(stream.input((joint, torch.randn(2, 4)), {}), joint[:, 3:])  # (hidden, temb)
    new = torch.zeros(2, 8, 4)
    replaced = stream.replace(joint, new)
    torch.testing.assert_close(replaced[:, :3], joint[:, :3])
    assert replaced[:, 3:].abs().max() == 0
    split = (torch.randn(2, 3, 4), torch.randn(2, 8, 4))  # the split API: (text, image)
    assert stream.output(split) is split[1] and stream.replace(split, new)[0] is split[0]


def test_a_text_stream_on_a_block_without_one_is_a_one_line_error(model):
    with pytest.raises(DifflensError, match="has no text stream") as exc:
        with read_activations(model, [LAYER + ":text"], lambda e: None):
            pass
    assert "\n" not in str(exc.value)
