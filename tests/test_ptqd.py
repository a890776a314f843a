"""PTQD: statistics recovered from a synthetic error, the correction and variance hook, the method on
the digits model, and the method in the harness with its statistics cache."""

import copy
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import baselines.ptqd.method as ptqd_method  # registers "ptqd"
from baselines.ptqd import PTQDCorrection, PTQDStats, collect_statistics
from bench.build import build, resolve_cell
from bench.errors import BenchError
from bench.matrix import load_matrix
from bench.methods import CellSpec, base_quantizer
from bench.metrics import psnr_to_fp
from bench.runner import Runner
from modiff.samplers import PerSampleNoise, SamplerConfig, sample
from modiff.samplers import denoising_step as _step
from modiff.schedules import NoiseSchedule, step_pairs

SHAPE = (3, 8, 8)
SCHEDULE = NoiseSchedule.linear()
DDIM6 = SamplerConfig.from_name("ddim-quad", 6)
BIAS = torch.tensor([0.05, -0.1, 0.02], dtype=torch.float64)


def fp_denoiser():
    """A deterministic stand-in for eps_FP(x_t, t): a fixed random convolution, squashed."""
    weight = torch.randn((3, 3, 3, 3), generator=torch.Generator().manual_seed(0)) * 0.3

    def denoise(x, t):
        return torch.tanh(F.conv2d(x, weight, padding=1)) * (1 + t.view(-1, 1, 1, 1) / 2000)

    return denoise


def true_k(t: int, sign: float = 1.0) -> float:
    return sign * (0.2 + 0.4 * t / 1000)


def true_bias(t: int) -> torch.Tensor:
    return BIAS * (1 + t / 1000)


def quantized_denoiser(fp, noise: float, sign: float = 1.0, seed: int = 1):
    """eps_Q = (1 + k_t) eps_FP + b_t[c] + N(0, noise^2), with k_t and b_t depending on t."""
    generator = torch.Generator().manual_seed(seed)

    def denoise(x, t):
        eps = fp(x, t)
        step_t = int(t[0])
        out = (1 + true_k(step_t, sign)) * eps + true_bias(step_t).float().view(1, -1, 1, 1)
        return out + noise * torch.randn(eps.shape, generator=generator)

    return denoise


def synthetic_stats(noise: float, sign: float = 1.0, n: int = 64, batch_size: int = 16, config=DDIM6):
    fp = fp_denoiser()
    return collect_statistics(fp, quantized_denoiser(fp, noise, sign), SCHEDULE, config, range(100, 100 + n),
                              SHAPE, batch_size, "cpu")


def fp_trajectory_errors(stats, q, seeds, config=DDIM6):
    """Per step: (t, eps_FP, eps_Q, corrected eps_Q) along a full-precision trajectory of unseen seeds."""
    fp = fp_denoiser()
    correction = PTQDCorrection(stats)
    raw = []
    corrected = correction.wrap(lambda x, t: raw.append(q(x, t)) or raw[-1])
    noise = PerSampleNoise(seeds)
    x = noise.randn(SHAPE)
    correction.reset()
    out = []
    for t, t_prev in step_pairs(config.timesteps(SCHEDULE)):
        t_batch = torch.full((len(seeds),), t, dtype=torch.long)
        eps = fp(x, t_batch)
        fixed = corrected(x, t_batch)
        out.append((t, eps, raw[-1], fixed))
        x = _step(config.algorithm, x, eps, SCHEDULE.alpha_bar(t), SCHEDULE.alpha_bar(t_prev), config.eta, noise)
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# statistics and correction on a synthetic error
# ----------------------------------------------------------------------------------------------
def test_statistics_recover_a_synthetic_slope_bias_and_noise():
    noise = 0.05
    stats = synthetic_stats(noise)  # 64 trajectories in 4 batches: the sums stream across batches
    timesteps = [t for t, _ in step_pairs(DDIM6.timesteps(SCHEDULE))]
    assert stats.timesteps == timesteps and stats.n_samples == 64
    assert stats.k.shape == (6,) and stats.bias.shape == (6, 3) and stats.residual_std.shape == (6,)
    for i, t in enumerate(timesteps):
        assert float(stats.k[i]) == pytest.approx(true_k(t), abs=0.01), (i, t)
        torch.testing.assert_close(stats.bias[i], true_bias(t), atol=0.004, rtol=0)
        assert float(stats.residual_std[i]) == pytest.approx(noise, rel=0.03), (i, t)


