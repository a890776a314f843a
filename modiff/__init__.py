"""MoDiff (modulated quantization of temporal residuals, ICML 2025) and the fake-quantization
core it shares with the baselines. See ../shared/spec/modiff.md for the method.

    import modiff
    modiff.quantize(unet, modiff.ModiffConfig(w_bits=8, a_bits=3, granularity="channel"))
    with modiff.trajectory(unet):   # once per batch, before the first step (a new trajectory is also
        ...sample...                # detected from the timestep going back up: modiff.watch_trajectories)
"""

from .allocator import allocator_settings, tune_allocator
from .api import (
    calibrate,
    quant_layers,
    quantize,
    reset,
    reused_samples,
    state_bytes,
    trajectory,
    watch_trajectories,
)
from .checkpoint import load_quantized, save_quantized
from .config import GRANULARITIES, MODULATIONS, ModiffConfig
from .fusion import fuse_norms
from .layers import QuantLayer

__all__ = [
    "GRANULARITIES", "MODULATIONS", "ModiffConfig", "QuantLayer",
    "calibrate", "fuse_norms", "load_quantized", "quant_layers", "quantize", "reset", "reused_samples",
    "save_quantized", "state_bytes", "trajectory", "watch_trajectories", "allocator_settings", "tune_allocator",
]
