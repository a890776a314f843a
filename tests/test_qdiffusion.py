"""Q-Diffusion: calibration data, AdaRound, block reconstruction, shortcut splitting, quantized
attention, the calibration cache, and the method against min-max weights on the digits model."""

import copy

import pandas as pd
import pytest
import torch
from torch import nn

import modiff
from baselines.qdiffusion import calibration
from baselines.qdiffusion.attention import QUANTIZERS_ATTR, attention_modules, quantize_attention
from baselines.qdiffusion.method import QDiffusion
from baselines.qdiffusion.quantizers import ActQuantizer
from baselines.qdiffusion.reconstruction import (
    ReconConfig,
    ReconLayer,
    prepare,
    reconstruct_activations,
    reconstruct_weights,
    shortcut_splits,
    units,
)
from bench.build import build, resolve_cell
from bench.errors import BenchError
from bench.matrix import load_matrix
from bench.methods import CellSpec
from bench.metrics import psnr_to_fp
from bench.runner import Runner
from bench.zoo.digits import unet_denoiser
from modiff.samplers import PerSampleNoise, SamplerConfig, sample

DDIM10 = SamplerConfig.from_name("ddim-quad", 10)
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cali(digits_model):
    return calibration.collect(unet_denoiser(digits_model.unet), digits_model.schedule, DDIM10, 5, range(100, 132),
                               digits_model.image_shape, 32)


# -- calibration data -----------------------------------------------------------------------------
def test_calibration_steps_are_spread_uniformly_as_the_authors_do():
    assert calibration.calibration_steps(100, 20) == list(range(0, 100, 5))
    assert calibration.calibration_steps(10, 5) == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError, match="cali_st"):  # a library: ValueError (the harness glue makes it a BenchError)
        calibration.calibration_steps(10, 11)


def test_calibration_inputs_are_the_fp_trajectory_at_those_steps(digits_model, cali):
    assert cali.steps == [0, 2, 4, 6, 8] and sorted(cali.x) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert torch.equal(cali.x[0], PerSampleNoise(range(100, 132)).randn(digits_model.image_shape))
    # the step after step 1 starts from the sampler's output at step 1: reproduce it
    seen = []
    sample(lambda x, t: seen.append(x.clone()) or digits_model.unet(x, t).sample, digits_model.schedule, DDIM10,
           range(100, 132), digits_model.image_shape, 32, progress=False)
    for i in cali.x:
        assert torch.allclose(cali.x[i], seen[i], atol=1e-6)
    xs, ts = cali.inputs()
    assert xs.shape == (5 * 32, *digits_model.image_shape) and ts.unique().numel() == 5
    pairs = cali.pairs()
    assert len(pairs) == 4 and all(torch.equal(p[0], cali.x[i - 1]) for p, i in zip(pairs, [2, 4, 6, 8], strict=True))


# -- AdaRound and reconstruction --------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)

    def forward(self, x, t):
        return self.conv2(torch.nn.functional.silu(self.conv1(x)))


def _tiny_reconstruction(round_weight, iters=1500):
    """W4 on small inputs: a block error as small, relative to the rounding term, as in a trained UNet."""
    fp = TinyNet().requires_grad_(False)
    xs = torch.randn((64, 4, 8, 8), generator=torch.Generator().manual_seed(1)) * 0.1
    ts = torch.zeros(64, dtype=torch.long)
    config = ReconConfig(w_bits=4, a_bits=32, weight_iters=iters, weight_lr=1e-2, round_weight=round_weight,
                         batch_size=16, split_shortcut=False)
    q = prepare(fp, config, (xs[:2], ts[:2]))
    return reconstruct_weights(q, fp, xs, ts, config, CPU), q


def test_adaround_rounding_variables_end_hard_after_annealing():
    report, q = _tiny_reconstruction(round_weight=0.01)
    assert [r["unit"] for r in report] == ["conv1", "conv2"]
    assert all(r["hard_fraction"] > 0.97 for r in report), report
    # without the rounding regulariser they stay soft: the annealed term is what makes them hard
    soft, _ = _tiny_reconstruction(round_weight=0.0)
    assert all(r["hard_fraction"] < 0.5 for r in soft), soft
    # the hard rounding is written into the weights, which lie on a 4-bit grid per output channel
    w = q.conv1.layer.weight
    assert all(row.unique().numel() <= 16 for row in w.flatten(1))


