"""DeepCache on diffusers UNets: identity at N = 1, what a partial step runs, schedules, MACs, harness; on an
unconditional UNet and on a text-conditioned one (a tiny random UNet2DConditionModel behind the SD entry's prompt
conditioning and classifier-free guidance)."""

import math

import pandas as pd
import pytest
import torch
from torch import nn

from baselines.deepcache import DeepCache, nonuniform_full_steps, uniform_full_steps
from baselines.deepcache.method import DeepCacheMethod, macs_full_and_partial, model_kind
from bench.errors import BenchError
from bench.matrix import load_matrix
from bench.runner import Runner
from bench.zoo import ZooModel
from bench.zoo.architectures import DDPM_CIFAR10_32, build_random_unet


@pytest.fixture()
def unet(digits_model):
    import copy

    return copy.deepcopy(digits_model.unet)


def _inputs(n=3, shape=(1, 16, 16), t=500):
    g = torch.Generator().manual_seed(0)
    return torch.randn((n, *shape), generator=g), torch.full((n,), t, dtype=torch.long)


def test_full_steps_equal_the_plain_unet_exactly(unet):
    x, t = _inputs()
    with torch.no_grad():
        plain = unet(x, t).sample
        cache = DeepCache(unet, branch=0)
        hooked = unet(x, t).sample
    assert torch.equal(plain, hooked) and cache.cached is not None
    cache.remove()
    assert not cache.cache_block._forward_pre_hooks


def test_scheduled_runs_the_listed_calls_in_full_and_restarts_on_reset(unet):
    """``cache.scheduled(fn, full)``: what the harness wraps its denoiser with and docs/pipelines.md wraps
    ``pipe.unet.forward`` with; calls counted from 0 since the last reset."""
    cache = DeepCache(unet, branch=0)
    x, t = _inputs()
    seen = []

    def forward(x, t):
        seen.append(cache._partial)
        return unet(x, t).sample

    call = cache.scheduled(forward, uniform_full_steps(7, 3))
    with torch.no_grad():
        outputs = [call(x, t) for _ in range(7)]
        assert seen == [False, True, True, False, True, True, False]
        assert cache.calls == 7 and torch.equal(outputs[4], outputs[1])  # partial steps reuse the cached feature
        cache.reset()
        assert cache.calls == 0 and cache.cached is None
        call(x, t)
    assert seen[-1] is False and cache.cached is not None  # after a reset the first call runs in full
    cache.remove()


@pytest.mark.parametrize("branch", [0, 1, 2])
def test_a_partial_step_runs_only_the_shallow_blocks(unet, branch):
    n = len(unet.down_blocks)
    cache = DeepCache(unet, branch=branch)
    called = []
    handles = [m.register_forward_hook(lambda mod, a, o, name=name: called.append(name))
               for name, m in unet.named_modules() if isinstance(m, nn.Conv2d)]
    x, t = _inputs()
    with torch.no_grad():
        unet(x, t)
        full = list(called)
        called.clear()
        with cache.partial():
            out = unet(x, t).sample
    for h in handles:
        h.remove()
    skipped = [f"down_blocks.{i}." for i in range(branch + 1, n)] + ["mid_block."] + \
              [f"up_blocks.{i}." for i in range(n - 1 - branch)]
    assert not [c for c in called if any(c.startswith(s) for s in skipped)], called
    ran = [f"down_blocks.{i}." for i in range(branch + 1)] + [f"up_blocks.{i}." for i in range(n - 1 - branch, n)]
    for prefix in ran + ["conv_in", "conv_out"]:
        assert any(c.startswith(prefix) for c in called), prefix
    assert len(called) < len(full) and out.shape == x.shape and out.isfinite().all()
    # the cached feature is reused: the partial output differs from a full pass on new inputs
    x2, t2 = _inputs(t=300)
    with torch.no_grad():
        full2 = unet(x2, t2).sample
        unet(x, t)  # refill the cache from the first inputs
        with cache.partial():
            partial2 = unet(x2, t2).sample
    assert not torch.allclose(full2, partial2)


