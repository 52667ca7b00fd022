"""The splice test: how much of the denoiser's noise-prediction loss an SAE's reconstruction recovers.

For clean samples x0 (final latents of the run's own generations), random training timesteps t and noise eps:
    loss(edit) = E || eps_theta(add_noise(x0, eps, t), t, prompt; layer <- edit(layer)) - target ||^2
with edit = identity (clean), the SAE reconstruction (spliced) or zero (ablated) (noising and target as the model
was trained: backend/models/noising.py), and
    fraction recovered = (loss_zero - loss_spliced) / (loss_zero - loss_clean)   (1 = perfect, 0 = no better than 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.models.base import DiffusionModel
from backend.models.hooks import edit_activations
from backend.models.noising import noised_and_target


@dataclass
class SpliceResult:
    loss_clean: float
    loss_spliced: float
    loss_zero: float
    n_samples: int

    @property
    def fraction_recovered(self) -> float:
        gap = self.loss_zero - self.loss_clean
        return (self.loss_zero - self.loss_spliced) / gap if gap > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"loss_clean": self.loss_clean, "loss_spliced": self.loss_spliced, "loss_zero": self.loss_zero,
                "frac_loss_recovered": self.fraction_recovered, "splice_samples": self.n_samples}


@torch.no_grad()
def clean_latents(model: DiffusionModel, prompts: list[str], seeds: list[int], n_steps: int,
                  guidance: float) -> torch.Tensor:
    """x0: the final latents of these generations (the model's own samples; not decoded)."""
    return model.generate(prompts, seeds, n_steps, guidance, output="latent")


@torch.no_grad()
def splice_test(model: DiffusionModel, layer: str, reconstruct, prompts: list[str], seeds: list[int],
                n_steps: int, guidance: float, timesteps_per_sample: int = 4, seed: int = 0,
                batch_size: int = 32) -> SpliceResult:
    """Noise-prediction loss clean / with reconstruct(tokens [N, C]) spliced into layer / with the layer zeroed."""
    gen = torch.Generator().manual_seed(seed)
    n_train = model.scheduler.config.get("num_train_timesteps", 1000)
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    count = 0
    model.cfg_active = False
    for start in range(0, len(prompts), batch_size):
        p, s = prompts[start:start + batch_size], seeds[start:start + batch_size]
        x0 = clean_latents(model, p, s, n_steps, guidance)
        cond, _ = model.encode_prompts(p, cfg=False)
        model.cfg_active = False
        for _ in range(timesteps_per_sample):
            t = torch.randint(0, n_train, (len(p),), generator=gen)
            noise = torch.randn(x0.shape, generator=gen).to(x0)
            t_in = t.to(x0.device)
            x_t, target = noised_and_target(model.scheduler, x0, noise, t_in)
            edits = {"clean": None, "spliced": lambda tok, _s: _apply(reconstruct, tok),
                     "zero": lambda tok, _s: torch.zeros_like(tok)}
            for name, edit in edits.items():
                if edit is None:
                    pred = model.predict_noise(x_t, t_in, cond)
                else:
                    with edit_activations(model, layer, edit):
                        pred = model.predict_noise(x_t, t_in, cond)
                sums[name] += float((pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim))).sum())
            count += len(p)
    return SpliceResult(sums["clean"] / count, sums["spliced"] / count, sums["zero"] / count, count)


def _apply(reconstruct, tok_BTC: torch.Tensor) -> torch.Tensor:
    b, t, c = tok_BTC.shape
    return reconstruct(tok_BTC.reshape(b * t, c).float()).to(tok_BTC.dtype).reshape(b, t, c)
