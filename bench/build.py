"""Resolving a cell against the registry, once, and building its denoiser from the result.

:func:`resolve_cell` turns a cell's settings into a frozen :class:`ResolvedCell`: its normalised record, its
sampler, its methods with their typed parameters and what its base made of the settings (``configure``: the
``modiff.ModiffConfig``), or the reason it cannot run. :func:`build` turns a resolved cell into the model a cell
samples with (its base quantizer, then its cache scheme, in the cell's dtype and memory format): the one way the
runner, the cost estimate, ``benchmarks/`` and the tests build a quantized model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modiff.flow import FLOW_SAMPLER_NAMES, FlowSamplerConfig
from modiff.samplers import SamplerConfig

from .cell import CellSpec
from .context import BuildContext, Prepared
from .registry import BaseQuantizer, CacheMethod, base_quantizer, cache_method

if TYPE_CHECKING:
    from .zoo import ZooModel

TORCH_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class ResolvedCell:
    """A cell resolved once: ``spec`` its normalised settings (what it records and its id hashes) and ``skip``
    why it cannot run, or, for a valid cell, its sampler, its base quantizer and cache scheme (built with their
    typed parameters, ``.settings``) and ``config``, what the base made of the settings (``configure``). ``methods``,
    skipped or not: the methods it runs or carries the parameters of (its base, what that builds on, its cache)."""

    spec: CellSpec
    skip: str | None = None
    sampler: SamplerConfig | FlowSamplerConfig | None = None
    base: BaseQuantizer | None = None
    cache: CacheMethod | None = None
    config: Any = None
    methods: tuple[str, ...] = ()


def sampler_from_name(name: str, steps: int, eta: float = 0.0) -> SamplerConfig | FlowSamplerConfig:
    """The sampler ``name`` of either kind, flow matching's or the DDPM family's (ValueError for a bad setting)."""
    kind = FlowSamplerConfig if name in FLOW_SAMPLER_NAMES else SamplerConfig
    return kind.from_name(name, steps, eta)


def resolve_cell(cell: CellSpec, tables: Mapping[str, Mapping[str, Any]] | None = None) -> ResolvedCell:
    """Resolve ``cell`` (its axis values; ``a_granularity`` may be ``auto``) against the registry. ``tables``:
    the ``[params.<method>]`` tables of its matrix (default: the parameters the cell records, which resolves a
    resolved cell to itself). The cell records the full parameters of the methods it runs or builds on."""
    tables = cell.params if tables is None else tables
    base = base_quantizer(cell.base, tables.get(cell.base))
    cache = cache_method(cell.cache, tables)
    used = [(cell.base, base)] + ([(cache.name, cache)] if cache else [])
    used += [(name, base_quantizer(name, tables.get(name))) for name in base.depends_on()]
    methods = tuple(name for name, _ in used)
    try:  # eta > 0 with a deterministic solver (plms, dpm-solver++) is only wrong in combination
        sampler = sampler_from_name(cell.sampler, cell.steps, float(cell.eta))
    except ValueError as exc:
        return ResolvedCell(cell, skip=str(exc), methods=methods)
    spec = base.normalise(dataclasses.replace(cell, params={name: dict(m.params) for name, m in used if m.params}))
    reason, config = base.check(spec), None
    if reason is None:
        try:
            config = base.configure(spec)
        except (TypeError, ValueError) as exc:  # what only this combination gets wrong (the library's checks)
            reason = f"{base.name}: {exc}"
    if reason is None and cache is not None:
        reason = cache.check(spec)
    if reason is not None:
        return ResolvedCell(spec, skip=reason, methods=methods)
    return ResolvedCell(spec, None, sampler, base, cache, config, methods)


def build(resolved: ResolvedCell, model: ZooModel, device: torch.device, progress: bool = False,
          cache_dir: Path | None = None) -> Prepared:
    """Build a resolved cell's denoiser on ``model`` (full precision, shared: never changed): its base
    quantizer, then its cache scheme."""
    if resolved.skip is not None:
        raise ValueError(f"cannot build a cell that is skipped: {resolved.skip}")
    cell = resolved.spec
    ctx = BuildContext(model, cell, resolved.sampler, device, progress, cache_dir, resolved.config)
    prepared = resolved.base.build(ctx)
    if prepared.make_denoiser is None:
        prepared.make_denoiser = ctx.model.denoiser
    if cell.dtype != "float32" or cell.memory_format != "contiguous":  # before a cache scheme runs the model
        if prepared.unet is ctx.model.unet:
            raise RuntimeError(f"{cell.base}: dtype={cell.dtype}, memory_format={cell.memory_format} needs its own "
                               "copy of the model (the shared model is left as it is)")
        adapt_io(prepared.unet, getattr(torch, cell.dtype), TORCH_MEMORY_FORMATS[cell.memory_format])
    if resolved.cache is not None:
        prepared = resolved.cache.apply(ctx, prepared)
    return prepared


def adapt_io(unet: nn.Module, dtype: torch.dtype, memory_format: torch.memory_format) -> None:
    """Feed a UNet that runs in ``dtype`` and ``memory_format`` from the float32 samplers: its image and
    conditioning inputs are cast to ``dtype`` (never the timestep), a 4-D image input laid out in
    ``memory_format``, and its output cast back to float32."""

    def cast(value: Any) -> Any:
        if isinstance(value, dict):  # SDXL's added_cond_kwargs (pooled text embeddings, time ids)
            return {k: cast(v) for k, v in value.items()}
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            return value
        value = value.to(dtype)
        return value.contiguous(memory_format=memory_format) if value.dim() == 4 else value

    def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = (cast(args[0]), *args[1:]) if args else args
        return args, {k: v if k == "timestep" else cast(v) for k, v in kwargs.items()}

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return output.float()
        if isinstance(output, tuple):
            return tuple(o.float() if isinstance(o, torch.Tensor) else o for o in output)
        if hasattr(output, "sample"):  # diffusers' UNet2DOutput / UNet2DConditionOutput
            output.sample = output.sample.float()
        return output

    unet.register_forward_pre_hook(before, with_kwargs=True)
    unet.register_forward_hook(after, with_kwargs=True)
