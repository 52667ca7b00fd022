"""Hook-point listing, the one cached probe pass, and layer checks."""

import pytest

from backend.errors import UnknownLayerError
from backend.models import load_model
from backend.models.layers import check_layers, hook_points, layer_channels, layer_tokens_shape, probe


def test_blocks_come_before_their_parts_in_execution_order(untrained_demo_dir):
    names = [p.name for p in hook_points(load_model(str(untrained_demo_dir)))]
    assert names.index("up_blocks.1") < names.index("up_blocks.1.attentions.1")
    assert names.index("down_blocks.0") < names.index("mid_block") < names.index("up_blocks.0")


def test_sd_and_sdxl_have_attention_targets(sd_dir, sdxl_dir):
    for path in (sd_dir, sdxl_dir):
        points = hook_points(load_model(str(path)))
        targets = [p for p in points if p.sae_target]
        assert any(p.name == "up_blocks.0.attentions.1" for p in targets)
        assert all(p.channels == p.shape[0] for p in points if len(p.shape) == 3)


def test_unknown_layer_suggests_and_lists(untrained_demo_dir):
    model = load_model(str(untrained_demo_dir))
    check_layers(model, ["up_blocks.1.attentions.1"])
    with pytest.raises(UnknownLayerError) as exc:
        check_layers(model, ["up_blocks.1.atentions.1"])
    msg = str(exc.value)
    assert "did you mean up_blocks.1.attentions.1" in msg and "SAE targets" in msg and "\n" not in msg


def test_one_probe_pass_per_model_answers_every_shape_question(untrained_demo_dir):
    from backend.interventions.ablate import block_shapes, candidate_blocks, check_blocks

    model = load_model(str(untrained_demo_dir))  # a fresh instance: nothing cached yet
    calls = []
    handle = model.denoiser.register_forward_hook(lambda *a: calls.append(1))
    try:
        points = hook_points(model)
        assert layer_channels(model, "up_blocks.1.attentions.1") == 64
        assert layer_tokens_shape(model, "up_blocks.1.attentions.1") == (64, 64)  # an 8x8 grid of 64 channels
        cands = candidate_blocks(model)
        check_blocks(model, ["mid_block.attentions.0"])
        block_shapes(model, ["up_blocks.1.attentions.1.transformer_blocks.0"])
        every = hook_points(model, all_modules=True)
        probes = probe(model, all_modules=True)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert "mid_block.attentions.0" in cands and len(every) > len(points)
    assert [p.name for p in every] == list(probes)  # execution order
    assert [p.order for p in probes.values()] == sorted(p.order for p in probes.values())
    mid = probes["mid_block.attentions.0"]
    assert mid.module_type == "Transformer2DModel" and mid.input_shape == mid.output_shape == (64, 4, 4)
    assert model.cfg_active is False and model.step_index == 0  # the pass leaves the model's flags alone
    other = load_model(str(untrained_demo_dir))  # another instance probes once more
    handle = other.denoiser.register_forward_hook(lambda *a: calls.append(1))
    try:
        hook_points(other)
        hook_points(other)
    finally:
        handle.remove()
    assert len(calls) == 2


@pytest.mark.parametrize("name, blocks", [
    ("sd3_dir", ["transformer_blocks.0", "transformer_blocks.0:text", "transformer_blocks.2"]),
    ("flux_dir", ["transformer_blocks.1", "transformer_blocks.1:text", "single_transformer_blocks.0",
                  "single_transformer_blocks.1"]),
])
def test_layers_lists_the_joint_blocks_and_their_text_streams(request, name, blocks):
    """`layers --model DIR`: every joint block (image stream, a usual SAE target) with its text stream right after
    it; no text stream for the last SD3 block (context_pre_only) nor for FLUX's single-stream blocks."""
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["layers", "--model", str(request.getfixturevalue(name))])
    assert result.exit_code == 0, result.output
    rows = {line[2:].split()[0]: line for line in result.output.splitlines()[1:-1]}
    for block in blocks:
        assert block in rows
        assert rows[block].startswith("*") == (not block.endswith(":text"))
    names = list(rows)
    assert names.index("transformer_blocks.0:text") == names.index("transformer_blocks.0") + 1
    assert {n for n in names if n.endswith(":text")} == {"transformer_blocks.0:text", "transformer_blocks.1:text"}
