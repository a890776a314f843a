"""``cache = "deepcache-u<N>"`` / ``"deepcache-nu<N>"`` in matrix files: DeepCache on top of any
base quantizer (with ``fp`` it is DeepCache alone; with a modulated base it is MoDiff + caching).

Full and partial passes are chosen per network evaluation, as DeepCache's own pipelines do
(``for i, t in enumerate(scheduler.timesteps): full if i in interval_seq``, with ``interval_seq``
built from the number of inference steps): the full indices come from the cell's ``steps`` and a
counter of evaluations, reset per trajectory, picks them. With one evaluation per step (DDIM,
DDPM, DPM-Solver++, whose singlestep intermediate points are evaluations of their own) that is
the step index; PLMS's ``steps + 1`` evaluations (its first step evaluates twice) shift the later
full passes by one evaluation and leave the extra last one partial, exactly as DeepCache with
diffusers' PNDM scheduler. ``mac_fraction`` averages over the evaluations actually run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bench.errors import BenchError
from bench.methods import BuildContext, CacheMethod, CellSpec, Prepared, register_method

from . import DeepCache, nonuniform_full_steps, uniform_full_steps


@register_method("deepcache")
class DeepCacheMethod(CacheMethod):
    """DeepCache (CVPR 2024): partial steps reuse the feature entering up block U_branch (u<N>: uniform 1:N, nu<N>: non-uniform)."""  # noqa: E501

    @dataclass(frozen=True)
    class Params:
        branch: int = 0  # skip branch m: the feature entering up block U_m is cached
        center: int | None = None  # non-uniform schedule: the step its full steps cluster around (default: middle)
        power: float = 1.4  # non-uniform schedule: the starting exponent

    def __init__(self, value: str, params: dict[str, Any] | None = None):
        super().__init__(value, params)
        arg = self.argument
        kind = "nu" if arg.startswith("nu") else "u" if arg.startswith("u") else None
        try:
            self.interval = int(arg[len(kind):]) if kind else 0
        except ValueError:
            self.interval = 0
        if self.interval < 1:
            raise BenchError(f"cache {value!r}: expected deepcache-u<N> or deepcache-nu<N> with N >= 1")
        self.uniform = kind == "u"

    def full_steps(self, steps: int) -> list[int]:
        if self.uniform:
            return uniform_full_steps(steps, self.interval)
        return nonuniform_full_steps(steps, self.interval, self.settings.center, self.settings.power)

    def resolve(self, cell: CellSpec) -> str | None:
        center = self.settings.center
        if center is not None and not 0 <= center < cell.steps:
            return f"deepcache center {center} is not a step index for {cell.steps} steps"
        return None

    def apply(self, ctx: BuildContext, prepared: Prepared) -> Prepared:
        unet = prepared.unet
        if unet is ctx.model.unet:  # never hook the shared full-precision model
            unet = prepared.unet = ctx.fp_unet_copy()
        try:
            cache = DeepCache(unet, self.settings.branch)
        except (TypeError, ValueError) as exc:
            raise BenchError(f"{self.value}: {exc}") from None
        full = set(self.full_steps(ctx.cell.steps))
        step = {"index": 0}
        inner_wrap = prepared.wrap

        def wrap(denoiser):
            inner = inner_wrap(denoiser) if inner_wrap is not None else denoiser

            def call(x, t):
                index = step["index"]
                step["index"] += 1
                if index in full:
                    return inner(x, t)
                with cache.partial():
                    return inner(x, t)

            return call

        def start() -> None:
            step["index"] = 0
            cache.reset()

        prepared.wrap = wrap
        prepared.on_trajectory_start = [*prepared.on_trajectory_start, start]
        full_macs, partial_macs = macs_full_and_partial(unet, cache, ctx.model.image_shape, ctx.device)
        n_eval = len(ctx.sampler.evaluation_timesteps(ctx.model.schedule))
        n_full = sum(1 for i in full if i < n_eval)
        prepared.mac_fraction = (n_full * full_macs + (n_eval - n_full) * partial_macs) / (n_eval * full_macs)
        prepared.info.update({"deepcache_full_steps": sorted(full), "deepcache_branch": self.settings.branch,
                              "macs_full_g": full_macs / 1e9, "macs_partial_g": partial_macs / 1e9})
        return prepared


def macs_full_and_partial(unet, cache: DeepCache, image_shape, device) -> tuple[int, int]:
    """MACs per image of a full and of a partial step, counted on real forward passes."""
    from modiff.accounting import count_macs

    x = torch.zeros((1, *image_shape), device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    cache.reset()
    full = count_macs(unet, x, t).total_macs
    with cache.partial():
        partial = count_macs(unet, x, t).total_macs
    cache.reset()
    return full, partial
