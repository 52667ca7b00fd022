"""Published SAE checkpoints read into difflens SAEs: format detection and one reader per format.

`read_sae(path)` detects the format of a checkpoint folder (`detect_format`) and returns an `ImportedSAE` whose SAE
(eval mode) takes raw activations and computes the codes and reconstructions the original library computes.
Formats: difflens (ours), saelens, sparsify (also SAeUron), sdxl_unbox (also openai/sparse_autoencoder state
dicts), dictionary_learning; each module names the source files it was matched against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sae.formats import dictionary_learning, difflens, saelens, sdxl_unbox, sparsify
from sae.formats.common import SAELoadError, finite, one_line
from sae.model import SAE

FORMATS = {m.NAME: m for m in (difflens, saelens, sparsify, sdxl_unbox, dictionary_learning)}
"""name -> reader module (NAME, FILES, claims(directory), read(directory) -> (SAE, original config))."""
SIGNATURES = {"difflens": "tensor W_enc_T", "sparsify": "tensor encoder.weight"}
"""How the two formats that share cfg.json + sae.safetensors tell apart (by tensor names)."""

__all__ = ["FORMATS", "ImportedSAE", "SAELoadError", "detect_format", "read_sae", "weights_file"]


@dataclass
class ImportedSAE:
    """An SAE read from a checkpoint, with its provenance."""

    sae: SAE
    """In eval mode; takes raw activations (normalisations folded in or carried by cfg.normalize)."""
    source_format: str
    """A key of FORMATS."""
    original_config: dict
    """The checkpoint's config file as read (JSON-serialisable); settings found in other files are added under
    that file's name (e.g. "activation_scaler.json", "state_dict.pth") or under "latent_stats"."""
    source: str
    """The checkpoint folder, resolved."""


def detect_format(path: str | Path) -> str:
    """The format of a checkpoint folder (a file inside one counts as its folder), or SAELoadError."""
    directory = checkpoint_dir(path)
    found = [name for name, fmt in FORMATS.items() if fmt.claims(directory)]
    if len(found) > 1:
        raise SAELoadError(f"{directory} mixes SAE checkpoint formats ({'; '.join(needs(n) for n in found)}); keep "
                           "one checkpoint per folder")
    if not found:
        raise SAELoadError(f"{directory} is not an SAE directory: it matches no checkpoint format; recognised: "
                           f"{'; '.join(needs(n) for n in FORMATS)}")
    return found[0]


def read_sae(path: str | Path, device: str | torch.device = "cpu") -> ImportedSAE:
    """Detect the checkpoint's format and read it; every failure is a one-line SAELoadError."""
    directory = checkpoint_dir(path)
    name = detect_format(directory)
    try:
        sae, original = FORMATS[name].read(directory)
    except SAELoadError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        raise SAELoadError(f"{directory} is not a readable {name} checkpoint ({type(exc).__name__}: "
                           f"{one_line(exc)})") from exc
    for key, value in sae.state_dict().items():  # what folding the format's normalisation in made of its tensors
        if value.is_floating_point():
            finite(value, key, directory)
    return ImportedSAE(sae=sae.to(device).eval(), source_format=name, original_config=original,
                       source=str(directory.resolve()))


def weights_file(path: str | Path) -> Path:
    """The file holding a checkpoint's weights (what identifies it: e.g. digested into a capture's key)."""
    directory = checkpoint_dir(path)
    return directory / FORMATS[detect_format(directory)].FILES[1]


def checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path.parent
    if not path.is_dir():
        raise SAELoadError(f"{path} does not exist; give the folder of an SAE checkpoint")
    return path


def needs(name: str) -> str:
    """'format: file + file' for messages."""
    files = " + ".join(FORMATS[name].FILES)
    return f"{name}: {files}" + (f" ({SIGNATURES[name]})" if name in SIGNATURES else "")
