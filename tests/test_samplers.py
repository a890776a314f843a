import pytest
import torch

from modiff.samplers import SAMPLER_NAMES, PerSampleNoise, SamplerConfig, sample
from modiff.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.linear()


def gaussian_oracle(mu: float, s: float, schedule: NoiseSchedule):
    """The exact eps-prediction for data ~ N(mu, s^2) per pixel:
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)."""
    ab_table = schedule._alpha_bar_ext.float()

    def denoise(x, t):
        ab = ab_table[t + 1].view(-1, *([1] * (x.dim() - 1)))
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)

    return denoise


def test_initial_noise_of_a_sample_is_independent_of_its_batch():
    alone = PerSampleNoise([42]).randn((1, 16, 16))
    in_batch = PerSampleNoise([3, 42, 7, 1000]).randn((1, 16, 16))
    other_batch = PerSampleNoise(list(range(40, 50))).randn((1, 16, 16))
    assert torch.equal(alone[0], in_batch[1])
    assert torch.equal(alone[0], other_batch[2])
    assert not torch.equal(in_batch[0], in_batch[1])


@pytest.mark.parametrize("name,steps,eta,rel", [
    ("ddim-uniform", 1000, 0.0, 0.02), ("ddim-uniform", 1000, 1.0, 0.02), ("ddpm-uniform", 1000, 0.0, 0.02),
    ("ddim-quad", 100, 0.0, 0.05), ("ddpm-quad", 100, 0.0, 0.05),
])
def test_samplers_reproduce_a_gaussian_under_its_exact_denoiser(name, steps, eta, rel):
    """With the exact denoiser of N(0.2, 0.3^2) data every sampler must return that law; coarse
    schedules under-disperse a little (eta = 1 over 100 uniform steps gives std 0.27), so the
    tight check uses all 1000 steps and the paper's quad-100 setting gets 5%."""
    mu, s = 0.2, 0.3
    config = SamplerConfig.from_name(name, steps, eta)
    x = sample(gaussian_oracle(mu, s, SCHEDULE), SCHEDULE, config, range(2000), (1, 4, 4),
               batch_size=2000, progress=False)
    assert x.mean().item() == pytest.approx(mu, abs=0.005)
    assert x.std().item() == pytest.approx(s, rel=rel)


@pytest.mark.parametrize("name,steps,eta,rel", [
    ("ddim-ldm", 500, 0.0, 0.02), ("ddim-ldm", 500, 1.0, 0.03), ("plms", 50, 0.0, 0.02),
    ("dpm-solver++", 99, 0.0, 0.02),
])
def test_ldm_and_dpm_solver_samplers_reproduce_a_gaussian_under_its_exact_denoiser(name, steps, eta, rel):
    """They end at t = 0 (alphas_cumprod[0]), whose law is N(0.2 sqrt(ab_0), ~0.3^2). DPM-Solver++
    on the time-uniform grid is the coarsest near t = 0: at 20 steps its last step (t = 100 -> 0)
    over-disperses this narrow law (std 0.33); tests/test_solvers.py checks its accuracy."""
    mu, s = 0.2, 0.3
    config = SamplerConfig.from_name(name, steps, eta)
    x = sample(gaussian_oracle(mu, s, SCHEDULE), SCHEDULE, config, range(2000), (1, 4, 4), batch_size=2000,
               progress=False)
    assert x.mean().item() == pytest.approx(mu, abs=0.005)
    assert x.std().item() == pytest.approx(s, rel=rel)


