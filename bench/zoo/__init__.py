"""Model zoo: a name -> a loaded denoiser with its schedule and the sampler settings it uses.

Every model is a :class:`~bench.zoo.registry.ZooEntry` (loader, training T, description, output size, reference
data) registered beside its loader: ``digits``, ``ddpm_cifar10``, ``ldm``, ``sd`` and ``sdxl`` here, and the generic
``diffusers:<directory or hub id>`` entry (``generic``) for unconditional ``UNet2DModel`` pipelines and Stable
Diffusion 1.x / 2.x / SDXL text-to-image pipelines. Checkpoint
converters (the original DDPM and CompVis LDM layouts -> diffusers) live apart, in ``bench.zoo.convert``.

A :class:`ZooModel` (defined in ``bench.zoo.model``, re-exported here) is what the samplers, methods and runner
need from a model: its ``unet``, ``schedule``, ``image_shape`` and the optional model-specific parts that module's
docstring describes. :func:`load_model` loads one by name on a device (``bench.devices`` checks its name).
"""

from __future__ import annotations

from pathlib import Path

from ..devices import resolve_device
from .model import ZooModel, unet_denoiser
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
# (one module per line, so that adding one touches one line; generic, the catch-all scheme, stays last)
from . import digits  # noqa: E402, F401, I001
from . import digits_dit  # noqa: E402, F401, I001
from . import ddpm_cifar10  # noqa: E402, F401, I001
from . import ldm  # noqa: E402, F401, I001
from . import sd  # noqa: E402, F401, I001
from . import sdxl  # noqa: E402, F401, I001
from . import dit  # noqa: E402, F401, I001
from . import pixart  # noqa: E402, F401, I001
from . import sd3  # noqa: E402, F401, I001
from . import flux  # noqa: E402, F401, I001
from . import generic  # noqa: E402, F401, I001
