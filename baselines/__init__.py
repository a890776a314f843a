"""Faithful reimplementations of the baselines, one subpackage each, registered as methods:
DeepCache (``baselines.deepcache``, a cache scheme), Q-Diffusion (``baselines.qdiffusion``, the
``qdiff`` base quantizer) and PTQD (``baselines.ptqd``, the ``ptqd`` base quantizer)."""

from .deepcache import method as _deepcache_method  # noqa: F401  (registers "deepcache")
from .ptqd import method as _ptqd_method  # noqa: F401  (registers "ptqd")
from .qdiffusion import method as _qdiffusion_method  # noqa: F401  (registers "qdiff")
