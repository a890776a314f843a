"""``cache = "deepcache-u<N>"`` / ``"deepcache-nu<N>"`` in matrix files: DeepCache on top of any
base quantizer (with ``fp`` it is DeepCache alone; with a modulated base it is MoDiff + caching).

Full and partial passes are chosen per network evaluation, as DeepCache's own pipelines do
(``for i, t in enumerate(scheduler.timesteps): full if i in interval_seq``, with ``interval_seq``
built from the number of inference steps): the full indices come from the cell's ``steps`` and a
counter of evaluations, reset per trajectory, picks them. With one evaluation per step (DDIM,
DDPM, DPM-Solver++, whose singlestep intermediate points are evaluations of their own) that is
the step index; PLMS's ``steps + 1`` evaluations (its first step evaluates twice) shift the later
full passes by one evaluation and leave the extra last one partial, exactly as DeepCache with
diffusers' PNDM scheduler. At N = 1 every evaluation is full (DeepCache's pipelines special-case
``cache_interval == 1``), so N = 1 is the plain model with every sampler. ``mac_fraction``
averages over the evaluations actually run, with the MACs of a full and of a partial evaluation
counted on the model's own denoiser (``macs_full_and_partial``).

The non-uniform schedule's ``center`` and ``power`` default to what DeepCache's code uses for the kind of model
(:func:`nonuniform_defaults`); DeepCache has no single default, each pipeline passes its own:
- text-to-image (a model with per-batch conditioning, Stable Diffusion): ``power`` 1.4, ``center`` 15 of 50 steps
  (its ``stable_diffusion.py``: ``pow=1.4, center=15`` at the pipeline's 50 steps), i.e. ``round(0.3 * steps)``;
- latent, unconditional (LDM): ``power`` 1.5, ``center`` 0. Its LDM sampling script passes ``pow=1.5`` to
  ``sample_from_quad``, the same points with no centre (``c = 0``); that function does not lower ``p`` when the
  count comes out short (it then runs fewer full steps), this one does;
- pixel space (DDPM, CIFAR-10): DeepCache's DDPM runner takes ``--pow``/``--center`` without defaults (its
  README runs uniform schedules only), so ``sample_from_quad_center``'s own default ``power`` 1.2 and the middle
  step ``steps // 2``.
Either setting overrides its default; ``info`` records the values used.

Flow-matching cells (``flow-euler``, ``flow-heun``: SD3, FLUX) are skipped: DeepCache reuses the features of a U-Net's
skip branches, and those models are transformers (MMDiT) without up blocks to cache around."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bench.errors import BenchError
from bench.methods import BuildContext, CacheMethod, CellSpec, Prepared, register_method
from modiff.flow import FLOW_SAMPLER_NAMES

from .feature_reuse import DeepCache, nonuniform_full_steps, uniform_full_steps

if TYPE_CHECKING:
    from bench.zoo import ZooModel


@register_method("deepcache")
class DeepCacheMethod(CacheMethod):
    """DeepCache (CVPR 2024): partial steps reuse the feature entering up block U_branch (u<N>: uniform 1:N, nu<N>: non-uniform)."""  # noqa: E501

    @dataclass(frozen=True)
    class Params:
        branch: int = 0  # skip branch m: the feature entering up block U_m is cached
        center: int | None = None  # non-uniform: the step full steps cluster around (default: per model kind)
        power: float | None = None  # non-uniform: the starting exponent, > 1 (default: per model kind)

        def __post_init__(self):
            if self.center is not None and self.center < 0:
                raise ValueError(f"center must be a step index (>= 0), got {self.center}")
            if self.power is not None and not self.power > 1:
                raise ValueError(f"power must be > 1 (DeepCache lowers it toward 1 until the schedule fits), "
                                 f"got {self.power}")

    @classmethod
    def version(cls, settings) -> int:
        # 2: the non-uniform schedule is DeepCache's own (sample_from_quad_center, its centre and power per kind of
        # model), and N = 1 caches nothing with any sampler (PLMS's last evaluation was partial)
        cache = str(settings.get("cache", ""))
        return 2 if cache.startswith("deepcache-nu") or cache == "deepcache-u1" else 1

    def __init__(self, value: str, params: dict[str, Any] | None = None):
        super().__init__(value, params)
        arg = self.argument
        kind = "nu" if arg.startswith("nu") else "u" if arg.startswith("u") else None
        try:
            self.interval = int(arg[len(kind):]) if kind else 0
        except ValueError:
            self.interval = 0
        if self.interval < 1:
            raise BenchError(f"cache {value!r}: expected deepcache-u<N> or deepcache-nu<N> with N >= 1")
        self.uniform = kind == "u"

    def schedule_settings(self, steps: int, kind: str = "pixel") -> tuple[int, float]:
        """``center`` and ``power`` of the non-uniform schedule: the settings, else DeepCache's for ``kind``."""
        center, power = nonuniform_defaults(kind, steps)
        settings = self.settings
        return (center if settings.center is None else settings.center,
                power if settings.power is None else settings.power)

    def full_steps(self, steps: int, kind: str = "pixel") -> list[int]:
        """The evaluation indices (0 = the first, noisiest step) that run the whole UNet."""
        if self.uniform:
            return uniform_full_steps(steps, self.interval)
        return nonuniform_full_steps(steps, self.interval, *self.schedule_settings(steps, kind))

    def check(self, cell: CellSpec) -> str | None:
        from bench.zoo import model_entry

        try:
            family = model_entry(cell.model).family
        except BenchError:  # an unknown model: the matrix's own check names it
            family = None
        if family == "transformer" or cell.sampler in FLOW_SAMPLER_NAMES:
            return (f"DeepCache caches a U-Net's skip-branch features; model {cell.model} is a transformer without up "
                    "blocks (its caches: fbcache, taylorseer, pab, fastercache, magcache)")
        center = self.settings.center
        if center is not None and not 0 <= center < cell.steps:
            return f"deepcache center {center} is not a step index for {cell.steps} steps"
        return None

    def apply(self, ctx: BuildContext, prepared: Prepared) -> Prepared:
        unet = prepared.unet
        if unet is ctx.model.unet:  # never hook the shared full-precision model
            unet = prepared.unet = ctx.fp_unet_copy()
        try:
            cache = DeepCache(unet, self.settings.branch)
        except (TypeError, ValueError) as exc:
            raise BenchError(f"{self.value}: {exc}") from None
        kind = model_kind(ctx.model)
        n_eval = len(ctx.sampler.evaluation_timesteps(ctx.model.schedule))
        try:
            full = set(self.full_steps(ctx.cell.steps, kind))
        except ValueError as exc:
            raise BenchError(f"{self.value}: {exc}") from None
        if self.interval == 1:  # every evaluation, PLMS's extra one too: DeepCache never caches at N = 1
            full = set(range(n_eval))
        inner_wrap = prepared.wrap

        def wrap(denoiser):
            return cache.scheduled(inner_wrap(denoiser) if inner_wrap is not None else denoiser, full)

        prepared.wrap = wrap
        prepared.on_trajectory_start = [*prepared.on_trajectory_start, cache.reset]
        full_macs, partial_macs = macs_full_and_partial(unet, cache, ctx.model.image_shape, ctx.device, ctx.model)
        n_full = sum(1 for i in full if i < n_eval)
        prepared.mac_fraction = (n_full * full_macs + (n_eval - n_full) * partial_macs) / (n_eval * full_macs)
        prepared.info.update({"deepcache_full_steps": sorted(full), "deepcache_branch": self.settings.branch,
                              "macs_full_g": full_macs / 1e9, "macs_partial_g": partial_macs / 1e9})
        if not self.uniform:
            center, power = self.schedule_settings(ctx.cell.steps, kind)
            prepared.info.update({"deepcache_model_kind": kind, "deepcache_center": center, "deepcache_power": power})
        return prepared


