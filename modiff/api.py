"""``quantize(model, config)``: wrap every conv/linear of any ``nn.Module`` in place."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .allocator import tune_allocator
from .config import ModiffConfig, check_choice
from .fusion import fuse_norms
from .layers import QUANTIZABLE, QuantLayer


def quantize(model: nn.Module, config: ModiffConfig, weight_quantized: bool = False,
             new_trajectory: str = "reset") -> nn.Module:
    """Replace every Conv1d/Conv2d/Linear whose qualified name matches no ``config.skip`` pattern
    by a :class:`QuantLayer` (weights fake-quantized once, here; left as they are with
    ``weight_quantized=True``, for weights already on their grid, e.g. a calibrated checkpoint's).
    ``new_trajectory``: what the model does when its timestep goes back up while the layers hold
    state from the previous trajectory (:func:`watch_trajectories`): ``reset`` it, ``raise`` a
    ValueError, or ``ignore`` it (no detection; the caller resets). Returns the same model."""
    if not isinstance(config, ModiffConfig):
        raise TypeError(f"config must be a ModiffConfig, got {type(config).__name__}")
    check_choice("new_trajectory", new_trajectory, NEW_TRAJECTORY)
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
    if config.fuse_norms:
        fuse_norms(model)
    tune_allocator()
    if new_trajectory != "ignore":
        watch_trajectories(model, new_trajectory)
    return model


NEW_TRAJECTORY = ("reset", "raise", "ignore")
TIMESTEP_NAMES = ("timestep", "timesteps", "t")  # keyword names of a denoiser's timestep argument


class TrajectoryWatch:
    """A forward pre-hook on a quantized denoiser: the QuantLayers never see the timestep, so this reads the
    model's ``timestep`` argument (keyword ``timestep`` / ``timesteps`` / ``t``, else the second positional
    argument when it is a number or a tensor of at most one dim; integer or float) and notices a new
    trajectory: the timestep goes up (e.g. 0 or 1 at the end of one ``pipe(...)`` call, 999 at the start of the
    next). Equal timesteps -- Heun's and PNDM's repeated evaluations, CFG halves in one batch -- are the same
    trajectory. On a new trajectory with state left in the layers it resets them (``reset``) or raises
    (``raise``); a model called with no readable timestep is not watched. Reading the value synchronises a
    CUDA stream once per call of the denoiser (one scalar)."""

    def __init__(self, mode: str):
        check_choice("new_trajectory", mode, NEW_TRAJECTORY[:2])
        self.mode = mode
        self.last: float | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = timestep_value(args, kwargs)
        if t is None:
            return
        if self.last is not None and t > self.last:
            stale = [layer for layer in quant_layers(module) if layer.reconstruction is not None]
            if stale and self.mode == "raise":  # (self.last stays: calling again without the reset raises again)
                raise ValueError(f"new trajectory (timestep {t:g} after {self.last:g}) without modiff.reset: "
                                 f"{len(stale)} layers still hold the previous trajectory's state; call "
                                 "modiff.reset(model) or use 'with modiff.trajectory(model):' around each sampling run")
            for layer in stale:
                layer.reset_state()
        self.last = t


def timestep_value(args: tuple, kwargs: dict) -> float | None:
    """The largest timestep of a denoiser call, or None where the call has none a watch can read."""
    value = next((kwargs[k] for k in TIMESTEP_NAMES if k in kwargs), args[1] if len(args) > 1 else None)
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.dim() <= 1 and value.numel() and not value.is_complex():
        return float(value.max())
    return None


def watch_trajectories(model: nn.Module, mode: str = "reset") -> nn.Module:
    """Install (or replace) the :class:`TrajectoryWatch` of ``model`` (``quantize`` does; a model whose
    QuantLayers were made otherwise, e.g. Q-Diffusion's, can call it itself)."""
    check_choice("new_trajectory", mode, NEW_TRAJECTORY)
    for handle_id, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, TrajectoryWatch):
            del model._forward_pre_hooks[handle_id]
            model._forward_pre_hooks_with_kwargs.pop(handle_id, None)
    if mode != "ignore":
        model.register_forward_pre_hook(TrajectoryWatch(mode), with_kwargs=True)
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
