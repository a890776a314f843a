"""``quantize(model, config)``: wrap every conv/linear of any ``nn.Module`` in place."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import ModiffConfig, check_choice
from .layers import QUANTIZABLE, QuantLayer


def quantize(model: nn.Module, config: ModiffConfig, weight_quantized: bool = False) -> nn.Module:
    """Replace every Conv1d/Conv2d/Linear whose qualified name matches no ``config.skip`` pattern
    by a :class:`QuantLayer` (weights fake-quantized once, here; left as they are with
    ``weight_quantized=True``, for weights already on their grid, e.g. a calibrated checkpoint's).
    Returns the same model."""
    if not isinstance(config, ModiffConfig):
        raise TypeError(f"config must be a ModiffConfig, got {type(config).__name__}")
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("model is already quantized; quantize a fresh copy instead")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, QUANTIZABLE) and name and not any(fnmatch.fnmatchcase(name, p) for p in config.skip)]
    if not targets:
        raise ValueError(f"model has no Conv1d/Conv2d/Linear layer to wrap (skip={config.skip!r})")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLayer(module, config, name, weight_quantized=weight_quantized))
    if config.compute_dtype != "float32":
        cast_outside_quant_layers(model, getattr(torch, config.compute_dtype))
    return model


def cast_outside_quant_layers(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters and buffers that no QuantLayer owns (norms, attention,
    unwrapped layers) to ``dtype``; the QuantLayers keep float32 weights and state."""
    inside = {id(m) for layer in quant_layers(model) for m in layer.modules()}
    for module in model.modules():
        if id(module) not in inside:
            module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)


def reused_samples(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per layer whose residuals were checked since its last reset (``residual_tolerance`` or 0 bits): ``name ->
    (samples that reused the cached output, samples checked)``, what honest GBops credit for adaptive caching."""
    return {layer.name: (layer.cached_samples, layer.residual_samples) for layer in quant_layers(model)
            if layer.residual_samples}


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    return [m for m in model.modules() if isinstance(m, QuantLayer)]


def reset(model: nn.Module) -> None:
    """Start a new trajectory: clear every layer's MoDiff state. Call once per batch."""
    for layer in quant_layers(model):
        layer.reset_state()


@contextmanager
def trajectory(model: nn.Module) -> Iterator[nn.Module]:
    """``with modiff.trajectory(unet): <run all steps of one batch>`` -- resets on entry."""
    reset(model)
    yield model


def state_bytes(model: nn.Module) -> int:
    """Bytes of per-trajectory state (â, ô or the previous input/output) held right now."""
    return sum(layer.state_bytes() for layer in quant_layers(model))


def calibrate(model: nn.Module, run: Callable[[], object], method: str = "minmax") -> nn.Module:
    """Fit static activation scales: ``run()`` drives full-precision trajectories (resetting
    between batches as usual) while each layer records its inputs (``off``) or its true temporal
    residuals ``a_t - a_{t+1}`` (modulated modes); then min-max or MSE ranges are fitted."""
    check_choice("method", method, ("minmax", "mse"))
    layers = quant_layers(model)
    if not layers:
        raise ValueError("model has no QuantLayer; call modiff.quantize first")
    for layer in layers:
        layer.start_observing()
    try:
        run()
    except BaseException:
        for layer in layers:
            layer._observed = None
        raise
    for layer in layers:
        layer.finish_observing(method)
    return model
