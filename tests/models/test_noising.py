"""Noising a clean latent to a timestep: the flow-matching form is the scheduler's own (scale_noise), its target is
the velocity an Euler step follows, and dream's see-through weights reach both ends; the DDPM form is unchanged."""

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from backend.models.noising import is_flow_matching, noised_and_target, see_through_weights


def test_flow_matching_noise_is_the_schedulers_and_its_target_the_euler_velocity():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    assert is_flow_matching(scheduler) and not is_flow_matching(DDIMScheduler())
    x0, noise = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    t, t_next = scheduler.timesteps[1], scheduler.timesteps[2]
    x_t, velocity = noised_and_target(scheduler, x0, noise, t.expand(2))
    torch.testing.assert_close(x_t, scheduler.scale_noise(x0, t[None], noise))
    scheduler.set_begin_index(1)
    stepped = scheduler.step(velocity, t, x_t, return_dict=False)[0]  # the true velocity lands on x at t_next
    torch.testing.assert_close(stepped, noised_and_target(scheduler, x0, noise, t_next.expand(2))[0])


def test_see_through_weights_of_both_kinds():
    flow = FlowMatchEulerDiscreteScheduler()
    signal, noise = see_through_weights(flow, [1000, 250], 0.0)
    torch.testing.assert_close(signal, torch.tensor([0.0, 0.75]))
    torch.testing.assert_close(noise, torch.tensor([1.0, 0.25]))
    signal, noise = see_through_weights(flow, [1000], 1.0)  # all noise transparent: the latent itself
    assert (signal.item(), noise.item()) == (1.0, 0.0)
    ddim = DDIMScheduler()
    signal, noise = see_through_weights(ddim, [500], 0.0)
    abar = ddim.alphas_cumprod[500]
    torch.testing.assert_close(signal, abar.sqrt()[None])
    torch.testing.assert_close(noise, (1 - abar).sqrt()[None])
