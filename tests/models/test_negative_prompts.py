"""Negative prompts: our loop with negative prompts equals each pipeline's own __call__(negative_prompt=...), a
negative prompt changes the image, and one without CFG is an error (it would be ignored)."""

import pytest
import torch

from backend.models import load_model

PROMPTS = ["a red cat on the house", "a blue dog in the tree"]
NEGATIVE = "a green house"
FAMILIES = {"sd_dir": 5.0, "sdxl_dir": 5.0, "pixart_dir": 4.5}


def reference(model, name, prompts, seeds, guidance, negative=None):
    extra = {"use_resolution_binning": False, "clean_caption": False} if name == "pixart_dir" else {}
    if negative is not None:
        extra["negative_prompt"] = negative
    return model.pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=3,
                      guidance_scale=guidance, output_type="pt", **extra).images.float()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_our_loop_with_negative_prompts_matches_the_pipeline(request, name):
    model = load_model(str(request.getfixturevalue(name)))
    guidance, negatives = FAMILIES[name], [NEGATIVE, "a red tree"]
    ours = model.generate(PROMPTS, [3, 4], n_steps=3, guidance=guidance, negative_prompts=negatives)
    ref = reference(model, name, PROMPTS, [3, 4], guidance, negatives)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    plain = model.generate(PROMPTS, [3, 4], n_steps=3, guidance=guidance)
    assert (ours - plain).abs().amax() > 1e-3  # the negative prompt took part


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_batch_mixing_prompts_with_and_without_a_negative(request, name):
    """Each generation equals the pipeline's call with its own negative prompt, or without one (SDXL zeroes the
    unconditional embeddings of a call without negative_prompt: force_zeros_for_empty_prompt)."""
    model = load_model(str(request.getfixturevalue(name)))
    guidance = FAMILIES[name]
    ours = model.generate(PROMPTS, [3, 4], n_steps=3, guidance=guidance, negative_prompts=[NEGATIVE, ""])
    with_negative = reference(model, name, PROMPTS[:1], [3], guidance, [NEGATIVE])
    without = reference(model, name, PROMPTS[1:], [4], guidance)
    torch.testing.assert_close(ours, torch.cat([with_negative, without]), atol=1e-5, rtol=1e-5)
    # no negative prompt anywhere is the plain call
    torch.testing.assert_close(model.generate(PROMPTS, [3, 4], n_steps=3, guidance=guidance,
                                              negative_prompts=[None, ""]),
                               model.generate(PROMPTS, [3, 4], n_steps=3, guidance=guidance), atol=0, rtol=0)


def test_the_demo_model_takes_a_negative_prompt(untrained_demo_dir):
    model = load_model(str(untrained_demo_dir))
    prompt = ["a large red circle on the left, gray background"]
    cond, uncond = model.encode_prompts(prompt, cfg=True, negative=["blue"])
    _, empty = model.encode_prompts(prompt, cfg=True)
    want, _ = model.encode_prompts(["blue"], cfg=False)
    torch.testing.assert_close(uncond["encoder_hidden_states"], want["encoder_hidden_states"])
    assert not torch.allclose(uncond["encoder_hidden_states"], empty["encoder_hidden_states"])


def test_a_negative_prompt_without_cfg_is_an_error(sd_dir):
    model = load_model(str(sd_dir))
    with pytest.raises(ValueError, match="needs classifier-free guidance"):
        model.generate(PROMPTS[:1], [0], n_steps=1, guidance=1.0, negative_prompts=[NEGATIVE])
    with pytest.raises(ValueError, match="one per prompt"):
        model.generate(PROMPTS, [0, 1], n_steps=1, guidance=3.0, negative_prompts=[NEGATIVE])
    model.generate(PROMPTS[:1], [0], n_steps=1, guidance=1.0, negative_prompts=[""])  # none given: fine


def test_condition_arguments_pass_a_list_only_when_an_item_is_set():
    import pytest

    from backend.models.base import condition_arguments

    assert condition_arguments(negative_prompt=[None, ""], control_image=[None, None]) == {}
    assert condition_arguments(negative_prompt=["blurry", None], control_image=[None, None]) == {
        "negative_prompts": ["blurry", None]}
    assert condition_arguments(control_image=("a.png", "b.png")) == {"control_images": ["a.png", "b.png"]}
    with pytest.raises(ValueError, match="unknown condition columns"):
        condition_arguments(negative=["x"])
