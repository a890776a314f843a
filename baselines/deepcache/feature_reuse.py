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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


def uniform_full_steps(steps: int, interval: int) -> list[int]:
    """Full steps at i * N (sampling-step indices, 0 = first)."""
    _check(steps, interval)
    return list(range(0, steps, interval))


def nonuniform_full_steps(steps: int, interval: int, center: int | None = None, power: float = 1.2) -> list[int]:
    """DeepCache's non-uniform 1:N schedule (``sample_from_quad_center`` in its DDPM and Stable Diffusion code):
    ``n = ceil(steps / N)`` full steps, denser near step ``center`` (default: ``steps // 2``).

    ``n + 1`` points are spread evenly from ``(-c)^(1/p)`` to ``(steps - c)^(1/p)`` and raised to ``p``. The start
    is a negative number to a fractional power: DeepCache computes it in Python, where that is the complex principal
    root, so the points are complex and the power (numpy's principal branch) is too; ``np.int32`` then keeps the
    real part, truncated toward zero. This is why the result is not ``sign(l) |l|^p``, and it is reproduced as is so
    that the indices are DeepCache's. Of the distinct integers, the smallest (about ``-c``) and the largest (about
    ``steps - c``) are dropped, the others shifted by ``c``, and step 0 put first. When that does not give exactly
    ``n`` indices, ``p`` is lowered by 0.02 (the same repeated float subtraction) and the points recomputed, while
    ``p > 1``; a ValueError if no such ``p`` works (DeepCache's Stable Diffusion pipelines raise too; its DDPM
    code would go on with the wrong number of full steps). With N = 1 every step is full, as DeepCache's pipelines
    special-case it. Indices count sampling steps from the first (noisiest), DeepCache's ``enumerate(timesteps)``.
    E.g. (100 steps, n = 10, c = 50, p = 1.4) -> 0 12 22 32 41 50 59 68 78 88."""
    _check(steps, interval)
    n = math.ceil(steps / interval)
    c = steps // 2 if center is None else int(center)
    if center is not None and (center != c or not 0 <= c < steps):
        raise ValueError(f"center must be a step index in [0, {steps - 1}], got {center}")
    if not power > 1:
        raise ValueError(f"power must be > 1 (it is lowered toward 1 until the schedule fits), got {power}")
    if interval == 1:
        return list(range(steps))
    p = float(power)
    while p > 1:
        # a Python power of a negative float is complex: the points run from a complex start to a real end
        points = np.linspace((-c) ** (1 / p), (steps - c) ** (1 / p), n + 1)
        values = np.unique(np.real(points ** p).astype(np.int32))
        full = [0, *(int(v) + c for v in values[1:-1])]
        if len(full) == n:
            return full
        p -= 0.02
    raise ValueError(f"DeepCache's non-uniform schedule has no power in (1, {power}] that gives {n} distinct full "
                     f"steps of {steps} around step {c}; choose another center or power, or a uniform schedule")


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
        self.calls = 0  # network calls since the last reset, counted by scheduled()
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

    def scheduled(self, fn: Callable, full: Iterable[int]) -> Callable:
        """``fn`` (the UNet's forward, or a denoiser that calls the UNet once) as DeepCache runs it: the calls
        numbered in ``full`` (from 0, counted since the last :meth:`reset`) run in full, the others as partial
        steps. The count is per network call, so a sampler evaluating the network twice in a step (PLMS's first
        step, Heun) counts twice."""
        full = frozenset(full)

        def call(*args, **kwargs):
            index = self.calls
            self.calls += 1
            if index in full:
                return fn(*args, **kwargs)
            with self.partial():
                return fn(*args, **kwargs)

        return call

    def reset(self) -> None:
        """A new trajectory: no cached feature, the call count from 0."""
        self.cached = None
        self.calls = 0

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
