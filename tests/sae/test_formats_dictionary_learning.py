"""dictionary_learning checkpoints (saprmarks/dictionary_learning; its PyPI package pulls nnsight, umap and wandb, so
the files are written here as its training.py writes them: config.json {"trainer": trainer.config, ...} and
t.save(state_dict, "ae.pt")), read into difflens SAEs whose codes and reconstructions equal a faithful
re-implementation of each dictionary's encode / decode."""

import json

import pytest
import torch
from sae_checkpoints import assert_codes_and_reconstructions

from sae.formats import SAELoadError, read_sae

D, N, K = 16, 64, 4


def inputs() -> torch.Tensor:
    return torch.randn(32, D, generator=torch.Generator().manual_seed(5)) * 2 - 0.3


def state(dict_class: str, seed=0) -> dict:
    """The state_dict() tensors of each dictionary class (dictionary.py; trainers/top_k.py, batch_top_k.py,
    matryoshka_batch_top_k.py), away from their init: non-unit decoder columns, non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    enc, dec = torch.randn(N, D, generator=g) * 0.4, torch.randn(D, N, generator=g) * 0.7
    b_enc, b_dec = torch.randn(N, generator=g) * 0.1, torch.randn(D, generator=g) * 0.3
    if dict_class == "AutoEncoder":
        return {"bias": b_dec, "encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec}
    if dict_class == "AutoEncoderNew":
        return {"encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec, "decoder.bias": b_dec}
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.25), "decoder.weight": dec,
                "encoder.weight": enc, "encoder.bias": b_enc, "b_dec": b_dec}
    out = {"W_enc": enc.T.contiguous(), "b_enc": b_enc, "W_dec": dec.T.contiguous(), "b_dec": b_dec}
    if dict_class == "JumpReluAutoEncoder":
        return out | {"threshold": torch.rand(N, generator=g) * 0.3}
    return out | {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.25),
                  "group_sizes": torch.tensor([16, 48])}


def write(directory, dict_class, sd):
    directory.mkdir(parents=True, exist_ok=True)
    trainer = {"trainer_class": "Trainer", "dict_class": dict_class, "activation_dim": D, "dict_size": N,
               "layer": 3, "lm_name": "tiny", "submodule_name": "resid_post_layer_3"}
    if "k" in sd:
        trainer["k"] = K
    (directory / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"d_submodule": D}}, indent=4))
    torch.save(sd, directory / "ae.pt")


def reference(dict_class, sd, x):
    """(features, reconstruction) as dictionary_learning computes them after `load_dictionary`."""
    relu = torch.relu
    if dict_class == "AutoEncoder":
        enc, b_enc, dec = sd["encoder.weight"], sd["encoder.bias"], sd["decoder.weight"]
        norms = dec.norm(dim=0)  # from_pretrained(normalize_decoder=True): dictionary.py normalize_decoder
        dec, enc, b_enc = dec / norms, enc * norms[:, None], b_enc * norms
        f = relu((x - sd["bias"]) @ enc.T + b_enc)  # encode
        return f, f @ dec.T + sd["bias"]  # decode
    if dict_class == "AutoEncoderNew":
        f = relu(x @ sd["encoder.weight"].T + sd["encoder.bias"])
        return f, f @ sd["decoder.weight"].T + sd["decoder.bias"]
    if dict_class == "JumpReluAutoEncoder":  # apply_b_dec_to_input False
        pre = x @ sd["W_enc"] + sd["b_enc"]
        f = relu(pre * (pre > sd["threshold"]))
        return f, f @ sd["W_dec"] + sd["b_dec"]
    if dict_class == "MatryoshkaBatchTopKSAE":
        post = relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
        f = post * (post > sd["threshold"])
        return f, f @ sd["W_dec"] + sd["b_dec"]
    post = relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    if dict_class == "BatchTopKSAE":  # encode(use_threshold=True)
        f = post * (post > sd["threshold"])
    else:  # AutoEncoderTopK.encode(use_threshold=False)
        top = post.topk(K, sorted=False, dim=-1)
        f = torch.zeros_like(post).scatter_(-1, top.indices, top.values)
    return f, f @ sd["decoder.weight"].T + sd["b_dec"]


@pytest.mark.parametrize("dict_class", ["AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE",
                                        "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"])
def test_dictionaries_match_their_encode_and_decode(tmp_path, dict_class):
    sd = state(dict_class)
    write(tmp_path, dict_class, sd)
    imported = read_sae(tmp_path)
    assert imported.source_format == "dictionary_learning"
    assert imported.original_config["trainer"]["dict_class"] == dict_class
    assert imported.sae.cfg.layer == "resid_post_layer_3"
    x = inputs()
    f, recon = reference(dict_class, sd, x)
    assert (f > 0).any() and (f == 0).any()
    assert_codes_and_reconstructions(imported.sae, x, f, recon)


def test_bad_checkpoints_are_refused(tmp_path):
    sd = state("AutoEncoderTopK")
    write(tmp_path, "GatedAutoEncoder", sd)
    with pytest.raises(SAELoadError, match="GatedAutoEncoder' is not supported"):
        read_sae(tmp_path)
    write(tmp_path, "AutoEncoderTopK", dict(sd, k=torch.tensor(5, dtype=torch.int)))
    with pytest.raises(SAELoadError, match="k = 4 but ae.pt stores k = 5"):
        read_sae(tmp_path)
    torch.save({"step": 10, "ae": sd, "optimizer": {}, "config": {}, "norm_factor": 1.0}, tmp_path / "ae.pt")
    with pytest.raises(SAELoadError, match="mid-training backup"):
        read_sae(tmp_path)
    sd["encoder.weight"][1, 1] = float("nan")
    write(tmp_path, "AutoEncoderTopK", sd)
    with pytest.raises(SAELoadError, match="'encoder.weight' has NaN"):
        read_sae(tmp_path)
