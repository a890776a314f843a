"""diffusers' own caches as matrix cache values (issue #28, item 5): ``fbcache-<threshold>``, ``taylorseer-<interval>``,
``pab-<N>``, ``fastercache`` and ``magcache`` on a tiny random class-conditional DiT (no ``CacheMixin``: the cache
context is driven by hand) and a tiny random FLUX transformer (``CacheMixin``): the values parse; through the method
each cache computes what diffusers' hook applied by hand computes in its pipelines' loop; the settings that cache
nothing are the plain model; 32-bit MoDiff modulation under a cache is the cache alone; every trajectory starts
afresh; a UNet's cells are skipped."""

import copy

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

import modiff
from baselines.diffusers_cache import transformer_blocks
from baselines.diffusers_cache.method import FirstBlockCacheMethod
from bench.build import build, resolve_cell
from bench.context import BuildContext, Prepared
from bench.errors import BenchError
from bench.methods import CellSpec, cache_method
from bench.zoo import ZooModel
from bench.zoo.digits import schedule
from modiff.samplers import SamplerConfig, sample

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6
SAMPLER = "ddim-uniform"
BATCH = 2
MAG_RATIOS = [1.0, 0.99, 1.01, 0.98, 1.0, 0.99]


# -- the models -------------------------------------------------------------------------------------------------------
def tiny_dit() -> ZooModel:
    """A random class-conditional DiT: 8x8x4 latents in 2x2 patches, 3 adaLN-Zero blocks of width 32; the denoiser
    calls it once per evaluation with the classes of the batch's rows."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    net = DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                num_attention_heads=2, attention_head_dim=16, num_embeds_ada_norm=10,
                                norm_type="ada_norm_zero").eval().requires_grad_(False)

    def make_denoiser(unet):
        def denoise(x, t):
            labels = torch.arange(x.shape[0]) % 10
            return unet(x, timestep=t, class_labels=labels).sample

        return denoise

    return ZooModel("tiny-dit", net, schedule(), (4, 8, 8), "ddim", STEPS, make_denoiser=make_denoiser)


def tiny_flux() -> ZooModel:
    """A random FLUX transformer (one double-stream and one single-stream block) on 4x4x4 latents as 16 tokens,
    with a fixed random text context; called as FLUX's pipeline calls it (``timestep / 1000``, no guidance embed)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    net = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                 pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval().requires_grad_(False)
    text, pooled = torch.randn(1, 3, 32), torch.randn(1, 32)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(16, 3)
    txt_ids = torch.zeros(3, 3)

    def make_denoiser(unet):
        def denoise(x, t):
            n = x.shape[0]
            tokens = x.flatten(2).transpose(1, 2)
            out = unet(hidden_states=tokens, timestep=t.float().expand(n) / 1000,
                       encoder_hidden_states=text.expand(n, -1, -1), pooled_projections=pooled.expand(n, -1),
                       img_ids=img_ids, txt_ids=txt_ids).sample
            return out.transpose(1, 2).reshape(x.shape)

        return denoise

    return ZooModel("tiny-flux", net, schedule(), (4, 4, 4), "ddim", STEPS, make_denoiser=make_denoiser)


MODELS = {"dit": tiny_dit, "flux": tiny_flux}


@pytest.fixture(scope="module")
def models():
    return {name: make() for name, make in MODELS.items()}


# -- helpers ----------------------------------------------------------------------------------------------------------
def cell_of(model: ZooModel, cache: str, params: dict | None = None, base: str = "fp") -> CellSpec:
    name = cache.split("-")[0]
    return CellSpec(model=model.name, checkpoint=None, sampler=SAMPLER, steps=STEPS, eta=0.0, n_samples=BATCH, seed=0,
                    batch_size=BATCH, base=base, modulation="off", cache=cache, w_bits=32, a_bits=32,
                    a_granularity="none", params={name: params} if params else {})


def built(model: ZooModel, cache: str, params: dict | None = None) -> Prepared:
    resolved = resolve_cell(cell_of(model, cache, params))
    assert resolved.skip is None, resolved.skip
    prepared = build(resolved, model, torch.device("cpu"))
    assert prepared.unet is not model.unet  # the shared model is never hooked
    return prepared


