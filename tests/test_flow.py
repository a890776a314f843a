"""The flow-matching samplers (``modiff.flow``): the sigmas and timesteps of diffusers'
FlowMatchEulerDiscreteScheduler for SD3's and FLUX's configs, the samples of a loop driving its
``step`` (and FlowMatchHeunDiscreteScheduler's) from the same per-sample noise, the sign convention
on exact velocities, MoDiff's identities and trajectory detection along a flow trajectory on a tiny
random SD3 transformer, and the one-line errors."""

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, SD3Transformer2DModel
from torch import nn

import modiff
from modiff.flow import FlowSchedule, flow_evaluation_timesteps, sample_flow, sample_flow_batch
from modiff.samplers import PerSampleNoise

pytestmark = pytest.mark.usefixtures("one_thread")

# the scheduler configs of the real checkpoints (scheduler/scheduler_config.json)
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
       "num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHNELL = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
                "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
FLUX_DEV = {**FLUX_SCHNELL, "shift": 3.0, "use_dynamic_shifting": True}
CONFIGS = {"sd3": SD3, "flux-schnell": FLUX_SCHNELL, "flux-dev": FLUX_DEV,
           "linear-shift": {**FLUX_DEV, "time_shift_type": "linear"}}
SHAPE = (4, 8, 8)


def scheduler_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def mu_for(schedule: FlowSchedule, image_seq_len: int = 1024):
    return schedule.mu(image_seq_len) if schedule.use_dynamic_shifting else None


def diffusers_sigmas(spacing: str, steps: int):
    return np.linspace(1.0, 1 / steps, steps) if spacing == "flux" else None


# -- (a) the grid


# the sequence length (FLUX at 256, 512 and 1024 px) only matters with dynamic shifting
GRID_CASES = [(name, n) for name, config in CONFIGS.items()
              for n in ((256, 1024, 4096) if config.get("use_dynamic_shifting") else (1024,))]


@pytest.mark.parametrize("name, image_seq_len", GRID_CASES)
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("spacing", ["scheduler", "flux"])
def test_sigmas_and_timesteps_are_diffusers(name, image_seq_len, steps, spacing):
    config = CONFIGS[name]
    schedule = FlowSchedule.from_config(config)
    mu = mu_for(schedule, image_seq_len)
    scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_kwargs(config))
    scheduler.set_timesteps(steps, mu=mu, sigmas=diffusers_sigmas(spacing, steps))
    sigmas, timesteps = schedule.grid(steps, mu, spacing)
    assert sigmas.dtype == timesteps.dtype == torch.float32
    assert sigmas.shape == (steps + 1,) and timesteps.shape == (steps,)
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(timesteps, scheduler.timesteps, rtol=1e-6, atol=1e-4)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())


def test_mu_is_the_pipelines_line_through_base_and_max_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    schedule = FlowSchedule.from_config(FLUX_DEV)
    assert schedule.mu(256) == pytest.approx(0.5) and schedule.mu(4096) == pytest.approx(1.15)
    for n in (1, 256, 1024, 4096, 8192):  # FLUX at 512 px: (512 // 16) ** 2 = 1024 tokens
        assert schedule.mu(n) == pytest.approx(calculate_shift(n, 256, 4096, 0.5, 1.15), rel=1e-12)
    assert FlowSchedule(base_shift=0.2, max_shift=2.0, base_image_seq_len=16, max_image_seq_len=64).mu(40) \
        == pytest.approx(calculate_shift(40, 16, 64, 0.2, 2.0))


def test_the_static_shift_moves_the_grid_towards_noise():
    """SD3's shift 3 spends more steps at high sigma than no shift; and the scheduler grid's last sigma is the
    smallest training sigma shifted twice (diffusers' own order), which the flux grid does not do."""
    plain = FlowSchedule.from_config(FLUX_SCHNELL).grid(10)[0]
    shifted = FlowSchedule.from_config(SD3).grid(10)[0]
    assert bool((shifted[1:-1] > plain[1:-1]).all())
    once = 3 * 0.001 / (1 + 2 * 0.001)
    assert shifted[-2].item() == pytest.approx(3 * once / (1 + 2 * once), rel=1e-5)


