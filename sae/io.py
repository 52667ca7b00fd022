"""SAE checkpoints on disk: a directory with cfg.json (SAEConfig) and sae.safetensors (weights).

Weights are saved folded (they take raw activations), so loading needs nothing but these two files.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae.model import SAE, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


class SAELoadError(ValueError):
    """An SAE directory that cannot be loaded (the message says why)."""


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
    """Load a difflens SAE directory; errors name the missing or mismatched piece."""
    directory = Path(directory)
    if not (directory / CFG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise SAELoadError(f"{directory} is not an SAE directory (needs {CFG_FILE} and {WEIGHTS_FILE}); "
                           "train one with `python cli.py train-sae`")
    raw = json.loads((directory / CFG_FILE).read_text())
    known = {f.name for f in fields(SAEConfig)}
    cfg = SAEConfig(**{k: v for k, v in raw.items() if k in known})
    sae = SAE(cfg, device=device)
    tensors = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        raise SAELoadError(f"{directory / WEIGHTS_FILE} does not match its {CFG_FILE}: expected {expected}, got {got}")
    sae.load_state_dict(tensors)
    return sae.eval()


# ---------------------------------------------------------------- SAELens / sparsify interchange

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_ARCH = {"topk": "topk", "batchtopk": "topk", "relu": "standard"}


def export_saelens(sae: SAE, directory: str | Path, hook_name: str = "") -> Path:
    """Write a directory that SAELens's `SAE.load_from_disk` loads (cfg.json + sae_weights.safetensors).

    TopK and BatchTopK export as SAELens `topk` (BatchTopK with its per-token k at inference is approximated
    by TopK with the same k); ReLU SAEs export as `standard`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if sae.cfg.normalized:
        sae = sae.folded()
    arch = SAELENS_ARCH[sae.cfg.architecture]
    cfg = {
        "architecture": arch, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.n_latents, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none",
        "hook_name": hook_name or sae.cfg.layer, "model_name": "difflens",
    }
    if arch == "topk":
        cfg["k"] = sae.cfg.k
    tensors = {"W_enc": sae.W_enc_T.detach().T.contiguous().cpu(), "W_dec": sae.W_dec.detach().contiguous().cpu(),
               "b_enc": sae.b_enc.detach().cpu(), "b_dec": sae.b_dec.detach().cpu()}
    _write_atomically(directory, SAELENS_WEIGHTS, lambda p: save_file(tensors, str(p)))
    _write_atomically(directory, CFG_FILE, lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
    return directory


def import_saelens(directory: str | Path) -> SAE:
    """A difflens SAE from a SAELens directory (topk or standard architecture)."""
    directory = Path(directory)
    cfg_path, w_path = directory / CFG_FILE, directory / SAELENS_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise SAELoadError(f"{directory} is not a SAELens SAE (needs {CFG_FILE} and {SAELENS_WEIGHTS})")
    raw = json.loads(cfg_path.read_text())
    arch = raw.get("architecture", "standard")
    if arch not in ("topk", "standard"):
        raise SAELoadError(f"{directory}: SAELens architecture {arch!r} is not supported; topk or standard only")
    if raw.get("normalize_activations", "none") != "none":
        raise SAELoadError(f"{directory}: normalize_activations={raw['normalize_activations']!r} is not supported")
    w = load_file(str(w_path))
    cfg = SAEConfig(d_in=raw["d_in"], n_latents=raw["d_sae"], k=raw.get("k", 1),
                    architecture="topk" if arch == "topk" else "relu",
                    layer=raw.get("hook_name") or raw.get("metadata", {}).get("hook_name") or "")
    sae = SAE(cfg)
    if not raw.get("apply_b_dec_to_input", True):
        # SAELens then encodes x (not x - b_dec): fold b_dec into b_enc so our (x - b_dec) form agrees
        w = dict(w, b_enc=w["b_enc"] + w["b_dec"] @ w["W_enc"])
    sae.load_state_dict({"W_enc_T": w["W_enc"].T.contiguous(), "W_dec": w["W_dec"], "b_enc": w["b_enc"],
                         "b_dec": w["b_dec"], "threshold": torch.zeros(())})
    return sae.eval()


def import_sparsify(directory: str | Path) -> SAE:
    """A difflens SAE from a sparsify TopK checkpoint (cfg.json + sae.safetensors with encoder.* / W_dec)."""
    directory = Path(directory)
    raw = json.loads((directory / CFG_FILE).read_text()) if (directory / CFG_FILE).is_file() else None
    if raw is None or not (directory / WEIGHTS_FILE).is_file():
        raise SAELoadError(f"{directory} is not a sparsify SAE (needs {CFG_FILE} and {WEIGHTS_FILE})")
    w = load_file(str(directory / WEIGHTS_FILE))
    if "encoder.weight" not in w:
        raise SAELoadError(f"{directory / WEIGHTS_FILE} has no encoder.weight: not a sparsify checkpoint")
    n, d = w["encoder.weight"].shape
    cfg = SAEConfig(d_in=raw.get("d_in", d), n_latents=n, k=raw["k"], architecture="topk")
    sae = SAE(cfg)
    sae.load_state_dict({"W_enc_T": w["encoder.weight"], "W_dec": w["W_dec"], "b_enc": w["encoder.bias"],
                         "b_dec": w["b_dec"], "threshold": torch.zeros(())})
    return sae.eval()
