"""Does quantization make sampling faster? Real int8 / fp8 execution against FP32 and BF16.

Models: the CIFAR-10 DDPM architecture (google/ddpm-cifar10-32 config, random weights: speed
does not depend on the values) and the embedded digits model. Configurations (``--configs``,
default: all except fp8 and FP16 on CPU):

- ``fp32``, ``fp32-cl``: full precision, NCHW and channels-last; ``fp32-cl-compiled``: channels-last with
  the whole model torch.compile'd (the harness's ``fp`` cell with ``params.fp.compile = true``);
- ``bf16-autocast-cl``, ``bf16-cl``: BF16 autocast, and the whole model cast to BF16, both
  channels-last; ``bf16-autocast-cl-compiled``, ``bf16-cl-compiled``: the same, torch.compile'd. The FP32 and
  BF16 baselines are the fastest of their variants (compiled ones included), measured in the same process;
- ``fp16-cl``: the whole model cast to float16, channels-last: what diffusers users run
  (``torch_dtype=torch.float16``) and the harness's ``dtype = "float16"`` cell, not autocast (which keeps
  float32 weights and casts them at every call). Not a ratio baseline; not in the CPU default (CPUs without
  AVX512-FP16 / AMX-FP16 emulate float16 about 100x slower than FP32);
- ``fake-ptq``, ``fake-modiff``: fake quantization W8A8 (modulation off / MoDiff), and
  ``fake-modiff-compiled`` with its elementwise passes fused by torch.compile;
- ``int8-ptq-w8a8-sample``, ``int8-modiff-w8a{8,4}-{tensor,sample}``: real int8
  execution, symmetric activation and weight grids; ``...-compiled``: the same with
  ``compile=True`` (and ``int8-ptq-w8a4-sample-compiled``; ``int8-modiff-w8a7-sample-compiled``, the widest
  grid that runs as one kernel on CPUs without VNNI, whose oneDNN saturates 8-bit activations);
  ``int8-{ptq,modiff}-w8a8-sample-bf16-compiled``: everything unquantized in BF16 (the cell's ``dtype``),
  MoDiff's state in BF16 too; ``int8-modiff-w8a8-sample-f16state-compiled``: MoDiff's state in float16;
- ``fp8-ptq``, ``fp8-modiff`` and their ``-compiled``: float8 e4m3 through ``torch._scaled_mm`` (GPU), W8A8
  per-sample scales, modulation off / MoDiff.

Every quantized configuration runs channels-last. Timing: all configurations live in one process
and run one trajectory each per round, round-robin, so machine drift hits them alike. Round 0
warms up (it also compiles) and is dropped. Each denoiser call is timed (CUDA-synchronised). The
table gives, per configuration, the median over rounds of the median *modulated* call (every call
after the first of a trajectory), with its min-max over rounds; the warm-up call; the whole
trajectory; and the ratios against the FP32 and BF16 baselines of the same rounds. Compile time
is round 0's trajectory minus the median trajectory. Memory: the peak RSS increase over one
trajectory (CUDA: peak allocated), MoDiff's state and the weights' bytes.

Two more columns: ``mod. overhead``, a MoDiff configuration's modulated call divided by that of the PTQ
configuration (modulation off) on the same execution, activation bits, granularity and compile setting, when
both are in the run (else "—"); and ``kernel %``, for real int8 / fp8 execution, the share of one modulated
call's self CPU time (CUDA: self device time) spent in the low-bit kernels (ops named ``qconv2d_pointwise``,
``qlinear_pointwise``, ``_int_mm``, ``_scaled_mm``), from torch.profiler on one extra trajectory's last call
after the timed rounds. The JSON also lists that call's top 6 ops by self time.

Allocator: the process's memory allocator decides a large part of MoDiff's time on a CPU (modiff/allocator.py).
``--allocator`` sets it up at start-up (default ``tuned``: ``modiff.allocator.tune_allocator()``; ``default``:
glibc as it comes; ``tcmalloc``: only under ``LD_PRELOAD`` of libtcmalloc). ``--allocators A B ...`` runs this
script once per allocator, one after the other, as child processes (tcmalloc's child is started under
``LD_PRELOAD`` of the first of ``_common.TCMALLOC_PATHS`` found, else its rows are skipped, saying why), and
merges their results into one table with an ``allocator`` column. Each child measures its own baselines, so the
ratios compare rows of one allocator. Every result records the allocator's settings, and the JSON the CPU's
flags (``bench.provenance.timing_environment``): the table holds for this CPU only.

    python benchmarks/execution.py                         (or: nox -s bench)
    python benchmarks/execution.py --models cifar10 --configs fp32-cl int8-modiff-w8a8-sample-compiled
    python benchmarks/execution.py --allocators tuned default --models cifar10 \
        --configs bf16-cl int8-modiff-w8a8-sample-compiled
    python benchmarks/execution.py --device cuda --batch 256 --configs bf16-cl int8-modiff-w8a8-sample fp8-modiff
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    ALLOCATORS,
    TCMALLOC_PATHS,
    allocator_record,
    describe_allocator,
    run_script,
    setup_allocator,
    tcmalloc_library,
    write_table,
)

from bench.errors import BenchError


def _modiff(execution: str, modulation: str, a_bits: int, granularity: str, compile_: bool = False,
            bf16: bool = False, state_dtype: str = "float32", fuse: bool = False) -> dict:
    """A quantized configuration as a cell's settings: the ``dynamic`` base, W8, symmetric activation and weight
    grids (what the int8 / fp8 kernels need), channels-last; ``bf16``: everything unquantized in BF16 (the cell's
    ``dtype``, ModiffConfig.compute_dtype); ``state_dtype``: MoDiff's â / ô (ModiffConfig.state_dtype); ``fuse``: the
    resnet blocks' SiLU in the convs' quantizing passes (ModiffConfig.fuse_norms)."""
    params = {"symmetric": True, "weight_symmetric": True, "compile": compile_}
    if state_dtype != "float32":
        params["state_dtype"] = state_dtype
    if fuse:
        params["fuse_norms"] = True
    return {"base": "dynamic", "w_bits": 8, "a_bits": a_bits, "modulation": modulation, "a_granularity": granularity,
            "execution": execution, "memory_format": "channels_last", "params": {"dynamic": params},
            **({"dtype": "bfloat16"} if bf16 else {})}


# the full-precision model torch.compile'd whole: the harness's fp cell with params.fp.compile (bench/quantizers.py)
_FP_COMPILED = {"params": {"fp": {"compile": True}}}

# name -> the settings of the cell it builds (the harness's own build path, bench.build), and for the autocast
# baselines the BF16 autocast their calls run under (autocast is how a caller runs a model, not a cell setting)
CONFIGS: dict[str, dict] = {
    "fp32": {},
    "fp32-cl": {"memory_format": "channels_last"},
    "fp32-cl-compiled": {"memory_format": "channels_last", **_FP_COMPILED},
    "bf16-autocast-cl": {"memory_format": "channels_last", "autocast": True},
    "bf16-autocast-cl-compiled": {"memory_format": "channels_last", "autocast": True, **_FP_COMPILED},
    "bf16-cl": {"memory_format": "channels_last", "dtype": "bfloat16"},
    "bf16-cl-compiled": {"memory_format": "channels_last", "dtype": "bfloat16", **_FP_COMPILED},
    "fp16-cl": {"memory_format": "channels_last", "dtype": "float16"},
    "fake-ptq": _modiff("fake", "off", 8, "sample"),
    "fake-modiff": _modiff("fake", "ec", 8, "sample"),
    "fake-modiff-compiled": _modiff("fake", "ec", 8, "sample", True),
}
for _mod, _name in (("off", "ptq"), ("ec", "modiff")):
    for _bits in ((8,) if _mod == "off" else (8, 4)):
        for _gran in (("sample",) if _mod == "off" else ("tensor", "sample")):
            CONFIGS[f"int8-{_name}-w8a{_bits}-{_gran}"] = _modiff("int8", _mod, _bits, _gran)
for _name, _mod, _bits in (("ptq-w8a8", "off", 8), ("ptq-w8a4", "off", 4), ("modiff-w8a8", "ec", 8),
                           ("modiff-w8a7", "ec", 7), ("modiff-w8a4", "ec", 4)):
    CONFIGS[f"int8-{_name}-sample-compiled"] = _modiff("int8", _mod, _bits, "sample", True)
# BF16 for everything unquantized (norms, SiLU, attention, the layers' outputs), and MoDiff's state in BF16 (what
# the layer returns is then its state: no cast pass) or float16 (half the state at float32's quality)
CONFIGS["int8-ptq-w8a8-sample-bf16-compiled"] = _modiff("int8", "off", 8, "sample", True, bf16=True)
CONFIGS["int8-modiff-w8a8-sample-bf16-compiled"] = _modiff("int8", "ec", 8, "sample", True, bf16=True,
                                                           state_dtype="bfloat16")
CONFIGS["int8-modiff-w8a8-sample-f16state-compiled"] = _modiff("int8", "ec", 8, "sample", True, state_dtype="float16")
# the resnet blocks' SiLU inside the next conv's compiled quantizing pass (ModiffConfig.fuse_norms)
for _mod, _name in (("off", "ptq"), ("ec", "modiff")):
    CONFIGS[f"int8-{_name}-w8a8-sample-fused"] = _modiff("int8", _mod, 8, "sample", True, fuse=True)
CONFIGS["int8-modiff-w8a4-sample-fused"] = _modiff("int8", "ec", 4, "sample", True, fuse=True)
CONFIGS["int8-ptq-w8a8-sample-bf16-fused"] = _modiff("int8", "off", 8, "sample", True, bf16=True, fuse=True)
CONFIGS["int8-modiff-w8a8-sample-bf16-fused"] = _modiff("int8", "ec", 8, "sample", True, bf16=True,
                                                        state_dtype="bfloat16", fuse=True)
for _mod, _name in (("off", "ptq"), ("ec", "modiff")):
    CONFIGS[f"fp8-{_name}"] = _modiff("fp8", _mod, 8, "sample")
    CONFIGS[f"fp8-{_name}-compiled"] = _modiff("fp8", _mod, 8, "sample", True)
# torch._scaled_mm on CPU is a slow reference kernel
GPU_ONLY = ("fp8-ptq", "fp8-ptq-compiled", "fp8-modiff", "fp8-modiff-compiled")
# float16 convolutions on a CPU without AVX512-FP16 / AMX-FP16 run as reference loops (~100x FP32): named only
CPU_NAMED_ONLY = ("fp16-cl",)
# what a CPU without BF16 instructions leaves out of the default: each emulated BF16 call takes about a minute
BF16_EMULATED_SKIPPED = ("bf16-autocast-cl", "bf16-autocast-cl-compiled", "bf16-cl-compiled")
# the low-bit kernels whose share of a modulated call is the "kernel %" column (substrings of profiler op names)
KERNEL_OPS = ("qconv2d_pointwise", "qlinear_pointwise", "_int_mm", "_scaled_mm")
TOP_OPS = 6


def default_configs(device, flags: str) -> list[str]:
    """Everything but fp8 and FP16 on a CPU. A CPU without BF16 instructions (no avx512_bf16 / amx_bf16) emulates
    BF16 about 8x slower than FP32: there only ``bf16-cl`` is timed (autocast measured the same)."""
    names = [c for c in CONFIGS if device.type == "cuda" or c not in GPU_ONLY + CPU_NAMED_ONLY]
    if device.type == "cpu" and not any(f in flags.split() for f in ("avx512_bf16", "amx_bf16")):
        names = [c for c in names if c not in BF16_EMULATED_SKIPPED]
    return names


def _compiled(config: dict) -> bool:
    """torch.compile on: the fp base's whole model, or the dynamic base's fused passes."""
    return any(p.get("compile", False) for p in config.get("params", {}).values())


def _real_execution(name: str) -> bool:
    """Runs on int8 / fp8 kernels (what the kernel % column profiles)."""
    return CONFIGS[name].get("execution") in ("int8", "fp8")


def ptq_twin(name: str, names: list[str]) -> str | None:
    """For a MoDiff configuration (modulation ec), the configuration in ``names`` that differs only by having
    modulation off (same execution, bits, granularity, compile setting): the denominator of ``mod. overhead``."""
    config = CONFIGS[name]
    if config.get("modulation") != "ec":
        return None

    def key(c: dict) -> tuple:
        return (c.get("base"), c.get("execution"), c.get("w_bits"), c.get("a_bits"), c.get("a_granularity"),
                c.get("memory_format"), c.get("dtype"), _compiled(c),
                any(p.get("fuse_norms", False) for p in c.get("params", {}).values()))

    return next((o for o in names if CONFIGS[o].get("modulation") == "off" and key(CONFIGS[o]) == key(config)),
                None)


@dataclass
class Timed:
    """A built configuration (``bench.build.build``'s ``Prepared``) whose denoiser calls are timed, under BF16
    autocast for the autocast baselines. With ``profile_at`` set, that call (0-based, within a trajectory) runs
    under torch.profiler and its profile is kept in ``profile``."""

    prepared: object
    device: object
    autocast: bool = False
    calls: list[float] = field(default_factory=list)
    profile_at: int | None = None
    profile: object = None

    def __post_init__(self):
        self.denoiser = self.prepared.denoiser()

    @property
    def unet(self):
        return self.prepared.unet

    def __call__(self, x, t):
        import contextlib

        import torch

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        profiling = self.profile_at is not None and len(self.calls) == self.profile_at
        if profiling:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            profiler = profile(activities=activities)
        else:
            profiler = contextlib.nullcontext()
        sync()
        start = time.perf_counter()
        with profiler, torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            out = self.denoiser(x, t)
            sync()
        self.calls.append(time.perf_counter() - start)
        if profiling:
            self.profile = profiler
        return out


def _model(name: str, device):
    from bench.zoo import ZooModel, load_model
    from bench.zoo.architectures import DDPM_CIFAR10_32, build_random_unet
    from modiff.schedules import NoiseSchedule

    if name == "digits":
        return load_model("digits", device=device)
    unet = build_random_unet(DDPM_CIFAR10_32).eval().requires_grad_(False).to(device)
    return ZooModel("cifar10-arch", unet, NoiseSchedule.linear(), (3, 32, 32), "ddim-quad", 100)


def _build(model, name: str, steps: int, batch: int, device) -> Timed:
    """Configuration ``name`` built the way the harness builds a cell (resolved, then ``bench.build.build``)."""
    from bench.build import build, resolve_cell
    from bench.cell import CellSpec

    settings = {"base": "fp", "modulation": "off", "w_bits": 32, "a_bits": 32, "a_granularity": "none",
                **{k: v for k, v in CONFIGS[name].items() if k != "autocast"}}
    cell = CellSpec(model=model.name, checkpoint=None, sampler="ddim-quad", steps=steps, eta=0.0, n_samples=batch,
                    seed=0, batch_size=batch, cache="none", **settings)
    resolved = resolve_cell(cell)
    if resolved.skip is not None:
        raise BenchError(f"configuration {name}: {resolved.skip}")
    return Timed(build(resolved, model, device), device, bool(CONFIGS[name].get("autocast")))


def _weight_bytes(unet) -> int:
    return sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])


def _trajectory(timed: Timed, model, steps: int, batch: int, device) -> dict:
    import torch

    import modiff
    from bench.measure import peak_rss_bytes, reset_peak_rss
    from modiff.samplers import SamplerConfig, sample

    timed.calls.clear()
    sampler = SamplerConfig.from_name("ddim-quad", steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        before = peak_rss_bytes()  # the current RSS, now that the peak is reset
    start = time.perf_counter()
    with torch.no_grad():
        sample(timed, model.schedule, sampler, range(batch), model.image_shape, batch, device,
               progress=False, on_trajectory_start=timed.prepared.start_trajectory)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    state = modiff.state_bytes(timed.unet)
    modiff.reset(timed.unet)  # free the state: every configuration's would not fit in memory together
    return {"seconds": seconds, "warmup_call": timed.calls[0],
            "modulated_call": statistics.median(timed.calls[1:]) if len(timed.calls) > 1 else float("nan"),
            "peak_extra_bytes": max(0, peak - before), "state_bytes": state}


def _profile(timed: Timed, model, steps: int, batch: int, device) -> dict:
    """One more trajectory, untimed, with its last call (a modulated one) under torch.profiler: the share of its
    self time in :data:`KERNEL_OPS`, and its top ops by self time."""
    timed.profile_at, timed.profile = steps - 1, None
    try:
        _trajectory(timed, model, steps, batch, device)
        seconds = timed.calls[-1]
    finally:
        timed.profile_at = None
    cuda = device.type == "cuda"
    basis = "self CUDA time" if cuda else "self CPU time"

    def self_us(event) -> float:
        if cuda:
            return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0))
        return float(event.self_cpu_time_total)

    events = [(e.key, self_us(e), e.count) for e in timed.profile.key_averages()]
    timed.profile = None
    total = sum(us for _, us, _ in events)
    kernel = sum(us for key, us, _ in events if any(op in key for op in KERNEL_OPS))
    top = sorted(events, key=lambda e: e[1], reverse=True)[:TOP_OPS]
    return {"kernel_pct": 100.0 * kernel / total if total > 0 else None, "kernel_basis": basis,
            "profiled_call_s": seconds, "profiled_self_ms": total / 1e3,
            "top_ops": [{"op": key, "self_ms": us / 1e3, "calls": count,
                         "pct": 100.0 * us / total if total > 0 else None} for key, us, count in top]}


def _summary(rounds: list[dict], first: dict) -> dict:
    calls = [r["modulated_call"] for r in rounds]
    trajectories = [r["seconds"] for r in rounds]
    return {"modulated_call": statistics.median(calls), "modulated_min": min(calls), "modulated_max": max(calls),
            "trajectory": statistics.median(trajectories),
            "warmup_call": statistics.median(r["warmup_call"] for r in rounds),
            "compile_s": max(0.0, first["seconds"] - statistics.median(trajectories)),
            "peak_extra_bytes": max(r["peak_extra_bytes"] for r in rounds), "state_bytes": rounds[-1]["state_bytes"],
            "all_modulated_calls": calls}


COLUMNS = ["model", "config", "modulated call s (min-max)", "x FP32", "x BF16", "mod. overhead", "kernel %",
           "warm-up call s", "trajectory s", "compile s", "peak +MB", "state MB", "weights MB"]


def table_head(allocator_column: bool) -> list[str]:
    columns = (["allocator"] if allocator_column else []) + COLUMNS
    return ["| " + " | ".join(columns) + " |", "| " + " | ".join(["---"] * len(columns)) + " |"]


def table_row(s: dict, model_name: str, name: str, allocator: str | None = None) -> str:
    """One row of the table from one result (as it is in the JSON)."""
    def ratio(v):
        return f"{v:.2f}" if v is not None else "-"

    overhead = f"{s['mod_overhead']:.2f}" if s.get("mod_overhead") is not None else "—"
    kernel = f"{s['kernel_pct']:.0f}" if s.get("kernel_pct") is not None else "—"
    return ("| " + (f"{allocator} | " if allocator is not None else "") +
            f"{model_name} | {name} | {s['modulated_call']:.3f} "
            f"({s['modulated_min']:.3f}-{s['modulated_max']:.3f}) | {ratio(s['x_fp32'])} | {ratio(s['x_bf16'])} | "
            f"{overhead} | {kernel} | {s['warmup_call']:.3f} | {s['trajectory']:.2f} | "
            f"{s['compile_s']:.0f} | {s['peak_extra_bytes'] / 2**20:.0f} | {s['state_bytes'] / 2**20:.0f} | "
            f"{s['weight_bytes'] / 2**20:.0f} |")


FOOTNOTE = [
    "x FP32 / x BF16: the fastest FP32 / BF16 variant's modulated call (compiled ones included) divided by this "
    "one's (above 1 = faster than that baseline).",
    "mod. overhead: this MoDiff configuration's modulated call divided by its PTQ twin's (modulation off, same "
    "execution, bits, granularity and compile setting) in the same run; — where the twin was not run.",
    "kernel %: the share of one modulated call's self time (torch.profiler, one extra trajectory after the timed "
    "rounds) spent in the low-bit kernels (" + ", ".join(KERNEL_OPS) + "); — for configurations without "
    "real int8 / fp8 execution. The JSON lists that call's top ops.",
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cifar10", "digits"], choices=["cifar10", "digits"],
                        help="the CIFAR-10 DDPM architecture (random weights) and / or the embedded digits model "
                        "(default: both)")
    parser.add_argument("--configs", nargs="+", metavar="NAME",
                        help=f"default: all but {', '.join(GPU_ONLY + CPU_NAMED_ONLY)} on CPU (and "
                        f"{', '.join(BF16_EMULATED_SKIPPED)} where the CPU emulates BF16); one of: "
                        f"{', '.join(CONFIGS)}")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N")
    parser.add_argument("--batch", type=int, default=64, help="images per denoiser call (default: 64)")
    parser.add_argument("--steps-cifar10", type=int, default=2,
                        help="DDIM steps per trajectory on cifar10 (the first is the warm-up; default: 2)")
    parser.add_argument("--steps-digits", type=int, default=20, help="the same on digits (default: 20)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up round (default: 3)")
    parser.add_argument("--allocator", metavar="NAME",
                        help="the memory allocator this process sets up at start-up: "
                        + "; ".join(f"{k}: {v}" for k, v in ALLOCATORS.items()) + " (default: tuned)")
    parser.add_argument("--allocators", nargs="+", metavar="NAME",
                        help="run this script once per allocator named (of: " + ", ".join(ALLOCATORS) + "), one "
                        "after the other, as child processes (tcmalloc's under LD_PRELOAD of the first of "
                        f"{', '.join(TCMALLOC_PATHS)} found, else skipped, saying why), and merge their results "
                        "into one table with an allocator column; not with --allocator")
    parser.add_argument("--out", default="runs/bench/execution.json", help="the JSON written (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for choice in ([args.allocator] if args.allocator else []) + (args.allocators or []):
        if choice not in ALLOCATORS:
            raise BenchError(f"unknown allocator {choice!r}; one of: {', '.join(ALLOCATORS)}")
    if args.allocator and args.allocators:
        raise BenchError("give --allocator (this process) or --allocators (one child process each), not both")
    if not args.allocators:
        args.allocator = args.allocator or "tuned"
        allocator = setup_allocator(args.allocator)  # first, before the models take their memory
    else:
        allocator = None

    import torch

    from bench.provenance import cpu_flags, device_description, timing_environment

    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda: CUDA is not available here")
    except RuntimeError as exc:
        raise BenchError(f"--device {args.device!r}: {exc}") from None
    names = args.configs or default_configs(device, cpu_flags())
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise BenchError(f"unknown configuration(s) {', '.join(unknown)}; one of: {', '.join(CONFIGS)}")
    for name, value in (("--batch", args.batch), ("--rounds", args.rounds), ("--steps-cifar10", args.steps_cifar10 - 1),
                        ("--steps-digits", args.steps_digits - 1)):
        if value < 1:
            raise BenchError(f"{name} is too small (a trajectory needs a warm-up call and a modulated call)")
    if args.allocators:
        return run_allocators(args, names)

    results: dict[str, dict] = {}
    header = (f"device: {device_description(args.device)}; CPU flags: {cpu_flags()}; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; batch {args.batch}; median over {args.rounds} interleaved rounds "
              f"(min-max); seconds per denoiser call")
    if device.type == "cpu":
        from modiff.kernels import onednn_u8_exact

        header += (f"; oneDNN u8 x s8 exact over 0..255: {onednn_u8_exact()} "
                   "(else 8-bit activations run as two kernels)")
    header += f"; {describe_allocator(allocator)}"
    limits = timing_environment(args.device).get("isa_limits")
    if limits:  # the CPU's flags above are not what ran
        header += "; instructions limited by " + ", ".join(f"{k}={v}" for k, v in limits.items())
    lines = [header, "", *table_head(False)]
    for model_name in args.models:
        model = _model(model_name, device)
        steps = args.steps_cifar10 if model_name == "cifar10" else args.steps_digits
        built = {}
        for name in names:
            built[name] = _build(model, name, steps, args.batch, device)
        if allocator_record(args.allocator) != allocator:  # modiff.quantize tunes it too, unless told not to
            raise RuntimeError(f"building the configurations changed the allocator: {allocator} at start-up, "
                               f"{allocator_record(args.allocator)} now")
        print(f"[{model_name}] {len(names)} configurations x ({args.rounds} + 1) rounds of {steps} steps at batch "
              f"{args.batch} ...", flush=True)
        per_round: dict[str, list[dict]] = {name: [] for name in names}
        first: dict[str, dict] = {}
        for round_ in range(args.rounds + 1):
            for name in names:
                result = _trajectory(built[name], model, steps, args.batch, device)
                if round_:
                    per_round[name].append(result)
                else:
                    first[name] = result
                print(f"  round {round_} {name}: {result['seconds']:.2f} s, modulated call "
                      f"{result['modulated_call']:.3f} s", flush=True)
        profiles = {}
        for name in names:  # after the timed rounds: the profiler's overhead stays out of the timings
            if _real_execution(name):
                profiles[name] = _profile(built[name], model, steps, args.batch, device)
                print(f"  profile {name}: kernel share {profiles[name]['kernel_pct'] or 0:.0f}% of "
                      f"{profiles[name]['kernel_basis']}", flush=True)
        summaries = {name: _summary(per_round[name], first[name]) for name in names}
        fp32 = min((summaries[n]["modulated_call"] for n in names if n.startswith("fp32")), default=None)
        bf16 = min((summaries[n]["modulated_call"] for n in names if n.startswith("bf16")), default=None)
        for name in names:
            s = summaries[name]
            s["x_fp32"] = fp32 / s["modulated_call"] if fp32 else None
            s["x_bf16"] = bf16 / s["modulated_call"] if bf16 else None
            twin = ptq_twin(name, names)
            s["mod_overhead_vs"] = twin
            s["mod_overhead"] = s["modulated_call"] / summaries[twin]["modulated_call"] if twin else None
            s.update(profiles.get(name, {"kernel_pct": None, "top_ops": None}))
            s["weight_bytes"] = _weight_bytes(built[name].unet)
            s["images_per_s"] = args.batch / s["modulated_call"]  # at the modulated call's speed
            s["allocator"] = args.allocator
            s["allocator_settings"] = allocator_record(args.allocator)  # as it is now, after the builds
            s["environment"] = timing_environment(args.device, CONFIGS[name].get("memory_format", "contiguous"),
                                                  _compiled(CONFIGS[name]))
            results[f"{model_name}/{name}"] = s
            lines.append(table_row(s, model_name, name))
        del built
    lines += ["", *FOOTNOTE]
    write_table(args, results, lines, header=header, cpu_flags=cpu_flags(),
                timing_environment=timing_environment(args.device))
    return 0


# -------------------------------------------------------------------------------------- one child per allocator

def _child_env(allocator: str, library: str | None) -> dict[str, str]:
    """This process's environment for the child timing ``allocator``: LD_PRELOAD without any allocator library,
    plus tcmalloc's for the tcmalloc child."""
    from modiff.allocator import is_allocator_library

    env = dict(os.environ)
    keep = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if not is_allocator_library(p)]
    if allocator == "tcmalloc":
        keep.insert(0, library)
    if keep:
        env["LD_PRELOAD"] = " ".join(keep)
    else:
        env.pop("LD_PRELOAD", None)
    return env


