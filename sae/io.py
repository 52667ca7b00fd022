"""SAE checkpoints on disk: save ours (cfg.json + sae.safetensors), load any recognised format, export SAELens.

Our weights are saved folded (they take raw activations), so loading needs nothing but those two files. Loading
goes through sae.formats.read_sae, so every SAE path difflens accepts may also be a SAELens, sparsify / SAeUron,
sdxl-unbox or dictionary_learning checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae.formats import read_sae
from sae.formats.common import SAELoadError
from sae.formats.difflens import CFG_FILE, WEIGHTS_FILE
from sae.formats.saelens import WEIGHTS_FILE as SAELENS_WEIGHTS
from sae.model import SAE

__all__ = ["CFG_FILE", "WEIGHTS_FILE", "SAELoadError", "export_saelens", "load_sae", "save_sae"]


def save_sae(sae: SAE, directory: str | Path, extra: dict | None = None) -> Path:
    """Write cfg.json + sae.safetensors (folded) atomically into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if sae.cfg.normalized:
        sae = sae.folded()
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    _write_atomically(directory, WEIGHTS_FILE,
                      lambda p: save_file(tensors, str(p), metadata={"format": "difflens-sae"}))
    cfg = sae.cfg.to_dict() | (extra or {})
    _write_atomically(directory, CFG_FILE, lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
    return directory


def _write_atomically(directory: Path, name: str, writer) -> None:
    """writer(tmp) then rename onto directory/name; a failed write leaves no temporary file."""
    tmp = directory / f".{name}.tmp"
    try:
        writer(tmp)
        tmp.replace(directory / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_sae(directory: str | Path, device: str | torch.device = "cpu") -> SAE:
    """An SAE (eval mode, on raw activations) from a checkpoint folder of any recognised format; errors
    (SAELoadError) name the missing or mismatched piece in one line."""
    return read_sae(directory, device=device).sae


# ---------------------------------------------------------------- SAELens export

SAELENS_ARCH = {"topk": "topk", "batchtopk": "topk", "relu": "standard", "jumprelu": "jumprelu"}
SAELENS_NORMALIZE = {"none": "none", "layernorm": "layer_norm", "norm_rescale": "constant_norm_rescale"}


def export_saelens(sae: SAE, directory: str | Path, hook_name: str = "") -> Path:
    """Write a directory that SAELens's `SAE.load_from_disk` loads (cfg.json + sae_weights.safetensors).

    TopK and BatchTopK export as SAELens `topk` (BatchTopK with its per-token k at inference is approximated
    by TopK with the same k); ReLU SAEs export as `standard`, JumpReLU as `jumprelu` with its thresholds; a
    per-token input normalisation as SAELens's normalize_activations (layer_norm, constant_norm_rescale).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if sae.cfg.normalized:
        sae = sae.folded()
    arch = SAELENS_ARCH[sae.cfg.architecture]
    cfg = {
        "architecture": arch, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.n_latents, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": SAELENS_NORMALIZE[sae.cfg.normalize],
        "reshape_activations": "none",
        "hook_name": hook_name or sae.cfg.layer, "model_name": "difflens",
    }
    if arch == "topk":
        cfg["k"] = sae.cfg.k
    tensors = {"W_enc": sae.W_enc_T.detach().T.contiguous().cpu(), "W_dec": sae.W_dec.detach().contiguous().cpu(),
               "b_enc": sae.b_enc.detach().cpu(), "b_dec": sae.b_dec.detach().cpu()}
    if arch == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().contiguous().cpu()
    _write_atomically(directory, SAELENS_WEIGHTS, lambda p: save_file(tensors, str(p)))
    _write_atomically(directory, CFG_FILE, lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
    return directory
