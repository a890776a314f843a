"""LDM-8 on LSUN-Churches and LDM-4 on LSUN-Bedrooms (Rombach et al., CVPR 2022) as diffusers models.

The denoisers are the published ``openaimodel.UNetModel`` networks expressed as diffusers ``UNet2DModel``;
the first stages are ``AutoencoderKL`` (f8, churches) and ``VQModel`` (f4, bedrooms). Only the UNet is
quantized; the autoencoder is a full-precision part that turns the sampler's latents into images.

Architectures come from the CompVis configs ``configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml`` and
``lsun_bedrooms-ldm-vq-4.yaml`` (copied below as ``*_YAML``) and the code they name:
``ldm/modules/diffusionmodules/openaimodel.py`` (UNet), ``ldm/modules/diffusionmodules/model.py`` (encoder and
decoder), ``ldm/models/autoencoder.py`` and ``ldm/models/diffusion/ddpm.py`` (schedule, ``scale_factor``,
``decode_first_stage``). How openaimodel maps onto ``UNet2DModel``:
- timestep embedding ``[cos, sin]`` with frequencies ``exp(-ln(1e4) i / half)``: ``flip_sin_to_cos=True``,
  ``freq_shift=0``; ``time_embed`` is ``model_channels -> 4 model_channels -> 4 model_channels``;
- ``GroupNorm32(32, C)`` (eps 1e-5) everywhere: ``norm_num_groups=32``, ``norm_eps=1e-5``, and
  ``attn_norm_num_groups=32`` (with ``scale_shift`` diffusers would otherwise drop the mid attention's norm);
- ``use_scale_shift_norm``: ``resnet_time_scale_shift="scale_shift"``; ``resblock_updown``: resampling by
  ResBlocks (``downsample_type``/``upsample_type="resnet"``, ``ResnetUpsampleBlock2D`` where the up level has no
  attention); otherwise a 3x3 stride-2 conv with padding 1 (``downsample_padding=1``) and nearest x2 + 3x3 conv;
- ``attention_resolutions`` (downsampling factors) pick the ``Attn*Block2D`` levels; the mid block always has
  attention. ``use_new_attention_order`` is False in both configs, so the checkpoints use
  ``QKVAttentionLegacy``: the fused 1x1-conv ``qkv`` output (3C channels) is split into heads FIRST, each head
  holding its own ``[q | k | v]`` rows; the converters split and re-fuse the rows in that order.

What ``UNet2DModel`` cannot express exactly: the churches UNet uses a fixed ``num_heads=8`` at every width
(head widths 24, 48 and 96), while ``UNet2DModel`` has one ``attention_head_dim`` for all blocks. Its config
here says ``attention_head_dim=24`` (valid shapes at every width; weights do not depend on the head count) and
the loaders then set each attention module's head count to 8 (and its scale to ``head_dim ** -0.5``). A
churches UNet loaded with plain ``UNet2DModel.from_pretrained`` would attend with 16 or 32 heads in the deeper
levels: load it through this module. The bedrooms UNet (``num_head_channels=32``) is expressed exactly.

Latent scaling: churches use ``scale_by_std``, so their ``scale_factor`` is a buffer of the checkpoint (``1/std``
of the first training batch's latents); in the diffusers layout it is ``vae/config.json``'s ``scaling_factor``.
Bedrooms use ``scale_factor = 1.0`` (the config's default); a ``VQModel`` config's ``scaling_factor`` is ignored,
as diffusers' own ``LDMPipeline`` ignores it. Decoding follows ``decode_first_stage`` with its default
``force_not_quantize=False``: the VQ latents are snapped to the codebook before ``post_quant_conv``.
"""

from __future__ import annotations

import copy
import json
import pickle
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from ..errors import BenchError
from ..provenance import sha256_file
from ..schedules import NoiseSchedule
from . import ZooModel
from .checkpoints import (
    MANIFEST,
    PICKLE_SUFFIXES,
    check_config,
    check_loading_info,
    check_weights_only,
    first_line,
    read_manifest,
    verify_files,
)

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
DECODE_CHUNK = 8  # images per autoencoder call, so decoding a whole cell at once stays within memory


# ---- published hyper-parameters (CompVis/latent-diffusion configs, copied verbatim) ----

# configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml, model.params.unet_config.params (openaimodel.UNetModel);
# defaults that matter: num_head_channels=-1, use_new_attention_order=False, conv_resample=True, dropout=0.
CHURCH_UNET_YAML = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 192,
    "attention_resolutions": [1, 2, 4, 8], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4, 4],
    "num_heads": 8, "use_scale_shift_norm": True, "resblock_updown": True,
}
# same file, first_stage_config (ldm.models.autoencoder.AutoencoderKL, the kl-f8 first stage)
CHURCH_AUTOENCODER_YAML = {
    "embed_dim": 4,
    "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
}
# configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml; num_heads defaults to -1 (heads = channels // 32),
# use_scale_shift_norm and resblock_updown default to False.
BEDROOM_UNET_YAML = {
    "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 224,
    "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 4],
    "num_head_channels": 32,
}
# same file, first_stage_config (ldm.models.autoencoder.VQModelInterface, the vq-f4 first stage)
BEDROOM_AUTOENCODER_YAML = {
    "embed_dim": 3, "n_embed": 8192,
    "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
}

# ---- the same networks as diffusers constructor arguments ----

# 32 -> 16 -> 8 -> 4 -> 2 latents; attention at downsampling factors 1, 2, 4, 8 (every level but the 2x2 one)
# and in the mid block; 8 heads everywhere (see the module docstring: attention_head_dim is fixed up on load).
CHURCH_UNET = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["ResnetUpsampleBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"],
    "block_out_channels": [192, 384, 384, 768, 768],  # model_channels * channel_mult
    "layers_per_block": 2, "mid_block_scale_factor": 1, "downsample_padding": 1,
    "downsample_type": "resnet", "upsample_type": "resnet",  # resblock_updown
    "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 24,  # 192 / 8; deeper levels are set to 8 heads on load
    "norm_num_groups": 32, "attn_norm_num_groups": 32, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "scale_shift",  # use_scale_shift_norm
    "add_attention": True, "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}
# ddconfig ch * ch_mult, two ResnetBlocks per level (three in the decoder), attention only in the mid blocks
CHURCH_AUTOENCODER = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 256,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
# 64 -> 32 -> 16 -> 8 latents; attention at downsampling factors 2, 4, 8 and in the mid block, 32 channels
# per head (14, 21 and 28 heads); conv resampling; time embedding added before the second norm.
BEDROOM_UNET = {
    "sample_size": 64, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2, "mid_block_scale_factor": 1, "downsample_padding": 1,
    "downsample_type": "conv", "upsample_type": "conv",
    "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 32,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,  # None: the mid attention uses 32 groups
    "resnet_time_scale_shift": "default",
    "add_attention": True, "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}
BEDROOM_AUTOENCODER = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [128, 256, 512], "layers_per_block": 2, "act_fn": "silu",
    "latent_channels": 3, "sample_size": 256, "num_vq_embeddings": 8192, "norm_num_groups": 32,
    "vq_embed_dim": 3, "norm_type": "group", "mid_block_add_attention": True, "lookup_from_codebook": False,
}


@dataclass(frozen=True)
class LDMSpec:
    key: str  # "church" | "bedroom"
    name: str  # zoo name
    title: str
    url: str  # the CompVis zip holding model.ckpt (latent-diffusion README, "Pretrained LDMs")
    unet_yaml: dict
    autoencoder_yaml: dict
    unet: dict
    autoencoder_class: str  # "AutoencoderKL" | "VQModel"
    autoencoder: dict
    autoencoder_dirs: tuple[str, ...]  # diffusers subfolders accepted for the autoencoder, preferred first
    linear_start: float
    linear_end: float
    num_train_timesteps: int
    scale_factor: float | None  # None: learned (scale_by_std), read from the checkpoint
    default_steps: int
    default_batch_size: int

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet_yaml["image_size"]
        return (self.unet_yaml["in_channels"], size, size)

    def heads(self, channels: int) -> int:
        """openaimodel's head count at a width: ``num_heads``, or ``channels // num_head_channels``."""
        per_head = self.unet_yaml.get("num_head_channels", -1)
        return self.unet_yaml["num_heads"] if per_head == -1 else channels // per_head

    @property
    def new_attention_order(self) -> bool:
        return self.unet_yaml.get("use_new_attention_order", False)

    def missing_message(self) -> str:
        return (f"{self.name} needs the CompVis {self.title} weights, which are not bundled: download {self.url} "
                f"(latent-diffusion README, 'Pretrained LDMs'), unzip it and point run.checkpoint (or --checkpoint) "
                f"at the extracted model.ckpt or its folder")


