"""Flow-matching samplers over a ``(x_t, t) -> v`` velocity model: Euler as diffusers'
``FlowMatchEulerDiscreteScheduler`` steps it (SD3, FLUX), and Heun as its
``FlowMatchHeunDiscreteScheduler`` does. A building block beside ``modiff.samplers``, independent of
the DDPM ``NoiseSchedule``: a flow model is trained on x_sigma = (1 - sigma) x0 + sigma noise and
predicts the velocity v = noise - x0, so sampling integrates dx/dsigma = v from sigma = 1 (pure noise)
down to sigma = 0, and the model is called at the float timestep t = sigma * num_train_timesteps.

``FlowSchedule`` reads a scheduler config (``from_config``) and gives the sigmas of ``steps`` steps:
- ``spacing="scheduler"``: what ``scheduler.set_timesteps(steps, mu=mu)`` gives (SD3's pipeline
  uses this): timesteps evenly spaced between the largest and the smallest of the scheduler's
  1000 training sigmas, then shifted. With a static shift the smallest training sigma is already
  shifted, so the last sigma is shifted twice, as diffusers does it.
- ``spacing="flux"``: what FLUX's pipeline passes as ``sigmas``, ``linspace(1, 1/steps, steps)``,
  shifted once.
The shift is static, ``shift * s / (1 + (shift - 1) * s)`` (SD3: 3.0; FLUX schnell: 1.0), or,
with ``use_dynamic_shifting`` (FLUX dev), resolution dependent: ``e^mu / (e^mu + 1/s - 1)``
(``time_shift_type="exponential"``) or ``mu / (mu + 1/s - 1)`` (``"linear"``), with ``mu`` from the
image sequence length (``FlowSchedule.mu``, the line through (base_image_seq_len, base_shift) and
(max_image_seq_len, max_shift) that FLUX's and SD3's pipelines evaluate). The other sigma options
of the scheduler (inverted sigmas, a terminal stretch, Karras / exponential / beta sigmas,
stochastic sampling) are not used by SD3 or FLUX and are refused, one line naming the key.

Noise is drawn per sample from that sample's integer seed (``modiff.samplers.PerSampleNoise``), so
image i depends only on seed i. A caller's mistake raises ValueError with a one-line message.

For the benchmark harness, ``FlowSamplerConfig`` (``flow-euler``, ``flow-heun``) offers what it uses of
``modiff.samplers.SamplerConfig`` (``name``, ``steps``, ``eta``, ``timesteps``, ``evaluation_timesteps``, ``sample``)
over a ``FlowGrid``: a flow model's ``FlowSchedule`` with the spacing and mu its pipeline samples with, which stands
where a DDPM model has its ``NoiseSchedule``. Given a ``NoiseSchedule``, its methods raise ValueError (one line).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import check_choice
from .samplers import MAX_SEED, PerSampleNoise

__all__ = [
    "FLOW_SAMPLERS", "FLOW_SAMPLER_NAMES", "FLOW_SCHEDULERS", "FLOW_SOLVERS", "FLOW_SPACINGS", "TIME_SHIFT_TYPES",
    "FlowGrid", "FlowSamplerConfig", "FlowSchedule", "Velocity", "check_flow_settings", "flow_evaluation_timesteps",
    "sample_flow", "sample_flow_batch",
]

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t float of shape (batch,)) -> v
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")  # configs we read
FLOW_SOLVERS = ("euler", "heun")
FLOW_SPACINGS = ("scheduler", "flux")
TIME_SHIFT_TYPES = ("exponential", "linear")
FLOW_SAMPLERS = {"flow-euler": "euler", "flow-heun": "heun"}  # the harness's sampler names -> solver
FLOW_SAMPLER_NAMES = tuple(FLOW_SAMPLERS)
# Keys of FlowMatchEulerDiscreteScheduler that change the sigmas or the step, supported only at the value
# that leaves them off (none of SD3 / FLUX schnell / FLUX dev sets them), and what each is for.
_OFF = {
    "invert_sigmas": (False, "inverted sigmas (Mochi)"),
    "shift_terminal": (None, "a schedule stretched to end at shift_terminal (LTX-Video)"),
    "use_karras_sigmas": (False, "Karras sigmas"),
    "use_exponential_sigmas": (False, "exponential sigmas"),
    "use_beta_sigmas": (False, "beta sigmas"),
    "stochastic_sampling": (False, "stochastic sampling (fresh noise at every step)"),
}


def _is_off(value: object, off: object) -> bool:
    """Whether a config value leaves its option off: ``False`` for a flag; ``None`` (or 0, which diffusers
    also reads as off) for ``shift_terminal``."""
    if off is None:
        return value is None or (_is_number(value) and value == 0)
    return value is False or (isinstance(value, np.bool_) and not value)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass(frozen=True)
class FlowSchedule:
    """A flow-matching schedule as ``FlowMatchEulerDiscreteScheduler``'s config states it (its
    defaults); ``from_config`` reads and checks one (ValueError)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0  # static shift; ignored with dynamic shifting, as in diffusers
    use_dynamic_shifting: bool = False  # shift by mu, given per sampling run (``mu``)
    base_shift: float | None = 0.5  # mu at base_image_seq_len
    max_shift: float | None = 1.15  # mu at max_image_seq_len
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    def __post_init__(self):
        if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an integer >= 1, got {self.num_train_timesteps!r}")
        if not _is_number(self.shift) or self.shift <= 0:
            raise ValueError(f"shift must be a number > 0, got {self.shift!r}")
        if not isinstance(self.use_dynamic_shifting, bool):
            raise ValueError(f"use_dynamic_shifting must be true or false, got {self.use_dynamic_shifting!r}")
        for key in ("base_shift", "max_shift"):
            value = getattr(self, key)
            if value is not None and not _is_number(value):
                raise ValueError(f"{key} must be a number or null, got {value!r}")
        for key in ("base_image_seq_len", "max_image_seq_len"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {getattr(self, key)!r}")
        if self.max_image_seq_len <= self.base_image_seq_len:
            raise ValueError(f"max_image_seq_len ({self.max_image_seq_len}) must be larger than base_image_seq_len "
                             f"({self.base_image_seq_len})")
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type must be one of {', '.join(TIME_SHIFT_TYPES)}; "
                             f"got {self.time_shift_type!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> FlowSchedule:
        """From a ``FlowMatchEulerDiscreteScheduler`` (or ``FlowMatchHeunDiscreteScheduler``) config
        dict (``scheduler.config`` or its ``scheduler_config.json``). Keys starting with ``_`` are
        metadata; an unknown key, another scheduler class or a sigma option SD3 and FLUX do not use is
        a one-line ValueError naming it."""
        if not isinstance(config, Mapping):
            raise ValueError(f"a flow scheduler config must be a dict, got {type(config).__name__}")
        name = config.get("_class_name", FLOW_SCHEDULERS[0])
        if name not in FLOW_SCHEDULERS:
            raise ValueError(f"_class_name {name!r} is not a flow-matching scheduler; expected one of "
                             f"{', '.join(FLOW_SCHEDULERS)}")
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in _OFF:
                off, what = _OFF[key]
                if not _is_off(value, off):
                    raise ValueError(f"{key}={value!r} is not supported: {what} is not implemented by the flow "
                                     f"samplers (SD3 and FLUX leave it at {off!r})")
            elif key in known:
                kwargs[key] = value
            else:
                raise ValueError(f"unknown flow scheduler config key {key!r} (not a FlowMatchEulerDiscreteScheduler "
                                 "setting in diffusers 0.42.1)")
        return cls(**kwargs)

    def mu(self, image_seq_len: int) -> float:
        """The dynamic shift for ``image_seq_len`` image tokens, as FLUX's (and SD3.5's) pipeline computes it:
        linear in the sequence length, ``base_shift`` at ``base_image_seq_len``, ``max_shift`` at
        ``max_image_seq_len`` (extrapolated beyond). FLUX's sequence length is the number of packed 2x2 latent
        patches, (height // 16) * (width // 16) in pixels; SD3's is (latent height // patch) * (latent width //
        patch)."""
        if not _is_int(image_seq_len) or image_seq_len < 1:
            raise ValueError(f"image_seq_len must be an integer >= 1, got {image_seq_len!r}")
        if self.base_shift is None or self.max_shift is None:
            raise ValueError("mu from an image sequence length needs base_shift and max_shift in the scheduler config")
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return float(self.base_shift + slope * (image_seq_len - self.base_image_seq_len))

    def check_mu(self, mu: float | None) -> None:
        """ValueError unless ``mu`` fits the schedule: given (finite) exactly when it shifts dynamically."""
        if not self.use_dynamic_shifting:
            if mu is not None:
                raise ValueError(f"mu={mu!r} is given but the schedule has use_dynamic_shifting=false (static shift "
                                 f"{self.shift:g}); leave mu out")
            return
        if mu is None:
            raise ValueError("mu is required: the schedule has use_dynamic_shifting=true "
                             "(FlowSchedule.mu(image_seq_len) computes it as the pipeline does)")
        if not _is_number(mu):
            raise ValueError(f"mu must be a finite number, got {mu!r}")
        if self.time_shift_type == "linear" and mu <= 0:
            raise ValueError(f"mu must be > 0 with time_shift_type='linear', got {mu!r}")

    def _shifted(self, s: np.ndarray, mu: float | None) -> np.ndarray:
        if not self.use_dynamic_shifting:
            return self.shift * s / (1.0 + (self.shift - 1.0) * s)
        scale = math.exp(mu) if self.time_shift_type == "exponential" else mu
        return scale / (scale + (1.0 / s - 1.0))

    def grid(self, steps: int, mu: float | None = None,
             spacing: str = "scheduler") -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigmas, timesteps)`` of ``steps`` Euler steps, float32 as in diffusers: ``sigmas`` has
        ``steps + 1`` entries, decreasing from 1 and ending at 0; ``timesteps`` = ``sigmas[:-1] *
        num_train_timesteps``, the model's time at each step. ``mu``: the dynamic shift (required exactly
        when ``use_dynamic_shifting``; ``FlowSchedule.mu``). ``spacing``: ``"scheduler"`` (``set_timesteps``'s
        own grid) or ``"flux"`` (FLUX's pipeline's sigmas); see the module docstring."""
        check_steps(steps)
        check_choice("spacing", spacing, FLOW_SPACINGS)
        self.check_mu(mu)
        T = self.num_train_timesteps
        if spacing == "flux":
            base = np.linspace(1.0, 1.0 / steps, steps)
        else:  # the range of the scheduler's training sigmas, (shifted) T/T .. 1/T, spaced in timesteps
            top, bottom = np.array([1.0, 1.0 / T])
            if not self.use_dynamic_shifting:
                top, bottom = self._shifted(np.array([top, bottom]), mu)
            base = np.linspace(top * T, bottom * T, steps) / T
        sigmas = torch.from_numpy(self._shifted(base, mu)).to(torch.float32)
        timesteps = sigmas * T
        return torch.cat([sigmas, torch.zeros(1)]), timesteps


def check_steps(steps: int) -> None:
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    for seed in seeds:
        if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"each seed must be an integer in [0, 2^64 - 1], got {seed!r}")
    return seeds


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    if not isinstance(shape, Sequence) or not shape or not all(_is_int(n) and n >= 1 for n in shape):
        raise ValueError(f"shape must be a non-empty sequence of integers >= 1 (one sample's shape), got {shape!r}")
    return tuple(int(n) for n in shape)


def check_flow_settings(schedule: FlowSchedule, steps: int, mu: float | None = None, solver: str = "euler",
                        spacing: str = "scheduler", batch_size: int = 1) -> None:
    """What ``sample_flow`` checks before any work (ValueError, one line)."""
    if not isinstance(schedule, FlowSchedule):
        raise ValueError(f"schedule must be a FlowSchedule, got {type(schedule).__name__}")
    check_choice("solver", solver, FLOW_SOLVERS)
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch size must be an integer >= 1, got {batch_size!r}")
    schedule.grid(steps, mu, spacing)


def flow_evaluation_timesteps(schedule: FlowSchedule, steps: int, mu: float | None = None, solver: str = "euler",
                              spacing: str = "scheduler") -> list[float]:
    """The timestep of every velocity evaluation of one trajectory, in call order: ``steps`` for Euler,
    ``2 * steps - 1`` for Heun (each step but the last also evaluates at the next timestep; the last step,
    to sigma = 0, is an Euler step), as ``FlowMatchHeunDiscreteScheduler.timesteps`` lists them."""
    check_choice("solver", solver, FLOW_SOLVERS)
    timesteps = schedule.grid(steps, mu, spacing)[1].tolist()
    if solver == "euler":
        return timesteps
    return [timesteps[0], *(t for t in timesteps[1:] for _ in range(2))]


@torch.no_grad()
def sample_flow_batch(
    velocity: Velocity,
    schedule: FlowSchedule,
    steps: int,
    seeds: Sequence[int],
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    on_trajectory_start: Callable[[], None] | None = None,
    mu: float | None = None,
    progress: bool = False,
    solver: str = "euler",
    spacing: str = "scheduler",
    on_batch: Callable[[Sequence[int]], None] | None = None,
) -> torch.Tensor:
    """Sample one batch, one sample of ``shape`` per seed, from sigma = 1 to 0. The velocity is
    called as ``velocity(x, t)`` with ``t`` a float32 tensor of shape (batch,), ``sigma *
    num_train_timesteps``; x stays float32. Euler: ``x <- x + (sigma_next - sigma) v(x, t)``. Heun:
    the Euler point is evaluated at the next timestep and the step uses the mean of the two
    velocities, except the last step (to sigma = 0), which is Euler. ``on_batch(seeds)`` runs first
    (per-batch conditioning), ``on_trajectory_start`` once before the first evaluation (reset
    per-trajectory state there, never per step: Heun evaluates twice per step)."""
    seeds = _check_seeds(seeds)
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    shape = _check_shape(shape)
    check_flow_settings(schedule, steps, mu, solver, spacing)
    sigmas, timesteps = schedule.grid(steps, mu, spacing)
    if on_batch is not None:
        on_batch(list(seeds))
    x = PerSampleNoise(seeds, device).randn(shape)
    if on_trajectory_start is not None:
        on_trajectory_start()

    def evaluate(x: torch.Tensor, i: int) -> torch.Tensor:
        return velocity(x, torch.full((len(seeds),), float(timesteps[i]), device=x.device, dtype=torch.float32))

    for i in tqdm(range(steps), desc="steps", leave=False, disable=not progress):
        dt = float(sigmas[i + 1] - sigmas[i])  # a float32 value, as diffusers' step takes it
        v = evaluate(x, i)
        if solver == "heun" and i + 1 < steps:
            v = (v + evaluate(x + dt * v, i + 1)) / 2
        x = x + dt * v
    return x


def sample_flow(
    velocity: Velocity,
    schedule: FlowSchedule,
    steps: int,
    seeds: Sequence[int],
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    on_trajectory_start: Callable[[], None] | None = None,
    mu: float | None = None,
    progress: bool = False,
    batch_size: int = 64,
    solver: str = "euler",
    spacing: str = "scheduler",
    on_batch: Callable[[Sequence[int]], None] | None = None,
) -> torch.Tensor:
    """Sample ``len(seeds)`` samples in batches of ``batch_size`` (``sample_flow_batch``); returns them
    on the CPU in seed order. Every setting is checked before any work."""
    seeds = _check_seeds(seeds)
    shape = _check_shape(shape)
    check_flow_settings(schedule, steps, mu, solver, spacing, batch_size)
    batches = [seeds[i: i + batch_size] for i in range(0, len(seeds), batch_size)]
    out = [sample_flow_batch(velocity, schedule, steps, chunk, shape, device, on_trajectory_start, mu, progress,
                             solver, spacing, on_batch).cpu()
           for chunk in tqdm(batches, desc=f"flow-{solver} {steps} steps", unit="batch", disable=not progress)]
    return torch.cat(out) if out else torch.empty((0, *shape))


@dataclass(frozen=True)
class FlowGrid:
    """How a flow model's pipeline samples: its scheduler's ``FlowSchedule``, the ``spacing`` of its sigmas
    (SD3: ``"scheduler"``, FLUX: ``"flux"``) and ``mu`` (the dynamic shift, FLUX dev: ``FlowSchedule.mu`` of its
    image sequence length; None with a static shift). A flow model's ``schedule`` in the harness, where a DDPM
    model has a ``NoiseSchedule``; ``FlowSamplerConfig`` reads it."""

    schedule: FlowSchedule
    spacing: str = "scheduler"
    mu: float | None = None

    def __post_init__(self):
        if not isinstance(self.schedule, FlowSchedule):
            raise ValueError(f"schedule must be a FlowSchedule, got {type(self.schedule).__name__}")
        check_choice("spacing", self.spacing, FLOW_SPACINGS)
        self.schedule.check_mu(self.mu)

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps


@dataclass(frozen=True)
class FlowSamplerConfig:
    """A flow-matching sampler of the harness (``flow-euler``, ``flow-heun``) and its number of steps; the part of
    ``modiff.samplers.SamplerConfig``'s interface the harness uses, over a ``FlowGrid`` instead of a
    ``NoiseSchedule``. ``from_name`` checks the settings (ValueError)."""

    solver: str  # euler | heun
    steps: int
    eta: float = 0.0  # always 0: both solvers are deterministic (the field the harness records beside the others)

    @classmethod
    def from_name(cls, name: str, steps: int, eta: float = 0.0) -> FlowSamplerConfig:
        if name not in FLOW_SAMPLERS:
            raise ValueError(f"unknown flow sampler {name!r}; choose one of {', '.join(FLOW_SAMPLER_NAMES)}")
        if eta != 0.0:  # also NaN
            raise ValueError(f"{name} is deterministic: eta must be 0, got {eta}")
        check_steps(steps)
        return cls(FLOW_SAMPLERS[name], steps, 0.0)

    @property
    def name(self) -> str:
        return f"flow-{self.solver}"

    @property
    def algorithm(self) -> str:
        """The sampler's name: no DDPM-family algorithm (``modiff.samplers.ALGORITHMS``) matches it."""
        return self.name

    def _grid(self, grid: object) -> FlowGrid:
        if not isinstance(grid, FlowGrid):
            raise ValueError(f"{self.name} samples flow-matching models (a FlowGrid schedule); this model has a "
                             f"{type(grid).__name__}: use a DDPM-family sampler (ddim-*, ddpm-*, plms, dpm-solver++)")
        return grid

    def timesteps(self, grid: FlowGrid) -> list[float]:
        """The model times of the ``steps`` steps, increasing (the sampler walks them backwards), as
        ``SamplerConfig.timesteps`` lists its grid; float, ``sigma * num_train_timesteps``. Checks ``grid``."""
        grid = self._grid(grid)
        return grid.schedule.grid(self.steps, grid.mu, grid.spacing)[1].tolist()[::-1]

    def evaluation_timesteps(self, grid: FlowGrid) -> list[float]:
        """The (float) timestep of every velocity evaluation of one trajectory, in call order
        (``flow_evaluation_timesteps``: ``steps`` for Euler, ``2 * steps - 1`` for Heun)."""
        grid = self._grid(grid)
        return flow_evaluation_timesteps(grid.schedule, self.steps, grid.mu, self.solver, grid.spacing)

    def sample(self, velocity: Velocity, grid: FlowGrid, seeds: Sequence[int], shape: Sequence[int],
               batch_size: int = 64, device: torch.device | str = "cpu", progress: bool = False,
               on_trajectory_start: Callable[[], None] | None = None,
               on_batch: Callable[[Sequence[int]], None] | None = None) -> torch.Tensor:
        """``sample_flow`` with this sampler on ``grid``: ``len(seeds)`` samples, on the CPU in seed order."""
        grid = self._grid(grid)
        return sample_flow(velocity, grid.schedule, self.steps, seeds, shape, device, on_trajectory_start, grid.mu,
                           progress, batch_size, self.solver, grid.spacing, on_batch)
