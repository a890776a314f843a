"""The MoDiff authors' settings (issue 17): the ``paper-lcq`` / ``paper-ltq`` bases (their dynamic granularity,
symmetric activations, shortcut splitting, Q-Diffusion weights), and Q-Diffusion + MoDiff's residual step sizes
learned per half of a split input, on the authors' symmetric grid when asked. Each test fails on the code before."""

import copy
from dataclasses import replace

import pandas as pd
import pytest
import torch
from torch import nn

import modiff
from baselines.qdiffusion import residual
from baselines.qdiffusion.method import QDiffusion
from bench.build import resolve_cell
from bench.errors import BenchError
from bench.matrix import load_matrix
from bench.methods import CellSpec, base_quantizer
from bench.runner import Runner
from modiff.layers import QuantLayer
from modiff.quant import dynamic_fake_quant

pytestmark = pytest.mark.usefixtures("one_thread")


def _cell(base: str, params=None) -> CellSpec:
    return CellSpec("digits", None, "ddim-quad", 10, 0.0, 8, 0, 8, base, "ec", "none", 8, 4, "auto", params or {})


# -- the bases -------------------------------------------------------------------------------------
def test_paper_bases_are_the_authors_granularities_not_the_suites():
    """Their default (paper "LCQ") is one scale per batch tensor; --act_tensor (paper "LTQ") one per sample."""
    resolved = {}
    for name in ("paper-lcq", "paper-ltq", "lcq", "ltq"):
        cell = resolve_cell(_cell(name))
        assert cell.skip is None
        resolved[name] = cell.spec.a_granularity
    assert resolved == {"paper-lcq": "tensor", "paper-ltq": "sample", "lcq": "channel", "ltq": "tensor"}
    config = resolve_cell(_cell("paper-ltq")).config
    assert config.symmetric and config.warmup and config.granularity == "sample"  # --a_sym by default
    assert base_quantizer("paper-lcq").depends_on() == ("qdiff",)  # Q-Diffusion weights: its parameters matter
    assert base_quantizer("paper-lcq", {"weights": "minmax"}).depends_on() == ()
    assert "no real low-bit execution" in resolve_cell(replace(_cell("paper-lcq"), execution="int8")).skip
    cell = _cell("paper-lcq", {"paper-lcq": {"cali_ckpt": "x.pth"}})
    assert cell.model == "digits" and "ddpm-cifar10" in resolve_cell(cell).skip


def test_split_gives_each_part_of_a_concatenated_input_its_own_dynamic_scale():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 1)
    deep, skip = torch.randn(2, 5, 4, 4) * 0.05, torch.randn(2, 3, 4, 4) * 3.0
    x = torch.cat([deep, skip], dim=1)
    config = modiff.ModiffConfig(w_bits=32, a_bits=4, modulation="off", granularity="sample", symmetric=True)
    layer = QuantLayer(copy.deepcopy(conv), config, "conv")
    whole = layer.quantize_activation(x)
    layer.set_split(5)
    parts = layer.quantize_activation(x)
    expected = torch.cat([dynamic_fake_quant(deep, 4, "sample", True), dynamic_fake_quant(skip, 4, "sample", True)], 1)
    assert torch.equal(parts, expected)
    assert (parts[:, :5] - deep).abs().max() < 0.2 * (whole[:, :5] - deep).abs().max()  # the small part keeps detail
    with pytest.raises(ValueError, match="not inside"):
        layer.set_split(8)
    real = QuantLayer(copy.deepcopy(conv), modiff.ModiffConfig(w_bits=8, a_bits=8, modulation="off",
                                                                  granularity="tensor", execution="int8",
                                                                  weight_symmetric=True), "conv")
    with pytest.raises(ValueError, match="fake execution"):
        real.set_split(5)


