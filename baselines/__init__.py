"""Faithful reimplementations of the baselines, one subpackage each, registered as methods:
DeepCache (``baselines.deepcache``); Q-Diffusion and PTQD follow (issue #6)."""

from .deepcache import method as _deepcache_method  # noqa: F401  (registers "deepcache")
