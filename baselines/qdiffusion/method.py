"""``base = "qdiff"`` in matrix files: Q-Diffusion, alone (``modulation = "off"``) or under MoDiff
(``plain`` / ``ec``: the Q-Diffusion weights with static residual scales, paper Table 1's
"Q-Diff + MoDiff" columns).

Preparation, cached under the run's ``cache/qdiff/`` and keyed by everything each product
depends on, so a matrix calibrates once per (model, sampler, w_bits, a_bits):

1. calibration data (full-precision trajectories from seeds disjoint from any evaluation seed);
2. the AdaRound weights (weight phase; depends on w_bits, not on a_bits);
3. the learned activation step sizes (activation phase; per w_bits and a_bits).

With modulation, the activation quantizers quantize temporal residuals instead; their static
per-tensor scales are fitted by ``modiff.calibrate`` on the residuals of the calibration pairs
``(x_prev, x_t)`` (``residual_scale``: min-max, or the MSE search), on the Q-Diffusion weights.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

import modiff
from bench.errors import BenchError
from bench.methods import AUTO, BaseQuantizer, BuildContext, CellSpec, Choice, Prepared, register_method
from bench.provenance import write_atomic
from modiff.config import NOT_QUANTIZED
from modiff.layers import QuantLayer

from . import calibration
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
FORMAT = 2  # bump when what is cached changes meaning (2: calibration steps index network evaluations)


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@register_method("qdiff")
class QDiffusion(BaseQuantizer):
    """Q-Diffusion (ICCV 2023): time-step-aware calibration, AdaRound + BRECQ block reconstruction, learned static step sizes."""  # noqa: E501

    granularity = "tensor"
    PARAMS: ClassVar[dict[str, Any]] = {
        "cali_st": 20, "cali_n": 256, "cali_seed": 0,
        "weight_init": "minmax", "weight_iters": 20000, "weight_lr": 1e-3, "round_weight": 0.01,
        "act_init": "mse", "act_iters": 5000, "act_lr": 4e-4, "p": 2.4, "batch_size": 32,
        "sm_abit": 8, "quant_attention": AUTO, "split_shortcut": True, "residual_scale": "minmax",
    }
    PARAM_TYPES: ClassVar[dict[str, Any]] = {
        "weight_init": Choice("minmax", "mse"), "act_init": Choice("minmax", "mse"),
        "residual_scale": Choice("minmax", "mse"), "quant_attention": Choice(AUTO, True, False),
    }

    def resolve(self, cell: CellSpec) -> str | None:
        self._check_params()  # a bad parameter stops the matrix before anything runs
        reason = super().resolve(cell)
        if reason:
            return reason
        if cell.w_bits == NOT_QUANTIZED and cell.a_bits == NOT_QUANTIZED:
            return "qdiff at W32A32 is the full-precision model"
        if not 1 <= self.params["cali_st"] <= cell.steps:
            return f"qdiff cali_st={self.params['cali_st']} must be between 1 and steps={cell.steps}"
        return None

    def _check_params(self) -> None:
        p = self.params
        for name, choices in (("weight_init", ("minmax", "mse")), ("act_init", ("minmax", "mse")),
                              ("residual_scale", ("minmax", "mse")), ("quant_attention", (AUTO, True, False))):
            if p[name] not in choices:
                raise BenchError(f"qdiff: {name} must be one of {', '.join(map(str, choices))}; got {p[name]!r}")
        for name in ("cali_st", "cali_n", "batch_size"):
            if not isinstance(p[name], int) or p[name] < 1:
                raise BenchError(f"qdiff: {name} must be a positive integer; got {p[name]!r}")
        for name in ("weight_iters", "act_iters"):
            if not isinstance(p[name], int) or p[name] < 0:
                raise BenchError(f"qdiff: {name} must be a non-negative integer; got {p[name]!r}")

    def recon_config(self, cell: CellSpec) -> ReconConfig:
        p = self.params
        quant_attention = p["quant_attention"]
        if quant_attention == AUTO:  # Q-Diffusion quantizes the matmuls; MoDiff's code keeps them in float
            quant_attention = cell.modulation == "off"
        return ReconConfig(
            w_bits=cell.w_bits, a_bits=cell.a_bits, sm_abit=p["sm_abit"], quant_attention=bool(quant_attention),
            split_shortcut=bool(p["split_shortcut"]), weight_init=p["weight_init"], weight_iters=p["weight_iters"],
            weight_lr=p["weight_lr"], round_weight=p["round_weight"], act_init=p["act_init"],
            act_iters=p["act_iters"], act_lr=p["act_lr"], p=p["p"], batch_size=p["batch_size"],
            seed=cell.seed + p["cali_seed"])

    # -- cached products -------------------------------------------------------------------------
    def _data_key(self, ctx: BuildContext) -> dict:
        c, p = ctx.cell, self.params
        return {"format": FORMAT, "model": c.model, "checkpoint": c.checkpoint, "model_info": ctx.model.info,
                "sampler": c.sampler, "steps": c.steps, "eta": c.eta, "cali_st": p["cali_st"], "cali_n": p["cali_n"],
                "cali_seed": p["cali_seed"], "seed": c.seed}

    def _cached(self, ctx: BuildContext, kind: str, payload: dict, make, info: dict):
        """Load ``kind`` from the cache, or make and store it. Records hits and timings in ``info``. The
        cache is read with ``weights_only=True`` (no pickled code runs); a file that does not load (a
        truncated copy, anything else) is a miss, made again and overwritten."""
        key = _key(payload)
        path = Path(ctx.cache_dir) / "qdiff" / f"{kind}-{key}.pt" if ctx.cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                cached = torch.load(path, weights_only=True)
            except Exception:  # unreadable: recalibrate
                cached = None
            if isinstance(cached, dict):  # every product is a dict
                info.setdefault("cache_hits", []).append(kind)
                return cached
        t0 = time.perf_counter()
        value = make()
        info.setdefault("seconds", {})[kind] = round(time.perf_counter() - t0, 3)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda tmp: torch.save(value, tmp))
        return value

    def calibration_data(self, ctx: BuildContext, info: dict) -> calibration.CalibrationData:
        c, p = ctx.cell, self.params

        def make():
            seeds = range(CALIBRATION_SEED_OFFSET + c.seed + p["cali_seed"],
                          CALIBRATION_SEED_OFFSET + c.seed + p["cali_seed"] + p["cali_n"])
            data = calibration.collect(ctx.model.denoiser(), ctx.model.schedule, ctx.sampler, p["cali_st"],
                                       seeds, ctx.model.image_shape, c.batch_size, ctx.device, ctx.progress,
                                       on_batch=ctx.model.start_batch)
            return data.to_dict()

        return calibration.CalibrationData.from_dict(self._cached(ctx, "data", self._data_key(ctx), make, info))

    def build(self, ctx: BuildContext) -> Prepared:
        self._check_params()  # also here: build() may be called without resolve()
        cell, p = ctx.cell, self.params
        if ctx.model.start_batch is not None:  # block reconstruction calls the UNet on (x, t) alone
            raise BenchError(f"qdiff: calibrating the text-conditioned model {ctx.model.name!r} (its cross-attention "
                             "inputs) is not implemented; use the dynamic bases (ltq, lcq, psq) for it")
        config = self.recon_config(cell)
        info: dict[str, Any] = {}
        data = self.calibration_data(ctx, info)
        xs, ts = data.inputs()
        example = (xs[:2].to(ctx.device), ts[:2].to(ctx.device))
        fp = ctx.model.unet
        qmodel = prepare(fp, config, example)
        data_key = self._data_key(ctx)
        weight_payload = {"data": data_key, "w_bits": cell.w_bits, "split": config.split_shortcut,
                          **{k: p[k] for k in ("weight_init", "weight_iters", "weight_lr", "round_weight", "p",
                                               "batch_size")}}
        reports: dict[str, list] = {}

        def make_weights():
            reports["weight"] = reconstruct_weights(qmodel, fp, xs, ts, config, ctx.device, ctx.progress)
            return {"weights": weight_state(qmodel), "report": reports["weight"]}

        if cell.w_bits != NOT_QUANTIZED:
            cached = self._cached(ctx, f"w{cell.w_bits}", weight_payload, make_weights, info)
            load_weight_state(qmodel, cached["weights"])
            info["weight_reconstruction"] = _summary(cached["report"], "nearest", "adaround")
            info["adaround_hard_fraction"] = (min(r["hard_fraction"] for r in cached["report"])
                                              if cached["report"] else None)

        needs_act_phase = cell.a_bits not in (0, NOT_QUANTIZED) and (cell.modulation == "off"
                                                                     or config.quant_attention)
        if needs_act_phase:
            act_payload = {"weights": weight_payload, "a_bits": cell.a_bits, "sm_abit": config.sm_abit,
                           "quant_attention": config.quant_attention,
                           **{k: p[k] for k in ("act_init", "act_iters", "act_lr")}}

            def make_acts():
                reports["act"] = reconstruct_activations(qmodel, fp, xs, ts, config, ctx.device, ctx.progress)
                return {"acts": act_state(qmodel), "report": reports["act"]}

            cached = self._cached(ctx, f"w{cell.w_bits}a{cell.a_bits}", act_payload, make_acts, info)
            load_act_state(qmodel, cached["acts"])
            info["act_reconstruction"] = _summary(cached["report"], "initial", "learned")

        split_shortcuts = sum(1 for layer in recon_layers(qmodel) if layer.split)
        unet = to_modiff(qmodel, cell)
        if cell.modulation != "off" and cell.a_bits not in (0, NOT_QUANTIZED):
            t0 = time.perf_counter()
            calibrate_residual_scales(unet, data, p["batch_size"] * 8, ctx.device, p["residual_scale"])
            info.setdefault("seconds", {})["residual_scales"] = round(time.perf_counter() - t0, 3)
        info.update({"quantized_layers": len(modiff.quant_layers(unet)), "calibration_samples": data.n,
                     "calibration_steps": data.steps, "quant_attention": config.quant_attention,
                     "split_shortcuts": split_shortcuts})
        return Prepared(unet=unet, on_trajectory_start=[lambda: modiff.reset(unet)], info=info)


def _summary(report: list[dict], before: str, after: str) -> dict:
    if not report:
        return {"units": 0}
    return {"units": len(report), f"loss_{before}": sum(r[before] for r in report),
            f"loss_{after}": sum(r[after] for r in report)}


def to_modiff(qmodel: torch.nn.Module, cell: CellSpec) -> torch.nn.Module:
    """Replace each reconstructed layer by a ``modiff.QuantLayer`` holding its quantized weight;
    without modulation its activation quantizer is Q-Diffusion's learned one; with modulation it
    gets static per-tensor residual scales (fitted afterwards)."""
    modulated = cell.modulation != "off"
    config = modiff.ModiffConfig(w_bits=cell.w_bits, a_bits=cell.a_bits, modulation=cell.modulation,
                                 granularity="tensor", act_scale="static" if modulated else "dynamic")
    for layer in recon_layers(qmodel):
        parent_name, _, child = layer.name.rpartition(".")
        parent = qmodel.get_submodule(parent_name) if parent_name else qmodel
        act = None if modulated else layer.act
        setattr(parent, child, QuantLayer(layer.layer, config, layer.name, weight_quantized=True, act_quantizer=act))
    return qmodel


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
                    modiff.reset(unet)
                    unet(x_prev[i: i + batch_size].to(device), t_prev[i: i + batch_size].to(device))
                    unet(x[i: i + batch_size].to(device), t[i: i + batch_size].to(device))

    modiff.calibrate(unet, run, method)