def test_statistics_reset_the_quantized_model_per_batch_and_follow_the_fp_trajectory():
    fp = fp_denoiser()
    seen_fp, seen_q, starts = [], [], []

    def fp_spy(x, t):
        seen_fp.append(x.clone())
        return fp(x, t)

    def q_spy(x, t):
        seen_q.append(x.clone())
        return 5 * fp(x, t) + 3  # a bad quantized model must not steer the trajectory

    config = SamplerConfig.from_name("ddim-quad", 4, eta=1.0)  # with fresh noise at every step
    seeds = [7, 8, 9]
    collect_statistics(fp_spy, q_spy, SCHEDULE, config, seeds, SHAPE, 2, "cpu",
                       on_trajectory_start=lambda: starts.append(len(seen_q)))
    assert starts == [0, 4]  # before the first step of each batch
    assert all(torch.equal(a, b) for a, b in zip(seen_fp, seen_q, strict=True))
    reference = []
    sample(lambda x, t: (reference.append(x.clone()), fp(x, t))[1], SCHEDULE, config, seeds, SHAPE,
           batch_size=2, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(seen_fp, reference, strict=True))


def test_the_correction_undoes_the_correlated_part_and_the_bias():
    fp = fp_denoiser()
    exact = synthetic_stats(noise=0.0)
    for _, eps, raw, corrected in fp_trajectory_errors(exact, quantized_denoiser(fp, 0.0), list(range(5))):
        assert (raw - eps).abs().mean() > 0.05  # there is something to undo at every step
        torch.testing.assert_close(corrected, eps, atol=1e-5, rtol=0)
    # with noise: what is left is the noise scaled by 1 / (1 + k), unbiased per channel
    noise = 0.05
    stats = synthetic_stats(noise)
    q = quantized_denoiser(fp, noise, seed=2)
    for t, eps, raw, corrected in fp_trajectory_errors(stats, q, list(range(5, 37))):
        left = corrected - eps
        assert float(left.pow(2).mean().sqrt()) == pytest.approx(noise / (1 + true_k(t)), rel=0.05)
        assert left.mean(dim=(0, 2, 3)).abs().max() < 0.003
        assert (raw - eps).abs().mean() > 3 * left.abs().mean()


def test_a_negative_slope_is_not_used():
    fp = fp_denoiser()
    stats = synthetic_stats(noise=0.0, sign=-1.0)
    assert (stats.k < -0.15).all() and (stats.k_used == 0).all()
    for i, t in enumerate(stats.timesteps):
        assert float(stats.k[i]) == pytest.approx(true_k(t, -1.0), abs=1e-6)
    # only the bias is removed: the correlated part k_t * eps_FP stays in the corrected prediction
    steps = fp_trajectory_errors(stats, quantized_denoiser(fp, 0.0, -1.0), list(range(5)))
    for i, (t, eps, raw, corrected) in enumerate(steps):
        torch.testing.assert_close(corrected, raw - stats.bias[i].float().view(1, 3, 1, 1), atol=1e-6, rtol=0)
        left, centred = corrected - eps, eps - eps.mean()
        slope = float((left * centred).sum() / centred.pow(2).sum())
        assert slope == pytest.approx(true_k(t, -1.0), abs=0.02)
    # directly: k < 0 subtracts the bias only; k > 0 also divides by 1 + k
    direct = PTQDStats(k=torch.tensor([-0.3, 0.5], dtype=torch.float64), bias=torch.stack([BIAS, BIAS]),
                       residual_std=torch.tensor([0.1, 0.1], dtype=torch.float64), timesteps=[500, 100], n_samples=1)
    correction = PTQDCorrection(direct)
    eps_q = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    bias = BIAS.float().view(1, 3, 1, 1)
    torch.testing.assert_close(correction.correct(eps_q, 0), eps_q - bias)
    torch.testing.assert_close(correction.correct(eps_q, 1), (eps_q - bias) / 1.5)


def test_the_wrapper_counts_steps_per_trajectory_and_rejects_unknown_timesteps():
    stats = PTQDStats(k=torch.tensor([0.0, 1.0], dtype=torch.float64), bias=torch.zeros(2, 3, dtype=torch.float64),
                      residual_std=torch.zeros(2, dtype=torch.float64), timesteps=[5, 5], n_samples=1)
    correction = PTQDCorrection(stats)
    wrapped = correction.wrap(lambda x, t: torch.ones(1, *SHAPE))
    t = torch.tensor([5])
    # same timestep twice (quad spacing repeats the smallest ones): the counter tells them apart
    assert float(wrapped(None, t).mean()) == 1.0 and float(wrapped(None, t).mean()) == 0.5
    correction.reset()
    assert float(wrapped(None, t).mean()) == 1.0
    with pytest.raises(RuntimeError, match="no statistics for timestep 7"):
        wrapped(None, torch.tensor([7]))


