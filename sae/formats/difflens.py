"""difflens's own SAE checkpoint: cfg.json (SAEConfig fields) + sae.safetensors (W_enc_T, W_dec, b_enc, b_dec,
threshold), weights folded so the SAE takes raw activations (written by sae.io.save_sae)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from sae.formats.common import SAELoadError, finite, read_json, read_safetensors, safetensors_keys
from sae.model import SAE, SAEConfig

NAME = "difflens"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
FILES = (CFG_FILE, WEIGHTS_FILE)
SPARSIFY_KEY = "encoder.weight"
"""sparsify writes the same two file names; its weights have this tensor and ours do not."""


def claims(directory: Path) -> bool:
    return all((directory / f).is_file() for f in FILES) and SPARSIFY_KEY not in safetensors_keys(
        directory / WEIGHTS_FILE)


def read(directory: Path) -> tuple[SAE, dict]:
    raw = read_json(directory / CFG_FILE)
    known = {f.name for f in fields(SAEConfig)}
    missing = [k for k in ("d_in", "n_latents") if k not in raw]
    if missing:
        raise SAELoadError(f"{directory / CFG_FILE} lacks {', '.join(missing)}: not a difflens SAE config")
    try:
        sae = SAE(SAEConfig(**{k: v for k, v in raw.items() if k in known}))
    except (TypeError, ValueError) as exc:
        raise SAELoadError(f"{directory / CFG_FILE}: {exc}") from exc
    tensors = read_safetensors(directory / WEIGHTS_FILE)
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        raise SAELoadError(f"{directory / WEIGHTS_FILE} does not match its {CFG_FILE}: expected {expected}, got {got}")
    for name, value in tensors.items():
        finite(value, name, directory / WEIGHTS_FILE)
    sae.load_state_dict(tensors)
    return sae.eval(), raw
