"""Does quantization make sampling faster? Real int8 / fp8 execution against FP32 and BF16.

Models: the CIFAR-10 DDPM architecture (google/ddpm-cifar10-32 config, random weights: speed
does not depend on the values) and the embedded digits model. Configurations (``--configs``,
default: all except fp8 and FP16 on CPU):

- ``fp32``, ``fp32-cl``: full precision, NCHW and channels-last;
- ``bf16-autocast-cl``, ``bf16-cl``: BF16 autocast, and the whole model cast to BF16, both
  channels-last. The FP32 and BF16 baselines are the faster of their variants, measured here;
- ``fp16-cl``: the whole model cast to float16, channels-last: what diffusers users run
  (``torch_dtype=torch.float16``) and the harness's ``dtype = "float16"`` cell, not autocast (which keeps
  float32 weights and casts them at every call). Not a ratio baseline; not in the CPU default (CPUs without
  AVX512-FP16 / AMX-FP16 emulate float16 about 100x slower than FP32);
- ``fake-ptq``, ``fake-modiff``: fake quantization W8A8 (modulation off / MoDiff), and
  ``fake-modiff-compiled`` with its elementwise passes fused by torch.compile;
- ``int8-ptq-w8a8-sample``, ``int8-modiff-w8a{8,4}-{tensor,sample}``: real int8
  execution, symmetric activation and weight grids; ``...-compiled``: the same with
  ``compile=True`` (and ``int8-ptq-w8a4-sample-compiled``);
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

    python benchmarks/execution.py                         (or: nox -s bench)
    python benchmarks/execution.py --models cifar10 --configs fp32-cl int8-modiff-w8a8-sample-compiled
    python benchmarks/execution.py --device cuda --batch 256 --configs bf16-cl int8-modiff-w8a8-sample fp8-modiff
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

from _common import run_script, write_table

from bench.errors import BenchError


def _modiff(execution: str, modulation: str, a_bits: int, granularity: str, compile_: bool = False) -> dict:
    """A quantized configuration as a cell's settings: the ``dynamic`` base, W8, symmetric activation and weight
    grids (what the int8 / fp8 kernels need), channels-last."""
    return {"base": "dynamic", "w_bits": 8, "a_bits": a_bits, "modulation": modulation, "a_granularity": granularity,
            "execution": execution, "memory_format": "channels_last",
            "params": {"dynamic": {"symmetric": True, "weight_symmetric": True, "compile": compile_}}}


# name -> the settings of the cell it builds (the harness's own build path, bench.build), and for the autocast
# baseline the BF16 autocast its calls run under (autocast is how a caller runs a model, not a cell setting)
CONFIGS: dict[str, dict] = {
    "fp32": {},
    "fp32-cl": {"memory_format": "channels_last"},
    "bf16-autocast-cl": {"memory_format": "channels_last", "autocast": True},
    "bf16-cl": {"memory_format": "channels_last", "dtype": "bfloat16"},
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
                           ("modiff-w8a4", "ec", 4)):
    CONFIGS[f"int8-{_name}-sample-compiled"] = _modiff("int8", _mod, _bits, "sample", True)
for _mod, _name in (("off", "ptq"), ("ec", "modiff")):
    CONFIGS[f"fp8-{_name}"] = _modiff("fp8", _mod, 8, "sample")
    CONFIGS[f"fp8-{_name}-compiled"] = _modiff("fp8", _mod, 8, "sample", True)
# torch._scaled_mm on CPU is a slow reference kernel
GPU_ONLY = ("fp8-ptq", "fp8-ptq-compiled", "fp8-modiff", "fp8-modiff-compiled")
# float16 convolutions on a CPU without AVX512-FP16 / AMX-FP16 run as reference loops (~100x FP32): named only
CPU_NAMED_ONLY = ("fp16-cl",)


def default_configs(device, flags: str) -> list[str]:
    """Everything but fp8 and FP16 on a CPU. A CPU without BF16 instructions (no avx512_bf16 / amx_bf16) emulates
    BF16 about 8x slower than FP32: there only ``bf16-cl`` is timed (autocast measured the same)."""
    names = [c for c in CONFIGS if device.type == "cuda" or c not in GPU_ONLY + CPU_NAMED_ONLY]
    if device.type == "cpu" and not any(f in flags.split() for f in ("avx512_bf16", "amx_bf16")):
        names.remove("bf16-autocast-cl")
    return names


@dataclass
class Timed:
    """A built configuration (``bench.build.build``'s ``Prepared``) whose denoiser calls are timed, under BF16
    autocast for the autocast baseline."""

    prepared: object
    device: object
    autocast: bool = False
    calls: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.denoiser = self.prepared.denoiser()

    @property
    def unet(self):
        return self.prepared.unet

    def __call__(self, x, t):
        import torch

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            out = self.denoiser(x, t)
        sync()
        self.calls.append(time.perf_counter() - start)
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


def _summary(rounds: list[dict], first: dict) -> dict:
    calls = [r["modulated_call"] for r in rounds]
    trajectories = [r["seconds"] for r in rounds]
    return {"modulated_call": statistics.median(calls), "modulated_min": min(calls), "modulated_max": max(calls),
            "trajectory": statistics.median(trajectories),
            "warmup_call": statistics.median(r["warmup_call"] for r in rounds),
            "compile_s": max(0.0, first["seconds"] - statistics.median(trajectories)),
            "peak_extra_bytes": max(r["peak_extra_bytes"] for r in rounds), "state_bytes": rounds[-1]["state_bytes"],
            "all_modulated_calls": calls}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cifar10", "digits"], choices=["cifar10", "digits"])
    parser.add_argument("--configs", nargs="+", metavar="NAME",
                        help=f"default: all but {', '.join(GPU_ONLY + CPU_NAMED_ONLY)} on CPU (and bf16-autocast-cl "
                        f"where the CPU emulates BF16); one of: {', '.join(CONFIGS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps-cifar10", type=int, default=2,
                        help="DDIM steps per trajectory (the first is the warm-up)")
    parser.add_argument("--steps-digits", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up round")
    parser.add_argument("--out", default="runs/bench/execution.json")
    args = parser.parse_args(argv)

    import torch

    from bench.provenance import cpu_flags, device_description

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

    results: dict[str, dict] = {}
    lines = [f"device: {device_description(args.device)}; CPU flags: {cpu_flags()}; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; batch {args.batch}; median over {args.rounds} interleaved rounds "
             f"(min-max); seconds per denoiser call", ""]
    if device.type == "cpu":
        from modiff.kernels import onednn_u8_exact

        lines[0] += (f"; oneDNN u8 x s8 exact over 0..255: {onednn_u8_exact()} "
                     "(else 8-bit activations run as two kernels)")
    lines += ["| model | config | modulated call s (min-max) | x FP32 | x BF16 | warm-up call s | trajectory s | "
              "compile s | peak +MB | state MB | weights MB |", "| " + " | ".join(["---"] * 11) + " |"]
    for model_name in args.models:
        model = _model(model_name, device)
        steps = args.steps_cifar10 if model_name == "cifar10" else args.steps_digits
        built = {}
        for name in names:
            built[name] = _build(model, name, steps, args.batch, device)
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
        summaries = {name: _summary(per_round[name], first[name]) for name in names}
        fp32 = min((summaries[n]["modulated_call"] for n in names if n.startswith("fp32")), default=None)
        bf16 = min((summaries[n]["modulated_call"] for n in names if n.startswith("bf16")), default=None)
        for name in names:
            s = summaries[name]
            s["x_fp32"] = fp32 / s["modulated_call"] if fp32 else None
            s["x_bf16"] = bf16 / s["modulated_call"] if bf16 else None
            s["weight_bytes"] = _weight_bytes(built[name].unet)
            s["images_per_s"] = args.batch / s["modulated_call"]  # at the modulated call's speed
            results[f"{model_name}/{name}"] = s

            def ratio(v):
                return f"{v:.2f}" if v is not None else "-"

            lines.append(
                f"| {model_name} | {name} | {s['modulated_call']:.3f} "
                f"({s['modulated_min']:.3f}-{s['modulated_max']:.3f}) | {ratio(s['x_fp32'])} | {ratio(s['x_bf16'])} | "
                f"{s['warmup_call']:.3f} | {s['trajectory']:.2f} | "
                f"{s['compile_s']:.0f} | {s['peak_extra_bytes'] / 2**20:.0f} | {s['state_bytes'] / 2**20:.0f} | "
                f"{s['weight_bytes'] / 2**20:.0f} |")
        del built
    lines += ["", "x FP32 / x BF16: the fastest FP32 / BF16 variant's modulated call divided by this one's "
              "(above 1 = faster than that baseline)."]
    write_table(args, results, lines)
    return 0


if __name__ == "__main__":
    run_script(main, __file__)