def test_a_real_scheduler_config_round_trips():
    """``scheduler.config`` lists every key, the unused options at their off values: all accepted."""
    for config in CONFIGS.values():
        scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_kwargs(config))
        assert FlowSchedule.from_config(dict(scheduler.config)) == FlowSchedule.from_config(config)
    heun = FlowMatchHeunDiscreteScheduler(shift=3.0)
    assert FlowSchedule.from_config(dict(heun.config)) == FlowSchedule(shift=3.0)


# -- (b) the samples


class TinyVelocity(nn.Module):
    """A random velocity model with a (hidden_states, timestep) forward: a conv of x modulated by an embedding
    of the float timestep."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.time = nn.Linear(2, channels)

    def forward(self, hidden_states, timestep):
        s = timestep.float() / 1000
        emb = self.time(torch.stack([torch.sin(3 * s), torch.cos(3 * s)], dim=1))[:, :, None, None]
        return self.conv(torch.tanh(hidden_states)) * (1 + emb) + emb


@pytest.fixture(scope="module")
def tiny_velocity():
    torch.manual_seed(0)
    return TinyVelocity().eval()


def diffusers_loop(scheduler, velocity, x, steps, **set_timesteps):
    scheduler.set_timesteps(steps, **set_timesteps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(velocity(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("steps", [1, 5, 28])
@pytest.mark.parametrize("spacing", ["scheduler", "flux"])
def test_euler_samples_are_diffusers_scheduler_loop(tiny_velocity, name, steps, spacing):
    config = CONFIGS[name]
    schedule = FlowSchedule.from_config(config)
    mu = mu_for(schedule)
    seeds = [3, 1, 4]
    ours = sample_flow(tiny_velocity, schedule, steps, seeds, SHAPE, mu=mu, spacing=spacing)
    scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_kwargs(config))
    theirs = diffusers_loop(scheduler, tiny_velocity, PerSampleNoise(seeds).randn(SHAPE), steps,
                            mu=mu, sigmas=diffusers_sigmas(spacing, steps))
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 10])
def test_heun_samples_are_diffusers_heun_scheduler_loop(tiny_velocity, shift, steps):
    schedule = FlowSchedule(shift=shift)
    seeds = [0, 7]
    calls = []

    def recording(x, t):
        calls.append(float(t[0]))
        return tiny_velocity(x, t)

    ours = sample_flow(recording, schedule, steps, seeds, SHAPE, solver="heun")
    scheduler = FlowMatchHeunDiscreteScheduler(shift=shift)
    theirs = diffusers_loop(scheduler, tiny_velocity, PerSampleNoise(seeds).randn(SHAPE), steps)
    # diffusers turns the second velocity into a denoised sample and back, (x - (x - v sigma)) / sigma in float32,
    # which loses about ulp(x) / sigma: 1e-4 at the smallest sigma (0.001 at 2 steps without shift)
    smallest = schedule.grid(steps)[0][-2].item()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 + 2e-7 / smallest)
    assert len(calls) == 2 * steps - 1
    assert calls == pytest.approx(scheduler.timesteps.tolist(), abs=1e-3)
    assert calls == pytest.approx(flow_evaluation_timesteps(schedule, steps, solver="heun"), abs=0)


def test_the_velocity_gets_float_timesteps_of_the_batch_size(tiny_velocity):
    seen = []

    def recording(x, t):
        seen.append((t.dtype, tuple(t.shape), t.tolist()))
        return tiny_velocity(x, t)

    schedule = FlowSchedule.from_config(SD3)
    sample_flow(recording, schedule, 4, range(5), SHAPE, batch_size=2)
    assert [shape for _, shape, _ in seen] == [(2,)] * 8 + [(1,)] * 4
    assert {dtype for dtype, _, _ in seen} == {torch.float32}
    expected = flow_evaluation_timesteps(schedule, 4)
    assert [ts[0] for _, _, ts in seen[:4]] == expected and expected[0] == 1000.0
    assert all(len(set(ts)) == 1 for _, _, ts in seen)


def gaussian_velocity(m: float, s: float):
    """The exact velocity E[noise - x0 | x_sigma] for data ~ N(m, s^2) per element, x_sigma = (1 - sigma) x0 +
    sigma noise; s = 0 is a point mass at m."""

    def velocity(x, t):
        sigma = (t.double() / 1000).view(-1, *([1] * (x.dim() - 1)))
        var = (1 - sigma) ** 2 * s**2 + sigma**2
        centred = x.double() - (1 - sigma) * m
        return ((sigma - (1 - sigma) * s**2) * centred / var - m).float()

    return velocity


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 3, 20])
def test_a_point_mass_is_reached_exactly_which_fixes_the_sign_convention(solver, steps):
    """With data at m, v = (x - m) / sigma and every Euler step scales x - m by sigma_next / sigma: the
    last step (to sigma = 0) lands on m. The opposite sign would blow up instead."""
    out = sample_flow(gaussian_velocity(0.7, 0.0), FlowSchedule(shift=3.0), steps, range(4), SHAPE, solver=solver)
    assert (out - 0.7).abs().max() < 1e-5


def test_heun_is_second_order_on_gaussian_data():
    """The probability-flow ODE of Gaussian data keeps z = (x - (1 - sigma) m) / sqrt((1 - sigma)^2 s^2 +
    sigma^2) constant, so the exact sample is m + s z(1). Halving the step divides Euler's error by about 2 and
    Heun's by about 4."""
    m, s = 0.5, 0.3
    z = PerSampleNoise(range(4)).randn(SHAPE).double()
    exact = m + s * z
    schedule = FlowSchedule(shift=1.0)
    errors = {(solver, steps): (sample_flow(gaussian_velocity(m, s), schedule, steps, range(4), SHAPE,
                                            solver=solver, spacing="flux").double() - exact).abs().max().item()
              for solver in ("euler", "heun") for steps in (8, 16)}
    assert 1.6 < errors["euler", 8] / errors["euler", 16] < 2.5
    assert 3.0 < errors["heun", 8] / errors["heun", 16] < 5.0
    assert errors["heun", 16] < errors["euler", 16] / 5


