"""latent-diffusion's DDPM for latent models (``ddpm-ldm-uniform``) and the MoDiff paper's Table 5 preset.

``LatentDiffusion`` sets ``clip_denoised = False`` (its base class ``DDPM``, pixel space, clips) and samples with
the posterior variance, so latent DDPM must not clip x0; the ``ddpm-*`` samplers of the DDIM code base clip and
keep doing so. New names are imported inside the tests, so that each test fails on its own on code without them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from bench.cli import main
from bench.matrix import load_matrix
from bench.matrix_file import presets
from modiff.samplers import PerSampleNoise, SamplerConfig, sample
from modiff.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = NoiseSchedule.linear(1e-3, 0.05, num_train_timesteps=100)  # alpha_bar(99) ~ 0.08
PRESET = "lsun-bedroom-ddpm"


def gaussian_oracle(mu: float, s: float, schedule: NoiseSchedule):
    """The exact eps-prediction for data ~ N(mu, s^2) per pixel; with mu = 2.5 its x0 prediction lies far
    outside [-1, 1] at every step (s = 0: exactly mu)."""
    table = schedule._alpha_bar_ext

    def denoise(x, t):
        ab = table[t + 1].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)

    return denoise


def reference_loop(denoise, betas: np.ndarray, seeds, shape, clip: bool, posterior_variance: bool) -> torch.Tensor:
    """Ancestral sampling over every timestep, written from the two code bases' buffers in float64:
    latent-diffusion's ``LatentDiffusion.p_sample_loop`` (clip=False, posterior_variance=True: posterior_mean_coef1/2,
    posterior_variance, no noise at t = 0) and the DDIM code base's ``ddpm_steps`` (clip=True, variance beta_t).
    Fresh noise is drawn per sample at every step, the last too (this project's rule)."""
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
    coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
    variance = betas * (1.0 - ac_prev) / (1.0 - ac) if posterior_variance else betas
    noise = PerSampleNoise(list(seeds))
    x = noise.randn(shape).double()
    for i in reversed(range(len(betas))):
        eps = denoise(x, torch.full((len(seeds),), i, dtype=torch.long))
        x0 = math.sqrt(1.0 / ac[i]) * x - math.sqrt(1.0 / ac[i] - 1.0) * eps
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        z = noise.randn(shape).double()
        x = coef1[i] * x0 + coef2[i] * x + (0.0 if i == 0 else math.sqrt(variance[i])) * z
    return x


# -- the step ---------------------------------------------------------------------------------------------------
def test_ldm_ddpm_step_is_the_unclipped_posterior_mean_plus_posterior_noise():
    """One step t = 60 -> 40 on a toy denoiser whose x0 prediction spans [-3, 3]: the posterior mean
    q(x_40 | x_60, x0) computed by hand with x0 as predicted (not clipped), plus sqrt(beta~) times the
    sample's fresh noise. The clipping DDPM gives the clipped mean with variance beta instead."""
    from modiff.samplers import denoising_step

    seeds, shape = [5, 6], (1, 3, 4)
    ab_t, ab_prev = TOY.alpha_bar(60), TOY.alpha_bar(40)
    x = PerSampleNoise(seeds).randn(shape) * 1.5
    x0 = torch.linspace(-3.0, 3.0, 12).view(1, *shape).expand(2, *shape)
    eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1.0 - ab_t)
    z = PerSampleNoise(seeds).randn(shape)  # the first draw of fresh generators: what the step draws

    alpha_t = ab_t / ab_prev  # q(x_t | x_prev) = N(sqrt(alpha_t) x_prev, (1 - alpha_t) I)
    beta_t = 1.0 - alpha_t
    beta_tilde = (1.0 - ab_prev) / (1.0 - ab_t) * beta_t

    def posterior_mean(x0):  # the mean of q(x_prev | x_t, x0)
        coef_x0 = math.sqrt(ab_prev) * beta_t / (1.0 - ab_t)
        coef_xt = math.sqrt(alpha_t) * (1.0 - ab_prev) / (1.0 - ab_t)
        return coef_x0 * x0 + coef_xt * x

    got = denoising_step("ddpm-ldm", x, eps, ab_t, ab_prev, 0.0, PerSampleNoise(seeds))
    torch.testing.assert_close(got, posterior_mean(x0) + math.sqrt(beta_tilde) * z, atol=1e-5, rtol=1e-5)
    clipped = denoising_step("ddpm", x, eps, ab_t, ab_prev, 0.0, PerSampleNoise(seeds))
    torch.testing.assert_close(clipped, posterior_mean(x0.clamp(-1, 1)) + math.sqrt(beta_t) * z, atol=1e-5, rtol=1e-5)
    assert (got - clipped).abs().max() > 0.1

    # the last step (to alpha_bar(-1) = 1) returns the unclipped x0 itself, without noise
    ab_0 = TOY.alpha_bar(0)
    x_1 = PerSampleNoise(seeds).randn(shape)
    eps_0 = (x_1 - math.sqrt(ab_0) * x0) / math.sqrt(1.0 - ab_0)
    torch.testing.assert_close(denoising_step("ddpm-ldm", x_1, eps_0, ab_0, 1.0, 0.0, PerSampleNoise(seeds)), x0)


