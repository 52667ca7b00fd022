"""SAE training on a stream of [B, D] batches: sparse TopK steps, AuxK for dead latents, resumable.

A TopK step does one dense product (the encoder pre-activations, to choose the K latents); the chosen values,
the decoder and both gradients touch only the K gathered rows per token (embedding / embedding_bag).
With `normalize = "layernorm"` each token is layer-normed (SAE.token_normalised) before the step and the SAE
reconstructs the normed token; the saved SAE keeps the LayerNorm in its cfg, so it takes raw activations.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from sae.checkpoint import load_optimizer, load_state, optimizer_tensors, save_state
from sae.data import ReaderState, ShardReader
from sae.model import SAE, SAEConfig, SparseCodes
from sae.sparse_ops import sparse_decode


@dataclass
class SAETrainConfig:
    """Settings of `python cli.py train-sae` (the [sae] section of a run config)."""

    architecture: str = "topk"
    """topk, batchtopk or relu."""
    expansion: int = 8
    """n_latents = expansion * d_in (unless n_latents is set)."""
    n_latents: int = 0
    k: int = 16
    l1_coeff: float = 1e-3
    """L1 weight for relu SAEs."""
    batch_size: int = 4096
    """Tokens per optimizer step."""
    total_tokens: int = 4_000_000
    """Training tokens per layer (the demo run has 0.9M tokens on its 8x8 layer: a few passes); the reader cycles
    through the shards as often as it takes."""
    lr: float = 0.0
    """0: 2e-4 * sqrt(16384 / n_latents) (lr scaled with 1/sqrt(n))."""
    warmup_steps: int = 100
    decay_start: float = 0.8
    """Fraction of training after which lr decays linearly to 0."""
    k_aux: int = 0
    """AuxK latents (0: 2 * k, at most n_latents / 2)."""
    aux_alpha: float = 1 / 32
    dead_tokens: int = 0
    """A latent is dead after this many tokens without firing (0: min(10M, total_tokens / 10))."""
    grad_clip: float = 1.0
    b_dec_init: str = "mean"
    """mean or geometric_median of a data sample."""
    normalize: str = "none"
    """Per-token input normalisation: none (the folded mean / scale normalisation only) or layernorm (each token
    centred and divided by its std before the encoder, the reconstruction mapped back; saved in the SAE's cfg.json,
    so the SAE takes raw activations). Training then reconstructs the layer-normed tokens (FVU in that space)."""
    seed: int = 0
    checkpoint_every: int = 500
    """Steps between checkpoints."""
    log_every: int = 50
    """Steps between metric rows."""

    def latents(self, d_in: int) -> int:
        return self.n_latents or self.expansion * d_in

    def learning_rate(self, n: int) -> float:
        return self.lr or 2e-4 * math.sqrt(16384 / n)


def geometric_median(x_ND: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm."""
    m = x_ND.mean(0)
    for _ in range(iters):
        w = 1 / (x_ND - m).norm(dim=1).clamp_min(eps)
        new = (w[:, None] * x_ND).sum(0) / w.sum()
        if (new - m).norm() < eps * (1 + m.norm()):
            return new
        m = new
    return m


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _StepLoss(nn.Module):
    """The training loss as a module, so DistributedDataParallel can wrap it (it owns the SAE's parameters)."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.sae = trainer.sae
        self._trainer = [trainer]  # not a submodule

    def forward(self, x):
        return self._trainer[0]._forward(x)


class Trainer:
    """Owns an SAE, its optimizer, the dead-latent counters and running metrics.

    Under torchrun (an initialised process group with world size W > 1) every rank reads the same global batch,
    trains on its 1/W slice, and DistributedDataParallel averages the gradients: the same update as one process
    on the whole batch. Dead-latent counters and metrics are summed over ranks.
    """

    def __init__(self, sae: SAE, cfg: SAETrainConfig, total_steps: int):
        self.sae = sae
        self.cfg = cfg
        self.rank, self.world = world()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the world size {self.world}")
        loss = _StepLoss(self)
        self.loss = DistributedDataParallel(loss, broadcast_buffers=False) if self.world > 1 else loss
        n = sae.cfg.n_latents
        self.total_steps = total_steps
        self.lr = cfg.learning_rate(n)
        self.opt = torch.optim.Adam(sae.parameters(), lr=self.lr, betas=(0.9, 0.999))
        self.k_aux = cfg.k_aux or min(2 * sae.cfg.k, n // 2)
        self.dead_tokens = cfg.dead_tokens or min(10_000_000, max(cfg.total_tokens // 10, cfg.batch_size))
        self.since_fired = torch.zeros(n, dtype=torch.long, device=sae.W_dec.device)
        self.step = 0
        self.tokens = 0
        self._reset_window()

    def _reset_window(self) -> None:
        self.win = {"sse": 0.0, "sst": 0.0, "l0": 0.0, "n": 0, "aux": 0.0, "steps": 0}
        self.fire_count = torch.zeros(self.sae.cfg.n_latents, dtype=torch.long, device=self.sae.W_dec.device)

    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))
        start = self.cfg.decay_start * self.total_steps
        decay = 1.0 if step < start else max(0.0, (self.total_steps - step) / max(1, self.total_steps - start))
        return self.lr * warm * decay

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCodes, torch.Tensor, torch.Tensor]:
        """(loss, codes, x_hat, aux_loss) with sparse gradients for TopK / BatchTopK; with a per-token normalisation
        (SAEConfig.normalize) x arrives normalised (train_step) and is reconstructed in that space."""
        sae = self.sae
        if sae.cfg.architecture == "relu":
            pre = sae._pre_acts_normalised(x)
            z = pre.relu()
            x_hat = z @ sae.W_dec + sae.b_dec
            mse = (x_hat - x).pow(2).sum(-1).mean()
            l1 = (z * sae.W_dec.norm(dim=1)).sum(-1).mean()
            codes = sae.select(pre.detach())
            return mse + sae.cfg.l1_coeff * l1, codes, x_hat, torch.zeros((), device=x.device)
        with torch.no_grad():
            pre = sae._pre_acts_normalised(x)
            sel = sae.select(pre)
        codes = sel
        x_hat = sparse_decode(sel.values, sel.indices, x, sae.W_enc_T, sae.b_enc, sae.W_dec, sae.b_dec) + sae.b_dec
        err = x_hat - x
        loss = err.pow(2).sum(-1).mean()
        aux = torch.zeros((), device=x.device)
        dead = self.since_fired >= self.dead_tokens
        n_dead = int(dead.sum())
        if n_dead and self.cfg.aux_alpha > 0:
            k_aux = min(self.k_aux, n_dead)
            with torch.no_grad():
                aux_idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False).indices
                aux_vals = pre.gather(1, aux_idx).relu()
            e = -err.detach()
            e_hat = sparse_decode(aux_vals, aux_idx, x, sae.W_enc_T, sae.b_enc, sae.W_dec, sae.b_dec)
            aux = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
            loss = loss + self.cfg.aux_alpha * aux
        return loss, codes, x_hat, aux

    def release(self) -> None:
        """Free the DistributedDataParallel wrapper now, while the process group lives. It and the loss module
        reference each other, so otherwise the garbage collector frees them at interpreter exit, after
        destroy_process_group, and gloo then aborts the process (SIGABRT: a finished torchrun job that fails)."""
        self.loss = None
        gc.collect()

    def train_step(self, x: torch.Tensor) -> None:
        sae = self.sae
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        if self.world > 1:
            x = x.chunk(self.world)[self.rank]
        x = sae.token_normalised(x)[0]  # a per-token normalisation (layernorm): the space the SAE reconstructs
        loss, codes, x_hat, aux = self.loss(x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if sae.cfg.architecture != "relu":
            sae.remove_parallel_grad()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
        self.opt.step()
        if sae.cfg.architecture != "relu":
            sae.set_decoder_norm_to_unit()
        self._account(x, x_hat.detach(), codes, aux.detach())

    @torch.no_grad()
    def _account(self, x, x_hat, codes: SparseCodes, aux: torch.Tensor) -> None:
        """Add a step to the counters and the metric window: every sum stays on the training device (one host
        transfer per step, after the all-reduce)."""
        active = codes.values > 0
        fired = torch.zeros_like(self.fire_count).index_add_(0, codes.indices[active],
                                                             torch.ones_like(codes.indices[active]))
        xd = x.double()
        sums = torch.stack([(x_hat.double() - xd).pow(2).sum(), (xd - xd.mean(0)).pow(2).sum(),
                            active.sum().double(), xd.new_tensor(float(x.shape[0])),
                            aux.to(device=xd.device, dtype=torch.float64)])
        if self.world > 1:
            dist.all_reduce(fired)
            dist.all_reduce(sums)
            sums[4] /= self.world
        sse, sst, l0, n, aux = sums.tolist()
        self.fire_count += fired
        self.since_fired += int(n)
        self.since_fired[fired > 0] = 0
        w = self.win
        w["sse"] += sse
        w["sst"] += sst
        w["l0"] += l0
        w["n"] += int(n)
        w["aux"] += aux
        w["steps"] += 1
        self.step += 1
        self.tokens += int(n)

    def metrics(self) -> dict:
        """Metrics over the steps since the last call: fvu, l0, dead and dense fractions."""
        w = self.win
        n = max(w["n"], 1)
        out = {
            "step": self.step, "tokens": self.tokens,
            "fvu": w["sse"] / max(w["sst"], 1e-12), "l0": w["l0"] / n,
            "dead_frac": float((self.since_fired >= self.dead_tokens).float().mean()),
            "dense_frac": float((self.fire_count.double() / n > 0.1).float().mean()),
            "aux_loss": w["aux"] / max(w["steps"], 1), "lr": self.lr_at(max(self.step - 1, 0)),
        }
        self._reset_window()
        return out

    # ------------------------------------------------------------------ checkpoint
    def state(self, reader: ShardReader) -> tuple[dict[str, torch.Tensor], dict]:
        opt_t, opt_meta = optimizer_tensors(self.opt)
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()} | opt_t
        tensors["since_fired"] = self.since_fired
        tensors["fire_count"] = self.fire_count
        meta = {"step": self.step, "tokens": self.tokens, "optimizer": opt_meta, "reader": asdict(reader.state),
                "window": self.win, "sae_cfg": self.sae.cfg.to_dict()}
        return tensors, meta

    def load(self, tensors: dict[str, torch.Tensor], meta: dict, reader: ShardReader) -> None:
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        load_optimizer(self.opt, tensors, meta["optimizer"])
        self.since_fired.copy_(tensors["since_fired"])
        self.fire_count.copy_(tensors["fire_count"])
        self.step, self.tokens, self.win = meta["step"], meta["tokens"], meta["window"]
        reader.state = ReaderState(**meta["reader"])


@dataclass
class TrainResult:
    sae: SAE
    """Folded: takes raw activations."""
    log: list[dict]
    seconds: float


def init_sae(reader: ShardReader, cfg: SAETrainConfig, layer: str = "", device="cpu") -> SAE:
    """A new SAE for the reader's data: normalisation stats, b_dec from the data, encoder = decoder^T."""
    mean, scale = reader.estimate_stats()
    d = reader.d
    if cfg.normalize not in ("none", "layernorm"):
        raise ValueError(f"normalize must be none or layernorm, got {cfg.normalize!r}")
    per_token = cfg.normalize != "none"  # a per-token normalisation replaces the folded mean / scale one
    scfg = SAEConfig(d_in=d, n_latents=cfg.latents(d), k=cfg.k, architecture=cfg.architecture,
                     l1_coeff=cfg.l1_coeff, layer=layer, normalized=not per_token,
                     input_mean=[] if per_token else mean.tolist(), input_scale=1.0 if per_token else scale,
                     normalize=cfg.normalize)
    gen = torch.Generator().manual_seed(cfg.seed)
    sae = SAE(scfg, device=device)
    sae.reset_parameters(gen)
    sample = next(iter(ShardReader(reader.shards, min(8192, reader.n_rows), seed=cfg.seed + 1)))
    sample = sae.token_normalised(sae.normalise(sample.to(device)))[0]
    with torch.no_grad():
        if cfg.b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(sample))
        elif cfg.b_dec_init == "mean":
            sae.b_dec.copy_(sample.mean(0))
        else:
            raise ValueError(f"b_dec_init must be mean or geometric_median, got {cfg.b_dec_init!r}")
    scale_encoder_to_data(sae, sample)
    return sae


