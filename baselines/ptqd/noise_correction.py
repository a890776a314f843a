"""PTQD (He et al., NeurIPS 2023): correcting the quantization noise of a post-training-quantized
diffusion model, on top of any quantizer.

Error model
-----------
Run the full-precision denoiser and the quantized one on the same ``x_t`` (the full-precision
sampler drives ``x``) and write the quantized prediction as

    eps_Q = eps_FP + Delta,        Delta = k_t * eps_FP + b_t[c] + r,

- ``k_t * eps_FP``: the part of the error correlated with the prediction, and ``b_t[c]`` a
  per-step, per-channel bias. Both come from one least-squares fit of ``Delta`` on ``eps_FP`` at
  step ``t`` with an intercept per channel, pooled over all samples and spatial positions:

      k_t = sum_c Cov_c(eps_FP, Delta) / sum_c Var_c(eps_FP)

  with the (co)variances centred on each channel's mean. Where the channel means of ``eps_FP``
  agree (~0 for a trained denoiser) this is the ordinary slope with a single intercept on the
  pooled data (``scipy.stats.linregress``, as in the authors' analysis script); centring per
  channel keeps a per-channel bias from leaking into the slope when they do not.
  Only a positive slope is used at sampling time, ``k_used = max(k_t, 0)`` (the authors' code
  applies a ReLU), and the bias is the channel mean of what the used slope leaves:

      b_t[c] = mean_c(Delta) - k_used * mean_c(eps_FP)

  i.e. the authors' ``mean_c(Delta)`` up to the (near-zero) channel mean of ``eps_FP``; this
  form keeps the corrected prediction unbiased per channel in general;
- ``r``: the uncorrelated residual, treated as Gaussian noise. Its std per step is the std over
  the elements of each sample of ``Delta - k_used * eps_FP - b_t[c]`` (unbiased, like
  ``torch.std``), averaged over samples. Removing ``b_t[c]`` first keeps a per-channel bias from
  counting as noise; with a channel-independent bias this is the authors' residual std (their
  script also removes ``k_used * eps_FP``, the slope actually applied, not the raw ``k_t``).

Sampling
--------
- Correlated noise and bias: ``eps_hat = (eps_Q - b_t) / (1 + k_used)``. With the model above,
  ``eps_hat = eps_FP + r / (1 + k_used)``.
- Variance schedule calibration (only where the sampler adds noise: DDIM with eta > 0, DDPM).
  The residual left in ``eps_hat`` has std ``sigma_q = residual_std / (1 + k_used)`` and enters
  ``x_{t-1}`` with the coefficient ``c`` of eps in the update (the sampler supplies it), so it adds
  variance ``c^2 sigma_q^2``. The fresh noise is shrunk to keep the total at the schedule's:
  ``sigma_t' = sqrt(max(sigma_t^2 - c^2 sigma_q^2, 0))``.

Not implemented: the paper's step-aware mixed precision (a different bit width for different
steps) is not in the authors' released code and is left out here.

Statistics are accumulated batch by batch as float64 sums of products per (step, sample,
channel); no prediction tensor is kept, so thousands of calibration trajectories fit in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from modiff.samplers import ALGORITHMS, Denoiser, PerSampleNoise, SamplerConfig, denoising_step
from modiff.schedules import NoiseSchedule

__all__ = ["PTQDStats", "PTQDCorrection", "collect_statistics"]


@dataclass
class PTQDStats:
    """Per-step PTQD statistics, in sampling order (index 0 = the first, noisiest step).

    ``k``: raw least-squares slope of Delta on eps_FP (steps,); ``bias``: per-channel bias to
    subtract, (steps, C); ``residual_std``: std of the uncorrelated residual (steps,);
    ``timesteps``: the t of each step; ``n_samples``: calibration trajectories."""

    k: torch.Tensor
    bias: torch.Tensor
    residual_std: torch.Tensor
    timesteps: list[int]
    n_samples: int

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def k_used(self) -> torch.Tensor:
        """The slope applied at sampling time: ``max(k_t, 0)``."""
        return self.k.clamp_min(0.0)

    @property
    def sigma_q(self) -> torch.Tensor:
        """Std of the noise left in the corrected prediction: ``residual_std / (1 + k_used)``."""
        return self.residual_std / (1.0 + self.k_used)

    def to_dict(self) -> dict[str, Any]:
        """Plain tensors, ints and lists (loadable with ``torch.load(weights_only=True)``)."""
        return {"k": self.k.detach().cpu().double(), "bias": self.bias.detach().cpu().double(),
                "residual_std": self.residual_std.detach().cpu().double(),
                "timesteps": [int(t) for t in self.timesteps], "n_samples": int(self.n_samples)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PTQDStats:
        stats = cls(k=torch.as_tensor(data["k"], dtype=torch.float64),
                    bias=torch.as_tensor(data["bias"], dtype=torch.float64),
                    residual_std=torch.as_tensor(data["residual_std"], dtype=torch.float64),
                    timesteps=[int(t) for t in data["timesteps"]], n_samples=int(data["n_samples"]))
        n = stats.steps
        if stats.k.shape != (n,) or stats.residual_std.shape != (n,) or stats.bias.dim() != 2 \
                or stats.bias.shape[0] != n:
            raise ValueError("inconsistent PTQD statistics: shapes of k, bias, residual_std and timesteps differ")
        return stats


class _Moments:
    """Streaming sums for one step: per (sample, channel) the float64 sums of Delta, eps, Delta^2,
    eps^2 and Delta * eps. Five numbers per sample and channel, whatever the image size."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []  # each (batch, C, 5)
        self.per_channel: int | None = None  # elements per channel (H * W)

    def add(self, eps: torch.Tensor, delta: torch.Tensor) -> None:
        e = eps.detach().double().flatten(2)  # (B, C, HW)
        d = delta.detach().double().flatten(2)
        self.per_channel = e.shape[2]
        sums = torch.stack([d.sum(2), e.sum(2), (d * d).sum(2), (e * e).sum(2), (d * e).sum(2)], dim=2)
        self.chunks.append(sums.cpu())

    def finish(self) -> tuple[float, torch.Tensor, float]:
        """(k, bias (C,), residual_std) from the accumulated sums."""
        s = torch.cat(self.chunks)  # (N, C, 5)
        n_samples, channels = s.shape[:2]
        m = self.per_channel
        channel = s.sum(dim=0) / (n_samples * m)  # (C, 5): per-channel means of d, e, d^2, e^2, d*e
        mean_d, mean_e = channel[:, 0], channel[:, 1]
        var_e = (channel[:, 3] - mean_e**2).sum()  # sum over channels of the centred moments
        cov = (channel[:, 4] - mean_d * mean_e).sum()
        k = float(cov / var_e) if var_e > 0 else 0.0
        ku = max(k, 0.0)
        bias = mean_d - ku * mean_e  # mean_c(Delta - k_used eps)
        # residual r = Delta - ku * eps - bias[c], per sample: sum over elements of r and of r^2
        sd, se, sdd, see, sde = s.unbind(2)  # each (N, C)
        b = bias.unsqueeze(0)
        sum_r = (sd - ku * se - m * b).sum(1)
        sum_r2 = (sdd + ku**2 * see + m * b**2 - 2 * ku * sde - 2 * b * sd + 2 * ku * b * se).sum(1)
        elements = channels * m
        var = ((sum_r2 - sum_r**2 / elements) / max(elements - 1, 1)).clamp_min(0.0)
        return k, bias, float(var.sqrt().mean())


