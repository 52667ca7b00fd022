"""An SAE's health on a fixed sample of a layer's captured tokens: FVU, L0, each latent's firing frequency, and the
activation-density histogram (log10 of each latent's firing frequency; dead latents counted apart).

The sample is a seeded choice of rows over the layer's token shards (activations/<layer>/part-*.npy, the rows SAE
training reads, docs/run-format.md "Token shards"), read shard by shard from memory maps in batches, so memory holds
one batch at a time. Every SAE compared on a layer sees the same rows, in the same order.

    FVU = sum ||x - x_hat||^2 / sum ||x - mean||^2   over the sample (mean: the sample's mean; float64 sums)
    L0  = mean number of active latents (code > 0) per token
    freq_i = share of the sample's tokens on which latent i is active; dead: freq = 0; dense: freq > DENSE_FREQ
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from backend.errors import DifflensError
from sae.data import SAEDataError, as_float32, find_shards

DENSE_FREQ = 0.1
"""A latent is dense when active on more than this share of tokens (the threshold SAE training logs)."""


def sample_rows(shards: list[Path], n: int, seed: int = 0) -> list[tuple[Path, np.ndarray]]:
    """(shard, sorted row indices) for a seeded choice of min(n, all) rows over the shards, in shard order."""
    sizes = np.array([np.load(s, mmap_mode="r").shape[0] for s in shards], dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        raise DifflensError(f"the token shards under {shards[0].parent} hold no rows; rerun `python cli.py capture`")
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    for i, shard in enumerate(shards):
        lo, hi = np.searchsorted(chosen, [starts[i], starts[i + 1]])
        if hi > lo:
            out.append((shard, chosen[lo:hi] - starts[i]))
    return out


def sample_batches(directory: Path, n: int, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """The sample's rows as float32 [B, D] batches (bfloat16 shards decoded); NaN/Inf rows are a one-line error."""
    try:
        shards = find_shards(directory)
    except SAEDataError as exc:
        raise DifflensError(str(exc)) from exc
    for shard, rows in sample_rows(shards, n, seed):
        array = np.load(shard, mmap_mode="r")
        for start in range(0, len(rows), batch_size):
            x = as_float32(array[rows[start:start + batch_size]])
            if not np.isfinite(x).all():
                raise DifflensError(f"{shard} holds NaN/Inf activations; recapture that layer or drop the shard")
            yield torch.from_numpy(np.ascontiguousarray(x))


def count_batches(directory: Path, n: int, batch_size: int, seed: int = 0) -> int:
    """How many batches sample_batches yields (for a progress bar)."""
    return sum(-(-len(rows) // batch_size) for _, rows in sample_rows(find_shards(directory), n, seed))


@dataclass
class SampleStats:
    """Running sums of one SAE over sample batches (add), and the metrics they give."""

    n_latents: int
    tokens: int = 0
    sse: float = 0.0
    sum_sq: float = 0.0
    active: float = 0.0
    sum_x: np.ndarray | None = None
    fired: np.ndarray = field(default=None)

    def __post_init__(self):
        if self.fired is None:
            self.fired = np.zeros(self.n_latents, dtype=np.int64)

    @torch.no_grad()
    def add(self, sae, x_BD: torch.Tensor) -> None:
        x_BD = x_BD.to(sae.W_dec.device, sae.W_dec.dtype)
        codes = sae.encode(x_BD)
        x_hat = sae.decode(codes)
        xd = x_BD.double()
        self.sse += float((x_hat.double() - xd).pow(2).sum())
        self.sum_sq += float(xd.pow(2).sum())
        s = xd.sum(0).cpu().numpy()
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        on = codes.values > 0
        self.active += float(on.sum())
        self.fired += torch.bincount(codes.indices[on].cpu(), minlength=self.n_latents).numpy()
        self.tokens += x_BD.shape[0]

    @property
    def fvu(self) -> float:
        sst = self.sum_sq - float(self.sum_x @ self.sum_x) / max(self.tokens, 1)
        return self.sse / max(sst, 1e-12)

    @property
    def l0(self) -> float:
        return self.active / max(self.tokens, 1)

    @property
    def freq(self) -> np.ndarray:
        """Each latent's firing frequency over the sample."""
        return self.fired / max(self.tokens, 1)

    def metrics(self) -> dict:
        freq = self.freq
        dead = int((freq == 0).sum())
        return {"tokens": self.tokens, "fvu": self.fvu, "l0": self.l0, "dead": dead,
                "dead_frac": dead / self.n_latents, "dense_frac": float((freq > DENSE_FREQ).mean())}


def density_edges(tokens: int, per_decade: int = 5) -> np.ndarray:
    """log10-frequency bin edges from the lowest frequency a live latent can have on `tokens` tokens (1 / tokens,
    rounded down to a whole decade) up to 0 (active on every token); shared by every SAE of one comparison."""
    low = int(np.floor(np.log10(1.0 / max(tokens, 1))))
    return np.linspace(low, 0.0, -low * per_decade + 1) if low < 0 else np.array([-1.0, 0.0])


def density_histogram(freq: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, int]:
    """(counts per bin of log10(freq) over the live latents, dead latents); counts.sum() + dead = len(freq)."""
    live = freq[freq > 0]
    counts, _ = np.histogram(np.log10(live), edges)
    return counts.astype(np.int64), int(len(freq) - len(live))
