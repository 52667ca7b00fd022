"""sdxl-unbox checkpoints ("Unpacking SDXL Turbo"), built on openai/sparse_autoencoder: a folder with config.json,
state_dict.pth and optionally mean.pt / std.pt.

Matched against surkovv/sdxl-unbox SAE/sae.py (`SparseAutoencoder`): `save_to_disk` writes config.json
{n_dirs_local, d_model, k, auxk, dead_steps_threshold} and torch.save({"state_dict": state_dict()}) with
encoder.weight [N, D], decoder.weight [D, N], pre_bias [D], latent_bias [N], stats_last_nonzero [N]; `encode`:
latents = relu(topk_k(encoder(x - pre_bias) + latent_bias)), recons = decoder(latents) + pre_bias. No input
normalisation: sdxl-unbox's mean.pt / std.pt are per-feature activation statistics ([n_dirs]; app.py and
example.ipynb scale interventions by means[feature] * k), kept as provenance and never applied to inputs. Its hooks
(utils/hooks.py) encode a transformer block's update, output - input, not the block output.

state_dict.pth may instead hold an openai/sparse_autoencoder `Autoencoder.state_dict()` (model.py): the same
tensors plus "activation" ("TopK", "ReLU") and "activation_state_dict" ({k, postact_fn}); like its
`from_state_dict`, TopK turns on the per-token LayerNorm (`LN`: x - mu, / (unbiased std + 1e-5); decode maps
back with * std + mu), read here as normalize = layernorm.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae.formats.common import (
    SAELoadError,
    build_sae,
    finite,
    jsonable,
    positive_int,
    read_json,
    read_pickle_weights_only,
    tensor,
)
from sae.model import SAE, SAEConfig

NAME = "sdxl_unbox"
CFG_FILE = "config.json"
WEIGHTS_FILE = "state_dict.pth"
STATS_FILES = ("mean.pt", "std.pt")
FILES = (CFG_FILE, WEIGHTS_FILE)


def claims(directory: Path) -> bool:
    return all((directory / f).is_file() for f in FILES)


def read(directory: Path) -> tuple[SAE, dict]:
    raw = read_json(directory / CFG_FILE)
    w_path = directory / WEIGHTS_FILE
    state = read_pickle_weights_only(w_path)
    if not isinstance(state, dict):
        raise SAELoadError(f"{w_path} holds a {type(state).__name__}, not a state dict")
    sd = state["state_dict"] if isinstance(state.get("state_dict"), dict) else state
    if not isinstance(sd.get("encoder.weight"), torch.Tensor) or sd["encoder.weight"].dim() != 2:
        raise SAELoadError(f"{w_path} has no 2-d encoder.weight: not an sdxl-unbox / openai sparse_autoencoder state "
                           "dict")
    n, d = tuple(sd["encoder.weight"].shape)
    for key, value in (("n_dirs_local", n), ("d_model", d)):
        if key in raw and raw[key] != value:
            raise SAELoadError(f"{directory / CFG_FILE}: {key} = {raw[key]} but encoder.weight is [{n}, {d}]")
    arch, k, normalize, activation = activation_of(sd, raw, directory)
    cfg = SAEConfig(d_in=d, n_latents=n, k=k, architecture=arch, normalize=normalize)
    sae = build_sae(cfg, tensor(sd, "encoder.weight", (n, d), w_path), tensor(sd, "latent_bias", (n,), w_path),
                    tensor(sd, "decoder.weight", (d, n), w_path).T, tensor(sd, "pre_bias", (d,), w_path))
    if activation:
        raw = raw | {WEIGHTS_FILE: activation}
    stats = latent_stats(directory, n)
    return sae, raw | ({"latent_stats": stats} if stats else {})


def activation_of(sd: dict, raw: dict, directory: Path) -> tuple[str, int, str, dict]:
    """(architecture, k, normalize, the activation entries of an openai state dict) of a checkpoint."""
    if "activation" not in sd:  # sdxl-unbox: TopK with config.json's k, no normalisation
        k = positive_int(raw, "k", directory / CFG_FILE)
        if k > sd["encoder.weight"].shape[0]:
            raise SAELoadError(f"{directory / CFG_FILE}: k = {k} exceeds the {sd['encoder.weight'].shape[0]} latents")
        return "topk", k, "none", {}
    name, extra = sd["activation"], sd.get("activation_state_dict") or {}
    entries = jsonable({"activation": name, "activation_state_dict": extra})
    if name == "ReLU":
        return "relu", 1, "none", entries
    if name == "TopK" and extra.get("postact_fn", "ReLU") == "ReLU":
        return "topk", positive_int(extra, "k", directory / WEIGHTS_FILE), "layernorm", entries
    raise SAELoadError(f"{directory / WEIGHTS_FILE}: activation {name!r} {extra or ''} is not supported; difflens "
                       "reads ReLU and TopK with a ReLU after the top-k")


def latent_stats(directory: Path, n: int) -> dict:
    """Shapes of mean.pt / std.pt (per-feature activation statistics of n latents), checked; {} if absent."""
    out = {}
    for name in STATS_FILES:
        path = directory / name
        if not path.is_file():
            continue
        value = read_pickle_weights_only(path)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (n,):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise SAELoadError(f"{path} holds {got}; sdxl-unbox stores per-feature activation statistics of shape "
                               f"({n},) there")
        finite(value, name, path)
        out[name] = {"shape": [n], "applied_to_inputs": False}
    return out
