"""DeepCache (Ma et al., CVPR 2024) on diffusers UNets, built on the module structure.

A skip branch ``m`` pairs down block ``D_m`` with up block ``U_m`` (``up_blocks[n - 1 - m]`` in
diffusers' order). A full step runs the whole UNet and caches the main-branch feature entering
``U_m``. A partial step runs ``D_0..D_m``, then ``U_m`` on the cached feature (concatenated, as
usual, with the fresh skip features of ``D_m``) and the shallower up blocks; deeper down blocks,
the mid block and deeper up blocks are not executed. Branches here are diffusers blocks (one
resolution level each); DeepCache's own code can also branch between the layers of one level.

Nothing of the UNet is copied: a forward pre-hook on ``U_m`` takes or replaces its input, and
the skipped blocks' ``forward`` is swapped for a pass-through only while a partial step runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


def uniform_full_steps(steps: int, interval: int) -> list[int]:
    """Full steps at i * N (sampling-step indices, 0 = first)."""
    _check(steps, interval)
    return list(range(0, steps, interval))


def nonuniform_full_steps(steps: int, interval: int, center: int | None = None, power: float = 1.4) -> list[int]:
    """DeepCache's non-uniform 1:N schedule: ``ceil(steps / N)`` full steps clustered around
    ``center`` (default: the middle step), at ``unique(int(sign(l) |l|^p + c))`` with ``l``
    evenly spaced between ``-c^(1/p)`` and ``(steps - 1 - c)^(1/p)``; ``p`` is lowered from
    ``power`` in steps of 0.01 until exactly that many distinct indices come out (p = 1 always
    gives them: evenly spaced steps). Step 0 is always full."""
    _check(steps, interval)
    k = math.ceil(steps / interval)
    c = (steps - 1) / 2 if center is None else float(center)
    if not 0 <= c <= steps - 1:
        raise ValueError(f"center must be a step index in [0, {steps - 1}], got {center}")
    for p in np.arange(power, 0.999, -0.01):
        start, stop = -(c ** (1 / p)), (steps - 1 - c) ** (1 / p)
        ticks = np.linspace(start, stop, k)
        idx = np.unique(np.clip((np.sign(ticks) * np.abs(ticks) ** p + c).astype(np.int64), 0, steps - 1))
        if len(idx) == k and idx[0] == 0:
            return [int(i) for i in idx]
    return [int(i) for i in np.linspace(0, steps - 1, k).astype(np.int64)]


def _check(steps: int, interval: int) -> None:
    if steps < 1 or interval < 1:
        raise ValueError(f"steps and the cache interval must be >= 1; got {steps}, {interval}")


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class DeepCache:
    """The feature cache of one UNet at skip branch ``branch`` (0 = shallowest, most skipped)."""

    def __init__(self, unet: nn.Module, branch: int = 0):
        for name in ("down_blocks", "up_blocks", "mid_block"):
            if not hasattr(unet, name):
                raise TypeError(f"DeepCache needs a diffusers UNet with down_blocks/mid_block/up_blocks; "
                                f"{type(unet).__name__} has no {name}")
        n = len(unet.down_blocks)
        if len(unet.up_blocks) != n:
            raise TypeError("DeepCache needs as many up blocks as down blocks")
        if not 0 <= branch < n:
            raise ValueError(f"branch must be in 0..{n - 1} for this UNet, got {branch}")
        self.unet, self.branch = unet, branch
        self.cache_block = unet.up_blocks[n - 1 - branch]
        self.skipped: list[nn.Module] = [*unet.down_blocks[branch + 1:], unet.mid_block,
                                         *unet.up_blocks[: n - 1 - branch]]
        self.skipped = [m for m in self.skipped if m is not None]
        self.cached: torch.Tensor | None = None
        self._partial = False
        self._handle = self.cache_block.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module, args, kwargs):
        if not self._partial:
            self.cached = _hidden_states(args, kwargs).detach().clone()
            return None
        if self.cached is None:
            raise RuntimeError("DeepCache: a partial step before any full step (reset between trajectories?)")
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": self.cached}
        return (self.cached, *args[1:]), kwargs

    @contextmanager
    def partial(self) -> Iterator[None]:
        """Run the UNet inside this block as a partial step."""
        for block in self.skipped:
            block.forward = _pass_through(block, self.unet)
        self._partial = True
        try:
            yield
        finally:
            self._partial = False
            for block in self.skipped:
                del block.forward  # back to the class's forward

    def reset(self) -> None:
        self.cached = None

    def remove(self) -> None:
        self._handle.remove()
        self.cached = None


def _pass_through(block: nn.Module, unet: nn.Module):
    """A stand-in for a skipped block that returns what the UNet's forward expects of it."""
    if block in list(unet.down_blocks):
        # one skip feature per resnet and per downsampler, as the real block returns, so that
        # the up blocks that do run take the same entries of the skip stack
        count = len(block.resnets) + (len(block.downsamplers) if getattr(block, "downsamplers", None) else 0)

        def down(*args, **kwargs):
            h = _hidden_states(args, kwargs)
            return h, (h,) * count

        return down

    def other(*args, **kwargs):
        return _hidden_states(args, kwargs)

    return other