def test_statistics_round_trip_through_torch_save(tmp_path):
    stats = synthetic_stats(noise=0.05, n=8, batch_size=8)
    torch.save(stats.to_dict(), tmp_path / "s.pt")
    back = PTQDStats.from_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert back.timesteps == stats.timesteps and back.n_samples == 8
    for name in ("k", "bias", "residual_std"):
        assert torch.equal(getattr(back, name), getattr(stats, name))


# ----------------------------------------------------------------------------------------------
# variance schedule calibration
# ----------------------------------------------------------------------------------------------
def test_noise_std_hook_shrinks_the_fresh_noise_and_clamps_at_zero():
    stats = PTQDStats(k=torch.tensor([1.0, -0.5], dtype=torch.float64), bias=torch.zeros(2, 3, dtype=torch.float64),
                      residual_std=torch.tensor([0.2, 0.2], dtype=torch.float64), timesteps=[500, 100], n_samples=1)
    correction = PTQDCorrection(stats)
    # step 0: sigma_q = 0.2 / (1 + 1) = 0.1; step 1: k < 0 is not used, sigma_q = 0.2
    assert correction.noise_std(0, 0.5, 2.0) == pytest.approx((0.25 - 4 * 0.01) ** 0.5)
    assert correction.noise_std(0, 0.5, -2.0) == pytest.approx((0.25 - 4 * 0.01) ** 0.5)
    assert correction.noise_std(1, 0.5, 2.0) == pytest.approx((0.25 - 4 * 0.04) ** 0.5)
    assert correction.noise_std(1, 0.3, 2.0) == 0.0  # 0.09 - 0.16 < 0
    assert correction.noise_std(0, 0.5, 0.0) == pytest.approx(0.5)


def test_noise_std_is_only_consulted_when_the_sampler_adds_noise():
    fp = fp_denoiser()
    calls = []

    def spy(index, sigma, coefficient):
        calls.append((index, sigma, coefficient))
        return 0.0

    sample(fp, SCHEDULE, DDIM6, [1, 2], SHAPE, progress=False, noise_std=spy)
    assert calls == []  # eta = 0: deterministic DDIM never asks
    stochastic = SamplerConfig.from_name("ddim-quad", 6, eta=1.0)
    plain = sample(fp, SCHEDULE, stochastic, [1, 2], SHAPE, progress=False)
    silenced = sample(fp, SCHEDULE, stochastic, [1, 2], SHAPE, progress=False, noise_std=spy)
    assert [c[0] for c in calls] == [0, 1, 2, 3, 4]  # every step but the last (alpha_bar(-1) = 1)
    assert not torch.allclose(plain, silenced)


# ----------------------------------------------------------------------------------------------
# the registered method
# ----------------------------------------------------------------------------------------------
def _cell(base="ptqd", w_bits=3, a_bits=8, steps=10, n=32, modulation="off", params=None, **kw):
    return CellSpec(model="digits", checkpoint=None, sampler="ddim-quad", steps=steps, eta=kw.pop("eta", 0.0),
                    n_samples=n, seed=0, batch_size=n, base=base, modulation=modulation, cache="none",
                    w_bits=w_bits, a_bits=a_bits, a_granularity=kw.pop("a_granularity", "auto"),
                    params=params if params is not None else {"ptqd": {"base": "lcq", "calib_samples": 32}})


def _check(method, cell) -> str | None:
    """Why ``method`` skips ``cell`` once normalised (what resolving the cell asks of it), or None."""
    return method.check(method.normalise(cell))


def test_resolve_delegates_to_the_base_and_skips_what_ptqd_does_not_model():
    method = base_quantizer("ptqd", {"base": "ltq"})
    cell = method.normalise(_cell(params={}))
    assert method.check(cell) is None and cell.a_granularity == "tensor"  # the base's own granularity
    assert "tensor-wise by definition" in _check(method, _cell(a_granularity="channel"))
    assert "modulation" in _check(method, _cell(modulation="ec"))
    assert "W32A32" in _check(method, _cell(w_bits=32, a_bits=32))
    assert "W32A32" in _check(base_quantizer("ptqd", {"base": "fp"}), _cell())
    with pytest.raises(BenchError, match="unknown base quantizer 'nope'"):
        _check(base_quantizer("ptqd", {"base": "nope"}), _cell())
    with pytest.raises(BenchError, match="itself"):
        _check(base_quantizer("ptqd", {"base": "ptqd"}), _cell())
    with pytest.raises(BenchError, match="calib_samples"):
        _check(base_quantizer("ptqd", {"base": "lcq", "calib_samples": 0}), _cell())
    with pytest.raises(BenchError, match="no parameter"):
        base_quantizer("ptqd", {"bits": 3})


