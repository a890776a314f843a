"""The embedded dataset: scikit-learn's bundled 8x8 digits, upsampled to 16x16 in [-1, 1].

16x16 is the smallest power-of-two size that lets a UNet downsample twice (16 -> 8 -> 4) and
still hold an attention block at 8x8 and at the 4x4 bottleneck; bilinear upsampling keeps
strokes smooth instead of blocky.

The split is fixed by index, stratified by class, and uses no random number generator: within
each class, every 5th image (in dataset order) is held out, giving 1,433 training and 364
held-out images (35-37 per class). The held-out set is cut the same way into halves 'heldout-a'
(185) and 'heldout-b' (179), so that a Frechet distance between two real sets the classifier
never saw can calibrate what a good distance is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
HELDOUT_EVERY = 5


@dataclass(frozen=True)
class DigitsSplit:
    images: torch.Tensor  # (N, 1, 16, 16) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64


def _load_all() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = torch.from_numpy(digits.images.astype(np.float32) / 16.0)  # (1797, 8, 8) in [0, 1]
    up = F.interpolate(raw[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = (up.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return images, labels


SPLITS = ("train", "heldout", "heldout-a", "heldout-b", "all")


def _every_kth_per_class(labels: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the candidates whose rank within their class (in dataset order) is a multiple of k."""
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        members = torch.nonzero(candidates & (labels == c)).flatten()
        mask[members[::k]] = True
    return mask


def load_digits_split(split: str) -> DigitsSplit:
    """One of ``SPLITS``; see the module docstring."""
    images, labels = _load_all()
    everything = torch.ones(len(labels), dtype=torch.bool)
    heldout = _every_kth_per_class(labels, everything, HELDOUT_EVERY)
    half_a = _every_kth_per_class(labels, heldout, 2)
    keep = {
        "train": ~heldout, "heldout": heldout, "heldout-a": half_a, "heldout-b": heldout & ~half_a,
        "all": everything,
    }.get(split)
    if keep is None:
        raise ValueError(f"unknown digits split {split!r}; expected one of {', '.join(SPLITS)}")
    return DigitsSplit(images[keep], labels[keep])


def save_grid(
    images: torch.Tensor, path, ncol: int | None = None, scale: int = 4, image_format: str | None = None
) -> None:
    """Save images as one PNG grid, nearest-neighbour upscaled so 16x16 digits are visible."""
    from PIL import Image
    from torchvision.utils import make_grid

    ncol = ncol or int(np.ceil(np.sqrt(len(images))))
    grid = make_grid((images.detach().float().cpu().clamp(-1, 1) + 1) / 2, nrow=ncol, padding=1, pad_value=1.0)
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if images.shape[1] == 1 else arr)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path, format=image_format)
