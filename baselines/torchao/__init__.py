"""torchao's post-training quantization as peers of MoDiff: ``quantize_(model, config)`` on a diffusion UNet, with
what it did counted.

torchao (PyTorch's quantization library, an optional extra: ``pip install 'modiff-bench[torchao]'``) quantizes
the weights of ``nn.Linear`` modules: ``quantize_``'s default filter selects ``nn.Linear`` alone, and its int8
tensor implements no convolution (``aten.convolution`` is not among its ops). On a UNet the convolutions, where
most of the MACs are, therefore stay in float; on a transformer nearly every matmul is quantized.
:func:`quantize_linears` applies one of the :data:`SCHEMES` and returns a :class:`TorchaoSummary` saying so.

The schemes, each a torchao config with its defaults but ``set_inductor_config=False`` (torchao would otherwise
change ``torch._inductor.config`` for the whole process, and with it every compiled cell that runs after):

- ``w8a8``: ``Int8DynamicActivationInt8WeightConfig``: int8 weights per output channel, int8 activations with one
  dynamic scale per row of the flattened input (per token; per sample on a 2-D input), symmetric; the matmul
  runs on integer kernels (``torch._int_mm``), the output is rescaled in float;
- ``w8``: ``Int8WeightOnlyConfig``: int8 weights per output channel; activations stay float and the matmul runs
  in float on the weights converted back per call, so it saves weight memory, not arithmetic;
- ``fp8``: ``Float8DynamicActivationFloat8WeightConfig``: float8 (e4m3) weights and activations, one dynamic scale
  per tensor, through ``torch._scaled_mm``; torchao allows it on CUDA compute capability 8.9 or newer only
  (:func:`fp8_unsupported`). It leaves a linear whose dimensions are not multiples of 16 in float, which the
  summary counts.

Nothing here imports torchao until it is used, so the package imports without it; :func:`unavailable` says why it
cannot be used."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn

INSTALL_HINT = "pip install 'modiff-bench[torchao]'"
FP8_CAPABILITY = (8, 9)  # torchao's float8 dynamic quantization: Ada Lovelace / Hopper and newer

# scheme -> the torchao config class (in torchao.quantization)
SCHEMES = {
    "w8a8": "Int8DynamicActivationInt8WeightConfig",
    "w8": "Int8WeightOnlyConfig",
    "fp8": "Float8DynamicActivationFloat8WeightConfig",
}


def unavailable() -> str | None:
    """Why torchao cannot be used here (one line), or None."""
    try:
        quantization = importlib.import_module("torchao.quantization")
    except Exception as exc:  # not installed, or an install that does not import (a torch it was not built for)
        what = "is not installed" if isinstance(exc, ModuleNotFoundError) else f"does not import ({exc})"
        return f"torchao {what}: {INSTALL_HINT}".splitlines()[0]
    missing = [name for name in SCHEMES.values() if not hasattr(quantization, name)]
    if missing:
        return f"torchao {version()} lacks {', '.join(missing)}: install torchao>=0.18 ({INSTALL_HINT})"
    return None


def version() -> str:
    """The installed torchao's version ('' without it)."""
    try:
        return str(importlib.import_module("torchao").__version__)
    except Exception:
        return ""


def fp8_unsupported(device: torch.device | str) -> str | None:
    """Why torchao's float8 scheme cannot run on ``device`` (no float8 matmul), or None."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"torchao's float8 quantization needs float8 matmuls (CUDA compute capability "
                f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer); the device is {device.type}")
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < FP8_CAPABILITY:
        return (f"torchao's float8 quantization needs float8 matmuls (CUDA compute capability "
                f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer); this GPU has {capability[0]}.{capability[1]}")
    return None


def make_config(scheme: str):
    """The torchao config object of ``scheme`` (one of :data:`SCHEMES`)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown torchao scheme {scheme!r}; one of {', '.join(SCHEMES)}")
    reason = unavailable()
    if reason:
        raise ImportError(reason)
    quantization = importlib.import_module("torchao.quantization")
    return getattr(quantization, SCHEMES[scheme])(set_inductor_config=False)


@dataclass(frozen=True)
class TorchaoSummary:
    """What :func:`quantize_linears` left where: names of the linears whose weight became a torchao tensor, of the
    linears left in float, and of the convolutions (always float)."""

    scheme: str
    config: str
    quantized_linears: tuple[str, ...]
    float_linears: tuple[str, ...]
    float_convs: tuple[str, ...]


def is_torchao_tensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is one of torchao's quantized tensor subclasses."""
    return type(tensor).__module__.split(".")[0] == "torchao"


def quantize_linears(module: nn.Module, scheme: str) -> TorchaoSummary:
    """Quantize ``module``'s linears in place with torchao's ``scheme`` and say which layers it quantized."""
    config = make_config(scheme)
    quantize_ = importlib.import_module("torchao.quantization").quantize_
    quantize_(module, config)  # its default filter: nn.Linear modules only
    quantized, float_linears, convs = [], [], []
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Linear):
            (quantized if is_torchao_tensor(layer.weight) else float_linears).append(name)
        elif isinstance(layer, nn.modules.conv._ConvNd):
            if is_torchao_tensor(layer.weight):  # not what torchao 0.18 does: the summary would lie
                raise RuntimeError(f"torchao quantized the convolution {name}; this summary assumes it does not")
            convs.append(name)
    return TorchaoSummary(scheme, type(config).__name__, tuple(quantized), tuple(float_linears), tuple(convs))


__all__ = ["FP8_CAPABILITY", "INSTALL_HINT", "SCHEMES", "TorchaoSummary", "fp8_unsupported", "is_torchao_tensor",
           "make_config", "quantize_linears", "unavailable", "version"]
