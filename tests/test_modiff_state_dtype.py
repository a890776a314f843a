"""``ModiffConfig.state_dtype``: MoDiff's â and ô kept in bfloat16 / float16 between steps, half the bytes
(issue #29, item 4). The arithmetic stays float32; the layer returns the input's dtype."""

import copy

import pytest
import torch

import modiff
from modiff.samplers import SamplerConfig, sample_batch

# PSNR to full precision of the same configuration with a half state, against a float32 state: 8 digits images,
# DDIM 10 steps. Measured (2026-12-07, W8A8 / W8A4): differences of -0.9 to +3.2 dB either way (fake tensor ec W8A8
# 29.8 / 33.0 / 30.9 dB for float32 / bfloat16 / float16; int8 sample ec W8A4 26.0 / 26.3 / 26.2): at this size a
# flipped grid point moves a trajectory more than the state's rounding does. The quality cost over the paper's
# settings with 2 x 256 images is in docs/modiff.md#state-dtype; here a broken state (NaN, a stale or mixed-up
# â / ô) would lose far more than this margin.
MAX_LOSS_DB = 3.0


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean()
    return float(10 * torch.log10(4 / mse))


def _sample(model, unet) -> torch.Tensor:
    def denoise(x, t):
        out = unet(x, t).sample
        assert out.dtype == torch.float32  # the input's dtype, whatever the state's
        return out

    with torch.no_grad():
        return sample_batch(denoise, model.schedule, SamplerConfig.from_name("ddim-uniform", 10), list(range(8)),
                            model.image_shape)


@pytest.fixture(scope="module")
def fp_samples(digits_model):
    return _sample(digits_model, digits_model.unet)


def test_the_default_is_float32_and_a_bad_name_is_refused():
    assert modiff.ModiffConfig().state_dtype == "float32"
    with pytest.raises(ValueError, match="state_dtype must be one of float32, bfloat16, float16"):
        modiff.ModiffConfig(state_dtype="int8")


@pytest.mark.parametrize("options", [
    dict(granularity="tensor", modulation="ec"),
    dict(granularity="sample", modulation="ec"),
    dict(granularity="sample", modulation="plain"),
    dict(granularity="sample", modulation="ec", execution="int8", weight_symmetric=True, symmetric=True),
    dict(granularity="tensor", modulation="ec", execution="int8", weight_symmetric=True, compile=False,
         residual_tolerance=0.05),
], ids=["fake-tensor-ec", "fake-sample-ec", "fake-sample-plain", "int8-sample-ec", "int8-tensor-ec-tolerance"])
@pytest.mark.parametrize("state_dtype", ["bfloat16", "float16"])
def test_a_half_state_halves_the_bytes_and_stays_close(digits_model, fp_samples, options, state_dtype):
    full = modiff.quantize(copy.deepcopy(digits_model.unet), modiff.ModiffConfig(w_bits=8, a_bits=4, **options))
    half = modiff.quantize(copy.deepcopy(digits_model.unet),
                           modiff.ModiffConfig(w_bits=8, a_bits=4, state_dtype=state_dtype, **options))
    full_psnr = _psnr(_sample(digits_model, full), fp_samples)
    full_bytes = modiff.state_bytes(full)
    samples = _sample(digits_model, half)
    assert modiff.state_bytes(half) * 2 == full_bytes > 0
    dtype = getattr(torch, state_dtype)
    assert all(layer.reconstruction.dtype == dtype and layer._o_ref.dtype == dtype
               for layer in modiff.quant_layers(half))
    assert torch.isfinite(samples).all()
    assert _psnr(samples, fp_samples) >= full_psnr - MAX_LOSS_DB


def test_zero_bit_residuals_return_the_cached_output_in_the_input_dtype(digits_model):
    unet = modiff.quantize(copy.deepcopy(digits_model.unet),
                           modiff.ModiffConfig(w_bits=32, a_bits=0, state_dtype="bfloat16"))
    x = torch.randn(2, *digits_model.image_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = unet(x, torch.full((2,), 900)).sample
        second = unet(x + 1, torch.full((2,), 800)).sample
    assert second.dtype == torch.float32
    # every layer returns its warm-up output, stored in bfloat16: the output is the first one up to that rounding
    assert torch.allclose(second, first, rtol=2e-2, atol=2e-2)


def test_a_float32_state_is_the_layers_own_copy_as_before(digits_model):
    """The default keeps â as the layer's own copy (ec updates it in place) and ô as the returned tensor."""
    unet = modiff.quantize(copy.deepcopy(digits_model.unet), modiff.ModiffConfig(w_bits=8, a_bits=8))
    x = torch.randn(2, *digits_model.image_shape)
    with torch.no_grad():
        unet(x, torch.full((2,), 900))
    assert all(layer.reconstruction.dtype == torch.float32 for layer in modiff.quant_layers(unet))
