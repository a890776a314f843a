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
      chooses). It is converted by :mod:`bench.zoo.convert.ddpm` (``original_to_diffusers``) and loaded strictly.
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

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from modiff.schedules import NoiseSchedule

from ..errors import BenchError
from ..provenance import sha256_file
from .architectures import DDPM_CIFAR10_32
from .checkpoints import DIFFUSERS_WEIGHTS, check_config, load_diffusers_model, read_safetensors, read_torch_file
from .convert.ddpm import (
    ELEMENTS,
    diffusers_to_original,
    layout,
    original_to_diffusers,
    select_state_dict,
    strip_module_prefix,
    to_unet,
)
from .model import ZooModel
from .registry import ReferenceData, ZooEntry, register_model

if TYPE_CHECKING:
    from diffusers import UNet2DModel

NAME = "ddpm-cifar10"
HUB_ID = "google/ddpm-cifar10-32"
IMAGE_SHAPE = (3, 32, 32)
NUM_TRAIN_TIMESTEPS = 1000

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

WEIGHT_FILES = DIFFUSERS_WEIGHTS  # safetensors preferred
# the converter's functions, re-exported from their historical home (callers and tests import them from here)
_layout = layout
__all__ = ["ENTRY", "diffusers_to_original", "load", "load_unet", "original_to_diffusers", "schedule"]


def schedule() -> NoiseSchedule:
    return NoiseSchedule.linear(1e-4, 0.02, NUM_TRAIN_TIMESTEPS)


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
    unet, weights = load_diffusers_model(UNet2DModel, model_dir, "DDPM CIFAR-10 UNet", HINT,
                                         weights_what="DDPM CIFAR-10 weights")
    return unet, {"files": {weights.relative_to(directory).as_posix(): sha256_file(weights)}}


# ----------------------------------------------------------------------------------------------------- original layout


def _read(path: Path):
    """safetensors, or ``torch.load(weights_only=True)``: never code from the file."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, "DDPM CIFAR-10 checkpoint")
    return read_torch_file(path, "DDPM CIFAR-10 checkpoint")


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
    obj = _read(path)
    state, which = select_state_dict(obj, element, path)
    state = strip_module_prefix(state)
    if "conv_in.weight" in state and any(k.startswith("down_blocks.") for k in state):
        raise BenchError(f"{path} holds diffusers-layout weights; pass the directory holding it and its config.json")
    try:
        unet = to_unet(state)  # strict: every key known, present and of its shape
    except BenchError as exc:
        raise BenchError(f"{path}: {exc}") from None
    md5 = _md5_file(path)
    variant, evidence = _original_variant(path, which, md5)
    info = {"source": "original", "checkpoint": str(path), "files": {path.name: sha256_file(path)}, "md5": md5,
            "element": which, "variant": variant, "variant_source": evidence}
    return unet, info


ENTRY = register_model(ZooEntry(
    name=NAME, load=load, train_timesteps=NUM_TRAIN_TIMESTEPS, output_size=IMAGE_SHAPE[1:],
    description=f"DDPM CIFAR-10 32x32 (Ho et al.): {HUB_ID}, a diffusers directory, or the original "
                "model-790000.ckpt (the papers used the EMA one)",
    reference=ReferenceData("cifar10-train", "CIFAR-10 train, 50,000 images"),
))


# ------------------------------------------------------------------------------------------ random weights, for speed

RANDOM_NAME = "ddpm-cifar10-random"
RANDOM_SEED = 0


def load_random(checkpoint: str | Path | None = None) -> ZooModel:
    """The DDPM CIFAR-10 architecture (35.7 M parameters, the exact published configuration) with weights
    drawn from diffusers' initialisation under seed 0: nothing to download, for measuring speed and
    memory (the `cifar10-speed` preset). Its samples are not images of anything; quality against its own
    full precision (``psnr_to_fp``) is defined, the Inception metrics are not."""
    if checkpoint is not None:
        raise BenchError(f"{RANDOM_NAME} takes no checkpoint (its weights are random, seed {RANDOM_SEED}); "
                         f"use {NAME} for real weights")
    from .architectures import build_random_unet

    unet = build_random_unet(DDPM_CIFAR10_32, seed=RANDOM_SEED).eval().requires_grad_(False)
    return ZooModel(name=RANDOM_NAME, unet=unet, schedule=schedule(), image_shape=IMAGE_SHAPE,
                    default_sampler="ddim-quad", default_steps=100, default_batch_size=64,
                    info={"source": "random", "seed": RANDOM_SEED, "architecture": NAME})


RANDOM_ENTRY = register_model(ZooEntry(
    name=RANDOM_NAME, load=load_random, train_timesteps=NUM_TRAIN_TIMESTEPS, output_size=IMAGE_SHAPE[1:],
    description=f"the {NAME} architecture with seeded random weights (no download): speed and memory only",
    reference=ReferenceData(None, "none: random weights"),
))
