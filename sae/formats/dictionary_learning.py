"""saprmarks/dictionary_learning checkpoints: a trainer folder with config.json ({"trainer": {"dict_class", ...},
"buffer": ...}) and ae.pt (torch.save of the dictionary's state_dict, biases already rescaled when trained with
normalize_activations: training.py `trainSAE`).

Matched against saprmarks/dictionary_learning (utils.py `load_dictionary` picks the class by
config["trainer"]["dict_class"] and calls its `from_pretrained`):
- dictionary.py `AutoEncoder`: relu(encoder(x - bias)), decoder(f) + bias; `from_pretrained` normalises decoder
  columns to unit norm by default, moving the norms into encoder rows and bias (`normalize_decoder`).
- dictionary.py `AutoEncoderNew`: relu(encoder(x)), decoder(f) with the decoder's own bias.
- dictionary.py `JumpReluAutoEncoder`: pre = x @ W_enc + b_enc (apply_b_dec_to_input is False and not saved),
  relu(pre * (pre > threshold)), f @ W_dec + b_dec.
- trainers/top_k.py `AutoEncoderTopK`: relu(encoder(x - b_dec)), top-k (encode's use_threshold defaults False).
- trainers/batch_top_k.py `BatchTopKSAE` and trainers/matryoshka_batch_top_k.py `MatryoshkaBatchTopKSAE`:
  relu(pre) * (relu(pre) > threshold) (use_threshold defaults True; every group is active after loading).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae.formats.common import (
    SAELoadError,
    build_sae,
    fold_decoder_norms,
    read_json,
    read_pickle_weights_only,
    tensor,
)
from sae.model import SAE, SAEConfig

NAME = "dictionary_learning"
CFG_FILE = "config.json"
WEIGHTS_FILE = "ae.pt"
FILES = (CFG_FILE, WEIGHTS_FILE)
LINEAR = ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE")
"""Dictionaries stored as nn.Linear encoder / decoder (the others hold W_enc [D, N] and W_dec [N, D])."""
PARAMETER = ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE")
ARCHITECTURE = {"AutoEncoder": "relu", "AutoEncoderNew": "relu", "AutoEncoderTopK": "topk",
                "BatchTopKSAE": "batchtopk", "MatryoshkaBatchTopKSAE": "batchtopk", "JumpReluAutoEncoder": "jumprelu"}


def claims(directory: Path) -> bool:
    return all((directory / f).is_file() for f in FILES)


def read(directory: Path) -> tuple[SAE, dict]:
    raw = read_json(directory / CFG_FILE)
    trainer = raw.get("trainer") if isinstance(raw.get("trainer"), dict) else {}
    dict_class = trainer.get("dict_class")
    if dict_class not in ARCHITECTURE:
        raise SAELoadError(f"{directory / CFG_FILE}: trainer.dict_class {dict_class!r} is not supported; difflens "
                           f"reads {', '.join(ARCHITECTURE)}")
    w_path = directory / WEIGHTS_FILE
    sd = read_pickle_weights_only(w_path)
    if not isinstance(sd, dict):
        raise SAELoadError(f"{w_path} holds a {type(sd).__name__}, not a state dict")
    if "optimizer" in sd and "ae" in sd:
        raise SAELoadError(f"{w_path} is a mid-training backup (ae + optimizer state, biases not rescaled); use the "
                           "ae.pt written at the end of training")
    shape_key = "encoder.weight" if dict_class in LINEAR else "W_dec"
    if not isinstance(sd.get(shape_key), torch.Tensor) or sd[shape_key].dim() != 2:
        raise SAELoadError(f"{w_path} has no 2-d {shape_key!r}: not a {dict_class} state dict")
    n, d = tuple(sd[shape_key].shape)
    W_enc_T, b_enc, W_dec, b_dec, threshold = weights(dict_class, sd, n, d, w_path)
    k = latents_k(dict_class, sd, trainer, n, directory)
    cfg = SAEConfig(d_in=d, n_latents=n, k=k, architecture=ARCHITECTURE[dict_class],
                    layer=str(trainer.get("submodule_name") or trainer.get("layer") or ""))
    return build_sae(cfg, W_enc_T, b_enc, W_dec, b_dec, threshold), raw


def weights(dict_class: str, sd: dict, n: int, d: int, where: Path):
    """(W_enc_T, b_enc, W_dec, b_dec, threshold) in our pre = (x - b_dec) @ W_enc_T.T + b_enc form."""
    if dict_class in PARAMETER:
        W_enc_T, b_enc = tensor(sd, "W_enc", (d, n), where).T, tensor(sd, "b_enc", (n,), where)
        W_dec, b_dec = tensor(sd, "W_dec", (n, d), where), tensor(sd, "b_dec", (d,), where)
        if dict_class == "JumpReluAutoEncoder":  # encodes x itself: fold b_dec into b_enc
            return W_enc_T, b_enc + W_enc_T @ b_dec, W_dec, b_dec, tensor(sd, "threshold", (n,), where)
        return W_enc_T, b_enc, W_dec, b_dec, tensor(sd, "threshold", (), where)
    W_enc_T, b_enc = tensor(sd, "encoder.weight", (n, d), where), tensor(sd, "encoder.bias", (n,), where)
    W_dec = tensor(sd, "decoder.weight", (d, n), where).T
    if dict_class == "AutoEncoderNew":
        b_dec = tensor(sd, "decoder.bias", (d,), where)
        return W_enc_T, b_enc + W_enc_T @ b_dec, W_dec, b_dec, None
    if dict_class == "AutoEncoder":
        b_dec = tensor(sd, "bias", (d,), where)
        norm_N = W_dec.norm(dim=1)
        if not torch.allclose(norm_N, torch.ones_like(norm_N)):  # from_pretrained(normalize_decoder=True)
            W_enc_T, b_enc, W_dec = fold_decoder_norms(W_enc_T, b_enc, W_dec)
        return W_enc_T, b_enc, W_dec, b_dec, None
    threshold = tensor(sd, "threshold", (), where) if dict_class == "BatchTopKSAE" else None
    return W_enc_T, b_enc, W_dec, tensor(sd, "b_dec", (d,), where), threshold


def latents_k(dict_class: str, sd: dict, trainer: dict, n: int, directory: Path) -> int:
    """k of a top-k dictionary: the state dict's k buffer, which must agree with config.json's (from_pretrained
    raises on a mismatch too); 1 for the others (unused)."""
    if dict_class not in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        return 1
    stored = sd.get("k")
    k = int(stored.item()) if isinstance(stored, torch.Tensor) and stored.numel() == 1 else trainer.get("k")
    if not isinstance(k, int) or not 1 <= k <= n:
        raise SAELoadError(f"{directory / WEIGHTS_FILE}: k must be an integer in 1..{n} (got {k!r})")
    if trainer.get("k") is not None and trainer["k"] != k:
        raise SAELoadError(f"{directory}: config.json says k = {trainer['k']} but ae.pt stores k = {k}")
    return k
