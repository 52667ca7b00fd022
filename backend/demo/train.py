"""Training the demo model from scratch on rendered shapes, with resumable checkpoints.

Checkpoints hold only safetensors (weights, EMA weights, optimizer tensors, RNG state) and JSON (step,
optimizer hyper-parameters, numpy RNG state), so resuming never unpickles anything.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from backend.demo import shapes
from backend.fileio import atomic_write_json, atomic_write_with
from backend.models import demo
from sae.checkpoint import load_optimizer, optimizer_tensors


@dataclass
class DemoTrainConfig:
    """Settings of `python cli.py demo-model train`."""

    steps: int = 4000
    """Optimizer steps."""
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    """Linear warm-up steps, then cosine decay to 5% of lr."""
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    """Share of training prompts replaced by the empty prompt (for classifier-free guidance)."""
    seed: int = 0
    checkpoint_every: int = 250
    out_dir: str = str(demo.DEMO_DIR)
    """Where the finished pipeline is saved (diffusers layout, EMA weights)."""
    work_dir: str = "runs/demo-model-train"
    """Checkpoints and the loss log; resume reads from here."""
    threads: int = 0
    """torch threads (0: torch's default)."""
    stop_at: int = 0
    """Checkpoint and stop at this step without saving the pipeline (time-boxed jobs); 0 runs to the end."""


class _Trainable(torch.nn.Module):
    def __init__(self, pipe: demo.DemoShapesPipeline):
        super().__init__()
        self.unet = pipe.unet
        self.text_encoder = pipe.text_encoder


def warmup_cosine(step: int, warmup: int, steps: int) -> float:
    """The learning-rate factor of both demo trainings: linear warm-up over `warmup` steps, then cosine decay to 5%
    at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def save_checkpoint(path: Path, model: _Trainable, ema: dict[str, torch.Tensor], opt, step: int,
                    rng: np.random.Generator, torch_gen: torch.Generator, losses: list[float]) -> None:
    """Write one checkpoint directory atomically (files renamed into place, `state.json` last)."""
    path.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = optimizer_tensors(opt)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v.contiguous() for k, v in ema.items()}
    tensors |= opt_tensors
    tensors["rng.torch"] = torch_gen.get_state()
    atomic_write_with(path / "state.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write_json(path / "state.json", {
        "step": step, "optimizer": opt_meta, "numpy_rng": rng.bit_generator.state, "losses": losses,
    })


def load_checkpoint(path: Path, model: _Trainable, ema: dict[str, torch.Tensor], opt,
                    rng: np.random.Generator, torch_gen: torch.Generator) -> tuple[int, list[float]]:
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for k in ema:
        ema[k].copy_(tensors[f"ema.{k}"])
    load_optimizer(opt, tensors, meta["optimizer"])
    rng.bit_generator.state = meta["numpy_rng"]
    torch_gen.set_state(tensors["rng.torch"])
    return meta["step"], meta["losses"]


def _batch(rng: np.random.Generator, cfg: DemoTrainConfig) -> tuple[torch.Tensor, list[str]]:
    specs = shapes.random_specs(cfg.batch_size, rng)
    imgs = shapes.render_batch(specs, demo.RESOLUTION)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    drop = rng.random(cfg.batch_size) < cfg.p_uncond
    prompts = ["" if d else s.prompt() for s, d in zip(specs, drop, strict=True)]
    return x, prompts


def train_demo_model(cfg: DemoTrainConfig) -> Path | None:
    """Train (or resume) the demo model; save the EMA pipeline to cfg.out_dir and return it
    (None when stopped early by cfg.stop_at)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    pipe = demo.new_pipeline()
    model = _Trainable(pipe)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps))
    rng = np.random.default_rng(cfg.seed)
    torch_gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = work / "checkpoint"
    step, losses = 0, []
    if (ckpt / "state.json").exists():
        step, losses = load_checkpoint(ckpt, model, ema, opt, rng, torch_gen)
        sched.last_epoch = step
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warmup_cosine(step, cfg.warmup, cfg.steps)
    atomic_write_json(work / "config.json", asdict(cfg))
    noise_sched = pipe.scheduler
    alphas = noise_sched.alphas_cumprod
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="demo-model train", unit="step")
    t0 = time.perf_counter()
    while step < cfg.steps:
        x0, prompts = _batch(rng, cfg)
        noise = torch.randn(x0.shape, generator=torch_gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (x0.shape[0],), generator=torch_gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        ids = demo.tokenize(pipe.tokenizer, prompts)
        cond = model.text_encoder(ids).last_hidden_state
        pred = model.unet(xt, t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v, 1 - decay)
                else:
                    ema[k].copy_(v)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or step == cfg.stop_at:
            save_checkpoint(ckpt, model, ema, opt, step, rng, torch_gen, losses)
        if step == cfg.stop_at:
            bar.close()
            return None
    bar.close()
    model.load_state_dict(ema)
    model.eval()
    out = Path(cfg.out_dir)
    save_pipeline_atomically(pipe, out)
    atomic_write_json(out / "training.json", {
        "config": asdict(cfg), "steps": step, "final_loss_ema50": float(np.mean(losses[-50:])),
        "seconds_this_session": time.perf_counter() - t0,
    })
    return out


def save_pipeline_atomically(pipe, out: Path) -> None:
    """save_pretrained into a temporary sibling directory, then swap it into place."""
    import shutil

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
