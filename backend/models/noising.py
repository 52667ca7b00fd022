"""How a clean latent is seen at a timestep, for both kinds of scheduler the adapters run.

  - DDPM family (SD, SDXL, PixArt, the demo: the scheduler has alphas_cumprod):
        x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,  target eps / v / x0 by the scheduler's prediction_type;
  - flow matching (SD3, FLUX: FlowMatchEulerDiscreteScheduler): sigma = t / num_train_timesteps,
        x_t = (1 - sigma) x0 + sigma eps,  target the velocity eps - x0.

`noised_and_target` is the splice test's training form; `see_through_weights` the (signal, noise) weights dream
reads a latent through, where a share `see_through` of the noise is made transparent (DDPM: the variance,
a' = abar + see_through (1 - abar); flow matching: sigma' = (1 - see_through) sigma). Timesteps are in the
scheduler's units (0..num_train_timesteps) for both.
"""

from __future__ import annotations

import torch

from backend.errors import DifflensError


def is_flow_matching(scheduler) -> bool:
    return getattr(scheduler, "alphas_cumprod", None) is None and "FlowMatch" in type(scheduler).__name__


def _n_train(scheduler) -> int:
    return int(scheduler.config.get("num_train_timesteps", 1000))


def check_noisable(scheduler) -> None:
    """A one-line error for a scheduler with neither alphas_cumprod nor a flow-matching schedule."""
    if getattr(scheduler, "alphas_cumprod", None) is None and not is_flow_matching(scheduler):
        raise DifflensError(f"{type(scheduler).__name__} has neither alphas_cumprod nor a flow-matching schedule, so "
                            "a latent cannot be noised to a timestep; use a DDIM/DDPM/Euler-family or FlowMatch "
                            "scheduler")


def ddpm_see_through(alphas_cumprod: torch.Tensor, timesteps: list[int],
                     see_through: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(signal, noise) weights [T] of each timestep: sqrt(a') and sqrt(1 - a'), a' = abar + see_through (1 - abar)."""
    abar = alphas_cumprod[torch.as_tensor(timesteps, dtype=torch.long)].double()
    a = abar + see_through * (1 - abar)
    return a.sqrt().float(), (1 - a).sqrt().float()


def see_through_weights(scheduler, timesteps: list[int], see_through: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(signal, noise) weights [T] of each timestep for either kind of scheduler (see the module docstring)."""
    check_noisable(scheduler)
    if not is_flow_matching(scheduler):
        return ddpm_see_through(scheduler.alphas_cumprod.cpu(), timesteps, see_through)
    sigma = torch.as_tensor(timesteps, dtype=torch.float64) / _n_train(scheduler) * (1 - see_through)
    return (1 - sigma).float(), sigma.float()


def noised_and_target(scheduler, x0: torch.Tensor, noise: torch.Tensor,
                      t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, training target) of clean latents x0 [B, ...] with noise at timesteps t [B]."""
    check_noisable(scheduler)
    shape = (-1, *[1] * (x0.ndim - 1))
    if is_flow_matching(scheduler):
        sigma = (t.to(x0.device, torch.float32) / _n_train(scheduler)).view(shape).to(x0.dtype)
        return (1 - sigma) * x0 + sigma * noise, noise - x0
    abar = scheduler.alphas_cumprod.to(x0.device, torch.float32)[t].view(shape)
    a, s = abar.sqrt().to(x0.dtype), (1 - abar).sqrt().to(x0.dtype)
    x_t = a * x0 + s * noise
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return x_t, noise
    if kind == "v_prediction":
        return x_t, a * noise - s * x0
    if kind == "sample":
        return x_t, x0
    raise ValueError(f"unsupported prediction_type {kind!r}")