def test_a_sample_does_not_depend_on_its_batch(tiny_velocity):
    schedule = FlowSchedule.from_config(FLUX_DEV)
    runs = [sample_flow(tiny_velocity, schedule, 4, range(5), SHAPE, mu=schedule.mu(64), batch_size=bs)
            for bs in (1, 2, 5)]
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=0, atol=1e-6)
    assert torch.equal(sample_flow_batch(tiny_velocity, schedule, 4, [2], SHAPE, mu=schedule.mu(64)), runs[0][2:3])


def test_hooks_run_once_per_batch_before_the_first_evaluation(tiny_velocity):
    events = []

    def velocity(x, t):
        events.append("v")
        return tiny_velocity(x, t)

    sample_flow(velocity, FlowSchedule(), 2, range(3), SHAPE, batch_size=2, solver="heun",
                on_batch=lambda seeds: events.append(tuple(seeds)), on_trajectory_start=lambda: events.append("reset"))
    assert events == [(0, 1), "reset", "v", "v", "v", (2,), "reset", "v", "v", "v"]


# -- (c) MoDiff along a flow trajectory, on a tiny random SD3 transformer


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8).eval()


def sd3_velocity(model, record=None):
    """The model as SD3's pipeline calls it: keyword ``timestep`` (float, shape (batch,)), fixed stand-in text
    conditioning."""
    g = torch.Generator().manual_seed(1)
    context, pooled = torch.randn(1, 3, 16, generator=g), torch.randn(1, 8, generator=g)

    def velocity(x, t):
        n = x.shape[0]
        v = model(hidden_states=x, encoder_hidden_states=context.expand(n, -1, -1),
                  pooled_projections=pooled.expand(n, -1), timestep=t).sample
        if record is not None:
            record.append(v)
        return v

    return velocity


SD3_SCHEDULE = FlowSchedule.from_config(SD3)
STEPS = 6


def run_sd3(model, solver="euler", record=None, seeds=range(3), **kwargs):
    return sample_flow(sd3_velocity(model, record), SD3_SCHEDULE, STEPS, seeds, SHAPE, solver=solver, **kwargs)


