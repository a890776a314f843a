"""DDPM on CIFAR-10 (Ho et al. 2020), the model behind the CIFAR-10 rows of the DDIM, Q-Diffusion and MoDiff papers.

Which weights the papers used
    The DDIM code base (ermongroup/ddim ``runners/diffusion.py``, with ``--use_pretrained``) samples from
    ``get_ckpt_path("ema_cifar10")``, i.e. ``diffusion_models_converted/ema_diffusion_cifar10_model/model-790000.ckpt``:
    the exponential-moving-average weights of Ho et al.'s TensorFlow CIFAR-10 model at step 790k in PyTorch form (the
    DDIM code credits pesser/pytorch_diffusion for the converted files). Q-Diffusion's and MoDiff's
    ``scripts/sample_diffusion_ddim.py`` load that same file the same way. The raw (non-EMA) weights of the same step
    are ``diffusion_cifar10_model/model-790000.ckpt`` (``get_ckpt_path("cifar10")``).

What ``load(checkpoint)`` accepts
    - ``None`` or ``"google/ddpm-cifar10-32"``: the diffusers conversion on the Hugging Face Hub, taken from the hub
      cache (only the cache when ``HF_HUB_OFFLINE=1``), config and weights at the repository root or under ``unet/``;
    - a directory in diffusers layout (``config.json`` + ``diffusion_pytorch_model.{safetensors,bin}`` at its root or
      under ``unet/``), e.g. from ``hf download google/ddpm-cifar10-32 --local-dir DIR``;
    - a file in the original PyTorch layout (``model-790000.ckpt``): a plain state dict, or a DDIM training
      checkpoint ``[model, optimizer, epoch, step(, ema)]``, whose EMA element is taken when present (``element=``
      chooses). It is converted by :func:`original_to_diffusers` and loaded strictly.
    Every config must match ``architectures.DDPM_CIFAR10_32``.

Which weights did I load?
    ``ZooModel.info`` records ``source``, ``checkpoint``, the SHA-256 of every weights file read (``files``) and
    ``variant`` ("ema", "non-ema" or "unknown") with ``variant_source``, the evidence for it, strongest first: the
    file's MD5 equals the one DDIM's ``functions/ckpt_util.py`` publishes for a release; the element taken from a
    training checkpoint; the DDIM directory name in the path. Nothing else is taken as evidence.

Not verified here (no network)
    Whether ``google/ddpm-cifar10-32`` holds the EMA or the raw weights: its config and commit history (as quoted by
    other repositories) do not say, so its variant is recorded as "unknown". To settle it, compare
    ``diffusers_to_original(unet.state_dict())`` with the tensors of the two DDIM release files. Nor were the release
    files themselves at hand: the MD5 sums and the download link are DDIM's published ones, unchecked here, and the
    converters are tested against the original code's layout and forward pass on random weights.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import BenchError
from ..provenance import sha256_file
from ..schedules import NoiseSchedule
from . import ZooModel
from .architectures import DDPM_CIFAR10_32
from .checkpoints import check_config, check_loading_info, check_weights_only, read_safetensors, read_torch_file

if TYPE_CHECKING:
    from diffusers import UNet2DModel

NAME = "ddpm-cifar10"
HUB_ID = "google/ddpm-cifar10-32"
IMAGE_SHAPE = (3, 32, 32)
ELEMENTS = ("auto", "ema", "model")  # which state dict of a DDIM training checkpoint to load

HINT = (
    f"download it with 'hf download {HUB_ID} --local-dir DIR' and pass DIR as the checkpoint (--checkpoint DIR or "
    "run.checkpoint = DIR), or pass the original EMA weights ema_diffusion_cifar10_model/model-790000.ckpt that the "
    "DDIM code base fetches with get_ckpt_path('ema_cifar10') (https://heibox.uni-heidelberg.de/f/2e4f01e2d9ee49bab1d5/"
    "?dl=1, as listed in ermongroup/ddim functions/ckpt_util.py)"
)

# MD5 of the converted release files as published in ermongroup/ddim functions/ckpt_util.py (MD5_MAP).
RELEASE_MD5 = {
    "1fa350b952534ae442b1d5235cce5cd3": ("ema", "ema_diffusion_cifar10_model/model-790000.ckpt"),
    "82ed3067fd1002f5cf4c339fb80c4669": ("non-ema", "diffusion_cifar10_model/model-790000.ckpt"),
}

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# sub-layers of one block: original name -> diffusers name
_RESNET_LAYERS = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
                  "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTENTION_LAYERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTENTION_1X1 = ("q", "k", "v", "proj_out")  # 1x1 convs in the original, Linear layers in diffusers


def schedule() -> NoiseSchedule:
    return NoiseSchedule.linear(1e-4, 0.02, 1000)


def load(checkpoint: str | Path | None = None, *, element: str = "auto") -> ZooModel:
    """The zoo entry; ``element`` picks the state dict of a DDIM training checkpoint ("auto": EMA when present)."""
    unet, info = load_unet(checkpoint, element=element)
    return ZooModel(
        name=NAME, unet=unet, schedule=schedule(), image_shape=IMAGE_SHAPE, default_sampler="ddim-quad",
        default_steps=100, default_batch_size=64, info=info,
    )


def load_unet(checkpoint: str | Path | None = None, *, element: str = "auto") -> tuple[UNet2DModel, dict]:
    """``(UNet2DModel in eval mode without gradients, info)`` from any source the module docstring lists."""
    if element not in ELEMENTS:
        raise BenchError(f"element must be one of {', '.join(ELEMENTS)}; got {element!r}")
    path = None if checkpoint is None else Path(checkpoint)
    if path is None or (str(checkpoint) == HUB_ID and not path.exists()):
        _only_for_training_checkpoints(element, HUB_ID)
        unet, info = _load_hub()
    elif path.is_dir():
        _only_for_training_checkpoints(element, path)
        unet, info = _load_diffusers_dir(path)
        info = {"source": "diffusers", "checkpoint": str(path), **info, "variant": "unknown",
                "variant_source": "a diffusers directory does not record whether it holds EMA weights"}
    elif path.is_file():
        unet, info = _load_original(path, element)
    else:
        raise BenchError(f"DDPM CIFAR-10 checkpoint {path} does not exist; {HINT}")
    return unet.eval().requires_grad_(False), info


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _only_for_training_checkpoints(element: str, where) -> None:
    if element != "auto":
        raise BenchError(f"element={element!r} applies to DDIM training checkpoints only, not to {where}")


# ---------------------------------------------------------------------------------------------------- diffusers layout


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(constants.HF_HUB_OFFLINE)


def _load_hub():
    from huggingface_hub import snapshot_download

    offline = _hub_offline()
    patterns = [f"{sub}{name}" for sub in ("", "unet/") for name in ("config.json", WEIGHT_FILES[0])]
    try:
        snapshot = Path(snapshot_download(HUB_ID, local_files_only=offline, allow_patterns=patterns))
    except (OSError, ValueError) as exc:
        if offline:
            why = "HF_HUB_OFFLINE is set, so nothing is downloaded"
        else:
            why = f"and cannot be downloaded: {_first_line(exc)}"
        raise BenchError(f"{HUB_ID} is not in the Hugging Face cache ({why}); {HINT}") from None
    unet, info = _load_diffusers_dir(snapshot)
    return unet, {"source": "hub", "checkpoint": HUB_ID, "revision": snapshot.name, "snapshot": str(snapshot),
                  **info, "variant": "unknown",
                  "variant_source": f"not verified: {HUB_ID} does not state whether it holds the EMA weights"}


def _load_diffusers_dir(directory: Path):
    from diffusers import UNet2DModel

    model_dir = next((d for d in (directory, directory / "unet") if (d / "config.json").is_file()), None)
    if model_dir is None:
        raise BenchError(f"{directory} holds neither config.json nor unet/config.json; {HINT}")
    # the file over UNet2DModel's defaults: an old config.json may leave out keys diffusers added later
    check_config(model_dir / "config.json", DDPM_CIFAR10_32, "DDPM CIFAR-10 UNet", defaults_from=UNet2DModel)
    weights = next((model_dir / f for f in WEIGHT_FILES if (model_dir / f).is_file()), None)
    if weights is None:
        raise BenchError(f"{model_dir} has a config.json but no {' or '.join(WEIGHT_FILES)}; {HINT}")
    check_weights_only(weights, "DDPM CIFAR-10 weights")  # a .bin: no pickled code, whatever diffusers does
    try:
        unet, loading = UNet2DModel.from_pretrained(
            model_dir, local_files_only=True, use_safetensors=weights.suffix == ".safetensors",
            low_cpu_mem_usage=False,  # accelerate is not a dependency; without this diffusers warns every load
            output_loading_info=True,  # diffusers would leave a missing tensor randomly initialised
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise BenchError(f"cannot load the DDPM CIFAR-10 UNet from {model_dir}: {_first_line(exc)}") from None
    check_loading_info(loading, f"DDPM CIFAR-10 weights {weights}")
    return unet, {"files": {weights.relative_to(directory).as_posix(): sha256_file(weights)}}


# ----------------------------------------------------------------------------------------------------- original layout


def _unet_kwargs() -> dict:
    return copy.deepcopy(DDPM_CIFAR10_32)  # so the module-level config cannot be mutated through a model


@functools.lru_cache(maxsize=1)
def _layout() -> tuple[dict[str, tuple[str, bool]], dict[str, tuple[str, bool]], dict[str, tuple[int, ...]]]:
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
    forward, _, shapes = _layout()
    _check_state_dict(state_dict, forward, shapes, "original")
    out = {}
    for key, value in state_dict.items():
        new, squeeze = forward[key]
        out[new] = value.reshape(value.shape[:2]) if squeeze else value
    return out


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`original_to_diffusers`."""
    _, inverse, original_shapes = _layout()
    shapes = {new: original_shapes[key][:2] if squeeze else original_shapes[key]
              for new, (key, squeeze) in inverse.items()}
    _check_state_dict(state_dict, inverse, shapes, "diffusers")
    out = {}
    for key, value in state_dict.items():
        old, squeeze = inverse[key]
        out[old] = value.reshape(*value.shape, 1, 1) if squeeze else value
    return out


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _read(path: Path):
    """safetensors, or ``torch.load(weights_only=True)``: never code from the file."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, "DDPM CIFAR-10 checkpoint")
    return read_torch_file(path, "DDPM CIFAR-10 checkpoint")


def _select(obj, element: str, path: Path) -> tuple[dict, str]:
    """``(state dict, which)``: which is "state_dict" (a plain one), "model" or "ema" (of a training checkpoint)."""
    if _is_state_dict(obj):
        if element != "auto":
            raise BenchError(f"{path} is a plain state dict; element={element!r} applies to DDIM training checkpoints")
        return dict(obj), "state_dict"
    if isinstance(obj, (list, tuple)) and obj and _is_state_dict(obj[0]):
        has_ema = len(obj) > 1 and _is_state_dict(obj[-1])
        if element == "model" or (element == "auto" and not has_ema):
            return dict(obj[0]), "model"
        if not has_ema:
            raise BenchError(f"{path} holds no EMA weights (its last element is not a state dict); use element='model'")
        return dict(obj[-1]), "ema"
    raise BenchError(f"{path} is neither a state dict nor a DDIM training checkpoint [model, optimizer, epoch, step"
                     f"(, ema)]: it holds a {type(obj).__name__}")


def _strip_module_prefix(state_dict: dict) -> dict:
    """``nn.DataParallel`` prefixes every key with ``module.`` (DDIM saves its training model wrapped)."""
    if all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _original_variant(path: Path, which: str, md5: str) -> tuple[str, str]:
    if md5 in RELEASE_MD5:
        variant, release = RELEASE_MD5[md5]
        return variant, f"md5 {md5} is DDIM's published md5 of {release}"
    if which == "ema":
        return "ema", "EMA element of a DDIM training checkpoint"
    if which == "model":
        return "non-ema", "model element of a DDIM training checkpoint (raw weights)"
    where = path.absolute().as_posix()
    if "ema_diffusion_cifar10_model" in where:
        return "ema", "path names ema_diffusion_cifar10_model (DDIM's EMA release), md5 not the published one"
    if "diffusion_cifar10_model" in where:
        return "non-ema", "path names diffusion_cifar10_model (DDIM's raw release), md5 not the published one"
    return "unknown", "neither the file's md5 nor its path identifies a DDIM release"


def _load_original(path: Path, element: str):
    from diffusers import UNet2DModel

    obj = _read(path)
    state, which = _select(obj, element, path)
    state = _strip_module_prefix(state)
    if "conv_in.weight" in state and any(k.startswith("down_blocks.") for k in state):
        raise BenchError(f"{path} holds diffusers-layout weights; pass the directory holding it and its config.json")
    try:
        converted = original_to_diffusers(state)  # strict: every key known, present and of its shape
    except BenchError as exc:
        raise BenchError(f"{path}: {exc}") from None
    with torch.device("meta"):
        unet = UNet2DModel(**_unet_kwargs())
    # assign: the meta model takes the checkpoint's tensors instead of random ones it would overwrite
    unet.load_state_dict({k: v.float().contiguous() for k, v in converted.items()}, strict=True, assign=True)
    md5 = _md5_file(path)
    variant, evidence = _original_variant(path, which, md5)
    info = {"source": "original", "checkpoint": str(path), "files": {path.name: sha256_file(path)}, "md5": md5,
            "element": which, "variant": variant, "variant_source": evidence}
    return unet, info
