"""Honest GBops credit the samples that adaptive caching (``residual_tolerance``) let reuse their cached output
(issue 17, item 3): before, every later step was charged in full whatever the tolerance skipped."""

import pandas as pd
import pytest
import torch
from torch import nn

import modiff
from bench.generate import reused_fractions
from bench.matrix import load_matrix
from bench.runner import Runner
from modiff.accounting import LayerCount, MacReport, gbops_honest, reused_share

pytestmark = pytest.mark.usefixtures("one_thread")


def report() -> MacReport:
    return MacReport([LayerCount("c", "conv", macs=1000, in_elements=30, out_elements=40),
                      LayerCount("l", "linear", macs=500, in_elements=5, out_elements=7),
                      LayerCount("a", "attention", macs=200, in_elements=11, out_elements=13)])


@pytest.mark.parametrize("modulation", ["ec", "plain"])
def test_reused_samples_cost_their_input_difference_only(modulation):
    r, w, a, steps = report(), 8, 4, 10
    full = gbops_honest(r, w, a, steps, modulation, attention_quantized=False)
    assert gbops_honest(r, w, a, steps, modulation, attention_quantized=False, reused={}) == full
    passes = 2 if modulation == "ec" else 1
    saved_c = 0.5 * (1000 * w * a + ((passes - 1) * 30 + 40) * 32)  # half of layer c's samples reused
    half = gbops_honest(r, w, a, steps, modulation, attention_quantized=False, reused={"c": 0.5})
    assert half == pytest.approx(full - (steps - 1) * saved_c / steps / 1e9)
    # every sample of every layer reused after the warm-up: exactly what 0-bit residuals (pure caching) cost
    everything = gbops_honest(r, w, a, steps, modulation, attention_quantized=False, reused={"c": 1.0, "l": 1.0})
    assert everything == pytest.approx(gbops_honest(r, w, 0, steps, modulation, attention_quantized=False))
    assert reused_share(r, {"c": 0.5}) == pytest.approx(500 / 1500) and reused_share(r, {}) == 0


def test_layers_count_the_samples_their_tolerance_reuses():
    torch.manual_seed(0)
    config = modiff.ModiffConfig(w_bits=32, a_bits=4, residual_tolerance=0.5, granularity="sample")
    model = modiff.quantize(nn.Sequential(nn.Linear(6, 6)), config)
    x = torch.randn(4, 6)
    modiff.reset(model)
    model(x)  # the warm-up: nothing checked
    assert modiff.reused_samples(model) == {}
    moved = x.clone()
    moved[0] += torch.linspace(0, 3, 6)  # one sample moves (a residual range of 3), three stand still
    model(moved)
    model(moved)  # nothing moves
    assert modiff.reused_samples(model) == {"0": (3 + 4, 8)}
    modiff.reset(model)
    assert modiff.reused_samples(model) == {}


def test_fractions_are_summed_over_chunks_whoever_sampled_them():
    one = reused_fractions([{"a": [3, 8], "b": [0, 8]}, {"a": [5, 8]}])
    assert one == {"a": 0.5, "b": 0.0}
    assert reused_fractions([{"a": [8, 16]}]) == {"a": 0.5}  # one chunk or two: the same fraction
    assert reused_fractions([{}, {}]) == {}


def test_a_tolerant_cell_is_charged_less_than_the_same_cell_without_tolerance(tmp_path):
    matrix = load_matrix("smoke", [
        "run.steps=6", "run.n_samples=8", "run.batch_size=8", "run.metrics=['psnr_to_fp']",
        "matrix.base=['psq']", "matrix.w_bits=[8]", "matrix.a_bits=[4, 0]", "matrix.modulation=['ec']",
        "matrix.cache=['none']"])
    tolerant = load_matrix("smoke", [
        "run.steps=6", "run.n_samples=8", "run.batch_size=8", "run.metrics=['psnr_to_fp']",
        "matrix.base=['psq']", "matrix.w_bits=[8]", "matrix.a_bits=[4]", "matrix.modulation=['ec']",
        "matrix.cache=['none']", "params.psq.residual_tolerance=1e9"])  # every residual is "still": all reused
    frames = {}
    for name, m in (("plain", matrix), ("tolerant", tolerant)):
        Runner(m, tmp_path / name, device="cpu", progress=False, log=lambda s: None).run()
        frame = pd.read_csv(tmp_path / name / "results.csv")
        frames[name] = frame[frame.base == "psq"].set_index("a_bits")
    plain, zero, tol = frames["plain"].loc[4], frames["plain"].loc[0], frames["tolerant"].loc[4]
    assert pd.isna(plain.reused_fraction) and tol.reused_fraction == pytest.approx(1.0)
    assert tol.gbops == plain.gbops  # the paper convention does not look at what ran
    # every later step reused every sample's cache: charged as 0-bit residuals (pure caching) are
    assert tol.gbops_honest == pytest.approx(zero.gbops_honest) and tol.gbops_honest < 0.9 * plain.gbops_honest
