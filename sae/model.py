"""Sparse autoencoders: TopK (default), BatchTopK, ReLU+L1 and JumpReLU, with sparse codes end to end.

Shapes: B tokens, D input width, N latents, K active latents per token.
    pre_BN   = (x_BD - b_dec) @ W_enc_DN + b_enc       (the one dense product)
    codes    = top-K of relu(pre) (TopK) | top-B*K over the batch (BatchTopK) | relu(pre) (ReLU)
               | pre where pre > threshold_N (JumpReLU, inference only: imported checkpoints)
    x_hat_BD = codes @ W_dec_ND + b_dec                  (sparse: a gather-sum over the K active rows)

Training works in a normalised space (x - mean) * scale with E||x|| = sqrt(D); `folded()` returns an SAE that
takes raw activations directly, with the normalisation folded into its weights (codes are unchanged).
`fold_input_affine` folds any per-channel affine input normalisation the same way. A per-token normalisation
(`SAEConfig.normalize`: layernorm or norm_rescale) is not affine, so it runs inside encode and decode instead:
x -> (x - shift_B) / scale_B before the encoder, x_hat -> x_hat * scale_B + shift_B after the decoder, with each
token's own statistics carried in its SparseCodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

Architecture = Literal["topk", "batchtopk", "relu", "jumprelu"]
ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu")
NORMALIZATIONS = ("none", "layernorm", "norm_rescale")
LAYERNORM_EPS = 1e-5
"""Added to the token's std before dividing (openai/sparse_autoencoder model.py LN, SAELens layer_norm, SAeUron)."""


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
    """topk, batchtopk, relu (ReLU + L1 penalty) or jumprelu (per-latent thresholds; imported SAEs only)."""
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
    normalize: str = "none"
    """Per-token input normalisation run inside encode/decode: none; layernorm (x -> (x - mean_tok) /
    (std_tok + 1e-5), std unbiased, reconstruction mapped back with x_hat * std_tok + mean_tok, as in
    openai/sparse_autoencoder); or norm_rescale (x -> x * sqrt(D) / ||x||, reconstruction divided back: SAELens
    constant_norm_rescale)."""

    def to_dict(self) -> dict:
        return asdict(self)


