"""Sampling with a quantized copy of a zoo model: the glue between ``modiff`` and the samplers."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

import modiff

from .samplers import SamplerConfig, sample
from .zoo import ZooModel


def quantized_copy(unet: nn.Module, config: modiff.ModiffConfig) -> nn.Module:
    """A fake-quantized deep copy; the original stays full precision for reference samples."""
    return modiff.quantize(copy.deepcopy(unet), config)


def sample_unet(
    unet: nn.Module, model: ZooModel, sampler: SamplerConfig, seeds: Sequence[int], batch_size: int = 64,
    device: str | torch.device = "cpu", progress: bool = False,
) -> torch.Tensor:
    """Sample with ``unet`` (quantized or not) on ``model``'s schedule; MoDiff state is reset once
    per batch, before the first step."""
    return sample(
        model.denoiser(unet), model.schedule, sampler, seeds, model.image_shape, batch_size, device,
        progress=progress, on_trajectory_start=lambda: modiff.reset(unet), on_batch=model.start_batch,
    )
