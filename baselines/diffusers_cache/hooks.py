"""diffusers' own cache hooks (``diffusers.hooks``) on any of its transformers, driven by a sampler's denoiser calls.

A pipeline runs a cache in three parts: ``transformer.enable_cache(config)`` hooks the blocks, each network call
runs inside ``transformer.cache_context("cond")`` (the stateful hooks keep their state per context name), and
the pipeline resets the hooks' state before the next generation. The timestep-gated caches (Pyramid Attention
Broadcast, FasterCache) also read the pipeline's current timestep through a callback. :class:`DiffusersCache`
does the same around a ``(x_t, t) -> eps`` denoiser: :meth:`DiffusersCache.wrap` records ``t`` (the callback's
value) and runs each call in the context, :meth:`DiffusersCache.reset` starts a trajectory.

Models without ``CacheMixin`` (DiT, PixArt, SD3 in diffusers 0.42) take the same hooks through the ``apply_*``
functions, and the context through :func:`cache_context`, the one place that reaches past the public API.
Nothing here knows the harness.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.models.cache_utils import CacheMixin
from torch import nn

APPLY: dict[type, Callable[[nn.Module, Any], None]] = {
    FirstBlockCacheConfig: apply_first_block_cache,
    TaylorSeerCacheConfig: apply_taylorseer_cache,
    PyramidAttentionBroadcastConfig: apply_pyramid_attention_broadcast,
    FasterCacheConfig: apply_faster_cache,
    MagCacheConfig: apply_mag_cache,
}

# the names of a transformer's block lists, as diffusers' block-level hooks look for them among the model's
# children (diffusers.hooks._common._ALL_TRANSFORMER_BLOCK_IDENTIFIERS; spelled out, it is private)
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers", "visual_transformer_blocks",
               "temporal_transformer_blocks")

CONTEXT = "cond"  # the context name of a denoiser call: one network call per evaluation, as FLUX's pipeline names it


def transformer_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks the hooks find in ``module``: every entry of a child ``nn.ModuleList`` named in
    :data:`BLOCK_LISTS` (none in a UNet, whose attention sits inside its down/mid/up blocks)."""
    return [(f"{name}.{i}", block) for name, child in module.named_children()
            if name in BLOCK_LISTS and isinstance(child, nn.ModuleList) for i, block in enumerate(child)]


def not_applicable(module: nn.Module) -> str | None:
    """Why diffusers' transformer caches do not apply to ``module``, or None."""
    if not transformer_blocks(module):
        return (f"{type(module).__name__} has no transformer blocks (no child block list named "
                f"{', '.join(BLOCK_LISTS[:3])}, ...): diffusers' caches hook transformers (DiT, PixArt, SD3, FLUX); "
                "a UNet's cache is deepcache")
    return None


def hooked_modules(module: nn.Module) -> list[str]:
    """The names of the modules under ``module`` (itself: "") that carry a diffusers hook."""
    return [name for name, m in module.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks]


def enable(module: nn.Module, config: Any) -> None:
    """Hook ``module`` with the cache ``config`` as diffusers does: ``enable_cache`` where the model has
    ``CacheMixin``, else the config's ``apply_*`` function and, as ``enable_cache`` does after it, the root
    registry's list of hooked children made again (the context reaches the new block hooks)."""
    if isinstance(module, CacheMixin):
        module.enable_cache(config)
        return
    APPLY[type(config)](module, config)
    HookRegistry.check_if_exists_or_initialize(module).invalidate_child_registries_cache()


def cache_context(module: nn.Module, name: str = CONTEXT) -> AbstractContextManager[None]:
    """``module.cache_context(name)``: the cache context the stateful hooks (First Block Cache, TaylorSeer) need
    around each network call ("No cache context is set" without it).

    DiT, PixArt and SD3 (diffusers 0.42) lack ``CacheMixin``, which defines ``cache_context``, although the hooks
    find their blocks. For them this runs ``CacheMixin.cache_context`` itself on the model: that method uses its
    ``self`` only to reach the model's ``HookRegistry`` (``hooks.hooks._set_cache_context``), which every module
    has once hooked, so it needs nothing else of the mixin. The one place this code goes past the public API."""
    if isinstance(module, CacheMixin):
        return module.cache_context(name)
    return CacheMixin.cache_context(module, name)


def reset(module: nn.Module) -> None:
    """Clear every cache hook's state under ``module`` (a new generation), as a pipeline does after a call
    (``CacheMixin._reset_stateful_cache``: the root registry's ``reset_stateful_hooks``)."""
    HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)


def timestep_value(t: Any) -> float:
    """A denoiser's timestep as one number (a sampler passes one value, or the same value per sample)."""
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else float("nan")
    return float(t)


class NothingHooked(TypeError):
    """A cache config whose patterns match no module of the model (diffusers applies it silently)."""


class DiffusersCache:
    """A diffusers cache on ``module`` (hooked here) and what a sampler needs to drive it.

    ``config_for(current_timestep)`` makes the cache's config given the timestep callback (PAB and FasterCache
    read it; the others ignore it): the callback returns the timestep of the denoiser call under way."""

    def __init__(self, module: nn.Module, config_for: Callable[[Callable[[], float]], Any]):
        reason = not_applicable(module)
        if reason:
            raise TypeError(reason)
        self.module = module
        self.timestep: float | None = None
        self.calls = 0  # network calls since the last reset
        self.config = config_for(self.current_timestep)
        enable(module, self.config)
        if not [name for name in hooked_modules(module) if name]:  # e.g. TaylorSeer's patterns on DiT's "attn1"
            raise NothingHooked(f"diffusers' {type(self.config).__name__} found no module to hook in "
                                f"{type(module).__name__}")

    def current_timestep(self) -> float:
        if self.timestep is None:
            raise RuntimeError("the cache read the timestep outside a denoiser call")
        return self.timestep

    def wrap(self, denoiser: Callable) -> Callable:
        """``denoiser`` (one network call per evaluation) with each call in the cache's context and its
        timestep recorded first."""

        def call(x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self.timestep = timestep_value(t)
            self.calls += 1
            with cache_context(self.module):
                return denoiser(x, t, *args, **kwargs)

        return call

    def reset(self) -> None:
        """A new trajectory: no cached state, no timestep."""
        reset(self.module)
        self.timestep = None
        self.calls = 0

