"""The kernel-level numbers behind docs/performance.md's issue 29 sections, repeatable: what one 3x3 convolution
costs in FP32, BF16 and oneDNN's u8 x s8 int8 (the ceiling of int8 execution on this CPU); an add that shows the
memory's pace; GroupNorm, SiLU and the compiled quantizing pass alone (also with a static scale), GroupNorm +
SiLU + the pass unfused, with the SiLU fused (``fuse_norms``) and all three compiled by inductor (tried and
dropped); a ``torch.cat`` whose result is larger than glibc's largest mmap threshold; and one resnet block
quantized as ``int8-modiff-w8a8-sample-fused``, through the library's layers and as one compiled region with the
int8 kernel and GroupNorm as opaque custom ops (tried and dropped).

The quantizing passes read their operands as the layers keep them: the input channels-last and MoDiff's ``â`` in
the input's layout (a copy of it); the JSON records, per pass, the layout of what it reads. Every timing is the
median of ``--reps`` calls after three warm-up calls (the passes, and the two forms of the block, in turn: one
call of each per round), in one process under the allocator ``modiff.tune_allocator()`` sets up
(``MODIFF_ALLOCATOR=default`` for glibc's as it comes), with the CPU flags and the allocator in the table's header
and the JSON.

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
    return _interleaved_ms({"": fn}, reps)[""]


def _interleaved_ms(fns: dict, reps: int) -> dict[str, float]:
    """name -> median milliseconds of ``reps`` calls of each function, taken in turn (one call of each per
    round, after three warm-up rounds), so that a machine's drift falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(3 + reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _group_norm_silu_quantize(x, ref, w, b, groups: int, eps: float, dims, bits: int):
    """GroupNorm, SiLU and the residual's quantizing pass in one function, for inductor to fuse whole."""
    return kernels.quantize_residual(F.silu(F.group_norm(x, groups, w, b, eps)), ref, dims, bits, True, False, True)


def _layout(*tensors: torch.Tensor) -> str:
    """``channels_last`` when every operand is (as the layers keep them: MoDiff's ``â`` is a copy of the input,
    in its layout), else ``mixed``: a pass reading one operand across the other's layout is several times slower."""
    return "channels_last" if all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors) else "mixed"


# -- a resnet block as one compiled region (tried for issue 29 and dropped): inside it the int8 kernel and ATen's
# GroupNorm are opaque custom ops (inductor takes neither oneDNN's prepacked weights nor, at speed, the norm)
_REGION_LAYERS: dict[int, torch.nn.Module] = {}


@torch.library.custom_op("modiff_bench::int8_conv", mutates_args=())
def _int8_conv(u: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, handle: int) -> torch.Tensor:
    return _REGION_LAYERS[handle]._op(u, w_q, w_scale).contiguous(memory_format=torch.channels_last)


@_int8_conv.register_fake
def _(u, w_q, w_scale, handle):
    return torch.empty((u.shape[0], w_q.shape[0], *u.shape[2:]), dtype=torch.float32, device=u.device,
                       memory_format=torch.channels_last)


@torch.library.custom_op("modiff_bench::group_norm", mutates_args=())
def _group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    return F.group_norm(x, groups, weight, bias, eps)


@_group_norm.register_fake
def _(x, weight, bias, groups, eps):
    return torch.empty_like(x)


def _block_rows(batch: int, channels: int, size: int, reps: int) -> dict[str, dict]:
    """One diffusers ResnetBlock2D quantized as the benchmark's ``int8-modiff-w8a8-sample-fused`` configuration
    (W8A8, symmetric, per-sample, ec, compiled passes, fuse_norms), timed per modulated call: the library's layers,
    and the same arithmetic as one compiled region (static shapes) from the same state, whose output is compared."""
    import copy

    from diffusers.models.resnet import ResnetBlock2D

    import modiff

    groups = 32 if channels % 32 == 0 else 1
    block = ResnetBlock2D(in_channels=channels, out_channels=channels, temb_channels=4 * channels, groups=groups)
    config = modiff.ModiffConfig(w_bits=8, a_bits=8, modulation="ec", granularity="sample", execution="int8",
                                 symmetric=True, weight_symmetric=True, compile=True, fuse_norms=True)
    q = modiff.quantize(copy.deepcopy(block).eval(), config, new_trajectory="ignore")
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    temb = torch.randn(batch, 4 * channels)
    c1, c2 = q.conv1, q.conv2
    _REGION_LAYERS.update({1: c1, 2: c2})
    dims, base = c1._scale_dims(x), c1._op.base(x)  # base: what the kernel itself subtracts from u (oneDNN: 0)

    def conv_step(h, layer, handle: int, a_ref, o_ref, m):
        u, scale, offset = kernels.quantize_residual_silu(h, a_ref, dims, 8, True, False, True)
        y = torch.ops.modiff_bench.int8_conv(u, layer.w_q, layer.w_scale, handle)
        return kernels.epilogue(y, scale, offset - base, m, o_ref, None)

    def region(x, t, a1, o1, a2, o2, m1, m2):
        n1, n2 = q.norm1, q.norm2
        h1 = conv_step(torch.ops.modiff_bench.group_norm(x, n1.weight, n1.bias, n1.num_groups, n1.eps), c1, 1, a1,
                       o1, m1)
        h2 = conv_step(torch.ops.modiff_bench.group_norm(h1 + t, n2.weight, n2.bias, n2.num_groups, n2.eps), c2, 2,
                       a2, o2, m2)
        return x + h2, h1, h2

    compiled_region = torch.compile(region, dynamic=False)
    m1, m2 = (c._op.correction(x.shape, c.w_q, c.w_scale, torch.float32) for c in (c1, c2))

    def region_call():
        t = q.time_emb_proj(F.silu(temb))[:, :, None, None]
        out, c1._o_ref, c2._o_ref = compiled_region(x, t, c1._a_ref, c1._o_ref, c2._a_ref, c2._o_ref, m1, m2)
        for layer in (c1, c2):  # the state advanced as the layers advance it, so that the two calls alternate
            layer._versions = (layer._a_ref._version, layer._o_ref._version)
        return out

    library_name = "resnet block, int8 MoDiff W8A8 fused layers (the library, compile)"
    region_name = "resnet block as one compiled region (dropped)"
    with torch.no_grad():
        q(x, temb)  # the full-precision warm-up: the state the modulated calls start from
        layers = (c1, c2, q.time_emb_proj)
        saved = [(layer._a_ref.clone(), layer._o_ref.clone()) for layer in layers]
        expected = q(x, temb)
        for layer, (a_ref, o_ref) in zip(layers, saved, strict=True):  # back to the state before that call
            layer._a_ref, layer._o_ref, layer._versions = a_ref, o_ref, (a_ref._version, o_ref._version)
        diff = (region_call() - expected).abs().max().item()
        ms = _interleaved_ms({library_name: lambda: q(x, temb), region_name: region_call}, reps)
    return {library_name: {"ms": ms[library_name], "gmacs": None},
            region_name: {"ms": ms[region_name], "gmacs": None, "max_abs_diff": diff}}


