"""Quantized checkpoints: a real-execution model (``execution="int8"`` / ``"fp8"``) as one safetensors file.

    modiff.quantize(unet, config)                  # (and modiff.calibrate(...) for static scales)
    modiff.save_quantized(unet, "unet-w8a8.safetensors")
    ...
    unet = modiff.load_quantized(build_float_unet(), "unet-w8a8.safetensors")

The file holds the model's ``state_dict()``: each quantized layer's 8-bit weights ``<layer>.w_q`` (int8; fp8: the
uint8 bit pattern of its e4m3 values) and per-output-channel scales ``<layer>.w_scale``, its bias, its static
activation scales where calibrated, and the rest of the model (norms, embeddings, layers left in float) as it is.
Its metadata (key ``modiff``, a JSON string) holds the ``ModiffConfig`` and the quantized layers' names. Nothing
else is stored: oneDNN's prepacked weights and the correction maps are rebuilt on first use, and MoDiff's
per-trajectory state starts empty. Only safetensors reads the file, so loading one never unpickles anything.

Fake-quantized models are refused: their weights are float tensors on the grid, and ``torch.save(model.state_dict())``
or safetensors' own ``save_file`` keep them as well as anything here would.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .allocator import tune_allocator
from .api import NEW_TRAJECTORY, cast_outside_quant_layers, quant_layers, watch_trajectories
from .config import ModiffConfig, check_choice
from .fusion import fuse_norms
from .layers import QUANTIZABLE, QuantLayer

METADATA_KEY = "modiff"
FORMAT = 1  # the layout above; a file of another format is refused
_STATIC = ("static_scale", "static_zero_point")


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (quantized by :func:`modiff.quantize` with ``execution`` ``int8`` or ``fp8``) to ``path``,
    one safetensors file; returns the path. The file is written next to ``path`` and renamed over it."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}
    if not layers:
        raise ValueError("model has no QuantLayer: call modiff.quantize first")
    configs = {layer.config for layer in layers.values()}
    if len(configs) > 1:
        raise ValueError(f"the model's QuantLayers have {len(configs)} different configs; save_quantized writes "
                         "models quantized with one ModiffConfig")
    config = configs.pop()
    if config.execution == "fake":
        raise ValueError("save_quantized writes real-execution models (execution 'int8' or 'fp8'); a fake-quantized "
                         "model keeps float weights: save its state_dict")
    dtypes = {layer.weight_template.dtype for layer in layers.values()}
    if len(dtypes) > 1:
        raise ValueError(f"the model's QuantLayers compute in {len(dtypes)} dtypes "
                         f"({', '.join(sorted(map(str, dtypes)))}); save_quantized writes models whose quantized "
                         "layers share one")
    tensors, storages = {}, set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:  # tied weights (one tensor under two names): safetensors stores each once
            tensor = tensor.clone()
        storages.add(storage)
        tensors[key] = tensor
    info = {"format": FORMAT, "config": dataclasses.asdict(config), "layers": list(layers),
            "weight_dtype": str(dtypes.pop()).removeprefix("torch.")}
    metadata = {METADATA_KEY: json.dumps(info)}
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)
    return path


def load_quantized(model: nn.Module, path: str | os.PathLike, config: ModiffConfig | None = None,
                   new_trajectory: str = "reset") -> nn.Module:
    """Quantize ``model`` -- a freshly built float model of the saved one's architecture, dtype and device (its
    weights' values are never read) -- from a file written by :func:`save_quantized`: the layers the file lists are
    wrapped as :func:`modiff.quantize` wraps them, with the file's config and 8-bit weights (no weight grid is
    computed), then every tensor is loaded strictly. ``config``: the config the file must have been written with.
    ``new_trajectory`` as in :func:`modiff.quantize`. Returns the same model. A file that is not such a checkpoint,
    or does not match ``model`` (keys, shapes, dtypes), is a one-line ValueError, raised before the model is
    changed."""
    check_choice("new_trajectory", new_trajectory, NEW_TRAJECTORY)
    where = str(path)
    saved, names, weight_dtype = _read_metadata(where)
    if config is not None and config != saved:
        differ = [f"{f.name}={getattr(saved, f.name)!r} (expected {getattr(config, f.name)!r})"
                  for f in dataclasses.fields(ModiffConfig) if getattr(saved, f.name) != getattr(config, f.name)]
        raise ValueError(f"{where} was written with another config: {', '.join(differ)}")
    if quant_layers(model):
        raise ValueError("model is already quantized; load_quantized takes a freshly built float model")
    modules = dict(model.named_modules())
    not_layers = [n for n in names if not isinstance(modules.get(n), QUANTIZABLE)]
    if not_layers:
        raise ValueError(f"{where} does not match the model: {len(not_layers)} of its quantized layers are not a "
                         f"Conv1d/Conv2d/Linear of this model: {_few(not_layers)}")
    dtypes = [f"{n} {modules[n].weight.dtype} (expected {weight_dtype})" for n in names
              if modules[n].weight.dtype != weight_dtype]
    if dtypes:
        raise ValueError(f"{where} does not match the model: {len(dtypes)} layers' weight dtype mismatches (build the "
                         f"model in the saved one's dtype): {_few(dtypes)}")
    try:
        tensors = load_file(where)
    except SafetensorError as exc:
        raise ValueError(f"{where} is not a readable safetensors file: {_line(exc)}") from None
    problems = _problems(tensors, _expected(model, modules, names, saved))
    if problems:
        raise ValueError(f"{where} does not match the model: {problems}")

    for name in names:
        module = modules[name]
        device = module.weight.device
        int_weights = (tensors[f"{name}.w_q"].to(device), tensors[f"{name}.w_scale"].to(device))
        layer = QuantLayer(module, saved, name, int_weights=int_weights)
        if f"{name}.static_scale" in tensors:  # calibrated: the buffers exist before load_state_dict fills them
            layer.static_scale, layer.static_zero_point = (tensors[f"{name}.{key}"].to(device) for key in _STATIC)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer)
    if saved.compute_dtype != "float32":
        cast_outside_quant_layers(model, getattr(torch, saved.compute_dtype))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:  # not expected: _expected predicted the keys, shapes and dtypes
        raise ValueError(f"{where} does not load into the model: {_line(exc)}") from None
    if saved.fuse_norms:
        fuse_norms(model)
    if new_trajectory != "ignore":
        watch_trajectories(model, new_trajectory)
    tune_allocator()  # as modiff.quantize does
    return model


def _read_metadata(where: str) -> tuple[ModiffConfig, list[str], torch.dtype]:
    try:
        with safe_open(where, framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as exc:
        raise ValueError(f"{where} is not a safetensors file: {_line(exc)}") from None
    if METADATA_KEY not in metadata:
        raise ValueError(f"{where} is a safetensors file but not a modiff.save_quantized checkpoint "
                         f"(no {METADATA_KEY!r} metadata)")
    try:
        info = json.loads(metadata[METADATA_KEY])
        if info.get("format") != FORMAT:
            raise ValueError(f"format {info.get('format')!r}, this version reads format {FORMAT}")
        fields = dict(info["config"])
        fields["skip"] = tuple(fields.get("skip", ()))
        config = ModiffConfig(**fields)
        names = info["layers"]
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError("no list of quantized layer names")
        weight_dtype = getattr(torch, info["weight_dtype"])
        if not isinstance(weight_dtype, torch.dtype) or not weight_dtype.is_floating_point:
            raise ValueError(f"weight_dtype {info['weight_dtype']!r} is not a float dtype")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{where}: unreadable {METADATA_KEY!r} metadata: {_line(exc)}") from None
    if config.execution == "fake":
        raise ValueError(f"{where}: its config has execution 'fake'; save_quantized writes int8 / fp8 models only")
    return config, names, weight_dtype


def _expected(model: nn.Module, modules: dict[str, nn.Module], names: list[str],
              config: ModiffConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype] | None]:
    """Key -> (shape, dtype) of the model's state_dict once quantized (None: any shape, float32: static scales)."""
    compute = getattr(torch, config.compute_dtype)
    storage = torch.uint8 if config.execution == "fp8" else torch.int8
    inside = set()
    expected: dict[str, tuple[tuple[int, ...], torch.dtype] | None] = {}
    for name in names:
        own = modules[name].state_dict()
        inside.update(f"{name}.{key}" for key in own)
        weight = own["weight"]
        expected[f"{name}.w_q"] = (tuple(weight.shape), storage)
        expected[f"{name}.w_scale"] = ((weight.shape[0],), torch.float32)
        expected.update({f"{name}.layer.{key}": (tuple(t.shape), t.dtype) for key, t in own.items() if key != "weight"})
        if config.act_scale == "static":
            expected.update({f"{name}.{key}": None for key in _STATIC})
    for key, t in model.state_dict().items():
        if key not in inside:
            cast = compute if config.compute_dtype != "float32" and t.is_floating_point() else t.dtype
            expected[key] = (tuple(t.shape), cast)
    return expected


def _problems(tensors: dict[str, torch.Tensor], expected: dict) -> str | None:
    optional = {k for k, v in expected.items() if v is None}
    missing = [k for k in expected if k not in tensors and k not in optional]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k} {tuple(t.shape)} (expected {expected[k][0]})" for k, t in tensors.items()
              if expected.get(k) is not None and tuple(t.shape) != expected[k][0]]
    dtypes = [f"{k} {t.dtype} (expected {expected[k][1]})" for k, t in tensors.items()
              if expected.get(k) is not None and tuple(t.shape) == expected[k][0] and t.dtype != expected[k][1]]
    static = [k for k in optional if k in tensors and (tensors[k].dtype != torch.float32 or any(
        k.rpartition(".")[0] + "." + other not in tensors for other in _STATIC))]
    problems = [f"{len(keys)} {label}: {_few(keys)}" for label, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes),
        ("dtype mismatches (build the model in the saved one's dtype)", dtypes),
        ("static scales without their pair or not float32", sorted(static))) if keys]
    return "; ".join(problems) or None


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
