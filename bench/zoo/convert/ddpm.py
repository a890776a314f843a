"""The original DDPM CIFAR-10 layout (Ho et al. 2020, in the PyTorch form the DDIM code base loads) <-> diffusers.

The DDIM code base (ermongroup/ddim ``models/diffusion.py``, class ``Model``) names the network's tensors
``down.{i}.block.{j}.conv1.weight``, ``mid.attn_1.q.weight``, ...; its attention uses 1x1 convolutions where diffusers'
``Attention`` has Linear layers. :func:`original_to_diffusers` / :func:`diffusers_to_original` move tensors between
that layout and ``UNet2DModel(**DDPM_CIFAR10_32)`` (values are not copied, never rounded). :func:`select_state_dict`
picks the state dict out of what such a file holds: a plain state dict, or a DDIM training checkpoint
``[model, optimizer, epoch, step(, ema)]``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...errors import BenchError
from ..architectures import DDPM_CIFAR10_32

if TYPE_CHECKING:
    from diffusers import UNet2DModel

ELEMENTS = ("auto", "ema", "model")  # which state dict of a DDIM training checkpoint to load

# sub-layers of one block: original name -> diffusers name
_RESNET_LAYERS = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
                  "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTENTION_LAYERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTENTION_1X1 = ("q", "k", "v", "proj_out")  # 1x1 convs in the original, Linear layers in diffusers


def _unet_kwargs() -> dict:
    return copy.deepcopy(DDPM_CIFAR10_32)  # so the module-level config cannot be mutated through a model


@functools.lru_cache(maxsize=1)
def layout() -> tuple[dict[str, tuple[str, bool]], dict[str, tuple[str, bool]], dict[str, tuple[int, ...]]]:
    """``(original key -> (diffusers key, is 1x1 attention weight), the inverse, original key -> shape)``.

    Built from the two module trees: the original ``Model`` (ermongroup/ddim ``models/diffusion.py``) lists its
    up path with ``up[0]`` at the highest resolution and gives every up level ``num_res_blocks + 1`` blocks; diffusers
    lists ``up_blocks[0]`` at the lowest resolution, so original up level ``i`` is ``up_blocks[levels - 1 - i]``.
    Only keys the diffusers model really has are kept (e.g. ``nin_shortcut`` exists where channels change).
    """
    from diffusers import UNet2DModel

    config = DDPM_CIFAR10_32
    levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    attention = [kind.startswith("Attn") for kind in config["down_block_types"]]

    blocks: list[tuple[str, str, dict[str, str]]] = [
        ("temb.dense.0", "time_embedding.linear_1", {}), ("temb.dense.1", "time_embedding.linear_2", {}),
        ("conv_in", "conv_in", {}), ("norm_out", "conv_norm_out", {}), ("conv_out", "conv_out", {}),
        ("mid.block_1", "mid_block.resnets.0", _RESNET_LAYERS),
        ("mid.attn_1", "mid_block.attentions.0", _ATTENTION_LAYERS),
        ("mid.block_2", "mid_block.resnets.1", _RESNET_LAYERS),
    ]
    for i in range(levels):
        for j in range(per_level):
            blocks.append((f"down.{i}.block.{j}", f"down_blocks.{i}.resnets.{j}", _RESNET_LAYERS))
            if attention[i]:
                blocks.append((f"down.{i}.attn.{j}", f"down_blocks.{i}.attentions.{j}", _ATTENTION_LAYERS))
        if i != levels - 1:
            blocks.append((f"down.{i}.downsample.conv", f"down_blocks.{i}.downsamplers.0.conv", {}))
        k = levels - 1 - i
        for j in range(per_level + 1):
            blocks.append((f"up.{i}.block.{j}", f"up_blocks.{k}.resnets.{j}", _RESNET_LAYERS))
            if attention[i]:
                blocks.append((f"up.{i}.attn.{j}", f"up_blocks.{k}.attentions.{j}", _ATTENTION_LAYERS))
        if i != 0:
            blocks.append((f"up.{i}.upsample.conv", f"up_blocks.{k}.upsamplers.0.conv", {}))

    with torch.device("meta"):
        target = {key: tuple(t.shape) for key, t in UNet2DModel(**_unet_kwargs()).state_dict().items()}
    forward: dict[str, tuple[str, bool]] = {}
    for original, converted, layers in blocks:
        for sub, sub_converted in (layers or {"": ""}).items():
            for param in ("weight", "bias"):
                key = ".".join(p for p in (original, sub, param) if p)
                new = ".".join(p for p in (converted, sub_converted, param) if p)
                if new in target:
                    forward[key] = (new, sub in _ATTENTION_1X1 and param == "weight")
    unmapped = sorted(set(target) - {new for new, _ in forward.values()})
    if unmapped:  # a diffusers release renamed something: a bug here, not a user mistake
        raise RuntimeError(f"diffusers keys without an original counterpart: {unmapped[:5]}")
    inverse = {new: (key, squeeze) for key, (new, squeeze) in forward.items()}
    shapes = {key: target[new] + ((1, 1) if squeeze else ()) for key, (new, squeeze) in forward.items()}
    return forward, inverse, shapes


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


def _check_state_dict(state_dict: Mapping, known: Mapping, shapes: Mapping, what: str) -> None:
    """One-line BenchError naming the first offending keys: unknown, missing, wrong shape or not a tensor."""
    problems = []
    unknown = [k for k in state_dict if k not in known]
    missing = [k for k in known if k not in state_dict]
    not_tensors = [k for k, v in state_dict.items() if k in known and not isinstance(v, torch.Tensor)]
    wrong = [f"{k} {tuple(v.shape)} != {shapes[k]}" for k, v in state_dict.items()
             if k in known and isinstance(v, torch.Tensor) and tuple(v.shape) != shapes[k]]
    for label, keys in (("unknown keys", unknown), ("missing keys", missing), ("not tensors", not_tensors),
                        ("shape mismatches", wrong)):
        if keys:
            problems.append(f"{len(keys)} {label}: {_listing(keys)}")
    if problems:
        raise BenchError(f"not a DDPM CIFAR-10 state dict in the {what} layout: {'; '.join(problems)}")


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original DDPM/DDIM ``Model`` keys -> ``UNet2DModel(**DDPM_CIFAR10_32)`` keys; values are not copied, and the
    attention's 1x1 conv weights ``(C, C, 1, 1)`` become Linear weights ``(C, C)``."""
    forward, _, shapes = layout()
    _check_state_dict(state_dict, forward, shapes, "original")
    out = {}
    for key, value in state_dict.items():
        new, squeeze = forward[key]
        out[new] = value.reshape(value.shape[:2]) if squeeze else value
    return out


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`original_to_diffusers`."""
    _, inverse, original_shapes = layout()
    shapes = {new: original_shapes[key][:2] if squeeze else original_shapes[key]
              for new, (key, squeeze) in inverse.items()}
    _check_state_dict(state_dict, inverse, shapes, "diffusers")
    out = {}
    for key, value in state_dict.items():
        old, squeeze = inverse[key]
        out[old] = value.reshape(*value.shape, 1, 1) if squeeze else value
    return out


def is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def select_state_dict(obj, element: str, path: Path) -> tuple[dict, str]:
    """``(state dict, which)``: which is "state_dict" (a plain one), "model" or "ema" (of a training checkpoint)."""
    if is_state_dict(obj):
        if element != "auto":
            raise BenchError(f"{path} is a plain state dict; element={element!r} applies to DDIM training checkpoints")
        return dict(obj), "state_dict"
    if isinstance(obj, (list, tuple)) and obj and is_state_dict(obj[0]):
        has_ema = len(obj) > 1 and is_state_dict(obj[-1])
        if element == "model" or (element == "auto" and not has_ema):
            return dict(obj[0]), "model"
        if not has_ema:
            raise BenchError(f"{path} holds no EMA weights (its last element is not a state dict); use element='model'")
        return dict(obj[-1]), "ema"
    raise BenchError(f"{path} is neither a state dict nor a DDIM training checkpoint [model, optimizer, epoch, step"
                     f"(, ema)]: it holds a {type(obj).__name__}")


def strip_module_prefix(state_dict: dict) -> dict:
    """``nn.DataParallel`` prefixes every key with ``module.`` (DDIM saves its training model wrapped)."""
    if all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def to_unet(state_dict: Mapping[str, torch.Tensor]) -> UNet2DModel:
    """An original-layout state dict -> ``UNet2DModel(**DDPM_CIFAR10_32)`` holding exactly its tensors, as float32
    (strict: :func:`original_to_diffusers` checks every key and shape first)."""
    from diffusers import UNet2DModel

    converted = original_to_diffusers(state_dict)
    with torch.device("meta"):
        unet = UNet2DModel(**_unet_kwargs())
    # assign: the meta model takes the checkpoint's tensors instead of random ones it would overwrite
    unet.load_state_dict({k: v.float().contiguous() for k, v in converted.items()}, strict=True, assign=True)
    return unet
