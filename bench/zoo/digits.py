"""The embedded default: a small diffusers UNet2DModel trained by ``bench.train`` on digits."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from ..domain import DigitClassifier
from ..errors import BenchError
from ..schedules import NoiseSchedule
from .checkpoints import check_config, read_manifest, verify_files

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
    try:
        unet = UNet2DModel.from_pretrained(directory / "unet", local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BenchError(f"cannot load the digits UNet from {directory / 'unet'}: {str(exc).splitlines()[0]}") from None
    return unet.eval().requires_grad_(False), manifest


def load_classifier(checkpoint: Path | None = None) -> DigitClassifier:
    import json

    directory = Path(checkpoint) if checkpoint else ASSET_DIR
    manifest = read_manifest(directory, HINT)
    verify_files(directory, manifest, CLASSIFIER_FILES, HINT)
    config = json.loads((directory / "classifier" / "config.json").read_text())
    model = DigitClassifier(**config)
    try:
        model.load_state_dict(load_file(directory / "classifier" / "model.safetensors"))
    except RuntimeError as exc:
        raise BenchError(f"digits classifier weights do not match its config: {str(exc).splitlines()[0]}") from None
    return model.eval().requires_grad_(False)


from . import unet_denoiser  # noqa: E402  (re-exported: its historical home)

__all__ = ["unet_denoiser"]