CHURCH = LDMSpec(
    key="church", name="ldm-church", title="LDM-KL-8 LSUN-Churches",
    url="https://ommer-lab.com/files/latent-diffusion/lsun_churches.zip",
    unet_yaml=CHURCH_UNET_YAML, autoencoder_yaml=CHURCH_AUTOENCODER_YAML,
    unet=CHURCH_UNET, autoencoder_class="AutoencoderKL", autoencoder=CHURCH_AUTOENCODER,
    autoencoder_dirs=("vae", "vqvae"),
    linear_start=0.0015, linear_end=0.0155, num_train_timesteps=1000,  # lsun_churches-ldm-kl-8.yaml
    scale_factor=None,  # scale_by_std: True
    # paper setting (as given for this benchmark's MoDiff runs): 200 DDIM steps, eta 0. The latent-diffusion
    # README's FID row and Q-Diffusion's README sample churches with 400 DDIM steps, eta 0.
    default_steps=200,
    default_batch_size=32,
)
BEDROOM = LDMSpec(
    key="bedroom", name="ldm-bedroom", title="LDM-VQ-4 LSUN-Bedrooms",
    url="https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip",
    unet_yaml=BEDROOM_UNET_YAML, autoencoder_yaml=BEDROOM_AUTOENCODER_YAML,
    unet=BEDROOM_UNET, autoencoder_class="VQModel", autoencoder=BEDROOM_AUTOENCODER,
    autoencoder_dirs=("vqvae", "vae"),
    linear_start=0.0015, linear_end=0.0195, num_train_timesteps=1000,  # lsun_bedrooms-ldm-vq-4.yaml
    scale_factor=1.0,  # scale_by_std not set: LatentDiffusion's default scale_factor
    # paper setting (as given for this benchmark's MoDiff runs): 500 DDIM steps, eta 0. The latent-diffusion
    # README's FID row and Q-Diffusion's README sample bedrooms with 200 DDIM steps, eta 1.
    default_steps=500,
    default_batch_size=16,
)
SPECS = {spec.key: spec for spec in (CHURCH, BEDROOM)}
PARTS = tuple(f"{key}-{part}" for key in SPECS for part in ("unet", "autoencoder"))


def schedule(spec: LDMSpec) -> NoiseSchedule:
    """LDM's ``make_beta_schedule("linear")``: linear in sqrt(beta), squared (diffusers' "scaled_linear")."""
    root = torch.linspace(spec.linear_start ** 0.5, spec.linear_end ** 0.5, spec.num_train_timesteps,
                          dtype=torch.float64)
    return NoiseSchedule(root ** 2)


# ---- state-dict conversion (CompVis layout <-> diffusers layout) ----

@dataclass(frozen=True)
class _Rule:
    """One original tensor <-> one diffusers tensor (or three, for a fused qkv)."""

    original: str
    diffusers: tuple[str, ...]
    trailing: int = 0  # singleton kernel dims the original carries (1x1 conv1d: 1, 1x1 conv2d: 2) over a Linear
    heads: int = 0  # > 0: a fused qkv split into to_q / to_k / to_v
    legacy: bool = True  # qkv row order: heads outermost (QKVAttentionLegacy) or q/k/v outermost (QKVAttention)


def _parse_part(which: str) -> tuple[LDMSpec, str]:
    if which not in PARTS:
        raise BenchError(f"unknown LDM part {which!r}; choose one of {', '.join(PARTS)}")
    key, part = which.split("-", 1)
    return SPECS[key], part


def _diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def _part_class_and_kwargs(spec: LDMSpec, part: str) -> tuple[str, dict]:
    return ("UNet2DModel", spec.unet) if part == "unet" else (spec.autoencoder_class, spec.autoencoder)


