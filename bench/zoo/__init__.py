"""Model zoo: a name -> a loaded denoiser with its schedule and the sampler settings it uses.

Every model is a :class:`~bench.zoo.registry.ZooEntry` (loader, training T, description, output size, reference
data) registered beside its loader: ``digits``, ``ddpm_cifar10``, ``ldm`` and ``sd`` here, and the generic
``diffusers:<directory or hub id>`` entry (``generic``) for any unconditional ``UNet2DModel`` pipeline. Checkpoint
converters (the original DDPM and CompVis LDM layouts -> diffusers) live apart, in ``bench.zoo.convert``.

A :class:`ZooModel` is what the samplers, methods and runner need from a model:
- ``unet``: the denoiser network that quantization applies to (only it: a latent model's autoencoder
  and a text encoder stay in full precision, as in the papers);
- ``schedule`` and ``image_shape``, the shape the sampler works in (latents for latent models);
- ``denoiser(unet)``: that network as the samplers' ``(x_t, t) -> eps`` callable (classifier-free
  guidance for text-conditioned models is applied there);
- ``decode(x)``: sampler output -> images nominally in [-1, 1], unclipped (identity for pixel-space models);
- ``start_batch(seeds)``: per-batch conditioning chosen from the seeds (prompts), run before a batch's
  first step; None for unconditional models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import BenchError
from ..samplers import Denoiser
from ..schedules import NoiseSchedule
from .registry import (
    DESCRIPTIONS,
    MODELS,
    TRAIN_TIMESTEPS,
    ReferenceData,
    ZooEntry,
    model_entry,
    model_names,
    register_model,
    register_scheme,
    schemes,
)


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


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BenchError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"unsupported device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
    return dev


def load_model(name: str, checkpoint: str | Path | None = None, device: str = "cpu") -> ZooModel:
    """The model ``name`` (a registered name or ``diffusers:<directory or hub id>``) from ``checkpoint`` (its
    default source when None), on ``device``."""
    entry = model_entry(name)
    dev = resolve_device(device)
    model = entry.load(Path(checkpoint) if checkpoint else None)
    if tuple(model.image_output_shape[-2:]) != entry.output_size:  # the declaration is what references use
        raise RuntimeError(f"model {name!r} decodes {tuple(model.image_output_shape)} images but its zoo entry "
                           f"declares output_size {entry.output_size}")
    model.unet.to(dev)
    for part in model.parts.values():
        part.to(dev)
    return model


__all__ = [
    "DESCRIPTIONS", "MODELS", "TRAIN_TIMESTEPS", "ReferenceData", "ZooEntry", "ZooModel", "load_model",
    "model_entry", "model_names", "register_model", "register_scheme", "resolve_device", "schemes", "unet_denoiser",
]

# the built-in entries register themselves on import (registration order = listing order)
from . import digits, ddpm_cifar10, ldm, sd, generic  # noqa: E402, F401, I001
