"""``cache = "fbcache-<threshold>"``, ``"taylorseer-<interval>"``, ``"pab-<N>"``, ``"fastercache"`` and ``"magcache"``
in matrix files: diffusers' own caches (``diffusers.hooks``) on a transformer, on top of any base quantizer.

Each value builds the cache's diffusers config from its argument and the method's parameters (named as the config's
fields) and hooks a copy of the cell's network with it (:mod:`.hooks`): the base's QuantLayers, if any, sit inside
the hooked blocks and attention layers, so a block the cache skips at a step simply keeps its layers' state (MoDiff's
residuals then run against the last input they saw). Each network evaluation runs in the cache context, with the
timestep the sampler passes to the denoiser as the cache's current timestep (PAB, FasterCache compare it with their
ranges: on the model's own scale, e.g. 0..999 for a discrete-time model, ``sigma * 1000`` for SD3 / FLUX); every
trajectory starts with the hooks' state cleared.

The caches hook transformer blocks (DiT, PixArt, SD3, FLUX: a block list among the network's children); a UNet
has none, and its cells are skipped (a zoo entry of the UNet family when the matrix is resolved; another UNet when
its cell is built, with the same one-line reason). What the caches skip depends on the data (First Block Cache,
MagCache) or happens inside an attention module (PAB, FasterCache, TaylorSeer) and is not counted: the cells'
``mac_fraction`` is None, so their MACs and GBops are left empty rather than given as the uncached model's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

from bench.errors import BenchError
from bench.methods import BuildContext, CacheMethod, CellSpec, Prepared, register_method

from .hooks import DiffusersCache, NothingHooked, not_applicable


def _number(value: str, argument: str, kind: type, minimum: float, form: str) -> Any:
    """``argument`` of the cache value ``value`` as a ``kind`` >= ``minimum`` (BenchError naming ``form``)."""
    try:
        number = kind(argument)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or number < minimum:
        raise BenchError(f"cache {value!r}: expected {form}")
    return number


def _range(name: str, value: Any) -> tuple[float, float]:
    """A timestep range parameter: two numbers, low < high (ValueError otherwise)."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and value[0] < value[1]):
        raise ValueError(f"{name} must be [low, high] with low < high (timesteps strictly inside are cached), "
                         f"got {value!r}")
    return value[0], value[1]


class DiffusersCacheMethod(CacheMethod):
    """Common part: a diffusers cache config built per cell, hooked on a copy of the network."""

    form: ClassVar[str] = ""  # how the value is written, for errors
    default_argument: ClassVar[str | None] = None  # the argument of the bare name; None: the argument is required
    hint: ClassVar[str] = ""  # what to do where the cache found nothing to hook

    def __init__(self, value: str, params: dict[str, Any] | None = None):
        super().__init__(value, params)
        argument = self.argument or self.default_argument
        if argument is None:
            raise BenchError(f"cache {value!r}: expected {self.form}")
        self.parse(argument)

    def parse(self, argument: str) -> None:
        raise NotImplementedError

    def make_config(self, ctx: BuildContext, network: torch.nn.Module, current_timestep) -> Any:
        """The diffusers config for the cell of ``ctx`` on ``network``; ``current_timestep`` the callback."""
        raise NotImplementedError

    def check(self, cell: CellSpec) -> str | None:
        """A UNet model (its zoo entry's ``family``) is skipped when the matrix is resolved; a UNet whose entry says
        otherwise fails to build with the same reason (``model_check`` on the loaded network)."""
        from bench.zoo import model_entry

        try:
            family = model_entry(cell.model).family
        except BenchError:  # an unknown model: the matrix's own check names it
            return None
        if family == "unet":
            return (f"{self.value}: model {cell.model} is a UNet; diffusers' caches hook transformer blocks "
                    "(a UNet's cache is deepcache)")
        return None

    def model_check(self, network: torch.nn.Module) -> str | None:
        """Why this cache cannot hook ``network`` (a UNet: no transformer blocks), or None."""
        reason = not_applicable(network)
        return None if reason is None else f"{self.value}: {reason}"

    def apply(self, ctx: BuildContext, prepared: Prepared) -> Prepared:
        reason = self.model_check(prepared.unet)
        if reason:
            raise BenchError(reason)
        network = prepared.unet
        if network is ctx.model.unet:  # never hook the shared full-precision model
            network = prepared.unet = ctx.fp_unet_copy()
        try:
            cache = DiffusersCache(network, lambda callback: self.make_config(ctx, network, callback))
        except NothingHooked as exc:
            raise BenchError(f"{self.value}: {exc}{self.hint}") from None
        except (TypeError, ValueError) as exc:  # what the library refuses of the settings or the model
            raise BenchError(f"{self.value}: {' '.join(str(exc).split())}") from None
        inner_wrap = prepared.wrap

        def wrap(denoiser):
            return cache.wrap(inner_wrap(denoiser) if inner_wrap is not None else denoiser)

        prepared.wrap = wrap
        prepared.on_trajectory_start = [*prepared.on_trajectory_start, cache.reset]
        prepared.mac_fraction = None  # what the cache skips depends on the data and is not counted: no MACs / GBops
        prepared.info.update({"diffusers_cache": type(cache.config).__name__,
                              "diffusers_cache_config": config_info(cache.config)})
        return prepared


