"""``base = "paper-lcq"`` / ``"paper-ltq"``: the MoDiff authors' dynamic settings, the ones behind the paper's
"LCQ" and "LTQ" columns, as their public scripts run them (WeizhiGao/MoDiff ``scripts/sample_diffusion_ddim.py``,
``sample_diffusion_ldm.py``, ``txt2img.py``, ``qdiff/quant_layer.py`` and the README's commands):

- granularity: ``UniformAffineQuantizer(channel_wise=args.act_tensor)`` with ``--quant_mode dynamic``. Without
  ``--act_tensor`` (their default, the paper's LCQ column) one scale for the whole batch tensor; with it (the
  README: "tensor wise activation quantization", the paper's LTQ column) ``channel_wise=True`` reduces over every
  dim but 0: one scale per sample. No per-channel activation scale exists in their code. So ``paper-lcq`` is our
  ``tensor`` granularity and ``paper-ltq`` our ``sample``; the suite's own ``lcq`` (per channel over batch and
  space) and ``ltq`` (per batch tensor) are not the paper's.
- ``symmetric``: ``--a_sym`` in the CIFAR-10 commands (not in the LSUN or Stable Diffusion ones). Their symmetric
  dynamic scale is ``absmax / (2^(b-1) - 1)`` clamped to ``[-2^(b-1), 2^(b-1) - 1]``: the spec's symmetric grid.
- ``split``: ``--split`` (Q-Diffusion's shortcut splitting) in the CIFAR-10 and Stable Diffusion commands, not in
  the LSUN ones: the input ``concat([deep, skip])`` of a decoder shortcut conv gets one scale per part.
- weights: ``--resume --cali_ckpt <dataset>_w4a8_ckpt.pth``, Q-Diffusion-calibrated (AdaRound) weights, even for
  these dynamic rows. ``weights = "qdiff"`` takes them from this suite's own Q-Diffusion calibration (the
  ``[params.qdiff]`` of the matrix, cached like ``qdiff``'s); ``cali_ckpt`` reads the authors' released file for
  the CIFAR-10 DDPM (:func:`load_authors_checkpoint`: the converter :mod:`baselines.qdiffusion.authors_checkpoint`
  with the harness's file reader and DDPM layout); ``weights = "minmax"`` is per-channel min-max rounding, to see
  what the weight source alone changes; with ``split``, each half of a split layer's weight has its own grid (their
  ``weight_quantizer`` and ``weight_quantizer_0``).
- the warm-up: the first step of a trajectory in full precision (their sampler's ``set_full_prec``), as MoDiff.

Not reproduced: their CIFAR-10 sampler resets the MoDiff state at every step, which turns the method off (the
spec forbids it; the paper's numbers, which get worse with fewer bits, did not come from that path).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

import modiff
from baselines.qdiffusion.authors_checkpoint import (
    CheckpointError,
    check_w_bits,
    checkpoint_state_dict,
    dequantize_state_dict,
)
from baselines.qdiffusion.method import QDiffusion, to_modiff
from baselines.qdiffusion.reconstruction import recon_layers, shortcut_splits
from bench.errors import BenchError, readable_file
from bench.methods import BuildContext, CellSpec, DynamicQuantizer, Prepared, register_method
from modiff.config import NOT_QUANTIZED
from modiff.quant import quantize_weight

CHECKPOINT_MODELS = ("ddpm-cifar10",)  # models whose layout the authors' checkpoint converter knows


class AuthorsDynamic(DynamicQuantizer):
    """Common part of ``paper-lcq`` and ``paper-ltq``."""

    @dataclass(frozen=True)
    class Params:
        symmetric: bool = True  # --a_sym (their CIFAR-10 commands; the LSUN and SD ones are asymmetric)
        split: bool = True  # --split (CIFAR-10 and SD; not the LSUN commands)
        weights: Literal["qdiff", "minmax"] = "qdiff"  # Q-Diffusion-calibrated weights (their --cali_ckpt), or min-max
        cali_ckpt: str | None = None  # the authors' calibrated checkpoint (ddpm-cifar10): weights from that file
        warmup: bool = True  # the first step in full precision

        def __post_init__(self) -> None:
            if self.cali_ckpt is not None and not self.cali_ckpt.strip():
                raise ValueError("cali_ckpt must be a path to the authors' calibrated checkpoint, or left unset")

    real_execution: ClassVar[bool] = False  # Q-Diffusion's AdaRound weights are fake-quantized only
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)

    @classmethod
    def version(cls, settings) -> int:
        # 2: min-max weights of split layers on one grid per half (per output channel within each), not per row
        own = (settings.get("params") or {}).get(cls.name) or {}
        minmax_split = (own.get("weights", "qdiff") == "minmax" and own.get("split", True) is True
                        and own.get("cali_ckpt") is None)
        return 2 if minmax_split else super().version(settings)

    def depends_on(self) -> tuple[str, ...]:
        # the weights come from Q-Diffusion's calibration: its parameters are part of every cell's identity
        return ("qdiff",) if self.settings.weights == "qdiff" and self.settings.cali_ckpt is None else ()

    def modiff_options(self) -> dict[str, Any]:
        return {"symmetric": self.settings.symmetric, "warmup": self.settings.warmup}

    def check(self, cell: CellSpec) -> str | None:
        reason = super().check(cell)
        if reason:
            return reason
        if cell.w_bits == NOT_QUANTIZED:
            return (f"{self.name} runs the authors' quantized weights; w_bits=32 (unquantized weights) is the "
                    "'dynamic' base with a_granularity tensor or sample")
        if self.settings.cali_ckpt is not None and cell.model not in CHECKPOINT_MODELS:
            return (f"{self.name} cali_ckpt: the authors' checkpoint converter knows the layout of "
                    f"{', '.join(CHECKPOINT_MODELS)} only, not {cell.model}")
        if self.settings.cali_ckpt is not None:  # a missing file stops the command now, not the cell after sampling
            readable_file(self.settings.cali_ckpt, f"params.{self.name}.cali_ckpt")
        return None

    def build(self, ctx: BuildContext) -> Prepared:
        cell, s = ctx.cell, self.settings
        config = ctx.config
        info: dict[str, Any] = {"weights": "cali_ckpt" if s.cali_ckpt else s.weights}
        if s.cali_ckpt is not None:
            unet, splits = self._from_checkpoint(ctx, config, info)
        elif s.weights == "qdiff":
            qdiff = QDiffusion(cell.params.get("qdiff"))
            qmodel, _, _, _ = qdiff.weight_model(ctx, info, split_shortcut=s.split, quant_attention=False)
            splits = {layer.name: layer.split for layer in recon_layers(qmodel) if layer.split}
            unet = to_modiff(qmodel, cell, config)  # the calibrated weights, the authors' dynamic activation scales
        else:
            splits = self._splits(ctx) if s.split else {}
            unet = modiff.quantize(halves_on_their_grids(ctx.fp_unet_copy(), splits, cell.w_bits, config),
                                   config, weight_quantized=True)
        for layer in modiff.quant_layers(unet):
            layer.set_split(splits.get(layer.name, 0))
        info.update({"quantized_layers": len(modiff.quant_layers(unet)), "split_shortcuts": len(splits)})
        return Prepared(unet=unet, on_trajectory_start=[lambda: modiff.reset(unet)], info=info)

    def _splits(self, ctx: BuildContext) -> dict[str, int]:
        """Split points measured on one forward pass of the full-precision model (unconditional models)."""
        if getattr(ctx.model.unet.config, "cross_attention_dim", None):
            raise BenchError(f"{self.name}: split with weights='minmax' is measured on an unconditional forward "
                             "pass; use weights='qdiff' (its calibration data carries the text conditioning)")
        x = torch.zeros(1, *ctx.model.image_shape, device=ctx.device)
        return shortcut_splits(ctx.model.unet, x, torch.zeros(1, dtype=torch.long, device=ctx.device))

    def _from_checkpoint(self, ctx: BuildContext, config: modiff.ModiffConfig, info: dict):
        original, report = load_authors_checkpoint(self.settings.cali_ckpt, ctx.cell.w_bits)
        unet = ctx.fp_unet_copy()
        try:
            unet.load_state_dict(to_diffusers_weights(original), strict=True)
        except (RuntimeError, KeyError) as exc:
            raise BenchError(f"{self.name}: {self.settings.cali_ckpt} does not fit {ctx.cell.model}: "
                             f"{' '.join(str(exc).split())[:300]}") from None
        info["cali_ckpt_report"] = {k: v for k, v in report.items() if isinstance(v, (int, float, str))}
        unet = modiff.quantize(unet, config, weight_quantized=True)
        splits = self._splits(ctx) if self.settings.split else {}
        return unet, splits


# -- the authors' calibrated checkpoint (CIFAR-10 DDPM): the library's converter, with the harness's reader and zoo --
def _one_line(message: str) -> BenchError:
    return BenchError(" ".join(message.split()))


@contextmanager
def _bench_errors(prefix: str = "") -> Iterator[None]:
    """The converter's errors (``CheckpointError``, a ValueError) as the harness's one-line BenchError."""
    try:
        yield
    except CheckpointError as exc:
        raise _one_line(f"{prefix}{exc}") from None


def dequantize_authors_state_dict(
    state_dict: Mapping[str, torch.Tensor], w_bits: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """An authors' ``QuantModel`` state dict of the DDPM CIFAR-10 -> ``(state dict of the DDIM CIFAR-10 Model,
    report)``: :func:`baselines.qdiffusion.authors_checkpoint.dequantize_state_dict` on the zoo's original DDPM
    layout (:func:`bench.zoo.convert.ddpm.layout`); a problem is a one-line BenchError."""
    from bench.zoo.convert.ddpm import layout

    with _bench_errors():
        return dequantize_state_dict(state_dict, w_bits, layout()[2], "DDPM CIFAR-10")


def load_authors_checkpoint(path: str | Path, w_bits: int) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`dequantize_authors_state_dict` of a ``ckpt.pth`` file, read by the harness's safe reader
    (:func:`bench.zoo.checkpoints.read_torch_file`: ``torch.load(weights_only=True)`` on the CPU): a downloaded
    checkpoint is user data, and unpickling it must never run code from it."""
    from bench.zoo.checkpoints import read_torch_file

    with _bench_errors():
        check_w_bits(w_bits)
    path = Path(path)
    if not path.is_file():
        raise _one_line(f"authors' checkpoint {path} does not exist")
    obj = read_torch_file(path, "authors' checkpoint")
    with _bench_errors():
        state_dict = checkpoint_state_dict(obj, f"authors' checkpoint {path}")
    try:
        return dequantize_authors_state_dict(state_dict, w_bits)
    except BenchError as exc:
        raise _one_line(f"{path}: {exc}") from None


