"""What every benchmark script starts and ends with: set up the process's memory allocator, print its table,
write it with provenance (the allocator in effect included), and turn bad input into one line and exit status 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from bench.errors import BenchError

# --allocator: how a timing script's process allocates memory (modiff/allocator.py says why it matters)
ALLOCATORS = {
    "tuned": "glibc's malloc with modiff.allocator.tune_allocator()'s settings (large blocks stay in the heap)",
    "default": "glibc's malloc as it comes (its mmap / trim thresholds; GLIBC_TUNABLES if the environment sets any)",
    "tcmalloc": "gperftools' tcmalloc, loaded with LD_PRELOAD (the process must already run under it)",
}
# where tcmalloc is looked for, first found wins (Debian / Ubuntu: libtcmalloc-minimal4, libgoogle-perftools4)
TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4")


def tcmalloc_library() -> str | None:
    """The first of :data:`TCMALLOC_PATHS` that exists, else None."""
    return next((p for p in TCMALLOC_PATHS if os.path.exists(p)), None)


def setup_allocator(choice: str | None = None) -> dict:
    """Make the allocator ``choice`` (one of :data:`ALLOCATORS`) this process's, first thing in a timing script:
    ``tuned`` calls ``modiff.allocator.tune_allocator()``, ``default`` leaves glibc's as it is, ``tcmalloc`` checks
    that LD_PRELOAD loaded it. Returns ``allocator_settings()`` with ``choice`` added, for the record. BenchError
    (one line) for an unknown name, tcmalloc without its preload, or tuned / default under another preloaded
    allocator (what is timed would not be what the table says). ``None`` (the scripts without an ``--allocator``
    option): tune glibc's, leave a preloaded one alone, as ``modiff-bench`` does."""
    from modiff.allocator import OPT_OUT, allocator_settings, tune_allocator

    if choice is None:
        return allocator_record("tuned" if tune_allocator() else "as loaded")
    if choice not in ALLOCATORS:
        raise BenchError(f"unknown allocator {choice!r}; one of: {', '.join(ALLOCATORS)}")
    name = allocator_settings()["allocator"]
    preloaded = name if name not in ("glibc", "other") else None  # a library LD_PRELOAD puts in front of glibc
    if choice == "tcmalloc":
        if not preloaded or "tcmalloc" not in preloaded:
            raise BenchError("--allocator tcmalloc needs the process to start under LD_PRELOAD="
                             f"{tcmalloc_library() or TCMALLOC_PATHS[0]} (or use --allocators tcmalloc, which "
                             "starts it so)")
    elif preloaded:
        raise BenchError(f"--allocator {choice} is glibc's malloc, but LD_PRELOAD loads {preloaded} in front of it; "
                         "unset LD_PRELOAD (or use --allocator tcmalloc under tcmalloc)")
    else:
        # what modiff.quantize's own tune_allocator() call does later in this process follows the choice too
        os.environ[OPT_OUT] = choice
        if choice == "tuned":
            tune_allocator()  # {} where the C library is not glibc: allocator_settings() then says "other"
    return allocator_record(choice)


def allocator_record(choice: str | None) -> dict:
    """``modiff.allocator.allocator_settings()`` now, with the ``--allocator`` choice: what a result records."""
    from modiff.allocator import allocator_settings

    return {"choice": choice, **allocator_settings()}


def describe_allocator(settings: dict) -> str:
    """One line for a table's header: the allocator chosen and what is in effect."""
    name = settings.get("allocator")
    text = f"allocator: {settings.get('choice', '?')} ({name}"
    if settings.get("mallopt"):
        text += ", mallopt " + " ".join(f"{k}={v}" for k, v in settings["mallopt"].items())
    elif name == "glibc":
        text += ", as it comes"
    elif name != "other":
        text += ", LD_PRELOAD"
    if settings.get("glibc_tunables"):
        text += f"; GLIBC_TUNABLES={settings['glibc_tunables']}"
    return text + ")"


def write_table(args, results: dict, lines: list[str], **extra) -> None:
    """Print ``lines`` and write them with ``results``, the settings, provenance and the allocator in effect
    (``extra`` adds or replaces top-level keys) to ``args.out``."""
    from bench.provenance import provenance, write_json_atomic
    from modiff.allocator import allocator_settings

    print("\n".join(lines))
    write_json_atomic(args.out, {"settings": vars(args), "results": results, "table": lines,
                                 "provenance": provenance(args.device), "allocator": allocator_settings(), **extra})
    print(f"-> {args.out}")


def run_script(main: Callable[[], int], script: str) -> None:
    try:
        raise SystemExit(main())
    except (ValueError, BenchError) as exc:  # bad bits / names: one line, not a traceback
        print(f"{Path(script).name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
