"""``base = "ptqd"`` in matrix files: PTQD's noise correction on top of another base quantizer.

    [matrix]
    base = ["ptqd"]
    [params.ptqd]
    base = "qdiff"          # the quantizer whose error is corrected
    calib_samples = 256     # full-precision calibration trajectories
    correct_variance = true # variance schedule calibration (matters only with eta > 0 or DDPM)

Building a cell builds the base quantizer for the cell's bit widths, with the base's own parameters
(``cell.params[<base>]``, so that it shares that base's calibration cache), then runs
``calib_samples`` full-precision trajectories with the cell's sampler (seeds ``10_000_000 + seed``
onwards, disjoint from any evaluation seeds), calling the quantized denoiser on the same ``x_t`` at
each step, and turns the errors into per-step statistics (``baselines.ptqd.collect_statistics``).
Those are kept in ``<cache_dir>/ptqd/<key>.pt`` (``bench.calibration_cache``), keyed by everything they depend on,
and reused.

Samplers: the statistics and the variance calibration re-implement the DDIM / DDPM update, one
network evaluation per step, so cells with ``plms`` or ``dpm-solver++`` are skipped (``resolve``
gives the reason); ``ddim-ldm`` is DDIM on latent-diffusion's grid and is supported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench.calibration_cache import DiskCache, key
from bench.errors import BenchError
from bench.methods import BaseQuantizer, BuildContext, CellSpec, Prepared, base_quantizer, register_method
from modiff.config import NOT_QUANTIZED
from modiff.flow import FLOW_SAMPLER_NAMES
from modiff.samplers import ALGORITHMS, SAMPLERS

from .noise_correction import PTQDCorrection, PTQDStats, collect_statistics

CALIB_SEED_OFFSET = 10_000_000  # calibration seeds start here (+ the cell's seed)
STATS_FORMAT = 1  # bump when the statistics' definition changes (invalidates cached files)


@register_method("ptqd")
class PTQD(BaseQuantizer):
    """PTQD (NeurIPS 2023): corrects a base quantizer's correlated noise, bias and added variance per step."""

    @dataclass(frozen=True)
    class Params:
        base: str = "qdiff"  # the base quantizer whose error is corrected
        calib_samples: int = 256  # full-precision calibration trajectories
        correct_variance: bool = True  # variance schedule calibration (matters only with eta > 0 or DDPM)

        def __post_init__(self) -> None:
            if not isinstance(self.base, str) or not self.base:
                raise ValueError(f"base must be the name of a base quantizer, got {self.base!r}")
            if self.base == "ptqd":
                raise ValueError("base cannot be ptqd itself")
            n = self.calib_samples
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"calib_samples must be an integer >= 1, got {n!r}")

    # -- parameters and the base ----------------------------------------------------------------
    def depends_on(self) -> tuple[str, ...]:
        return (self.settings.base,)

    def base(self, cell: CellSpec) -> BaseQuantizer:
        """The quantizer being corrected, with its own parameters from ``cell.params[base]``."""
        name = self.settings.base
        base = base_quantizer(name, cell.params.get(name))  # BenchError for an unknown name
        if isinstance(base, PTQD):
            raise BenchError(f"ptqd: base {name!r} is itself a PTQD correction")
        return base

    def quantizes_attention(self, cell: CellSpec) -> bool:
        return self.base(cell).quantizes_attention(cell)

    def normalise(self, cell: CellSpec) -> CellSpec:
        return self.base(cell).normalise(cell)

    def configure(self, cell: CellSpec) -> Any:
        return self.base(cell).configure(cell)

    def check(self, cell: CellSpec) -> str | None:
        if cell.sampler in FLOW_SAMPLER_NAMES:
            return (f"PTQD's noise correction is derived from the DDPM/DDIM step's variance; no flow-matching "
                    f"analogue is published ({cell.sampler})")
        reason = self.base(cell).check(cell)
        if reason:
            return reason
        if cell.modulation != "off":
            return ("PTQD models the error of plain PTQ as a function of x_t; with modulation the error "
                    "depends on the trajectory (use modulation=off)")
        if cell.w_bits == NOT_QUANTIZED and cell.a_bits == NOT_QUANTIZED:
            return "PTQD at W32A32 has no quantization error to correct"
        if SAMPLERS.get(cell.sampler, ("",))[0] not in ALGORITHMS:
            return (f"PTQD's correction is defined here for DDIM/DDPM updates (one network evaluation per step, "
                    f"ddim-* / ddpm-*), not for {cell.sampler}")
        return None

    # -- build ----------------------------------------------------------------------------------
    def build(self, ctx: BuildContext) -> Prepared:
        base = self.base(ctx.cell)
        prepared = base.build(ctx)
        prepared.make_denoiser = prepared.make_denoiser or ctx.model.denoiser
        stats, cached = self.statistics(ctx, base, prepared)
        correction = PTQDCorrection(stats)
        inner_wrap = prepared.wrap

        def wrap(denoiser):
            return correction.wrap(inner_wrap(denoiser) if inner_wrap is not None else denoiser)

        prepared.wrap = wrap
        prepared.on_trajectory_start = [*prepared.on_trajectory_start, correction.reset]
        if self.settings.correct_variance:
            prepared.noise_std = correction.noise_std
        prepared.info.update({
            "ptqd_base": base.name,
            "ptqd_calib_samples": stats.n_samples,
            "ptqd_timesteps": list(stats.timesteps),
            "ptqd_k": _rounded(stats.k),
            "ptqd_mean_abs_bias": _rounded(stats.bias.abs().mean(dim=1)),
            "ptqd_residual_std": _rounded(stats.residual_std),
            "ptqd_correct_variance": bool(self.settings.correct_variance),
            "ptqd_stats_from_cache": cached,
        })
        return prepared

    def cache_key(self, ctx: BuildContext, base: BaseQuantizer) -> str:
        """sha256 of everything the statistics depend on."""
        cell = ctx.cell
        payload = {
            "format": STATS_FORMAT, "model": cell.model, "checkpoint": cell.checkpoint, "model_info": ctx.model.info,
            "sampler": cell.sampler, "steps": cell.steps, "eta": cell.eta, "w_bits": cell.w_bits,
            "a_bits": cell.a_bits, "a_granularity": cell.a_granularity, "modulation": cell.modulation,
            "base": base.name, "base_params": base.params, "calib_samples": self.settings.calib_samples,
            "calib_seed": CALIB_SEED_OFFSET + cell.seed, "batch_size": self._batch_size(cell),
            "device": ctx.device.type,
        }
        version = type(base).version(asdict(cell))
        if version > 1:  # a fix that changed the base model (Q-Diffusion's version 3) changes its statistics
            payload["base_version"] = version
        return key(payload)

    def _batch_size(self, cell: CellSpec) -> int:
        # batch-wise activation scales (tensor / channel granularity) make the error depend on the batch
        return min(cell.batch_size, self.settings.calib_samples)

    def statistics(self, ctx: BuildContext, base: BaseQuantizer, prepared: Prepared) -> tuple[PTQDStats, bool]:
        """The cell's statistics and whether they came from the cache (a file that does not load or
        is inconsistent, e.g. a truncated copy, is collected again and overwritten)."""
        cache = DiskCache(ctx.cache_dir, "ptqd")
        name = self.cache_key(ctx, base) if cache.enabled else ""
        stats = cache.load(name, check=PTQDStats.from_dict, map_location="cpu")
        if stats is not None:
            return stats, True
        cell = ctx.cell
        start = CALIB_SEED_OFFSET + cell.seed
        stats = collect_statistics(
            ctx.model.denoiser(), prepared.denoiser(), ctx.model.schedule, ctx.sampler,
            range(start, start + self.settings.calib_samples), ctx.model.image_shape, self._batch_size(cell),
            ctx.device, on_trajectory_start=prepared.start_trajectory, progress=ctx.progress,
            on_batch=ctx.model.start_batch)
        if cache.enabled:
            cache.save(name, stats.to_dict())
        return stats, False


def _rounded(values: torch.Tensor, digits: int = 6) -> list[float]:
    return [float(f"{float(v):.{digits}g}") for v in values]
