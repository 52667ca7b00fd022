"""Hook-point listing and layer checks."""

import pytest

from backend.errors import UnknownLayerError
from backend.models import load_model
from backend.models.layers import check_layers, hook_points


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