def inputs(model: ZooModel):
    """One trajectory's denoiser inputs: DDIM's timesteps, latents drifting slowly."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn((BATCH, *model.image_shape), generator=g)
    drift = torch.randn(x.shape, generator=g)
    steps = SamplerConfig.from_name(SAMPLER, STEPS).evaluation_timesteps(model.schedule)
    return [(x + 0.05 * i * drift, torch.full((BATCH,), t, dtype=torch.long)) for i, t in enumerate(steps)]


@torch.no_grad()
def run(denoiser, calls, start=None):
    if start is not None:
        start()
    return [denoiser(x, t) for x, t in calls]


def plain(model: ZooModel, calls):
    return run(model.denoiser(model.unet), calls)


def reference_config(value: str, current_timestep, name: str, calls: int):
    """diffusers' config of each value in CACHING, as a pipeline user writes it, and its apply function."""
    return {
        "fbcache-10": (FirstBlockCacheConfig(threshold=10.0), apply_first_block_cache),
        "taylorseer-2": (TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                               cache_identifiers=DIT_ATTENTION if name == "dit" else None),
                         apply_taylorseer_cache),
        "pab-2": (PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                  current_timestep_callback=current_timestep),
                  apply_pyramid_attention_broadcast),
        "fastercache": (FasterCacheConfig(attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True,
                                          tensor_format="BCHW", current_timestep_callback=current_timestep),
                        apply_faster_cache),
        # num_inference_steps: the network calls of a trajectory (ddim-uniform's grid evaluates STEPS + 1 times)
        "magcache-0.5": (MagCacheConfig(threshold=0.5, num_inference_steps=calls,
                                        mag_ratios=FLUX_MAG_RATIOS if name == "flux" else torch.tensor(MAG_RATIOS)),
                         apply_mag_cache),
    }[value]


CACHING = ("fastercache", "fbcache-10", "magcache-0.5", "pab-2", "taylorseer-2")  # each caches within STEPS calls
DIT_ATTENTION = [r"transformer_blocks\.\d+\.attn1"]  # TaylorSeer's default patterns match "attn" (FLUX) only


def params_for(value: str, name: str) -> dict | None:
    """The parameters of each value in CACHING on the model ``name``, as a matrix sets them."""
    if value == "taylorseer-2":
        return {"disable_cache_before_step": 1, **({"cache_identifiers": DIT_ATTENTION} if name == "dit" else {})}
    if value == "magcache-0.5" and name == "dit":
        return {"mag_ratios": MAG_RATIOS}  # FLUX: diffusers' own ratios by default
    return None


@torch.no_grad()
def by_hand(model: ZooModel, name: str, value: str, calls):
    """diffusers' hook applied by hand to a copy, called as its pipelines call it: ``enable_cache`` and
    ``cache_context("cond")`` where the model has them (FLUX's pipeline), else the ``apply_*`` function and the
    context set around each call; ``current_timestep`` the step's timestep."""
    net = copy.deepcopy(model.unet)
    now = {}
    config, apply = reference_config(value, lambda: now["t"], name, len(calls))
    if name == "flux":
        net.enable_cache(config)
    else:
        apply(net, config)
    denoiser, outputs = model.denoiser(net), []
    for x, t in calls:
        now["t"] = t[0]
        if name == "flux":
            with net.cache_context("cond"):
                outputs.append(denoiser(x, t))
        else:
            _set_cache_context(net, CacheContext("cond"))
            outputs.append(denoiser(x, t))
            _set_cache_context(net, None)
    return outputs


