"""Noise schedules and timestep grids, as the harness uses them: :mod:`modiff.schedules` (where they
live, shared with ``baselines``), with a user's mistake reported as a one-line :class:`BenchError`
instead of ValueError. See :mod:`modiff.schedules` for the grids."""

from __future__ import annotations

from modiff import schedules as _schedules
from modiff.schedules import GRIDS, SPACINGS, NoiseSchedule, step_pairs

from .errors import BenchError

__all__ = ["GRIDS", "SPACINGS", "NoiseSchedule", "final_timestep", "step_pairs", "timestep_sequence"]


def timestep_sequence(spacing: str, steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """:func:`modiff.schedules.timestep_sequence`; BenchError for an unknown spacing or bad steps."""
    try:
        return _schedules.timestep_sequence(spacing, steps, num_train_timesteps)
    except ValueError as exc:
        raise BenchError(str(exc)) from None


def final_timestep(spacing: str) -> int:
    """:func:`modiff.schedules.final_timestep`; BenchError for an unknown spacing."""
    try:
        return _schedules.final_timestep(spacing)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