class SparseCodes(NamedTuple):
    """Active latents per token: values [B, K] and indices [B, K] (zeros pad inactive slots). With a per-token
    input normalisation, shift [B, 1] and scale [B, 1] map the decoder's output back to the token's space."""

    values: torch.Tensor
    indices: torch.Tensor
    shift: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    def dense(self, n_latents: int) -> torch.Tensor:
        out = torch.zeros(self.values.shape[0], n_latents, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_add_(1, self.indices, self.values)  # padding slots add 0


class SAE(nn.Module):
    """A sparse autoencoder. W_enc is stored transposed ([N, D]) so encoder and decoder rows gather alike."""

    def __init__(self, cfg: SAEConfig, device=None, dtype=torch.float32):
        super().__init__()
        if cfg.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {cfg.architecture!r}; use {', '.join(ARCHITECTURES)}")
        if cfg.architecture in ("topk", "batchtopk") and not 0 < cfg.k <= cfg.n_latents:
            raise ValueError(f"k must be in 1..n_latents ({cfg.n_latents}); got {cfg.k}")
        if cfg.normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown SAE input normalisation {cfg.normalize!r}; use {', '.join(NORMALIZATIONS)}")
        self.cfg = cfg
        d, n = cfg.d_in, cfg.n_latents
        self.W_dec = nn.Parameter(torch.empty(n, d, device=device, dtype=dtype))
        self.W_enc_T = nn.Parameter(torch.empty(n, d, device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        # BatchTopK's inference threshold: running mean of the smallest selected activation; JumpReLU: one per latent
        shape = (n,) if cfg.architecture == "jumprelu" else ()
        self.register_buffer("threshold", torch.zeros(shape, device=device, dtype=dtype))
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
    def token_normalised(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(x in the space the encoder reads, shift [B, 1], scale [B, 1]) under cfg.normalize (None, None: none)."""
        mode = self.cfg.normalize
        if mode == "layernorm":
            mu_B1 = x_BD.mean(dim=-1, keepdim=True)
            centred_BD = x_BD - mu_B1
            std_B1 = centred_BD.std(dim=-1, keepdim=True)
            return centred_BD / (std_B1 + LAYERNORM_EPS), mu_B1, std_B1
        if mode == "norm_rescale":
            coeff_B1 = self.cfg.d_in ** 0.5 / x_BD.norm(dim=-1, keepdim=True)
            return x_BD * coeff_B1, torch.zeros_like(coeff_B1), 1 / coeff_B1
        return x_BD, None, None

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self._pre_acts_normalised(self.token_normalised(x_BD)[0])

    def _pre_acts_normalised(self, x_BD: torch.Tensor) -> torch.Tensor:
        return F.linear(x_BD - self.b_dec, self.W_enc_T, self.b_enc)

    def select(self, pre_BN: torch.Tensor) -> SparseCodes:
        """Sparse codes from pre-activations (no gradient through the selection)."""
        a = self.cfg.architecture
        if a == "topk":
            vals, idx = pre_BN.topk(self.cfg.k, dim=-1, sorted=False)
            return SparseCodes(vals.relu(), idx)
        if a == "batchtopk" and self.training:
            return self._batch_topk(pre_BN)
        # relu, batchtopk at inference and jumprelu: every positive value above the threshold
        mask = pre_BN > (self.threshold.clamp_min(0) if a in ("batchtopk", "jumprelu") else 0.0)
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
        x_BD, shift_B1, scale_B1 = self.token_normalised(x_BD)
        codes = self.select(self._pre_acts_normalised(x_BD))
        if dense:
            return codes.dense(self.cfg.n_latents)
        return codes if scale_B1 is None else codes._replace(shift=shift_B1, scale=scale_B1)

    def encode_with_grad(self, x_BD: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
        """Values of the selected latents, recomputed with gradients through gathered encoder rows only."""
        rows_BKD = self.W_enc_T[idx_BK]
        x_BD = self.token_normalised(x_BD)[0]
        vals = torch.bmm(rows_BKD, (x_BD - self.b_dec).unsqueeze(-1)).squeeze(-1) + self.b_enc[idx_BK]
        return vals.relu()

    # ------------------------------------------------------------------ decode
    def decode(self, codes: SparseCodes) -> torch.Tensor:
        """x_hat [B, D] from sparse codes: a weighted sum of K decoder rows, no dense [B, N] matrix (mapped back
        through the codes' per-token shift and scale when the SAE normalises tokens)."""
        out = F.embedding_bag(codes.indices, self.W_dec, per_sample_weights=codes.values.to(self.W_dec.dtype),
                              mode="sum") + self.b_dec
        return out if codes.scale is None else out * codes.scale + codes.shift

    def decode_change(self, codes: SparseCodes, values_BK: torch.Tensor) -> torch.Tensor:
        """decode(codes with values_BK) - decode(codes) [B, D]: what editing the active latents' values adds to the
        reconstruction (b_dec cancels; a per-token scale does not)."""
        out = F.embedding_bag(codes.indices, self.W_dec,
                              per_sample_weights=(values_BK - codes.values).to(self.W_dec.dtype), mode="sum")
        return out if codes.scale is None else out * codes.scale

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
        mean = torch.tensor(self.cfg.input_mean, device=self.W_dec.device, dtype=self.W_dec.dtype) \
            if self.cfg.input_mean else torch.zeros_like(self.b_dec)
        out = fold_input_affine(self, mean, torch.full_like(self.b_dec, 1 / self.cfg.input_scale))
        out.cfg.normalized = False
        return out

    def normalise(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Inputs mapped into the space this SAE's weights live in."""
        if not self.cfg.normalized:
            return x_BD
        mean = torch.tensor(self.cfg.input_mean, device=x_BD.device, dtype=x_BD.dtype) if self.cfg.input_mean else 0
        return (x_BD - mean) * self.cfg.input_scale


@torch.no_grad()
def fold_input_affine(sae: SAE, mean_D: torch.Tensor, std_D: torch.Tensor) -> SAE:
    """An SAE on raw x equal to `sae` on z = (x - mean) / std (std per channel, or one value broadcast): encoder
    columns divided by std, decoder columns multiplied by it, b_dec -> b_dec * std + mean, so codes are unchanged
    and reconstructions come out in x's space (x_hat = z_hat * std + mean)."""
    out = SAE(SAEConfig(**sae.cfg.to_dict()), device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    mean_D = mean_D.to(sae.W_dec)
    std_D = std_D.to(sae.W_dec)
    out.W_enc_T.copy_(sae.W_enc_T / std_D)
    out.W_dec.copy_(sae.W_dec * std_D)
    out.b_enc.copy_(sae.b_enc)
    out.b_dec.copy_(sae.b_dec * std_D + mean_D)
    out.threshold.copy_(sae.threshold)
    return out.train(sae.training)
