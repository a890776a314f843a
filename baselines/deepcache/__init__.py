"""DeepCache (Ma et al., CVPR 2024) on diffusers UNets, built on the module structure.

- :mod:`.feature_reuse`: which steps run the whole UNet (:func:`uniform_full_steps`, DeepCache's non-uniform
  :func:`nonuniform_full_steps`) and :class:`DeepCache`, which keeps the feature entering an up block on those steps
  and reuses it on the partial steps in between;
- :mod:`.method`: the ``deepcache`` cache scheme, the glue to the harness (not loaded by this package).
"""

from .feature_reuse import DeepCache, nonuniform_full_steps, uniform_full_steps

__all__ = ["DeepCache", "nonuniform_full_steps", "uniform_full_steps"]
