"""Time-step-aware calibration data (Q-Diffusion): denoiser inputs kept along full-precision
sampling trajectories.

The full-precision sampler runs ``cali_n`` trajectories; at each step index in
``range(0, n_steps, n_steps // cali_st)`` (the authors' spacing: uniform over the trajectory,
which can give a few more than ``cali_st`` steps when ``n_steps`` is not a multiple) the
denoiser's input ``(x_t, t)`` of every trajectory is kept. For the static residual scales of
Q-Diffusion + MoDiff the input of the step before each kept step is kept as well, so that the
pairs ``(x_prev, x_t)`` reproduce the temporal residual a layer sees at that step.

A "step" here is one network evaluation: ``n_steps`` is the number of evaluations of one
trajectory (``SamplerConfig.evaluation_timesteps``), the sampler's steps for DDIM, DDPM and
DPM-Solver++, one more for PLMS (whose first step evaluates twice), more for the ``uniform`` grids
when ``steps`` does not divide T. Consecutive evaluations are what a MoDiff layer's residual
chain follows, so the pairs stay right for multi-evaluation solvers.

Text-conditioned models (``collect(..., unet=...)``): what is kept is then the input of the UNet
inside the denoiser, not the denoiser's. With classifier-free guidance (``bench.zoo.sd``: one UNet
call on ``cat([x, x])`` with ``cat([uncond, cond])`` text embeddings) that is the doubled batch,
2 rows per trajectory and step, as the authors' Stable Diffusion calibration keeps both the
conditional and the unconditional input of every sample. The UNet's keyword tensors
(``encoder_hidden_states``) are kept in ``CalibrationData.cond``, once per row of a step: the
conditioning of a trajectory does not change along it (checked), so every kept step shares it.
Block reconstruction then feeds the cross-attention blocks the context they see when sampling.
A keyword that is a dict of tensors is kept as such: SDXL's ``added_cond_kwargs`` (``text_embeds``,
the pooled text embedding, and ``time_ids``; ``bench.zoo.sdxl``), which the UNet's time embedding
adds to every block's input, so its rows go with the calibration rows like the text context.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from modiff.flow import FlowGrid, FlowSamplerConfig
from modiff.samplers import SamplerConfig, sample
from modiff.schedules import NoiseSchedule

Cond = dict  # keyword -> (rows, ...) tensor, or a dict of them (``added_cond_kwargs``)


def map_cond(cond: dict, fn) -> dict:
    """``cond`` with ``fn`` applied to every tensor, nested dicts kept (``added_cond_kwargs``)."""
    return {k: map_cond(v, fn) if isinstance(v, dict) else fn(v) for k, v in cond.items()}


def cond_leaves(cond: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of ``cond`` by dotted name (``added_cond_kwargs.time_ids``)."""
    leaves: dict[str, torch.Tensor] = {}
    for name, value in cond.items():
        if isinstance(value, dict):
            leaves.update(cond_leaves(value, f"{prefix}{name}."))
        else:
            leaves[f"{prefix}{name}"] = value
    return leaves


def _join(conds: list[Cond]) -> Cond:
    """The batches' conditioning, row after row (the same keywords in each)."""
    first = conds[0]
    return {k: _join([c[k] for c in conds]) if isinstance(first[k], dict) else torch.cat([c[k] for c in conds])
            for k in first}


