"""DDIM and DDPM ancestral samplers over a ``(x_t, t) -> eps`` denoiser.

The update rules are those of the DDIM code base used by Q-Diffusion and MoDiff
(``generalized_steps`` and ``ddpm_steps``): no clipping of x0 in DDIM, x0 clipped to [-1, 1] in
DDPM, alpha_bar(-1) = 1. Noise is drawn per sample from that sample's own integer seed (as
NVlabs/edm does), so image i depends only on seed i, never on the batch it was generated in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import BenchError
from .schedules import SPACINGS, NoiseSchedule, step_pairs, timestep_sequence

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (step index, sigma_t, coefficient of eps in x_{t-1}) -> the std of the fresh noise to add instead
# of sigma_t (PTQD's variance schedule calibration); the deterministic part keeps sigma_t.
NoiseStd = Callable[[int, float, float], float]
ALGORITHMS = ("ddim", "ddpm")
SAMPLER_NAMES = tuple(f"{a}-{s}" for a in ALGORITHMS for s in SPACINGS)


@dataclass(frozen=True)
class SamplerConfig:
    algorithm: str  # ddim | ddpm
    spacing: str  # quad | uniform
    steps: int
    eta: float = 0.0  # DDIM only; DDPM is ancestral by definition

    @classmethod
    def from_name(cls, name: str, steps: int, eta: float = 0.0) -> SamplerConfig:
        if name not in SAMPLER_NAMES:
            raise BenchError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        algorithm, spacing = name.split("-", 1)
        if not 0.0 <= eta <= 1.0:  # also rejects NaN
            raise BenchError(f"eta must be between 0 (deterministic DDIM) and 1, got {eta}")
        return cls(algorithm, spacing, steps, eta)

    @property
    def name(self) -> str:
        return f"{self.algorithm}-{self.spacing}"

    def timesteps(self, schedule: NoiseSchedule) -> list[int]:
        return timestep_sequence(self.spacing, self.steps, schedule.num_train_timesteps)


class PerSampleNoise:
    """One CPU generator per sample: draws for sample i depend only on its seed and call order."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = torch.device(device)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        draws = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(self.device)


def _step(
    algorithm: str, x: torch.Tensor, eps: torch.Tensor, ab_t: float, ab_prev: float, eta: float,
    noise: PerSampleNoise, noise_std: Callable[[float, float], float] | None = None,
) -> torch.Tensor:
    """One update. ``noise_std(sigma_t, eps_coefficient)`` may replace the std of the fresh noise."""
    if algorithm == "ddim":
        x0 = (x - eps * math.sqrt(1.0 - ab_t)) / math.sqrt(ab_t)
        c1 = eta * math.sqrt((1.0 - ab_t / ab_prev) * (1.0 - ab_prev) / (1.0 - ab_t))
        c2 = math.sqrt(1.0 - ab_prev - c1**2)
        out = math.sqrt(ab_prev) * x0 + c2 * eps
        if c1 > 0:
            std = c1 if noise_std is None else noise_std(c1, c2 - math.sqrt(ab_prev * (1.0 - ab_t) / ab_t))
            out = out + std * noise.randn(x.shape[1:])
        return out
    # DDPM ancestral step (posterior mean with x0 clipped, variance beta_t)
    beta_t = 1.0 - ab_t / ab_prev
    x0 = (math.sqrt(1.0 / ab_t) * x - math.sqrt(1.0 / ab_t - 1.0) * eps).clamp(-1.0, 1.0)
    mean = (math.sqrt(ab_prev) * beta_t * x0 + math.sqrt(1.0 - beta_t) * (1.0 - ab_prev) * x) / (1.0 - ab_t)
    z = noise.randn(x.shape[1:])  # drawn at every step, so the stream does not depend on t
    if ab_prev >= 1.0:
        return mean
    std = math.sqrt(beta_t)
    if noise_std is not None:  # eps enters the mean through x0 (clipping ignored)
        std = noise_std(std, -math.sqrt(ab_prev) * beta_t / (1.0 - ab_t) * math.sqrt(1.0 / ab_t - 1.0))
    return mean + std * z


@torch.no_grad()
def sample_batch(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    config: SamplerConfig,
    seeds: Sequence[int],
    image_shape: Sequence[int],
    device: torch.device | str = "cpu",
    progress: bool = False,
    on_trajectory_start: Callable[[], None] | None = None,
    noise_std: NoiseStd | None = None,
    on_batch: Callable[[Sequence[int]], None] | None = None,
) -> torch.Tensor:
    """Sample one batch, one image per seed. ``on_trajectory_start`` runs once, before step 1
    (per-trajectory state such as MoDiff's must be reset there, never per step). ``noise_std``
    (step index, sigma_t, eps coefficient) -> std replaces the std of each step's fresh noise.
    ``on_batch(seeds)`` runs first (per-batch conditioning, e.g. a zoo model's prompts)."""
    if on_batch is not None:
        on_batch(list(seeds))
    noise = PerSampleNoise(seeds, device)
    x = noise.randn(image_shape)
    pairs = step_pairs(config.timesteps(schedule))
    if on_trajectory_start is not None:
        on_trajectory_start()
    for index, (t, t_prev) in enumerate(tqdm(pairs, desc="steps", leave=False, disable=not progress)):
        t_batch = torch.full((len(seeds),), t, device=device, dtype=torch.long)
        eps = denoiser(x, t_batch)
        std = None if noise_std is None else (lambda sigma, coef, i=index: noise_std(i, sigma, coef))
        x = _step(config.algorithm, x, eps, schedule.alpha_bar(t), schedule.alpha_bar(t_prev), config.eta, noise,
                  std)
    return x


def sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    config: SamplerConfig,
    seeds: Sequence[int],
    image_shape: Sequence[int],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_trajectory_start: Callable[[], None] | None = None,
    leave: bool = True,
    noise_std: NoiseStd | None = None,
    on_batch: Callable[[Sequence[int]], None] | None = None,
) -> torch.Tensor:
    """Sample ``len(seeds)`` images in batches; returns them on the CPU in seed order.
    ``leave=False`` clears the progress bar when done (for bars nested in an outer one)."""
    if batch_size < 1:
        raise BenchError(f"batch size must be >= 1, got {batch_size}")
    seeds = list(seeds)
    config.timesteps(schedule)  # validate before any work
    out = []
    batches = [seeds[i: i + batch_size] for i in range(0, len(seeds), batch_size)]
    for chunk in tqdm(batches, desc=f"{config.name} {config.steps} steps", unit="batch", disable=not progress,
                      leave=leave):
        out.append(
            sample_batch(denoiser, schedule, config, chunk, image_shape, device, progress, on_trajectory_start,
                         noise_std, on_batch).cpu()
        )
    return torch.cat(out) if out else torch.empty((0, *image_shape))