# -- (a) values and parameters ----------------------------------------------------------------------------------------
def test_values_parse_and_bad_ones_are_one_line_errors():
    assert cache_method("fbcache-0.1").threshold == 0.1
    assert cache_method("taylorseer-5").interval == 5
    assert cache_method("pab-3").skip_range == 3
    assert cache_method("fastercache").skip_range == 2 and cache_method("fastercache-4").skip_range == 4
    assert cache_method("magcache").threshold == 0.06 and cache_method("magcache-0.2").threshold == 0.2
    for bad in ("fbcache", "fbcache-x", "fbcache--1", "fbcache-nan", "taylorseer", "taylorseer-0", "taylorseer-1.5",
                "pab", "pab-0", "fastercache-0", "fastercache-x", "magcache--0.1", "magcache-inf"):
        with pytest.raises(BenchError, match=f"cache '{bad}': expected ") as info:
            cache_method(bad)
        assert "\n" not in str(info.value)
    for value, params, message in [
        ("pab-2", {"spatial_attention_timestep_skip_range": [800, 100]}, "low < high"),
        ("pab-2", {"cross_attention_block_skip_range": 0}, ">= 1"),
        ("taylorseer-2", {"taylor_factors_dtype": "int8"}, "taylor_factors_dtype"),
        ("taylorseer-2", {"max_order": -1}, "max_order"),
        ("fastercache", {"unconditional_batch_timestep_skip_range": [1]}, "low < high"),
        ("magcache", {"mag_ratios": [1.0, -1.0]}, "positive numbers"),
        ("magcache", {"retention_ratio": 2.0}, r"\[0, 1\]"),
        ("fbcache-0.1", {"threshold": 0.2}, "no parameter"),
    ]:
        with pytest.raises(BenchError, match=message):
            cache_method(value, {value.split("-")[0]: params})


# -- (b) the method is diffusers' hook, nothing added -----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("value", CACHING)
def test_each_cache_is_diffusers_hook_applied_by_hand(models, name, value):
    model = models[name]
    calls = inputs(model)
    prepared = built(model, value, params_for(value, name))
    ours = run(prepared.denoiser(), calls, prepared.start_trajectory)
    theirs = by_hand(model, name, value, calls)
    uncached = plain(model, calls)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(ours[0], uncached[0])  # the first call always computes
    assert any(not torch.allclose(a, b) for a, b in zip(ours, uncached, strict=True))  # and something was cached
    assert prepared.info["diffusers_cache"] == type(reference_config(value, None, name, len(calls))[0]).__name__


def test_the_cache_context_is_what_the_stateful_hooks_need(models):
    """Without the context (DiT lacks CacheMixin) diffusers' First Block Cache refuses to run: the wiring sets it."""
    model = models["dit"]
    net = copy.deepcopy(model.unet)
    apply_first_block_cache(net, FirstBlockCacheConfig(threshold=0.1))
    x, t = inputs(model)[0]
    with pytest.raises(ValueError, match="No cache context is set"):
        model.denoiser(net)(x, t)


@pytest.mark.filterwarnings("ignore:torch.meshgrid")  # diffusers' frequency split
def test_fastercache_cfg_cache_is_diffusers_on_a_guided_denoiser(models):
    """``cfg_cache = true``: FasterCache's CFG-Cache on a denoiser that runs classifier-free guidance as one call on
    the doubled batch (the zoo's way), its class labels split with the batch."""
    model = copy.copy(models["dit"])

    def make_denoiser(net):
        def denoise(x, t):
            classes = torch.arange(x.shape[0]) % 10
            labels = torch.cat([torch.full_like(classes, 10), classes])  # the null class first
            uncond, cond = net(torch.cat([x, x]), torch.cat([t, t]), class_labels=labels).sample.chunk(2)
            return uncond + 2.0 * (cond - uncond)

        return denoise

    model.make_denoiser = make_denoiser
    calls = inputs(model)
    prepared = built(model, "fastercache", {"cfg_cache": True})
    ours = run(prepared.denoiser(), calls, prepared.start_trajectory)
    net, now = copy.deepcopy(model.unet), {}
    apply_faster_cache(net, FasterCacheConfig(
        attention_weight_callback=lambda _: 0.5, tensor_format="BCHW", current_timestep_callback=lambda: now["t"],
        _unconditional_conditional_input_kwargs_identifiers=[
            *FasterCacheConfig._unconditional_conditional_input_kwargs_identifiers, "class_labels"]))
    theirs = []
    for x, t in calls:
        now["t"] = t[0]
        theirs.append(model.denoiser(net)(x, t))
    attention_only = built(model, "fastercache")
    other = run(attention_only.denoiser(), calls, attention_only.start_trajectory)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(ours, other, strict=True))  # the unconditional half was cached


