"""modiff.allocator: glibc's malloc keeps the blocks a sampling loop frees and takes back (issue #29, item 1)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import modiff
from modiff import allocator

GLIBC = allocator._glibc() is not None

# a fresh process frees one block of MiB megabytes and says how much of it its RSS gave back: glibc's default serves
# such a block with mmap (threshold 128 KiB at start) and unmaps it on free; tuned, it comes from the heap and stays
_RSS_AFTER_FREE = textwrap.dedent("""
    import os, sys
    import torch
    import modiff
    {setup}
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
    t = torch.empty({mib} << 18).fill_(1.0)   # touched
    held = rss()
    del t
    print((held - rss()) >> 20)
""")


def _given_back_mib(setup: str, env: dict | None = None, mib: int = 16) -> int:
    out = subprocess.run([sys.executable, "-c", _RSS_AFTER_FREE.format(setup=setup, mib=mib)], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def fresh(monkeypatch):
    """This process's record of what was tuned, emptied for the test (the settings themselves stay: harmless)."""
    monkeypatch.setattr(allocator, "_TUNED", {})
    monkeypatch.delenv("MODIFF_ALLOCATOR", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_tuned_glibc_keeps_a_freed_block_that_default_glibc_unmaps():
    assert _given_back_mib("") >= 15  # default: the 16 MiB go back to the kernel at once
    assert _given_back_mib("modiff.tune_allocator()") == 0
    # quantize tunes it (a plain script gets it), and MODIFF_ALLOCATOR=default opts out
    quantize = ("modiff.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), modiff.ModiffConfig())")
    assert _given_back_mib(quantize) == 0
    assert _given_back_mib(quantize, {"MODIFF_ALLOCATOR": "default"}) >= 15


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_tuned_glibc_keeps_blocks_above_the_largest_mmap_threshold():
    """A 256-channel 32x32 activation at batch 32 is 32 MiB: at or above glibc's largest mmap threshold, so the
    threshold alone left it mmap'd and faulted in again at every step (issue #29's settings); mmap_max=0 keeps it."""
    assert _given_back_mib("modiff.tune_allocator(mmap_max=65536)", mib=64) >= 63  # glibc's own mmap_max
    assert _given_back_mib("modiff.tune_allocator()", mib=32) == 0
    assert _given_back_mib("modiff.tune_allocator()", mib=64) == 0


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_settings_are_recorded_and_idempotent(fresh):
    assert modiff.allocator_settings() == {"allocator": "glibc", "mallopt": {}, "glibc_tunables": None}
    made = modiff.tune_allocator()
    assert made == {"mmap_threshold": 32 << 20, "trim_threshold": 2**31 - 1, "top_pad": 256 << 20, "mmap_max": 0}
    assert modiff.tune_allocator() == made
    assert modiff.allocator_settings()["mallopt"] == made


def test_opt_out_preload_and_a_bad_value(fresh, monkeypatch):
    monkeypatch.setenv("MODIFF_ALLOCATOR", "default")
    assert modiff.tune_allocator() == {} and modiff.allocator_settings()["mallopt"] == {}
    monkeypatch.setenv("MODIFF_ALLOCATOR", "jemalloc")
    with pytest.raises(ValueError, match="MODIFF_ALLOCATOR must be 'tuned' or 'default'"):
        modiff.tune_allocator()
    monkeypatch.delenv("MODIFF_ALLOCATOR")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert modiff.tune_allocator() == {}  # another allocator is in front of glibc's: left alone
    assert modiff.allocator_settings()["allocator"] == "libtcmalloc_minimal.so.4"
    with pytest.raises(ValueError, match="top_pad"):
        monkeypatch.delenv("LD_PRELOAD")
        modiff.tune_allocator(top_pad=-1)


def test_quantize_tunes_the_allocator(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(modiff.api, "tune_allocator", lambda: calls.append(1))
    modiff.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), modiff.ModiffConfig())
    assert calls == [1]


def test_a_bad_allocator_choice_is_one_line_for_the_cli(monkeypatch, capsys):
    from bench.cli import main

    monkeypatch.setenv("MODIFF_ALLOCATOR", "fast")
    assert main(["run", "digits", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MODIFF_ALLOCATOR must be" in err[0]
