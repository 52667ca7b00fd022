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
    tmp = directory / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "difflens-sae"})
    tmp.replace(directory / WEIGHTS_FILE)
    cfg = sae.cfg.to_dict() | (extra or {})
    tmp = directory / f".{CFG_FILE}.tmp"
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    tmp.replace(directory / CFG_FILE)
    return directory


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
