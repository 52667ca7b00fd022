"""sdxl-unbox checkpoints (and openai/sparse_autoencoder state dicts in the same folder layout), written here as
their code writes them (neither is on PyPI), read into difflens SAEs whose codes and reconstructions equal a
faithful re-implementation of their forward passes; pickles that need full unpickling are refused."""

import json

import pytest
import torch
from sae_checkpoints import assert_codes_and_reconstructions

from sae.formats import SAELoadError, read_sae

D, N, K = 16, 64, 4


def inputs() -> torch.Tensor:
    return torch.randn(32, D, generator=torch.Generator().manual_seed(11)) * 2 + 0.7


def unbox_state(seed=0) -> dict:
    """The tensors of surkovv/sdxl-unbox SAE/sae.py `SparseAutoencoder.state_dict()`: encoder / decoder nn.Linear
    without bias, pre_bias, latent_bias, the stats_last_nonzero buffer."""
    g = torch.Generator().manual_seed(seed)
    return {"encoder.weight": torch.randn(N, D, generator=g) * 0.4, "decoder.weight": torch.randn(D, N, generator=g),
            "pre_bias": torch.randn(D, generator=g) * 0.3, "latent_bias": torch.randn(N, generator=g) * 0.1,
            "stats_last_nonzero": torch.zeros(N, dtype=torch.long)}


def write_unbox(directory, state, stats=True):
    """As `SparseAutoencoder.save_to_disk`: config.json and torch.save({"state_dict": ...}, "state_dict.pth"); the
    published checkpoints add mean.pt / std.pt, per-feature activation statistics of shape [n_dirs]."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"n_dirs_local": N, "d_model": D, "k": K, "auxk": 256,
                                                       "dead_steps_threshold": 2441}))
    torch.save({"state_dict": state}, directory / "state_dict.pth")
    if stats:
        torch.save(torch.rand(N) * 20, directory / "mean.pt")
        torch.save(torch.rand(N) * 5, directory / "std.pt")


def unbox_forward(sd, x):
    """SAE/sae.py `encode` (topk of encoder(x - pre_bias) + latent_bias, relu on the kept values) and the
    reconstruction of `forward` / hooks.py (decoder(latents) + pre_bias)."""
    pre = (x - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    vals, inds = torch.topk(pre, k=K, dim=-1)
    latents = torch.zeros_like(pre).scatter_(-1, inds, torch.relu(vals))
    return latents, latents @ sd["decoder.weight"].T + sd["pre_bias"]


def openai_forward(sd, x, k=None):
    """openai/sparse_autoencoder model.py `Autoencoder` built by `from_state_dict`: TopK implies normalize=True
    (LN: x - mu, / (std + 1e-5)); encode = activation(encoder(x - pre_bias) + latent_bias); decode =
    decoder(latents) + pre_bias, then * std + mu. TopK: topk, postact_fn (ReLU) on the values, zeros elsewhere."""
    mu = std = None
    if k is not None:
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        x = x / (std + 1e-5)
    pre = (x - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    if k is None:
        latents = torch.relu(pre)
    else:
        top = torch.topk(pre, k=k, dim=-1)
        latents = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
    out = latents @ sd["decoder.weight"].T + sd["pre_bias"]
    return latents, (out * std + mu if k is not None else out)


def test_unbox_checkpoint_matches_its_forward(tmp_path):
    sd = unbox_state()
    write_unbox(tmp_path, sd)
    imported = read_sae(tmp_path)
    assert imported.source_format == "sdxl_unbox"
    assert imported.sae.cfg.normalize == "none" and imported.sae.cfg.k == K
    assert imported.original_config["k"] == K
    assert imported.original_config["latent_stats"]["mean.pt"] == {"shape": [N], "applied_to_inputs": False}
    x = inputs()
    assert_codes_and_reconstructions(imported.sae, x, *unbox_forward(sd, x))


@pytest.mark.parametrize("activation", ["TopK", "ReLU"])
def test_openai_state_dict_matches_its_forward(tmp_path, activation):
    sd = unbox_state(1)
    saved = dict(sd, latents_activation_frequency=torch.ones(N), latents_mean_square=torch.zeros(N),
                 activation=activation)
    if activation == "TopK":  # Autoencoder.state_dict() with a TopK activation (model.py TopK.state_dict)
        saved["activation_state_dict"] = {"k": K, "postact_fn": "ReLU"}
    write_unbox(tmp_path, sd, stats=False)
    torch.save(saved, tmp_path / "state_dict.pth")
    imported = read_sae(tmp_path)
    assert imported.sae.cfg.normalize == ("layernorm" if activation == "TopK" else "none")
    assert imported.original_config["state_dict.pth"]["activation"] == activation
    x = inputs()
    assert_codes_and_reconstructions(imported.sae, x, *openai_forward(sd, x, K if activation == "TopK" else None))


class NotAWeight:
    """A class a weights-only unpickler will not construct."""


def test_pickles_needing_full_unpickling_are_refused(tmp_path):
    write_unbox(tmp_path, unbox_state())
    torch.save({"state_dict": unbox_state(), "extra": NotAWeight()}, tmp_path / "state_dict.pth")
    with pytest.raises(SAELoadError, match="needs full unpickling .*NotAWeight.*weights_only=True") as err:
        read_sae(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "state_dict.pth").write_bytes(b"not a torch file")
    with pytest.raises(SAELoadError, match="state_dict.pth"):
        read_sae(tmp_path)


def test_bad_statistics_nan_weights_and_identity_topk_are_refused(tmp_path):
    sd = unbox_state()
    write_unbox(tmp_path, sd)
    torch.save(torch.zeros(D), tmp_path / "std.pt")
    with pytest.raises(SAELoadError, match=r"std.pt holds \(16,\); .* shape \(64,\)"):
        read_sae(tmp_path)
    sd["decoder.weight"][0, 0] = float("nan")
    write_unbox(tmp_path, sd)
    with pytest.raises(SAELoadError, match="'decoder.weight' has NaN or inf"):
        read_sae(tmp_path)
    sd["decoder.weight"][0, 0] = 0.0
    torch.save(dict(sd, activation="TopK", activation_state_dict={"k": K, "postact_fn": "Identity"}),
               tmp_path / "state_dict.pth")
    with pytest.raises(SAELoadError, match="not supported"):
        read_sae(tmp_path)
