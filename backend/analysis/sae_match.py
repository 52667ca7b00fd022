"""Decoder-direction matching between two SAEs of one layer: for each latent of A, the latent of B whose decoder
row points the most the same way, and that cosine.

The rows of both decoders are normalised to unit length (a folded SAE's rows carry the input scale); A's rows are
multiplied against all of B's in chunks, so the [chunk, N_B] block stays within `block_elems` values (20k x 20k
latents run in blocks of a few hundred rows).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BLOCK_ELEMS = 1 << 24
"""Values of one similarity block (64 MB in float32)."""


def unit_rows(w_ND: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (float32; an all-zero row stays zero)."""
    w = w_ND.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def best_matches(dec_a_ND: torch.Tensor, dec_b_MD: torch.Tensor, block_elems: int = BLOCK_ELEMS,
                 on_block: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [N] into B, cosine [N]) of each A row's best match among B's rows; on_block(rows done) per block."""
    a, b_T = unit_rows(dec_a_ND), unit_rows(dec_b_MD).T.contiguous()
    chunk = max(1, block_elems // max(b_T.shape[1], 1))
    index, cosine = [], []
    for start in range(0, a.shape[0], chunk):
        sims = a[start:start + chunk] @ b_T
        best = sims.max(dim=1)
        index.append(best.indices)
        cosine.append(best.values)
        if on_block:
            on_block(min(chunk, a.shape[0] - start))
    return torch.cat(index), torch.cat(cosine)

