"""float16 end to end: a model cast to float16 (what GPU users load: ``torch_dtype=torch.float16``) keeps its
scales, zero points and MoDiff state in float32, runs ``A`` in float16 and returns float16.

Before: ``MIN_SCALE = 1e-8`` is 0 in float16, so a zero-range channel divided by zero, and ``â`` / ``ô``
accumulated in float16; the digits UNet cast to ``.half()`` gave NaN at W8A8 with channel scales, and with any
modulated configuration (measured on the old code: 9 of the 12 granularity x modulation pairs)."""

import copy
import itertools

import pytest
import torch
from torch import nn

import modiff
from modiff.layers import QuantLayer
from modiff.quant import dynamic_fake_quant
from modiff.samplers import SamplerConfig, sample_batch

GRANULARITIES = ("tensor", "channel", "sample", "sample-channel")
MODULATIONS = ("off", "plain", "ec")
FAKE = [dict(granularity=g, modulation=m) for g, m in itertools.product(GRANULARITIES, MODULATIONS)]
INT8 = [dict(granularity=g, modulation=m, execution="int8", weight_symmetric=True)
        for g, m in itertools.product(("tensor", "sample"), MODULATIONS)]
# float16 against float32 of the same W8A8 configuration, 8 digits images, DDIM 10 steps. Measured on the
# digits UNet (2026-12-06): 30.3 dB (sample scales, no modulation) to 53.6 dB (int8 MoDiff); full precision
# itself is 62.6 dB from its float32 run. Rounding that flips a grid point moves a trajectory, hence the spread.
MIN_PSNR_FP16_VS_FP32 = 25.0


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean()
    return float(10 * torch.log10(4 / mse))


def _sample(model, unet: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    def denoise(x, t):
        return unet(x.to(dtype), t).sample.float()

    with torch.no_grad():
        return sample_batch(denoise, model.schedule, SamplerConfig.from_name("ddim-uniform", 10), list(range(8)),
                            model.image_shape)


@pytest.mark.parametrize("options", FAKE + INT8, ids=lambda o: f"{o.get('execution', 'fake')}-{o['granularity']}-"
                                                              f"{o['modulation']}")
def test_a_float16_model_samples_finite_images_close_to_its_float32_run(digits_model, options):
    config = modiff.ModiffConfig(w_bits=8, a_bits=8, **options)
    fp32 = _sample(digits_model, modiff.quantize(copy.deepcopy(digits_model.unet), config), torch.float32)
    half = modiff.quantize(copy.deepcopy(digits_model.unet).half(), config)
    fp16 = _sample(digits_model, half, torch.float16)
    assert torch.isfinite(fp16).all()
    assert _psnr(fp16, fp32) >= MIN_PSNR_FP16_VS_FP32
    layers = modiff.quant_layers(half)
    assert all(layer.weight.dtype == torch.float16 for layer in layers)  # A runs in the model's dtype
    if options["modulation"] != "off":
        assert all(layer.reconstruction.dtype == torch.float32 for layer in layers if layer.reconstruction is not None)


@pytest.mark.parametrize(("granularity", "modulation"), [("channel", "off"), ("tensor", "ec"), ("channel", "ec"),
                                                         ("sample", "ec"), ("sample-channel", "ec")])
def test_the_measured_nan_case_is_finite(digits_model, granularity, modulation):
    """The issue's measurement: the digits UNet cast to .half(), W8A8, random input, t = 900, 800, 700."""
    unet = modiff.quantize(copy.deepcopy(digits_model.unet).half(),
                           modiff.ModiffConfig(w_bits=8, a_bits=8, granularity=granularity, modulation=modulation))
    x = torch.randn(4, *digits_model.image_shape, generator=torch.Generator().manual_seed(0)).half()
    with torch.no_grad():
        for t in (900, 800, 700):
            out = unet(x, torch.full((4,), t)).sample
            assert out.dtype == torch.float16
            assert torch.isfinite(out).all()


def test_a_zero_range_channel_is_exact_in_float16():
    """A constant channel has zero range: its scale is MIN_SCALE (1e-8), which float16 rounds to 0."""
    conv = nn.Conv2d(2, 3, 1).half()
    layer = QuantLayer(copy.deepcopy(conv), modiff.ModiffConfig(w_bits=32, a_bits=8, modulation="off"), "c")
    x = torch.randn(2, 2, 4, 4).half()
    x[:, 1] = 0.25  # channel 1: one value
    out = layer(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    q = dynamic_fake_quant(x, 8, "channel")
    assert q.dtype == torch.float16
    assert torch.equal(q[:, 1], x[:, 1])  # reproduced exactly, not 0/0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_casting_a_quantized_model_keeps_its_scales_in_float32(dtype):
    """``model.half()`` after quantizing (and calibrating) casts the weights -- A then runs in that dtype --
    never the weight and activation scales."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    config = modiff.ModiffConfig(w_bits=8, a_bits=8, modulation="off", granularity="tensor", act_scale="static",
                                 execution="int8", weight_symmetric=True)
    modiff.quantize(model, config)
    modiff.calibrate(model, lambda: model(torch.randn(16, 4)))
    before = {name: b.clone() for name, b in model.named_buffers() if "scale" in name or "zero_point" in name}
    model.to(dtype)
    after = dict(model.named_buffers())
    assert before and all(torch.equal(after[name], value) and after[name].dtype == torch.float32
                          for name, value in before.items())
    assert all(layer.weight.dtype == dtype for layer in modiff.quant_layers(model))
    out = model(torch.randn(3, 4, dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_compute_dtype_float16_runs_what_is_not_quantized_in_float16(digits_model):
    """``compute_dtype="float16"`` (the harness's dtype axis): the layers keep float32 weights and state and
    return float16; the norms, attention and unwrapped parts run in float16."""
    unet = modiff.quantize(copy.deepcopy(digits_model.unet), modiff.ModiffConfig(w_bits=8, a_bits=8,
                                                                                  compute_dtype="float16"))
    layers = modiff.quant_layers(unet)
    assert all(layer.layer.weight.dtype == torch.float32 for layer in layers)
    norms = [m for m in unet.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.weight.dtype == torch.float16 for m in norms)
    fp16 = _sample(digits_model, unet, torch.float16)
    fp32 = _sample(digits_model, modiff.quantize(copy.deepcopy(digits_model.unet), modiff.ModiffConfig(w_bits=8,
                                                                                                       a_bits=8)),
                   torch.float32)
    assert torch.isfinite(fp16).all() and _psnr(fp16, fp32) >= MIN_PSNR_FP16_VS_FP32
