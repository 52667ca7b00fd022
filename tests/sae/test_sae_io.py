"""SAE checkpoints: our format round-trips; SAELens loads our export and reconstructs identically; load_sae reads
the export back (format detection; the format readers are tested in tests/sae/test_formats_*.py)."""

import json

import pytest
import torch

from sae.io import SAELoadError, export_saelens, load_sae, save_sae
from sae.model import SAE, SAEConfig


def random_sae(architecture="topk", d=12, n=48, k=4, normalized=False) -> SAE:
    cfg = SAEConfig(d_in=d, n_latents=n, k=k, architecture=architecture, normalized=normalized,
                    input_mean=[0.3] * d if normalized else [], input_scale=1.7 if normalized else 1.0)
    sae = SAE(cfg)
    sae.reset_parameters(torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.5)
    return sae.eval()


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_saelens_loads_our_export_and_reconstructs_identically(tmp_path, architecture):
    from sae_lens import SAE as SAELensSAE

    ours = random_sae(architecture, normalized=True).folded()
    export_saelens(ours, tmp_path / "exported", hook_name="up_blocks.1.attentions.1")
    theirs = SAELensSAE.load_from_disk(str(tmp_path / "exported"), device="cpu")
    x = torch.randn(64, 12) * 3 + 1
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x, dense=True), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x), rtol=1e-5, atol=1e-5)
    assert theirs.cfg.metadata.hook_name == "up_blocks.1.attentions.1"


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_saelens_export_loads_back(tmp_path, architecture):
    ours = random_sae(architecture)
    back = load_sae(export_saelens(ours, tmp_path / "e"))
    x = torch.randn(32, 12)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x))


def test_jumprelu_and_layernorm_export_to_saelens(tmp_path):
    from sae_lens import SAE as SAELensSAE

    ours = SAE(SAEConfig(d_in=12, n_latents=48, architecture="jumprelu", normalize="layernorm"))
    ours.reset_parameters(torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours.b_dec.normal_(0, 0.3)
        ours.threshold.uniform_(0, 0.2)
    export_saelens(ours.eval(), tmp_path)
    theirs = SAELensSAE.load_from_disk(str(tmp_path), device="cpu")
    x = torch.randn(16, 12) * 2
    with torch.no_grad():
        acts = theirs.encode(x)
        torch.testing.assert_close(acts, ours.encode(x, dense=True), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(acts), ours(x), rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_and_mismatch_error(tmp_path):
    ours = random_sae("batchtopk", normalized=True)
    save_sae(ours, tmp_path / "s")
    back = load_sae(tmp_path / "s")
    x = torch.randn(8, 12)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours.folded()(x))
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg | {"n_latents": 64}))
    with pytest.raises(SAELoadError, match="does not match"):
        load_sae(tmp_path / "s")
    assert not list((tmp_path / "s").glob(".*tmp"))
