"""What a method gets and gives when it builds a denoiser: a :class:`BuildContext` in, a :class:`Prepared` out."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modiff.samplers import Denoiser, NoiseStd, SamplerConfig

from .cell import CellSpec

if TYPE_CHECKING:
    from .zoo import ZooModel


@dataclass
class BuildContext:
    """What a method may use to build its denoiser. ``model`` is full precision and shared by all
    cells: copy before modifying (``fp_unet_copy``). ``cache_dir`` (None: no disk cache) is where
    expensive, reusable preparation (calibration data, calibrated models) may be kept; a method
    keys what it stores there by everything the stored result depends on."""

    model: ZooModel
    cell: CellSpec
    sampler: SamplerConfig
    device: torch.device
    progress: bool = False
    cache_dir: Path | None = None
    # what the base quantizer made of the cell's settings when the cell was resolved (BaseQuantizer.configure:
    # the modiff.ModiffConfig of a modiff-wrapped base; None for a base that needs none)
    config: Any = None

    def fp_unet_copy(self) -> nn.Module:
        """A copy of the full-precision UNet, in the cell's memory format (its weights laid out so)."""
        unet = copy.deepcopy(self.model.unet)
        return unet if self.cell.memory_format == "contiguous" else unet.to(memory_format=torch.channels_last)


@dataclass
class Prepared:
    """A built method: the UNet to sample with, an optional wrapper of its denoiser (e.g. a noise
    correction), callbacks run once per batch before the first step, an optional replacement of the
    sampler's fresh-noise std (``modiff.samplers.NoiseStd``), and facts to record."""

    unet: nn.Module
    wrap: Callable[[Denoiser], Denoiser] | None = None
    on_trajectory_start: list[Callable[[], None]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    # share of the full UNet's MACs one network evaluation runs on average (caching < 1); None: not known (a cache
    # whose skipped work depends on the data and is not counted): the cell's MACs and GBops are then left empty
    mac_fraction: float | None = 1.0
    noise_std: NoiseStd | None = None
    # the zoo model's adapter of a UNet to ``(x_t, t) -> eps`` (guidance, conditioning); set by ``build``
    make_denoiser: Callable[[nn.Module], Denoiser] | None = None

    def denoiser(self) -> Denoiser:
        """The UNet as a sampler's denoiser, with the method's wrapper applied."""
        from .zoo import unet_denoiser

        denoiser = (self.make_denoiser or unet_denoiser)(self.unet)
        return self.wrap(denoiser) if self.wrap is not None else denoiser

    def start_trajectory(self) -> None:
        """Run the per-trajectory callbacks: once per batch, before its first step."""
        for callback in self.on_trajectory_start:
            callback()
