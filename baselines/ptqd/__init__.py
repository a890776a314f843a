"""PTQD (He et al., NeurIPS 2023): correcting the quantization noise of a post-training-quantized diffusion model,
on top of any quantizer.

- :mod:`.noise_correction`: the error model, the statistics collected on full-precision trajectories
  (:func:`collect_statistics`, :class:`PTQDStats`) and their use at sampling time (:class:`PTQDCorrection`);
- :mod:`.method`: the ``ptqd`` base quantizer, the glue to the harness (not loaded by this package).
"""

from .noise_correction import PTQDCorrection, PTQDStats, collect_statistics

__all__ = ["PTQDStats", "PTQDCorrection", "collect_statistics"]