def config_info(config: Any) -> dict[str, Any]:
    """The plain settings of a diffusers cache config (callbacks and private fields left out), for the record."""
    out = {}
    for key, value in vars(config).items():
        if key.startswith("_") or callable(value):
            continue
        if isinstance(value, torch.Tensor):
            value = [round(float(v), 6) for v in value.reshape(-1)]
        elif isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


@register_method("fbcache")
class FirstBlockCacheMethod(DiffusersCacheMethod):
    """First Block Cache (diffusers): when the first block's residual changed by less than <threshold> (relative mean), the other blocks reuse their cached residual."""  # noqa: E501

    form = "fbcache-<threshold> with a threshold >= 0 (e.g. fbcache-0.05)"

    def parse(self, argument: str) -> None:
        self.threshold = _number(self.value, argument, float, 0.0, self.form)

    def make_config(self, ctx, network, current_timestep):
        return FirstBlockCacheConfig(threshold=self.threshold)


@register_method("taylorseer")
class TaylorSeerMethod(DiffusersCacheMethod):
    """TaylorSeer (diffusers): attention outputs computed every <interval> steps, predicted by a Taylor series in between."""  # noqa: E501

    form = "taylorseer-<interval> with an interval >= 1 (1 caches nothing; e.g. taylorseer-5)"
    hint = (r" (its patterns match modules named 'attn'; for DiT / PixArt set params.taylorseer.cache_identifiers, "
            r"e.g. ['transformer_blocks\.\d+\.attn1'])")

    @dataclass(frozen=True)
    class Params:
        disable_cache_before_step: int = 3  # steps computed in full first (gathering the Taylor factors)
        disable_cache_after_step: int | None = None  # steps from here on computed in full
        max_order: int = 1  # the Taylor series' highest order
        taylor_factors_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # diffusers' default
        use_lite_mode: bool = False  # skip whole blocks, predict proj_out only (diffusers' "lite" variant)
        # the modules to predict, regexes matched to the whole qualified name; default: diffusers' attention
        # patterns, which match modules named "attn" (FLUX, SD3's ...attn) but not DiT's and PixArt's "attn1"
        cache_identifiers: list | None = None

        def __post_init__(self):
            if self.disable_cache_before_step < 0:
                raise ValueError(f"disable_cache_before_step must be >= 0, got {self.disable_cache_before_step}")
            if self.disable_cache_after_step is not None and self.disable_cache_after_step < 0:
                raise ValueError(f"disable_cache_after_step must be >= 0, got {self.disable_cache_after_step}")
            if self.max_order < 0:
                raise ValueError(f"max_order must be >= 0, got {self.max_order}")
            patterns = self.cache_identifiers
            if patterns is not None and not (patterns and all(isinstance(p, str) for p in patterns)):
                raise ValueError(f"cache_identifiers must be a list of regexes, got {patterns!r}")
            for pattern in patterns or ():
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"cache_identifiers: {pattern!r} is not a regex ({exc})") from None

    def parse(self, argument: str) -> None:
        self.interval = _number(self.value, argument, int, 1, self.form)

    def make_config(self, ctx, network, current_timestep):
        s = self.settings
        return TaylorSeerCacheConfig(
            cache_interval=self.interval, disable_cache_before_step=s.disable_cache_before_step,
            disable_cache_after_step=s.disable_cache_after_step, max_order=s.max_order,
            taylor_factors_dtype=getattr(torch, s.taylor_factors_dtype), use_lite_mode=s.use_lite_mode,
            cache_identifiers=None if s.cache_identifiers is None else list(s.cache_identifiers))


