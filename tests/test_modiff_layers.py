import copy

import pytest
import torch
from torch import nn

import modiff
from modiff.layers import QuantLayer
from modiff.quant import dynamic_fake_quant

torch.manual_seed(0)
CONV = nn.Conv2d(3, 5, 3, padding=1)
# a slowly drifting input sequence, like a layer's input along a sampling trajectory
SEQ = [torch.randn(2, 3, 6, 6) + 0.05 * k * torch.randn(2, 3, 6, 6) for k in range(12)]
for k in range(1, len(SEQ)):
    SEQ[k] = SEQ[k - 1] + 0.1 * torch.randn(2, 3, 6, 6)


def wrap(**kw):
    return QuantLayer(copy.deepcopy(CONV), modiff.ModiffConfig(w_bits=32, **kw), "conv")


def A(x):  # the operator without bias
    return nn.functional.conv2d(x, CONV.weight, None, padding=1)


def test_ec_equals_the_closed_form():
    layer = wrap(a_bits=3, modulation="ec")
    a_hat, ds = SEQ[0].clone(), []
    o_hat = A(SEQ[0]) + CONV.bias.view(1, -1, 1, 1)
    assert torch.equal(layer(SEQ[0]), CONV(SEQ[0]))  # warm-up: full precision, bias included
    for a in SEQ[1:]:
        d = dynamic_fake_quant(a - a_hat, 3, "channel")
        a_hat, o_hat = a_hat + d, o_hat + A(d)
        ds.append(d)
        out = layer(a)
        assert torch.allclose(out, o_hat, atol=1e-6)
        # reconstruction = warm-up input + sum of quantized residuals; output = A(reconstruction) + bias
        assert torch.allclose(layer.reconstruction, SEQ[0] + torch.stack(ds).sum(0), atol=1e-5)
        assert torch.allclose(out, CONV(layer.reconstruction), atol=1e-5)
    assert layer.warmup_calls == 1 and layer.residual_calls == len(SEQ) - 1


def test_plain_modulation_uses_the_true_previous_input_and_accumulates_error():
    plain, ec = wrap(a_bits=3, modulation="plain"), wrap(a_bits=3, modulation="ec")
    o_prev = plain(SEQ[0])
    ec(SEQ[0])
    for prev, a in zip(SEQ, SEQ[1:], strict=False):
        expected = o_prev + A(dynamic_fake_quant(a - prev, 3, "channel"))
        o_prev = plain(a)
        assert torch.allclose(o_prev, expected, atol=1e-6)
        e_out = ec(a)
    exact = CONV(SEQ[-1])
    assert (o_prev - exact).norm() > 2 * (e_out - exact).norm()  # error compensation pays off


def test_bias_is_added_once():
    layer = QuantLayer(nn.Conv2d(3, 2, 1), modiff.ModiffConfig(w_bits=32, a_bits=4), "c")
    with torch.no_grad():
        layer.layer.weight.zero_()
        layer.layer.bias.fill_(0.5)
    for a in SEQ:
        assert torch.equal(layer(a), torch.full((2, 2, 6, 6), 0.5))


def test_no_warmup_starts_from_the_quantized_input():
    layer, plain_ptq = wrap(a_bits=3, warmup=False), wrap(a_bits=3, modulation="off")
    assert torch.equal(layer(SEQ[0]), plain_ptq(SEQ[0]))


def test_zero_bit_residuals_return_the_warmup_output():
    for mode in ("plain", "ec"):
        layer = wrap(a_bits=0, modulation=mode)
        first = layer(SEQ[0])
        for a in SEQ[1:]:
            assert torch.equal(layer(a), first)


def test_residual_tolerance_caches_only_the_still_samples():
    layer = wrap(a_bits=4, residual_tolerance=0.5)
    first = layer(SEQ[0])
    still = SEQ[0] + torch.stack([0.01 * torch.randn(3, 6, 6), 2.0 * torch.randn(3, 6, 6)])
    out = layer(still)
    assert torch.equal(out[0], first[0])  # range below tolerance: the cached output
    assert not torch.allclose(out[1], first[1])
    assert layer.cached_samples == 1
    calm = layer.reconstruction + 0.001
    assert torch.equal(layer(calm), out)  # every sample still: nothing computed, cache returned


def test_batch_size_change_without_reset_is_an_error():
    layer = wrap(a_bits=4)
    layer(SEQ[0])
    with pytest.raises(ValueError, match="modiff.reset"):
        layer(SEQ[1][:1])
    layer.reset_state()
    layer(SEQ[1][:1])


def test_in_place_modification_of_the_state_is_detected():
    layer = wrap(a_bits=4, modulation="plain")
    x = SEQ[0].clone()
    layer(x)
    x.mul_(2)  # the caller edits the tensor the layer keeps as its previous input
    with pytest.raises(RuntimeError, match="in place"):
        layer(SEQ[1])


def test_static_scales_need_calibration():
    layer = wrap(a_bits=4, act_scale="static", granularity="tensor")
    layer(SEQ[0])  # warm-up is full precision
    with pytest.raises(RuntimeError, match="calibrate"):
        layer(SEQ[1])


def test_quantize_rejects_models_with_nothing_to_wrap_and_double_wrapping():
    with pytest.raises(ValueError, match="no Conv1d/Conv2d/Linear"):
        modiff.quantize(nn.Sequential(nn.ReLU(), nn.GroupNorm(1, 3)), modiff.ModiffConfig())
    with pytest.raises(ValueError, match="no Conv1d/Conv2d/Linear"):
        modiff.quantize(nn.Sequential(nn.Linear(3, 3)), modiff.ModiffConfig(skip=("*",)))
    model = modiff.quantize(nn.Sequential(nn.Linear(3, 3)), modiff.ModiffConfig())
    with pytest.raises(ValueError, match="already quantized"):
        modiff.quantize(model, modiff.ModiffConfig())


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("kind", ["conv", "linear-2d"])
def test_static_minmax_calibration_uses_the_exact_extremes_of_all_residuals(granularity, kind):
    from modiff.quant import scale_and_zero_point

    if kind == "conv":
        layer, seq, axis = wrap(a_bits=4, act_scale="static", granularity=granularity), SEQ, 1
    else:  # e.g. the time-embedding MLP: (batch, features) inputs
        lin = nn.Linear(3, 4)
        layer = QuantLayer(lin, modiff.ModiffConfig(w_bits=32, a_bits=4, act_scale="static", granularity=granularity))
        seq, axis = [a[:, :, 0, 0] for a in SEQ], 1
    layer.start_observing()
    for a in seq:
        layer(a)
    layer.finish_observing("minmax")
    residuals = torch.stack([b - a for a, b in zip(seq, seq[1:], strict=False)])  # (steps, B, C, ...)
    dims = tuple(d for d in range(residuals.dim()) if granularity == "tensor" or d != axis + 1)
    scale, zp = scale_and_zero_point(residuals.amin(dim=dims), residuals.amax(dim=dims), 4, False)
    assert torch.equal(layer.static_scale.flatten(), scale.flatten())
    assert torch.equal(layer.static_zero_point.flatten(), zp.flatten())
    out = layer(seq[0])  # calibrated: a new trajectory runs with the fitted static scales
    assert out.shape[0] == seq[0].shape[0] and layer(seq[1]).isfinite().all()

    layer.start_observing()
    for a in seq:
        layer(a)
    layer.finish_observing("mse")
    assert (layer.static_scale.flatten() <= scale.flatten() + 1e-12).all()  # MSE only ever shrinks the range
