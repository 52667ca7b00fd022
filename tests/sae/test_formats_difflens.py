"""Our own checkpoint format through read_sae: codes and reconstructions unchanged, provenance recorded, bad files
refused in one line."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.formats import SAELoadError, read_sae
from sae.io import load_sae, save_sae
from sae.model import SAE, SAEConfig


def trained_like(architecture="topk", **cfg) -> SAE:
    sae = SAE(SAEConfig(d_in=16, n_latents=64, k=4, architecture=architecture, **cfg))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.5)
        sae.threshold.fill_(0.1)
    return sae.eval()


@pytest.mark.parametrize("architecture,normalize", [("topk", "none"), ("batchtopk", "none"), ("relu", "none"),
                                                    ("jumprelu", "none"), ("topk", "layernorm")])
def test_round_trip_keeps_codes_and_reconstructions(tmp_path, architecture, normalize):
    ours = trained_like(architecture, normalize=normalize)
    save_sae(ours, tmp_path)
    imported = read_sae(tmp_path)
    assert imported.source_format == "difflens"
    assert imported.source == str(tmp_path.resolve())
    assert imported.original_config == json.loads((tmp_path / "cfg.json").read_text())
    assert not imported.sae.training
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        torch.testing.assert_close(imported.sae.encode(x, dense=True), ours.encode(x, dense=True), rtol=0, atol=0)
        torch.testing.assert_close(imported.sae(x), ours(x), rtol=0, atol=0)
    torch.testing.assert_close(load_sae(tmp_path / "sae.safetensors").W_dec, ours.W_dec)  # a file: its folder


def test_checkpoints_from_before_normalize_existed_load_unchanged(tmp_path):
    save_sae(trained_like(), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["normalize"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert read_sae(tmp_path).sae.cfg.normalize == "none"


def test_bad_files_are_refused_in_one_line(tmp_path):
    save_sae(trained_like(), tmp_path)
    w = load_file(str(tmp_path / "sae.safetensors"))
    w["b_dec"][0] = float("nan")
    save_file(w, str(tmp_path / "sae.safetensors"))
    with pytest.raises(SAELoadError, match="'b_dec' has NaN or inf"):
        read_sae(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SAELoadError, match="cfg.json is not readable JSON"):
        read_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 16, "n_latents": 64, "architecture": "gated"}))
    with pytest.raises(SAELoadError, match="unknown SAE architecture 'gated'") as err:
        read_sae(tmp_path)
    assert "\n" not in str(err.value)
