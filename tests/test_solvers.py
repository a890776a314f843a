"""The samplers with their own conventions or several network evaluations per step: ddim-ldm,
plms, dpm-solver++ (grids, evaluation order, accuracy on an exact denoiser), MoDiff's state across
their evaluations on the digits model, and the baselines that depend on the evaluation order. Where
an algorithm is diffusers' too (DDIM, DDPM, PLMS, DPM-Solver++ up to order 2+1, v-prediction), the
scheduler's loop from the same per-sample generators gives the same samples."""

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverSinglestepScheduler, PNDMScheduler

import modiff
from baselines.deepcache.method import DeepCacheMethod
from baselines.ptqd import collect_statistics
from baselines.ptqd.method import PTQD
from baselines.qdiffusion import calibration
from bench.methods import BuildContext, CellSpec, Prepared
from modiff.samplers import (
    SAMPLER_NAMES,
    PerSampleNoise,
    SamplerConfig,
    _dpm_solver_pp,
    dpm_solver_orders,
    epsilon_denoiser,
    sample,
)
from modiff.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.linear()
T = SCHEDULE.num_train_timesteps
NEW = ("ddim-ldm", "plms", "dpm-solver++")
STEPS = 8  # on the digits model: dpm-solver++ runs steps of order 3, 3, 2; plms 9 evaluations
SEEDS = range(6)


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_oracle(mu: float, s: float, dtype=torch.float32):
    """The exact eps-prediction for data ~ N(mu, s^2) per pixel."""
    ab_table = SCHEDULE._alpha_bar_ext.to(dtype)

    def denoise(x, t):
        ab = ab_table[t + 1].view(-1, *([1] * (x.dim() - 1)))
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)

    return denoise


def exact_solution(x_start: torch.Tensor, t_start: int, t_end: int, mu: float, s: float) -> torch.Tensor:
    """The probability-flow ODE of Gaussian data keeps the standardised noise z constant:
    x_t = sqrt(ab_t) mu + sqrt(ab_t s^2 + 1 - ab_t) z."""
    a0, a1 = SCHEDULE.alpha_bar(t_start), SCHEDULE.alpha_bar(t_end)
    z = (x_start.double() - math.sqrt(a0) * mu) / math.sqrt(a0 * s * s + 1 - a0)
    return math.sqrt(a1) * mu + math.sqrt(a1 * s * s + 1 - a1) * z


def ode_error(name: str, steps: int, mu: float, s: float, n: int = 256) -> float:
    """Mean |sample - exact ODE solution from the same x_T|, over n samples of 4x4 pixels."""
    config = SamplerConfig.from_name(name, steps)
    shape = (1, 4, 4)
    out = sample(gaussian_oracle(mu, s), SCHEDULE, config, range(n), shape, batch_size=n, progress=False)
    start = config.evaluation_timesteps(SCHEDULE)[0]
    end = config.step_pairs(SCHEDULE)[-1][1]
    exact = exact_solution(PerSampleNoise(range(n)).randn(shape), start, end, mu, s)
    return float((out.double() - exact).abs().mean())


def run_scheduler(scheduler, steps: int, denoise, seeds, shape, **step_kwargs) -> tuple[torch.Tensor, list[int]]:
    """A diffusers scheduler's sampling loop from our per-sample initial noise. A stochastic scheduler draws its
    fresh noise from the same per-sample generators (``generator=[...]``, one per row, as a pipeline's
    ``generator`` list), after the initial noise: the streams our samplers draw."""
    scheduler.set_timesteps(steps)
    noise = PerSampleNoise(seeds)
    x = noise.randn(shape)
    if isinstance(scheduler, (DDIMScheduler, DDPMScheduler)):
        step_kwargs = {"generator": noise.generators, **step_kwargs}
    called = []
    for t in scheduler.timesteps:
        called.append(int(t))
        x = scheduler.step(denoise(x, torch.full((x.shape[0],), int(t))), t, x, **step_kwargs).prev_sample
    return x, called


# -- grids, evaluation order, settings ------------------------------------------------------------
@pytest.mark.parametrize("name,steps", [*((n, 8) for n in SAMPLER_NAMES), ("ddim-uniform", 30), ("plms", 1),
                                        ("plms", 7), ("dpm-solver++", 20), ("dpm-solver++", 1)])
