"""Per-token activation scales (``granularity="token"``): one scale per row of a linear's input, the granularity
of the transformer quantization papers and of torchao's dynamic int8; it factors out of the matmul, so int8
execution runs it too. On a conv input it is ``sample``."""

import copy

import pytest
import torch
from torch import nn

import modiff
from modiff.config import GRANULARITIES, REAL_GRANULARITIES
from modiff.quant import dynamic_fake_quant, quantize_over, reduce_dims

pytestmark = pytest.mark.usefixtures("one_thread")


def test_token_is_a_granularity_that_real_execution_accepts():
    assert "token" in GRANULARITIES and "token" in REAL_GRANULARITIES
    modiff.ModiffConfig(granularity="token", execution="int8", weight_symmetric=True)
    with pytest.raises(ValueError, match="static"):
        modiff.ModiffConfig(granularity="token", act_scale="static")


@pytest.mark.parametrize(("ndim", "channel_axis", "dims"), [
    (3, -1, (2,)),  # (batch, tokens, features): over the features of each token
    (4, -1, (3,)),  # a linear on (batch, h, w, features)
    (2, -1, (1,)),  # (batch, features): one scale per row = per sample
    (4, 1, (1, 2, 3)),  # a conv2d input: per sample
    (3, 1, (1, 2)),  # a conv1d input (batch, channels, length): per sample, not per position
])
def test_token_reduces_over_the_features_of_a_linear_input_and_is_sample_on_a_conv_input(ndim, channel_axis, dims):
    assert reduce_dims(ndim, "token", channel_axis) == dims
    if channel_axis == 1:
        assert dims == reduce_dims(ndim, "sample", channel_axis)


def test_each_token_is_quantized_on_its_own_grid():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    x[1, 2] *= 100.0  # an outlier token
    q = dynamic_fake_quant(x, 4, "token", channel_axis=-1)
    for b in range(2):
        for n in range(5):
            row = x[b, n].reshape(1, -1)
            assert torch.equal(q[b, n], quantize_over(row, (1,), 4, False).reshape(-1))
    # the outlier does not touch any other token, unlike one scale per tensor
    y = x.clone()
    y[1, 2] = 0.0
    others = torch.ones(2, 5, dtype=torch.bool)
    others[1, 2] = False
    assert torch.equal(dynamic_fake_quant(y, 4, "token", channel_axis=-1)[others], q[others])
    assert not torch.equal(dynamic_fake_quant(y, 4, "tensor", channel_axis=-1)[others],
                           dynamic_fake_quant(x, 4, "tensor", channel_axis=-1)[others])


def _tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=2, out_channels=2,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                 norm_num_groups=1).eval().requires_grad_(False)


def _trajectory(model, steps=4, seed=1):
    """Three denoiser calls of a fixed 'trajectory' (decreasing timesteps, slowly changing input)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 8, 8, generator=gen)
    labels = torch.tensor([1, 7, 10])  # 10: the null class of classifier-free guidance
    outs = []
    for i in range(steps):
        t = torch.full((3,), 900 - 200 * i)
        outs.append(model(x, timestep=t, class_labels=labels).sample)
        x = x - 0.1 * outs[-1]
    return torch.stack(outs)


@pytest.mark.parametrize("modulation", ["off", "plain", "ec"])
def test_int8_execution_with_token_scales_equals_fake_quantization_on_a_transformer(modulation):
    dit = _tiny_dit()
    options = dict(w_bits=8, a_bits=6, modulation=modulation, granularity="token", weight_symmetric=True)
    fake = modiff.quantize(copy.deepcopy(dit), modiff.ModiffConfig(**options))
    real = modiff.quantize(copy.deepcopy(dit), modiff.ModiffConfig(**options, execution="int8"))
    assert any(isinstance(m, nn.Linear) for m in dit.modules())
    a, b = _trajectory(fake), _trajectory(real)
    fp = _trajectory(dit)
    # equal up to float rounding of the accumulation; quantization itself moves the outputs far more
    assert (a - b).abs().max() < 1e-3 * fp.abs().max()
    assert (a - fp).abs().max() > 10 * (a - b).abs().max()


def test_32_bit_modulation_with_token_scales_equals_full_precision():
    dit = _tiny_dit()
    q = modiff.quantize(copy.deepcopy(dit), modiff.ModiffConfig(w_bits=32, a_bits=32, modulation="ec",
                                                                granularity="token"))
    torch.testing.assert_close(_trajectory(q), _trajectory(dit), rtol=1e-5, atol=1e-5)


def test_token_scales_keep_a_token_outlier_from_flattening_the_rest():
    """The reason transformer papers quantize per token: a few tokens with large activations. With one scale per
    tensor they set the grid of every token; per token they do not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval().requires_grad_(False)
    x = torch.randn(4, 16, 32)
    x[:, 0] *= 40.0  # one outlier token per sample (as a class / register token)
    ref = model(x)
    errors = {}
    for granularity in ("tensor", "sample", "token"):
        q = modiff.quantize(copy.deepcopy(model), modiff.ModiffConfig(w_bits=8, a_bits=4, modulation="off",
                                                                      granularity=granularity))
        with torch.no_grad():
            out = q(x)
        errors[granularity] = float(((out - ref)[:, 1:]).pow(2).mean() / ref[:, 1:].pow(2).mean())
    assert errors["token"] < errors["sample"] / 20
    assert errors["token"] < errors["tensor"] / 20


def test_token_scales_on_a_batch_do_not_depend_on_the_other_samples():
    dit = _tiny_dit()
    cfg = modiff.ModiffConfig(w_bits=8, a_bits=4, modulation="ec", granularity="token")
    q = modiff.quantize(copy.deepcopy(dit), cfg)
    full = _trajectory(q)
    modiff.reset(q)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 8, 8, generator=gen)[:1]
    outs = []
    for i in range(4):
        outs.append(q(x, timestep=torch.full((1,), 900 - 200 * i), class_labels=torch.tensor([1])).sample)
        x = x - 0.1 * outs[-1]
    # the DiT's patch-embedding conv runs per sample, its linears per token: sample 0 alone = sample 0 in the batch
    torch.testing.assert_close(torch.stack(outs)[:, 0], full[:, 0], rtol=1e-4, atol=1e-5)


def test_int8_token_scales_are_as_accurate_as_torchaos_dynamic_int8():
    """torchao's Int8DynamicActivationInt8WeightConfig is W8A8 with symmetric per-token activation scales and
    symmetric per-channel weights. Its grids are not ours to the last step (the two disagree element by element by
    about as much as either differs from float), so the check is on accuracy: the same error, both far below one
    scale per tensor."""
    pytest.importorskip("torchao")
    from baselines.torchao import quantize_linears

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).eval().requires_grad_(False)
    x = torch.randn(4, 12, 32)
    x[:, 3] *= 20.0
    ref = model(x)

    def error(out):
        return float((out - ref).pow(2).mean() / ref.pow(2).mean())

    def ours(granularity):
        return error(modiff.quantize(copy.deepcopy(model), modiff.ModiffConfig(
            w_bits=8, a_bits=8, modulation="off", granularity=granularity, symmetric=True, weight_symmetric=True,
            execution="int8"))(x))

    theirs_model = copy.deepcopy(model)
    quantize_linears(theirs_model, "w8a8")
    token, theirs, tensor = ours("token"), error(theirs_model(x)), ours("tensor")
    assert 0.5 < token / theirs < 2.0, (token, theirs)
    assert tensor > 5 * max(token, theirs), (tensor, token, theirs)
