"""The process's memory allocator, which decides a third of int8 MoDiff's time on a CPU.

A denoiser step frees and allocates the same large blocks (activations, residuals, kernel outputs)
at every call. glibc's malloc serves blocks above its mmap threshold (128 KiB at start, raised
dynamically up to 32 MiB) with ``mmap`` and returns them with ``munmap``, and trims the top of its
heap when more than ``trim_threshold`` is free there, so each step faults the same pages in again.
:func:`tune_allocator` keeps those blocks in the heap (``mallopt``, the run-time form of
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=...:glibc.malloc.top_pad=...``,
plus ``glibc.malloc.mmap_max=0``: 32 MiB is the largest threshold glibc takes, and larger blocks are common).
It changes where memory comes from, never a value; freed memory stays with the process (its RSS
does not shrink back between steps). ``modiff.quantize`` calls it once per process (so a plain
``python`` script gets it), as do ``modiff-bench`` and ``benchmarks/`` at start-up;
``MODIFF_ALLOCATOR=default`` in the environment leaves glibc as it comes (to measure the
difference). Another allocator loaded with ``LD_PRELOAD`` (tcmalloc, jemalloc) is left alone.
:func:`allocator_settings` says what is in effect, for the record of every timing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): blocks below it stay in the heap
# blocks of 32 MiB and more are mmap'd whatever the threshold (it cannot go higher), and a CIFAR-10 UNet at batch 64
# frees and takes back dozens of them per step (a 128-channel 32x32 activation is 32 MiB): at most 0 mmap'd blocks
# puts them in the heap too
MMAP_MAX = 0
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: the largest, about 2 GiB free at the top before trimming
TOP_PAD = 256 << 20  # grow the heap by 256 MiB at a time

_TUNED: dict[str, int] = {}


@functools.cache
def _glibc():
    """glibc's C library, or None (not Linux, or another libc); looked up once (``platform.libc_ver`` reads the
    Python executable, and every timing's record asks)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


PRELOADED_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")  # libraries LD_PRELOAD puts in front of glibc's malloc


def is_allocator_library(path: str) -> bool:
    """Whether an LD_PRELOAD entry is one of :data:`PRELOADED_ALLOCATORS`."""
    return any(k in os.path.basename(path) for k in PRELOADED_ALLOCATORS)


def _preloaded() -> str | None:
    """The allocator LD_PRELOAD puts in front of glibc's (tcmalloc, jemalloc, mimalloc), if any."""
    for part in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        if is_allocator_library(part):
            return os.path.basename(part)
    return None


OPT_OUT = "MODIFF_ALLOCATOR"  # =default: tune_allocator() changes nothing


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD,
                   top_pad: int = TOP_PAD, mmap_max: int = MMAP_MAX) -> dict[str, int]:
    """Keep the blocks a sampling loop frees and takes back in glibc's heap (see the module's text). Returns the
    settings made (empty where the allocator is not glibc's, or another one is preloaded). Idempotent; the
    settings hold for the rest of the process."""
    choice = os.environ.get(OPT_OUT, "").strip().lower()
    if choice not in ("", "tuned", "default"):
        raise ValueError(f"{OPT_OUT} must be 'tuned' or 'default' (glibc's malloc as it comes); got {choice!r}")
    libc = _glibc()
    if libc is None or _preloaded() or choice == "default":
        return {}
    wanted = {"mmap_threshold": (_M_MMAP_THRESHOLD, mmap_threshold), "trim_threshold": (_M_TRIM_THRESHOLD,
              trim_threshold), "top_pad": (_M_TOP_PAD, top_pad), "mmap_max": (_M_MMAP_MAX, mmap_max)}
    for name, (param, value) in wanted.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= TRIM_THRESHOLD:
            raise ValueError(f"{name} must be an integer number of bytes in 0..{TRIM_THRESHOLD}; got {value!r}")
        if libc.mallopt(param, value) != 1:
            raise OSError(f"glibc's mallopt refused {name}={value}")
        _TUNED[name] = value
    return dict(_TUNED)


def allocator_settings() -> dict[str, object]:
    """What allocates this process's memory: ``{"allocator": "glibc" | the preloaded library | "other",
    "mallopt": {...} (what :func:`tune_allocator` set), "glibc_tunables": the environment's, or None}``."""
    preloaded = _preloaded()
    name = preloaded or ("glibc" if _glibc() is not None else "other")
    return {"allocator": name, "mallopt": dict(_TUNED) if not preloaded else {},
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES") or None}
