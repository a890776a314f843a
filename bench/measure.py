"""Wall-clock and peak memory of one sampling run."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak then covers the whole process


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Measurement:
    seconds: float
    peak_rss_bytes: int
    cuda_peak_bytes: int | None  # torch.cuda.max_memory_allocated during the run; None on CPU


def measured(fn: Callable[[], T], device: torch.device | str) -> tuple[T, Measurement]:
    """Run ``fn`` once; wall-clock with CUDA synchronised before and after, peak process RSS and
    (on CUDA) peak allocated memory over the call alone."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return result, Measurement(seconds, peak_rss_bytes(), torch.cuda.max_memory_allocated(device) if cuda else None)
