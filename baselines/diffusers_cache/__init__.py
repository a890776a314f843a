"""diffusers' own caches (``diffusers.hooks``: First Block Cache, TaylorSeer, Pyramid Attention Broadcast,
FasterCache, MagCache) on its transformers, driven by a sampler's denoiser calls.

- :mod:`.hooks`: :class:`DiffusersCache` hooks a network with a cache config and wraps a denoiser so that each
  call runs in the cache context with its timestep known; :func:`cache_context` for the models without
  ``CacheMixin``;
- :mod:`.method`: the ``fbcache``, ``taylorseer``, ``pab``, ``fastercache`` and ``magcache`` cache schemes, the glue
  to the harness (not loaded by this package).
"""

from .hooks import DiffusersCache, cache_context, enable, not_applicable, reset, transformer_blocks

__all__ = ["DiffusersCache", "cache_context", "enable", "not_applicable", "reset", "transformer_blocks"]
