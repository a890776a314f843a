"""How long a matrix will take, from throughput measured on this device before anything runs.

For every (model, batch size) of the pending cells, one denoiser call on a full batch is timed, after
an untimed warm-up, in full precision, with plain fake quantization (LCQ, W8A8) and with MoDiff (LCQ,
W8A8, error compensation). A cell then costs (number of batches) x (network evaluations per batch) x
(the time of its kind of call). Not included: calibration (Q-Diffusion, PTQD), decoding latents, the
metrics, and DeepCache's saving (cached cells are charged as full steps, an upper bound). It is an
estimate: it says so, with what it measured, next to the number.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

import modiff

from .methods import CellSpec
from .samplers import SamplerConfig
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
    if cell.base == "fp":
        return "fp"
    return "modulated" if cell.modulation != "off" else "quantized"


def _time_call(model: ZooModel, unet: torch.nn.Module, batch: int, device: torch.device, t: int,
               repeats: int = 2) -> float:
    denoiser = model.denoiser(unet)
    x = torch.randn((batch, *model.image_shape), generator=torch.Generator().manual_seed(0)).to(device)
    steps = torch.full((batch,), t, dtype=torch.long, device=device)
    if model.start_batch is not None:
        model.start_batch(list(range(batch)))
    modiff.reset(unet)
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
    groups: dict[tuple[str, int], set[str]] = {}
    for cell in cells:
        groups.setdefault((cell.model, min(cell.batch_size, cell.n_samples)), set()).add(_kind(cell))
    timed: dict[tuple[str, int], dict[str, float]] = {}
    for (name, batch), kinds in groups.items():
        model = models[name]
        t = model.schedule.num_train_timesteps // 2
        timed[(name, batch)] = {"fp": _time_call(model, model.unet, batch, device, t)}
        for kind in ("quantized", "modulated"):
            if kind in kinds:
                config = modiff.ModiffConfig(w_bits=8, a_bits=8, granularity="channel",
                                             modulation="ec" if kind == "modulated" else "off")
                unet = modiff.quantize(copy.deepcopy(model.unet), config)
                timed[(name, batch)][kind] = _time_call(model, unet, batch, device, t)
                del unet
    seconds = 0.0
    for cell in cells:
        model = models[cell.model]
        sampler = SamplerConfig.from_name(cell.sampler, cell.steps, cell.eta)
        calls = len(sampler.evaluation_timesteps(model.schedule))
        batch = min(cell.batch_size, cell.n_samples)
        seconds += math.ceil(cell.n_samples / cell.batch_size) * calls * timed[(cell.model, batch)][_kind(cell)]
    return Estimate(seconds / 3600, len(cells), sum(c.n_samples for c in cells), timed, world_size)
