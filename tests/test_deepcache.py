"""DeepCache on diffusers UNets: identity at N = 1, what a partial step runs, schedules, MACs, harness."""

import math

import pandas as pd
import pytest
import torch
from torch import nn

from baselines.deepcache import DeepCache, nonuniform_full_steps, uniform_full_steps
from baselines.deepcache.method import DeepCacheMethod, macs_full_and_partial
from bench.errors import BenchError
from bench.matrix import load_matrix
from bench.runner import Runner
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
        for interval in (1, 2, 3, 5, 10):
            full = nonuniform_full_steps(steps, interval)
            assert len(full) == math.ceil(steps / interval) == len(set(full)), (steps, interval)
            assert full[0] == 0 and full == sorted(full) and full[-1] <= steps - 1
    # clustered around the centre: gaps near it are no wider than gaps at the ends
    full = nonuniform_full_steps(100, 5, center=50)
    gaps = [b - a for a, b in zip(full, full[1:], strict=False)]
    middle = gaps[len(gaps) // 2]
    assert middle <= gaps[0] and middle <= gaps[-1] and min(gaps) < max(gaps)
    with pytest.raises(ValueError):
        nonuniform_full_steps(10, 2, center=20)


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
