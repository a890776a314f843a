import pytest
import torch

from modiff.config import ModiffConfig
from modiff.quant import dynamic_fake_quant, quantize_weight, reduce_dims, search_range

torch.manual_seed(0)
X = torch.randn(6, 5, 4, 4) * torch.linspace(0.1, 4.0, 5).view(1, 5, 1, 1) + 0.3


def spec_asymmetric(x, bits, dims):
    """The spec's formula, written out independently of modiff.quant."""
    mn, mx = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    s = (mx - mn) / (2**bits - 1)
    z = torch.round(-mn / s)
    return (torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1) - z) * s


def spec_symmetric(x, bits, dims):
    s = x.abs().amax(dim=dims, keepdim=True) / (2 ** (bits - 1) - 1)
    return torch.clamp(torch.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s


@pytest.mark.parametrize("granularity,dims", [
    ("tensor", (0, 1, 2, 3)), ("sample", (1, 2, 3)), ("channel", (0, 2, 3)), ("sample-channel", (2, 3)),
])
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_dynamic_quantizer_is_the_spec_formula(granularity, dims, bits):
    assert reduce_dims(4, granularity, 1) == dims
    assert torch.equal(dynamic_fake_quant(X, bits, granularity), spec_asymmetric(X, bits, dims))
    assert torch.equal(dynamic_fake_quant(X, bits, granularity, symmetric=True), spec_symmetric(X, bits, dims))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_levels_and_error_bound(bits):
    q = dynamic_fake_quant(X, bits, "channel")
    for c in range(X.shape[1]):
        assert q[:, c].unique().numel() <= 2**bits
        s = (X[:, c].max() - X[:, c].min()) / (2**bits - 1)
        # round-to-nearest inside the min-max range: |x - Q(x)| <= s / 2 per element
        assert (X[:, c] - q[:, c]).abs().max() <= s / 2 + 1e-6


def test_32_bits_is_the_identity_and_constant_tensors_survive():
    assert dynamic_fake_quant(X, 32, "tensor") is X
    const = torch.full((2, 3, 4), 0.7)
    assert torch.allclose(dynamic_fake_quant(const, 4, "tensor"), const)


def test_linear_inputs_use_the_last_dim_as_channel():
    x = torch.randn(3, 7, 5)  # (batch, tokens, features)
    got = dynamic_fake_quant(x, 4, "channel", channel_axis=-1)
    assert torch.equal(got, spec_asymmetric(x, 4, (0, 1)))


@pytest.mark.parametrize("granularity", ["sample", "sample-channel"])
def test_per_sample_scales_make_a_sample_independent_of_its_batch(granularity):
    alone = dynamic_fake_quant(X[2:3], 3, granularity)
    with_others = dynamic_fake_quant(X, 3, granularity)
    other_batch = dynamic_fake_quant(torch.cat([X[2:3], 50 * X[:2]]), 3, granularity)
    assert torch.equal(alone[0], with_others[2]) and torch.equal(alone[0], other_batch[0])


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_batch_wide_scales_depend_on_the_rest_of_the_batch(granularity):
    """Documented: the paper's LTQ / LCQ results therefore depend on the batch composition."""
    alone = dynamic_fake_quant(X[2:3], 3, granularity)
    other_batch = dynamic_fake_quant(torch.cat([X[2:3], 50 * X[:2]]), 3, granularity)
    assert not torch.equal(alone[0], other_batch[0])


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_weights_are_quantized_per_output_channel(method):
    w = torch.randn(8, 4, 3, 3) * torch.logspace(-2, 1, 8).view(8, 1, 1, 1)
    q = quantize_weight(w, 4, method)
    for o in range(8):
        assert q[o].unique().numel() <= 16
        assert (q[o] - w[o]).abs().max() <= (w[o].max() - w[o].min()) / 15  # a tiny channel keeps its own scale
    assert quantize_weight(w, 32) is w


def test_mse_search_is_never_worse_than_minmax():
    x = torch.cat([torch.randn(4000), torch.tensor([25.0, -30.0])])  # outliers make min-max wasteful
    errs = {}
    for method in ("minmax", "mse"):
        s, z = search_range(x, 3, False, (0,), method)
        q = (torch.clamp(torch.round(x / s) + z, 0, 7) - z) * s
        errs[method] = (q - x).pow(2).mean()
    assert errs["mse"] < 0.5 * errs["minmax"]


@pytest.mark.parametrize("kwargs,name", [
    ({"a_bits": 1}, "a_bits"), ({"a_bits": 17}, "a_bits"), ({"w_bits": 0}, "w_bits"), ({"w_bits": 24}, "w_bits"),
    ({"a_bits": 0, "modulation": "off"}, "a_bits"), ({"granularity": "pixel"}, "granularity"),
    ({"modulation": "sigma-delta"}, "modulation"), ({"weight_method": "adaround"}, "weight_method"),
    ({"act_scale": "static", "granularity": "sample"}, "granularity"),
    ({"residual_tolerance": 0.1, "modulation": "off"}, "residual_tolerance"),
    ({"residual_tolerance": -1.0}, "residual_tolerance"),
])
def test_bad_configs_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ModiffConfig(**kwargs)


def test_valid_bit_widths():
    for bits in (2, 8, 16, 32):
        ModiffConfig(w_bits=bits, a_bits=bits)
    ModiffConfig(a_bits=0, modulation="ec")  # caching
