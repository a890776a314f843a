"""Noise schedules and the timestep sequences the papers' code samples on (a building block shared
by ``modiff``, ``baselines`` and the ``bench`` harness).

The DDIM code base that Q-Diffusion and MoDiff build on (CIFAR-10):
- ``uniform``: ``range(0, T, T // steps)`` (may hold more than ``steps`` entries when
  ``steps`` does not divide ``T``, exactly as that code does);
- ``quad``: ``[int(s) for s in linspace(0, sqrt(0.8 T), steps) ** 2]``; duplicates at the start
  are kept, so ``steps`` network evaluations happen even where consecutive timesteps coincide.
The step after the last one is -1, whose alpha_bar is 1 (clean data).

Two more grids, each with its own end point (``final_timestep``):
- ``ldm``: latent-diffusion's ``make_ddim_timesteps("uniform")``, ``range(0, T, T // steps) + 1``
  (more than ``steps`` entries when ``steps`` does not divide ``T``, as there). The step after the
  last one goes to t = 0, i.e. ``alphas_cumprod[0]`` (latent-diffusion's ``alphas_prev``), not 1.
  Steps for which the grid would reach t = T (``T // steps`` divides ``T - 1``, e.g. 300 or 3 of
  1000) are refused: latent-diffusion itself indexes past its schedule there.
- ``linspace``: DPM-Solver's time-uniform grid on integer timesteps,
  ``round(linspace(0, T - 1, steps + 1))`` without its first entry (0, where sampling ends, the
  discrete counterpart of DPM-Solver's ``t_0 = 1 / N``); the same integers diffusers'
  ``DPMSolverSinglestepScheduler`` evaluates at (``timestep_spacing="linspace"``).

A caller's mistake (an unknown spacing, a number of steps the grid cannot have) raises ValueError
with a one-line message; the harness reports it as a ``BenchError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["GRIDS", "SPACINGS", "NoiseSchedule", "final_timestep", "step_pairs", "timestep_sequence"]

SPACINGS = ("uniform", "quad")  # the DDIM code base's (ddim-* / ddpm-* samplers)
GRIDS = (*SPACINGS, "ldm", "linspace")  # every sequence ``timestep_sequence`` makes


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
    if spacing not in GRIDS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(GRIDS)}")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    T = num_train_timesteps
    top = T - 1 if spacing == "linspace" else T  # linspace needs steps + 1 distinct integers in [0, T-1]
    if not 1 <= steps <= top:
        raise ValueError(f"steps must be between 1 and {top} ({'T - 1' if top < T else 'T'}), got {steps}")
    if spacing == "uniform":
        return list(range(0, T, T // steps))
    if spacing == "ldm":
        seq = [t + 1 for t in range(0, T, T // steps)]
        if seq[-1] > T - 1:
            raise ValueError(f"{steps} steps on latent-diffusion's grid range(0, {T}, {T // steps}) + 1 reach "
                             f"t = {seq[-1]} > {T - 1} (latent-diffusion fails there too); choose another number "
                             "of steps")
        return seq
    if spacing == "linspace":
        return [int(t) for t in np.linspace(0, T - 1, steps + 1).round()[1:]]
    return [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), steps) ** 2]


def final_timestep(spacing: str) -> int:
    """The timestep the last step ends at: -1 (alpha_bar = 1, the DDIM code base) or 0
    (alpha_bar = alphas_cumprod[0]: latent-diffusion's DDIM/PLMS and DPM-Solver's t_0 = 1/N)."""
    if spacing not in GRIDS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(GRIDS)}")
    return -1 if spacing in SPACINGS else 0


def step_pairs(seq: list[int], final: int = -1) -> list[tuple[int, int]]:
    """(t, t_prev) pairs in sampling order: from the largest timestep down, the last one to
    ``final`` (-1 by default)."""
    prev = [final] + list(seq[:-1])
    return list(zip(reversed(seq), reversed(prev), strict=True))
