"""The CompVis latent-diffusion checkpoint layout <-> diffusers modules.

What is converted: a LatentDiffusion ``model.ckpt`` (PyTorch Lightning) holds the denoiser under
``model.diffusion_model.`` (``ldm/modules/diffusionmodules/openaimodel.py``, ``UNetModel``) and the first stage under
``first_stage_model.`` (``ldm/modules/diffusionmodules/model.py``'s Encoder / Decoder in ``ldm/models/autoencoder.py``'s
``AutoencoderKL`` or ``VQModelInterface``), beside schedule buffers and EMA shadows. :func:`read_lightning_state_dict`
reads its state dict without running any pickled code, :func:`split_compvis_state_dict` separates the parts, and
:func:`original_to_diffusers` / :func:`diffusers_to_original` move one part's tensors to and from a diffusers
``UNet2DModel`` / ``AutoencoderKL`` / ``VQModel`` described by a :class:`UNetLayout` or :class:`AutoencoderLayout`
(the zoo entries in ``bench.zoo.ldm`` declare which).

How openaimodel maps onto ``UNet2DModel``:
- timestep embedding ``[cos, sin]`` with frequencies ``exp(-ln(1e4) i / half)``: ``flip_sin_to_cos=True``,
  ``freq_shift=0``; ``time_embed`` is ``model_channels -> 4 model_channels -> 4 model_channels``;
- ``GroupNorm32(32, C)`` (eps 1e-5) everywhere: ``norm_num_groups=32``, ``norm_eps=1e-5``, and
  ``attn_norm_num_groups=32`` (with ``scale_shift`` diffusers would otherwise drop the mid attention's norm);
- ``use_scale_shift_norm``: ``resnet_time_scale_shift="scale_shift"``; ``resblock_updown``: resampling by
  ResBlocks (``downsample_type``/``upsample_type="resnet"``, ``ResnetUpsampleBlock2D`` where the up level has no
  attention); otherwise a 3x3 stride-2 conv with padding 1 (``downsample_padding=1``) and nearest x2 + 3x3 conv;
- ``attention_resolutions`` (downsampling factors) pick the ``Attn*Block2D`` levels; the mid block always has
  attention. With ``use_new_attention_order=False`` (both published LSUN configs) the checkpoints use
  ``QKVAttentionLegacy``: the fused 1x1-conv ``qkv`` output (3C channels) is split into heads FIRST, each head
  holding its own ``[q | k | v]`` rows; the converters split and re-fuse the rows in that order.

``UNet2DModel`` has one ``attention_head_dim`` for all blocks, while openaimodel may use a fixed ``num_heads`` at every
width: :func:`set_openaimodel_heads` gives a built UNet's attention modules openaimodel's head counts (weights do not
depend on the head count, the attention does).
"""

from __future__ import annotations

import copy
import pickle
import threading
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from ...errors import BenchError
from ..checkpoints import first_line

UNET_PREFIX = "model.diffusion_model."  # LatentDiffusion.model (DiffusionWrapper).diffusion_model
AUTOENCODER_PREFIX = "first_stage_model."
# DDPM.register_schedule buffers (float32 copies of the schedule; checked against ours, then dropped)
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
# LitEma's shadow weights: LDM's sampling script (scripts/sample_diffusion.py, also used by Q-Diffusion) samples
# with model.diffusion_model.*, so the shadow copy is not used. A first stage's training loss (LPIPS and
# discriminator; the configs give it as torch.nn.Identity) plays no part in decoding; 'logvar' and
# 'lvlb_weights' only weight the diffusion training loss.
IGNORED_PREFIXES = ("model_ema.", AUTOENCODER_PREFIX + "loss.")
IGNORED_KEYS = ("logvar", "lvlb_weights")


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so the rules of a layout are cached
class UNetLayout:
    """An openaimodel ``UNetModel`` (its yaml ``params``) as a diffusers ``UNet2DModel`` (constructor keywords)."""

    name: str  # for messages, e.g. "church-unet"
    yaml: Mapping  # openaimodel.UNetModel parameters (num_heads, num_head_channels, use_new_attention_order, ...)
    config: Mapping  # UNet2DModel keyword arguments of the same network

    def heads(self, channels: int) -> int:
        """openaimodel's head count at a width: ``num_heads``, or ``channels // num_head_channels``."""
        per_head = self.yaml.get("num_head_channels", -1)
        return self.yaml["num_heads"] if per_head == -1 else channels // per_head

    @property
    def new_attention_order(self) -> bool:
        return self.yaml.get("use_new_attention_order", False)

    @property
    def cls_name(self) -> str:
        return "UNet2DModel"


