"""SAELens checkpoints: cfg.json + sae_weights.safetensors (W_enc [D, N], W_dec [N, D], b_enc, b_dec, threshold).

Matched against sae_lens 6.x (jbloomAus/SAELens, sae_lens/saes/*.py), as `SAE.load_from_disk` computes:
- sae.py `process_sae_in`: x -> norm_in(x) - b_dec * apply_b_dec_to_input; `_setup_activation_normalization`:
  layer_norm (per-token, unbiased std + 1e-5, decode maps back with * std + mu) and constant_norm_rescale
  (x * sqrt(d_in) / ||x||, decode divides back); every other value is the identity at load time.
- standard_sae.py: relu(pre); topk_sae.py: TopK keeps the k largest pre-activations, then relu; with
  `rescale_acts_by_decoder_norm` the pre-activations are multiplied by ||W_dec row|| and decode divides by it
  (folded here as `_fold_norm_topk` does on save); jumprelu_sae.py: relu(pre) * (pre > threshold), older files
  store log_threshold (threshold = exp).
- batchtopk_sae.py: a `batchtopk` training checkpoint (save_model) holds the scalar topk_threshold; SAELens saves it
  for inference (save_inference_model) as a jumprelu SAE with that threshold on every latent, norms folded first.
  Read here as our batchtopk at inference (every latent above the threshold), which computes the same codes.
- `expected_average_only_in`: trainers fold the scaling factor before the final save (sae_trainer.py); a
  mid-training checkpoint keeps it in activation_scaler.json beside the weights, folded here the same way
  (`fold_activation_norm_scaling_factor`). Without that file the factor is unknown and the folder is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae.formats.common import (
    SAELoadError,
    build_sae,
    fold_decoder_norms,
    positive_int,
    read_json,
    read_safetensors,
    tensor,
)
from sae.model import SAE, SAEConfig

NAME = "saelens"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"
FILES = (CFG_FILE, WEIGHTS_FILE)
ARCHITECTURES = {"standard": "relu", "topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu"}
NORMALIZE = {"none": "none", "layer_norm": "layernorm", "constant_norm_rescale": "norm_rescale",
             "expected_average_only_in": "none"}


def claims(directory: Path) -> bool:
    return all((directory / f).is_file() for f in FILES)


def read(directory: Path) -> tuple[SAE, dict]:
    raw = read_json(directory / CFG_FILE)
    cfg = pre_6_defaults(raw)
    where = directory / CFG_FILE
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise SAELoadError(f"{where}: SAELens architecture {arch!r} is not supported; difflens reads "
                           f"{', '.join(ARCHITECTURES)}")
    norm = cfg.get("normalize_activations", "none")
    if norm == "covariance_whitening":
        raise SAELoadError(f"{where}: normalize_activations='covariance_whitening' is not folded into the weights; "
                           "fold it with SAELens (sae.fold_activation_whitening) and save again")
    if norm not in NORMALIZE:
        raise SAELoadError(f"{where}: normalize_activations={norm!r} is unknown; SAELens writes "
                           f"{', '.join(NORMALIZE)}")
    d, n = positive_int(cfg, "d_in", where), positive_int(cfg, "d_sae", where)
    w_path = directory / WEIGHTS_FILE
    w = read_safetensors(w_path)
    check_scaling_factor(w, w_path)
    W_enc_T = tensor(w, "W_enc", (d, n), w_path).T
    W_dec = tensor(w, "W_dec", (n, d), w_path)
    b_enc, b_dec = tensor(w, "b_enc", (n,), w_path), tensor(w, "b_dec", (d,), w_path)
    threshold = jumprelu_threshold(w, n, w_path) if arch == "jumprelu" else None
    if arch == "batchtopk":
        threshold = tensor(w, "topk_threshold", (), w_path)
    rescale = arch in ("topk", "batchtopk") and bool(cfg.get("rescale_acts_by_decoder_norm", False))
    if norm == "expected_average_only_in":
        # fold_activation_norm_scaling_factor (sae.py; batchtopk_sae.py also divides its threshold when rescaling)
        factor, scaler = scaling_factor(directory)
        raw = raw | {SCALER_FILE: scaler}
        W_enc_T, W_dec, b_dec = W_enc_T * factor, W_dec / factor, b_dec / factor
        if arch == "batchtopk" and rescale:
            threshold = threshold / factor
    if rescale:
        W_enc_T, b_enc, W_dec = fold_decoder_norms(W_enc_T, b_enc, W_dec)
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens then encodes x itself: fold b_dec into b_enc so our (x - b_dec) form computes the same
        b_enc = b_enc + W_enc_T @ b_dec
    scfg = SAEConfig(d_in=d, n_latents=n, k=latents_k(cfg, arch, n, where), architecture=ARCHITECTURES[arch],
                     layer=hook_name(cfg), normalize=NORMALIZE[norm])
    return build_sae(scfg, W_enc_T, b_enc, W_dec, b_dec, threshold), raw


def latents_k(cfg: dict, arch: str, n: int, where: Path) -> int:
    """k of a topk SAE (1..n); a batchtopk SAE's average k (a float in SAELens) rounded into 1..n, informational
    at inference; 1 otherwise (unused)."""
    if arch == "topk":
        k = positive_int(cfg, "k", where)
        if k > n:
            raise SAELoadError(f"{where}: k = {k} exceeds d_sae = {n}")
        return k
    if arch == "batchtopk":
        k = cfg.get("k", 1)
        return min(max(round(float(k)), 1), n) if isinstance(k, int | float) and not isinstance(k, bool) else 1
    return 1


def pre_6_defaults(raw: dict) -> dict:
    """The settings SAELens < 6 wrote under other names (loading/pretrained_sae_loaders.py
    handle_pre_6_0_config): hook_point, activation_fn topk with activation_fn_kwargs.k, normalize_activations as a
    bool or null."""
    cfg = dict(raw)
    if "hook_point" in cfg:
        cfg.setdefault("hook_name", cfg["hook_point"])
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if cfg.get("activation_fn", cfg.get("activation_fn_str")) == "topk" and kwargs.get("k") is not None:
        cfg["architecture"] = "topk"
        cfg["k"] = kwargs["k"]
    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool):
        cfg["normalize_activations"] = "expected_average_only_in" if norm else "none"
    elif norm is None:
        cfg["normalize_activations"] = "none"
    return cfg


def hook_name(cfg: dict) -> str:
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    return str(cfg.get("hook_name") or metadata.get("hook_name") or "")


def check_scaling_factor(w: dict, where: Path) -> None:
    """An old `scaling_factor` tensor of ones is dropped (read_sae_components_from_disk); any other value is a
    fine-tuning scale SAELens 6 no longer applies."""
    if "scaling_factor" in w and not torch.allclose(w["scaling_factor"].float(),
                                                     torch.ones_like(w["scaling_factor"].float())):
        raise SAELoadError(f"{where} has a finetuning scaling_factor other than 1, which SAELens 6 cannot load "
                           "either; fold it into W_dec and drop it")


def jumprelu_threshold(w: dict, n: int, where: Path) -> torch.Tensor:
    if "threshold" not in w and "log_threshold" in w:
        return tensor(w, "log_threshold", (n,), where).exp()
    return tensor(w, "threshold", (n,), where)


def scaling_factor(directory: Path) -> tuple[float, dict]:
    """(the input scaling factor, activation_scaler.json) of an `expected_average_only_in` checkpoint."""
    path = directory / SCALER_FILE
    if not path.is_file():
        raise SAELoadError(f"{directory / CFG_FILE} says normalize_activations='expected_average_only_in' but the "
                           f"folder has no {SCALER_FILE} with the scaling factor; fold it with SAELens "
                           "(sae.fold_activation_norm_scaling_factor(f)) and save again")
    scaler = read_json(path)
    factor = scaler.get("scaling_factor")
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 0 or factor == float("inf"):
        raise SAELoadError(f"{path}: scaling_factor must be a positive number (got {factor!r})")
    return float(factor), scaler
