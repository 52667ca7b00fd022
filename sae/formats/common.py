"""What every checkpoint reader shares: the one-line load error, safe file readers (JSON, safetensors, weights-only
pickles), tensor checks, and building a difflens SAE from converted tensors.

Pickled files (.pt, .pth) are read only with torch.load(weights_only=True); a file that needs full unpickling is
refused, never retried unsafely.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from sae.model import SAE, SAEConfig


class SAELoadError(ValueError):
    """An SAE checkpoint that cannot be loaded (the message says why, in one line)."""


def read_json(path: Path) -> dict:
    """A JSON object from path, or SAELoadError naming the file."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SAELoadError(f"{path} is not readable JSON ({one_line(exc)})") from exc
    if not isinstance(raw, dict):
        raise SAELoadError(f"{path} holds a JSON {type(raw).__name__}, not the object of settings expected")
    return raw


def safetensors_keys(path: Path) -> set[str]:
    """Tensor names in a safetensors file (empty if it is unreadable: detection then falls through)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return set(f.keys())
    except (OSError, SafetensorError, ValueError):
        return set()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU, or SAELoadError."""
    try:
        return load_file(str(path), device="cpu")
    except (OSError, SafetensorError, ValueError) as exc:
        raise SAELoadError(f"{path} is not a readable safetensors file ({one_line(exc)})") from exc


def read_pickle_weights_only(path: Path):
    """torch.load(path, weights_only=True, map_location="cpu"); a pickle that needs more is refused."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise SAELoadError(f"{path} needs full unpickling (it stores the Python object {found.group(1)}), which "
                               "can run arbitrary code; difflens loads pickles with weights_only=True only: re-save "
                               "it as a plain dict of tensors (torch.save(model.state_dict(), ...)) or as "
                               "safetensors") from exc
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
        raise SAELoadError(f"{path} cannot be read by the weights-only unpickler "
                           f"({detail.group(1).strip() if detail else one_line(exc)}): it is corrupt, or needs full "
                           "unpickling, which difflens refuses") from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise SAELoadError(f"{path} is not a readable torch file ({one_line(exc)})") from exc


def jsonable(value):
    """value with tensors as numbers / lists and anything else JSON cannot hold as its repr (for provenance read
    out of pickles)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value if value is None or isinstance(value, str | int | float | bool) else repr(value)


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def tensor(tensors: dict, name: str, shape: tuple[int, ...], where: Path) -> torch.Tensor:
    """tensors[name] as finite float32 of the given shape, or SAELoadError naming the file and tensor."""
    if name not in tensors:
        raise SAELoadError(f"{where} has no tensor {name!r} (it has {', '.join(sorted(map(str, tensors)))})")
    value = tensors[name]
    if not isinstance(value, torch.Tensor):
        raise SAELoadError(f"{where}: {name!r} is a {type(value).__name__}, not a tensor")
    if tuple(value.shape) != shape:
        raise SAELoadError(f"{where}: tensor {name!r} has shape {tuple(value.shape)}; its config implies {shape}")
    return finite(value.float(), name, where)


def finite(value: torch.Tensor, name: str, where: Path) -> torch.Tensor:
    """value, or SAELoadError when it holds NaN or inf."""
    if not torch.isfinite(value).all():
        raise SAELoadError(f"{where}: tensor {name!r} has NaN or inf values; the checkpoint is corrupt (re-export "
                           "or re-download it)")
    return value


def positive_int(raw: dict, key: str, where: Path) -> int:
    """raw[key] as a positive int (a whole float such as 32.0 counts), or SAELoadError."""
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
        raise SAELoadError(f"{where}: {key!r} must be a positive integer (got {value!r})")
    return int(value)


def build_sae(cfg: SAEConfig, W_enc_T: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
              b_dec: torch.Tensor, threshold: torch.Tensor | None = None) -> SAE:
    """A difflens SAE (eval mode, CPU, float32) holding these weights: pre = (x - b_dec) @ W_enc_T.T + b_enc,
    x_hat = codes @ W_dec + b_dec."""
    sae = SAE(cfg)
    state = {"W_enc_T": W_enc_T, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
             "threshold": threshold if threshold is not None else torch.zeros_like(sae.threshold)}
    sae.load_state_dict({k: v.detach().float().contiguous() for k, v in state.items()})
    return sae.eval()


def fold_decoder_norms(W_enc_T: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor):
    """(W_enc_T, b_enc, W_dec) with each latent's decoder-row norm moved into its encoder row and bias: codes are
    multiplied by the norm, decoder rows become unit, reconstructions are unchanged."""
    norm_N = W_dec.norm(dim=1).clamp_min(1e-8)
    return W_enc_T * norm_N[:, None], b_enc * norm_N, W_dec / norm_N[:, None]