@register_method("pab")
class PyramidAttentionBroadcastMethod(DiffusersCacheMethod):
    """Pyramid Attention Broadcast (diffusers): self-attention computed every <N> calls inside a timestep range, its output reused in between."""  # noqa: E501

    form = "pab-<N> with N >= 1, the self-attention computed every N calls (1 caches nothing; e.g. pab-2)"

    @dataclass(frozen=True)
    class Params:
        spatial_attention_timestep_skip_range: list = field(default_factory=lambda: [100, 800])
        cross_attention_block_skip_range: int | None = None  # cross-attention too, every N calls (PixArt, SD3)
        cross_attention_timestep_skip_range: list = field(default_factory=lambda: [100, 800])

        def __post_init__(self):
            _range("spatial_attention_timestep_skip_range", self.spatial_attention_timestep_skip_range)
            _range("cross_attention_timestep_skip_range", self.cross_attention_timestep_skip_range)
            if self.cross_attention_block_skip_range is not None and self.cross_attention_block_skip_range < 1:
                raise ValueError(f"cross_attention_block_skip_range must be >= 1, "
                                 f"got {self.cross_attention_block_skip_range}")

    def parse(self, argument: str) -> None:
        self.skip_range = _number(self.value, argument, int, 1, self.form)

    def make_config(self, ctx, network, current_timestep):
        s = self.settings
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.skip_range,
            spatial_attention_timestep_skip_range=tuple(s.spatial_attention_timestep_skip_range),
            cross_attention_block_skip_range=s.cross_attention_block_skip_range,
            cross_attention_timestep_skip_range=tuple(s.cross_attention_timestep_skip_range),
            current_timestep_callback=current_timestep)


