"""The built-in base quantizers: full precision (``fp``) and MoDiff's dynamic quantizers (``dynamic``, ``ltq``,
``lcq``, ``psq``), each a ``modiff.ModiffConfig`` for the cell. The baselines register theirs in their own
``method`` modules; the registry imports these modules on its first lookup (``bench.registry.BUILTIN_MODULES``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

import modiff
from modiff.config import COMPUTE_DTYPES, NOT_QUANTIZED, WEIGHT_METHODS

from .cell import NONE, CellSpec
from .params import Choice
from .registry import BaseQuantizer, BuildContext, Prepared, register_method

DTYPES = COMPUTE_DTYPES


@register_method("fp")
class FullPrecision(BaseQuantizer):
    """The full-precision model: 32-bit weights and activations, nothing wrapped (optionally compiled)."""

    @dataclass(frozen=True)
    class Params:
        # torch.compile the UNet (inductor; compiled in the untimed warm-up): the strongest float baseline
        compile: bool = False

    dtypes: ClassVar[tuple[str, ...]] = DTYPES

    def normalise(self, cell: CellSpec) -> CellSpec:
        return dataclasses.replace(cell, w_bits=NOT_QUANTIZED, a_bits=NOT_QUANTIZED, modulation="off",
                                   a_granularity=NONE)

    def check(self, cell: CellSpec) -> str | None:
        if cell.execution != "fake":
            return f"the fp base quantizes nothing: execution={cell.execution} has nothing to run on low-bit kernels"
        return None

    def build(self, ctx: BuildContext) -> Prepared:
        if ctx.cell.dtype == "float32" and ctx.cell.memory_format == "contiguous" and not self.settings.compile:
            return Prepared(unet=ctx.model.unet)
        # nn.Module.to: diffusers' own .to() warns about casting when it has nothing to keep in float32
        unet = nn.Module.to(ctx.fp_unet_copy(), getattr(torch, ctx.cell.dtype))
        if self.settings.compile:
            unet.compile()  # in place: the module keeps its names (traces, MAC counts); compiles on first call
        return Prepared(unet=unet, info={"compiled": True} if self.settings.compile else {})


@register_method("dynamic")
class DynamicQuantizer(BaseQuantizer):
    """Min-max fake quantization with dynamic activation scales at any a_granularity (auto: channel)."""

    @dataclass(frozen=True)
    class Params:
        symmetric: bool = False  # symmetric (zero-point-free) activation grid
        warmup: bool = True  # the first step of a trajectory in full precision (modulated modes)
        weight_method: Literal["minmax", "mse"] = "minmax"  # modiff.config.WEIGHT_METHODS
        residual_tolerance: float | None = None  # adaptive caching: reuse the output below this residual range
        # symmetric per-output-channel weights; unset: on for int8 / fp8 execution (their kernels need it), off for
        # fake. Set it to true on fake cells to compare them with int8 cells on the same weight grid.
        weight_symmetric: bool | None = None
        compile: bool = False  # fuse the quantizers' elementwise passes with torch.compile (ModiffConfig.compile)
        # the dtype MoDiff keeps â and ô in between steps (ModiffConfig.state_dtype): bfloat16 / float16 halve them
        state_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
        # the SiLU of diffusers' resnet blocks computed by the next conv's quantizing pass (real execution;
        # ModiffConfig.fuse_norms, modiff/fusion.py)
        fuse_norms: bool = False

    real_execution: ClassVar[bool] = True
    dtypes: ClassVar[tuple[str, ...]] = DTYPES

    @classmethod
    def version(cls, settings: Mapping[str, Any]) -> int:
        # 2: sample-channel scales on 2-D inputs (the time-embedding MLP) are per sample, no longer per element
        return 2 if settings.get("a_granularity") == "sample-channel" else 1

    def modiff_options(self) -> dict[str, Any]:
        """Extra ``ModiffConfig`` fields; subclasses override this to vary the quantizer."""
        return dict(self.params)

    def configure(self, cell: CellSpec) -> modiff.ModiffConfig:
        """The cell's ``ModiffConfig``: modiff's own checks decide what is valid (channel scales, > 8 bits, fp8 bit
        widths, a_bits 0 without warm-up); ValueError / TypeError otherwise."""
        options = self.modiff_options()
        if options.get("weight_symmetric", False) is None:
            options["weight_symmetric"] = cell.execution != "fake"
        if cell.execution == "fp8":
            options.update(number_format="fp8", symmetric=True)
        return modiff.ModiffConfig(w_bits=cell.w_bits, a_bits=cell.a_bits, modulation=cell.modulation,
                                   granularity=cell.a_granularity, execution=cell.execution,
                                   compute_dtype=cell.dtype, **options)

    def build(self, ctx: BuildContext) -> Prepared:
        unet = modiff.quantize(ctx.fp_unet_copy(), ctx.config)
        return Prepared(unet=unet, on_trajectory_start=[lambda: modiff.reset(unet)],
                        info={"quantized_layers": len(modiff.quant_layers(unet))})


assert DynamicQuantizer.param_fields()["weight_method"].type == Choice(*WEIGHT_METHODS)


@register_method("ltq")
class LTQ(DynamicQuantizer):
    """Layer(tensor)-wise dynamic activation scales: one per layer input for the whole batch (the paper's "LTQ" rows ran paper-ltq)."""  # noqa: E501

    granularity = "tensor"


@register_method("lcq")
class LCQ(DynamicQuantizer):
    """Channel-wise dynamic activation scales over batch and space (the paper's "LCQ" rows ran paper-lcq)."""

    granularity = "channel"


@register_method("psq")
class PSQ(DynamicQuantizer):
    """Per-sample dynamic activation scales: each image's result is independent of its batch."""

    granularity = "sample"
