"""Model zoo: a name -> a loaded denoiser with its schedule and the sampler settings it uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BenchError
from ..samplers import Denoiser
from ..schedules import NoiseSchedule


@dataclass
class ZooModel:
    name: str
    unet: torch.nn.Module
    schedule: NoiseSchedule
    image_shape: tuple[int, ...]
    default_sampler: str
    default_steps: int
    info: dict = field(default_factory=dict)

    def denoiser(self) -> Denoiser:
        from .digits import unet_denoiser

        return unet_denoiser(self.unet)


def _load_digits(checkpoint: Path | None) -> ZooModel:
    from . import digits

    unet, manifest = digits.load_unet(checkpoint)
    return ZooModel(
        name="digits", unet=unet, schedule=digits.schedule(), image_shape=digits.IMAGE_SHAPE,
        default_sampler="ddim-quad", default_steps=100,
        info={"checkpoint": str(checkpoint or digits.ASSET_DIR), "files": manifest["files"]},
    )


MODELS: dict[str, Callable[[Path | None], ZooModel]] = {"digits": _load_digits}


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
    return model