def measure(batch: int, channels: int, size: int, reps: int) -> dict[str, dict]:
    """name -> {"ms": median milliseconds, "gmacs": multiply-adds per second / 1e9 (convolutions only)}; the
    elementwise and norm passes also record the layout of the tensors they read (``operands``), the region its
    output's largest difference from the library's."""
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

    # ref (MoDiff's â: a copy of the input, in the input's layout) is updated in place at each call, as in sampling
    gn_w, gn_b = torch.randn(channels), torch.randn(channels)
    ref = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    dims, groups, eps = (1, 2, 3), 32 if channels % 32 == 0 else 1, 1e-6
    plain, silu = kernels.compiled("quantize_residual"), kernels.compiled("quantize_residual_silu")
    whole = torch.compile(_group_norm_silu_quantize, dynamic=True)
    whole_static = torch.compile(_group_norm_silu_quantize, dynamic=False)
    total = torch.empty_like(x)
    static = (torch.tensor(0.05), torch.tensor(0.0))  # a calibrated per-tensor scale and zero point
    passes = {  # name -> (the call, the tensors it reads)
        "x + â into a kept tensor (the memory's pace: reads two inputs' bytes, writes one)":
            (lambda: torch.add(x, ref, out=total), (x, ref)),
        "GroupNorm (ATen)": (lambda: F.group_norm(x, groups, gn_w, gn_b, eps), (x,)),
        "SiLU (ATen)": (lambda: F.silu(x), (x,)),
        "the compiled quantizing pass (residual, scale, u, the update of â)":
            (lambda: plain(x, ref, dims, 8, True, False, True), (x, ref)),
        "the same pass with a static per-tensor scale (calibrated: no reduction, one read)":
            (lambda: plain(x, ref, dims, 8, True, False, True, static), (x, ref)),
        "GroupNorm + SiLU, then the compiled pass (unfused)":
            (lambda: plain(F.silu(F.group_norm(x, groups, gn_w, gn_b, eps)), ref, dims, 8, True, False, True),
             (x, ref)),
        "GroupNorm, then the compiled pass with the SiLU (fuse_norms)":
            (lambda: silu(F.group_norm(x, groups, gn_w, gn_b, eps), ref, dims, 8, True, False, True), (x, ref)),
        "all three compiled by inductor, dynamic shapes (dropped)":
            (lambda: whole(x, ref, gn_w, gn_b, groups, eps, dims, 8), (x, ref)),
        "all three compiled by inductor, static shapes (dropped)":
            (lambda: whole_static(x, ref, gn_w, gn_b, groups, eps, dims, 8), (x, ref)),
    }
    timed = _interleaved_ms({name: fn for name, (fn, _) in passes.items()}, reps)
    for name, (_, operands) in passes.items():
        rows[name] = {"ms": timed[name], "gmacs": None, "operands": _layout(*operands)}
    rows["torch.cat of two: a block of 2x the input"] = {"ms": _median_ms(lambda: torch.cat([x, x], dim=1), reps),
                                                         "gmacs": None}
    rows.update(_block_rows(batch, channels, size, reps))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--channels", type=int, default=128, help="channels in and out (default: 128)")
    parser.add_argument("--size", type=int, default=32, help="height = width (default: 32)")
    parser.add_argument("--reps", type=int, default=25,
                        help="timed calls per measurement, median; the norm passes and the two resnet block forms "
                             "are timed in turn, a call of each per round (default: 25)")
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
    region = rows["resnet block as one compiled region (dropped)"]["max_abs_diff"]
    layouts = ", ".join(sorted({r["operands"] for r in rows.values() if "operands" in r}))
    lines += ["", f"The passes' operands: {layouts}; the region's output differs from the library's by at most "
              f"{region:.3g}."]
    write_table(args, rows, lines, cpu_flags=flags, timing_environment=timing_environment("cpu", "channels_last"))
    return 0


if __name__ == "__main__":
    run_script(main, sys.argv[0])
