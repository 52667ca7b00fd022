"""EleutherAI sparsify checkpoints (also SAeUron's): cfg.json + sae.safetensors (encoder.weight [N, D],
encoder.bias [N], W_dec [N, D], b_dec [D]).

Matched against EleutherAI/sparsify sparsify/sparse_coder.py (`SparseCoder.load_from_disk`, `save_to_disk`,
`encode`: x - b_dec, then fused_encoder.py: topk of relu(x @ encoder.weight.T + encoder.bias); `decode`:
acts @ W_dec + b_dec). Refused: `activation: groupmax`, transcoders (`transcode`), `skip_connection` (W_skip).

SAeUron (SAE/sae.py, SAE/config.py) writes the same files with its own config fields: `input_unit_norm` makes
`Sae.forward` layer-normalise each token first (`preprocess_input`: x - mean, / (unbiased std + 1e-5)) and map
the reconstruction back (`postprocess_output`: * std + mean), read here as normalize = layernorm; `batch_topk` /
`sample_topk` are training modes its `load_from_disk` switches off, so inference is per-token TopK.
"""

from __future__ import annotations

from pathlib import Path

from sae.formats.common import (
    SAELoadError,
    build_sae,
    positive_int,
    read_json,
    read_safetensors,
    safetensors_keys,
    tensor,
)
from sae.formats.difflens import CFG_FILE, FILES, SPARSIFY_KEY, WEIGHTS_FILE
from sae.model import SAE, SAEConfig

NAME = "sparsify"
SIGNATURE = SPARSIFY_KEY


def claims(directory: Path) -> bool:
    return all((directory / f).is_file() for f in FILES) and SIGNATURE in safetensors_keys(directory / WEIGHTS_FILE)


def read(directory: Path) -> tuple[SAE, dict]:
    where = directory / CFG_FILE
    raw = read_json(where)
    for flag, why in (("transcode", "a transcoder (it predicts another module's output)"),
                      ("skip_connection", "has a linear skip connection (W_skip)")):
        if raw.get(flag):
            raise SAELoadError(f"{where}: this sparse coder is {why}; difflens reads autoencoders only")
    if raw.get("activation", "topk") != "topk":
        raise SAELoadError(f"{where}: activation {raw['activation']!r} is not supported; difflens reads topk")
    d = positive_int(raw, "d_in", where)
    n = int(raw.get("num_latents") or 0) or d * positive_int(raw, "expansion_factor", where)
    k = positive_int(raw, "k", where)
    if k > n:
        raise SAELoadError(f"{where}: k = {k} exceeds the {n} latents")
    w_path = directory / WEIGHTS_FILE
    w = read_safetensors(w_path)
    if "W_dec" not in w:
        raise SAELoadError(f"{w_path} has no decoder (W_dec): it was saved encoder-only and cannot reconstruct")
    if "W_skip" in w:
        raise SAELoadError(f"{w_path} has a skip connection (W_skip); difflens reads autoencoders only")
    cfg = SAEConfig(d_in=d, n_latents=n, k=k, architecture="topk",
                    normalize="layernorm" if raw.get("input_unit_norm") else "none")
    sae = build_sae(cfg, tensor(w, "encoder.weight", (n, d), w_path), tensor(w, "encoder.bias", (n,), w_path),
                    tensor(w, "W_dec", (n, d), w_path), tensor(w, "b_dec", (d,), w_path))
    return sae, raw
