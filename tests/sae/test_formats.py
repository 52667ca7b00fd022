"""Format detection: each recognised folder layout names its format; a folder matching none, or several, or a
missing path, is a one-line SAELoadError listing the formats and the files each needs."""

import json

import pytest
import torch
from safetensors.torch import save_file

from sae.formats import FORMATS, SAELoadError, detect_format, read_sae, weights_file
from sae.io import save_sae
from sae.model import SAE, SAEConfig


def our_sae(directory):
    return save_sae(SAE(SAEConfig(d_in=16, n_latents=64, k=4)), directory)


def test_each_layout_is_detected(tmp_path):
    our_sae(tmp_path / "ours")
    assert detect_format(tmp_path / "ours") == "difflens"
    (tmp_path / "sparsify").mkdir()
    save_file({"encoder.weight": torch.zeros(64, 16)}, str(tmp_path / "sparsify" / "sae.safetensors"))
    (tmp_path / "sparsify" / "cfg.json").write_text("{}")
    assert detect_format(tmp_path / "sparsify") == "sparsify"
    for name, files in (("saelens", ["cfg.json", "sae_weights.safetensors"]),
                        ("sdxl_unbox", ["config.json", "state_dict.pth", "mean.pt", "std.pt"]),
                        ("dictionary_learning", ["config.json", "ae.pt"])):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_bytes(b"")
        assert detect_format(tmp_path / name) == name
        assert weights_file(tmp_path / name) == tmp_path / name / files[1]


def test_unknown_mixed_and_missing_folders_are_one_line_errors(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(SAELoadError) as err:
        read_sae(tmp_path)
    message = str(err.value)
    assert "is not an SAE directory: it matches no checkpoint format" in message and "\n" not in message
    for name, fmt in FORMATS.items():
        assert f"{name}: {' + '.join(fmt.FILES)}" in message
    our_sae(tmp_path)
    (tmp_path / "sae_weights.safetensors").write_bytes(b"")
    with pytest.raises(SAELoadError, match="mixes SAE checkpoint formats .*difflens.*saelens"):
        read_sae(tmp_path)
    with pytest.raises(SAELoadError, match="does not exist"):
        read_sae(tmp_path / "nowhere")


def test_original_config_is_json_serialisable(tmp_path):
    our_sae(tmp_path)
    json.dumps(read_sae(tmp_path).original_config)