@register_method("fastercache")
class FasterCacheMethod(DiffusersCacheMethod):
    """FasterCache (diffusers): self-attention extrapolated from its last two outputs except every <N>-th call (default 2) inside a timestep range."""  # noqa: E501

    form = "fastercache or fastercache-<N> with N >= 1, the self-attention computed every N calls (default 2)"
    default_argument = "2"

    @dataclass(frozen=True)
    class Params:
        spatial_attention_timestep_skip_range: list = field(default_factory=lambda: [-1, 681])
        attention_weight: float = 0.5  # t + w (t - t_prev): diffusers' default weight
        # FasterCache's CFG-Cache: the unconditional half of the denoiser's doubled batch ([uncond, cond], the
        # zoo's classifier-free guidance) recomputed every unconditional_batch_skip_range calls only
        cfg_cache: bool = False
        unconditional_batch_skip_range: int = 5
        unconditional_batch_timestep_skip_range: list = field(default_factory=lambda: [-1, 641])
        alpha_low_frequency: float = 1.1
        alpha_high_frequency: float = 1.1

        def __post_init__(self):
            _range("spatial_attention_timestep_skip_range", self.spatial_attention_timestep_skip_range)
            _range("unconditional_batch_timestep_skip_range", self.unconditional_batch_timestep_skip_range)
            if self.unconditional_batch_skip_range < 1:
                raise ValueError(f"unconditional_batch_skip_range must be >= 1, "
                                 f"got {self.unconditional_batch_skip_range}")

    def parse(self, argument: str) -> None:
        self.skip_range = _number(self.value, argument, int, 1, self.form)

    def make_config(self, ctx, network, current_timestep):
        s = self.settings
        weight = float(s.attention_weight)
        kwargs = {}
        if s.cfg_cache:  # the class labels of a class-conditional model are split with the batch too
            kwargs["_unconditional_conditional_input_kwargs_identifiers"] = [
                *FasterCacheConfig._unconditional_conditional_input_kwargs_identifiers, "class_labels"]
        return FasterCacheConfig(
            spatial_attention_block_skip_range=self.skip_range,
            spatial_attention_timestep_skip_range=tuple(s.spatial_attention_timestep_skip_range),
            attention_weight_callback=lambda _module: weight,
            is_guidance_distilled=not s.cfg_cache,
            unconditional_batch_skip_range=s.unconditional_batch_skip_range,
            unconditional_batch_timestep_skip_range=tuple(s.unconditional_batch_timestep_skip_range),
            alpha_low_frequency=s.alpha_low_frequency, alpha_high_frequency=s.alpha_high_frequency,
            tensor_format="BCHW", current_timestep_callback=current_timestep, **kwargs)


@register_method("magcache")
class MagCacheMethod(DiffusersCacheMethod):
    """MagCache (diffusers): whole steps skipped (the blocks' last residual reused) while the accumulated error of the model's magnitude ratios stays below <threshold> (default 0.06)."""  # noqa: E501

    form = "magcache or magcache-<threshold> with a threshold >= 0 (default 0.06)"
    default_argument = "0.06"

    @dataclass(frozen=True)
    class Params:
        max_skip_steps: int = 3  # consecutive steps skipped at most (K)
        retention_ratio: float = 0.2  # the first share of the steps is never skipped
        mag_ratios: list | None = None  # per step (interpolated to the cell's); default: diffusers' FLUX ratios
        calibrate: bool = False  # diffusers' calibration: nothing skipped, the ratios printed after each trajectory

        def __post_init__(self):
            if self.max_skip_steps < 0:
                raise ValueError(f"max_skip_steps must be >= 0, got {self.max_skip_steps}")
            if not 0 <= self.retention_ratio <= 1:
                raise ValueError(f"retention_ratio must be in [0, 1], got {self.retention_ratio}")
            ratios = self.mag_ratios
            if ratios is not None and not (ratios and all(isinstance(r, (int, float)) and not isinstance(r, bool)
                                                           and r > 0 for r in ratios)):
                raise ValueError(f"mag_ratios must be a list of positive numbers, one per step, got {ratios!r}")

    def parse(self, argument: str) -> None:
        self.threshold = _number(self.value, argument, float, 0.0, self.form)

    def make_config(self, ctx, network, current_timestep):
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        s = self.settings
        ratios = s.mag_ratios
        if ratios is None and not s.calibrate:
            if type(network).__name__ != "FluxTransformer2DModel":
                raise ValueError(f"MagCache needs the magnitude ratios of {type(network).__name__} "
                                 "(params.magcache.mag_ratios; calibrate = true prints them); diffusers ships FLUX's")
            ratios = FLUX_MAG_RATIOS
        try:
            steps = len(ctx.sampler.evaluation_timesteps(ctx.model.schedule))
        except (AttributeError, TypeError, ValueError):  # a sampler without the count: one evaluation per step
            steps = ctx.cell.steps
        return MagCacheConfig(threshold=self.threshold, max_skip_steps=s.max_skip_steps,
                              retention_ratio=s.retention_ratio, num_inference_steps=steps,
                              mag_ratios=None if ratios is None else torch.as_tensor(ratios, dtype=torch.float32),
                              calibrate=s.calibrate)
