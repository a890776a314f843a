"""A quantized model notices a new trajectory from its timestep argument and never silently mixes two.

Before: the QuantLayers never saw the timestep; a second ``pipe(...)`` call without ``modiff.reset`` started from
the first call's state (measured: digits DDIMPipeline, W8A4 ec, 10 steps, 32.5 dB with the reset and 21.6 dB
without it on the second call), with no warning."""

import copy
import inspect

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
)

import modiff
from modiff.api import TrajectoryWatch, timestep_value
from modiff.samplers import SamplerConfig, sample_batch

CONFIG = modiff.ModiffConfig(w_bits=8, a_bits=4, modulation="ec", granularity="sample")
SEEDS = [3, 4]


def _quantized(digits_model, mode="reset"):
    return modiff.quantize(copy.deepcopy(digits_model.unet), CONFIG, new_trajectory=mode)


def _ours(digits_model, unet, sampler="ddim-uniform", steps=6, reset=False):
    with torch.no_grad():
        return sample_batch(lambda x, t: unet(x, t).sample, digits_model.schedule,
                            SamplerConfig.from_name(sampler, steps), SEEDS, digits_model.image_shape,
                            on_trajectory_start=(lambda: modiff.reset(unet)) if reset else None)


def _warmups(unet) -> set[int]:
    return {layer.warmup_calls for layer in modiff.quant_layers(unet)}


@pytest.mark.parametrize("sampler", ["ddim-uniform", "ddpm-uniform", "plms", "dpm-solver++"])
def test_our_samplers_twice_without_a_reset_equal_the_reset_runs(digits_model, sampler):
    """PLMS and DPM-Solver++ evaluate the network more than once per step (equal or repeated timesteps): one
    warm-up per trajectory, never one per evaluation."""
    explicit = _quantized(digits_model, "ignore")
    expected = _ours(digits_model, explicit, sampler, reset=True)
    watched = _quantized(digits_model)
    first = _ours(digits_model, watched, sampler)
    assert _warmups(watched) == {1}
    second = _ours(digits_model, watched, sampler)
    assert _warmups(watched) == {1}  # reset (which zeroes the counters), then one warm-up
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_without_detection_the_second_run_is_silently_different(digits_model):
    """What ``new_trajectory="ignore"`` keeps (the old behaviour): the state carries over."""
    unet = _quantized(digits_model, "ignore")
    first, second = _ours(digits_model, unet), _ours(digits_model, unet)
    assert not torch.equal(first, second)


def test_raise_mode_refuses_a_new_trajectory_until_the_caller_resets(digits_model):
    unet = _quantized(digits_model, "raise")
    first = _ours(digits_model, unet)
    for _ in range(2):  # calling again without the reset raises again
        with pytest.raises(ValueError, match=r"new trajectory \(timestep .* without modiff.reset") as info:
            _ours(digits_model, unet)
        assert "\n" not in str(info.value)
    with modiff.trajectory(unet):
        again = _ours(digits_model, unet)
    assert torch.equal(first, again)


def _diffusers_run(unet, scheduler, shape, steps=4):
    scheduler.set_timesteps(steps)
    x = torch.randn(len(SEEDS), *shape, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    stochastic = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": torch.Generator().manual_seed(1)} if stochastic else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(eps, t, x, **extra).prev_sample
    return x


@pytest.mark.parametrize("make", [
    lambda: DDIMScheduler(), lambda: DDPMScheduler(), lambda: PNDMScheduler(),
    lambda: PNDMScheduler(skip_prk_steps=True), lambda: DPMSolverMultistepScheduler(), lambda: HeunDiscreteScheduler(),
], ids=["ddim", "ddpm", "pndm-prk", "plms", "dpm-solver++", "heun"])
def test_diffusers_schedulers_get_one_warmup_per_call(digits_model, make):
    """diffusers' schedulers pass 0-dim integer or float timesteps; PNDM and Heun repeat them."""
    explicit = _quantized(digits_model, "ignore")
    with modiff.trajectory(explicit):
        expected = _diffusers_run(explicit, make(), digits_model.image_shape)
    watched = _quantized(digits_model)
    for _ in range(2):
        got = _diffusers_run(watched, make(), digits_model.image_shape)
        assert _warmups(watched) == {1}
        assert torch.equal(got, expected)


@pytest.mark.parametrize(("args", "kwargs", "expected"), [
    ((None, 5), {}, 5.0),
    ((None, 2.5), {}, 2.5),
    ((None, torch.tensor(7)), {}, 7.0),
    ((None, torch.tensor([3, 9, 9])), {}, 9.0),
    ((None,), {"timestep": torch.tensor(981.0)}, 981.0),
    ((None,), {"timesteps": 4}, 4.0),
    ((None,), {"t": torch.tensor([12])}, 12.0),
    ((None,), {}, None),
    ((None, torch.zeros(2, 3, 4)), {}, None),  # e.g. encoder states passed positionally: not a timestep
    ((None, True), {}, None),
])
def test_the_timestep_is_read_from_the_usual_arguments(args, kwargs, expected):
    assert timestep_value(args, kwargs) == expected


def test_a_copy_watches_its_own_trajectories(digits_model):
    unet = _quantized(digits_model)
    _ours(digits_model, unet)
    twin = copy.deepcopy(unet)
    hooks = [h for h in twin._forward_pre_hooks.values() if isinstance(h, TrajectoryWatch)]
    assert len(hooks) == 1 and hooks[0] is not next(h for h in unet._forward_pre_hooks.values()
                                                    if isinstance(h, TrajectoryWatch))
    assert torch.equal(_ours(digits_model, twin), _ours(digits_model, unet))


def test_watch_trajectories_replaces_the_watch_and_checks_the_mode(digits_model):
    unet = _quantized(digits_model)
    modiff.watch_trajectories(unet, "raise")
    assert [h.mode for h in unet._forward_pre_hooks.values() if isinstance(h, TrajectoryWatch)] == ["raise"]
    modiff.watch_trajectories(unet, "ignore")
    assert not any(isinstance(h, TrajectoryWatch) for h in unet._forward_pre_hooks.values())
    with pytest.raises(ValueError, match="new_trajectory must be one of reset, raise, ignore; got 'sometimes'"):
        modiff.quantize(copy.deepcopy(digits_model.unet), CONFIG, new_trajectory="sometimes")