def model_kind(model: ZooModel) -> str:
    """Which of DeepCache's pipelines ``model`` is like: "text-to-image" (per-batch conditioning, Stable Diffusion),
    "latent" (an unconditional latent model, LDM) or "pixel" (DDPM)."""
    if model.start_batch is not None:
        return "text-to-image"
    return "latent" if model.decoder is not None else "pixel"


def nonuniform_defaults(kind: str, steps: int) -> tuple[int, float]:
    """DeepCache's ``(center, power)`` for a kind of model at ``steps`` sampling steps (module docstring)."""
    if kind == "text-to-image":
        return round(steps * 15 / 50), 1.4
    if kind == "latent":
        return 0, 1.5
    if kind == "pixel":
        return steps // 2, 1.2
    raise ValueError(f"unknown model kind {kind!r}: one of 'text-to-image', 'latent', 'pixel'")


CONTEXT_TOKENS = 77  # the text context a bare conditional UNet is counted with: CLIP's length, as in SD


def macs_full_and_partial(unet, cache: DeepCache, image_shape, device,
                          model: ZooModel | None = None) -> tuple[int, int]:
    """MACs per image of a full and of a partial network evaluation, counted on real forward passes.

    With ``model`` an evaluation is ``model.denoiser(unet)`` after ``model.start_batch([0])``, as the harness counts
    a cell's ``macs_g`` (``bench.generate.count_model_macs``): a text-conditioned UNet gets its prompt embeddings
    and, with classifier-free guidance, runs on the doubled batch, so the two counts are on the scale of ``macs_g``.
    Without it the UNet is called alone; a conditional UNet (``UNet2DConditionModel``, which cannot run without
    ``encoder_hidden_states``) then gets an all-zero context of ``CONTEXT_TOKENS`` tokens, whose MACs depend on
    the shapes only, and an SDXL UNet (``addition_embed_type="text_time"``) all-zero ``added_cond_kwargs``."""
    from modiff.accounting import count_macs

    x = torch.zeros((1, *image_shape), device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    if model is not None:
        if model.start_batch is not None:
            model.start_batch([0])
        denoiser = model.denoiser(unet)

        class Call(nn.Module):  # count_macs hooks the modules of what it calls: the UNet inside
            def __init__(self):
                super().__init__()
                self.unet = unet

            def forward(self, x, t):
                return denoiser(x, t)

        target, kwargs = Call(), {}
    else:
        config = getattr(unet, "config", None)
        width = getattr(config, "cross_attention_dim", None)
        kwargs = {} if width is None else {"encoder_hidden_states": torch.zeros((1, CONTEXT_TOKENS, width),
                                                                                device=device)}
        if getattr(config, "addition_embed_type", None) == "text_time":  # SDXL: pooled embedding + 6 time ids
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros((1, pooled), device=device),
                                           "time_ids": torch.zeros((1, 6), device=device)}
        target = unet
    cache.reset()
    full = count_macs(target, x, t, **kwargs).total_macs
    with cache.partial():
        partial = count_macs(target, x, t, **kwargs).total_macs
    cache.reset()
    return full, partial
