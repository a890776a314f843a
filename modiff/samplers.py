"""Samplers over a ``(x_t, t) -> eps`` denoiser: DDIM and DDPM as in the DDIM code base, DDIM and
PLMS as in latent-diffusion, and singlestep DPM-Solver++ of order 3. A building block shared by
``modiff``, ``baselines`` and the ``bench`` harness; a setting it cannot take is a ValueError naming
it (the harness reports it as a one-line error).

- ``ddim-*`` / ``ddpm-*``: the update rules of the DDIM code base used by Q-Diffusion and MoDiff
  (``generalized_steps`` and ``ddpm_steps``): no clipping of x0 in DDIM, x0 clipped to [-1, 1] in
  DDPM, alpha_bar(-1) = 1.
- ``ddpm-ldm-uniform`` (algorithm ``ddpm-ldm``): ancestral DDPM as latent-diffusion samples its latent
  models (``LatentDiffusion.p_sample_loop``, what the MoDiff authors' ``sample_diffusion_ldm.py
  --vanilla_sample`` runs for the paper's Table 5): x0 is not clipped (``LatentDiffusion`` sets
  ``clip_denoised = False``; latents are not confined to [-1, 1]) and the fresh noise has the
  posterior variance ``beta_t (1 - alpha_bar_prev) / (1 - alpha_bar_t)``, not ``beta_t``. On the DDIM
  code base's uniform grid, ending at alpha_bar(-1) = 1; at ``steps = T`` that is latent-diffusion's
  loop exactly (every t from T - 1 down to 0, no noise after the last step).
- ``ddim-ldm``: the same DDIM update on latent-diffusion's grid ``range(0, T, T // steps) + 1``,
  whose last step ends at alphas_cumprod[0] (``modiff.schedules``); eta as in DDIM.
- ``plms``: latent-diffusion's PLMS (``ldm/models/diffusion/plms.py``, used by Stable
  Diffusion's ``--plms``) on that grid: a pseudo improved Euler first step (two network
  evaluations), then Adams-Bashforth of order 2, 3 and 4 on the noise predictions, each step a
  DDIM (eta = 0) update. ``steps + 1`` network evaluations when ``steps`` divides T. Always
  latent-diffusion's convention (offset 1, last step to alphas_cumprod[0]), for every model: it
  equals diffusers' ``PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)``,
  Stable Diffusion's settings, whenever ``steps`` divides T. Deterministic.
- ``dpm-solver++``: singlestep DPM-Solver++ of order 3 ("DPM-Solver-fast"), data prediction, as
  LuChengTHU/dpm-solver runs it in the MoDiff authors' ablation (``order=3,
  method="singlestep", skip_type="time_uniform"``, solver type "dpmsolver"): ``steps`` network
  evaluations, grouped into solver steps of order 3, ..., 3 and then 2, 1 or 2+1 (``steps % 3``);
  the intermediate points of a step are the grid points inside it. The grid is integer
  (``modiff.schedules``, "linspace"): that code feeds the network continuous times (999 - 49.95 k
  for 20 steps), which the ``(x_t, t)`` interface with integer t cannot; the timesteps are the ones
  diffusers' ``DPMSolverSinglestepScheduler`` uses and the last step ends at t = 0 (DPM-Solver's
  ``t_0 = 1/N``, no final denoising). diffusers' scheduler is not used: its third-order steps
  predict the second intermediate point with the midpoint form, not the reference code's.
  Deterministic.

Noise is drawn per sample from that sample's own integer seed (as NVlabs/edm does), so image i
depends only on seed i, never on the batch it was generated in.

Every update is written for a noise prediction. A v-prediction model (Stable Diffusion 2.x at 768,
``prediction_type="v_prediction"`` in its scheduler config) samples through ``prediction_type=
"v_prediction"`` (``sample``, ``sample_batch``) or a denoiser wrapped once by ``epsilon_denoiser``:
v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0 and x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps give
eps = sqrt(ab_t) v + sqrt(1 - ab_t) x_t exactly, so each algorithm stays what it is (diffusers' schedulers
convert the same way).

A caller's mistake (an unknown sampler, eta out of range, a number of steps the grid cannot have,
a batch size below 1) raises ValueError with a one-line message.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .schedules import SPACINGS, NoiseSchedule, final_timestep, step_pairs, timestep_sequence

__all__ = [
    "ALGORITHMS", "DETERMINISTIC", "MAX_SEED", "PREDICTION_TYPES", "SAMPLERS", "SAMPLER_NAMES", "Denoiser", "NoiseStd",
    "PerSampleNoise", "SamplerConfig", "check_prediction_type", "check_seeds", "check_settings", "denoising_step",
    "dpm_solver_orders", "epsilon_denoiser", "sample", "sample_batch",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (step index, sigma_t, coefficient of eps in x_{t-1}) -> the std of the fresh noise to add instead
# of sigma_t (PTQD's variance schedule calibration); the deterministic part keeps sigma_t.
NoiseStd = Callable[[int, float, float], float]
LDM_DDPM = "ddpm-ldm"  # latent-diffusion's DDPM: x0 not clipped, posterior variance
ALGORITHMS = ("ddim", "ddpm", LDM_DDPM)  # one network evaluation per step, updated by ``denoising_step``
DETERMINISTIC = ("plms", "dpm-solver++")  # algorithms without fresh noise (eta must be 0)
# name -> (algorithm, timestep grid)
SAMPLERS = {
    **{f"{a}-{s}": (a, s) for a in ("ddim", "ddpm") for s in SPACINGS},
    "ddpm-ldm-uniform": (LDM_DDPM, "uniform"),
    "ddim-ldm": ("ddim", "ldm"),
    "plms": ("plms", "ldm"),
    "dpm-solver++": ("dpm-solver++", "linspace"),
}
SAMPLER_NAMES = tuple(SAMPLERS)
_NAMES = {spec: name for name, spec in SAMPLERS.items()}
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the denoiser predicts, in diffusers' spelling


@dataclass(frozen=True)
class SamplerConfig:
    """A sampler and its settings; ``from_name`` checks them (ValueError)."""

    algorithm: str  # ddim | ddpm | ddpm-ldm | plms | dpm-solver++
    spacing: str  # the timestep grid: quad | uniform (DDIM code base) | ldm | linspace (modiff.schedules)
    steps: int  # solver steps asked for; network evaluations: ``evaluation_timesteps``
    eta: float = 0.0  # DDIM only; DDPM is ancestral by definition, PLMS and DPM-Solver++ deterministic

    @classmethod
    def from_name(cls, name: str, steps: int, eta: float = 0.0) -> SamplerConfig:
        if name not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        algorithm, spacing = SAMPLERS[name]
        if not 0.0 <= eta <= 1.0:  # also rejects NaN
            raise ValueError(f"eta must be between 0 (deterministic DDIM) and 1, got {eta}")
        if algorithm in DETERMINISTIC and eta != 0.0:
            raise ValueError(f"{name} is deterministic: eta must be 0, got {eta}")
        return cls(algorithm, spacing, steps, eta)

    def __eq__(self, other: object) -> bool:  # by value, also against a subclass
        if not isinstance(other, SamplerConfig):
            return NotImplemented
        return ((self.algorithm, self.spacing, self.steps, self.eta)
                == (other.algorithm, other.spacing, other.steps, other.eta))

    @property
    def name(self) -> str:
        return _NAMES.get((self.algorithm, self.spacing), f"{self.algorithm}-{self.spacing}")

    def timesteps(self, schedule: NoiseSchedule) -> list[int]:
        """The solver's timestep grid without its end point, increasing (the sampler walks it
        backwards; a DPM-Solver++ step of order k spans k entries). Validates ``steps`` against the
        schedule (ValueError). Network evaluations: ``evaluation_timesteps``."""
        return timestep_sequence(self.spacing, self.steps, schedule.num_train_timesteps)

    def step_pairs(self, schedule: NoiseSchedule) -> list[tuple[int, int]]:
        """``(t, t_prev)`` of every solver step in sampling order; the last ends at -1 (the DDIM
        code base's grids) or 0 (``ldm``, ``linspace``). A DPM-Solver step of order k spans k pairs."""
        return step_pairs(self.timesteps(schedule), final_timestep(self.spacing))

    def evaluation_timesteps(self, schedule: NoiseSchedule) -> list[int]:
        """The timestep of every network evaluation of one trajectory, in call order."""
        down = [t for t, _ in self.step_pairs(schedule)]
        if self.algorithm == "plms":  # the first step also evaluates at the next timestep
            return [down[0], down[min(1, len(down) - 1)], *down[1:]]
        return down


def dpm_solver_orders(steps: int) -> list[int]:
    """Orders of the singlestep DPM-Solver-3 steps that use ``steps`` evaluations in all
    (LuChengTHU/dpm-solver's "DPM-Solver-fast" split): 3, ..., 3 then 2+1, 1 or 2."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    k = steps // 3 + 1
    tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
    return [3] * (k - len(tail)) + tail


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds


class PerSampleNoise:
    """One CPU generator per sample: draws for sample i depend only on its seed and call order."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = torch.device(device)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        draws = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(self.device)


def denoising_step(
    algorithm: str, x: torch.Tensor, eps: torch.Tensor, ab_t: float, ab_prev: float, eta: float,
    noise: PerSampleNoise, noise_std: Callable[[float, float], float] | None = None,
) -> torch.Tensor:
    """One DDIM or DDPM update from ``x`` = x_t to x_{t_prev}, the update ``sample`` applies for the
    algorithms of ``ALGORITHMS`` (one network evaluation per step).

    ``algorithm``: ``"ddim"``, ``"ddpm"`` or ``"ddpm-ldm"`` (latent-diffusion's: x0 unclipped, posterior
    variance); ``eps``: the noise prediction at x_t; ``ab_t``,
    ``ab_prev``: alpha_bar at t and at the step's end (``NoiseSchedule.alpha_bar``, 1 at t = -1);
    ``eta``: DDIM's stochasticity (0: deterministic; ignored by DDPM, ancestral by definition);
    ``noise``: the batch's per-sample generators, drawn in ``sample``'s order (DDPM draws at every
    step, also the last, so a sample's stream does not depend on t). ``noise_std(sigma_t,
    eps_coefficient)`` may replace the std of the fresh noise, given the schedule's sigma_t and the
    coefficient of eps in x_{t_prev} (PTQD's variance schedule calibration); the deterministic part
    keeps sigma_t. Sampling outside ``sample`` (e.g. PTQD's statistics, which drive a second
    denoiser along the same trajectory) calls this to stay bit-identical to it."""
    if algorithm == "ddim":
        x0 = (x - eps * math.sqrt(1.0 - ab_t)) / math.sqrt(ab_t)
        c1 = eta * math.sqrt((1.0 - ab_t / ab_prev) * (1.0 - ab_prev) / (1.0 - ab_t))
        c2 = math.sqrt(1.0 - ab_prev - c1**2)
        out = math.sqrt(ab_prev) * x0 + c2 * eps
        if c1 > 0:
            std = c1 if noise_std is None else noise_std(c1, c2 - math.sqrt(ab_prev * (1.0 - ab_t) / ab_t))
            out = out + std * noise.randn(x.shape[1:])
        return out
    # DDPM ancestral step: the posterior mean with x0 clipped and variance beta_t (``ddpm``, the DDIM code
    # base's ddpm_steps), or with x0 unclipped and the posterior variance (``ddpm-ldm``, latent-diffusion)
    beta_t = 1.0 - ab_t / ab_prev
    x0 = math.sqrt(1.0 / ab_t) * x - math.sqrt(1.0 / ab_t - 1.0) * eps
    if algorithm == "ddpm":
        x0 = x0.clamp(-1.0, 1.0)
    mean = (math.sqrt(ab_prev) * beta_t * x0 + math.sqrt(1.0 - beta_t) * (1.0 - ab_prev) * x) / (1.0 - ab_t)
    z = noise.randn(x.shape[1:])  # drawn at every step, so the stream does not depend on t
    if ab_prev >= 1.0:  # the posterior variance is 0: no noise after the last step
        return mean
    std = math.sqrt(beta_t) if algorithm == "ddpm" else math.sqrt(beta_t * (1.0 - ab_prev) / (1.0 - ab_t))
    if noise_std is not None:  # eps enters the mean through x0 (clipping ignored)
        std = noise_std(std, -math.sqrt(ab_prev) * beta_t / (1.0 - ab_t) * math.sqrt(1.0 / ab_t - 1.0))
    return mean + std * z


def check_prediction_type(prediction_type: str) -> None:
    """ValueError (one line) unless ``prediction_type`` is one of ``PREDICTION_TYPES``."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)} "
                         "(the model's scheduler config says which)")


def epsilon_denoiser(denoiser: Denoiser, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> Denoiser:
    """``denoiser`` as a noise prediction: itself for ``"epsilon"``; for ``"v_prediction"`` the wrapper
    ``eps = sqrt(ab_t) v + sqrt(1 - ab_t) x_t``, ab_t looked up per row of ``t`` (float64 schedule, float32
    coefficients). Wrapping the denoiser once gives every consumer (calibration, statistics) eps."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return denoiser
    alpha_bar = schedule._alpha_bar_ext  # index t + 1

    def eps_from_v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = alpha_bar[torch.as_tensor(t).cpu().long() + 1].view(-1, *([1] * (x.dim() - 1)))
        v = denoiser(x, t)
        signal = ab.sqrt().to(device=v.device, dtype=torch.float32)
        noise = (1.0 - ab).sqrt().to(device=v.device, dtype=torch.float32)
        return signal * v + noise * x

    return eps_from_v


def _ddim0(x: torch.Tensor, eps: torch.Tensor, ab_t: float, ab_prev: float) -> torch.Tensor:
    """The deterministic DDIM update (latent-diffusion's ``get_x_prev_and_pred_x0`` at eta = 0)."""
    x0 = (x - eps * math.sqrt(1.0 - ab_t)) / math.sqrt(ab_t)
    return math.sqrt(ab_prev) * x0 + math.sqrt(1.0 - ab_prev) * eps


def _plms(evaluate: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, schedule: NoiseSchedule,
          pairs: list[tuple[int, int]], bar) -> torch.Tensor:
    """latent-diffusion's PLMS; ``old`` holds the noise predictions at the previous step starts."""
    old: list[torch.Tensor] = []
    for t, t_prev in pairs:
        ab_t, ab_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
        eps = evaluate(x, t)
        if not old:  # pseudo improved Euler: also evaluate at the next grid timestep
            t_next = pairs[min(1, len(pairs) - 1)][0]
            eps_next = evaluate(_ddim0(x, eps, ab_t, ab_prev), t_next)
            combined = (eps + eps_next) / 2
        elif len(old) == 1:
            combined = (3 * eps - old[-1]) / 2
        elif len(old) == 2:
            combined = (23 * eps - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            combined = (55 * eps - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = _ddim0(x, combined, ab_t, ab_prev)
        old = [*old[-2:], eps]
        bar.update(1)
    return x


def _dpm_solver_pp(evaluate: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor,
                   schedule: NoiseSchedule, pairs: list[tuple[int, int]], bar=None,
                   orders: Sequence[int] | None = None) -> torch.Tensor:
    """Singlestep DPM-Solver++ (data prediction) over the grid of ``pairs``: solver steps of the
    given ``orders`` (default ``dpm_solver_orders``), each spanning that many grid intervals."""
    grid = [t for t, _ in pairs] + [pairs[-1][1]]
    orders = dpm_solver_orders(len(pairs)) if orders is None else list(orders)
    if sum(orders) != len(pairs) or not set(orders) <= {1, 2, 3}:
        raise ValueError(f"orders {orders} (each 1, 2 or 3) must cover the {len(pairs)} grid intervals")

    def coefficients(t: int) -> tuple[float, float, float]:  # alpha_t, sigma_t, lambda_t
        ab = schedule.alpha_bar(t)
        alpha, sigma = math.sqrt(ab), math.sqrt(1.0 - ab)
        return alpha, sigma, math.log(alpha) - math.log(sigma)

    def data(x: torch.Tensor, t: int) -> torch.Tensor:  # x0 predicted from the noise prediction
        alpha, sigma, _ = coefficients(t)
        return (x - sigma * evaluate(x, t)) / alpha

    start = 0
    for order in orders:
        s, t = grid[start], grid[start + order]
        (_, sigma_s, lambda_s), (alpha_t, sigma_t, lambda_t) = coefficients(s), coefficients(t)
        h = lambda_t - lambda_s
        phi_1 = math.expm1(-h)
        m_s = data(x, s)
        if order == 1:
            x = (sigma_t / sigma_s) * x - (alpha_t * phi_1) * m_s
        else:
            s1 = grid[start + 1]
            alpha_1, sigma_1, lambda_1 = coefficients(s1)
            r1 = (lambda_1 - lambda_s) / h
            m_1 = data((sigma_1 / sigma_s) * x - (alpha_1 * math.expm1(-r1 * h)) * m_s, s1)
            if order == 2:
                x = ((sigma_t / sigma_s) * x - (alpha_t * phi_1) * m_s
                     - (0.5 / r1) * (alpha_t * phi_1) * (m_1 - m_s))
            else:
                s2 = grid[start + 2]
                alpha_2, sigma_2, lambda_2 = coefficients(s2)
                r2 = (lambda_2 - lambda_s) / h
                phi_22 = math.expm1(-r2 * h) / (r2 * h) + 1.0
                x_2 = ((sigma_2 / sigma_s) * x - (alpha_2 * math.expm1(-r2 * h)) * m_s
                       + (r2 / r1) * (alpha_2 * phi_22) * (m_1 - m_s))
                m_2 = data(x_2, s2)
                phi_2 = phi_1 / h + 1.0
                x = (sigma_t / sigma_s) * x - (alpha_t * phi_1) * m_s + (1.0 / r2) * (alpha_t * phi_2) * (m_2 - m_s)
        start += order
        if bar is not None:
            bar.update(order)
    return x


@torch.no_grad()
def sample_batch(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    config: SamplerConfig,
    seeds: Sequence[int],
    image_shape: Sequence[int],
    device: torch.device | str = "cpu",
    progress: bool = False,
    on_trajectory_start: Callable[[], None] | None = None,
    noise_std: NoiseStd | None = None,
    on_batch: Callable[[Sequence[int]], None] | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Sample one batch, one image per seed. ``on_trajectory_start`` runs once, before the first
    network evaluation (per-trajectory state such as MoDiff's must be reset there, never per step
    or per evaluation: PLMS and DPM-Solver++ evaluate the network more than once in some steps).
    ``noise_std`` (step index, sigma_t, eps coefficient) -> std replaces the std of each step's
    fresh noise (DDIM and DDPM only; the other samplers add none). ``on_batch(seeds)`` runs first
    (per-batch conditioning, e.g. a zoo model's prompts). ``prediction_type``: what ``denoiser``
    predicts, ``"epsilon"`` or ``"v_prediction"`` (``epsilon_denoiser``)."""
    denoiser = epsilon_denoiser(denoiser, schedule, prediction_type)
    if on_batch is not None:
        on_batch(list(seeds))
    noise = PerSampleNoise(seeds, device)
    x = noise.randn(image_shape)
    pairs = config.step_pairs(schedule)
    if on_trajectory_start is not None:
        on_trajectory_start()
    if config.algorithm in ALGORITHMS:
        for index, (t, t_prev) in enumerate(tqdm(pairs, desc="steps", leave=False, disable=not progress)):
            t_batch = torch.full((len(seeds),), t, device=device, dtype=torch.long)
            eps = denoiser(x, t_batch)
            std = None if noise_std is None else (lambda sigma, coef, i=index: noise_std(i, sigma, coef))
            x = denoising_step(config.algorithm, x, eps, schedule.alpha_bar(t), schedule.alpha_bar(t_prev), config.eta,
                      noise, std)
        return x

    def evaluate(x: torch.Tensor, t: int) -> torch.Tensor:
        return denoiser(x, torch.full((len(seeds),), t, device=device, dtype=torch.long))

    solve = _plms if config.algorithm == "plms" else _dpm_solver_pp
    with tqdm(total=len(pairs), desc="steps", leave=False, disable=not progress) as bar:
        return solve(evaluate, x, schedule, pairs, bar)


def check_seeds(first: int, n: int, where: str = "seed") -> None:
    """ValueError unless the seeds ``first`` .. ``first + n - 1`` are all within [0, 2^64 - 1] (``MAX_SEED``);
    ``where`` names the setting in the message."""
    if first < 0:
        raise ValueError(f"{where} must be >= 0, got {first}")
    if first + n - 1 > MAX_SEED:
        raise ValueError(f"{where} {first} with {n} samples runs past the largest seed 2^64 - 1 = {MAX_SEED} "
                         f"(the last would be {first + n - 1})")


def check_settings(config: SamplerConfig, schedule: NoiseSchedule, batch_size: int = 1) -> None:
    """What ``sample`` checks before any work: ValueError unless ``config`` can sample on
    ``schedule`` (its steps fit the grid) in batches of ``batch_size`` (>= 1)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    config.timesteps(schedule)


def sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    config: SamplerConfig,
    seeds: Sequence[int],
    image_shape: Sequence[int],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_trajectory_start: Callable[[], None] | None = None,
    leave: bool = True,
    noise_std: NoiseStd | None = None,
    on_batch: Callable[[Sequence[int]], None] | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Sample ``len(seeds)`` images in batches; returns them on the CPU in seed order.
    ``leave=False`` clears the progress bar when done (for bars nested in an outer one).
    ``prediction_type``: ``"epsilon"`` or ``"v_prediction"`` (module docstring)."""
    check_settings(config, schedule, batch_size)  # before any work
    check_prediction_type(prediction_type)
    seeds = list(seeds)
    out = []
    batches = [seeds[i: i + batch_size] for i in range(0, len(seeds), batch_size)]
    for chunk in tqdm(batches, desc=f"{config.name} {config.steps} steps", unit="batch", disable=not progress,
                      leave=leave):
        out.append(
            sample_batch(denoiser, schedule, config, chunk, image_shape, device, progress, on_trajectory_start,
                         noise_std, on_batch, prediction_type).cpu()
        )
    return torch.cat(out) if out else torch.empty((0, *image_shape))