def test_block_reconstruction_lowers_the_block_error_against_full_precision(digits_model, cali):
    xs, ts = cali.inputs()
    config = ReconConfig(w_bits=4, a_bits=32, weight_iters=150, weight_lr=1e-2, batch_size=32)
    q = prepare(digits_model.unet, config, (xs[:2], ts[:2]))
    report = reconstruct_weights(q, digits_model.unet, xs, ts, config, CPU)
    blocks = [r for r in report if "resnets" in r["unit"] and not r["unit"].endswith("conv_shortcut")]
    assert len(blocks) == 11  # ResnetBlock2D: 3 down, 2 mid, 6 up
    assert all(r["adaround"] < r["nearest"] for r in blocks), blocks


def test_units_are_whole_blocks_in_forward_order(digits_model, cali):
    xs, ts = cali.inputs()
    q = prepare(digits_model.unet, ReconConfig(w_bits=8, a_bits=8), (xs[:2], ts[:2]))
    names = [n for n, _ in units(q, (xs[:2], ts[:2]))]
    assert names[0] == "time_embedding.linear_1" and names[2] == "conv_in" and names[-1] == "conv_out"
    assert "down_blocks.1.attentions.0" in names and "mid_block.resnets.0" in names
    assert names.index("down_blocks.0.resnets.0") < names.index("mid_block.resnets.0") < \
        names.index("up_blocks.0.resnets.0")
    assert not [n for n in names if n.startswith("down_blocks.0.resnets.0.")]  # layers inside a block


# -- shortcut splitting ---------------------------------------------------------------------------
def test_shortcut_splits_are_the_deep_channels_of_each_decoder_concat(digits_model):
    x, t = torch.randn(2, 1, 16, 16), torch.full((2,), 10)
    splits = shortcut_splits(digits_model.unet, x, t)
    # block_out_channels [16, 32, 32]: up block i concatenates its deep input with the skip it pops
    assert splits == {"up_blocks.0.resnets.0.conv_shortcut": 32, "up_blocks.0.resnets.1.conv_shortcut": 32,
                      "up_blocks.1.resnets.0.conv_shortcut": 32, "up_blocks.1.resnets.1.conv_shortcut": 32,
                      "up_blocks.2.resnets.0.conv_shortcut": 32, "up_blocks.2.resnets.1.conv_shortcut": 16}


def _shortcut_pair(w_bits, a_bits):
    conv = nn.Conv2d(48, 16, 1)
    torch.nn.init.normal_(conv.weight, std=0.1)
    with torch.no_grad():  # the skip part (channels 32..47) is small but weighs as much in the output
        conv.weight[:, 32:] *= 200
    split = ReconLayer(copy.deepcopy(conv), "s", w_bits, a_bits, split=32)
    whole = ReconLayer(copy.deepcopy(conv), "w", w_bits, a_bits, split=0)
    return conv, split, whole


def test_a_split_conv_equals_the_unsplit_one_at_32_bits():
    conv, split, whole = _shortcut_pair(32, 32)
    for layer in (split, whole):
        layer.start_adaround("minmax", 2.4)
    x = torch.randn(4, 48, 8, 8)
    with torch.no_grad():
        assert torch.equal(split(x), whole(x)) and torch.equal(split(x), conv(x))


def test_splitting_helps_when_the_two_parts_have_different_ranges():
    conv, split, whole = _shortcut_pair(8, 6)
    x = torch.cat([torch.randn(4, 32, 8, 8) * 20, torch.randn(4, 16, 8, 8) * 0.1], dim=1)  # deep >> skip
    for layer in (split, whole):
        layer.start_adaround("minmax", 2.4)
        layer.harden()
        quantizers = [m for m in layer.modules() if isinstance(m, ActQuantizer)]
        for q in quantizers:
            q.observe()
        layer(x)
        for q in quantizers:
            q.initialize("minmax")
    assert len(split.weight_quantizers) == 0 and split.act.split == 32
    with torch.no_grad():
        skip_error = [(layer.act(x) - x)[:, 32:].abs().max() for layer in (split, whole)]
        assert skip_error[0] < 0.05 * skip_error[1]  # one shared range would drown the skip part
        ref = conv(x)
        assert (split(x) - ref).pow(2).mean() < 0.5 * (whole(x) - ref).pow(2).mean()


