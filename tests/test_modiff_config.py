"""``ModiffConfig`` settings that used to compute a layer more exactly, or less, than their name and cost say
(issue 17): the granularity of 2-D inputs, and static scales or 0-bit residuals without the warm-up.

- ``sample-channel`` on a 2-D input ``(batch, features)`` -- the time-embedding MLP and every
  ``time_emb_proj`` -- reduced over no dimension: one scale per element, an exact layer charged at
  ``a_bits``. It is now ``sample`` there; conv and token (3-D) inputs are unchanged.
- Static scales are fitted on residuals; without the warm-up the first step quantized a whole input
  with them (about 10x too narrow). The combination is refused.
"""

import copy

import pytest
import torch
from torch import nn

import modiff
from modiff.config import GRANULARITIES
from modiff.layers import QuantLayer
from modiff.quant import dynamic_fake_quant, reduce_dims

torch.manual_seed(0)
# a time-embedding-like input: (batch, features), features of different magnitudes
EMB = torch.randn(4, 64) * torch.linspace(0.2, 3.0, 64) + 0.1
LINEAR = nn.Linear(64, 32)
CONV = nn.Conv2d(3, 5, 3, padding=1)
IMG = torch.randn(2, 3, 6, 6) * torch.tensor([0.3, 1.0, 2.5]).view(1, 3, 1, 1)


def old_reduce_dims(ndim: int, granularity: str, channel_axis: int) -> tuple[int, ...]:
    """``reduce_dims`` before the fix, written out: every dim but the kept ones."""
    channel_axis %= ndim
    keep = {"tensor": (), "sample": (0,), "channel": (channel_axis,), "sample-channel": (0, channel_axis)}[granularity]
    return tuple(d for d in range(ndim) if d not in keep)


def wrap(layer: nn.Module, **kw) -> QuantLayer:
    return QuantLayer(copy.deepcopy(layer), modiff.ModiffConfig(w_bits=32, **kw), "layer")


def relative_error(layer: QuantLayer, x: torch.Tensor, exact: nn.Module) -> float:
    with torch.no_grad():
        return ((layer(x) - exact(x)).norm() / exact(x).norm()).item()


# -- A: sample-channel on 2-D inputs -------------------------------------------------------------
def test_sample_channel_quantizes_a_2d_linear_input_like_sample():
    """Fails on the old code: one scale per element made the layer exact (relative error ~1e-8)."""
    per_row = wrap(LINEAR, a_bits=2, modulation="off", granularity="sample")
    per_row_channel = wrap(LINEAR, a_bits=2, modulation="off", granularity="sample-channel")
    err = relative_error(per_row_channel, EMB, LINEAR)
    assert err > 0.05, err  # quantized at 2 bits, as the accounting charges it
    assert err == pytest.approx(relative_error(per_row, EMB, LINEAR), rel=1e-6)
    assert per_row_channel._scale_dims(EMB) == per_row._scale_dims(EMB) == (1,)  # one scale per row
    assert reduce_dims(2, "sample-channel", -1) == reduce_dims(2, "sample-channel", 1) == (1,)
    quantized = dynamic_fake_quant(EMB, 2, "sample-channel", channel_axis=-1)
    assert torch.equal(quantized, dynamic_fake_quant(EMB, 2, "sample"))


@pytest.mark.parametrize("modulation", ["plain", "ec"])
def test_sample_channel_residuals_of_a_2d_input_are_quantized_per_sample(modulation):
    gen = torch.Generator().manual_seed(2)
    seq = [EMB + 0.1 * k * torch.randn(EMB.shape, generator=gen) for k in range(5)]
    per_row = wrap(LINEAR, a_bits=2, modulation=modulation, granularity="sample")
    per_row_channel = wrap(LINEAR, a_bits=2, modulation=modulation, granularity="sample-channel")
    with torch.no_grad():
        outs = [(per_row(a), per_row_channel(a)) for a in seq]
    assert all(torch.equal(a, b) for a, b in outs)
    assert (outs[-1][1] - LINEAR(seq[-1])).norm() > 1e-3 * LINEAR(seq[-1]).norm()  # not exact


@pytest.mark.parametrize("granularity", [g for g in GRANULARITIES if g != "token"])  # token came later (its own tests)
@pytest.mark.parametrize("ndim,channel_axis", [(2, 1), (2, -1), (3, 1), (3, -1), (4, 1), (5, 1)])
def test_only_sample_channel_on_2d_inputs_changed(ndim, channel_axis, granularity):
    new, old = reduce_dims(ndim, granularity, channel_axis), old_reduce_dims(ndim, granularity, channel_axis)
    if ndim == 2 and granularity == "sample-channel":
        assert old == () and new == (1,)
    else:
        assert new == old