@torch.no_grad()
def collect_statistics(
    fp_denoiser: Denoiser,
    q_denoiser: Denoiser,
    schedule: NoiseSchedule,
    sampler_config: SamplerConfig,
    seeds: Sequence[int],
    image_shape: Sequence[int],
    batch_size: int,
    device: torch.device | str = "cpu",
    on_trajectory_start: Callable[[], None] | None = None,
    progress: bool = False,
    on_batch: Callable[[Sequence[int]], None] | None = None,
) -> PTQDStats:
    """Run ``len(seeds)`` full-precision trajectories (the sampler of ``sampler_config``, noise
    drawn per seed exactly as ``modiff.samplers.sample`` draws it); at every step also call the
    quantized denoiser on the same ``x_t`` and accumulate the statistics of
    ``Delta = eps_Q - eps_FP`` against ``eps_FP`` (see the module docstring).
    ``on_trajectory_start`` (the quantized model's per-trajectory reset) runs before each batch."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("PTQD needs at least one calibration sample")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if sampler_config.algorithm not in ALGORITHMS:
        raise ValueError(f"PTQD statistics follow DDIM/DDPM updates, not {sampler_config.name}")
    pairs = sampler_config.step_pairs(schedule)  # ddim-ldm's last step ends at alpha_bar(0)
    moments = [_Moments() for _ in pairs]
    batches = [seeds[i: i + batch_size] for i in range(0, len(seeds), batch_size)]
    for chunk in tqdm(batches, desc="PTQD statistics", unit="batch", disable=not progress, leave=False):
        if on_batch is not None:  # per-batch conditioning (a text-conditioned model's prompts)
            on_batch(chunk)
        noise = PerSampleNoise(chunk, device)
        x = noise.randn(image_shape)
        if on_trajectory_start is not None:
            on_trajectory_start()
        for index, (t, t_prev) in enumerate(pairs):
            t_batch = torch.full((len(chunk),), t, device=device, dtype=torch.long)
            eps_fp = fp_denoiser(x, t_batch)
            eps_q = q_denoiser(x, t_batch)
            moments[index].add(eps_fp, eps_q - eps_fp)
            x = denoising_step(sampler_config.algorithm, x, eps_fp, schedule.alpha_bar(t),
                               schedule.alpha_bar(t_prev), sampler_config.eta, noise)
    ks, biases, stds = zip(*(m.finish() for m in moments), strict=True)
    return PTQDStats(k=torch.tensor(ks, dtype=torch.float64), bias=torch.stack(biases),
                     residual_std=torch.tensor(stds, dtype=torch.float64), timesteps=[t for t, _ in pairs],
                     n_samples=len(seeds))


class PTQDCorrection:
    """Applies collected statistics at sampling time.

    ``wrap(denoiser)`` returns ``(x, t) -> (eps_Q - b_t) / (1 + k_used)``. The step is a counter
    shared by all wrapped denoisers of this object; ``reset()`` must run at the start of every
    trajectory (add it to ``on_trajectory_start``). A call whose ``t`` is not the counter's step
    (e.g. warm-up calls) falls back to the first step with that ``t``; an unknown ``t`` is an error.
    ``noise_std`` is the sampler hook of the variance schedule calibration."""

    def __init__(self, stats: PTQDStats):
        self.stats = stats
        self.index = 0
        self._k_used = [float(k) for k in stats.k_used]
        self._sigma_q = [float(s) for s in stats.sigma_q]
        self._first_step = {}
        for i, t in enumerate(stats.timesteps):
            self._first_step.setdefault(int(t), i)
        self._bias: dict[tuple, torch.Tensor] = {}

    def reset(self) -> None:
        self.index = 0

    def _bias_on(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._bias:
            self._bias[key] = self.stats.bias.to(device=like.device, dtype=like.dtype)
        return self._bias[key]

    def step_of(self, t: torch.Tensor | int) -> int:
        """The statistics' step for this call (advances the counter)."""
        t_value = int(t.flatten()[0]) if torch.is_tensor(t) else int(t)
        index = self.index
        self.index += 1
        if index < self.stats.steps and self.stats.timesteps[index] == t_value:
            return index
        if t_value not in self._first_step:
            raise RuntimeError(f"PTQD: no statistics for timestep {t_value} (collected for "
                               f"{self.stats.timesteps[0]}..{self.stats.timesteps[-1]}, {self.stats.steps} steps)")
        return self._first_step[t_value]

    def correct(self, eps_q: torch.Tensor, index: int) -> torch.Tensor:
        """``(eps_Q - b_t) / (1 + k_used)`` for step ``index``."""
        bias = self._bias_on(eps_q)[index].view(1, -1, *([1] * (eps_q.dim() - 2)))
        return (eps_q - bias) / (1.0 + self._k_used[index])

    def wrap(self, denoiser: Denoiser) -> Denoiser:
        def corrected(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            index = self.step_of(t)
            return self.correct(denoiser(x, t), index)

        return corrected

    def noise_std(self, index: int, sigma: float, eps_coefficient: float) -> float:
        """``sqrt(max(sigma^2 - c^2 sigma_q^2, 0))`` with ``sigma_q = residual_std / (1 + k_used)``."""
        variance = sigma**2 - (eps_coefficient * self._sigma_q[index]) ** 2
        return math.sqrt(variance) if variance > 0 else 0.0