def quantized(model, new_trajectory="reset", **config):
    return modiff.quantize(copy.deepcopy(model), modiff.ModiffConfig(**config), new_trajectory=new_trajectory)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_modiff_at_32_bits_is_the_full_precision_flow_model(sd3, solver):
    fp = run_sd3(sd3, solver)
    model = quantized(sd3, w_bits=32, a_bits=32, modulation="ec")
    out = run_sd3(model, solver)
    assert (fp - PerSampleNoise(range(3)).randn(SHAPE)).abs().mean() > 0.1  # the model moves the samples
    torch.testing.assert_close(out, fp, rtol=0, atol=1e-4)
    n_eval = len(flow_evaluation_timesteps(SD3_SCHEDULE, STEPS, solver=solver))
    for layer in modiff.quant_layers(model):  # the residual path ran: one warm-up, then residuals
        assert (layer.warmup_calls, layer.residual_calls) == (1, n_eval - 1), layer.name


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_zero_bit_residuals_return_the_warmup_velocity_at_every_later_evaluation(sd3, solver):
    outputs = []
    run_sd3(quantized(sd3, w_bits=8, a_bits=0, modulation="ec"), solver, record=outputs)
    assert len(outputs) == len(flow_evaluation_timesteps(SD3_SCHEDULE, STEPS, solver=solver))
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])
    moving = []
    run_sd3(quantized(sd3, w_bits=8, a_bits=8, modulation="ec"), solver, record=moving)
    assert (moving[-1] - moving[0]).abs().max() > 1e-3  # with residuals the velocity changes


def test_a_residual_tolerance_above_every_residual_is_caching(sd3):
    cached = run_sd3(quantized(sd3, w_bits=8, a_bits=0, modulation="ec"))
    model = quantized(sd3, w_bits=8, a_bits=8, modulation="ec", residual_tolerance=1e9)
    torch.testing.assert_close(run_sd3(model), cached, rtol=0, atol=1e-6)
    assert all(reused == checked > 0 for reused, checked in modiff.reused_samples(model).values())


def test_a_second_sampling_run_without_reset_is_detected_from_the_float_timestep(sd3):
    """The model's TrajectoryWatch reads the keyword ``timestep`` (float sigma * 1000): it goes from about
    2 at the end of one run to 1000 at the start of the next, so the state is reset and the second run equals
    the first. Without the watch the second run starts from the first one's state and differs."""
    model = quantized(sd3, w_bits=8, a_bits=4, modulation="ec")
    first, second = run_sd3(model), run_sd3(model)
    assert torch.equal(first, second)
    for layer in modiff.quant_layers(model):
        assert (layer.warmup_calls, layer.residual_calls) == (1, STEPS - 1), layer.name
    unwatched = quantized(sd3, new_trajectory="ignore", w_bits=8, a_bits=4, modulation="ec")
    assert torch.equal(run_sd3(unwatched), first)
    assert (run_sd3(unwatched) - first).abs().max() > 1e-3


# -- (d) one-line errors, before any work


def never(x, t):
    raise AssertionError("the velocity must not be called")


def one_line(match: str, call):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("config, match", [
    ({"shift": 3.0, "foo": 1}, "unknown flow scheduler config key 'foo'"),
    ({"_class_name": "DDIMScheduler"}, "_class_name 'DDIMScheduler'"),
    ({"use_karras_sigmas": True}, "use_karras_sigmas=True"),
    ({"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ({"use_beta_sigmas": True}, "use_beta_sigmas"),
    ({"invert_sigmas": True}, "invert_sigmas"),
    ({"shift_terminal": 0.1}, "shift_terminal=0.1"),
    ({"stochastic_sampling": True}, "stochastic_sampling"),
    ({"time_shift_type": "cubic"}, "time_shift_type"),
    ({"shift": 0}, "shift must be"),
    ({"shift": float("nan")}, "shift must be"),
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"use_dynamic_shifting": "yes"}, "use_dynamic_shifting"),
    ({"max_image_seq_len": 100}, "max_image_seq_len"),
    ({"base_shift": "low"}, "base_shift"),
])
def test_config_mistakes_are_one_line(config, match):
    one_line(match, lambda: FlowSchedule.from_config(config))