# -- (c) caching nothing is the plain model ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("value,params", [
    ("fbcache-0", None),
    ("taylorseer-1", {"disable_cache_before_step": 0,
                      "cache_identifiers": [r"(single_)?transformer_blocks\.\d+\.attn1?"]}),
    ("pab-1", None),
    ("fastercache", {"spatial_attention_timestep_skip_range": [-1, 0]}),
    ("magcache-0.5", {"max_skip_steps": 0, "mag_ratios": MAG_RATIOS}),
])
def test_settings_that_cache_nothing_are_the_plain_model(models, name, value, params):
    model = models[name]
    calls = inputs(model)
    prepared = built(model, value, params)
    for a, b in zip(run(prepared.denoiser(), calls, prepared.start_trajectory), plain(model, calls), strict=True):
        assert torch.equal(a, b)


# -- (d) composed with MoDiff -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("value", CACHING)
def test_32_bit_modulation_under_a_cache_is_the_cache_alone(models, name, value):
    """MoDiff's QuantLayers inside the hooked blocks: a skipped block's layers keep their state, and at 32 bits the
    error-compensated modulation reproduces its input, so the composition is the cache alone."""
    model = models[name]
    calls = inputs(model)
    params = params_for(value, name)
    alone = built(model, value, params)
    expected = run(alone.denoiser(), calls, alone.start_trajectory)
    cell = resolve_cell(cell_of(model, value, params)).spec
    quantized = modiff.quantize(copy.deepcopy(model.unet), modiff.ModiffConfig(w_bits=32, a_bits=32, modulation="ec"))
    prepared = Prepared(quantized, on_trajectory_start=[lambda: modiff.reset(quantized)],
                        make_denoiser=model.denoiser)
    ctx = BuildContext(model, cell, SamplerConfig.from_name(SAMPLER, STEPS), torch.device("cpu"))
    prepared = cache_method(value, cell.params).apply(ctx, prepared)
    assert prepared.unet is quantized
    got = run(prepared.denoiser(), calls, prepared.start_trajectory)
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)


# -- (e) every trajectory starts afresh -------------------------------------------------------------------------------
@pytest.mark.parametrize("value", CACHING)
def test_two_trajectories_in_a_row_give_the_same_samples(models, value):
    model = models["dit"]
    prepared = built(model, value, params_for(value, "dit"))
    denoiser, sampler = prepared.denoiser(), SamplerConfig.from_name(SAMPLER, STEPS)

    def samples():
        with torch.no_grad():
            return sample(denoiser, model.schedule, sampler, range(BATCH), model.image_shape, BATCH, "cpu",
                          progress=False, on_trajectory_start=prepared.start_trajectory)

    first, second = samples(), samples()
    assert torch.equal(first, second)


def test_without_the_reset_the_second_trajectory_would_differ(models):
    """What the per-trajectory reset is for: First Block Cache's residuals from the end of one trajectory would be
    reused at the start of the next."""
    model = models["dit"]
    prepared = built(model, "fbcache-10")
    denoiser, calls = prepared.denoiser(), inputs(model)
    first = run(denoiser, calls, prepared.start_trajectory)
    assert torch.equal(run(denoiser, calls, prepared.start_trajectory)[0], first[0])
    assert not torch.equal(run(denoiser, calls)[0], first[0])