def test_ldm_ddpm_noise_std_hook_gets_the_posterior_std_and_the_eps_coefficient():
    """PTQD's hook signature: (sigma_t, coefficient of eps in x_prev); here x0 is never clipped, so the
    coefficient is exact: d x_prev / d eps = -sqrt(ab_prev) beta / (1 - ab_t) * sqrt(1 / ab_t - 1)."""
    from modiff.samplers import denoising_step

    seen = []
    ab_t, ab_prev = TOY.alpha_bar(30), TOY.alpha_bar(10)
    x = torch.zeros(1, 1, 2, 2)
    out = denoising_step("ddpm-ldm", x, torch.zeros_like(x), ab_t, ab_prev, 0.0, PerSampleNoise([0]),
                         lambda sigma, coef: seen.append((sigma, coef)) or 0.0)
    beta = 1.0 - ab_t / ab_prev
    assert seen == [pytest.approx((math.sqrt(beta * (1 - ab_prev) / (1 - ab_t)),
                                   -math.sqrt(ab_prev) * beta / (1 - ab_t) * math.sqrt(1 / ab_t - 1)))]
    assert torch.equal(out, torch.zeros_like(x))  # std 0: the mean only


# -- the sampler ------------------------------------------------------------------------------------------------
def test_ddpm_ldm_uniform_is_latent_diffusions_sampling_loop_at_every_timestep():
    """At steps = T it is LatentDiffusion.p_sample_loop: every t from T - 1 to 0, the last step to
    alphas_cumprod_prev[0] = 1, x0 unclipped, posterior variance; on the N(2.5, 0.5^2) denoiser the result
    stays around 2.5, where the clipping DDPM cannot go."""
    from modiff.samplers import SAMPLER_NAMES

    assert "ddpm-ldm-uniform" in SAMPLER_NAMES
    config = SamplerConfig.from_name("ddpm-ldm-uniform", 100)
    assert (config.algorithm, config.spacing, config.name) == ("ddpm-ldm", "uniform", "ddpm-ldm-uniform")
    assert config.step_pairs(TOY) == [(t, t - 1) for t in reversed(range(100))]
    assert config.evaluation_timesteps(TOY) == list(reversed(range(100)))

    seeds, shape = range(8), (1, 2, 2)
    denoise = gaussian_oracle(2.5, 0.5, TOY)
    betas = TOY.betas.numpy()
    got = sample(denoise, TOY, config, seeds, shape, batch_size=3, progress=False)
    want = reference_loop(denoise, betas, seeds, shape, clip=False, posterior_variance=True)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    assert got.mean() > 2.0

    clipped = sample(denoise, TOY, SamplerConfig.from_name("ddpm-uniform", 100), seeds, shape, batch_size=3,
                     progress=False)
    torch.testing.assert_close(clipped.double(), reference_loop(denoise, betas, seeds, shape, clip=True,
                                                                posterior_variance=False), atol=1e-4, rtol=1e-4)
    assert clipped.max() <= 1.0 + 1e-6  # the last step lands on the clipped x0


def test_ddpm_ldm_uniform_reproduces_data_outside_minus_one_one_under_its_exact_denoiser():
    """1000 steps of the linear schedule, N(2.5, 0.5^2) data: the unclipped sampler returns that law."""
    schedule = NoiseSchedule.linear()
    x = sample(gaussian_oracle(2.5, 0.5, schedule), schedule, SamplerConfig.from_name("ddpm-ldm-uniform", 1000),
               range(400), (1, 4, 4), batch_size=400, progress=False)
    assert x.mean().item() == pytest.approx(2.5, abs=0.02)
    assert x.std().item() == pytest.approx(0.5, rel=0.03)


