"""Noise schedules and the timestep sequences the papers' code samples on.

The sequences follow the DDIM code base that Q-Diffusion and MoDiff build on:
- ``uniform``: ``range(0, T, T // steps)`` (may hold more than ``steps`` entries when
  ``steps`` does not divide ``T``, exactly as that code does);
- ``quad``: ``[int(s) for s in linspace(0, sqrt(0.8 T), steps) ** 2]``; duplicates at the start
  are kept, so ``steps`` network evaluations happen even where consecutive timesteps coincide.
The step after the last one is -1, whose alpha_bar is 1 (clean data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import BenchError

SPACINGS = ("uniform", "quad")


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete DDPM schedule; alpha_bar is kept in float64 and indexed by t in [-1, T-1]."""

    betas: torch.Tensor  # (T,) float64

    @classmethod
    def linear(cls, beta_start: float = 1e-4, beta_end: float = 0.02, num_train_timesteps: int = 1000):
        return cls(torch.from_numpy(np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.numel())

    @property
    def _alpha_bar_ext(self) -> torch.Tensor:
        # index 0 is t = -1 (alpha_bar = 1), index t + 1 is t
        return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - self.betas, dim=0)])

    def alpha_bar(self, t: int) -> float:
        if not -1 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep {t} outside [-1, {self.num_train_timesteps - 1}]")
        return float(self._alpha_bar_ext[t + 1])


def timestep_sequence(spacing: str, steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Increasing list of timesteps; the sampler walks it backwards."""
    if spacing not in SPACINGS:
        raise BenchError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool):
        raise BenchError(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= num_train_timesteps:
        raise BenchError(f"steps must be between 1 and {num_train_timesteps} (T), got {steps}")
    if spacing == "uniform":
        return list(range(0, num_train_timesteps, num_train_timesteps // steps))
    return [int(s) for s in np.linspace(0, np.sqrt(num_train_timesteps * 0.8), steps) ** 2]


def step_pairs(seq: list[int]) -> list[tuple[int, int]]:
    """(t, t_prev) pairs in sampling order: from the largest timestep down, the last one to -1."""
    prev = [-1] + seq[:-1]
    return list(zip(reversed(seq), reversed(prev), strict=True))
