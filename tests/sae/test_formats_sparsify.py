"""sparsify checkpoints written by eai-sparsify itself (SparseCoder.save_to_disk), and SAeUron's (same files, written
here as its SAE/sae.py `save_to_disk` writes them), read into difflens SAEs whose codes and reconstructions equal
the originals' on the same inputs."""

import json

import pytest
import torch
from sae_checkpoints import assert_codes_and_reconstructions
from safetensors.torch import save_file
from sparsify import SparseCoder, SparseCoderConfig

from sae.formats import SAELoadError, read_sae

D, N, K = 16, 64, 4


def inputs() -> torch.Tensor:
    return torch.randn(32, D, generator=torch.Generator().manual_seed(3)) * 1.5 - 0.2


@torch.no_grad()
def random_weights(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"encoder.weight": torch.randn(N, D, generator=g) * 0.4, "encoder.bias": torch.randn(N, generator=g) * 0.1,
            "W_dec": torch.randn(N, D, generator=g) * 0.4, "b_dec": torch.randn(D, generator=g) * 0.3}


def sparsify_coder(**cfg) -> SparseCoder:
    coder = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K, **cfg))
    coder.load_state_dict(random_weights())
    return coder.eval()


def test_sparsify_matches_its_encode_and_decode(tmp_path):
    theirs = sparsify_coder()
    theirs.save_to_disk(tmp_path)
    imported = read_sae(tmp_path)
    assert imported.source_format == "sparsify"
    assert imported.original_config == json.loads((tmp_path / "cfg.json").read_text())
    x = inputs()
    with torch.no_grad():
        top_acts, top_indices, _ = theirs.encode(x)
        recon = theirs.decode(top_acts, top_indices)
    dense = torch.zeros(len(x), N).scatter_(-1, top_indices, top_acts)
    assert_codes_and_reconstructions(imported.sae, x, dense, recon)


def test_expansion_factor_sets_the_width(tmp_path):
    theirs = SparseCoder(D, SparseCoderConfig(expansion_factor=N // D, k=K))
    theirs.load_state_dict(random_weights(1))
    theirs.save_to_disk(tmp_path)
    assert read_sae(tmp_path).sae.cfg.n_latents == N


@pytest.mark.parametrize("setting,message", [({"activation": "groupmax"}, "groupmax"),
                                             ({"transcode": True}, "transcoder"),
                                             ({"skip_connection": True}, "skip connection")])
def test_other_sparse_coders_are_refused(tmp_path, setting, message):
    coder = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K, **setting))
    coder.save_to_disk(tmp_path)
    with pytest.raises(SAELoadError, match=message):
        read_sae(tmp_path)


def write_saeuron(directory, weights, input_unit_norm):
    """As SAeUron SAE/sae.py `Sae.save_to_disk`: safetensors save_model of the module (encoder.weight, encoder.bias,
    W_dec, b_dec) and cfg.json = SaeConfig.to_dict() (SAE/config.py fields) + d_in."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(directory / "sae.safetensors"), metadata={"format": "pt"})
    cfg = {"expansion_factor": N // D, "normalize_decoder": True, "num_latents": N, "k": K, "batch_topk": True,
           "sample_topk": False, "input_unit_norm": input_unit_norm, "multi_topk": False, "d_in": D}
    (directory / "cfg.json").write_text(json.dumps(cfg))


def saeuron_forward(w, x, input_unit_norm):
    """SAeUron SAE/sae.py `Sae.forward` after `load_from_disk` (batch_topk and sample_topk switched off):
    preprocess_input, pre_acts = relu(encoder(x - b_dec)), select_topk (per-token topk), decode, postprocess_output."""
    mean = std = None
    if input_unit_norm:
        mean = x.mean(dim=-1, keepdim=True)
        x = x - mean
        std = x.std(dim=-1, keepdim=True)
        x = x / (std + 1e-5)
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top_acts, top_indices = pre.topk(K, sorted=False)
    latents = torch.zeros_like(pre).scatter_(-1, top_indices, top_acts)
    out = latents @ w["W_dec"] + w["b_dec"]
    if input_unit_norm:
        out = out * std + mean
    return latents, out


@pytest.mark.parametrize("input_unit_norm", [False, True])
def test_saeuron_checkpoint_with_its_input_unit_norm(tmp_path, input_unit_norm):
    w = random_weights(2)
    write_saeuron(tmp_path, w, input_unit_norm)
    imported = read_sae(tmp_path)
    assert imported.source_format == "sparsify"
    assert imported.sae.cfg.normalize == ("layernorm" if input_unit_norm else "none")
    x = inputs() * 3 + 1
    assert_codes_and_reconstructions(imported.sae, x, *saeuron_forward(w, x, input_unit_norm))


def test_nan_weights_and_missing_decoder_are_refused(tmp_path):
    w = random_weights()
    w["encoder.bias"][5] = float("inf")
    write_saeuron(tmp_path, w, False)
    with pytest.raises(SAELoadError, match="'encoder.bias' has NaN or inf"):
        read_sae(tmp_path)
    del w["W_dec"]
    w["encoder.bias"][5] = 0.0
    write_saeuron(tmp_path, w, False)
    with pytest.raises(SAELoadError, match="no decoder"):
        read_sae(tmp_path)