def test_paper_bases_run_in_the_harness_with_splits_and_qdiff_weights(tmp_path):
    matrix = load_matrix("smoke", [
        "run.steps=6", "run.n_samples=8", "run.batch_size=8", "run.metrics=['psnr_to_fp']",
        "matrix.base=['paper-lcq','paper-ltq']", "matrix.w_bits=[8]", "matrix.a_bits=[4]", "matrix.modulation=['ec']",
        "matrix.cache=['none']", "params.qdiff.cali_st=3", "params.qdiff.cali_n=8", "params.qdiff.weight_iters=5"])
    assert {c.a_granularity for c in matrix.cells} == {"tensor", "sample"}
    assert all(c.params["qdiff"]["weight_iters"] == 5 for c in matrix.cells)  # the weights' calibration is identity
    Runner(matrix, tmp_path, device="cpu", progress=False, log=lambda s: None).run()
    frame = pd.read_csv(tmp_path / "results.csv")
    assert set(frame.status) == {"ok"}, frame[["method", "error"]]
    import json

    infos = [json.loads(p.read_text())["method_info"] for p in (tmp_path / "cells").glob("*/result.json")]
    infos = [i for i in infos if i and "split_shortcuts" in i]
    assert len(infos) == 2 and all(i["split_shortcuts"] > 0 and i["weights"] == "qdiff" for i in infos)
    assert any("w8" in i.get("cache_hits", []) for i in infos)  # one weight calibration for both bases


# -- Q-Diffusion + MoDiff: the authors' grid and learned step sizes ----------------------------------
def _residual_layer(a_bits: int, symmetric: bool = False) -> QuantLayer:
    config = modiff.ModiffConfig(w_bits=32, a_bits=a_bits, modulation="ec", granularity="tensor",
                                 act_scale="static", symmetric=symmetric)
    return QuantLayer(nn.Conv2d(8, 4, 1), config, "conv")


def test_authors_grid_puts_a_symmetric_residual_on_three_levels_each_side_at_a4():
    layer = _residual_layer(4)
    r = torch.linspace(-1, 1, 101).view(1, 1, -1, 1).expand(1, 8, 101, 1).contiguous()
    modiff.calibrate(layer, lambda: (layer(torch.zeros_like(r)), layer(r)))
    assert float(layer.static_scale) == pytest.approx(2 / 15)  # the clean asymmetric min-max
    layer.config = modiff.ModiffConfig(**{**vars(layer.config), "symmetric": True})
    residual.authors_grid_scale(layer)
    assert float(layer.static_scale) == pytest.approx(2 / 6) and float(layer.static_zero_point) == 0
    assert torch.round(r / layer.static_scale).abs().max() == 3  # +-3 of the [-8, 7] grid
    with pytest.raises(ValueError, match="a_bits >= 3"):
        residual.authors_grid_scale(_residual_layer(2))


def test_learned_residual_step_sizes_differ_per_half_and_lower_the_layer_error():
    """The deep half's residuals are 10x smaller than the skip half's: one min-max scale over both wastes the
    deep half's grid; learned per half (Adam, the authors' loss) the two scales part and the error drops."""
    torch.manual_seed(0)
    layer = _residual_layer(4)
    fp = copy.deepcopy(layer.layer)
    prev = torch.randn(64, 8, 3, 3)
    step = torch.cat([torch.randn(64, 5, 3, 3) * 0.02, torch.randn(64, 3, 3, 3) * 0.2], dim=1)
    cur = prev + step
    modiff.calibrate(layer, lambda: (layer(prev), layer(cur)))

    def learn(lr, out_penalty):
        return residual._learn_one(layer, fp, prev, cur, 5, 400, lr, 2.4, 32, torch.device("cpu"),
                                   torch.Generator().manual_seed(0), out_penalty)

    _, _, entry = learn(4e-4, 1.0)  # the authors' learning rate and overflow penalty
    assert entry["learned"] < 0.8 * entry["initial"], entry
    scale, zero_point, entry = learn(4e-3, 0.0)  # the Lp term alone
    deep, skip = entry["scales"]
    assert skip > 2 * deep, entry
    assert entry["learned"] < 0.5 * entry["initial"], entry
    assert scale.shape == (1, 8, 1, 1) and torch.all(scale[:, :5] == deep) and torch.all(scale[:, 5:] == skip)
    assert torch.all(zero_point == float(layer.static_zero_point))


def test_qdiff_residual_parameters_are_checked():
    with pytest.raises(BenchError, match="authors_grid"):
        base_quantizer("qdiff", {"authors_grid": True, "residual_scale": "mse"})
    cell = replace(_cell("qdiff", {"qdiff": {"authors_grid": True, "cali_st": 5}}), a_bits=2)
    assert "a_bits >= 3" in resolve_cell(cell).skip
    assert QDiffusion.PARAMS["residual_scale"] == "minmax" and QDiffusion.PARAMS["authors_grid"] is False