# -- (f) where the caches do not apply --------------------------------------------------------------------------------
def test_a_unet_gets_a_skip_reason():
    from diffusers import UNet2DModel

    for value in CACHING:
        resolved = resolve_cell(CellSpec(model="digits", checkpoint=None, sampler=SAMPLER, steps=STEPS, eta=0.0,
                                         n_samples=1, seed=0, batch_size=1, base="fp", modulation="off", cache=value,
                                         w_bits=32, a_bits=32, a_granularity="none"))
        assert resolved.skip is not None and "is a UNet" in resolved.skip and "\n" not in resolved.skip
    # a UNet the zoo does not name (e.g. a "diffusers:" pipeline): the build stops with the one-line reason
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    model = ZooModel("some-unet", unet, schedule(), (1, 8, 8), "ddim", STEPS)
    assert not transformer_blocks(unet)
    method = FirstBlockCacheMethod("fbcache-0.1")
    assert "has no transformer blocks" in method.model_check(unet)
    with pytest.raises(BenchError, match="fbcache-0.1: UNet2DModel has no transformer blocks") as info:
        build(resolve_cell(cell_of(model, "fbcache-0.1")), model, torch.device("cpu"))
    assert "\n" not in str(info.value)
    assert not hasattr(unet, "_diffusers_hook")


def test_a_cache_that_hooks_nothing_is_a_one_line_error(models):
    """diffusers applies TaylorSeer's default patterns silently to a model they do not match (DiT's "attn1")."""
    model = models["dit"]
    with pytest.raises(BenchError, match=r"taylorseer-2: diffusers' TaylorSeerCacheConfig found no module to hook in "
                                         r"DiTTransformer2DModel \(.*cache_identifiers") as info:
        build(resolve_cell(cell_of(model, "taylorseer-2")), model, torch.device("cpu"))
    assert "\n" not in str(info.value)


def test_magcache_needs_the_models_ratios(models):
    model = models["dit"]
    with pytest.raises(BenchError, match="magcache: MagCache needs the magnitude ratios of DiTTransformer2DModel"):
        build(resolve_cell(cell_of(model, "magcache")), model, torch.device("cpu"))


# -- in a matrix ------------------------------------------------------------------------------------------------------
def test_diffusers_cache_cells_in_a_matrix(tmp_path, monkeypatch):
    """Through the runner on a zoo entry of the tiny DiT: caching nothing is the uncached cell under any base,
    caching changes the samples, and the shared model is never hooked."""
    import pandas as pd

    from bench.matrix import load_matrix
    from bench.runner import Runner
    from bench.zoo import ZooEntry, registry

    name = "test-tiny-dit"
    loaded = {}

    def load(checkpoint=None):
        model = tiny_dit()
        model.name = name
        loaded["model"] = model
        return model

    # registered for this test only (removed after it: the zoo's listing stays the zoo's)
    monkeypatch.setitem(registry._ENTRIES, name, ZooEntry(name=name, load=load, train_timesteps=1000,
                                                          description="tiny random DiT (tests)", output_size=(8, 8),
                                                          family="transformer"))
    matrix = load_matrix("smoke", [f"run.model='{name}'", "steps=5", "n_samples=2", "batch_size=2",
                                   "matrix.cache=['none','fbcache-0','fbcache-10','pab-2']",
                                   "matrix.modulation=['off','ec']", "run.metrics=['psnr_to_fp']"])
    summary = Runner(matrix, tmp_path, device="cpu", progress=False, log=lambda s: None).run()
    assert not summary.failed
    table = pd.read_csv(tmp_path / "results.csv").set_index("method")
    assert table.loc["fp+fbcache-0", "psnr_to_fp"] == float("inf")
    assert table.loc["lcq+ec+fbcache-0", "psnr_to_fp"] == table.loc["lcq+ec", "psnr_to_fp"]
    assert table.loc["fp+fbcache-10", "psnr_to_fp"] < float("inf")
    assert table.loc["fp+pab-2", "psnr_to_fp"] < float("inf")
    assert not any(hasattr(m, "_diffusers_hook") for m in loaded["model"].unet.modules())
    # what the caches skip is not counted: their MACs / GBops are empty, never the uncached model's; timed as any cell
    cached = table[table.cache != "none"]
    assert cached[["macs_g", "gbops", "gbops_honest"]].isna().all().all() and (cached.img_per_s > 0).all()
    assert table.loc[["fp", "lcq+ec"], ["macs_g", "gbops"]].notna().all().all()
