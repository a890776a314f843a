"""The embedded default: a small diffusers UNet2DModel trained by ``bench.train`` on digits."""

from __future__ import annotations

from pathlib import Path

from modiff.schedules import NoiseSchedule

from ..domain import DigitClassifier
from ..errors import BenchError
from .checkpoints import (
    check_config,
    check_loading_info,
    first_line,
    load_strict,
    read_config,
    read_manifest,
    read_safetensors,
    verify_files,
)
from .model import ZooModel, unet_denoiser
from .registry import ReferenceData, ZooEntry, register_model

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits"
HINT = "retrain with 'nox -s train-tiny' or restore the packaged files (git checkout bench/assets)"

IMAGE_SHAPE = (1, 16, 16)
NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02

# 16 -> 8 -> 4 with attention at 8x8 (AttnDownBlock2D / AttnUpBlock2D) and in the 4x4 mid block;
# skip connections between every down and up block. ~0.3M parameters.
UNET_ARCH = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}

UNET_FILES = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
CLASSIFIER_FILES = ["classifier/config.json", "classifier/model.safetensors"]


def schedule() -> NoiseSchedule:
    return NoiseSchedule.linear(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS)


def load_unet(checkpoint: Path | None = None):
    from diffusers import UNet2DModel

    directory = Path(checkpoint) if checkpoint else ASSET_DIR
    manifest = read_manifest(directory, HINT)
    verify_files(directory, manifest, UNET_FILES, HINT)
    check_config(directory / "unet" / "config.json", UNET_ARCH, "digits UNet")
    # safetensors only (a .bin beside it is never read); the loading report: diffusers would leave a
    # missing tensor at its random initialisation
    try:
        unet, loading = UNet2DModel.from_pretrained(directory / "unet", local_files_only=True, use_safetensors=True,
                                                    low_cpu_mem_usage=False, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BenchError(f"cannot load the digits UNet from {directory / 'unet'}: {first_line(exc)}") from None
    check_loading_info(loading, f"digits UNet weights {directory / UNET_FILES[1]}")
    return unet.eval().requires_grad_(False), manifest


CLASSIFIER_CONFIG_KEYS = ("width", "feature_dim", "num_classes")  # DigitClassifier's constructor arguments


def load_classifier(checkpoint: Path | None = None) -> DigitClassifier:
    directory = Path(checkpoint) if checkpoint else ASSET_DIR
    manifest = read_manifest(directory, HINT)
    verify_files(directory, manifest, CLASSIFIER_FILES, HINT)
    config_path = directory / CLASSIFIER_FILES[0]
    config = read_config(config_path, "digits classifier")
    bad = [k for k, v in config.items()
           if k not in CLASSIFIER_CONFIG_KEYS or not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise BenchError(f"digits classifier config {config_path}: unknown or invalid {', '.join(bad)} (expected "
                         f"positive integers {', '.join(CLASSIFIER_CONFIG_KEYS)})")
    weights = directory / CLASSIFIER_FILES[1]
    model = load_strict(DigitClassifier(**config), read_safetensors(weights, "digits classifier weights"),
                        f"digits classifier weights {weights}")
    return model.eval().requires_grad_(False)


def load(checkpoint: Path | None = None) -> ZooModel:
    """The zoo entry: the packaged model, or a retrained one in ``checkpoint`` (``modiff-bench train-tiny``)."""
    unet, manifest = load_unet(checkpoint)
    return ZooModel(
        name="digits", unet=unet, schedule=schedule(), image_shape=IMAGE_SHAPE,
        default_sampler="ddim-quad", default_steps=100,
        info={"checkpoint": str(checkpoint or ASSET_DIR), "files": manifest["files"]},
    )


ENTRY = register_model(ZooEntry(
    name="digits", load=load, train_timesteps=NUM_TRAIN_TIMESTEPS, output_size=IMAGE_SHAPE[1:],
    description="embedded default: 16x16 digits UNet trained by this project (committed, no download)",
    reference=ReferenceData("digits-train", "the training digits shipped with the package"),
))

__all__ = ["ENTRY", "load", "load_classifier", "load_unet", "schedule", "unet_denoiser"]  # unet_denoiser: its old home