def test_conv_sample_channel_keeps_one_scale_per_sample_and_channel():
    layer = wrap(CONV, a_bits=2, modulation="off", granularity="sample-channel")
    assert layer._scale_dims(IMG) == old_reduce_dims(4, "sample-channel", 1) == (2, 3)
    q = IMG.clone()
    for n in range(IMG.shape[0]):
        for c in range(IMG.shape[1]):  # each (sample, channel) plane quantized on its own
            q[n, c] = dynamic_fake_quant(IMG[n, c].reshape(1, -1), 2, "tensor").reshape(6, 6)
    with torch.no_grad():
        assert torch.allclose(layer(IMG), CONV(q), atol=1e-6)


def test_channel_on_a_2d_input_is_exact_at_batch_1_and_for_equal_rows():
    """Documented, not changed: ``channel`` keeps one scale per feature over the batch, so a single
    row, or rows that are all equal (every sample at the same timestep, as in the samplers), get
    a zero range and pass exactly. Distinct rows are quantized."""
    layer = wrap(LINEAR, a_bits=2, modulation="off", granularity="channel")
    assert layer._scale_dims(EMB) == (0,)
    assert relative_error(layer, EMB[:1], LINEAR) < 1e-6
    assert relative_error(layer, EMB[:1].expand(4, -1).contiguous(), LINEAR) < 1e-6
    assert relative_error(layer, EMB, LINEAR) > 0.05


# -- B: static scales need the warm-up -----------------------------------------------------------
@pytest.mark.parametrize("modulation", ["plain", "ec"])
def test_static_scales_without_warmup_are_refused(modulation):
    with pytest.raises(ValueError) as info:
        modiff.ModiffConfig(a_bits=4, modulation=modulation, act_scale="static", granularity="tensor", warmup=False)
    message = str(info.value)
    assert "\n" not in message
    assert "act_scale='static'" in message and "warmup=False" in message
    assert "warmup=True" in message and "act_scale='dynamic'" in message  # what to do instead


def test_the_neighbouring_combinations_stay_allowed():
    modiff.ModiffConfig(a_bits=4, modulation="ec", act_scale="static", granularity="tensor")  # with the warm-up
    modiff.ModiffConfig(a_bits=4, modulation="ec", warmup=False)  # dynamic scales fit the first step itself
    modiff.ModiffConfig(a_bits=4, modulation="off", act_scale="static", granularity="tensor", warmup=False)  # none


def test_a_residual_scale_is_too_narrow_for_a_whole_input():
    """Why the combination is refused: the calibrated residual scale clips the first-step input."""
    gen = torch.Generator().manual_seed(1)
    seq = [IMG]
    for _ in range(8):  # a slowly drifting input: residuals ~10x smaller than the input
        seq.append(seq[-1] + 0.1 * torch.randn(IMG.shape, generator=gen))
    layer = wrap(CONV, a_bits=4, modulation="ec", act_scale="static", granularity="tensor")
    layer.start_observing()
    with torch.no_grad():
        for a in seq:
            layer(a)
    layer.finish_observing("minmax")
    first = (layer.quantize_activation(seq[0]) - seq[0]).norm() / seq[0].norm()
    residual = seq[1] - seq[0]
    later = (layer.quantize_activation(residual) - residual).norm() / residual.norm()
    assert first > 0.5 and first > 4 * later, (first, later)


def test_zero_bit_residuals_without_warm_up_are_refused():
    """a_bits = 0 reuses the cached output after the warm-up; without a warm-up the first step was
    quantized to 0 bits and gave NaN. Refused in the config, and skipped with that reason in a matrix."""
    with pytest.raises(ValueError, match="a_bits=0 .* needs warmup=True"):
        modiff.ModiffConfig(a_bits=0, modulation="ec", warmup=False)
    modiff.ModiffConfig(a_bits=0, modulation="ec", warmup=True)  # caching after the warm-up: fine
    from bench.matrix import load_matrix

    matrix = load_matrix("smoke", ["matrix.base=['ltq']", "matrix.a_bits=[0, 4]", "matrix.modulation=['ec']",
                                   "params.ltq.warmup=false"])
    assert [c.a_bits for c in matrix.cells] == [4]
    assert ["needs warmup=True" in s["reason"] for s in matrix.skipped] == [True]