def test_schedules_have_exactly_ceil_T_over_N_full_steps():
    assert uniform_full_steps(10, 3) == [0, 3, 6, 9]
    for steps in (10, 25, 50, 100, 250):
        assert nonuniform_full_steps(steps, 1) == list(range(steps))  # N = 1: every step, as DeepCache's pipelines
        for interval in (2, 3, 5, 10):
            for center, power in ((None, 1.2), (round(0.3 * steps), 1.4), (0, 1.5)):
                try:
                    full = nonuniform_full_steps(steps, interval, center, power)
                except ValueError as exc:  # DeepCache's own search finds no power either (see below)
                    assert "no power in (1, " in str(exc), exc
                    continue
                assert len(full) == math.ceil(steps / interval) == len(set(full)), (steps, interval, center, power)
                assert full[0] == 0 and full == sorted(full) and full[-1] <= steps - 1
    # clustered around the centre: gaps near it are no wider than gaps at the ends
    full = nonuniform_full_steps(100, 5, center=50)
    gaps = [b - a for a, b in zip(full, full[1:], strict=False)]
    middle = gaps[len(gaps) // 2]
    assert middle <= gaps[0] and middle <= gaps[-1] and min(gaps) < max(gaps)
    with pytest.raises(ValueError, match="center must be a step index"):
        nonuniform_full_steps(10, 2, center=20)
    with pytest.raises(ValueError, match="power must be > 1"):
        nonuniform_full_steps(10, 2, power=1.0)
    # 25 full steps of 50 around step 25: no p in (1, 1.2] gives 25 distinct indices (nor does DeepCache's code)
    with pytest.raises(ValueError, match="no power in"):
        nonuniform_full_steps(50, 2, center=25, power=1.2)


@pytest.mark.parametrize("steps,interval,center,power,expected", [
    # issue 17's values: DeepCache's sample_from_quad_center(T, ceil(T / N), c, p)
    (100, 10, 50, 1.4, [0, 12, 22, 32, 41, 50, 59, 68, 78, 88]),
    (100, 10, 50, 1.2, [0, 11, 22, 32, 42, 50, 58, 68, 78, 89]),
    (100, 20, 50, 1.2, [0, 22, 42, 58, 78]),
    (100, 5, 40, 1.2, [0, 6, 11, 16, 21, 26, 30, 35, 39, 42, 47, 52, 56, 61, 66, 72, 77, 82, 88, 94]),
    # DeepCache's stable_diffusion.py: 50 steps, cache_interval 5, center 15, pow 1.4
    (50, 5, 15, 1.4, [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]),
    # its LDM script: sample_from_quad(250, 25, pow=1.5), the centred schedule at c = 0
    (250, 10, 0, 1.5, [0, 1, 5, 10, 15, 22, 29, 37, 45, 53, 63, 72, 83, 93, 104, 116, 127, 140, 152, 165, 178,
                       192, 206, 220, 235]),
])
def test_nonuniform_schedule_is_deepcaches(steps, interval, center, power, expected):
    """The complex-valued points, the truncation of their real part and the dropped ends of DeepCache's code."""
    assert nonuniform_full_steps(steps, interval, center, power) == expected


def test_nonuniform_defaults_follow_deepcaches_pipelines(digits_model, tiny_sd):
    method = DeepCacheMethod("deepcache-nu5")
    assert method.schedule_settings(50, "text-to-image") == (15, 1.4)  # stable_diffusion.py
    assert method.schedule_settings(250, "latent") == (0, 1.5)  # the LDM script's sample_from_quad
    assert method.schedule_settings(100, "pixel") == (50, 1.2)  # sample_from_quad_center's own default, middle
    assert method.full_steps(50, "text-to-image") == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    assert method.full_steps(100) == nonuniform_full_steps(100, 5, 50, 1.2)
    assert DeepCacheMethod("deepcache-nu5", {"center": 10, "power": 1.3}).schedule_settings(50, "latent") == (10, 1.3)
    assert DeepCacheMethod("deepcache-u5").full_steps(50, "text-to-image") == list(range(0, 50, 5))
    for bad in ({"power": 1.0}, {"power": 0.5}, {"center": -1}):
        with pytest.raises(BenchError):
            DeepCacheMethod("deepcache-nu5", bad)
    assert model_kind(digits_model) == "pixel"
    assert model_kind(ZooModel("l", digits_model.unet, digits_model.schedule, (1, 16, 16), "ddim", 10,
                               decoder=lambda x: x)) == "latent"
    assert model_kind(tiny_sd()) == "text-to-image"
    # a cell whose schedule cannot be built is a one-line error, before anything runs
    from bench.build import build, resolve_cell
    from bench.methods import CellSpec

    cell = CellSpec(model="digits", checkpoint=None, sampler="ddim-quad", steps=50, eta=0.0, n_samples=1, seed=0,
                    batch_size=1, base="fp", modulation="off", cache="deepcache-nu2", w_bits=32, a_bits=32,
                    a_granularity="none")
    with pytest.raises(BenchError, match="deepcache-nu2: .*no power in"):
        build(resolve_cell(cell), digits_model, torch.device("cpu"))


def test_partial_steps_cost_fewer_macs_on_the_cifar10_architecture():
    unet = build_random_unet(DDPM_CIFAR10_32).eval()
    cache = DeepCache(unet, branch=1)
    full, partial = macs_full_and_partial(unet, cache, (3, 32, 32), "cpu")
    assert 0 < partial < full
    assert full / 1e9 == pytest.approx(6.1, rel=0.05)  # DeepCache's baseline: 6.1 G MACs per step


def test_cache_names_parse_and_bad_ones_are_one_line_errors():
    assert DeepCacheMethod("deepcache-u3").interval == 3 and DeepCacheMethod("deepcache-u3").uniform
    assert not DeepCacheMethod("deepcache-nu5").uniform
    for bad in ("deepcache", "deepcache-x3", "deepcache-u0", "deepcache-uu"):
        with pytest.raises(BenchError, match="deepcache-u<N>"):
            DeepCacheMethod(bad)


def test_deepcache_cells_in_a_matrix(tmp_path, digits_model):
    matrix = load_matrix("smoke", ["steps=12", "matrix.cache=['none','deepcache-u1','deepcache-u3']",
                                   "matrix.modulation=['off','ec']", "run.metrics=['psnr_to_fp']"])
    summary = Runner(matrix, tmp_path, device="cpu", progress=False, log=lambda s: None).run()
    assert not summary.failed
    table = pd.read_csv(tmp_path / "results.csv").set_index("method")
    assert table.loc["fp+deepcache-u1", "psnr_to_fp"] == float("inf")  # N = 1 is the plain UNet
    assert table.loc["lcq+ec+deepcache-u1", "psnr_to_fp"] == table.loc["lcq+ec", "psnr_to_fp"]
    assert table.loc["fp+deepcache-u3", "macs_g"] < table.loc["fp", "macs_g"]
    assert table.loc["lcq+ec+deepcache-u3", "gbops"] < table.loc["lcq+ec", "gbops"]
    assert 20 < table.loc["fp+deepcache-u3", "psnr_to_fp"] < float("inf")
    # the shared full-precision model was never hooked
    assert all(not block._forward_pre_hooks for block in digits_model.unet.up_blocks)


# ------------------------------------------------------------------ a text-conditioned UNet (Stable Diffusion's kind)


def test_macs_of_a_conditional_unet(tiny_sd):
    """Issue 17: the MACs were counted on ``unet(x, t)`` without ``encoder_hidden_states``, so every SD cell with
    DeepCache raised."""
    from bench.generate import count_model_macs

    model = tiny_sd()
    cache = DeepCache(model.unet, branch=0)
    full, partial = macs_full_and_partial(model.unet, cache, model.image_shape, "cpu")  # the UNet alone
    assert 0 < partial < full
    full, partial = macs_full_and_partial(model.unet, cache, model.image_shape, "cpu", model)  # its denoiser
    assert 0 < partial < full
    # on the scale of the cell's macs_g: one guided denoiser call (the doubled batch) per image
    assert full == count_model_macs(model, torch.device("cpu")).total_macs
    cache.remove()


@pytest.mark.parametrize("cache", ["deepcache-u1", "deepcache-u3", "deepcache-nu3"])
def test_deepcache_samples_a_conditional_unet(cache, tiny_sd):
    """Built as the harness builds a cell, sampled with PLMS (SD's sampler; 11 evaluations for 10 steps): finite
    latents, and the evaluations that run the deep blocks are exactly the schedule's indices."""
    from bench.build import build, resolve_cell
    from bench.methods import CellSpec
    from modiff.samplers import sample

    model, steps = tiny_sd(), 10
    cell = CellSpec(model=model.name, checkpoint=None, sampler="plms", steps=steps, eta=0.0, n_samples=2, seed=0,
                    batch_size=2, base="fp", modulation="off", cache=cache, w_bits=32, a_bits=32,
                    a_granularity="none")
    resolved = resolve_cell(cell)
    sampler = resolved.sampler
    prepared = build(resolved, model, torch.device("cpu"))
    assert prepared.unet is not model.unet
    deep = []  # one entry per run of a mid-block resnet: only a full evaluation runs it
    handle = prepared.unet.mid_block.resnets[0].register_forward_hook(lambda *args: deep.append(1))
    denoiser, ran_full = prepared.denoiser(), []

    def probe(x, t):
        before = len(deep)
        out = denoiser(x, t)
        ran_full.append(len(deep) > before)
        return out

    kwargs = {"progress": False, "on_batch": model.start_batch}
    with torch.no_grad():
        latents = sample(probe, model.schedule, sampler, range(2), model.image_shape, 2, "cpu",
                         on_trajectory_start=prepared.start_trajectory, **kwargs)
        plain = sample(model.denoiser(), model.schedule, sampler, range(2), model.image_shape, 2, "cpu", **kwargs)
    handle.remove()
    full = prepared.info["deepcache_full_steps"]
    assert latents.shape == (2, 4, 8, 8) and latents.isfinite().all()
    assert len(ran_full) == steps + 1 and [i for i, f in enumerate(ran_full) if f] == full
    if cache == "deepcache-u1":
        assert torch.equal(latents, plain) and prepared.mac_fraction == 1
    else:
        assert not torch.equal(latents, plain) and 0 < prepared.mac_fraction < 1
    if cache == "deepcache-nu3":  # SD's defaults: centre 15/50 of the steps, power 1.4
        assert prepared.info["deepcache_model_kind"] == "text-to-image"
        assert (prepared.info["deepcache_center"], prepared.info["deepcache_power"]) == (3, 1.4)
        assert full == nonuniform_full_steps(steps, 3, 3, 1.4)


def test_deepcache_cells_on_a_text_to_image_model(tmp_path, monkeypatch, tiny_sd):
    """End to end through the harness: the cells that raised before issue 17's fix run and cost less."""
    from bench.zoo import registry

    monkeypatch.setattr(registry, "_ENTRIES", dict(registry._ENTRIES))  # forget the entry afterwards
    registry.register_model(registry.ZooEntry("tiny-sd", lambda checkpoint: tiny_sd(), 1000,
                                              "a tiny random text-to-image model", (8, 8)))
    matrix = load_matrix("smoke", ["run.model='tiny-sd'", "run.sampler='plms'", "steps=10", "n_samples=2",
                                   "batch_size=2", "matrix.base=['fp']", "matrix.modulation=['off']",
                                   "matrix.cache=['none','deepcache-u3','deepcache-nu3']",
                                   "run.metrics=['psnr_to_fp']"])
    summary = Runner(matrix, tmp_path, device="cpu", progress=False, log=lambda s: None).run()
    assert not summary.failed
    table = pd.read_csv(tmp_path / "results.csv").set_index("method")
    for method in ("fp+deepcache-u3", "fp+deepcache-nu3"):
        assert table.loc[method, "macs_g"] < table.loc["fp", "macs_g"]
        assert 0 < table.loc[method, "psnr_to_fp"] < float("inf")