def test_off_values_of_unsupported_options_are_accepted():
    off = {"invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False, "stochastic_sampling": False}
    assert FlowSchedule.from_config({**SD3, **off}) == FlowSchedule(shift=3.0)
    assert FlowSchedule.from_config({"shift_terminal": 0.0}) == FlowSchedule()  # diffusers reads 0 as off


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"steps": True}, "steps must be an integer"),
    ({"seeds": [0, -1]}, "seed must be an integer in \\[0, 2\\^64 - 1\\], got -1"),
    ({"seeds": [2**64]}, "got 18446744073709551616"),
    ({"seeds": [1.5]}, "got 1.5"),
    ({"seeds": [True]}, "got True"),
    ({"shape": (4, 0, 8)}, "shape"),
    ({"shape": ()}, "shape"),
    ({"solver": "rk4"}, "solver must be one of euler, heun"),
    ({"spacing": "karras"}, "spacing must be one of scheduler, flux"),
    ({"batch_size": 0}, "batch size"),
    ({"mu": 0.8}, "mu=0.8 is given but the schedule has use_dynamic_shifting=false"),
    ({"schedule": FlowSchedule(use_dynamic_shifting=True)}, "mu is required"),
    ({"schedule": FlowSchedule(use_dynamic_shifting=True), "mu": float("nan")}, "mu must be a finite number"),
    ({"schedule": FlowSchedule(use_dynamic_shifting=True, time_shift_type="linear"), "mu": 0.0}, "mu must be > 0"),
    ({"schedule": {"shift": 3.0}}, "schedule must be a FlowSchedule"),
])
def test_sampling_mistakes_are_one_line_before_any_evaluation(kwargs, match):
    settings = {"schedule": FlowSchedule(shift=3.0), "steps": 4, "seeds": [0, 1], "shape": SHAPE, **kwargs}
    one_line(match, lambda: sample_flow(never, **settings))


def test_mu_and_empty_batches_are_checked():
    one_line("image_seq_len must be an integer >= 1", lambda: FlowSchedule().mu(0))
    one_line("needs base_shift and max_shift", lambda: FlowSchedule(base_shift=None).mu(64))
    one_line("at least one seed", lambda: sample_flow_batch(never, FlowSchedule(), 2, [], SHAPE))
    assert sample_flow(never, FlowSchedule(), 2, [], SHAPE).shape == (0, *SHAPE)


def test_the_dynamic_shifts_at_their_neutral_mu_leave_the_grid_unshifted():
    """mu / (mu + 1/s - 1) is s at mu = 1, e^mu / (e^mu + 1/s - 1) is s at mu = 0: the grid is the unshifted one."""
    plain = FlowSchedule().grid(7)
    for time_shift_type, mu in (("linear", 1.0), ("exponential", 0.0)):
        shifted = FlowSchedule(use_dynamic_shifting=True, time_shift_type=time_shift_type).grid(7, mu=mu)
        torch.testing.assert_close(shifted, plain, rtol=1e-6, atol=1e-7)
    assert math.isclose(plain[0][3].item(), 1 - 3 * (1 - 0.001) / 6, rel_tol=1e-6)


# -- the harness's sampler interface (FlowSamplerConfig over a FlowGrid) -----------------------------------------------


def test_flow_sampler_config_is_the_library_over_a_grid():
    from modiff.flow import FlowGrid, FlowSamplerConfig
    from modiff.schedules import NoiseSchedule

    schedule = FlowSchedule.from_config(FLUX_DEV)
    grid = FlowGrid(schedule, "flux", schedule.mu(4096))
    for name, solver in (("flow-euler", "euler"), ("flow-heun", "heun")):
        sampler = FlowSamplerConfig.from_name(name, 4)
        assert sampler.name == sampler.algorithm == name and sampler.steps == 4 and sampler.eta == 0.0
        assert sampler.evaluation_timesteps(grid) == flow_evaluation_timesteps(schedule, 4, grid.mu, solver, "flux")
        assert sampler.timesteps(grid) == sorted(schedule.grid(4, grid.mu, "flux")[1].tolist())

        def velocity(x, t):
            return 0.1 * x + t.view(-1, 1, 1, 1) / 1000

        expected = sample_flow(velocity, schedule, 4, [3, 4], SHAPE, mu=grid.mu, solver=solver, spacing="flux")
        assert torch.equal(sampler.sample(velocity, grid, [3, 4], SHAPE, batch_size=1), expected)
    assert grid.num_train_timesteps == 1000
    with pytest.raises(ValueError, match="mu is required"):
        FlowGrid(schedule, "flux")
    with pytest.raises(ValueError, match="spacing"):
        FlowGrid(FlowSchedule.from_config(SD3), "karras")
    with pytest.raises(ValueError, match="unknown flow sampler 'ddim-quad'"):
        FlowSamplerConfig.from_name("ddim-quad", 4)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        FlowSamplerConfig.from_name("flow-heun", 0)
    with pytest.raises(ValueError, match="flow-heun is deterministic"):
        FlowSamplerConfig.from_name("flow-heun", 4, 0.1)
    with pytest.raises(ValueError, match="this model has a NoiseSchedule: use a DDPM-family sampler"):
        FlowSamplerConfig.from_name("flow-euler", 4).timesteps(NoiseSchedule.linear())