# -- attention -------------------------------------------------------------------------------------
def test_quantized_attention_matches_diffusers_in_float_and_quantizes_qkv_and_probs(digits_model):
    unet = copy.deepcopy(digits_model.unet)
    x, t = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.full((3,), 300)
    with torch.no_grad():
        ref = unet(x, t).sample
    assert quantize_attention(unet, 8, 8) == len(attention_modules(unet)) == 4  # down, mid, 2 up
    quantizers = [m for _, a in attention_modules(unet) for m in getattr(a, QUANTIZERS_ATTR).modules()
                  if isinstance(m, ActQuantizer)]
    assert not any(q.enabled for q in quantizers)  # off until their ranges are initialised
    with torch.no_grad():
        assert torch.allclose(unet(x, t).sample, ref, atol=1e-5)
    seen = []
    for q in quantizers:
        q.observe()
        q.register_forward_hook(lambda m, a, o: seen.append(m))
    with torch.no_grad():
        unet(x, t)
    assert len(seen) == 16  # q, k, v, probs in each of the four attention modules
    for q in quantizers:
        q.initialize("minmax")
    with torch.no_grad():
        out = unet(x, t).sample
    assert not torch.equal(out, ref) and (out - ref).abs().max() < 0.2


# -- the method --------------------------------------------------------------------------------
PARAMS = {"cali_st": 5, "cali_n": 64, "weight_iters": 800, "weight_lr": 1e-3, "act_iters": 0, "batch_size": 32}


def _cell(w, a, modulation="off", params=None, n=128):
    return CellSpec("digits", None, "ddim-quad", 10, 0.0, n, 0, n, "qdiff", modulation, "none", w, a, "auto",
                    {"qdiff": {**QDiffusion.PARAMS, **PARAMS, **(params or {})}})


def _samples(model, cell, cache_dir):
    resolved = resolve_cell(cell)
    assert resolved.skip is None and resolved.sampler == DDIM10
    prepared = build(resolved, model, CPU, False, cache_dir)
    images = sample(prepared.denoiser(), model.schedule, DDIM10, cell.seeds, model.image_shape, cell.batch_size,
                    progress=False, on_trajectory_start=prepared.start_trajectory)
    return images, prepared


@pytest.fixture(scope="module")
def qdiff_runs(digits_model, tmp_path_factory):
    cache = tmp_path_factory.mktemp("qdiff-cache")
    fp = sample(unet_denoiser(digits_model.unet), digits_model.schedule, DDIM10, range(128),
                digits_model.image_shape, 128, progress=False)
    runs = {"fp": fp, "cache": cache}
    runs["qdiff"] = _samples(digits_model, _cell(4, 8), cache)
    runs["minmax"] = _samples(digits_model, _cell(4, 8, params={"weight_iters": 0}), cache)
    return runs


# What AdaRound optimises is each block's output error against full precision, and that it lowers in
# every block (below). Whether the whole sampler then lands closer to full precision than min-max
# weights with nearest rounding is not a property of the method on this small model: with BRECQ's
# loss reduction (issue #17) and Q-Diffusion's learning rate 1e-3, W4A8 AdaRound measured 19.3 dB here
# (800 iterations, 10 steps) against 23.6 dB for min-max, and in the digits harness (25 steps, 512
# samples) 26.1 dB at 800 iterations but 21.9 dB at 1600. The old reduction gave 16.5 dB on an
# AVX2-only CPU and above min-max on AVX512 ones. So the end-to-end PSNR is measured and reported
# (docs/reproduction.md), not asserted.
def test_adaround_lowers_every_blocks_error_at_w4a8(qdiff_runs):
    """Same activation scheme (static per-tensor, MSE-initialised); AdaRound's weights have a smaller
    reconstruction error than nearest rounding in every block, and the sampler still runs close to
    full precision."""
    psnr_q = psnr_to_fp(qdiff_runs["qdiff"][0], qdiff_runs["fp"])
    info = qdiff_runs["qdiff"][1].info
    assert info["split_shortcuts"] == 6 and info["quant_attention"] is True
    assert info["weight_reconstruction"]["loss_adaround"] < info["weight_reconstruction"]["loss_nearest"]
    assert info["adaround_units_worse"] == 0
    assert psnr_q > 15, psnr_q


