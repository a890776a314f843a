"""Sharded sampling over processes, GPUs and nodes with ``torch.distributed`` (the NVlabs/edm pattern).

``torchrun --nproc_per_node=8 -m bench run CONFIG --out DIR`` starts one process per GPU. Every cell's
seed list is cut into fixed chunks, chunk k = seeds[k*B:(k+1)*B] whatever the number of processes, and
rank r samples the chunks k with k % world_size == r, writing each one to disk. Because a chunk is a
batch, the batch composition -- and with it every batch-dependent quantization scale (tensor- and
channel-wise activation ranges) -- is the same for 1 or 64 processes, so the sample files are too.
Rank 0 alone writes run.json, assembles a cell's samples once every chunk exists, computes the metrics
and writes the result. Calibration (methods that keep a cache) runs on rank 0 first; the others then
load what it stored.

Without ``WORLD_SIZE`` > 1 in the environment nothing is initialised and every call here is a no-op.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import BenchError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def owns(self, chunk: int) -> bool:
        """Whether this rank samples chunk ``chunk`` (round-robin over ranks)."""
        return chunk % self.size == self.rank

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order, on every rank (picklable objects)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init_from_env(device: str) -> tuple[World, str]:
    """Join the process group torchrun (or submitit's TorchDistributedEnvironment) describes in the
    environment; return the world and the device this rank uses (``cuda:LOCAL_RANK`` on GPUs)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise BenchError(f"device {device!r} requested but CUDA is not available on this machine")
        if ":" in device:
            raise BenchError(f"--device {device} names one GPU; under torchrun each rank uses cuda:LOCAL_RANK, "
                             "so pass --device cuda")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    elif device == "auto":
        device = "cpu"
    if not torch.distributed.is_initialized():
        # the timeout covers a whole cell on the other ranks (rank 0 calibrates and computes metrics alone)
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=_dt.timedelta(hours=6))
    return World(rank, size, local_rank), device


def shutdown(world: World) -> None:
    if world.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
