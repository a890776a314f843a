"""The kernel-level numbers behind docs/performance.md's step 2 of issue 29, repeatable: what one 3x3 convolution
costs in FP32, BF16 and oneDNN's u8 x s8 int8 (the ceiling of int8 execution on this CPU), GroupNorm + SiLU + the
compiled quantizing pass unfused, with the SiLU fused (``fuse_norms``) and with inductor's GroupNorm fused too
(tried and dropped), and a ``torch.cat`` whose result is larger than glibc's largest mmap threshold.

Every timing is the median of ``--reps`` calls after three warm-up calls, in one process under the allocator
``modiff.tune_allocator()`` sets up (``MODIFF_ALLOCATOR=default`` for glibc's as it comes), with the CPU flags and
the allocator in the table's header and the JSON.

    python benchmarks/kernel_ceiling.py    # batch 32, 128 channels, 32x32 (the CIFAR-10 UNet's top level)
    python benchmarks/kernel_ceiling.py --batch 64 --channels 256 --out runs/bench/kernel_ceiling.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _common import describe_allocator, run_script, setup_allocator, write_table

from bench.errors import BenchError
from bench.provenance import cpu_flags, timing_environment
from modiff import kernels


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _group_norm_silu_quantize(x, ref, w, b, groups: int, eps: float, dims, bits: int):
    """GroupNorm, SiLU and the residual's quantizing pass in one function, for inductor to fuse whole."""
    return kernels.quantize_residual(F.silu(F.group_norm(x, groups, w, b, eps)), ref, dims, bits, True, False, True)


def measure(batch: int, channels: int, size: int, reps: int) -> dict[str, dict]:
    """name -> {"ms": median milliseconds, "gmacs": multiply-adds per second / 1e9 (convolutions only)}."""
    torch.manual_seed(0)
    shape = (batch, channels, size, size)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 3, 3)
    macs = batch * channels * channels * 9 * size * size
    rows: dict[str, dict] = {}

    def conv(name: str, fn) -> None:
        ms = _median_ms(fn, reps)
        rows[name] = {"ms": ms, "gmacs": macs / ms / 1e6}

    conv("conv3x3 fp32", lambda: F.conv2d(x, w, padding=1))
    xb, wb = x.bfloat16(), w.bfloat16().contiguous(memory_format=torch.channels_last)
    conv("conv3x3 bf16", lambda: F.conv2d(xb, wb, padding=1))
    u = torch.randint(0, 255, shape, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    w_q = torch.randint(-127, 128, (channels, channels, 3, 3), dtype=torch.int8)
    op = kernels.Operator(torch.nn.Conv2d(channels, channels, 3, padding=1), "int8", 8)
    scale = torch.ones(channels)
    conv("conv3x3 int8 u8 x s8 -> f32 (oneDNN)", lambda: op(u, w_q, scale))

    # ref (MoDiff's â) is updated in place at each call, as in sampling: it converges to the activation, same work
    gn_w, gn_b, ref = torch.randn(channels), torch.randn(channels), torch.randn(shape)
    dims, groups, eps = (1, 2, 3), 32 if channels % 32 == 0 else 1, 1e-6
    plain, silu = kernels.compiled("quantize_residual"), kernels.compiled("quantize_residual_silu")
    whole = torch.compile(_group_norm_silu_quantize, dynamic=True)
    for name, fn in (
        ("GroupNorm + SiLU, then the compiled pass (unfused)",
         lambda: plain(F.silu(F.group_norm(x, groups, gn_w, gn_b, eps)), ref, dims, 8, True, False, True)),
        ("GroupNorm, then the compiled pass with the SiLU (fuse_norms)",
         lambda: silu(F.group_norm(x, groups, gn_w, gn_b, eps), ref, dims, 8, True, False, True)),
        ("all three compiled by inductor (dropped)",
         lambda: whole(x, ref.clone(), gn_w, gn_b, groups, eps, dims, 8)),
        ("torch.cat of two: a block of 2x the input", lambda: torch.cat([x, x], dim=1)),
    ):
        rows[name] = {"ms": _median_ms(fn, reps), "gmacs": None}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--channels", type=int, default=128, help="channels in and out (default: 128)")
    parser.add_argument("--size", type=int, default=32, help="height = width (default: 32)")
    parser.add_argument("--reps", type=int, default=9, help="timed calls per measurement, median (default: 9)")
    parser.add_argument("--out", default="runs/bench/kernel_ceiling.json",
                        help="the JSON written (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("batch", "channels", "size", "reps"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name} must be at least 1; got {getattr(args, name)}")
    args.device = "cpu"
    allocator = setup_allocator()
    rows = measure(args.batch, args.channels, args.size, args.reps)
    flags = cpu_flags()
    lines = [f"CPU flags: {flags}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"input ({args.batch}, {args.channels}, {args.size}, {args.size}) channels-last float32; median of "
             f"{args.reps} calls; {describe_allocator(allocator)}", "",
             "| measurement | ms | GMAC/s |", "| --- | --- | --- |"]
    for name, r in rows.items():
        gmacs = "" if r["gmacs"] is None else f"{r['gmacs']:.0f}"
        lines.append(f"| {name} | {r['ms']:.2f} | {gmacs} |")
    write_table(args, rows, lines, cpu_flags=flags, timing_environment=timing_environment("cpu", "channels_last"))
    return 0


if __name__ == "__main__":
    run_script(main, sys.argv[0])