def test_calibration_products_are_cached_and_reused(digits_model, qdiff_runs, monkeypatch):
    cache = qdiff_runs["cache"]
    names = sorted(p.name.split("-")[0] for p in (cache / "qdiff").iterdir())
    assert names == ["data", "w4", "w4", "w4a8", "w4a8"]  # one data set; per weight_iters: weights + step sizes

    def forbidden(*args, **kwargs):
        raise AssertionError("recalibrated although the result is cached")

    monkeypatch.setattr("baselines.qdiffusion.method.reconstruct_weights", forbidden)
    monkeypatch.setattr("baselines.qdiffusion.method.reconstruct_activations", forbidden)
    monkeypatch.setattr("baselines.qdiffusion.calibration.sample", forbidden)
    images, prepared = _samples(digits_model, _cell(4, 8), cache)
    assert prepared.info["cache_hits"] == ["data", "w4", "w4a8"]
    assert torch.equal(images, qdiff_runs["qdiff"][0])


def test_qdiff_with_modulation_uses_static_residual_scales_and_fp_attention(digits_model, qdiff_runs):
    images, prepared = _samples(digits_model, _cell(4, 8, "ec"), qdiff_runs["cache"])
    layers = modiff.quant_layers(prepared.unet)
    assert layers and all(layer.act_quantizer is None and layer.static_scale is not None for layer in layers)
    assert prepared.info["quant_attention"] is False
    assert prepared.info["cache_hits"] == ["data", "w4"]  # the learned step sizes are not needed
    assert psnr_to_fp(images, qdiff_runs["fp"]) > 15


def test_resolve_and_parameter_errors():
    cell = _cell(32, 32)
    assert "full-precision" in resolve_cell(cell).skip
    cell = _cell(8, 8, params={"cali_st": 50})
    assert "cali_st" in resolve_cell(cell).skip
    with pytest.raises(BenchError, match="weight_init"):
        QDiffusion({"weight_init": "kmeans"})._check_params()
    with pytest.raises(BenchError, match="cali_st"):  # at load time, before any cell runs
        load_matrix("smoke", ["matrix.base=['qdiff']", "params.qdiff.cali_st='5'"])


def test_qdiff_and_ptqd_run_in_the_harness(tmp_path):
    matrix = load_matrix("smoke", [
        "run.steps=6", "run.n_samples=16", "run.batch_size=16", "run.metrics=['psnr_to_fp']",
        "matrix.base=['qdiff','ptqd']", "matrix.w_bits=[8]", "matrix.a_bits=[4]", "matrix.modulation=['off','ec']",
        "matrix.cache=['none']",
        "params.qdiff.cali_st=3", "params.qdiff.cali_n=16", "params.qdiff.weight_iters=5", "params.qdiff.act_iters=5",
        "params.ptqd.calib_samples=16"])
    assert sorted(c.method for c in matrix.cells) == ["ptqd", "qdiff", "qdiff+ec"]
    ptqd_cell = next(c for c in matrix.cells if c.base == "ptqd")
    assert ptqd_cell.params["qdiff"]["cali_st"] == 3  # the corrected base's parameters travel with the cell
    Runner(matrix, tmp_path, device="cpu", progress=False, log=lambda s: None).run()
    frame = pd.read_csv(tmp_path / "results.csv")
    assert set(frame.status) == {"ok"}, frame[["method", "error"]]
    assert frame.psnr_to_fp.notna().all()
    assert (tmp_path / "cache" / "qdiff").is_dir() and (tmp_path / "cache" / "ptqd").is_dir()


def test_activation_phase_learns_step_sizes_that_do_not_increase_the_loss(digits_model, cali):
    xs, ts = cali.inputs()
    config = ReconConfig(w_bits=8, a_bits=4, weight_iters=0, act_iters=40, batch_size=32)
    q = prepare(digits_model.unet, config, (xs[:2], ts[:2]))
    reconstruct_weights(q, digits_model.unet, xs, ts, config, CPU)
    report = reconstruct_activations(q, digits_model.unet, xs, ts, config, CPU)
    assert len(report) == 23 and all(q.enabled for q in q.modules() if isinstance(q, ActQuantizer))
    assert sum(r["learned"] for r in report) < sum(r["initial"] for r in report)
