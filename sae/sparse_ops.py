"""The sparse half of a TopK training step: decode from K active latents, with sparse gradients.

Given the selected latents (indices [B, K] and their values, taken from the one dense encoder product),
    out_BD = sum_k vals[b, k] * W_dec[idx[b, k]]
and in backward, with g = dL/dout:
    dW_dec   = S(vals)^T g                     (S: the [N, B] sparse matrix of the codes, CSR by latent)
    dvals    = <W_dec[idx], g>                 (a sampled dense-dense product, only at the B*K code positions)
    dpre     = dvals * (vals > 0)              (ReLU / TopK gate)
    dW_enc_T = S(dpre)^T (x - b_dec),  db_enc = row sums of S(dpre),  db_dec = -db_enc @ W_enc_T
so no [B, N] or [B, K, D] tensor is ever built. Each output row is reduced by one thread: deterministic.
"""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def _csr_by_latent(idx_BK: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, crow, col) of the [N, B] pattern: nnz sorted by latent, stable in token order."""
    b, k = idx_BK.shape
    flat = idx_BK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    col = torch.div(order, k, rounding_mode="floor")
    crow = torch.zeros(n + 1, dtype=torch.long, device=idx_BK.device)
    crow[1:] = torch.bincount(flat, minlength=n).cumsum(0)
    return order, crow, col


def _csr(crow, col, values, n: int, b: int) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, size=(n, b), check_invariants=False)


class SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals_BK, idx_BK, x_BD, W_enc_T, b_enc, W_dec, b_dec):  # noqa: ARG004 - b_enc for grad
        out = torch.nn.functional.embedding_bag(idx_BK, W_dec, per_sample_weights=vals_BK, mode="sum")
        ctx.save_for_backward(vals_BK, idx_BK, x_BD, W_enc_T, W_dec, b_dec)
        return out

    @staticmethod
    def backward(ctx, g_BD):
        vals_BK, idx_BK, x_BD, W_enc_T, W_dec, b_dec = ctx.saved_tensors
        n, b = W_dec.shape[0], x_BD.shape[0]
        order, crow, col = _csr_by_latent(idx_BK, n)
        v_sorted = vals_BK.reshape(-1)[order]
        g_BD = g_BD.contiguous()
        dW_dec = _csr(crow, col, v_sorted, n, b) @ g_BD
        pattern = _csr(crow, col, torch.zeros_like(v_sorted), n, b)
        dv_sorted = torch.sparse.sampled_addmm(pattern, W_dec, g_BD.T, beta=0.0).values()
        dpre_sorted = dv_sorted * (v_sorted > 0)
        dW_enc_T = _csr(crow, col, dpre_sorted, n, b) @ (x_BD - b_dec)
        db_enc = torch.segment_reduce(dpre_sorted, "sum", offsets=crow, unsafe=True)
        db_dec = -(db_enc @ W_enc_T)
        return None, None, None, dW_enc_T, db_enc, dW_dec, db_dec


def sparse_decode(vals_BK: torch.Tensor, idx_BK: torch.Tensor, x_BD: torch.Tensor, W_enc_T: torch.Tensor,
                  b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """sum_k vals * W_dec[idx] (no b_dec added), differentiable in the SAE weights as if vals = relu(pre(x))."""
    return SparseDecode.apply(vals_BK.detach(), idx_BK, x_BD.detach(), W_enc_T, b_enc, W_dec, b_dec)
