"""DeepCache's wall-clock speed-up over full precision, measured in one run, beside the paper's.

For N = 2, 3, 5, 10 (uniform 1:N, branch 0 = the shallowest diffusers block), on the CIFAR-10
DDPM architecture (random weights: speed does not depend on the values) and on the embedded
digits model. Full precision and every N are timed in interleaved rounds (round 0 warms up and
is dropped); the table gives the median. MACs per step are counted on real forward passes of a
full and a partial step. Paper: DeepCache Table 2 (CIFAR-10, 100 DDIM steps, a GPU).

    python benchmarks/deepcache_speedup.py            (or: nox -s bench)
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _common import run_script, setup_allocator, write_table

INTERVALS = (2, 3, 5, 10)
PAPER = Path(__file__).resolve().parent.parent / "reports" / "data" / "deepcache_cifar10.csv"


def _model(name: str, device: str):
    from bench.zoo import ZooModel, load_model
    from bench.zoo.architectures import DDPM_CIFAR10_32, build_random_unet
    from modiff.schedules import NoiseSchedule

    if name == "digits":
        return load_model("digits", device=device)
    unet = build_random_unet(DDPM_CIFAR10_32).eval().requires_grad_(False).to(device)
    return ZooModel("cifar10-arch", unet, NoiseSchedule.linear(), (3, 32, 32), "ddim-quad", 100)


def _prepare(model, cache: str, steps: int, batch: int, device: str):
    """The suite's own build path (bench.build): base fp + the cache scheme."""
    import torch

    from bench.build import build, resolve_cell
    from bench.cell import CellSpec

    cell = CellSpec(model=model.name, checkpoint=None, sampler="ddim-quad", steps=steps, eta=0.0, n_samples=batch,
                    seed=0, batch_size=batch, base="fp", modulation="off", cache=cache, w_bits=32, a_bits=32,
                    a_granularity="none", params={"deepcache": {"branch": 0, "center": None, "power": 1.4}})
    resolved = resolve_cell(cell)
    if resolved.skip is not None:
        raise ValueError(f"cache {cache}: {resolved.skip}")
    return build(resolved, model, torch.device(device)), resolved.sampler


def _time(model, prepared, sampler, batch: int, device: str) -> float:
    from bench.measure import measured
    from modiff.samplers import sample

    denoiser = prepared.denoiser()
    _, measurement = measured(lambda: sample(denoiser, model.schedule, sampler, range(batch), model.image_shape,
                                             batch, device, progress=False,
                                             on_trajectory_start=prepared.start_trajectory), device)
    return measurement.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cifar10", "digits"], choices=["cifar10", "digits"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-cifar10", type=int, default=16)
    parser.add_argument("--batch-digits", type=int, default=64)
    parser.add_argument("--steps-cifar10", type=int, default=20, help="DDIM steps (the paper: 100, on a GPU)")
    parser.add_argument("--steps-digits", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/deepcache.json")
    args = parser.parse_args(argv)
    setup_allocator()  # modiff.allocator.tune_allocator(), as modiff-bench does; the JSON records it

    import pandas as pd

    paper = pd.read_csv(PAPER, comment="#").set_index("interval_n")
    results, lines = {}, []
    for name in args.models:
        model = _model(name, args.device)
        steps = getattr(args, f"steps_{name}")
        batch = getattr(args, f"batch_{name}")
        configs = {"none": _prepare(model, "none", steps, batch, args.device)}
        configs.update({f"deepcache-u{n}": _prepare(model, f"deepcache-u{n}", steps, batch, args.device)
                        for n in INTERVALS})
        times: dict[str, list[float]] = {c: [] for c in configs}
        print(f"[{name}] {len(configs)} configurations x {args.repeats} interleaved rounds, batch {batch}, "
              f"{steps} steps ...", flush=True)
        for round_ in range(args.repeats + 1):
            for config, (prepared, sampler) in configs.items():
                seconds = _time(model, prepared, sampler, batch, args.device)
                if round_:
                    times[config].append(seconds)
        base = statistics.median(times["none"])
        full_macs = configs["deepcache-u2"][0].info["macs_full_g"]
        lines += [f"{name}: batch {batch}, {steps} DDIM-quad steps, branch 0, median of {args.repeats} rounds; "
                  f"full precision {base:.2f} s, {full_macs:.3g} G MACs per step", "",
                  "| N | MACs/step (G) | MACs ratio | speed-up | paper MACs (G) | paper speed-up (GPU) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for n in INTERVALS:
            prepared = configs[f"deepcache-u{n}"][0]
            macs = prepared.mac_fraction * full_macs
            speedup = base / statistics.median(times[f"deepcache-u{n}"])
            ref = paper.loc[n] if name == "cifar10" and n in paper.index else None
            lines.append(f"| {n} | {macs:.3g} | {1 / prepared.mac_fraction:.2f}x | {speedup:.2f}x | "
                         f"{ref.macs_g if ref is not None else '—'} | "
                         f"{f'{ref.speedup:.2f}x' if ref is not None else '—'} |")
            results[f"{name}/u{n}"] = {"seconds": times[f"deepcache-u{n}"], "fp_seconds": times["none"],
                                       "speedup": speedup, "macs_per_step_g": macs,
                                       "full_steps": prepared.info["deepcache_full_steps"]}
        lines.append("")
    write_table(args, results, lines)
    return 0


if __name__ == "__main__":
    run_script(main, __file__)
