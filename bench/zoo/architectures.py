"""Architecture configs of published denoisers, as plain ``UNet2DModel`` keyword dicts.

These let cost accounting (MACs, GBops, state memory) run on the exact published shapes without downloading weights:
the counts depend only on the architecture, so a randomly initialised copy gives the same numbers.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import UNet2DModel

# Source: Hugging Face checkpoint ``google/ddpm-cifar10-32`` (unet config.json, written by diffusers 0.0.4 when the
# original DDPM CIFAR-10 TF checkpoint of Ho et al. 2020 was converted). Values checked against copies of that
# config.json re-saved by diffusers 0.5 / 0.16 from the google/ddpm-cifar10-32 snapshots (their "_name_or_path" points
# there) and against a repository quoting huggingface.co/google/ddpm-cifar10-32/tree/main. Note the up path is the
# mirror of the down path, so attention sits at index 2 of up_block_types (16x16), not index 1.
# Only constructor arguments are kept ("_class_name" / "_diffusers_version" dropped); keys that diffusers added later
# (add_attention, resnet_time_scale_shift, ...) are left to their defaults, which match the converted model.
DDPM_CIFAR10_32: dict = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "act_fn": "silu",
    "attention_head_dim": None,  # None = one head spanning all channels, as in the original DDPM
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
}


def build_random_unet(config: dict, seed: int = 0) -> UNet2DModel:
    """Instantiate ``config`` with seeded random weights: enough for shape-only work such as MAC counting."""
    from diffusers import UNet2DModel

    # deep copy so the module-level dicts cannot be mutated through the model's config; "_" keys are metadata
    kwargs = {k: copy.deepcopy(v) for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    return UNet2DModel(**kwargs)
