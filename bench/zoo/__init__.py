"""Model zoo: a name -> a loaded denoiser with its schedule and the sampler settings it uses.

A :class:`ZooModel` is what the samplers, methods and runner need from a model:
- ``unet``: the denoiser network that quantization applies to (only it: a latent model's autoencoder
  and a text encoder stay in full precision, as in the papers);
- ``schedule`` and ``image_shape``, the shape the sampler works in (latents for latent models);
- ``denoiser(unet)``: that network as the samplers' ``(x_t, t) -> eps`` callable (classifier-free
  guidance for text-conditioned models is applied there);
- ``decode(x)``: sampler output -> images in [-1, 1] (identity for pixel-space models);
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
        """Sampler output -> images in [-1, 1] on the same device (identity in pixel space)."""
        return x if self.decoder is None else self.decoder(x)

    @property
    def image_output_shape(self) -> tuple[int, ...]:
        return self.output_shape or self.image_shape


def _load_digits(checkpoint: Path | None) -> ZooModel:
    from . import digits

    unet, manifest = digits.load_unet(checkpoint)
    return ZooModel(
        name="digits", unet=unet, schedule=digits.schedule(), image_shape=digits.IMAGE_SHAPE,
        default_sampler="ddim-quad", default_steps=100,
        info={"checkpoint": str(checkpoint or digits.ASSET_DIR), "files": manifest["files"]},
    )


def _lazy(module: str, function: str) -> Callable[[Path | None], ZooModel]:
    """A loader living in ``bench.zoo.<module>``, imported only when the model is asked for."""

    def load(checkpoint: Path | None) -> ZooModel:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), function)(checkpoint)

    load.__qualname__ = f"{module}.{function}"
    return load


# name -> loader(checkpoint or None) -> ZooModel. The paper-scale entries need their weights (see the
# README's "Model zoo"): a missing checkpoint is a one-line BenchError saying what to get and where.
MODELS: dict[str, Callable[[Path | None], ZooModel]] = {
    "digits": _load_digits,
    "ddpm-cifar10": _lazy("ddpm_cifar10", "load"),
    "ldm-church": _lazy("ldm", "load_church"),
    "ldm-bedroom": _lazy("ldm", "load_bedroom"),
    "sd-v1-4": _lazy("sd", "load"),
}


# name -> the training schedule's T, known without loading the weights (steps are checked against it
# before anything runs, by --dry-run too; the loaded model's schedule is checked again)
TRAIN_TIMESTEPS: dict[str, Callable[[], int]] = {
    "digits": lambda: _module("digits").NUM_TRAIN_TIMESTEPS,
    "ddpm-cifar10": lambda: _module("ddpm_cifar10").schedule().num_train_timesteps,
    "ldm-church": lambda: _module("ldm").CHURCH.num_train_timesteps,
    "ldm-bedroom": lambda: _module("ldm").BEDROOM.num_train_timesteps,
    "sd-v1-4": lambda: _module("sd").NUM_TRAIN_TIMESTEPS,
}


def _module(name: str):
    import importlib

    return importlib.import_module(f"{__name__}.{name}")


DESCRIPTIONS: dict[str, str] = {
    "digits": "embedded default: 16x16 digits UNet trained by this project (committed, no download)",
    "ddpm-cifar10": "DDPM CIFAR-10 32x32 (Ho et al.): google/ddpm-cifar10-32, a diffusers directory, or the "
                    "original model-790000.ckpt (the papers used the EMA one)",
    "ldm-church": "LDM-8 LSUN-Churches 256x256 (CompVis latent-diffusion, KL-f8 autoencoder): lsun_churches "
                  "model.ckpt or a diffusers directory",
    "ldm-bedroom": "LDM-4 LSUN-Bedrooms 256x256 (CompVis latent-diffusion, VQ-f4 autoencoder): lsun_bedrooms "
                   "model.ckpt or a diffusers directory",
    "sd-v1-4": "Stable Diffusion v1.4 512x512, guidance 7.5 (optional extra: pip install 'modiff-bench[sd]'): "
               "CompVis/stable-diffusion-v1-4 in diffusers layout",
}


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
    if name not in MODELS:
        raise BenchError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    dev = resolve_device(device)
    model = MODELS[name](Path(checkpoint) if checkpoint else None)
    model.unet.to(dev)
    for part in model.parts.values():
        part.to(dev)
    return model
