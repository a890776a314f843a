"""A resnet block's SiLU in its convs' quantizing pass: ``ModiffConfig(fuse_norms=True)``.

A resnet block computes ``conv1(silu(norm1(x)))`` and ``conv2(silu(norm2(h + temb)))``. Unfused, the SiLU reads
and writes the whole activation once more before the quantized conv's own pass reads it again (for the residual,
its scale, ``u`` and the ``â`` update). Fused, the block hands the conv ``x`` and a :class:`NormSiLU`: the layer
runs the norm (the block's own GroupNorm module) and its quantizing pass computes the SiLU, so ``silu(norm(x))``
is never written (one pass with ``compile=True``; eagerly the same ops one after the other).

Why the GroupNorm stays ATen's: compiled into the pass by inductor (torch 2.14.1, channels-last, on the 2-core
AMD EPYC of docs/performance.md), GroupNorm + SiLU + the quantizing pass took 11.5-14.0 ms for a (32, 128, 32, 32)
input with dynamic shapes (6.6-9.0 ms static) against 3.7-6.1 ms for ATen's GroupNorm and SiLU followed by the
compiled pass and 4.0-6.1 ms with only the SiLU in the pass (three runs of ``benchmarks/kernel_ceiling.py``); the
norm's statistics by a compiled ``var_mean`` and its normalisation inside the pass took 19 ms in a one-off test. The
SiLU's fusion itself gains little there: the fused pass computes the sigmoid twice (for the scale and for ``u``),
which costs what the SiLU's own pass did.

Which blocks: diffusers' ``ResnetBlock2D`` with an ``nn.SiLU`` nonlinearity, the ``default`` time-embedding
norm, no up- or downsampling inside the block and quantized ``conv1`` / ``conv2`` (every resnet of the DDPM
CIFAR-10 / LSUN UNets and the Stable Diffusion UNets' resnets). Their ``forward`` is replaced by
:func:`resnet_forward`, which computes what diffusers' does, op for op. The layer applies the whole prologue
first, as the block did, wherever it cannot fuse: the fake path, calibration, the full-precision warm-up step,
0-bit residuals and ``residual_tolerance``, ``plain`` modulation; and the block does so for a layer with hooks
(which see the input they see unfused). The outputs are bit-equal to the unfused model's eagerly, and were
compiled here too (``tests/test_modiff_fusion.py``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import QuantLayer


@dataclass(frozen=True)
class NormSiLU:
    """``silu(norm(x + add))`` (``add``: a tensor added before the norm, e.g. a resnet block's projected time
    embedding, or None), handed to a :class:`~modiff.layers.QuantLayer` with its input ``x``."""

    norm: nn.Module
    add: torch.Tensor | None = None

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        """``norm(x + add)``, through the norm module as the block calls it (its hooks run)."""
        return self.norm(x if self.add is None else x + self.add)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The whole prologue, as the unfused block computes it."""
        return F.silu(self.normed(x))


def _resnet_class() -> type | None:
    """diffusers' ResnetBlock2D when diffusers is imported (a model of it exists only then), else None."""
    module = sys.modules.get("diffusers.models.resnet")
    return getattr(module, "ResnetBlock2D", None)


def fusable_block(block: nn.Module) -> bool:
    """Whether ``block`` is a ResnetBlock2D whose norms :func:`resnet_forward` can move into its convs."""
    cls = _resnet_class()
    return (cls is not None and type(block) is cls and type(block.norm1) is nn.GroupNorm
            and type(block.norm2) is nn.GroupNorm and type(block.nonlinearity) is nn.SiLU
            and block.upsample is None and block.downsample is None and block.time_embedding_norm == "default"
            and isinstance(block.conv1, QuantLayer) and isinstance(block.conv2, QuantLayer))


def fuse_norms(model: nn.Module) -> int:
    """Replace the ``forward`` of every fusable block of ``model`` (in place) by :func:`resnet_forward`; returns how
    many blocks are fused (already fused ones included). Blocks of other kinds keep their own forward."""
    count = 0
    for module in model.modules():
        if is_fused(module):
            count += 1
        elif fusable_block(module):
            module.forward = FusedForward(module)
            count += 1
    return count


def is_fused(block: nn.Module) -> bool:
    """Whether :func:`fuse_norms` replaced ``block``'s forward."""
    return isinstance(block.__dict__.get("forward"), FusedForward)


class FusedForward:
    """The ``forward`` :func:`fuse_norms` gives a block: :func:`resnet_forward` on it (an object rather than a bound
    method of a function the block's class lacks, so that a fused model pickles and copies; a copy's forward runs
    the copy)."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return resnet_forward(self.block, *args, **kwargs)


def resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
    """diffusers' ``ResnetBlock2D.forward`` for the blocks :func:`fusable_block` accepts, with ``norm1`` + SiLU and
    ``+ temb``, ``norm2`` + SiLU handed to ``conv1`` and ``conv2``. Training with dropout runs diffusers' own."""
    if (self.training and self.dropout.p > 0) or args or kwargs.get("scale") is not None:
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    hidden_states = _conv(self.conv1, input_tensor, NormSiLU(self.norm1))
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    hidden_states = _conv(self.conv2, hidden_states, NormSiLU(self.norm2, add=temb))  # dropout: identity here
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    output_tensor = input_tensor + hidden_states
    # x / 1.0 is x exactly: the DDPM and SD blocks' factor, whose division is a pass over the output for nothing
    return output_tensor if self.output_scale_factor == 1 else output_tensor.div_(self.output_scale_factor)


def _conv(layer: nn.Module, x: torch.Tensor, prologue: NormSiLU) -> torch.Tensor:
    """``layer(prologue(x))``: the prologue handed to the layer, or applied first where a hook on the layer (or a
    global module hook) would otherwise see ``x`` instead of the input it has unfused."""
    hooked = (layer._forward_hooks or layer._forward_pre_hooks or nn.modules.module._global_forward_hooks
              or nn.modules.module._global_forward_pre_hooks)
    return layer(prologue(x)) if hooked else layer(x, prologue=prologue)
