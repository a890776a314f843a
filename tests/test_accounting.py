"""MAC / GBops / state-memory accounting: hand-checked small cases, the paper's CIFAR-10 DDPM reference,
and the honest GBops of float attention and 0-bit residuals, down to a cell's result."""

import copy
import json

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

import modiff
from bench.cli import main
from bench.zoo.architectures import DDPM_CIFAR10_32, build_random_unet
from modiff.accounting import (
    LayerCount,
    MacReport,
    count_macs,
    gbops_honest,
    gbops_paper,
    state_bytes_estimate,
)

# Tiny model on 8x8 input, counted by hand (per image):
#   conv1 Conv2d(3, 8, 3, padding=1): out 8*8*8 = 512 elements, each 3*3*3 = 27 MACs -> 13824; in 3*64 = 192
#   conv2 Conv2d(8, 4, 1, groups=2): out 4*8*8 = 256 elements, each (8/2)*1 = 4 MACs -> 1024;  in 8*64 = 512
#   fc    Linear(256, 10):           out 10 elements, each 256 MACs                  -> 2560;  in 256
TINY_CONV1, TINY_CONV2, TINY_FC = 13824, 1024, 2560
TINY_MACS = TINY_CONV1 + TINY_CONV2 + TINY_FC  # 17408
TINY_IN = 192 + 512 + 256
TINY_OUT = 512 + 256 + 10


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1, groups=2), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )


def test_tiny_model_exact_macs_per_image():
    model = tiny_model()
    reports = {b: count_macs(model, torch.randn(b, 3, 8, 8)) for b in (1, 3)}
    for report in reports.values():
        assert [(lc.kind, lc.macs) for lc in report.layers] == [
            ("conv", TINY_CONV1),
            ("conv", TINY_CONV2),
            ("linear", TINY_FC),
        ]
        assert [lc.name for lc in report.layers] == ["0", "2", "4"]
        assert report.conv_linear_macs == report.total_macs == TINY_MACS
        assert report.attention_macs == 0
        assert report.in_elements == TINY_IN
        assert report.out_elements == TINY_OUT
    assert reports[1].layers == reports[3].layers
    # hooks are removed afterwards
    assert all(not m._forward_hooks for m in model.modules())


def test_conv1d_and_keyword_input():
    model = nn.Conv1d(4, 6, kernel_size=5, padding=2)
    report = count_macs(model, input=torch.randn(2, 4, 10))
    assert report.layers == [LayerCount("", "conv", 6 * 10 * 4 * 5, 4 * 10, 6 * 10)]


@pytest.mark.parametrize("modulation", ["off", "plain", "ec"])
def test_quantized_layers_count_as_the_layer_they_wrap_once(modulation):
    model = tiny_model()
    x = torch.randn(3, 3, 8, 8)
    plain = count_macs(model, x)
    config = modiff.ModiffConfig(w_bits=32, a_bits=32, modulation=modulation)
    wrapped_model = modiff.quantize(copy.deepcopy(model), config)
    for _ in range(3):  # warm-up and modulated calls alike
        wrapped = count_macs(wrapped_model, x)
        assert [(lc.kind, lc.macs, lc.in_elements, lc.out_elements) for lc in wrapped.layers] == [
            (lc.kind, lc.macs, lc.in_elements, lc.out_elements) for lc in plain.layers
        ]
        assert [lc.name for lc in wrapped.layers] == ["0", "2", "4"]  # the wrapper's name, not "0.layer"
        assert wrapped.total_macs == plain.total_macs == TINY_MACS


def test_cross_attention_macs():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8)
    batch, l_q, l_kv, inner = 2, 10, 7, 4 * 8
    report = count_macs(attn, torch.randn(batch, l_q, 32), encoder_hidden_states=torch.randn(batch, l_kv, 16))
    assert report.attention_macs == 2 * l_q * l_kv * inner
    linear = {lc.name: lc.macs for lc in report.layers if lc.kind == "linear"}
    assert linear == {
        "to_q": l_q * 32 * inner,
        "to_k": l_kv * 16 * inner,
        "to_v": l_kv * 16 * inner,
        "to_out.0": l_q * inner * 32,
    }
    assert report.total_macs == sum(linear.values()) + 2 * l_q * l_kv * inner


def test_self_attention_on_feature_map():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=12, norm_num_groups=4, residual_connection=True)
    report = count_macs(attn, torch.randn(3, 16, 5, 6))  # (B, C, H, W): 30 tokens, inner_dim 24
    assert report.attention_macs == 2 * 30 * 30 * 24