def test_ptqd_improves_psnr_to_fp_on_the_digits_model(digits_model, tmp_path):
    """LCQ at W3A8 (3-bit min-max weights) shifts every prediction: PTQD's bias correction, with
    statistics from 32 trajectories of other seeds, recovers several dB of PSNR against FP."""
    before = copy.deepcopy(digits_model.unet.state_dict())
    sampler = SamplerConfig.from_name("ddim-quad", 10)
    seeds = range(32)
    reference = sample(digits_model.denoiser(), digits_model.schedule, sampler, seeds, digits_model.image_shape,
                       32, progress=False)

    def psnr(cell):
        resolved = resolve_cell(cell)
        assert resolved.skip is None
        prepared = build(resolved, digits_model, torch.device("cpu"), cache_dir=tmp_path)
        images = sample(prepared.denoiser(), digits_model.schedule, sampler, seeds, digits_model.image_shape, 32,
                        progress=False, on_trajectory_start=prepared.start_trajectory, noise_std=prepared.noise_std)
        return psnr_to_fp(images, reference), prepared

    raw, _ = psnr(_cell(base="lcq", params={}))
    corrected, prepared = psnr(_cell())
    print(f"digits W3A8 lcq, 10 ddim-quad steps, 32 samples: raw {raw:.2f} dB, PTQD {corrected:.2f} dB")
    assert raw < 16  # clearly degraded
    assert corrected > raw + 3
    info = prepared.info
    assert info["ptqd_base"] == "lcq" and info["ptqd_calib_samples"] == 32 and len(info["ptqd_k"]) == 10
    assert len(info["ptqd_mean_abs_bias"]) == 10 and min(info["ptqd_residual_std"]) > 0
    assert prepared.noise_std is not None and len(list((tmp_path / "ptqd").glob("*.pt"))) == 1
    # the shared full-precision model is untouched
    after = digits_model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    cell = _cell(params={"ptqd": {"base": "lcq", "calib_samples": 4, "correct_variance": False}})
    resolved = resolve_cell(cell)
    assert resolved.skip is None
    assert build(resolved, digits_model, torch.device("cpu")).noise_std is None


def test_every_trajectory_restarts_the_step_count(digits_model):
    """30 quad steps end with t = 0 twice; only the step counter, reset at each trajectory start,
    tells those two apart, so a second trajectory is corrected exactly like the first."""
    sampler = SamplerConfig.from_name("ddim-quad", 30)
    cell = _cell(steps=30, n=4, params={"ptqd": {"base": "lcq", "calib_samples": 4}})
    resolved = resolve_cell(cell)
    assert resolved.skip is None
    prepared = build(resolved, digits_model, torch.device("cpu"))
    assert prepared.info["ptqd_timesteps"][-2:] == [0, 0]
    denoiser = prepared.denoiser()

    def run():
        return sample(denoiser, digits_model.schedule, sampler, range(4), digits_model.image_shape, 4,
                      progress=False, on_trajectory_start=prepared.start_trajectory)

    assert torch.equal(run(), run())


MATRIX = """
[run]
model = "digits"
sampler = "ddim-quad"
steps = 6
n_samples = 8
batch_size = 8
metrics = ["psnr_to_fp"]

[matrix]
w_bits = [3]
a_bits = [8]
base = ["lcq", "ptqd"]
modulation = ["off", "ec"]

[params.ptqd]
base = "lcq"
calib_samples = 16
"""


def test_ptqd_in_the_harness_reuses_its_cached_statistics(tmp_path, monkeypatch, digits_model):
    path = tmp_path / "ptqd.toml"
    path.write_text(MATRIX)
    out = tmp_path / "run"
    summary = Runner(load_matrix(str(path)), out, device="cpu", progress=False, log=lambda s: None).run()
    assert not summary.failed and summary.skipped == 1  # ptqd with modulation=ec
    table = pd.read_csv(out / "results.csv").set_index("method")
    assert table.loc["ptqd", "psnr_to_fp"] > table.loc["lcq", "psnr_to_fp"]
    info = json.loads(table.loc["ptqd", "method_info"])
    assert info["ptqd_calib_samples"] == 16 and info["ptqd_stats_from_cache"] is False
    cached = list((out / "cache" / "ptqd").glob("*.pt"))
    assert len(cached) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("statistics collected again instead of loaded from the cache")

    monkeypatch.setattr(ptqd_method, "collect_statistics", must_not_run)
    again = Runner(load_matrix(str(path)), out, device="cpu", force=True, progress=False, log=lambda s: None).run()
    assert not again.failed and again.ran == again.total == 3  # lcq off and ec, ptqd off
    table2 = pd.read_csv(out / "results.csv").set_index("method")
    assert json.loads(table2.loc["ptqd", "method_info"])["ptqd_stats_from_cache"] is True
    assert table2.loc["ptqd", "psnr_to_fp"] == table.loc["ptqd", "psnr_to_fp"]
