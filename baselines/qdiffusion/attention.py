"""Quantized attention matmuls (Q-Diffusion): q, k and v at the activation bit width before the
matmuls, the softmax output at ``sm_abit`` (8 by default; 16 in the paper's Stable Diffusion setting).

In a text-conditioned UNet the cross-attention (``attn2`` of each ``BasicTransformerBlock``) gets the
same four quantizers: its key and value quantizers see the projections of the text context
(``encoder_hidden_states``), over both halves of a classifier-free-guidance batch.

diffusers' ``Attention`` delegates its computation to a processor. :class:`QuantAttnProcessor` is
the plain (non-fused) computation with the four quantizers inserted; the quantizers live in an
:class:`AttentionQuantizers` submodule of the ``Attention`` module, so they are part of the model's
``state_dict`` (the processor itself is a plain object: ``Attention.forward`` inspects the
processor's ``__call__`` signature to decide which keyword arguments it accepts).
"""

from __future__ import annotations

import torch
from torch import nn

from .quantizers import ActQuantizer

QUANTIZERS_ATTR = "qdiff_attention_quantizers"


class AttentionQuantizers(nn.Module):
    """q, k, v at ``a_bits`` (symmetric with the authors' ``--a_sym``) and the softmax output at ``sm_bits``
    on the unsigned grid (their ``AttnBlock`` sets ``symmetric=False`` for it; their transformer block keeps
    ``--a_sym`` there with ``always_zero``, which only halves its levels: not reproduced)."""

    def __init__(self, a_bits: int, sm_bits: int, p: float = 2.4, symmetric: bool = False):
        super().__init__()
        self.query = ActQuantizer(a_bits, p, symmetric)
        self.key = ActQuantizer(a_bits, p, symmetric)
        self.value = ActQuantizer(a_bits, p, symmetric)
        self.probs = ActQuantizer(sm_bits, p)


class QuantAttnProcessor:
    """Self- or cross-attention with quantized q, k, v and attention probabilities."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        quant: AttentionQuantizers = getattr(attn, QUANTIZERS_ATTR)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = None
        if hidden_states.ndim == 4:  # (B, C, H, W) -> (B, HW, C)
            image_shape = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, tokens = context.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query = quant.query(attn.head_to_batch_dim(attn.to_q(hidden_states)))
        key = quant.key(attn.head_to_batch_dim(attn.to_k(context)))
        value = quant.value(attn.head_to_batch_dim(attn.to_v(context)))
        probs = quant.probs(attn.get_attention_scores(query, key, attention_mask))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # projection, dropout

        if image_shape is not None:
            hidden_states = hidden_states.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]


def quantize_attention(model: nn.Module, a_bits: int, sm_bits: int, p: float = 2.4, symmetric: bool = False) -> int:
    """Give every diffusers ``Attention`` of ``model`` the quantizers and the processor; returns
    how many there were."""
    modules = attention_modules(model)
    for _, attn in modules:
        attn.add_module(QUANTIZERS_ATTR, AttentionQuantizers(a_bits, sm_bits, p, symmetric))
        attn.set_processor(QuantAttnProcessor())
    return len(modules)


FIXED_SOFTMAX_BITS = 16  # a softmax quantizer at this width keeps its initialised step size


def fixed_step_sizes(module: nn.Module) -> list[ActQuantizer]:
    """The activation quantizers in ``module`` whose step size block reconstruction does not learn: the
    softmax output's at 16 bits (the authors' ``block_recon.py`` adds ``act_quantizer_w.delta`` to the
    optimised parameters only when ``n_bits != 16``; Stable Diffusion's ``sm_abit``). It keeps the range it
    was initialised with; a step of ~1.5e-5 would not survive Adam's first updates at lr 4e-4."""
    return [m.probs for m in module.modules()
            if isinstance(m, AttentionQuantizers) and m.probs.bits == FIXED_SOFTMAX_BITS]