def test_qdiff_learned_residual_scales_run_and_are_cached(tmp_path):
    matrix = load_matrix("smoke", [
        "run.steps=6", "run.n_samples=8", "run.batch_size=8", "run.metrics=['psnr_to_fp']",
        "matrix.base=['qdiff']", "matrix.w_bits=[8]", "matrix.a_bits=[4]", "matrix.modulation=['ec']",
        "matrix.cache=['none']", "params.qdiff.cali_st=3", "params.qdiff.cali_n=8", "params.qdiff.weight_iters=5",
        "params.qdiff.act_iters=5", "params.qdiff.residual_scale='learned'", "params.qdiff.authors_grid=true"])
    Runner(matrix, tmp_path, device="cpu", progress=False, log=lambda s: None).run()
    frame = pd.read_csv(tmp_path / "results.csv")
    assert set(frame.status) == {"ok"}, frame[["method", "error"]]
    assert list((tmp_path / "cache" / "qdiff").glob("w8a4-residual-*.pt"))


# -- the authors' released checkpoint as the weight source ------------------------------------------
def test_paper_base_takes_its_weights_from_the_authors_checkpoint(tmp_path):
    """A synthetic calibrated checkpoint in the authors' format (AdaRound per output channel, the split
    shortcuts' two quantizers) on a random DDPM CIFAR-10: every wrapped layer holds the converter's dequantized
    weight, untouched by another rounding, and the model runs with the authors' dynamic scales and splits."""
    from baselines.modiff_authors_act.method import load_authors_checkpoint, to_diffusers_weights
    from bench.build import build
    from bench.zoo import load_model
    from bench.zoo.architectures import DDPM_CIFAR10_32, build_random_unet
    from bench.zoo.convert.ddpm import diffusers_to_original

    unet = build_random_unet(DDPM_CIFAR10_32, seed=5)
    unet.save_pretrained(tmp_path / "model")
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, value in diffusers_to_original(unet.state_dict()).items():
        state["model." + key] = value
        if key.endswith(".weight") and value.dim() >= 2:
            flat = value.reshape(value.shape[0], -1)
            lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
            delta = ((hi - lo) / 255).clamp(min=1e-8).reshape(-1, *[1] * (value.dim() - 1))
            state[f"model.{key[:-7]}.weight_quantizer.delta"] = delta
            state[f"model.{key[:-7]}.weight_quantizer.zero_point"] = torch.round(-lo.reshape(delta.shape) / delta)
            state[f"model.{key[:-7]}.weight_quantizer.alpha"] = torch.randn(value.shape, generator=generator)
    torch.save(state, tmp_path / "cifar_w8a8_ckpt.pth")

    model = load_model("ddpm-cifar10", tmp_path / "model")
    cell = CellSpec("ddpm-cifar10", str(tmp_path / "model"), "ddim-quad", 2, 0.0, 2, 0, 2, "paper-lcq", "ec", "none",
                    8, 4, "auto", {"paper-lcq": {"cali_ckpt": str(tmp_path / "cifar_w8a8_ckpt.pth")}})
    resolved = resolve_cell(cell)
    assert resolved.skip is None and resolved.base.depends_on() == ()
    prepared = build(resolved, model, torch.device("cpu"))
    expected = to_diffusers_weights(load_authors_checkpoint(tmp_path / "cifar_w8a8_ckpt.pth", 8)[0])
    layers = modiff.quant_layers(prepared.unet)
    assert len(layers) == sum(1 for k, v in expected.items() if k.endswith(".weight") and v.dim() >= 2)
    for layer in layers:
        assert torch.equal(layer.layer.weight, expected[f"{layer.name}.weight"]), layer.name
    assert prepared.info["split_shortcuts"] == sum(1 for layer in layers if layer.split) > 0
    assert not torch.equal(layers[0].layer.weight, unet.state_dict()["conv_in.weight"])  # AdaRound moved them
    prepared.start_trajectory()
    with torch.no_grad():
        out = prepared.denoiser()(torch.randn(2, 3, 32, 32), torch.full((2,), 999))
    assert out.shape == (2, 3, 32, 32) and out.isfinite().all()
