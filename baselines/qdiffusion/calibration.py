"""Time-step-aware calibration data (Q-Diffusion): denoiser inputs kept along full-precision
sampling trajectories.

The full-precision sampler runs ``cali_n`` trajectories; at each step index in
``range(0, n_steps, n_steps // cali_st)`` (the authors' spacing: uniform over the trajectory,
which can give a few more than ``cali_st`` steps when ``n_steps`` is not a multiple) the
denoiser's input ``(x_t, t)`` of every trajectory is kept. For the static residual scales of
Q-Diffusion + MoDiff the input of the step before each kept step is kept as well, so that the
pairs ``(x_prev, x_t)`` reproduce the temporal residual a layer sees at that step.

A "step" here is one network evaluation: ``n_steps`` is the number of evaluations of one
trajectory (``SamplerConfig.evaluation_timesteps``), the sampler's steps for DDIM, DDPM and
DPM-Solver++, one more for PLMS (whose first step evaluates twice), more for the ``uniform`` grids
when ``steps`` does not divide T. Consecutive evaluations are what a MoDiff layer's residual
chain follows, so the pairs stay right for multi-evaluation solvers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modiff.samplers import SamplerConfig, sample
from modiff.schedules import NoiseSchedule


def calibration_steps(n_steps: int, cali_st: int) -> list[int]:
    """Step indices (0 = the first, noisiest step) whose inputs are kept; ValueError unless
    ``1 <= cali_st <= n_steps``."""
    if not 1 <= cali_st <= n_steps:
        raise ValueError(f"cali_st must be between 1 and the number of sampling steps ({n_steps}); got {cali_st}")
    return list(range(0, n_steps, n_steps // cali_st))


@dataclass
class CalibrationData:
    """Inputs by step index: ``x[i]`` is (cali_n, *image_shape), ``t[i]`` the timestep."""

    steps: list[int]  # the calibration steps
    x: dict[int, torch.Tensor]  # step index -> inputs (calibration steps and the steps before them)
    t: dict[int, int]
    seeds: list[int]

    @property
    def n(self) -> int:
        return len(self.steps) * len(self.seeds)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All calibration inputs ``(x, t)``, step after step."""
        xs = torch.cat([self.x[i] for i in self.steps])
        ts = torch.cat([torch.full((len(self.x[i]),), self.t[i], dtype=torch.long) for i in self.steps])
        return xs, ts

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(x_prev, t_prev, x, t)`` for each calibration step that has a step before it."""
        out = []
        for i in self.steps:
            if i == 0:
                continue
            n = len(self.x[i])
            out.append((self.x[i - 1], torch.full((n,), self.t[i - 1], dtype=torch.long),
                        self.x[i], torch.full((n,), self.t[i], dtype=torch.long)))
        return out

    def to_dict(self) -> dict:
        return {"steps": self.steps, "x": self.x, "t": self.t, "seeds": self.seeds}

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationData:
        return cls(steps=list(data["steps"]), x={int(k): v for k, v in data["x"].items()},
                   t={int(k): int(v) for k, v in data["t"].items()}, seeds=list(data["seeds"]))


def collect(denoiser, schedule: NoiseSchedule, sampler: SamplerConfig, cali_st: int, seeds: Sequence[int],
            image_shape: Sequence[int], batch_size: int, device: torch.device | str = "cpu",
            progress: bool = False, on_batch=None) -> CalibrationData:
    """Run the full-precision ``denoiser`` along ``sampler``'s trajectories from ``seeds`` and keep
    the inputs of the calibration steps (and of the steps just before them)."""
    timesteps = sampler.evaluation_timesteps(schedule)
    steps = calibration_steps(len(timesteps), cali_st)
    wanted = sorted({*steps, *(i - 1 for i in steps if i > 0)})
    kept: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    step = {"index": 0}

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if step["index"] in kept:
            kept[step["index"]].append(x.detach().cpu())
        step["index"] += 1
        return denoiser(x, t)

    def start() -> None:
        step["index"] = 0

    sample(recording, schedule, sampler, list(seeds), image_shape, batch_size, device, progress=progress,
           on_trajectory_start=start, leave=False, on_batch=on_batch)
    return CalibrationData(steps=steps, x={i: torch.cat(v) for i, v in kept.items()},
                           t={i: timesteps[i] for i in wanted}, seeds=list(seeds))