def test_evaluation_timesteps_are_exactly_the_denoiser_calls(name, steps):
    """What the runner's warm-up and per-evaluation trace rely on; the trajectory hook runs once
    per batch, before the first evaluation."""
    config = SamplerConfig.from_name(name, steps)
    events = []

    def denoise(x, t):
        assert t.dtype == torch.long and len(set(t.tolist())) == 1
        events.append(int(t[0]))
        return torch.zeros_like(x)

    sample(denoise, SCHEDULE, config, range(5), (1, 2, 2), batch_size=3, progress=False,
           on_trajectory_start=lambda: events.append("start"))
    evals = config.evaluation_timesteps(SCHEDULE)
    assert events == (["start"] + evals) * 2
    assert evals[0] == config.timesteps(SCHEDULE)[-1]  # the first evaluation is at the largest timestep
    expected = {"plms": len(config.timesteps(SCHEDULE)) + 1}.get(name, len(config.timesteps(SCHEDULE)))
    assert len(evals) == expected


@pytest.mark.parametrize("steps", [20, 50, 200, 400, 7])
def test_ddim_ldm_uses_latent_diffusions_timesteps_and_alphas(steps):
    """make_ddim_timesteps("uniform") and make_ddim_sampling_parameters of latent-diffusion."""
    ddim_timesteps = np.asarray(list(range(0, T, T // steps))) + 1
    alphacums = np.cumprod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float64))
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    for name in ("ddim-ldm", "plms"):
        config = SamplerConfig.from_name(name, steps)
        assert config.timesteps(SCHEDULE) == ddim_timesteps.tolist()
        pairs = config.step_pairs(SCHEDULE)  # sampling order: latent-diffusion's np.flip
        assert [SCHEDULE.alpha_bar(t) for t, _ in pairs] == pytest.approx(alphas[::-1].tolist(), rel=1e-12)
        assert [SCHEDULE.alpha_bar(p) for _, p in pairs] == pytest.approx(alphas_prev[::-1].tolist(), rel=1e-12)
    assert SamplerConfig.from_name("ddim-ldm", steps).evaluation_timesteps(SCHEDULE) == ddim_timesteps[::-1].tolist()


@pytest.mark.parametrize("steps", [3, 300, 999, 1000])
def test_ldm_grids_that_run_past_T_are_refused(steps):
    """range(0, 1000, T // steps) + 1 reaches 1000 when T // steps divides 999 (latent-diffusion
    indexes past its schedule there)."""
    for name in ("ddim-ldm", "plms"):
        with pytest.raises(ValueError, match="latent-diffusion"):
            SamplerConfig.from_name(name, steps).timesteps(SCHEDULE)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_ldm_reproduces_latent_diffusions_ddim_loop(eta):
    """p_sample_ddim with latent-diffusion's alphas, alphas_prev and sigmas (eta as in DDIM)."""
    steps, seeds, shape = 25, range(16), (1, 3, 3)
    denoise = gaussian_oracle(0.2, 0.3)
    ddim_timesteps = np.asarray(list(range(0, T, T // steps))) + 1
    alphacums = np.cumprod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float64))
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    noise = PerSampleNoise(seeds)
    x = noise.randn(shape)
    for index in reversed(range(len(ddim_timesteps))):
        a_t, a_prev, sigma = alphas[index], alphas_prev[index], sigmas[index]
        e_t = denoise(x, torch.full((len(seeds),), int(ddim_timesteps[index])))
        pred_x0 = (x - math.sqrt(1 - a_t) * e_t) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev - sigma**2) * e_t
        if sigma > 0:
            x = x + sigma * noise.randn(shape)
    ours = sample(denoise, SCHEDULE, SamplerConfig.from_name("ddim-ldm", steps, eta), seeds, shape, progress=False)
    assert torch.allclose(ours, x, atol=1e-5)


@pytest.mark.parametrize("steps", [20, 50])
def test_plms_is_diffusers_pndm_with_stable_diffusions_settings(steps):
    """latent-diffusion's PLMS equals PNDMScheduler(skip_prk_steps=True, steps_offset=1,
    set_alpha_to_one=False) when steps divides T: same evaluations (steps + 1), same result up to
    diffusers' float32 alphas."""
    seeds, shape, denoise = range(32), (1, 4, 4), gaussian_oracle(0.3, 0.5)
    scheduler = PNDMScheduler(trained_betas=SCHEDULE.betas.numpy(), skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    reference, called = run_scheduler(scheduler, steps, denoise, seeds, shape)
    config = SamplerConfig.from_name("plms", steps)
    assert config.evaluation_timesteps(SCHEDULE) == called and len(called) == steps + 1
    assert torch.allclose(sample(denoise, SCHEDULE, config, seeds, shape, progress=False), reference, atol=1e-4)


def _ddim_scheduler(name: str, **kw) -> DDIMScheduler:
    """diffusers' DDIM with our grid's convention: the DDIM code base's (``ddim-uniform``: offset 0, last step to
    alpha_bar = 1) or latent-diffusion's (``ddim-ldm``: offset 1, last step to alphas_cumprod[0], Stable
    Diffusion's settings); never clipping x0, as neither does."""
    ldm = name == "ddim-ldm"
    return DDIMScheduler(trained_betas=SCHEDULE.betas.numpy(), clip_sample=False, timestep_spacing="leading",
                         steps_offset=1 if ldm else 0, set_alpha_to_one=not ldm, **kw)


@pytest.mark.parametrize("name", ["ddim-uniform", "ddim-ldm"])
@pytest.mark.parametrize("steps,eta", [(10, 0.0), (50, 0.0), (10, 1.0), (25, 0.5)])
def test_ddim_is_diffusers_ddim_scheduler(name, steps, eta):
    """Same grid (when ``steps`` divides T: with a remainder our uniform grid keeps the DDIM code base's extra
    entries), same update, and for eta > 0 the same noise: diffusers draws each row's noise from that row's
    generator, after the initial noise, as our per-sample streams do. Equal up to diffusers' float32 alphas."""
    seeds, shape, denoise = range(32), (1, 4, 4), gaussian_oracle(0.3, 0.5)
    reference, called = run_scheduler(_ddim_scheduler(name), steps, denoise, seeds, shape, eta=eta)
    config = SamplerConfig.from_name(name, steps, eta)
    assert config.evaluation_timesteps(SCHEDULE) == called and len(called) == steps
    ours = sample(denoise, SCHEDULE, config, seeds, shape, progress=False)
    assert torch.allclose(ours, reference, atol=1e-4), float((ours - reference).abs().max())
    if eta > 0:  # the noise is matched, not merely of the same law: another stream gives another sample
        other = sample(denoise, SCHEDULE, config, range(100, 132), shape, progress=False)
        assert (other - reference).abs().max() > 0.1


@pytest.mark.parametrize("steps", [10, 100, 1000])
@pytest.mark.parametrize("name,clip,variance", [("ddpm-uniform", True, "fixed_large"),
                                                ("ddpm-ldm-uniform", False, "fixed_small")])
def test_ddpm_is_diffusers_ddpm_scheduler(name, clip, variance, steps):
    """``ddpm-uniform`` (the DDIM code base's ddpm_steps: x0 clipped to [-1, 1], variance beta_t) is
    ``DDPMScheduler(clip_sample=True, variance_type="fixed_large")``; ``ddpm-ldm-uniform`` (latent-diffusion: x0
    unclipped, posterior variance) is ``clip_sample=False, variance_type="fixed_small"``. On a respaced grid both
    take beta_t = 1 - alpha_bar_t / alpha_bar_prev and add no noise after the last step; diffusers draws no noise
    there, we draw and drop it, so the streams stay aligned. N(0.3, 0.5^2) data puts x0 predictions outside [-1, 1],
    so clipping is exercised."""
    seeds, shape, denoise = range(32), (1, 4, 4), gaussian_oracle(0.3, 0.5)
    scheduler = DDPMScheduler(trained_betas=SCHEDULE.betas.numpy(), clip_sample=clip, variance_type=variance,
                              timestep_spacing="leading")
    reference, called = run_scheduler(scheduler, steps, denoise, seeds, shape)
    config = SamplerConfig.from_name(name, steps)
    assert config.evaluation_timesteps(SCHEDULE) == called
    ours = sample(denoise, SCHEDULE, config, seeds, shape, progress=False)
    assert torch.allclose(ours, reference, atol=1e-4), float((ours - reference).abs().max())
    other = {"ddpm-uniform": "ddpm-ldm-uniform", "ddpm-ldm-uniform": "ddpm-uniform"}[name]
    assert (sample(denoise, SCHEDULE, SamplerConfig.from_name(other, steps), seeds, shape, progress=False)
            - reference).abs().max() > 1e-2  # the two DDPMs are told apart


def v_oracle(mu: float, s: float):
    """The exact v-prediction of N(mu, s^2) data: v = sqrt(ab) eps - sqrt(1 - ab) x0, with x0 the prediction
    that goes with the exact eps."""
    eps_of = gaussian_oracle(mu, s)
    ab_table = SCHEDULE._alpha_bar_ext.float()

    def denoise(x, t):
        ab = ab_table[t + 1].view(-1, *([1] * (x.dim() - 1)))
        eps = eps_of(x, t)
        return ab.sqrt() * eps - (1 - ab).sqrt() * (x - (1 - ab).sqrt() * eps) / ab.sqrt()

    return denoise


@pytest.mark.parametrize("name,eta", [("ddim-ldm", 0.0), ("ddim-ldm", 1.0), ("ddim-uniform", 0.0), ("plms", 0.0),
                                      ("dpm-solver++", 0.0), ("ddpm-uniform", 0.0)])
def test_a_v_prediction_model_samples_as_its_noise_prediction(name, eta):
    """``prediction_type="v_prediction"`` turns v into eps exactly, so every sampler gives the samples of the
    matching noise prediction; and DDIM on it is diffusers' DDIMScheduler(prediction_type="v_prediction")."""
    seeds, shape, steps = range(16), (1, 3, 3), 20
    config = SamplerConfig.from_name(name, steps, eta)
    eps_samples = sample(gaussian_oracle(0.3, 0.5), SCHEDULE, config, seeds, shape, progress=False)
    v_samples = sample(v_oracle(0.3, 0.5), SCHEDULE, config, seeds, shape, progress=False,
                       prediction_type="v_prediction")
    assert torch.allclose(v_samples, eps_samples, atol=1e-4), float((v_samples - eps_samples).abs().max())
    read_as_eps = sample(v_oracle(0.3, 0.5), SCHEDULE, config, seeds, shape, progress=False)
    assert (read_as_eps - eps_samples).abs().max() > 0.1  # without the option the v model is misread
    if name.startswith("ddim"):
        scheduler = _ddim_scheduler(name, prediction_type="v_prediction")
        reference, _ = run_scheduler(scheduler, steps, v_oracle(0.3, 0.5), seeds, shape, eta=eta)
        assert torch.allclose(v_samples, reference, atol=1e-4), float((v_samples - reference).abs().max())


@pytest.mark.parametrize("prediction_type", ["sample", "v-prediction", "eps"])
def test_an_unknown_prediction_type_is_one_line(prediction_type):
    config = SamplerConfig.from_name("ddim-ldm", 5)
    with pytest.raises(ValueError) as err:
        sample(gaussian_oracle(0.0, 1.0), SCHEDULE, config, range(2), (1, 2, 2), progress=False,
               prediction_type=prediction_type)
    message = str(err.value)
    assert "\n" not in message and f"unknown prediction_type {prediction_type!r}" in message
    assert "epsilon" in message and "v_prediction" in message
    with pytest.raises(ValueError, match="unknown prediction_type"):
        epsilon_denoiser(gaussian_oracle(0.0, 1.0), SCHEDULE, prediction_type)


def test_plms_with_one_step_evaluates_twice_at_its_timestep_as_latent_diffusion():
    assert SamplerConfig.from_name("plms", 1).evaluation_timesteps(SCHEDULE) == [1, 1]


def test_dpm_solver_grid_and_order_split():
    """The integer timesteps are diffusers' DPMSolverSinglestepScheduler's; the split into steps of
    order 3, ..., 3 and a lower-order tail is LuChengTHU/dpm-solver's singlestep one."""
    scheduler = DPMSolverSinglestepScheduler(trained_betas=SCHEDULE.betas.numpy(), solver_order=3,
                                             lower_order_final=True, final_sigmas_type="sigma_min")
    for steps in (20, 7, 50, 999):
        scheduler.set_timesteps(steps)
        config = SamplerConfig.from_name("dpm-solver++", steps)
        assert config.evaluation_timesteps(SCHEDULE) == scheduler.timesteps.tolist()
        assert config.step_pairs(SCHEDULE)[-1] == (config.timesteps(SCHEDULE)[0], 0)  # ends at t_0 = 1/N
    assert dpm_solver_orders(20) == [3] * 6 + [2]
    assert dpm_solver_orders(21) == [3] * 6 + [2, 1]
    assert dpm_solver_orders(22) == [3] * 7 + [1]
    assert (dpm_solver_orders(1), dpm_solver_orders(2), dpm_solver_orders(3)) == ([1], [2], [2, 1])
    with pytest.raises(ValueError, match="between 1 and 999"):
        SamplerConfig.from_name("dpm-solver++", 1000).timesteps(SCHEDULE)


@pytest.mark.parametrize("name", ["plms", "dpm-solver++"])
def test_deterministic_solvers_reject_eta(name):
    with pytest.raises(ValueError, match="deterministic: eta must be 0"):
        SamplerConfig.from_name(name, 20, 0.5)
    assert SamplerConfig.from_name(name, 20).name == name
    assert SamplerConfig.from_name("ddim-ldm", 20, 0.5).name == "ddim-ldm"


def test_dpm_solver_equals_diffusers_where_the_two_algorithms_coincide():
    """Up to 3 steps (orders 1, 2, 2+1) diffusers' scheduler (midpoint) is the same algorithm. Its
    third-order steps predict their second intermediate point differently from the reference code
    (which this sampler follows), so at 20 steps the two differ a little."""
    seeds, shape, denoise = range(32), (1, 4, 4), gaussian_oracle(0.3, 0.5)
    for steps in (1, 2, 3, 20):
        scheduler = DPMSolverSinglestepScheduler(trained_betas=SCHEDULE.betas.numpy(), solver_order=3,
                                                 algorithm_type="dpmsolver++", lower_order_final=True,
                                                 final_sigmas_type="sigma_min")
        reference, _ = run_scheduler(scheduler, steps, denoise, seeds, shape)
        ours = sample(denoise, SCHEDULE, SamplerConfig.from_name("dpm-solver++", steps), seeds, shape,
                      progress=False)
        difference = float((ours - reference).abs().max())
        if steps <= 3:
            assert difference < 1e-4, steps
        else:
            assert 1e-4 < difference < 1e-2


@pytest.mark.parametrize("order,ratio", [(1, 0.3), (2, 0.16), (3, 0.085)])
def test_dpm_solver_steps_have_local_error_of_order_k_plus_1(order, ratio):
    """One solver step of order k started on the exact trajectory of Gaussian data: halving its
    span divides the error by about 2^(k+1) (4, 8, 16)."""
    mu, s = 0.3, 0.5
    denoise = gaussian_oracle(mu, s, torch.float64)
    z = torch.randn(512, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for span in (48, 96, 192):
        grid = [600 - span * k // order for k in range(order + 1)]
        ab = SCHEDULE.alpha_bar(grid[0])
        x = math.sqrt(ab) * mu + math.sqrt(ab * s * s + 1 - ab) * z  # on the exact trajectory
        out = _dpm_solver_pp(lambda x, t: denoise(x, torch.full((x.shape[0],), t)), x, SCHEDULE,
                             list(zip(grid[:-1], grid[1:], strict=True)), orders=[order])
        errors.append(float((out - exact_solution(x, grid[0], grid[-1], mu, s)).abs().max()))
    assert errors[0] / errors[1] < ratio and errors[1] / errors[2] < ratio, errors


@pytest.mark.parametrize("name", NEW)
def test_a_point_mass_is_reached_exactly(name):
    """Data at one point: the x0 prediction is constant along the ODE, so DDIM, every PLMS
    combination of eps (weights summing to 1) and every DPM-Solver++ order are exact."""
    assert ode_error(name, 10, 0.37, 0.0, n=16) < 1e-5


def test_high_order_solvers_land_closer_to_the_exact_sample_than_ddim():
    """Gaussian data N(0.3, 0.5^2), the exact ODE solution from the same x_T as the reference.
    Measured mean errors: ddim-ldm 5.2e-2 (20 steps) / 2.2e-2 (50), dpm-solver++ 2.4e-2 (20; its
    last, second-order step spans t = 100 -> 0 of the time-uniform grid) / 2.4e-4 (40), plms
    1.3e-3 (20) / 2.6e-4 (50)."""
    mu, s = 0.3, 0.5
    err = {(name, steps): ode_error(name, steps, mu, s) for name, steps in (
        ("ddim-ldm", 20), ("ddim-ldm", 50), ("dpm-solver++", 20), ("dpm-solver++", 40), ("plms", 20), ("plms", 50))}
    print({f"{n}@{k}": f"{v:.2e}" for (n, k), v in err.items()})
    assert err["dpm-solver++", 20] < 0.6 * err["ddim-ldm", 20] and err["dpm-solver++", 20] < 0.03
    assert err["dpm-solver++", 40] < err["dpm-solver++", 20] / 8
    assert err["plms", 20] < err["ddim-ldm", 20] / 10
    assert err["plms", 50] < err["ddim-ldm", 50] / 20 and err["plms", 50] < 1e-3


# -- MoDiff's state across the evaluations, on the digits model -----------------------------------
def quantized(model, **kw):
    return modiff.quantize(copy.deepcopy(model.unet), modiff.ModiffConfig(**kw))


def run(model, unet, name, seeds=SEEDS, batch_size=3, reset_every_evaluation=False, record=None):
    inner = model.denoiser(unet)

    def denoise(x, t):
        if reset_every_evaluation:  # the authors' CIFAR-10 bug, per evaluation
            modiff.reset(unet)
        eps = inner(x, t)
        if record is not None:
            record.append(eps)
        return eps

    return sample(denoise, model.schedule, SamplerConfig.from_name(name, STEPS), seeds, model.image_shape,
                  batch_size=batch_size, progress=False, on_trajectory_start=lambda: modiff.reset(unet))


@pytest.fixture(scope="module")
def fp_samples(digits_model):
    return {name: run(digits_model, digits_model.unet, name) for name in NEW}


@pytest.mark.parametrize("name", NEW)
def test_modiff_at_32_bits_is_the_full_precision_model(digits_model, fp_samples, name):
    unet = quantized(digits_model, w_bits=32, a_bits=32, modulation="ec")
    assert (run(digits_model, unet, name) - fp_samples[name]).abs().max() < 1e-4


@pytest.mark.parametrize("name", NEW)
def test_modiff_state_follows_the_evaluations_and_is_reset_once_per_batch(digits_model, fp_samples, name):
    """Every layer warms up once per batch (2 batches) and runs a residual at every later
    evaluation, intermediate ones included. A reset at every evaluation would make every call a
    full-precision warm-up: at W32 that is exactly the full-precision model."""
    unet = quantized(digits_model, w_bits=32, a_bits=8, modulation="ec")
    n_eval = len(SamplerConfig.from_name(name, STEPS).evaluation_timesteps(digits_model.schedule))
    counts = {}

    def count(module, inputs):
        calls, warmups = counts.get(module.name, (0, 0))
        counts[module.name] = (calls + 1, warmups + (module.reconstruction is None))

    layers = modiff.quant_layers(unet)
    handles = [layer.register_forward_pre_hook(count) for layer in layers]
    try:
        out = run(digits_model, unet, name)
    finally:
        for handle in handles:
            handle.remove()
    assert len(counts) == len(layers)
    assert set(counts.values()) == {(2 * n_eval, 2)}
    for layer in layers:  # the counters since the last reset: the second batch
        assert (layer.warmup_calls, layer.residual_calls) == (1, n_eval - 1), layer.name
    fp = fp_samples[name]
    assert 1e-3 < (out - fp).abs().max() and (out - fp).abs().mean() < 0.05
    buggy = run(digits_model, unet, name, reset_every_evaluation=True)
    assert (buggy - fp).abs().max() < 1e-5


@pytest.mark.parametrize("name", NEW)
def test_zero_bit_residuals_return_the_warmup_output_at_every_evaluation(digits_model, name):
    unet = quantized(digits_model, w_bits=8, a_bits=0, modulation="ec")
    outputs = []
    run(digits_model, unet, name, seeds=range(3), record=outputs)
    assert len(outputs) == len(SamplerConfig.from_name(name, STEPS).evaluation_timesteps(digits_model.schedule))
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])


@pytest.mark.parametrize("name", NEW)
def test_a_full_precision_image_does_not_depend_on_the_batch_it_was_sampled_in(digits_model, name):
    runs = {bs: run(digits_model, digits_model.unet, name, seeds=range(5), batch_size=bs) for bs in (1, 2, 5)}
    assert (runs[1] - runs[5]).abs().max() < 1e-4
    assert (runs[2] - runs[5]).abs().max() < 1e-4


@pytest.mark.parametrize("name", NEW)
def test_with_per_sample_scales_an_image_does_not_see_the_rest_of_its_batch(digits_model, name):
    """psq (granularity "sample", MoDiff state per sample): seed 0's image is the same whatever its
    companions and its position in a batch of the same size (bitwise here); with channel-wise
    scales it is not. Across batch sizes it moves only by rounding flips: batched convolutions
    round differently, and a 1e-7 change that crosses a boundary of the 8-bit grid moves a value
    by a whole step (measured mean |diff| 2e-3 to 2e-2 at 8 steps, as with ddim-quad)."""
    def image_of_seed_0(unet, seeds):
        return run(digits_model, unet, name, seeds=seeds, batch_size=len(seeds))[list(seeds).index(0)]

    psq = quantized(digits_model, w_bits=8, a_bits=8, modulation="ec", granularity="sample")
    lcq = quantized(digits_model, w_bits=8, a_bits=8, modulation="ec", granularity="channel")
    alone = {bs: image_of_seed_0(psq, [0, *range(10, 9 + bs)]) for bs in (1, 4)}
    for seeds in ([0, 1, 2, 3], [5, 6, 0, 7]):
        assert (image_of_seed_0(psq, seeds) - alone[4]).abs().max() < 1e-6
    assert (image_of_seed_0(lcq, [0, 1, 2, 3]) - image_of_seed_0(lcq, [0, 10, 11, 12])).abs().max() > 1e-4
    assert (alone[1] - alone[4]).abs().mean() < 0.03


# -- the baselines ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["plms", "dpm-solver++"])
def test_qdiffusion_calibration_keeps_the_inputs_of_each_evaluation(digits_model, name):
    """Calibration steps are evaluation indices spread over all evaluations (plms at 6 steps: a
    7-entry grid, 8 evaluations), each with its input and its timestep."""
    config = SamplerConfig.from_name(name, 6)
    evals = config.evaluation_timesteps(digits_model.schedule)
    denoise = digits_model.denoiser()
    data = calibration.collect(denoise, digits_model.schedule, config, 3, range(4), digits_model.image_shape, 2)
    seen = []
    sample(lambda x, t: seen.append(x.clone()) or denoise(x, t), digits_model.schedule, config, range(4),
           digits_model.image_shape, batch_size=2, progress=False)
    assert len(seen) == 2 * len(evals)
    assert data.steps == calibration.calibration_steps(len(evals), 3)
    assert sorted(data.x) == sorted({*data.steps, *(i - 1 for i in data.steps if i > 0)})
    assert 1 in data.x  # plms: the first step's second evaluation (at the next timestep, on the Euler guess)
    for i, x in data.x.items():
        assert data.t[i] == evals[i]
        assert torch.equal(x, torch.cat([seen[i], seen[len(evals) + i]]))


def _cell(sampler, steps=6, **kw):
    fields = {"model": "digits", "checkpoint": None, "sampler": sampler, "steps": steps, "eta": 0.0,
              "n_samples": 3, "seed": 0, "batch_size": 3, "base": "ptqd", "modulation": "off", "cache": "none",
              "w_bits": 8, "a_bits": 8, "a_granularity": "auto"}
    return CellSpec(**{**fields, **kw})


def test_ptqd_skips_multi_evaluation_solvers_and_keeps_ddim_ldm():
    ptqd = PTQD({"base": "ltq"})
    for name in ("plms", "dpm-solver++"):
        reason = ptqd.check(ptqd.normalise(_cell(name)))
        assert isinstance(reason, str) and "DDIM/DDPM" in reason and name in reason
    assert ptqd.check(ptqd.normalise(_cell("ddim-ldm"))) is None
    with pytest.raises(ValueError, match="DDIM/DDPM"):
        collect_statistics(gaussian_oracle(0.0, 1.0), gaussian_oracle(0.0, 1.0), SCHEDULE,
                           SamplerConfig.from_name("plms", 5), range(2), (1, 2, 2), 2)


def test_ptqd_statistics_follow_the_ddim_ldm_trajectory():
    """The full-precision trajectory PTQD calibrates on is ddim-ldm's, noise stream included."""
    config, seeds, shape = SamplerConfig.from_name("ddim-ldm", 10, eta=1.0), range(6), (1, 3, 3)
    fp = gaussian_oracle(0.1, 0.4)
    inputs = []

    def q_denoiser(x, t):
        inputs.append((x.clone(), int(t[0])))
        return 1.2 * fp(x, t)

    stats = collect_statistics(fp, q_denoiser, SCHEDULE, config, seeds, shape, 3)
    assert stats.timesteps == config.evaluation_timesteps(SCHEDULE)
    assert stats.k.sub(0.2).abs().max() < 1e-6  # eps_Q - eps_FP = 0.2 eps_FP
    reference = []
    sample(lambda x, t: reference.append((x.clone(), int(t[0]))) or fp(x, t), SCHEDULE, config, seeds, shape,
           batch_size=3, progress=False)
    assert len(inputs) == len(reference) == 2 * 10
    for (x, t), (x_ref, t_ref) in zip(inputs, reference, strict=True):
        assert t == t_ref and torch.equal(x, x_ref)


@pytest.mark.parametrize("name,steps,n_eval,full", [("plms", 4, 5, [0, 2]), ("dpm-solver++", 4, 4, [0, 2]),
                                                     ("plms", 6, 8, [0, 2, 4])])
def test_deepcache_picks_full_passes_by_evaluation_index(digits_model, name, steps, n_eval, full):
    """deepcache-u2: full passes at evaluations 0, 2, ... < steps (DeepCache's interval_seq over its
    loop index); PLMS's extra evaluations are partial (plms at 6 steps: 7 grid entries, 8
    evaluations); the MAC share averages the evaluations actually run."""
    sampler = SamplerConfig.from_name(name, steps)
    assert len(sampler.evaluation_timesteps(digits_model.schedule)) == n_eval
    cell = _cell(name, steps, base="fp", cache="deepcache-u2", w_bits=32, a_bits=32, a_granularity="none")
    ctx = BuildContext(digits_model, cell, sampler, torch.device("cpu"))
    prepared = DeepCacheMethod("deepcache-u2").apply(ctx, Prepared(unet=digits_model.unet))
    assert prepared.unet is not digits_model.unet
    inner = prepared.denoiser()
    index, ran_deep = {"i": -1}, []
    handle = prepared.unet.mid_block.resnets[0].register_forward_hook(lambda *_: ran_deep.append(index["i"]))

    def denoise(x, t):
        index["i"] += 1
        return inner(x, t)

    def start():
        index["i"] = -1
        prepared.start_trajectory()

    try:
        out = sample(denoise, digits_model.schedule, sampler, range(3), digits_model.image_shape, 3, progress=False,
                     on_trajectory_start=start)
    finally:
        handle.remove()
    assert index["i"] == n_eval - 1 and ran_deep == full and out.isfinite().all()
    f, p = prepared.info["macs_full_g"], prepared.info["macs_partial_g"]
    expected = (len(full) * f + (n_eval - len(full)) * p) / (n_eval * f)
    assert prepared.mac_fraction == pytest.approx(expected, rel=1e-9)