def test_small_unet_attention_blocks():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=[8, 16],
        down_block_types=["DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        norm_num_groups=4,
        attention_head_dim=8,
    )
    report = count_macs(unet, torch.randn(2, 1, 8, 8), torch.tensor([3, 4]))
    attention = [lc for lc in report.layers if lc.kind == "attention"]
    # down block 1: 1 layer at 4x4 (no downsample on the last block); mid block: 1 at 4x4; up block 0: 2 at 4x4
    assert len(attention) == 4
    assert all(lc.macs == 2 * 16 * 16 * 16 for lc in attention)
    assert report.attention_macs == 4 * 2 * 16 * 16 * 16


@pytest.fixture(scope="module")
def cifar_report():
    unet = build_random_unet(DDPM_CIFAR10_32).eval()
    params = sum(p.numel() for p in unet.parameters())
    report = count_macs(unet, torch.randn(1, 3, 32, 32), torch.tensor([10]))
    return unet, params, report


def test_cifar10_ddpm_parameters(cifar_report):
    _, params, _ = cifar_report
    assert params == pytest.approx(35.7e6, rel=0.01)


def test_cifar10_ddpm_matches_paper(cifar_report):
    _, params, report = cifar_report
    paper = gbops_paper(report, w_bits=8, a_bits=32)
    print(
        f"\nDDPM CIFAR-10: params {params / 1e6:.3f} M, conv+linear {report.conv_linear_macs / 1e9:.4f} GMAC, "
        f"attention {report.attention_macs / 1e9:.4f} GMAC, W8A32 paper GBops {paper:.1f} (paper: 1636), "
        f"without attention {gbops_paper(report, 8, 32, include_attention=False):.1f}, "
        f"in/out elements {report.in_elements}/{report.out_elements}"
    )
    assert report.conv_linear_macs == pytest.approx(6.05e9, rel=0.02)
    # 6 single-head attentions over 256 channels: five at 16x16 (256 tokens), the mid one at 4x4 (16 tokens)
    assert report.attention_macs == 5 * 2 * 256 * 256 * 256 + 2 * 16 * 16 * 256
    assert paper == pytest.approx(1636, rel=0.05)


def test_cifar10_batch_independent(cifar_report):
    unet, _, report = cifar_report
    report2 = count_macs(unet, torch.randn(2, 3, 32, 32), torch.tensor([10, 500]))
    assert report2.total_macs == report.total_macs
    assert (report2.in_elements, report2.out_elements) == (report.in_elements, report.out_elements)


def fake_report() -> MacReport:
    return MacReport(
        [
            LayerCount("c", "conv", macs=1000, in_elements=30, out_elements=40),
            LayerCount("l", "linear", macs=500, in_elements=5, out_elements=7),
            LayerCount("a", "attention", macs=200, in_elements=11, out_elements=13),
        ]
    )


def test_report_sums_exclude_attention_elements():
    r = fake_report()
    assert (r.conv_linear_macs, r.attention_macs, r.total_macs) == (1500, 200, 1700)
    assert (r.in_elements, r.out_elements) == (35, 47)


def test_gbops_paper_formula():
    r = fake_report()
    assert gbops_paper(r, 8, 32) == pytest.approx(1700 * 8 * 32 / 1e9)
    assert gbops_paper(r, 4, 8, include_attention=False) == pytest.approx(1500 * 4 * 8 / 1e9)


@pytest.mark.parametrize("include_attention", [True, False])
def test_gbops_honest(include_attention):
    r = fake_report()
    w, a = 4, 8
    att = 200 * w * a if include_attention else 0
    # per modulated step, float32 adds at 32 bit-ops each: ec also accumulates â, plain does not
    additions_by_mode = {"ec": (2 * 35 + 47) * 32, "plain": (35 + 47) * 32}
    paper = gbops_paper(r, w, a, include_attention)
    assert paper == pytest.approx((1500 * w * a + att) / 1e9)

    for steps in (1, 7, 100):
        assert gbops_honest(r, w, a, steps, "off", include_attention) == pytest.approx(paper)

    for modulation, additions in additions_by_mode.items():
        # one step: the warm-up only, conv/linear at 32-bit activations, attention at the paper rate
        assert gbops_honest(r, w, a, 1, modulation, include_attention) == pytest.approx((1500 * w * 32 + att) / 1e9)
        steps = 10
        expected = (1500 * w * 32 + att + (steps - 1) * (1500 * w * a + additions + att)) / steps / 1e9
        assert gbops_honest(r, w, a, steps, modulation, include_attention) == pytest.approx(expected)
        # long trajectories approach paper + additions, from above (the warm-up is the dearer step)
        long = gbops_honest(r, w, a, 10**6, modulation, include_attention)
        assert long == pytest.approx(paper + additions / 1e9, rel=1e-4)
        assert long > paper + additions / 1e9