def _run_child(command: list[str], env: dict[str, str], label: str) -> int:
    """Run ``command`` to its end; interrupted (Ctrl-C, SIGTERM), kill it before going on."""
    child = subprocess.Popen(command, env=env)
    try:
        print(f"{label} pid {child.pid}: " + (f"LD_PRELOAD={env['LD_PRELOAD']} " if "LD_PRELOAD" in env else "")
              + " ".join(command[1:]), flush=True)
        return child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _terminate(signum, frame):
    raise KeyboardInterrupt


def run_allocators(args, names: list[str]) -> int:
    """``--allocators``: this script once per allocator as a child process (``--allocator X``), one after the
    other; their results merged into one table. Exit status 1 when a child failed, 130 when interrupted."""
    from bench.provenance import cpu_flags

    library = tcmalloc_library()
    skipped = {a: f"none of {', '.join(TCMALLOC_PATHS)} exists (install libtcmalloc-minimal4)"
               for a in args.allocators if a == "tcmalloc" and library is None}
    for allocator, why in skipped.items():
        print(f"[allocator {allocator}] skipped: {why}", flush=True)
    wanted = list(dict.fromkeys(a for a in args.allocators if a not in skipped))
    if not wanted:
        raise BenchError("no allocator left to run: " + "; ".join(f"{a}: {w}" for a, w in skipped.items()))
    common = ["--models", *args.models, "--configs", *names, "--device", args.device, "--batch", str(args.batch),
              "--steps-cifar10", str(args.steps_cifar10), "--steps-digits", str(args.steps_digits),
              "--rounds", str(args.rounds)]
    children, failed = {}, {}
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with tempfile.TemporaryDirectory(prefix="execution-allocators-") as tmp:
            for allocator in wanted:
                out = Path(tmp) / f"{allocator}.json"
                command = [sys.executable, str(Path(__file__).resolve()), *common, "--allocator", allocator,
                           "--out", str(out)]
                returncode = _run_child(command, _child_env(allocator, library), f"[allocator {allocator}]")
                if returncode != 0 or not out.is_file():
                    failed[allocator] = f"its process exited with status {returncode}"
                    print(f"[allocator {allocator}] failed: {failed[allocator]}", flush=True)
                    continue
                children[allocator] = json.loads(out.read_text())
    except KeyboardInterrupt:
        print("execution.py: interrupted; the running child was killed, nothing written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)

    results: dict[str, dict] = {}
    lines = []
    if children:
        lines.append(next(iter(children.values()))["header"].split("; allocator: ")[0])
    for allocator, child in children.items():
        lines.append(f"- {describe_allocator({'choice': allocator, **child['allocator']})}")
    lines += ["", *table_head(True)]
    for model_name in args.models:
        for allocator, child in children.items():
            for name in names:
                s = child["results"][f"{model_name}/{name}"]
                results[f"{allocator}/{model_name}/{name}"] = s
                lines.append(table_row(s, model_name, name, allocator))
    lines += ["", *FOOTNOTE,
              "allocator: each allocator's rows come from its own process (execution.py --allocator NAME, run one "
              "after the other), which measured its own FP32 / BF16 baselines and PTQ twins: x FP32, x BF16 and "
              "mod. overhead compare rows of the same allocator; across allocators compare the seconds."]
    lines += [f"{a}: skipped: {why}" for a, why in {**skipped, **failed}.items()]
    write_table(args, results, lines, allocator="per result: see each result's allocator_settings",
                cpu_flags=cpu_flags(), skipped={**skipped, **failed},
                children={a: {k: c.get(k) for k in ("settings", "provenance", "allocator", "header", "table",
                                                    "timing_environment")} for a, c in children.items()})
    return 1 if failed else 0


if __name__ == "__main__":
    run_script(main, __file__)