def test_respaced_ddpm_ldm_steps_use_the_step_beta():
    """On fewer steps the same update over each step of the uniform grid, beta = 1 - ab_t / ab_prev and the
    posterior variance of that step (no other grid: latent-diffusion's DDPM has none shorter)."""
    from modiff.samplers import denoising_step

    config = SamplerConfig.from_name("ddpm-ldm-uniform", 4)
    assert config.timesteps(TOY) == [0, 25, 50, 75] and config.step_pairs(TOY)[-1] == (0, -1)
    seeds, shape = [3, 4], (1, 2, 2)
    denoise = gaussian_oracle(-1.7, 0.2, TOY)
    noise = PerSampleNoise(seeds)
    x = noise.randn(shape)
    for t, t_prev in config.step_pairs(TOY):
        eps = denoise(x, torch.full((2,), t))
        x = denoising_step("ddpm-ldm", x, eps, TOY.alpha_bar(t), TOY.alpha_bar(t_prev), 0.0, noise)
    assert torch.equal(sample(denoise, TOY, config, seeds, shape, batch_size=2, progress=False), x)


def test_the_clipping_ddpm_and_the_other_samplers_are_unchanged():
    """ddpm-* still clip (and keep beta_t): every name modiff registers builds the same config here as there,
    and the harness's sample is modiff's, bit for bit, for all of them."""
    from modiff import samplers as modiff_samplers

    seeds, shape = range(4), (1, 2, 2)
    denoise = gaussian_oracle(2.5, 0.5, TOY)
    for name in modiff_samplers.SAMPLER_NAMES:
        ours, theirs = SamplerConfig.from_name(name, 5), modiff_samplers.SamplerConfig.from_name(name, 5)
        assert ours == theirs and ours.name == theirs.name == name
        assert torch.equal(sample(denoise, TOY, ours, seeds, shape, batch_size=3, progress=False),
                           modiff_samplers.sample(denoise, TOY, theirs, seeds, shape, batch_size=3, progress=False))
    ddpm = SamplerConfig.from_name("ddpm-uniform", 100)
    assert ddpm != SamplerConfig.from_name("ddpm-ldm-uniform", 100)
    out = sample(gaussian_oracle(2.5, 0.0, TOY), TOY, ddpm, seeds, shape, batch_size=4, progress=False)
    assert torch.equal(out, torch.ones_like(out))  # x0 = 2.5 at every step, clipped to 1: the last step lands there


def test_sampler_name_errors_list_the_new_sampler():
    with pytest.raises(ValueError) as err:
        SamplerConfig.from_name("ddpm-ldm", 10)
    assert "\n" not in str(err.value) and "ddpm-ldm-uniform" in str(err.value)
    with pytest.raises(ValueError, match="eta must be between 0"):
        SamplerConfig.from_name("ddpm-ldm-uniform", 10, 1.5)
    with pytest.raises(ValueError, match="steps must be between 1 and 100"):
        SamplerConfig.from_name("ddpm-ldm-uniform", 101).timesteps(TOY)


# -- the Table 5 preset -----------------------------------------------------------------------------------------
def test_table5_preset_ships_with_the_papers_setting_and_sampler():
    from bench.zoo.ldm import BEDROOM, schedule

    assert PRESET in presets()
    matrix = load_matrix(PRESET)
    cells = matrix.cells
    assert len(cells) == 1 + 3 * 2  # FP + the authors' LCQ x {alone, + MoDiff} x W8 x A8/A6/A4
    # seed 41 and batch 8: the authors' dynamic LSUN commands (issue 17)
    assert {(c.model, c.sampler, c.steps, c.eta, c.n_samples, c.seed, c.batch_size) for c in cells} == {
        ("ldm-bedroom", "ddpm-ldm-uniform", 1000, 0.0, 50_000, 41, 8)}
    assert {c.base for c in cells} == {"fp", "paper-lcq"}
    assert {(c.w_bits, c.a_bits, c.modulation) for c in cells if c.base == "paper-lcq"} == {
        (8, a, m) for a in (8, 6, 4) for m in ("off", "ec")}
    assert {"fid", "sfid"} <= set(matrix.metrics)
    config = SamplerConfig.from_name(cells[0].sampler, cells[0].steps, cells[0].eta)
    assert config.algorithm == "ddpm-ldm"  # x0 not clipped
    assert config.evaluation_timesteps(schedule(BEDROOM)) == list(reversed(range(1000)))


