"""Wall-clock and memory cost of fake quantization and MoDiff against full precision.

Samples the embedded digits model and the CIFAR-10 DDPM architecture (google/ddpm-cifar10-32
config, random weights: speed does not depend on the weights) at batch 64. Configurations:
``fp`` (no wrapping), ``off`` (plain dynamic fake-quant, W8A4 channel-wise) and ``ec`` (MoDiff,
same bits). Timing: all three configurations live in one process and are run round-robin,
``--repeats`` rounds after one warm-up round, so machine drift hits them alike; the median per
configuration is reported, with the ratio to ``fp`` from the same rounds. Memory: each
configuration samples once more in its own subprocess, so that its peak is its own (RSS
high-water mark since just before sampling on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).

    python benchmarks/overhead.py                 (or: nox -s bench)
    python benchmarks/overhead.py --device cuda   (on a GPU machine)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from _common import run_script, write_table

from bench.measure import Measurement, measured

CONFIGS = ("fp", "off", "ec")


def _setup(model_name: str, device: str, a_bits: int, configs) -> tuple[object, dict]:
    """The model record and one UNet per configuration (fp = the unwrapped original)."""
    import modiff
    from bench.quantized import quantized_copy
    from bench.schedules import NoiseSchedule
    from bench.zoo import ZooModel, load_model
    from bench.zoo.architectures import DDPM_CIFAR10_32, build_random_unet

    if model_name == "digits":
        model = load_model("digits", device=device)
    else:
        unet = build_random_unet(DDPM_CIFAR10_32).eval().requires_grad_(False).to(device)
        model = ZooModel("cifar10-arch", unet, NoiseSchedule.linear(), (3, 32, 32), "ddim-quad", 100)
    unets = {c: model.unet if c == "fp" else
             quantized_copy(model.unet, modiff.ModiffConfig(w_bits=8, a_bits=a_bits, modulation=c)) for c in configs}
    return model, unets


def _timed_run(unet, model, steps: int, batch: int, device: str) -> Measurement:
    """One sampling run: wall-clock (CUDA synchronised) and peak memory over the run alone."""
    from bench.quantized import sample_unet
    from bench.samplers import SamplerConfig

    config = SamplerConfig.from_name("ddim-quad", steps)
    return measured(lambda: sample_unet(unet, model, config, range(batch), batch, device), device)[1]


def _memory_worker(args) -> dict:
    """One configuration alone in this process: peak memory of one sampling run and MoDiff state."""
    import modiff

    model, unets = _setup(args.model, args.device, args.a_bits, [args.config])
    unet = unets[args.config]
    if args.config != "fp":
        del model.unet  # keep only the copy that samples, as a user would
    # the peak is counted over sampling alone: imports and loading spike above what sampling needs
    run = _timed_run(unet, model, args.steps, args.batch, args.device)
    peak = run.cuda_peak_bytes if run.cuda_peak_bytes is not None else run.peak_rss_bytes
    return {"peak_bytes": peak, "state_bytes": modiff.state_bytes(unet)}  # state after a full trajectory


def _steps(args, model_name: str) -> int:
    return args.steps_digits if model_name == "digits" else args.steps_cifar10


def _timings(args, model_name: str, steps: int) -> dict[str, list[float]]:
    model, unets = _setup(model_name, args.device, args.a_bits, CONFIGS)
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for round_ in range(args.repeats + 1):
        for config in CONFIGS:
            seconds = _timed_run(unets[config], model, steps, args.batch, args.device).seconds
            if round_:  # round 0 warms up allocator and kernels
                times[config].append(seconds)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits", "cifar10"], choices=["digits", "cifar10"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--steps-digits", type=int, default=100)
    parser.add_argument("--steps-cifar10", type=int, default=4, help="DDIM steps for CIFAR-10 (slow on a CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/bench/overhead.json")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        args.model, args.config = args.worker
        args.steps = _steps(args, args.model)
        print(json.dumps(_memory_worker(args)))
        return 0

    from bench.provenance import provenance

    results = {}
    for model in args.models:
        steps = _steps(args, model)
        print(f"[{model}] timing {len(CONFIGS)} configurations x {args.repeats} rounds ...", flush=True)
        times = _timings(args, model, steps)
        for config in CONFIGS:
            cmd = [sys.executable, __file__, "--worker", model, config, "--device", args.device,
                   "--batch", str(args.batch), "--a-bits", str(args.a_bits),
                   "--steps-digits", str(args.steps_digits), "--steps-cifar10", str(args.steps_cifar10)]
            print(f"[{model} / {config}] peak memory ...", flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            results[f"{model}/{config}"] = {"seconds": statistics.median(times[config]),
                                            "all_seconds": times[config],
                                            **json.loads(done.stdout.strip().splitlines()[-1])}

    lines = [f"device: {provenance(args.device)['device']}; batch {args.batch}; W8A{args.a_bits}, channel-wise "
             f"dynamic scales; median of {args.repeats} interleaved rounds",
             "",
             "| model | config | steps | seconds | x fp | peak MB | peak - fp MB | MoDiff state MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in args.models:
        fp = results[f"{model}/fp"]
        steps = _steps(args, model)
        for config in CONFIGS:
            r = results[f"{model}/{config}"]
            r["ratio_to_fp"] = r["seconds"] / fp["seconds"]
            lines.append(f"| {model} | {config} | {steps} | {r['seconds']:.2f} | {r['ratio_to_fp']:.2f} | "
                         f"{r['peak_bytes'] / 2**20:.0f} | {(r['peak_bytes'] - fp['peak_bytes']) / 2**20:+.0f} | "
                         f"{r['state_bytes'] / 2**20:.1f} |")
    write_table(args, results, lines)
    return 0


if __name__ == "__main__":
    run_script(main, __file__)