def calibration_steps(n_steps: int, cali_st: int) -> list[int]:
    """Step indices (0 = the first, noisiest step) whose inputs are kept; ValueError unless
    ``1 <= cali_st <= n_steps``."""
    if not 1 <= cali_st <= n_steps:
        raise ValueError(f"cali_st must be between 1 and the number of sampling steps ({n_steps}); got {cali_st}")
    return list(range(0, n_steps, n_steps // cali_st))


@dataclass
class CalibrationData:
    """Inputs by step index: ``x[i]`` is (rows, *image_shape), ``t[i]`` the timestep. ``rows`` is
    ``cali_n``, or ``2 * cali_n`` for a model with classifier-free guidance (the doubled batch).
    ``cond``: the UNet's keyword inputs (``encoder_hidden_states``), rows as in every ``x[i]``;
    empty for unconditional models."""

    steps: list[int]  # the calibration steps
    x: dict[int, torch.Tensor]  # step index -> inputs (calibration steps and the steps before them)
    t: dict[int, int | float]  # int for the DDPM family, float (the model time, float32) for a flow sampler
    seeds: list[int]
    cond: Cond = field(default_factory=dict)  # keyword -> (rows, ...) or a dict of them, shared by every step

    @property
    def n(self) -> int:
        return len(self.steps) * len(self.seeds)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All calibration inputs ``(x, t)``, step after step."""
        xs = torch.cat([self.x[i] for i in self.steps])
        ts = torch.cat([_timesteps(len(self.x[i]), self.t[i]) for i in self.steps])
        return xs, ts

    def conditioning(self) -> Cond:
        """The keyword inputs of every row of :meth:`inputs` (``cond`` repeated for each calibration
        step); empty for unconditional models."""
        return map_cond(self.cond, lambda value: value.repeat(len(self.steps), *([1] * (value.dim() - 1))))

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(x_prev, t_prev, x, t)`` for each calibration step that has a step before it (with the
        same rows, so ``cond`` applies to both)."""
        out = []
        for i in self.steps:
            if i == 0:
                continue
            n = len(self.x[i])
            out.append((self.x[i - 1], _timesteps(n, self.t[i - 1]), self.x[i], _timesteps(n, self.t[i])))
        return out

    def to_dict(self) -> dict:
        data = {"steps": self.steps, "x": self.x, "t": self.t, "seeds": self.seeds}
        if self.cond:  # unconditional data stays as it was cached before conditioning was kept
            data["cond"] = self.cond
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationData:
        return cls(steps=list(data["steps"]), x={int(k): v for k, v in data["x"].items()},
                   t={int(k): v if isinstance(v, float) else int(v) for k, v in data["t"].items()},
                   seeds=list(data["seeds"]), cond=dict(data.get("cond") or {}))


def _timesteps(n: int, t: int | float) -> torch.Tensor:
    """``n`` copies of a kept timestep as the sampler passed it: int64 (DDPM family) or float32 (flow samplers)."""
    return torch.full((n,), t, dtype=torch.float32 if isinstance(t, float) else torch.long)


TIMESTEP_NAMES = ("timestep", "timesteps", "t")  # a network's timestep parameter, by name (as modiff.api's)


def _parameters(net: nn.Module) -> tuple[str, str]:
    """The names of ``net.forward``'s sample and timestep parameters: the first positional one, and the first of
    :data:`TIMESTEP_NAMES` it has (else its second positional one). A UNet takes ``(sample, timestep, ...)``; a
    transformer may take the timestep later, by keyword (PixArt: ``(hidden_states, encoder_hidden_states,
    timestep, ...)``; SD3, FLUX)."""
    params = inspect.signature(net.forward).parameters
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    timestep = next((n for n in TIMESTEP_NAMES if n in params), names[1] if len(names) > 1 else None)
    if not names or timestep is None or timestep == names[0]:
        raise ValueError(f"cannot tell the sample and the timestep parameters of {type(net).__name__}")
    return names[0], timestep


def call_network(net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None):
    """``net`` on a recorded input: the sample positionally, the timestep by its parameter's name, the rest
    (``unet_inputs``' keyword tensors) by name."""
    return net(x, **{_parameters(net)[1]: t}, **(cond or {}))


def unet_inputs(unet: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, Cond]:
    """``(sample, timestep, keyword tensors)`` of a call ``unet(*args, **kwargs)``: its ``forward``'s sample and
    timestep parameters (``_parameters``), then every other tensor argument, or dict of tensors
    (``added_cond_kwargs``), by name (``encoder_hidden_states``). ``None`` and ``return_dict`` are left
    out; any other argument (one that could not be replayed from tensors) is a ValueError. :func:`call_network`
    replays such a call."""
    bound = inspect.signature(unet.forward).bind(*args, **kwargs)
    params = inspect.signature(unet.forward).parameters
    sample_name, timestep_name = _parameters(unet)
    if sample_name not in bound.arguments or timestep_name not in bound.arguments:
        raise ValueError(f"cannot tell the sample and the timestep of a call of {type(unet).__name__}")
    sample_, timestep = bound.arguments[sample_name], bound.arguments[timestep_name]
    rest: dict = {}
    for name, value in bound.arguments.items():
        if name in (sample_name, timestep_name):
            continue
        if params[name].kind == params[name].VAR_KEYWORD:
            rest.update(value)
        else:
            rest[name] = value
    cond = {}
    for name, value in rest.items():
        if value is None or name == "return_dict":
            continue
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
            if all(isinstance(v, torch.Tensor) for v in value.values()):
                if value:
                    cond[name] = value
                continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"cannot keep the argument {name!r} ({type(value).__name__}) of the UNet's calls as "
                             "calibration data: only tensors (or dicts of tensors) are kept")
        cond[name] = value
    return sample_, timestep, cond


def collect(denoiser, schedule: NoiseSchedule | FlowGrid, sampler: SamplerConfig | FlowSamplerConfig, cali_st: int,
            seeds: Sequence[int], image_shape: Sequence[int], batch_size: int, device: torch.device | str = "cpu",
            progress: bool = False, on_batch=None, unet: nn.Module | None = None) -> CalibrationData:
    """Run the full-precision ``denoiser`` along ``sampler``'s trajectories from ``seeds`` and keep
    the inputs of the calibration steps (and of the steps just before them).

    With ``unet`` (the network the denoiser calls, once per evaluation) its inputs are kept instead
    of the denoiser's: for a guided text-conditioned model the doubled batch and its text
    conditioning (module docstring). ValueError when the denoiser does not call it exactly once per
    evaluation, gives it other timesteps than the sampler's, or changes a trajectory's conditioning
    between steps. A flow-matching sampler (``modiff.flow.FlowSamplerConfig``, ``schedule`` then the model's
    ``FlowGrid``) gives float timesteps; they are kept as the sampler passes them (float32), and the UNet's are
    compared with them in float32."""
    timesteps = sampler.evaluation_timesteps(schedule)
    steps = calibration_steps(len(timesteps), cali_st)
    wanted = sorted({*steps, *(i - 1 for i in steps if i > 0)})
    kept: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    batch_cond: list[Cond | None] = []  # per batch: the UNet's keyword tensors
    state = {"index": 0, "calls": 0}

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        index = state["index"]
        if unet is None:
            if index in kept:
                kept[index].append(x.detach().cpu())
            state["index"] += 1
            return denoiser(x, t)
        state["calls"] = 0
        out = denoiser(x, t)
        if state["calls"] != 1:
            raise ValueError(f"the denoiser called the UNet {state['calls']} times in one evaluation; calibration "
                             "data at the UNet's input needs exactly one call")
        state["index"] += 1
        return out

    def hook(module, args, kwargs):
        state["calls"] += 1
        index = state["index"]
        if index not in kept or state["calls"] > 1:  # a second call is refused after the evaluation
            return
        x, t, cond = unet_inputs(module, args, kwargs)
        t = t.expand(len(x)) if torch.is_tensor(t) else torch.full((len(x),), t)
        if not bool((t.detach().cpu() == timesteps[index]).all()):
            raise ValueError(f"the denoiser gives the UNet other timesteps ({t.unique().tolist()}) than the "
                             f"sampler's ({timesteps[index]}); calibration data cannot be kept at the UNet's input")
        cond = map_cond(cond, lambda value: value.detach().cpu())
        leaves = cond_leaves(cond)
        for name, value in leaves.items():
            if not value.dim() or value.shape[0] != len(x):
                raise ValueError(f"the UNet's argument {name!r} has {tuple(value.shape)} for a batch of {len(x)}: "
                                 "only per-row tensors are kept")
        if batch_cond[-1] is None:
            batch_cond[-1] = cond
        elif (first := cond_leaves(batch_cond[-1])).keys() != leaves.keys() or not all(
                torch.equal(first[k], leaves[k]) for k in leaves):
            raise ValueError("the UNet's conditioning changes along a trajectory; calibration data keeps one per "
                             "trajectory")
        kept[index].append(x.detach().cpu())

    def start() -> None:
        state["index"] = 0
        batch_cond.append(None)

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True) if unet is not None else None
    try:
        if isinstance(sampler, FlowSamplerConfig):
            sampler.sample(recording, schedule, list(seeds), image_shape, batch_size, device, progress=progress,
                           on_trajectory_start=start, on_batch=on_batch)
        else:
            sample(recording, schedule, sampler, list(seeds), image_shape, batch_size, device, progress=progress,
                   on_trajectory_start=start, leave=False, on_batch=on_batch)
    finally:
        if handle is not None:
            handle.remove()
    cond: Cond = {}
    if unet is not None and batch_cond and batch_cond[0]:
        names = cond_leaves(batch_cond[0]).keys()
        if any(c is None or cond_leaves(c).keys() != names for c in batch_cond):
            raise ValueError("the UNet's conditioning arguments differ between batches")
        cond = _join(batch_cond)
    return CalibrationData(steps=steps, x={i: torch.cat(v) for i, v in kept.items()},
                           t={i: timesteps[i] for i in wanted}, seeds=list(seeds), cond=cond)
