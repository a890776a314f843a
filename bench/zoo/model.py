"""What a loaded zoo model is: :class:`ZooModel`, and :func:`unet_denoiser`, the default denoiser.

A :class:`ZooModel` is what the samplers, methods and runner need from a model:
- ``unet``: the denoiser network that quantization applies to (only it: a latent model's autoencoder
  and a text encoder stay in full precision, as in the papers);
- ``schedule`` and ``image_shape``, the shape the sampler works in (latents for latent models);
- ``denoiser(unet)``: that network as the samplers' ``(x_t, t) -> eps`` callable (classifier-free
  guidance for text-conditioned models is applied there);
- ``decode(x)``: sampler output -> images nominally in [-1, 1], unclipped (identity for pixel-space models);
- ``start_batch(seeds)``: per-batch conditioning chosen from the seeds (prompts), run before a batch's
  first step; None for unconditional models.

The model modules (``digits``, ``ddpm_cifar10``, ``ldm``, ``sd``, ``sdxl``, ``generic``) and the registry build on this
module; ``bench.zoo`` re-exports both names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from modiff.samplers import Denoiser
from modiff.schedules import NoiseSchedule


def unet_denoiser(unet: nn.Module) -> Denoiser:
    """Adapt an unconditional diffusers UNet to the samplers' ``(x_t, t) -> eps`` interface."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t).sample

    return denoise


@dataclass
class ZooModel:
    name: str
    unet: nn.Module
    schedule: NoiseSchedule
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

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Sampler output -> images nominally in [-1, 1], not clipped, on the same device (identity in pixel
        space); a metric that needs [-1, 1] clamps them itself."""
        return x if self.decoder is None else self.decoder(x)

    @property
    def image_output_shape(self) -> tuple[int, ...]:
        return self.output_shape or self.image_shape