@cache
def _diffusers_shapes(which: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the diffusers model, from an allocation-free (meta) instance."""
    spec, part = _parse_part(which)
    cls_name, kwargs = _part_class_and_kwargs(spec, part)
    with torch.device("meta"):
        model = _diffusers_class(cls_name)(**copy.deepcopy(kwargs))
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


def _unet_rules(spec: LDMSpec, shapes: Mapping) -> Iterator[_Rule]:
    cfg = spec.unet
    per_level = cfg["layers_per_block"]
    levels = len(cfg["block_out_channels"])
    legacy = not spec.new_attention_order

    def attention(original: str, target: str) -> Iterator[_Rule]:
        channels = shapes[f"{target}.group_norm.weight"][0]
        yield from _attention(original, target, spec.heads(channels), legacy)

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


def _autoencoder_rules(spec: LDMSpec, shapes: Mapping) -> Iterator[_Rule]:
    cfg = spec.autoencoder
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
    if spec.autoencoder_class == "VQModel":  # taming's VectorQuantizer2 codebook (no remap buffer)
        yield _Rule("quantize.embedding.weight", ("quantize.embedding.weight",))


@cache
def _rules(which: str) -> tuple[tuple[_Rule, ...], dict[str, tuple[int, ...]]]:
    """The conversion rules of a part and the original tensor shapes they imply."""
    spec, part = _parse_part(which)
    shapes = _diffusers_shapes(which)
    rules = tuple(_unet_rules(spec, shapes) if part == "unet" else _autoencoder_rules(spec, shapes))
    covered = [k for rule in rules for k in rule.diffusers]
    if sorted(covered) != sorted(shapes):  # a bug in the rules, not a user error
        raise AssertionError(f"{which}: rules cover {len(covered)} of {len(shapes)} diffusers tensors")
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


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor], which: str) -> dict[str, torch.Tensor]:
    """A CompVis part's state dict (prefix removed: ``input_blocks.0.0.weight``, ``encoder.conv_in.weight``)
    -> the matching diffusers state dict. ``which``: one of :data:`PARTS`. Tensors are moved, never rounded."""
    rules, original = _rules(which)
    _check_tensors(state_dict, original, f"CompVis {which} state dict")
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


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor], which: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`original_to_diffusers` (CompVis key names and tensor shapes, prefix not added)."""
    rules, _ = _rules(which)
    _check_tensors(state_dict, _diffusers_shapes(which), f"diffusers {which} state dict")
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


# ---- building the models ----

def _set_original_heads(unet: nn.Module, spec: LDMSpec) -> None:
    """Give every attention module openaimodel's head count (see the module docstring)."""
    from diffusers.models.attention_processor import Attention

    for module in unet.modules():
        if isinstance(module, Attention):
            heads = spec.heads(module.inner_dim)
            module.heads = module.sliceable_head_dim = heads
            module.scale = (module.inner_dim // heads) ** -0.5


def _finish(model: nn.Module) -> nn.Module:
    """Inference mode, float32 weights (the full-precision reference the papers quantize from)."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.to(torch.float32)
    return model.eval().requires_grad_(False)


def _build(cls_name: str, kwargs: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A diffusers model holding exactly ``state_dict`` (strict; tensors assigned, not copied)."""
    with torch.device("meta"):
        model = _diffusers_class(cls_name)(**copy.deepcopy(kwargs))
    model.load_state_dict(state_dict, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise AssertionError(f"{cls_name}: tensors left uninitialised after loading")
    return _finish(model)


def build_unet(spec: LDMSpec, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    unet = _build("UNet2DModel", spec.unet, state_dict)
    _set_original_heads(unet, spec)
    return unet


def build_autoencoder(spec: LDMSpec, state_dict: dict[str, torch.Tensor], scale_factor: float) -> nn.Module:
    return _build(spec.autoencoder_class, {**spec.autoencoder, "scaling_factor": scale_factor}, state_dict)


def make_decoder(spec: LDMSpec, autoencoder: nn.Module, scale_factor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents -> images in [-1, 1], as ``LatentDiffusion.decode_first_stage`` then the sampling script's clamp."""
    inverse = 1.0 / scale_factor
    quantize = spec.autoencoder_class == "VQModel"

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        weight = next(autoencoder.parameters())
        images = []
        for chunk in latents.split(DECODE_CHUNK):
            z = chunk.to(device=weight.device, dtype=weight.dtype) * inverse
            if quantize:  # VQModelInterface.decode(h, force_not_quantize=False): nearest codebook entries first
                out = autoencoder.decode(z, force_not_quantize=False).sample
            else:
                out = autoencoder.decode(z).sample
            images.append(out.clamp(-1.0, 1.0).to(device=latents.device, dtype=latents.dtype))
        return torch.cat(images) if images else latents.new_empty((0, 3, 256, 256))

    return decode


def _zoo_model(spec: LDMSpec, unet: nn.Module, autoencoder: nn.Module, scale_factor: float, info: dict) -> ZooModel:
    return ZooModel(
        name=spec.name, unet=unet, schedule=schedule(spec), image_shape=spec.latent_shape,
        default_sampler="ddim-ldm", default_steps=spec.default_steps, info=info,
        decoder=make_decoder(spec, autoencoder, scale_factor), output_shape=(3, 256, 256),
        default_batch_size=spec.default_batch_size, parts={"autoencoder": autoencoder},
    )


def _base_info(spec: LDMSpec, path: Path, layout: str, scale_factor: float) -> dict:
    return {
        "checkpoint": str(path), "layout": layout, "source": spec.url, "architecture": spec.title,
        "scale_factor": scale_factor,
        "schedule": {"betas": "linear in sqrt(beta) (LDM 'linear')", "linear_start": spec.linear_start,
                     "linear_end": spec.linear_end, "num_train_timesteps": spec.num_train_timesteps},
    }


def _check_schedule_buffers(spec: LDMSpec, other: dict, path: Path) -> None:
    if "betas" not in other:
        return
    ours = schedule(spec).betas
    theirs = other["betas"].double()
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-6, atol=1e-10):
        raise BenchError(f"{path}: the checkpoint's betas are not {spec.name}'s schedule (linear_start "
                         f"{spec.linear_start}, linear_end {spec.linear_end}, T {spec.num_train_timesteps})")


def _scale_factor_from_checkpoint(spec: LDMSpec, other: dict, path: Path) -> float:
    stored = other.get("scale_factor")
    if spec.scale_factor is None:
        if stored is None or stored.numel() != 1:
            raise BenchError(f"{path} has no scale_factor; {spec.name} needs the one learned in training "
                             f"(scale_by_std), so this is not the {spec.title} checkpoint")
        return float(stored)
    if stored is not None and abs(float(stored) - spec.scale_factor) > 1e-6:
        raise BenchError(f"{path} has scale_factor {float(stored):g}; {spec.name} uses {spec.scale_factor:g}")
    return spec.scale_factor


def _load_compvis(spec: LDMSpec, path: Path) -> ZooModel:
    digest = sha256_file(path)
    state = read_lightning_state_dict(path)
    try:  # strict: a missing, unknown or misshapen tensor is an error naming the file
        unet_state, autoencoder_state, other = split_compvis_state_dict(state)
        del state
        unet_state = original_to_diffusers(unet_state, f"{spec.key}-unet")
        autoencoder_state = original_to_diffusers(autoencoder_state, f"{spec.key}-autoencoder")
    except BenchError as exc:
        raise BenchError(f"{path}: {exc}") from None
    _check_schedule_buffers(spec, other, path)
    scale_factor = _scale_factor_from_checkpoint(spec, other, path)
    unet = build_unet(spec, unet_state)
    autoencoder = build_autoencoder(spec, autoencoder_state, scale_factor)
    info = _base_info(spec, path, "compvis", scale_factor)
    info["files"] = {path.name: digest}
    info["ignored"] = {"model_ema": sum(k.startswith("model_ema.") for k in other),
                       "schedule_buffers": sum(k in SCHEDULE_BUFFERS for k in other),
                       "autoencoder_loss": sum(k.startswith(AUTOENCODER_PREFIX + "loss.") for k in other)}
    return _zoo_model(spec, unet, autoencoder, scale_factor, info)


# ---- the diffusers layout ----

def _check_diffusers_config(directory: Path, cls_name: str, expected: dict, what: str) -> dict:
    """``config.json`` with the class's defaults filled in (as from_pretrained does) must equal ``expected``."""
    return check_config(directory / "config.json", expected, what, defaults_from=_diffusers_class(cls_name))


def _from_pretrained(cls_name: str, directory: Path, what: str) -> nn.Module:
    for path in sorted(directory.iterdir()):  # a .bin diffusers may read: no pickled code, whatever its version
        if path.suffix in PICKLE_SUFFIXES:
            check_weights_only(path, f"{what} weights")
    try:
        model, loading = _diffusers_class(cls_name).from_pretrained(
            directory, local_files_only=True, low_cpu_mem_usage=False, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BenchError(f"cannot load the {what} from {directory}: {first_line(exc)}") from None
    check_loading_info(loading, f"the {what} weights in {directory}")
    return _finish(model)


def _check_scheduler(spec: LDMSpec, directory: Path) -> None:
    path = directory / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {path} ({exc})") from None
    want = {"beta_schedule": "scaled_linear", "beta_start": spec.linear_start, "beta_end": spec.linear_end,
            "num_train_timesteps": spec.num_train_timesteps}
    for key, value in want.items():
        have = config.get(key)
        if have != value and not (isinstance(have, float) and abs(have - value) < 1e-12):
            raise BenchError(f"{path} does not describe {spec.name}'s schedule: {key} is {have!r}, expected {value!r}")
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise BenchError(f"{path}: prediction_type is {config['prediction_type']!r}; the LDMs predict epsilon")


def _load_diffusers(spec: LDMSpec, directory: Path) -> ZooModel:
    hint = f"expected unet/ and {' or '.join(d + '/' for d in spec.autoencoder_dirs)} in diffusers layout"
    if (directory / MANIFEST).is_file():
        verify_files(directory, read_manifest(directory, hint), [], hint)
    autoencoder_dir = next((directory / d for d in spec.autoencoder_dirs if (directory / d).is_dir()), None)
    if autoencoder_dir is None:
        raise BenchError(f"{directory} has unet/ but no autoencoder folder; {hint}")
    _check_diffusers_config(directory / "unet", "UNet2DModel", spec.unet, f"{spec.name} UNet")
    config = _check_diffusers_config(autoencoder_dir, spec.autoencoder_class, spec.autoencoder,
                                     f"{spec.name} autoencoder")
    _check_scheduler(spec, directory)
    scale_factor = float(config["scaling_factor"]) if spec.scale_factor is None else spec.scale_factor
    unet = _from_pretrained("UNet2DModel", directory / "unet", f"{spec.name} UNet")
    _set_original_heads(unet, spec)
    autoencoder = _from_pretrained(spec.autoencoder_class, autoencoder_dir, f"{spec.name} autoencoder")
    info = _base_info(spec, directory, "diffusers", scale_factor)
    info["files"] = {str(p.relative_to(directory)): sha256_file(p)
                     for d in (directory / "unet", autoencoder_dir) for p in sorted(d.rglob("*")) if p.is_file()}
    return _zoo_model(spec, unet, autoencoder, scale_factor, info)


def load(spec: LDMSpec, checkpoint: Path | str | None) -> ZooModel:
    """``checkpoint``: a diffusers-layout folder, a CompVis ``model.ckpt``, or a folder holding one."""
    if checkpoint is None:
        raise BenchError(spec.missing_message())
    path = Path(checkpoint)
    if not path.exists():
        raise BenchError(f"{spec.name} checkpoint {path} does not exist; {spec.missing_message()}")
    if path.is_dir():
        if (path / "unet").is_dir():
            return _load_diffusers(spec, path)
        if not (path / "model.ckpt").is_file():
            raise BenchError(f"{path} holds neither a diffusers layout (unet/ and "
                             f"{' or '.join(d + '/' for d in spec.autoencoder_dirs)}) nor a CompVis model.ckpt")
        path = path / "model.ckpt"
    return _load_compvis(spec, path)


def load_church(checkpoint: Path | str | None) -> ZooModel:
    return load(CHURCH, checkpoint)


def load_bedroom(checkpoint: Path | str | None) -> ZooModel:
    return load(BEDROOM, checkpoint)
