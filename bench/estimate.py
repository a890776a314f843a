"""How long a matrix will take, from throughput measured on this device before anything runs.

For every (model, batch size) of the pending cells, one denoiser call on a full batch is timed, after
an untimed warm-up, for each kind of cell among them: full precision, plain quantization (W8A8) and
MoDiff (W8A8, error compensation), each at the execution (fake: LCQ; int8 / fp8: LTQ on the real
kernels) and dtype (float32, bfloat16, float16) of the cells that need it. A cell then costs (number of
batches) x (network evaluations per batch) x (the time of its kind of call). Not included:
calibration (Q-Diffusion, PTQD), decoding latents, the metrics, and DeepCache's saving (cached cells
are charged as full steps, an upper bound). It is an estimate: it says so, with what it measured, next
to the number.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from .build import build, resolve_cell, sampler_from_name
from .cell import CellSpec, later_settings
from .context import Prepared
from .generate import timestep_batch
from .zoo import ZooModel

KINDS = ("fp", "quantized", "modulated")


@dataclass
class Estimate:
    device_hours: float
    cells: int
    images: int
    seconds_per_call: dict[tuple[str, int], dict[str, float]]  # (model, batch) -> kind -> seconds
    world_size: int = 1

    def describe(self, device: torch.device) -> str:
        measured = "; ".join(
            f"{model} batch {batch}: " + ", ".join(f"{kind} {s * 1e3:.0f} ms" for kind, s in times.items())
            for (model, batch), times in self.seconds_per_call.items())
        wall = self.device_hours / max(self.world_size, 1)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        return (f"estimate: {self.cells} cells, {self.images:,} images: {self.device_hours:.2f} device-hours on "
                f"{device.type} ({name})" + (f", about {wall:.2f} h on {self.world_size} processes"
                                             if self.world_size > 1 else "")
                + f" [measured per denoiser call: {measured}; calibration, decoding and metrics not included]")


def _kind(cell: CellSpec) -> str:
    """What a cell's denoiser call costs like: ``fp``, ``quantized`` or ``modulated``, then its execution
    and dtype where they are not the defaults (``quantized int8 bfloat16``)."""
    kind = "fp" if cell.base == "fp" else "modulated" if cell.modulation != "off" else "quantized"
    return " ".join([kind, *later_settings(vars(cell))])


def _representative(cell: CellSpec) -> CellSpec:
    """The cell timed for ``cell``'s kind: full precision, or W8A8 dynamic quantization (LCQ; LTQ for
    real execution, whose kernels need tensor scales) without or with MoDiff, at its execution and dtype.
    Calibrated baselines (Q-Diffusion, PTQD) run fake-quantized layers and are timed as LCQ."""
    kind = _kind(cell).split()[0]
    if kind == "fp":
        return replace(cell, base="fp", cache="none", params={}, execution="fake")
    base = "lcq" if cell.execution == "fake" else "ltq"
    return replace(cell, base=base, cache="none", params={}, w_bits=8, a_bits=8,
                   a_granularity="channel" if base == "lcq" else "tensor",
                   modulation="ec" if kind == "modulated" else "off")


def _time_call(model: ZooModel, prepared: Prepared, batch: int, device: torch.device, t: int,
               repeats: int = 2) -> float:
    denoiser = prepared.denoiser()
    x = torch.randn((batch, *model.image_shape), generator=torch.Generator().manual_seed(0)).to(device)
    steps = timestep_batch(model, t, batch, device)  # a DDPM model's integer timestep, a flow model's float time
    if model.start_batch is not None:
        model.start_batch(list(range(batch)))
    prepared.start_trajectory()
    with torch.no_grad():
        denoiser(x, steps)  # warm-up (and MoDiff's full-precision first step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            denoiser(x, steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def estimate(cells: list[CellSpec], models: dict[str, ZooModel], device: torch.device, world_size: int = 1
             ) -> Estimate:
    groups: dict[tuple[str, int], dict[str, CellSpec]] = {}
    for cell in cells:
        groups.setdefault((cell.model, min(cell.batch_size, cell.n_samples)), {}).setdefault(_kind(cell), cell)
    timed: dict[tuple[str, int], dict[str, float]] = {}
    for (name, batch), kinds in groups.items():
        model = models[name]
        t = model.schedule.num_train_timesteps // 2
        timed[(name, batch)] = {}
        for kind, cell in sorted(kinds.items(), key=lambda item: (KINDS.index(item[0].split()[0]), item[0])):
            prepared = build(resolve_cell(_representative(cell)), model, device)
            timed[(name, batch)][kind] = _time_call(model, prepared, batch, device, t)
            del prepared
    seconds = 0.0
    for cell in cells:
        model = models[cell.model]
        sampler = sampler_from_name(cell.sampler, cell.steps, cell.eta)  # the cell's own (either kind): valid
        calls = len(sampler.evaluation_timesteps(model.schedule))
        batch = min(cell.batch_size, cell.n_samples)
        seconds += math.ceil(cell.n_samples / cell.batch_size) * calls * timed[(cell.model, batch)][_kind(cell)]
    return Estimate(seconds / 3600, len(cells), sum(c.n_samples for c in cells), timed, world_size)
