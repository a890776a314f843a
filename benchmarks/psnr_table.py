"""PSNR of quantized sampling against full precision on the embedded digits model: a table of the
``modiff`` library itself (``modiff.quantize`` with each ``ModiffConfig``), its 32-bit identities included
(modulation at 32-bit activations equals full precision), which the harness skips as cells.

For every modulation (off / plain / ec) x activation bits x dynamic-scale granularity, at W8:
DDIM quad, 100 steps, eta 0, 64 samples from seeds 0-63, PSNR of the final samples against the
full-precision model's samples from the same noise. Writes CSV, Markdown and a provenance JSON.

    python benchmarks/psnr_table.py --out runs/bench        (or: nox -s psnr-table)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from _common import setup_allocator

import modiff
from bench.errors import BenchError
from bench.metrics import psnr_to_fp
from bench.provenance import provenance, write_atomic, write_json_atomic
from bench.zoo import load_model
from modiff.samplers import SamplerConfig, sample


def pivot(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (granularity, activation bits), one PSNR column per modulation."""
    wide = table.pivot_table(index=["granularity", "a_bits"], columns="modulation", values="psnr_to_fp_db")
    wide = wide[list(modiff.MODULATIONS)].sort_index(ascending=[True, False]).reset_index()
    wide.columns.name = None
    return wide.rename(columns={"a_bits": "A bits", "off": "off (PTQ)", "plain": "plain modulation",
                                "ec": "ec (MoDiff)"})


def sample_unet(unet, model, sampler: SamplerConfig, seeds) -> torch.Tensor:
    """Samples of ``unet`` on the model's schedule; MoDiff's state is reset before each batch's first step."""
    return sample(model.denoiser(unet), model.schedule, sampler, seeds, model.image_shape, 64, "cpu",
                  progress=False, on_trajectory_start=lambda: modiff.reset(unet), on_batch=model.start_batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench", help="output directory (default: runs/bench)")
    parser.add_argument("--w-bits", type=int, default=8)
    parser.add_argument("--a-bits", type=int, nargs="+", default=[8, 6, 4, 3, 2])
    parser.add_argument("--granularity", nargs="+", default=["tensor", "channel"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--n", type=int, default=64)
    args = parser.parse_args(argv)
    allocator = setup_allocator()  # its seconds column times sampling: the allocator as modiff-bench sets it up

    # every configuration is validated before any sampling starts
    configs = [modiff.ModiffConfig(w_bits=args.w_bits, a_bits=a_bits, modulation=modulation, granularity=granularity)
               for granularity in args.granularity for a_bits in args.a_bits for modulation in modiff.MODULATIONS]
    sampler = SamplerConfig.from_name("ddim-quad", args.steps)
    model = load_model("digits")
    seeds = range(args.n)
    fp = sample_unet(model.unet, model, sampler, seeds)
    rows = []
    for config in configs:
        start = time.perf_counter()
        out = sample_unet(modiff.quantize(copy.deepcopy(model.unet), config), model, sampler, seeds)
        rows.append({"granularity": config.granularity, "w_bits": config.w_bits, "a_bits": config.a_bits,
                     "modulation": config.modulation, "psnr_to_fp_db": round(psnr_to_fp(out, fp), 2),
                     "seconds": round(time.perf_counter() - start, 2)})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    wide = pivot(table)
    out = Path(args.out)
    write_atomic(out / "psnr_table.csv", lambda p: table.to_csv(p, index=False))
    write_atomic(out / "psnr_table.md", lambda p: p.write_text(wide.to_markdown(index=False) + "\n"))
    write_json_atomic(out / "psnr_table.json", {
        "settings": {"model": "digits", "sampler": sampler.name, "steps": args.steps, "eta": 0.0,
                     "seeds": [0, args.n - 1], "w_bits": args.w_bits, "metric": "PSNR (dB) to FP samples",
                     "allocator": allocator},
        "provenance": provenance("cpu"),
    })
    print(f"\nPSNR to full precision (dB), W{args.w_bits}, {args.n} samples, DDIM quad {args.steps} steps\n")
    print(wide.to_markdown(index=False))
    print(f"\n-> {out / 'psnr_table.csv'}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except (ValueError, BenchError) as exc:  # bad bits / names: one line, not a traceback
        print(f"{Path(__file__).name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
