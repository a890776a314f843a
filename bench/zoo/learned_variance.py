"""DDPM sampling with a learned variance, as DiT samples (improved DDPM's ``learned_range``): outside the matrix.

DiT-XL/2 and PixArt-alpha predict ``[eps, v]``; the zoo's denoisers return eps alone and every sampler of the matrix
ignores ``v`` (``bench.zoo.dit``). DiT's published samples (``sample.py``: 250 DDPM steps, ``clip_denoised=False``)
use it: the log variance of each step interpolates between the step's beta and its posterior variance,

    log sigma^2 = f log beta + (1 - f) log beta~,   f = (v + 1) / 2,
    beta = 1 - ab_t / ab_prev,   beta~ = beta (1 - ab_prev) / (1 - ab_t),

around DDPM's posterior mean of the unclipped x0. On a respaced grid (DiT's ``space_timesteps``) beta is the
respaced step's, as in DiT's ``SpacedDiffusion`` and diffusers' ``DDPMScheduler(variance_type="learned_range")``
(which :func:`learned_variance_step` matches; ``DiTPipeline`` itself drops ``v`` before its scheduler step, so it
cannot sample this way). This module is a reference for that sampler, usable on a zoo DiT model
(:func:`dit_variance_denoiser`, :func:`sample_learned_variance`); it is not one of the matrix's samplers
(``modiff.samplers``), and MoDiff's trajectory bookkeeping, PTQD and the harness do not use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from modiff.samplers import PerSampleNoise
from modiff.schedules import NoiseSchedule

from .dit import ClassConditioning

# (x_t, t) -> (guided eps, variance output v in [-1, 1])
VarianceDenoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def dit_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """DiT's respaced grid (``diffusion.respace.space_timesteps(T, str(steps))``, one section), increasing: ``steps``
    timesteps from 0 to T - 1 at the fractional stride ``(T - 1) / (steps - 1)``, rounded as Python rounds."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps}, got {steps}")
    stride = 1 if steps <= 1 else (num_train_timesteps - 1) / (steps - 1)
    taken, index = [], 0.0
    for _ in range(steps):
        taken.append(round(index))
        index += stride
    return sorted(set(taken))


def learned_log_variance(v: torch.Tensor, ab_t: float, ab_prev: float) -> torch.Tensor:
    """``learned_range``: the log variance between the step's posterior variance (``v = -1``) and its beta
    (``v = 1``); the posterior variance is clamped at 1e-20 before the log, as diffusers does."""
    beta = 1.0 - ab_t / ab_prev
    posterior = max(beta * (1.0 - ab_prev) / (1.0 - ab_t), 1e-20)
    frac = (v + 1.0) / 2.0
    return frac * math.log(beta) + (1.0 - frac) * math.log(posterior)


def learned_variance_step(x: torch.Tensor, eps: torch.Tensor, v: torch.Tensor, ab_t: float, ab_prev: float,
                          z: torch.Tensor) -> torch.Tensor:
    """One DDPM step from ``x`` = x_t to the step's end with the learned variance: the posterior mean of the
    unclipped x0 predicted from ``eps``, plus ``exp(log sigma^2 / 2) z`` (:func:`learned_log_variance`); no noise
    when the step ends at t = -1 (``ab_prev`` = 1). ``ab_t``, ``ab_prev``: ``NoiseSchedule.alpha_bar`` at t and at
    the step's end."""
    beta = 1.0 - ab_t / ab_prev
    x0 = (x - math.sqrt(1.0 - ab_t) * eps) / math.sqrt(ab_t)
    coef_x0 = math.sqrt(ab_prev) * beta / (1.0 - ab_t)
    coef_x = math.sqrt(1.0 - beta) * (1.0 - ab_prev) / (1.0 - ab_t)
    mean = coef_x0 * x0 + coef_x * x
    if ab_prev >= 1.0:
        return mean
    return mean + torch.exp(0.5 * learned_log_variance(v, ab_t, ab_prev)) * z


def dit_variance_denoiser(conditioning: ClassConditioning, transformer: nn.Module) -> VarianceDenoiser:
    """A zoo DiT model's guided prediction with its variance: ``(x, t) -> (eps, v)``, eps guided as
    ``ClassConditioning.denoiser`` does (one call on the doubled batch, conditional half first), ``v`` the
    conditional half's variance output (DiT's ``forward_with_cfg`` keeps each half's own; ``sample.py`` keeps the
    conditional half)."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, channels = x.shape[0], x.shape[1]
        labels = conditioning.class_labels(batch).to(x.device)
        t2 = torch.cat([t, t]) if t.dim() else t.expand(2 * batch)
        out = transformer(torch.cat([x, x]), timestep=t2, class_labels=labels).sample
        if out.shape[1] != 2 * channels:
            raise ValueError(f"the transformer predicts {out.shape[1]} channels for {channels}: no learned variance")
        eps_cond, eps_uncond = out[:, :channels].chunk(2)
        eps = eps_uncond + conditioning.guidance_scale * (eps_cond - eps_uncond)
        return eps, out[:batch, channels:]

    return denoise


@torch.no_grad()
def sample_learned_variance(denoiser: VarianceDenoiser, schedule: NoiseSchedule, seeds: Sequence[int],
                            image_shape: Sequence[int], steps: int, device: torch.device | str = "cpu",
                            on_batch: Callable[[Sequence[int]], None] | None = None) -> torch.Tensor:
    """One batch, one sample per seed, on DiT's grid of ``steps`` timesteps (:func:`dit_timesteps`), with the
    learned variance (:func:`learned_variance_step`). The noise comes from ``modiff.samplers.PerSampleNoise``: the
    start and every step's draw depend on the sample's seed only (a draw at every step, also the last)."""
    if on_batch is not None:
        on_batch(list(seeds))
    noise = PerSampleNoise(seeds, device)
    x = noise.randn(image_shape)
    grid = dit_timesteps(schedule.num_train_timesteps, steps)
    for i in reversed(range(len(grid))):
        t, t_prev = grid[i], grid[i - 1] if i > 0 else -1
        eps, v = denoiser(x, torch.full((len(seeds),), t, device=device, dtype=torch.long))
        z = noise.randn(image_shape)
        x = learned_variance_step(x, eps, v, schedule.alpha_bar(t), schedule.alpha_bar(t_prev), z)
    return x
