"""Sample-level metrics against the full-precision model's samples from the same noise."""

from __future__ import annotations

import math

import torch


def mse_to_fp(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error on images mapped to [0, 1] (clipped), over all pixels of all images."""
    if samples.shape != reference.shape:
        raise ValueError(f"shape mismatch: {tuple(samples.shape)} vs {tuple(reference.shape)}")
    a = ((samples.double() + 1) / 2).clamp(0, 1)
    b = ((reference.double() + 1) / 2).clamp(0, 1)
    return float((a - b).pow(2).mean())


def psnr_to_fp(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of [0, 1] images against the reference: ``10 log10(1 / MSE)`` with the MSE over
    the whole set (inf when identical)."""
    mse = mse_to_fp(samples, reference)
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