def to_diffusers_weights(original_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under ``UNet2DModel(**DDPM_CIFAR10_32)`` names, so the harness can run the dequantized model;
    the zoo's own mapping (:func:`bench.zoo.convert.ddpm.original_to_diffusers`), which checks every key and shape."""
    from bench.zoo.convert.ddpm import original_to_diffusers

    return original_to_diffusers(original_state_dict)


def halves_on_their_grids(unet: torch.nn.Module, splits: dict[str, int], w_bits: int,
                          config: modiff.ModiffConfig) -> torch.nn.Module:
    """Round every conv / linear weight of ``unet`` to nearest on its per-output-channel grid, as ``QuantLayer``
    would (``config.weight_method``, asymmetric), but a split layer's two halves (input channels ``[:split]`` and
    ``[split:]``) each on its own grid, as the authors' split ``QuantModule`` (``weight_quantizer`` and
    ``weight_quantizer_0``). For ``modiff.quantize(..., weight_quantized=True)``; returns ``unet``."""
    from fnmatch import fnmatchcase

    from modiff.layers import QUANTIZABLE

    with torch.no_grad():
        for name, module in unet.named_modules():
            if not (name and isinstance(module, QUANTIZABLE)) or any(fnmatchcase(name, p) for p in config.skip):
                continue
            w, split = module.weight, splits.get(name, 0)
            parts = [w[:, :split], w[:, split:]] if split else [w]
            module.weight.copy_(torch.cat([quantize_weight(part, w_bits, config.weight_method) for part in parts], 1))
    return unet


# The names the paper's columns gave these settings ("LCQ", "LTQ") say another granularity than the suite's own lcq
# (channel) and ltq (tensor); the aliases say theirs. Cells record the first name, which their ids hash.
@register_method("paper-lcq", aliases=("authors-tensor",))
class PaperLCQ(AuthorsDynamic):
    """The MoDiff authors' "LCQ" (their default, no --act_tensor): one dynamic scale per batch tensor, symmetric, split, Q-Diffusion weights."""  # noqa: E501

    granularity = "tensor"


@register_method("paper-ltq", aliases=("authors-sample",))
class PaperLTQ(AuthorsDynamic):
    """The MoDiff authors' "LTQ" (--act_tensor): one dynamic scale per sample, symmetric, split, Q-Diffusion weights."""  # noqa: E501

    granularity = "sample"