@torch.no_grad()
def scale_encoder_to_data(sae: SAE, sample_ND: torch.Tensor) -> float:
    """Scale the (transposed-decoder) encoder so the initial reconstructions have the data's norm.

    With unit-norm decoder rows the codes set the reconstruction's scale; a random start gives codes far too
    small, and Adam would spend its first hundreds of steps growing them. Returns the factor applied.
    """
    if sae.cfg.architecture == "relu":
        return 1.0
    centred = sample_ND - sae.b_dec  # sample_ND: in the space the encoder reads (after any per-token normalisation)
    x_hat = sae.decode(sae.select(sae._pre_acts_normalised(sample_ND))) - sae.b_dec
    factor = float(centred.norm(dim=1).mean() / x_hat.norm(dim=1).mean().clamp_min(1e-12))
    sae.W_enc_T.mul_(factor)
    return factor


def train(reader: ShardReader, cfg: SAETrainConfig, checkpoint_dir: str | Path | None = None,
          layer: str = "", device: str = "cpu", progress: bool = True,
          on_log: Callable[[dict], None] | None = None, stop_at_step: int = 0) -> TrainResult | None:
    """Train (or resume from checkpoint_dir) an SAE on reader's batches for cfg.total_tokens tokens.

    Returns None when stopped early at stop_at_step (after checkpointing), for time-boxed jobs and tests.
    """
    torch.manual_seed(cfg.seed)
    sae = init_sae(reader, cfg, layer, device)
    total_steps = max(1, cfg.total_tokens // cfg.batch_size)
    trainer = Trainer(sae, cfg, total_steps)
    log: list[dict] = []
    if checkpoint_dir is not None and (saved := load_state(checkpoint_dir)) is not None:
        tensors, meta = saved
        trainer.load(tensors, meta, reader)
        log = meta.get("log", [])
    t0 = time.perf_counter()
    bar = tqdm(total=total_steps, initial=trainer.step, desc=f"train-sae {layer}".strip(), unit="step",
               disable=not progress or trainer.rank != 0)
    batches = iter(reader)
    while trainer.step < total_steps:
        x = sae.normalise(next(batches).to(device))
        trainer.train_step(x)
        bar.update(1)
        last = trainer.step == total_steps
        if trainer.step % cfg.log_every == 0 or last:
            row = trainer.metrics()
            log.append(row)
            bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_frac']:.1%}")
            if on_log:
                on_log(row)
        stop = stop_at_step and trainer.step == stop_at_step
        if checkpoint_dir is not None and (trainer.step % cfg.checkpoint_every == 0 or last or stop):
            if trainer.rank == 0:
                tensors, meta = trainer.state(reader)
                save_state(checkpoint_dir, tensors, meta | {"log": log, "train_cfg": asdict(cfg)})
            if trainer.world > 1:
                dist.barrier()
        if stop:
            bar.close()
            trainer.release()
            return None
    bar.close()
    trainer.release()
    sae.eval()
    return TrainResult(sae.folded(), log, time.perf_counter() - t0)


def reconstruction_stats(sae: SAE, reader: ShardReader, max_batches: int = 8) -> dict:
    """FVU (float64) and L0 of a folded SAE on up to max_batches batches."""
    sse = sst = l0 = n = 0.0
    with torch.no_grad():
        for i, x in enumerate(reader):
            if i >= max_batches:
                break
            codes = sae.encode(x)
            x_hat = sae.decode(codes)
            xd = x.double()
            sse += float((x_hat.double() - xd).pow(2).sum())
            sst += float((xd - xd.mean(0)).pow(2).sum())
            l0 += float((codes.values > 0).sum())
            n += x.shape[0]
    return {"fvu": sse / max(sst, 1e-12), "l0": l0 / max(n, 1)}


def as_numpy_log(log: list[dict]) -> dict[str, np.ndarray]:
    keys = log[0].keys() if log else []
    return {k: np.array([r[k] for r in log]) for k in keys}
