"""Naming the device a command runs on: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``, checked before anything runs."""

from __future__ import annotations

import torch

from .errors import BenchError


def resolve_device(device: str) -> torch.device:
    """The device ``device`` names: ``cpu``, ``cuda`` or ``cuda:N`` (BenchError for another name, or CUDA
    without CUDA)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BenchError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"unsupported device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
    return dev


def pick_device(device: str, here: bool = True) -> torch.device:
    """The device ``device`` names (``auto``: CUDA when available); BenchError for an unknown name or,
    ``here``, one this machine lacks. ``here=False`` checks the name only: for jobs that run on other
    machines (SLURM nodes, whose GPUs the submitting host need not have)."""
    if device == "auto":
        return torch.device("cuda" if here and torch.cuda.is_available() else "cpu")
    if not here and device.startswith("cuda"):
        try:
            return torch.device(device)
        except RuntimeError:
            raise BenchError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BenchError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} GPU(s) "
                         f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return dev


def float16_emulated(device: torch.device) -> bool:
    """Whether float16 convolutions and matmuls on ``device`` run without native kernels: a CPU where oneDNN has
    no float16 support (no AVX512-FP16 or AMX-FP16), so torch falls back to reference loops (measured 100-160x
    slower than float32 on an AVX512-VNNI EPYC). GPUs have float16 kernels."""
    if device.type != "cpu":
        return False
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)
    return supported is None or not supported()