def test_every_registered_sampler_runs_its_grid_and_lands_on_the_exact_answer():
    """Every name builds a config that names itself, and on a toy 100-step schedule its sampler calls the network at
    exactly ``evaluation_timesteps`` (what the accounting counts): one call per step, PLMS one more (pseudo improved
    Euler), from the top of the grid down. With the exact denoiser of a point mass at c, x0 is c at every call and
    the noise prediction stays eps0 = (x_T - sqrt(ab_T) c) / sqrt(1 - ab_T), so every deterministic update (DDIM,
    PLMS's eps combinations, DPM-Solver++'s data prediction) ends on sqrt(ab_end) c + sqrt(1 - ab_end) eps0, and
    DDPM's clipped posterior mean on c itself at ab(-1) = 1. An unknown name is a one-line error listing them all."""
    schedule = NoiseSchedule.linear(1e-3, 0.2, num_train_timesteps=100)
    c, steps, seeds, shape = 0.37, 5, range(3), (1, 2, 2)  # 5 divides T: every grid has exactly 5 points
    assert len(set(SAMPLER_NAMES)) == len(SAMPLER_NAMES) >= 7
    for name in SAMPLER_NAMES:
        config = SamplerConfig.from_name(name, steps)
        assert config.name == name and config.steps == steps and config.eta == 0.0
        exact = gaussian_oracle(c, 0.0, schedule)
        calls = []

        def denoise(x, t, calls=calls, exact=exact):
            assert (t == t[0]).all() and x.shape == (len(seeds), *shape)
            calls.append(int(t[0]))
            return exact(x, t)

        x = sample(denoise, schedule, config, seeds, shape, batch_size=len(seeds), progress=False)
        grid = config.timesteps(schedule)
        assert calls == config.evaluation_timesteps(schedule), name
        assert len(grid) == steps and calls[0] == max(grid) <= 99, name
        assert len(calls) == steps + (1 if config.algorithm == "plms" else 0), name
        assert all(a >= b for a, b in zip(calls, calls[1:], strict=False)), name
        x_T = PerSampleNoise(list(seeds)).randn(shape)
        # the DDIM code base's grids end at alpha_bar(-1) = 1; latent-diffusion's and DPM-Solver's at t = 0
        t_end = -1 if name.endswith(("-uniform", "-quad")) else 0
        assert config.step_pairs(schedule)[-1][1] == t_end, name
        ab_T, ab_end = schedule.alpha_bar(calls[0]), schedule.alpha_bar(t_end)
        eps0 = (x_T - ab_T**0.5 * c) / (1 - ab_T) ** 0.5
        torch.testing.assert_close(x, ab_end**0.5 * c + (1 - ab_end) ** 0.5 * eps0, atol=1e-5, rtol=1e-5, msg=name)
    with pytest.raises(ValueError) as err:
        SamplerConfig.from_name("ddim-linear", steps)
    message = str(err.value)
    assert "\n" not in message and "unknown sampler 'ddim-linear'" in message
    assert all(name in message for name in SAMPLER_NAMES)


def test_ddim_eta0_ends_exactly_on_the_predicted_x0_of_a_point_mass():
    c = 0.37
    config = SamplerConfig.from_name("ddim-quad", 20)
    x = sample(gaussian_oracle(c, 0.0, SCHEDULE), SCHEDULE, config, range(8), (1, 2, 2), progress=False)
    assert torch.allclose(x, torch.full_like(x, c), atol=1e-5)


def test_batch_size_invariance_on_the_embedded_model(digits_model):
    denoiser = digits_model.denoiser()
    seeds = list(range(100, 164))
    for name, eta in (("ddim-quad", 0.0), ("ddpm-uniform", 0.0), ("ddim-quad", 0.5)):
        config = SamplerConfig.from_name(name, 10, eta)
        runs = {bs: sample(denoiser, digits_model.schedule, config, seeds, digits_model.image_shape,
                           batch_size=bs, progress=False) for bs in (1, 7, 64)}
        assert (runs[1] - runs[64]).abs().max() < 1e-4, name
        assert (runs[7] - runs[64]).abs().max() < 1e-4, name
        rerun = sample(denoiser, digits_model.schedule, config, seeds, digits_model.image_shape,
                       batch_size=7, progress=False)
        assert torch.equal(rerun, runs[7]), f"{name}: same batch composition must be bitwise identical"


def test_ddim_eta0_is_deterministic_and_eta_changes_the_result(digits_model):
    denoiser = digits_model.denoiser()
    args = (digits_model.schedule,)
    cfg0 = SamplerConfig.from_name("ddim-quad", 8, 0.0)
    a = sample(denoiser, *args, cfg0, range(4), digits_model.image_shape, progress=False)
    b = sample(denoiser, *args, cfg0, range(4), digits_model.image_shape, progress=False)
    c = sample(denoiser, *args, SamplerConfig.from_name("ddim-quad", 8, 1.0), range(4),
               digits_model.image_shape, progress=False)
    d = sample(denoiser, *args, cfg0, range(4, 8), digits_model.image_shape, progress=False)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    assert (a - d).abs().max() > 1e-2


def test_trajectory_hook_runs_once_per_batch_before_the_first_step():
    events = []

    def denoise(x, t):
        events.append("step")
        return torch.zeros_like(x)

    config = SamplerConfig.from_name("ddim-quad", 5)
    sample(denoise, SCHEDULE, config, range(10), (1, 2, 2), batch_size=4, progress=False,
           on_trajectory_start=lambda: events.append("reset"))
    assert events == (["reset"] + ["step"] * 5) * 3


@pytest.mark.parametrize("name,eta,match", [
    ("ddim-cosine", 0.0, "unknown sampler"), ("euler", 0.0, "unknown sampler"),
    ("ddim-quad", -0.1, "eta"), ("ddim-quad", 1.5, "eta"), ("ddim-quad", float("nan"), "eta"),
])
def test_bad_sampler_settings_rejected(name, eta, match):
    with pytest.raises(ValueError, match=match):
        SamplerConfig.from_name(name, 10, eta)
