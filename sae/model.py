"""Sparse autoencoders: TopK (default), BatchTopK and ReLU+L1, with sparse codes end to end.

Shapes: B tokens, D input width, N latents, K active latents per token.
    pre_BN   = (x_BD - b_dec) @ W_enc_DN + b_enc       (the one dense product)
    codes    = top-K of relu(pre) (TopK) | top-B*K over the batch (BatchTopK) | relu(pre) (ReLU)
    x_hat_BD = codes @ W_dec_ND + b_dec                  (sparse: a gather-sum over the K active rows)

Training works in a normalised space (x - mean) * scale with E||x|| = sqrt(D); `folded()` returns an SAE that
takes raw activations directly, with the normalisation folded into its weights (codes are unchanged).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

Architecture = Literal["topk", "batchtopk", "relu"]


@dataclass
class SAEConfig:
    """The shape and kind of an SAE (saved as cfg.json beside sae.safetensors)."""

    d_in: int
    """Input width D (the hooked layer's channels)."""
    n_latents: int
    """Dictionary size N."""
    k: int = 16
    """Active latents per token (TopK) or on average (BatchTopK)."""
    architecture: str = "topk"
    """topk, batchtopk or relu (ReLU + L1 penalty)."""
    l1_coeff: float = 1e-3
    """L1 penalty weight (relu only)."""
    layer: str = ""
    """Where it was trained (informational)."""
    normalized: bool = False
    """True while weights live in the normalised space (training); False once folded (raw inputs)."""
    input_mean: list[float] = field(default_factory=list)
    """Per-channel mean subtracted before scaling (empty: none)."""
    input_scale: float = 1.0
    """Scale that made E||x - mean|| = sqrt(D)."""

    def to_dict(self) -> dict:
        return asdict(self)


class SparseCodes(NamedTuple):
    """Active latents per token: values [B, K] and indices [B, K] (zeros pad inactive slots)."""

    values: torch.Tensor
    indices: torch.Tensor

    def dense(self, n_latents: int) -> torch.Tensor:
        out = torch.zeros(self.values.shape[0], n_latents, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_add_(1, self.indices, self.values)  # padding slots add 0


class SAE(nn.Module):
    """A sparse autoencoder. W_enc is stored transposed ([N, D]) so encoder and decoder rows gather alike."""

    def __init__(self, cfg: SAEConfig, device=None, dtype=torch.float32):
        super().__init__()
        if cfg.architecture not in ("topk", "batchtopk", "relu"):
            raise ValueError(f"unknown SAE architecture {cfg.architecture!r}; use topk, batchtopk or relu")
        if cfg.architecture != "relu" and not 0 < cfg.k <= cfg.n_latents:
            raise ValueError(f"k must be in 1..n_latents ({cfg.n_latents}); got {cfg.k}")
        self.cfg = cfg
        d, n = cfg.d_in, cfg.n_latents
        self.W_dec = nn.Parameter(torch.empty(n, d, device=device, dtype=dtype))
        self.W_enc_T = nn.Parameter(torch.empty(n, d, device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        # BatchTopK's inference threshold: running mean of the smallest selected activation
        self.register_buffer("threshold", torch.zeros((), device=device, dtype=dtype))
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows; encoder = decoder transpose; zero biases."""
        w = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32).to(self.W_dec)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc_T.copy_(self.W_dec)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ------------------------------------------------------------------ encode
    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        return F.linear(x_BD - self.b_dec, self.W_enc_T, self.b_enc)

    def select(self, pre_BN: torch.Tensor) -> SparseCodes:
        """Sparse codes from pre-activations (no gradient through the selection)."""
        a = self.cfg.architecture
        if a == "topk":
            vals, idx = pre_BN.topk(self.cfg.k, dim=-1, sorted=False)
            return SparseCodes(vals.relu(), idx)
        if a == "batchtopk" and self.training:
            return self._batch_topk(pre_BN)
        # relu, and batchtopk at inference: everything above the threshold
        thr = self.threshold if a == "batchtopk" else 0.0
        mask = pre_BN > thr
        width = max(int(mask.sum(-1).max()), 1)
        vals, idx = torch.where(mask, pre_BN, torch.zeros_like(pre_BN)).topk(width, dim=-1, sorted=False)
        return SparseCodes(vals, idx)

    def _batch_topk(self, pre_BN: torch.Tensor) -> SparseCodes:
        b, n = pre_BN.shape
        flat = pre_BN.relu().flatten()
        vals, flat_idx = flat.topk(b * self.cfg.k, sorted=False)
        rows, cols = flat_idx // n, flat_idx % n
        # pack into [B, max_per_row] with zero padding
        counts = torch.bincount(rows, minlength=b)
        width = max(int(counts.max()), 1)
        order = torch.argsort(rows, stable=True)
        rows, cols, vals = rows[order], cols[order], vals[order]
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(rows), device=rows.device) - starts[rows]
        out_v = torch.zeros(b, width, dtype=vals.dtype, device=vals.device)
        out_i = torch.zeros(b, width, dtype=torch.long, device=vals.device)
        out_v[rows, slot] = vals
        out_i[rows, slot] = cols
        if len(vals):
            with torch.no_grad():
                self.threshold.lerp_(vals[vals > 0].min() if (vals > 0).any() else vals.min(), 0.01)
        return SparseCodes(out_v, out_i)

    def encode(self, x_BD: torch.Tensor, dense: bool = False) -> SparseCodes | torch.Tensor:
        """Sparse codes of x (values + indices), or a dense [B, N] matrix with dense=True."""
        codes = self.select(self.pre_acts(x_BD))
        return codes.dense(self.cfg.n_latents) if dense else codes

    def encode_with_grad(self, x_BD: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
        """Values of the selected latents, recomputed with gradients through gathered encoder rows only."""
        rows_BKD = self.W_enc_T[idx_BK]
        vals = torch.bmm(rows_BKD, (x_BD - self.b_dec).unsqueeze(-1)).squeeze(-1) + self.b_enc[idx_BK]
        return vals.relu()

    # ------------------------------------------------------------------ decode
    def decode(self, codes: SparseCodes) -> torch.Tensor:
        """x_hat [B, D] from sparse codes: a weighted sum of K decoder rows, no dense [B, N] matrix."""
        out = F.embedding_bag(codes.indices, self.W_dec, per_sample_weights=codes.values.to(self.W_dec.dtype),
                              mode="sum")
        return out + self.b_dec

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x_BD))

    # ------------------------------------------------------------------ decoder norm
    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of each decoder row's gradient along the row (keeps rows on the unit sphere)."""
        if self.W_dec.grad is None:
            return
        g = self.W_dec.grad
        if g.is_sparse:
            g = g.to_dense()
            self.W_dec.grad = g
        g.sub_((g * self.W_dec).sum(1, keepdim=True) * self.W_dec)

    # ------------------------------------------------------------------ normalisation
    @torch.no_grad()
    def folded(self) -> SAE:
        """An equivalent SAE on raw inputs: mean-centring and scaling folded into the weights."""
        cfg = SAEConfig(**{**self.cfg.to_dict(), "normalized": False})
        out = SAE(cfg, device=self.W_dec.device, dtype=self.W_dec.dtype)
        s = self.cfg.input_scale
        mean = torch.tensor(self.cfg.input_mean, device=self.W_dec.device, dtype=self.W_dec.dtype) \
            if self.cfg.input_mean else torch.zeros_like(self.b_dec)
        out.W_enc_T.copy_(self.W_enc_T * s)
        out.W_dec.copy_(self.W_dec / s)
        out.b_enc.copy_(self.b_enc)
        out.b_dec.copy_(self.b_dec / s + mean)
        out.threshold.copy_(self.threshold)
        return out.train(self.training)

    def normalise(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Inputs mapped into the space this SAE's weights live in."""
        if not self.cfg.normalized:
            return x_BD
        mean = torch.tensor(self.cfg.input_mean, device=x_BD.device, dtype=x_BD.dtype) if self.cfg.input_mean else 0
        return (x_BD - mean) * self.cfg.input_scale
