"""``base = "torchao-w8a8"`` / ``"torchao-w8"`` / ``"torchao-fp8"`` in matrix files: torchao's post-training
quantization (``baselines.torchao``) as peers of MoDiff, really executed, eager or compiled.

    [matrix]
    base = ["fp", "ltq", "torchao-w8a8", "torchao-w8"]
    [params.torchao-w8a8]
    compile = false          # torch.compile the UNet (inductor; compiled in the untimed warm-up)

What a cell records is what ran (``normalise``), whatever the matrix's axes say:

- ``torchao-w8a8``: W8A8, ``a_granularity = "token"`` (one scale per row of a linear's input), ``execution =
  "int8"`` (integer matmuls); torchao's ``Int8DynamicActivationInt8WeightConfig``;
- ``torchao-w8``: W8A32, ``a_granularity = "none"``, ``execution = "fake"`` (float matmuls on int8-stored weights);
  ``Int8WeightOnlyConfig``;
- ``torchao-fp8``: W8A8, ``a_granularity = "tensor"``, ``execution = "fp8"`` (``torch._scaled_mm``);
  ``Float8DynamicActivationFloat8WeightConfig``.

Every bit width of a base is therefore one cell, as for ``fp``. ``execution`` and ``a_granularity`` at their
defaults (``fake``, ``auto``) take the base's own; any other value is skipped with the reason, as are modulation
(torchao has no MoDiff: the temporal residual needs a modiff-wrapped base) and, without torchao, every cell (the
reason names ``pip install 'modiff-bench[torchao]'``). Only linears are quantized: on a UNet the convolutions stay
in float, and ``info`` says how many of each and which share of the conv/linear MACs torchao runs
(``torchao_quantized_mac_share``; 5.5% on digits). The ``gbops`` columns charge every conv and linear at the
cell's bit widths, so on a UNet they overstate the saving: only that share runs at 8 bits. ``torchao-fp8`` needs
float8 matmuls (CUDA compute capability 8.9+): the runner skips it, with the reason, on a GPU below that (as every
``execution = "fp8"`` cell) and on a CPU (``device_check``); a build called directly there stops with that one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.errors import BenchError
from bench.methods import AUTO, BaseQuantizer, BuildContext, CellSpec, Prepared, register_method
from modiff.config import NOT_QUANTIZED

from . import fp8_unsupported, quantize_linears, unavailable, version


class TorchaoQuantizer(BaseQuantizer):
    """torchao's quantize_ on the UNet's linears (a subclass names the scheme)."""

    scheme: ClassVar[str] = ""
    a_bits: ClassVar[int] = 8
    own_granularity: ClassVar[str] = ""
    own_execution: ClassVar[str] = ""
    real_execution: ClassVar[bool] = True  # the check below decides which execution runs
    dtypes: ClassVar[tuple[str, ...]] = ("float32", "bfloat16", "float16")

    @dataclass(frozen=True)
    class Params:
        # torch.compile the UNet (inductor; compiled in the untimed warm-up), as fp's compile
        compile: bool = False

    def normalise(self, cell: CellSpec) -> CellSpec:
        return dataclasses.replace(
            cell, w_bits=8, a_bits=self.a_bits,
            a_granularity=self.own_granularity if cell.a_granularity == AUTO else cell.a_granularity,
            execution=self.own_execution if cell.execution == "fake" else cell.execution)

    def check(self, cell: CellSpec) -> str | None:
        if cell.modulation != "off":
            return (f"torchao has no MoDiff: modulation={cell.modulation} (the temporal residual) needs a "
                    "modiff-wrapped base (ltq, lcq, psq, dynamic)")
        if cell.execution != self.own_execution:
            return (f"{self.name} runs {self.own_execution_words()}; execution={cell.execution} is not what it runs "
                    "(leave execution at its default)")
        if cell.a_granularity != self.own_granularity:
            return (f"{self.name} quantizes activations {self.own_granularity_words()}; "
                    f"a_granularity={cell.a_granularity} contradicts it (leave it at auto)")
        if cell.dtype not in self.dtypes:
            return f"{self.name} runs in {', '.join(self.dtypes)} only; dtype={cell.dtype} is not implemented for it"
        return unavailable()

    def own_execution_words(self) -> str:
        return {"int8": "int8 matmul kernels", "fp8": "float8 matmul kernels",
                "fake": "its matmuls in float (int8 weights only)"}[self.own_execution]

    def own_granularity_words(self) -> str:
        return {"token": "with one scale per row of each linear's input (per token)",
                "tensor": "with one scale per tensor", "none": "not at all (weight-only)"}[self.own_granularity]

    def device_check(self, cell: CellSpec, device: torch.device) -> str | None:
        """Why ``cell`` cannot run on ``device`` although its settings are valid, or None."""
        return None

    def build(self, ctx: BuildContext) -> Prepared:
        reason = self.device_check(ctx.cell, ctx.device)
        if reason:
            raise BenchError(f"{self.name}: {reason}")
        # nn.Module.to: diffusers' own .to() warns about casting when it has nothing to keep in float32
        unet = nn.Module.to(ctx.fp_unet_copy(), getattr(torch, ctx.cell.dtype))
        summary = quantize_linears(unet, self.scheme)
        info = {"torchao_version": version(), "torchao_config": summary.config,
                "torchao_quantized_linears": len(summary.quantized_linears),
                "torchao_float_linears": len(summary.float_linears), "torchao_float_convs": len(summary.float_convs),
                "torchao_quantized_mac_share": _quantized_mac_share(ctx, set(summary.quantized_linears))}
        if self.settings.compile:
            unet.compile()  # in place: the module keeps its names (traces, MAC counts); compiles on first call
            info["compiled"] = True
        return Prepared(unet=unet, info=info)


def _quantized_mac_share(ctx: BuildContext, quantized: set[str]) -> float | None:
    """The share of one denoiser call's conv/linear MACs (as the harness counts them for ``macs_g``) that run in the
    layers torchao quantized; None where the count fails."""
    from bench.generate import count_model_macs  # the harness's own count, which the gbops columns use

    try:
        report = count_model_macs(ctx.model, ctx.device)
    except Exception:  # an uncountable model must not fail the cell: the share is then unknown
        return None
    layers = [layer for layer in report.layers if layer.kind in ("conv", "linear")]
    total = sum(layer.macs for layer in layers)
    return round(sum(layer.macs for layer in layers if layer.name in quantized) / total, 6) if total else None


@register_method("torchao-w8a8")
class TorchaoW8A8(TorchaoQuantizer):
    """torchao Int8DynamicActivationInt8WeightConfig on every linear (int8 matmuls); convolutions stay float."""

    scheme = "w8a8"
    own_granularity = "token"
    own_execution = "int8"


@register_method("torchao-w8")
class TorchaoW8(TorchaoQuantizer):
    """torchao Int8WeightOnlyConfig on every linear (float matmuls, int8 weights); convolutions stay float."""

    scheme = "w8"
    a_bits = NOT_QUANTIZED
    own_granularity = "none"
    own_execution = "fake"


@register_method("torchao-fp8")
class TorchaoFP8(TorchaoQuantizer):
    """torchao Float8DynamicActivationFloat8WeightConfig on every linear (CUDA capability 8.9+); convolutions stay float."""  # noqa: E501

    scheme = "fp8"
    own_granularity = "tensor"
    own_execution = "fp8"
    dtypes = ("float32", "bfloat16")

    def device_check(self, cell: CellSpec, device: torch.device) -> str | None:
        return fp8_unsupported(device)