def test_table5_preset_dry_runs_without_weights(tmp_path, capsys):
    out = tmp_path / "bedroom-ddpm"
    assert main(["run", PRESET, "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "7 cells, " in printed and printed.count("ldm-bedroom ddpm-ldm-uniform 1000 steps") == 7
    assert not out.exists()


def test_table5_paper_numbers_stand_beside_the_paper_lcq_cells_and_none_is_invented():
    """reports/data/paper_lsun_ldm.csv (MoDiff paper Tables 2, 3 and 5) holds Table 5 as its sampler = ddpm
    rows: the report's "(paper)" lookup finds exactly them for the preset's LCQ cells, and nothing for its FP
    cell (Table 5 has no FP row)."""
    from importlib import resources

    from reports.tables import paper_table1_value

    with resources.files("reports.data").joinpath("paper_lsun_ldm.csv").open() as f:
        data = pd.read_csv(f, comment="#")
    table5 = data[(data.dataset == "lsun-bedroom") & (data.sampler == "ddpm")]
    assert len(table5) == 6
    for cell in load_matrix(PRESET).cells:
        for metric in ("fid", "sfid"):
            value = paper_table1_value(cell.model, cell.sampler, cell.steps, cell.w_bits, cell.a_bits, cell.base,
                                       cell.modulation, metric)
            if cell.base == "fp":
                assert value is None
                continue
            row = table5[(table5.a_bits == cell.a_bits) & (table5.base == "lcq")
                         & (table5.modulation == cell.modulation)]
            assert len(row) == 1 and value == pytest.approx(float(row[metric].iloc[0]))


def test_table5_preset_samples_through_the_runner_with_the_unclipped_sampler(digits_model, tmp_path, capsys):
    """The preset's settings, cut to the embedded digits model, one FP cell, 2 images and 4 steps: the runner
    stores exactly what ddpm-ldm-uniform samples for those seeds (not the clipping DDPM's images)."""
    out = tmp_path / "run"
    code = main(["run", PRESET, "--out", str(out), "--device", "cpu", "--no-progress",
                 "--set", "run.model='digits'", "--set", "steps=4", "--set", "run.n_samples=2",
                 "--set", "run.batch_size=2", "--set", "run.seed=0", "--set", 'matrix.base=["fp"]',
                 "--set", 'matrix.modulation=["off"]', "--set", "matrix.a_bits=[8]",
                 "--set", 'run.metrics=["mse_to_fp"]'])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 1 and (table.status == "ok").all() and table.sampler.iloc[0] == "ddpm-ldm-uniform"
    stored = torch.load(out / table.samples_file.iloc[0], weights_only=True)
    assert stored["seeds"] == [0, 1]
    args = (digits_model.denoiser(), digits_model.schedule)
    unclipped = sample(*args, SamplerConfig.from_name("ddpm-ldm-uniform", 4), [0, 1], digits_model.image_shape,
                       progress=False)
    clipped = sample(*args, SamplerConfig.from_name("ddpm-uniform", 4), [0, 1], digits_model.image_shape,
                     progress=False)
    torch.testing.assert_close(stored["images"].float(), unclipped, atol=2e-3, rtol=2e-3)
    assert (stored["images"].float() - clipped).abs().max() > 1e-2
    assert json.loads((out / "run.json").read_text())["cells"]


def test_table5_numbers_stand_only_beside_the_unclipped_ddpm():
    """The "(paper)" column of Table 5 belongs to latent-diffusion's DDPM: not beside a clipping ddpm-* run,
    nor Table 3's DDIM numbers beside another DDIM grid."""
    from reports.tables import paper_table1_value

    assert paper_table1_value("ldm-bedroom", "ddpm-ldm-uniform", 1000, 8, 8, "paper-lcq", "ec", "fid") is not None
    assert paper_table1_value("ldm-bedroom", "ddpm-uniform", 1000, 8, 8, "paper-lcq", "ec", "fid") is None
    assert paper_table1_value("ldm-bedroom", "ddim-ldm", 200, 8, 8, "paper-lcq", "ec", "fid") is not None
    assert paper_table1_value("ldm-bedroom", "ddim-uniform", 200, 8, 8, "paper-lcq", "ec", "fid") is None
    # the authors' "LCQ" is one scale per batch tensor: the suite's per-channel lcq gets no paper number
    assert paper_table1_value("ldm-bedroom", "ddpm-ldm-uniform", 1000, 8, 8, "lcq", "ec", "fid") is None


def test_qdiff_calibration_follows_the_unclipped_ddpm():
    """The sampler lives in modiff.samplers, which Q-Diffusion's calibration and PTQD's statistics call:
    they sample with it too (it was first written in bench.samplers, where they would not have)."""
    from modiff import samplers as modiff_samplers

    config = modiff_samplers.SamplerConfig.from_name("ddpm-ldm-uniform", 4)
    denoise = gaussian_oracle(2.5, 0.0, TOY)
    out = modiff_samplers.sample(denoise, TOY, config, range(2), (1, 2, 2), batch_size=2, progress=False)
    assert float(out.min()) > 2.0  # unclipped: the data at 2.5, where the clipping DDPM ends at 1
    assert "ddpm-ldm" in modiff_samplers.ALGORITHMS
