"""What a loaded zoo model is: :class:`ZooModel`, and :func:`unet_denoiser`, the default denoiser.

A :class:`ZooModel` is what the samplers, methods and runner need from a model:
- ``unet``: the denoiser network that quantization applies to (only it: a latent model's autoencoder
  and a text encoder stay in full precision, as in the papers);
- ``schedule`` and ``image_shape``, the shape the sampler works in (latents for latent models). The schedule is a
  DDPM ``modiff.schedules.NoiseSchedule`` (the ``modiff.samplers`` samplers), or, for a flow-matching model (SD3,
  FLUX), a ``modiff.flow.FlowGrid``: its ``FlowSchedule`` with the spacing and mu its pipeline samples with (the
  ``flow-euler`` / ``flow-heun`` samplers, ``modiff.flow.FlowSamplerConfig``); ``ZooModel.flow`` tells them apart;
- ``denoiser(unet)``: that network as the samplers' ``(x_t, t) -> eps`` callable (classifier-free
  guidance for text-conditioned models is applied there); for a flow model ``(x_t, t) -> v``, the velocity, with
  ``t`` the float model time ``sigma * num_train_timesteps``;
- ``decode(x)``: sampler output -> images nominally in [-1, 1], unclipped (identity for pixel-space models);
- ``start_batch(seeds)``: per-batch conditioning chosen from the seeds (prompts), run before a batch's
  first step; None for unconditional models.

The model modules (``digits``, ``ddpm_cifar10``, ``ldm``, ``sd``, ``sdxl``, ``sd3``, ``flux``, ``generic``) and the
registry build on this module; ``bench.zoo`` re-exports both names. A flow model's entry is also marked with
:func:`mark_flow_model`, so that a matrix can refuse a DDPM sampler on it (and a flow sampler elsewhere) before
anything loads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from modiff.flow import FlowGrid
from modiff.samplers import Denoiser
from modiff.schedules import NoiseSchedule

_FLOW_MODELS: set[str] = set()  # names of the registered flow-matching models (mark_flow_model)


def mark_flow_model(name: str) -> None:
    """Declare the zoo entry ``name`` a flow-matching model (its ZooModel's schedule is a ``FlowGrid``), known
    without loading it: a matrix checks its samplers against it (``is_flow_model``)."""
    _FLOW_MODELS.add(name)


def is_flow_model(name: str) -> bool:
    """Whether ``name`` was declared a flow-matching model (``mark_flow_model``); any other name samples with the
    DDPM-family samplers."""
    return name in _FLOW_MODELS


def unet_denoiser(unet: nn.Module) -> Denoiser:
    """Adapt an unconditional diffusers UNet to the samplers' ``(x_t, t) -> eps`` interface."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t).sample

    return denoise


@dataclass
class ZooModel:
    name: str
    unet: nn.Module
    schedule: NoiseSchedule | FlowGrid  # a FlowGrid for a flow-matching model (see the module docstring)
    image_shape: tuple[int, ...]  # what the sampler draws and returns (latents for latent models)
    default_sampler: str
    default_steps: int
    info: dict = field(default_factory=dict)
    # optional model-specific parts (see the module docstring)
    make_denoiser: Callable[[nn.Module], Denoiser] | None = None
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None
    start_batch: Callable[[Sequence[int]], None] | None = None
    output_shape: tuple[int, ...] | None = None  # decoded image shape; None: image_shape
    default_eta: float = 0.0
    default_batch_size: int = 64
    parts: dict[str, nn.Module] = field(default_factory=dict)  # full-precision companions (autoencoder, text encoder)

    def denoiser(self, unet: nn.Module | None = None) -> Denoiser:
        """``unet`` (default: this model's, full precision) as a sampler's denoiser."""
        unet = self.unet if unet is None else unet
        return self.make_denoiser(unet) if self.make_denoiser is not None else unet_denoiser(unet)

    @property
    def flow(self) -> FlowGrid | None:
        """The flow-matching grid of a flow model; None for a DDPM-family model."""
        return self.schedule if isinstance(self.schedule, FlowGrid) else None

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Sampler output -> images nominally in [-1, 1], not clipped, on the same device (identity in pixel
        space); a metric that needs [-1, 1] clamps them itself."""
        return x if self.decoder is None else self.decoder(x)

    @property
    def image_output_shape(self) -> tuple[int, ...]:
        return self.output_shape or self.image_shape
