"""The samplers, as the harness uses them: :mod:`modiff.samplers` (where they live, shared with
``baselines``) with a user's mistake reported as a one-line :class:`BenchError` instead of
ValueError, plus the harness's seed rule (``check_seeds``). See :mod:`modiff.samplers` for the
algorithms; the numbers are theirs, bit for bit.

``SamplerConfig`` here is a subclass of ``modiff.samplers.SamplerConfig``: it is accepted wherever
that one is, and compares equal to it for the same settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from modiff import samplers as _samplers
from modiff.samplers import (
    ALGORITHMS,
    DETERMINISTIC,
    MAX_SEED,
    SAMPLER_NAMES,
    SAMPLERS,
    Denoiser,
    NoiseStd,
    PerSampleNoise,
    denoising_step,
    dpm_solver_orders,
    sample_batch,
)

from .errors import BenchError
from .schedules import SPACINGS, NoiseSchedule, final_timestep, step_pairs, timestep_sequence

__all__ = [
    "ALGORITHMS", "DETERMINISTIC", "MAX_SEED", "SAMPLERS", "SAMPLER_NAMES", "SPACINGS", "Denoiser", "NoiseSchedule",
    "NoiseStd", "PerSampleNoise", "SamplerConfig", "check_seeds", "denoising_step", "dpm_solver_orders",
    "final_timestep", "sample", "sample_batch", "step_pairs", "timestep_sequence",
]


class SamplerConfig(_samplers.SamplerConfig):
    """:class:`modiff.samplers.SamplerConfig` whose checks raise BenchError: an unknown sampler name,
    eta out of range (``from_name``), steps the grid cannot have (``timesteps`` and what uses it)."""

    @classmethod
    def from_name(cls, name: str, steps: int, eta: float = 0.0) -> SamplerConfig:
        try:
            return super().from_name(name, steps, eta)
        except ValueError as exc:
            raise BenchError(str(exc)) from None

    def timesteps(self, schedule: NoiseSchedule) -> list[int]:
        try:
            return super().timesteps(schedule)
        except ValueError as exc:
            raise BenchError(str(exc)) from None


def check_seeds(first: int, n: int, where: str = "seed") -> None:
    """One rule for every command: seeds are first .. first + n - 1, all within [0, 2^64 - 1]."""
    if first < 0:
        raise BenchError(f"{where} must be >= 0, got {first}")
    if first + n - 1 > MAX_SEED:
        raise BenchError(f"{where} {first} with {n} samples runs past the largest seed 2^64 - 1 = {MAX_SEED} "
                         f"(the last would be {first + n - 1})")


def sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    config: _samplers.SamplerConfig,
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
    """:func:`modiff.samplers.sample`, its settings checked first (BenchError: a batch size below 1,
    steps the grid cannot have). Errors raised while sampling (by the denoiser) pass through as they are."""
    try:
        _samplers.check_settings(config, schedule, batch_size)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    return _samplers.sample(denoiser, schedule, config, seeds, image_shape, batch_size, device, progress,
                            on_trajectory_start, leave, noise_std, on_batch)