@dataclass(frozen=True, eq=False)
class AutoencoderLayout:
    """A first stage (``model.py`` Encoder / Decoder, attention-free levels) as a diffusers autoencoder."""

    name: str  # for messages, e.g. "church-autoencoder"
    cls_name: str  # "AutoencoderKL" | "VQModel"
    config: Mapping  # its keyword arguments


Layout = UNetLayout | AutoencoderLayout


def diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)


# ---- state-dict conversion (CompVis layout <-> diffusers layout) ----

@dataclass(frozen=True)
class _Rule:
    """One original tensor <-> one diffusers tensor (or three, for a fused qkv)."""

    original: str
    diffusers: tuple[str, ...]
    trailing: int = 0  # singleton kernel dims the original carries (1x1 conv1d: 1, 1x1 conv2d: 2) over a Linear
    heads: int = 0  # > 0: a fused qkv split into to_q / to_k / to_v
    legacy: bool = True  # qkv row order: heads outermost (QKVAttentionLegacy) or q/k/v outermost (QKVAttention)


@cache
def _diffusers_shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the diffusers model, from an allocation-free (meta) instance."""
    with torch.device("meta"):
        model = diffusers_class(layout.cls_name)(**copy.deepcopy(dict(layout.config)))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _plain(original: str, target: str) -> Iterator[_Rule]:
    for suffix in ("weight", "bias"):
        yield _Rule(f"{original}.{suffix}", (f"{target}.{suffix}",))


def _resblock(original: str, target: str, shapes: Mapping) -> Iterator[_Rule]:
    """openaimodel ResBlock -> ResnetBlock2D (in_layers = norm, SiLU, conv; out_layers = norm, SiLU, dropout, conv)."""
    pairs = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
             ("out_layers.0", "norm2"), ("out_layers.3", "conv2")]
    if f"{target}.conv_shortcut.weight" in shapes:  # both sides have it exactly when the width changes
        pairs.append(("skip_connection", "conv_shortcut"))
    for old, new in pairs:
        yield from _plain(f"{original}.{old}", f"{target}.{new}")


def _attention(original: str, target: str, heads: int, legacy: bool) -> Iterator[_Rule]:
    """openaimodel AttentionBlock (norm, 1x1 conv1d qkv, 1x1 conv1d proj_out) -> diffusers Attention."""
    yield from _plain(f"{original}.norm", f"{target}.group_norm")
    qkv = tuple(f"{target}.to_{x}" for x in "qkv")
    yield _Rule(f"{original}.qkv.weight", tuple(f"{t}.weight" for t in qkv), trailing=1, heads=heads, legacy=legacy)
    yield _Rule(f"{original}.qkv.bias", tuple(f"{t}.bias" for t in qkv), heads=heads, legacy=legacy)
    yield _Rule(f"{original}.proj_out.weight", (f"{target}.to_out.0.weight",), trailing=1)
    yield _Rule(f"{original}.proj_out.bias", (f"{target}.to_out.0.bias",))


def _resamples_by_resblock(block_type: str, configured: str, kind: str) -> bool:
    """Whether a diffusers block resamples with a ResnetBlock2D (openaimodel's resblock_updown)."""
    if block_type in ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"):
        return True
    return block_type == f"Attn{kind}Block2D" and configured == "resnet"


def _unet_rules(layout: UNetLayout, shapes: Mapping) -> Iterator[_Rule]:
    cfg = layout.config
    per_level = cfg["layers_per_block"]
    levels = len(cfg["block_out_channels"])
    legacy = not layout.new_attention_order

    def attention(original: str, target: str) -> Iterator[_Rule]:
        channels = shapes[f"{target}.group_norm.weight"][0]
        yield from _attention(original, target, layout.heads(channels), legacy)

    yield from _plain("time_embed.0", "time_embedding.linear_1")
    yield from _plain("time_embed.2", "time_embedding.linear_2")
    yield from _plain("input_blocks.0.0", "conv_in")
    # input_blocks: [conv_in] + per level: per_level x (ResBlock[, AttentionBlock]) + a downsampler (not the last)
    index = 1
    for level, block_type in enumerate(cfg["down_block_types"]):
        for layer in range(per_level):
            yield from _resblock(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{layer}", shapes)
            if "Attn" in block_type:
                yield from attention(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{layer}")
            index += 1
        if level != levels - 1:
            target = f"down_blocks.{level}.downsamplers.0"
            if _resamples_by_resblock(block_type, cfg["downsample_type"], "Down"):
                yield from _resblock(f"input_blocks.{index}.0", target, shapes)
            else:
                yield from _plain(f"input_blocks.{index}.0.op", f"{target}.conv")
            index += 1
    yield from _resblock("middle_block.0", "mid_block.resnets.0", shapes)
    yield from attention("middle_block.1", "mid_block.attentions.0")
    yield from _resblock("middle_block.2", "mid_block.resnets.1", shapes)
    # output_blocks: per level (deepest first): per_level + 1 x (ResBlock[, AttentionBlock][, upsampler])
    index = 0
    for level, block_type in enumerate(cfg["up_block_types"]):
        for layer in range(per_level + 1):
            yield from _resblock(f"output_blocks.{index}.0", f"up_blocks.{level}.resnets.{layer}", shapes)
            sub = 1
            if "Attn" in block_type:
                yield from attention(f"output_blocks.{index}.1", f"up_blocks.{level}.attentions.{layer}")
                sub = 2
            if level != levels - 1 and layer == per_level:
                target = f"up_blocks.{level}.upsamplers.0"
                if _resamples_by_resblock(block_type, cfg["upsample_type"], "Up"):
                    yield from _resblock(f"output_blocks.{index}.{sub}", target, shapes)
                else:
                    yield from _plain(f"output_blocks.{index}.{sub}.conv", f"{target}.conv")
            index += 1
    yield from _plain("out.0", "conv_norm_out")
    yield from _plain("out.2", "conv_out")


def _vae_resnet(original: str, target: str, shapes: Mapping) -> Iterator[_Rule]:
    """model.py ResnetBlock (norm1, conv1, norm2, conv2[, nin_shortcut]) -> ResnetBlock2D without time input."""
    pairs = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2")]
    if f"{target}.conv_shortcut.weight" in shapes:
        pairs.append(("nin_shortcut", "conv_shortcut"))
    for old, new in pairs:
        yield from _plain(f"{original}.{old}", f"{target}.{new}")


def _vae_attention(original: str, target: str) -> Iterator[_Rule]:
    """model.py AttnBlock (norm, 1x1 conv2d q, k, v, proj_out; one head) -> diffusers Attention."""
    yield from _plain(f"{original}.norm", f"{target}.group_norm")
    for old, new in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        yield _Rule(f"{original}.{old}.weight", (f"{target}.{new}.weight",), trailing=2)
        yield _Rule(f"{original}.{old}.bias", (f"{target}.{new}.bias",))


def _vae_mid(side: str, shapes: Mapping) -> Iterator[_Rule]:
    yield from _vae_resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", shapes)
    yield from _vae_attention(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0")
    yield from _vae_resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", shapes)


def _autoencoder_rules(layout: AutoencoderLayout, shapes: Mapping) -> Iterator[_Rule]:
    cfg = layout.config
    levels = len(cfg["block_out_channels"])
    per_level = cfg["layers_per_block"]
    if any(t != "DownEncoderBlock2D" for t in cfg["down_block_types"]) or any(
            t != "UpDecoderBlock2D" for t in cfg["up_block_types"]):
        raise AssertionError("only attention-free encoder/decoder levels are mapped (attn_resolutions: [])")
    yield from _plain("encoder.conv_in", "encoder.conv_in")
    for level in range(levels):
        for layer in range(per_level):
            yield from _vae_resnet(f"encoder.down.{level}.block.{layer}",
                                   f"encoder.down_blocks.{level}.resnets.{layer}", shapes)
        if level != levels - 1:  # stride-2 conv after asymmetric (0, 1, 0, 1) padding on both sides
            yield from _plain(f"encoder.down.{level}.downsample.conv",
                              f"encoder.down_blocks.{level}.downsamplers.0.conv")
    yield from _vae_mid("encoder", shapes)
    yield from _plain("encoder.norm_out", "encoder.conv_norm_out")
    yield from _plain("encoder.conv_out", "encoder.conv_out")
    yield from _plain("decoder.conv_in", "decoder.conv_in")
    yield from _vae_mid("decoder", shapes)
    for block in range(levels):  # diffusers counts up blocks from the lowest resolution, model.py from the highest
        level = levels - 1 - block
        for layer in range(per_level + 1):
            yield from _vae_resnet(f"decoder.up.{level}.block.{layer}", f"decoder.up_blocks.{block}.resnets.{layer}",
                                   shapes)
        if level != 0:
            yield from _plain(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{block}.upsamplers.0.conv")
    yield from _plain("decoder.norm_out", "decoder.conv_norm_out")
    yield from _plain("decoder.conv_out", "decoder.conv_out")
    yield from _plain("quant_conv", "quant_conv")
    yield from _plain("post_quant_conv", "post_quant_conv")
    if layout.cls_name == "VQModel":  # taming's VectorQuantizer2 codebook (no remap buffer)
        yield _Rule("quantize.embedding.weight", ("quantize.embedding.weight",))


@cache
def _rules(layout: Layout) -> tuple[tuple[_Rule, ...], dict[str, tuple[int, ...]]]:
    """The conversion rules of a part and the original tensor shapes they imply."""
    shapes = _diffusers_shapes(layout)
    unet = isinstance(layout, UNetLayout)
    rules = tuple(_unet_rules(layout, shapes) if unet else _autoencoder_rules(layout, shapes))
    covered = [k for rule in rules for k in rule.diffusers]
    if sorted(covered) != sorted(shapes):  # a bug in the rules, not a user error
        raise AssertionError(f"{layout.name}: rules cover {len(covered)} of {len(shapes)} diffusers tensors")
    original = {}
    for rule in rules:
        shape = shapes[rule.diffusers[0]]
        if rule.heads:
            shape = (3 * shape[0], *shape[1:])
        original[rule.original] = shape + (1,) * rule.trailing
    return rules, original


def _few(items: list[str], n: int = 3) -> str:
    if not items:
        return "none"
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _check_tensors(state_dict: Mapping[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    missing = [k for k in expected if k not in state_dict]
    unknown = [k for k in state_dict if k not in expected]
    if missing or unknown:
        raise BenchError(f"{what} does not match the architecture: missing {_few(missing)}; "
                         f"unexpected {_few(unknown)}")
    bad = [f"{k} {tuple(state_dict[k].shape)} (expected {want})" for k, want in expected.items()
           if tuple(state_dict[k].shape) != want]
    if bad:
        raise BenchError(f"{what} has tensors of the wrong shape: {_few(bad)}")


def _split_qkv(fused: torch.Tensor, heads: int, legacy: bool) -> tuple[torch.Tensor, ...]:
    """(3C, ...) rows -> q, k, v rows of (C, ...); legacy rows are [head][q|k|v][channel in head]."""
    width = fused.shape[0] // 3
    rest = fused.shape[1:]
    if legacy:
        parts = fused.reshape(heads, 3, width // heads, *rest).unbind(1)
    else:
        parts = fused.reshape(3, width, *rest).unbind(0)
    return tuple(p.reshape(width, *rest).contiguous() for p in parts)


def _join_qkv(parts: tuple[torch.Tensor, ...], heads: int, legacy: bool) -> torch.Tensor:
    width = parts[0].shape[0]
    rest = parts[0].shape[1:]
    if legacy:
        return torch.stack([p.reshape(heads, width // heads, *rest) for p in parts], dim=1).reshape(3 * width, *rest)
    return torch.cat(parts, dim=0)


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """A CompVis part's state dict (prefix removed: ``input_blocks.0.0.weight``, ``encoder.conv_in.weight``)
    -> the state dict of the diffusers model ``layout`` describes. Tensors are moved, never rounded."""
    rules, original = _rules(layout)
    _check_tensors(state_dict, original, f"CompVis {layout.name} state dict")
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensor = state_dict[rule.original]
        if rule.trailing:
            tensor = tensor.reshape(tensor.shape[: tensor.dim() - rule.trailing])
        if rule.heads:
            out.update(zip(rule.diffusers, _split_qkv(tensor, rule.heads, rule.legacy), strict=True))
        else:
            out[rule.diffusers[0]] = tensor
    return out


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """The inverse of :func:`original_to_diffusers` (CompVis key names and tensor shapes, prefix not added)."""
    rules, _ = _rules(layout)
    _check_tensors(state_dict, _diffusers_shapes(layout), f"diffusers {layout.name} state dict")
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        if rule.heads:
            tensor = _join_qkv(tuple(state_dict[k] for k in rule.diffusers), rule.heads, rule.legacy)
        else:
            tensor = state_dict[rule.diffusers[0]]
        out[rule.original] = tensor.reshape(*tensor.shape, *(1,) * rule.trailing) if rule.trailing else tensor
    return out


def split_compvis_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """A LatentDiffusion state dict -> (UNet part, autoencoder part, the other entries kept for checks)."""
    unet, autoencoder, other, unknown = {}, {}, {}, []
    for key, value in state_dict.items():
        if key in SCHEDULE_BUFFERS or key in IGNORED_KEYS or key == "scale_factor" or key.startswith(
                IGNORED_PREFIXES):
            other[key] = value
        elif key.startswith(UNET_PREFIX):
            unet[key[len(UNET_PREFIX):]] = value
        elif key.startswith(AUTOENCODER_PREFIX):
            autoencoder[key[len(AUTOENCODER_PREFIX):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise BenchError(f"unexpected entries in the CompVis checkpoint: {_few(unknown)} "
                         f"(expected {UNET_PREFIX}*, {AUTOENCODER_PREFIX}*, schedule buffers and scale_factor)")
    return unet, autoencoder, other


# ---- reading a Lightning checkpoint without running its pickled code ----


class _Inert:
    """Stands in for every object a Lightning checkpoint pickles besides its tensors (callbacks such as
    ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``, numpy scalars, hyper-parameters):
    constructed and given its state without any of the original class's code running."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# torch's allow-list of extra globals is process-wide while a ``safe_globals`` block lasts: one at a time
_SAFE_GLOBALS_LOCK = threading.Lock()


def read_lightning_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``state_dict`` of a (PyTorch Lightning) ``model.ckpt``, always through ``torch.load(weights_only=True)``.

    A plain file loads as it is. Lightning pickles more than tensors next to the weights; torch's restricted
    unpickler refuses any global it does not know, and these classes are not installed here anyway. So every
    global the file names beyond torch's own allow-list (listed by ``get_unsafe_globals_in_checkpoint``, which
    reads the pickle without running it) is allowed for this one load as :class:`_Inert`, under its own name:
    the callbacks and hyper-parameters come out as inert stand-ins, and torch still refuses globals from the
    modules it blocks (``os``, ``sys``, ...). The weights are then whatever tensors ``state_dict`` holds."""
    if not zipfile.is_zipfile(path):  # torch.save's format since 1.6; the restricted unpickler never sees junk
        raise BenchError(f"cannot read the checkpoint {path}: not a zip archive, so not a PyTorch checkpoint "
                         "(expected a CompVis LDM model.ckpt)")
    try:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            serialization = torch.serialization
            if not hasattr(serialization, "get_unsafe_globals_in_checkpoint"):  # torch < 2.5
                raise BenchError(f"{path} pickles Lightning objects besides its weights; reading it without "
                                 "running them needs torch >= 2.5") from None
            names = serialization.get_unsafe_globals_in_checkpoint(path)
            with _SAFE_GLOBALS_LOCK, serialization.safe_globals([(_Inert, name) for name in names]):
                payload = torch.load(path, map_location="cpu", weights_only=True)
    except BenchError:
        raise
    except Exception as exc:  # UnpicklingError (a blocked global), RuntimeError, EOFError, ValueError, ...
        raise BenchError(f"cannot read the checkpoint {path}: {first_line(exc)}") from None
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise BenchError(f"{path} holds no state dict of tensors (expected a CompVis LDM model.ckpt)")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def set_openaimodel_heads(unet: nn.Module, layout: UNetLayout) -> None:
    """Give every attention module of a UNet built from ``layout`` openaimodel's head count (and its scale
    ``head_dim ** -0.5``); see the module docstring."""
    from diffusers.models.attention_processor import Attention

    for module in unet.modules():
        if isinstance(module, Attention):
            heads = layout.heads(module.inner_dim)
            module.heads = module.sliceable_head_dim = heads
            module.scale = (module.inner_dim // heads) ** -0.5
