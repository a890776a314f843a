"""``base = "qdiff"`` in matrix files: Q-Diffusion, alone (``modulation = "off"``) or under MoDiff
(``plain`` / ``ec``: the Q-Diffusion weights with static residual scales, paper Table 1's
"Q-Diff + MoDiff" columns).

Preparation, cached under the run's ``cache/qdiff/`` (``bench.calibration_cache``) and keyed by everything each
product depends on, so a matrix calibrates once per (model, sampler, w_bits, a_bits):

1. calibration data (full-precision trajectories from seeds disjoint from any evaluation seed);
2. the AdaRound weights (weight phase; depends on w_bits, not on a_bits);
3. the learned activation step sizes (activation phase; per w_bits and a_bits).

With modulation, the activation quantizers quantize temporal residuals instead; their static
per-tensor scales are fitted by ``modiff.calibrate`` on the residuals of the calibration pairs
``(x_prev, x_t)`` (``residual_scale``: min-max, or the MSE search), on the Q-Diffusion weights;
``learned`` then learns them as the MoDiff authors' ``layer_reconstruction_modiff`` does (Adam, one step
size per half of a shortcut-split input; :mod:`.residual`). ``authors_grid`` puts the residuals on the
authors' symmetric grid with their min-max start (``--a_sym``; :mod:`.residual` says what it leaves unused).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

import modiff
from bench.calibration_cache import DiskCache, as_dict, key
from bench.errors import BenchError
from bench.methods import AUTO, BaseQuantizer, BuildContext, CellSpec, Prepared, register_method
from modiff.config import NOT_QUANTIZED
from modiff.layers import QuantLayer

from . import calibration, residual
from .reconstruction import (
    ReconConfig,
    act_state,
    load_act_state,
    load_weight_state,
    prepare,
    recon_layers,
    reconstruct_activations,
    reconstruct_weights,
    weight_state,
)

CALIBRATION_SEED_OFFSET = 20_000_000  # calibration trajectories never share a seed with evaluation
# bump when what is cached changes meaning (2: calibration steps index network evaluations; 3: the reconstruction
# loss is BRECQ's reduction, weights and step sizes fitted with the old one are not reused)
FORMAT = 3
# what the reconstruction computes, in the keys of the weights, step sizes and residual scales it makes (the
# calibration data does not depend on it): 2 is the authors' AdaRound temperature (counted from 1), regulariser
# (the first grid of a split layer) and randperm minibatches (Q-Diffusion version 3)
RECON = 2


def _key(payload: dict) -> str:
    """The cache key of a product: 16 hex digits of ``bench.calibration_cache.key``."""
    return key(payload, 16)


@register_method("qdiff")
class QDiffusion(BaseQuantizer):
    """Q-Diffusion (ICCV 2023): time-step-aware calibration, AdaRound + BRECQ block reconstruction, learned static step sizes."""  # noqa: E501

    granularity = "tensor"

    @classmethod
    def version(cls, settings) -> int:
        # 2: the reconstruction loss sums over dim 1 only and averages the rest (BRECQ's / Q-Diffusion's lp_loss),
        # which changes every reconstructed model (weights by AdaRound, or learned step sizes);
        # 3: the authors' AdaRound temperature (from iteration 1) and regulariser (a split layer's first grid only),
        # and minibatches drawn by randperm (weights, step sizes and learned residual scales)
        own = (settings.get("params") or {}).get("qdiff") or {}
        iters = [own.get(k, cls.PARAMS[k]) for k in ("weight_iters", "act_iters")]
        return 3 if any(isinstance(i, int) and i > 0 for i in iters) else 1

    @classmethod
    def id_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        # out_penalty weighs a term of the learned residual scales' loss only: elsewhere it changes nothing
        if params.get("residual_scale", cls.PARAMS["residual_scale"]) != "learned":
            return {k: v for k, v in params.items() if k != "out_penalty"}
        return params

    @dataclass(frozen=True)
    class Params:
        cali_st: int = 20  # calibration steps, spread uniformly over the trajectory
        cali_n: int = 256  # calibration trajectories (samples per step)
        cali_seed: int = 0  # offset of the calibration seeds (and of the reconstruction's)
        weight_init: Literal["minmax", "mse"] = "minmax"  # initial weight range
        weight_iters: int = 20000  # AdaRound iterations per block (0: min-max / MSE weights, rounded to nearest)
        weight_lr: float = 1e-3
        round_weight: float = 0.01  # AdaRound's rounding regulariser
        # initial activation step sizes: min-max, the Lp search, or the authors' 'max' formula (--a_min_max on LSUN,
        # always on CIFAR-10; quantizers.authors_max_range)
        act_init: Literal["minmax", "mse", "max"] = "mse"
        act_iters: int = 5000  # step-size learning iterations per block (0: the initial ones)
        act_lr: float = 4e-4
        p: float = 2.4  # the Lp reconstruction loss
        batch_size: int = 32  # reconstruction batch
        sm_abit: int = 8  # bits of the softmax output
        quant_attention: Literal["auto", True, False] = "auto"  # auto: without modulation only
        split_shortcut: bool = True  # two quantizers for a concatenated shortcut input
        # static residual scales under modulation: min-max or the MSE search over the whole residual, or learned
        # from the min-max start per half of a split input (the MoDiff authors' layer_reconstruction_modiff)
        residual_scale: Literal["minmax", "mse", "learned"] = "minmax"
        # the MoDiff authors' symmetric residual grid and min-max start (their --a_sym; baselines.qdiffusion.residual)
        authors_grid: bool = False
        # learned residual scales: the authors' overflow term's weight (their --out_penalty, default 0.0)
        out_penalty: float = 0.0
        act_symmetric: bool = False  # symmetric activation grids, zero point 0 (Q-Diffusion's --a_sym)
        # rows the initial activation ranges are fitted on (0: all; the authors' scripts: one forward pass of 64),
        # drawn without repeats or the first ones (their LDM script's cali_xs[:64])
        act_init_samples: int = 0
        act_init_pick: Literal["random", "first"] = "random"
        running_stat: bool = False  # momentum (0.95) activation ranges after the initialisation (--running_stat)
        # AdaRound's rounding regulariser on both weight grids of a split layer (the AdaRound paper) instead of the
        # first only (the authors' LossFunction)
        regularize_both_halves: bool = False

        def __post_init__(self) -> None:
            for name, least, words in (("cali_st", 1, "a positive"), ("cali_n", 1, "a positive"),
                                       ("batch_size", 1, "a positive"), ("weight_iters", 0, "a non-negative"),
                                       ("act_iters", 0, "a non-negative"), ("act_init_samples", 0, "a non-negative")):
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < least:
                    raise ValueError(f"{name} must be {words} integer; got {value!r}")
            if self.authors_grid and self.residual_scale == "mse":
                raise ValueError("authors_grid starts from the authors' min-max step size: residual_scale must be "
                                 "'minmax' or 'learned'")

    def check(self, cell: CellSpec) -> str | None:
        reason = super().check(cell)
        if reason:
            return reason
        if cell.w_bits == NOT_QUANTIZED and cell.a_bits == NOT_QUANTIZED:
            return "qdiff at W32A32 is the full-precision model"
        if not 1 <= self.settings.cali_st <= cell.steps:
            return f"qdiff cali_st={self.settings.cali_st} must be between 1 and steps={cell.steps}"
        if self.settings.authors_grid and cell.modulation != "off" and cell.a_bits < 3:
            return ("qdiff authors_grid: the MoDiff authors' symmetric residual start divides by 2^(b-1) - 2, "
                    f"which is 0 at a_bits={cell.a_bits} (needs a_bits >= 3)")
        return None

    def quantizes_attention(self, cell: CellSpec) -> bool:
        return self.recon_config(cell).quant_attention

    def recon_config(self, cell: CellSpec) -> ReconConfig:
        s = self.settings
        quant_attention = s.quant_attention
        if quant_attention == AUTO:  # Q-Diffusion quantizes the matmuls; MoDiff's code keeps them in float
            quant_attention = cell.modulation == "off"
        return ReconConfig(
            w_bits=cell.w_bits, a_bits=cell.a_bits, sm_abit=s.sm_abit, quant_attention=bool(quant_attention),
            split_shortcut=bool(s.split_shortcut), weight_init=s.weight_init, weight_iters=s.weight_iters,
            weight_lr=s.weight_lr, round_weight=s.round_weight, act_init=s.act_init,
            act_iters=s.act_iters, act_lr=s.act_lr, p=s.p, batch_size=s.batch_size,
            seed=cell.seed + s.cali_seed, act_symmetric=s.act_symmetric, act_init_samples=s.act_init_samples,
            act_init_pick=s.act_init_pick, running_stat=s.running_stat,
            regularize_both_halves=s.regularize_both_halves)

    # -- cached products -------------------------------------------------------------------------
    def _data_key(self, ctx: BuildContext) -> dict:
        c, s = ctx.cell, self.settings
        return {"format": FORMAT, "model": c.model, "checkpoint": c.checkpoint, "model_info": ctx.model.info,
                "sampler": c.sampler, "steps": c.steps, "eta": c.eta, "cali_st": s.cali_st, "cali_n": s.cali_n,
                "cali_seed": s.cali_seed, "seed": c.seed}

    def _cached(self, ctx: BuildContext, kind: str, payload: dict, make, info: dict):
        """Load ``kind`` from ``<cache_dir>/qdiff/<kind>-<key>.pt``, or make and store it (``bench.calibration_cache``:
        read with ``weights_only=True``, a damaged file is a miss, made again and overwritten). Records
        hits and timings in ``info``."""
        cache = DiskCache(ctx.cache_dir, "qdiff")
        name = f"{kind}-{_key(payload)}"
        cached = cache.load(name, check=as_dict)  # every product is a dict
        if cached is not None:
            info.setdefault("cache_hits", []).append(kind)
            return cached
        t0 = time.perf_counter()
        value = make()
        info.setdefault("seconds", {})[kind] = round(time.perf_counter() - t0, 3)
        cache.save(name, value)
        return value

    def calibration_data(self, ctx: BuildContext, info: dict) -> calibration.CalibrationData:
        c, s = ctx.cell, self.settings

        def make():
            seeds = range(CALIBRATION_SEED_OFFSET + c.seed + s.cali_seed,
                          CALIBRATION_SEED_OFFSET + c.seed + s.cali_seed + s.cali_n)
            data = calibration.collect(ctx.model.denoiser(), ctx.model.schedule, ctx.sampler, s.cali_st,
                                       seeds, ctx.model.image_shape, c.batch_size, ctx.device, ctx.progress,
                                       on_batch=ctx.model.start_batch, unet=ctx.model.unet)
            return data.to_dict()

        return calibration.CalibrationData.from_dict(self._cached(ctx, "data", self._data_key(ctx), make, info))

    def weight_model(self, ctx: BuildContext, info: dict, **overrides: Any):
        """The Q-Diffusion model with its calibrated weights (AdaRound, cached): ``(qmodel, config, data,
        weight_payload)``. ``overrides``: ``ReconConfig`` fields other bases that take these weights set
        (``split_shortcut``, ``quant_attention``)."""
        cell, s = ctx.cell, self.settings
        calibration.calibration_steps(len(ctx.sampler.evaluation_timesteps(ctx.model.schedule)), s.cali_st)
        config = self.recon_config(cell)
        config = dataclasses.replace(config, **overrides)
        data = self.calibration_data(ctx, info)
        xs, ts = data.inputs()
        cond = data.conditioning()  # the UNet's keyword inputs of each row (text conditioning); {} without
        example = (xs[:2].to(ctx.device), ts[:2].to(ctx.device),
                   calibration.map_cond(cond, lambda v: v[:2].to(ctx.device)))
        fp = ctx.model.unet
        qmodel = prepare(fp, config, example)
        data_key = self._data_key(ctx)
        weight_payload = {"data": data_key, "w_bits": cell.w_bits, "split": config.split_shortcut, "recon": RECON,
                          **{k: getattr(s, k) for k in ("weight_init", "weight_iters", "weight_lr", "round_weight",
                                                        "p", "batch_size", "regularize_both_halves")}}

        def make_weights():
            report = reconstruct_weights(qmodel, fp, xs, ts, config, ctx.device, ctx.progress, cond=cond)
            return {"weights": weight_state(qmodel), "report": report}

        if cell.w_bits != NOT_QUANTIZED:
            cached = self._cached(ctx, f"w{cell.w_bits}", weight_payload, make_weights, info)
            load_weight_state(qmodel, cached["weights"])
            info["weight_reconstruction"] = _summary(cached["report"], "nearest", "adaround")
            info["adaround_hard_fraction"] = (min(r["hard_fraction"] for r in cached["report"])
                                              if cached["report"] else None)
            # units whose reconstructed weights ended with a larger block error than rounding to nearest
            info["adaround_units_worse"] = sum(r["adaround"] > r["nearest"] for r in cached["report"])
        return qmodel, config, data, weight_payload

    def build(self, ctx: BuildContext) -> Prepared:
        cell, s = ctx.cell, self.settings
        info: dict[str, Any] = {}
        qmodel, config, data, weight_payload = self.weight_model(ctx, info)
        fp = ctx.model.unet
        needs_act_phase = cell.a_bits not in (0, NOT_QUANTIZED) and (cell.modulation == "off"
                                                                     or config.quant_attention)
        if needs_act_phase:
            xs, ts = data.inputs()
            cond = data.conditioning()
            act_payload = {"weights": weight_payload, "a_bits": cell.a_bits, "sm_abit": config.sm_abit,
                           "quant_attention": config.quant_attention,
                           **{k: getattr(s, k) for k in ("act_init", "act_iters", "act_lr", "act_symmetric",
                                                         "act_init_samples", "act_init_pick", "running_stat")}}

            def make_acts():
                report = reconstruct_activations(qmodel, fp, xs, ts, config, ctx.device, ctx.progress, cond=cond)
                return {"acts": act_state(qmodel), "report": report}

            cached = self._cached(ctx, f"w{cell.w_bits}a{cell.a_bits}", act_payload, make_acts, info)
            load_act_state(qmodel, cached["acts"])
            info["act_reconstruction"] = _summary(cached["report"], "initial", "learned")

        splits = {layer.name: layer.split for layer in recon_layers(qmodel) if layer.split}
        unet = to_modiff(qmodel, cell)
        if cell.modulation != "off" and cell.a_bits not in (0, NOT_QUANTIZED):
            t0 = time.perf_counter()
            calibrate_residual_scales(unet, data, s.batch_size * 8, ctx.device,
                                      "minmax" if s.residual_scale == "learned" else s.residual_scale)
            if s.authors_grid:
                for layer in modiff.quant_layers(unet):
                    layer.config = dataclasses.replace(layer.config, symmetric=True)
                    residual.authors_grid_scale(layer)
            info.setdefault("seconds", {})["residual_scales"] = round(time.perf_counter() - t0, 3)
            if s.residual_scale == "learned":
                payload = {"weights": weight_payload, "a_bits": cell.a_bits, "modulation": cell.modulation,
                           "authors_grid": s.authors_grid, "splits": splits, "rows": residual.MAX_ROWS,
                           **{k: getattr(s, k) for k in ("act_iters", "act_lr", "p", "batch_size", "cali_seed",
                                                             "out_penalty")}}

                def make_scales():
                    states, report = residual.learn_residual_scales(
                        unet, fp, data, splits, s.act_iters, s.act_lr, s.p, s.batch_size, ctx.device,
                        cell.seed + s.cali_seed, ctx.progress, s.out_penalty)
                    return {"scales": states, "report": report}

                cached = self._cached(ctx, f"w{cell.w_bits}a{cell.a_bits}-residual", payload, make_scales, info)
                residual.load_residual_scales(unet, cached["scales"])
                info["residual_reconstruction"] = _summary(cached["report"], "initial", "learned")
                ratios = [max(r["scales"]) / min(r["scales"]) for r in cached["report"] if r["split"]]
                info["residual_split_scale_ratio_max"] = max(ratios) if ratios else None
        info.update({"quantized_layers": len(modiff.quant_layers(unet)), "calibration_samples": data.n,
                     "calibration_steps": data.steps, "quant_attention": config.quant_attention,
                     "split_shortcuts": len(splits)})
        return Prepared(unet=unet, on_trajectory_start=[lambda: modiff.reset(unet)], info=info)


def _summary(report: list[dict], before: str, after: str) -> dict:
    if not report:
        return {"units": 0}
    return {"units": len(report), f"loss_{before}": sum(r[before] for r in report),
            f"loss_{after}": sum(r[after] for r in report)}


def to_modiff(qmodel: torch.nn.Module, cell: CellSpec, config: modiff.ModiffConfig | None = None) -> torch.nn.Module:
    """Replace each reconstructed layer by a ``modiff.QuantLayer`` holding its quantized weight;
    without modulation its activation quantizer is Q-Diffusion's learned one; with modulation it
    gets static per-tensor residual scales (fitted afterwards). ``config``: another base's activation
    quantization on these weights (the built-in quantizers of that config, no Q-Diffusion step sizes)."""
    modulated = cell.modulation != "off"
    own = config is None
    if own:
        config = modiff.ModiffConfig(w_bits=cell.w_bits, a_bits=cell.a_bits, modulation=cell.modulation,
                                     granularity="tensor", act_scale="static" if modulated else "dynamic")
    for layer in recon_layers(qmodel):
        parent_name, _, child = layer.name.rpartition(".")
        parent = qmodel.get_submodule(parent_name) if parent_name else qmodel
        act = layer.act if own and not modulated else None
        setattr(parent, child, QuantLayer(layer.layer, config, layer.name, weight_quantized=True, act_quantizer=act))
    return modiff.watch_trajectories(qmodel)  # as modiff.quantize's models: a new trajectory resets the state


def calibrate_residual_scales(unet: torch.nn.Module, data: calibration.CalibrationData, batch_size: int,
                              device: torch.device, method: str) -> None:
    """Static residual scales from the calibration pairs: each layer sees ``a(x_prev)`` then
    ``a(x_t)`` and records ``a(x_t) - a(x_prev)`` (``modiff.calibrate``)."""
    pairs = data.pairs()
    if not pairs:
        raise BenchError("qdiff: residual scales need calibration steps after the first (raise cali_st)")

    def run():
        with torch.no_grad():
            for x_prev, t_prev, x, t in pairs:
                for i in range(0, len(x), batch_size):
                    cond = calibration.map_cond(data.cond, lambda v, i=i: v[i: i + batch_size].to(device))  # x's rows
                    modiff.reset(unet)
                    calibration.call_network(unet, x_prev[i: i + batch_size].to(device),
                                             t_prev[i: i + batch_size].to(device), cond)
                    calibration.call_network(unet, x[i: i + batch_size].to(device), t[i: i + batch_size].to(device),
                                             cond)

    modiff.calibrate(unet, run, method)