def test_gbops_honest_cifar_additions(cifar_report):
    _, _, report = cifar_report
    steps = 100
    honest = gbops_honest(report, 8, 8, steps, "ec")
    paper = gbops_paper(report, 8, 8)
    warm_extra = report.conv_linear_macs * 8 * (32 - 8) / steps / 1e9
    additions = (2 * report.in_elements + report.out_elements) * 32 * (steps - 1) / steps / 1e9
    assert honest == pytest.approx(paper + warm_extra + additions)
    print(f"\nDDPM CIFAR-10 W8A8, 100 steps: paper {paper:.1f} GBops, honest (ec) {honest:.1f} GBops")


def test_state_bytes():
    r = fake_report()
    assert state_bytes_estimate(r, 1, "off") == 0
    assert state_bytes_estimate(r, 3, "ec") == (35 + 47) * 4 * 3
    assert state_bytes_estimate(r, 3, "plain") == (35 + 47) * 4 * 3
    assert state_bytes_estimate(r, 2, "ec", bytes_per_element=2) == (35 + 47) * 2 * 2


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda r: gbops_paper(r, 1, 8), "w_bits"),
        (lambda r: gbops_paper(r, 8, 17), "a_bits"),
        (lambda r: gbops_paper(r, 8, 24), "a_bits"),
        (lambda r: gbops_paper(r, 8.0, 8), "w_bits"),
        (lambda r: gbops_honest(r, 64, 8, 10, "ec"), "w_bits"),
        (lambda r: gbops_honest(r, 8, 0, 10, "off"), "a_bits"),
        (lambda r: gbops_honest(r, 8, 8, 0, "ec"), "steps"),
        (lambda r: gbops_honest(r, 8, 8, 10, "EC"), "modulation"),
        (lambda r: state_bytes_estimate(r, 1, "full"), "modulation"),
        (lambda r: state_bytes_estimate(r, 0, "ec"), "batch_size"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call(fake_report())


def test_bits_bounds_accepted():
    r = fake_report()
    for bits in (2, 16, 32):
        gbops_paper(r, bits, bits)
        gbops_honest(r, bits, bits, 3, "ec")


def test_count_macs_needs_tensor():
    with pytest.raises(ValueError, match="tensor"):
        count_macs(nn.Identity(), 3)


# -- honest GBops: attention in float, 0-bit residuals, a cell's figure ------------------------
def _report():
    from modiff.accounting import LayerCount, MacReport

    return MacReport([LayerCount("c", "conv", macs=1000, in_elements=30, out_elements=40),
                      LayerCount("a", "attention", macs=400, in_elements=11, out_elements=13)])


def test_honest_gbops_charge_float_attention_and_credit_zero_bit_residuals():
    """MoDiff's wrapped layers are conv/linear: the attention matmuls run in float and cost 32 x 32,
    not w x a (Q-Diffusion quantizes them: w x a stays). 0-bit residuals skip the conv/linear work
    after the warm-up: only the input difference is left (there was no value at all before)."""
    from modiff.accounting import gbops_honest

    r, steps = _report(), 10
    additions = (2 * 30 + 40) * 32
    float_att, quant_att = 400 * 32 * 32, 400 * 8 * 4
    expected = (1000 * 8 * 32 + float_att + (steps - 1) * (1000 * 8 * 4 + additions + float_att)) / steps / 1e9
    assert gbops_honest(r, 8, 4, steps, "ec", attention_quantized=False) == pytest.approx(expected)
    expected_q = (1000 * 8 * 32 + quant_att + (steps - 1) * (1000 * 8 * 4 + additions + quant_att)) / steps / 1e9
    assert gbops_honest(r, 8, 4, steps, "ec", attention_quantized=True) == pytest.approx(expected_q)
    zero = gbops_honest(r, 8, 0, steps, "ec", attention_quantized=False)
    assert zero == pytest.approx((1000 * 8 * 32 + float_att + (steps - 1) * (30 * 32 + float_att)) / steps / 1e9)
    with pytest.raises(ValueError, match="a_bits"):
        gbops_honest(r, 8, 0, steps, "off")


@pytest.mark.usefixtures("one_thread")
def test_a_zero_bit_cell_gets_an_honest_gbops_figure(tmp_path):
    out = tmp_path / "o"
    assert main(["run", "smoke", "--out", str(out), "--no-progress", "--set", "steps=4",
                 "--set", "matrix.base=['ltq']", "--set", "matrix.a_bits=[0]", "--set", "matrix.modulation=['ec']",
                 "--set", "run.metrics=['psnr_to_fp']"]) == 0
    (row,) = [json.loads(p.read_text()) for p in out.glob("cells/*/result.json")]
    assert row["gbops"] is None and row["gbops_honest"] > 0
