"""Q-Diffusion's two learnable quantizers: AdaRound for weights, LSQ-style static step sizes for
activations (with the two-part variant used by shortcut splitting).

AdaRound (Nagel et al. 2020) keeps the per-output-channel grid of the weight fixed and learns, for
every element, whether it rounds down or up: ``W_q = s * (clamp(floor(W / s) + h(alpha) + z, 0,
2^b - 1) - z)`` with the rectified sigmoid ``h = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``
(gamma = -0.1, zeta = 1.1). ``alpha`` starts where ``h`` equals the fractional part of ``W / s``, so
the first hard rounding (``alpha >= 0``) is round-to-nearest. The regulariser
``sum(1 - |2h - 1|^beta)`` pushes every ``h`` to 0 or 1 as ``beta`` is annealed from 20 to 2.

The activation quantizer is one static scale per tensor (asymmetric, or symmetric as the authors'
``--a_sym``; zero point fixed after initialisation); only the scale is learned, through a
straight-through estimator of the rounding. Its initial range: min-max, the Lp search, or the
authors' ``'max'`` formula (:func:`authors_max_range`); optionally followed by their running
statistics (``--running_stat``: momentum-averaged ranges, :meth:`ActQuantizer.update_running`).
"""

from __future__ import annotations

import torch
from torch import nn

from modiff.config import NOT_QUANTIZED
from modiff.quant import fake_quant, grid, search_range

GAMMA, ZETA = -0.1, 1.1
MAX_OBSERVED = 1 << 16  # values kept per call, and in all, for the initial range's MSE search
RUNNING_MOMENTUM = 0.95  # Q-Diffusion's act_momentum_update (act_range_momentum)
AUTHORS_MIN_DELTA = 1e-8  # their floor on a step size
INIT_METHODS = ("minmax", "mse", "max")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """``|pred - target|^p`` summed over dim 1 and averaged over every other dim: BRECQ's and Q-Diffusion's
    ``lp_loss`` with ``reduction='none'``, ``(pred - tgt).abs().pow(p).sum(1).mean()``, taken literally. For a
    conv output ``[N, C, H, W]`` that sums the channels and averages over the batch and the positions; for
    the ``[N, L, C]`` output of a transformer block dim 1 is the tokens. The rounding regulariser's weight
    (0.01) is calibrated against this scale: summing over C*H*W instead makes the reconstruction term
    H*W times larger and the regulariser that much weaker (rounding variables do not reach 0/1)."""
    return (pred - target).abs().pow(p).sum(1).mean()


class AdaRoundWeight(nn.Module):
    """Learned rounding of one weight tensor on its per-output-channel asymmetric grid."""

    def __init__(self, weight: torch.Tensor, bits: int, init: str = "minmax", p: float = 2.4):
        super().__init__()
        w = weight.detach().float()
        dims = tuple(range(1, w.dim()))
        scale, zero_point = search_range(w, bits, False, dims, init, p=p)
        self.bits = bits
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        scaled = w / scale
        self.register_buffer("floor", torch.floor(scaled))
        rest = (scaled - self.floor).clamp(1e-6, 1 - 1e-6)  # where h(alpha) = rest
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.soft = True

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def forward(self) -> torch.Tensor:
        h = self.h() if self.soft else (self.alpha >= 0).to(self.floor.dtype)
        qmin, qmax = grid(self.bits, False)
        q = (self.floor + h + self.zero_point).clamp(qmin, qmax)
        return (q - self.zero_point) * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def authors_max_range(lo: float, hi: float, bits: int, symmetric: bool) -> tuple[float, float]:
    """Q-Diffusion's ``'max'`` initialisation (``UniformAffineQuantizer.init_quantization_scale``) of a tensor
    whose extremes are ``lo`` and ``hi``: ``(delta, zero_point)``. Symmetric (``--a_sym``): ``delta = absmax /
    (2^(b-1) - 1)`` with ``absmax = max(-min(lo, 0), max(hi, 0))``, zero point 0. Asymmetric: ``delta = (hi -
    lo) / (2^b - 1)``, ``zero_point = round(-min(lo, 0) / delta)`` (their formula, taken as written: with
    ``lo > 0`` the grid starts at 0 and its top falls short of ``hi``). ``delta`` is floored at 1e-8."""
    x_min, x_max = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        delta = max(abs(x_min), x_max) / (2 ** (bits - 1) - 1)
    else:
        delta = (hi - lo) / (2 ** bits - 1)
    delta = max(delta, AUTHORS_MIN_DELTA)
    return delta, 0.0 if symmetric else float(round(-x_min / delta))


def running_range(lo: float, hi: float, batch_lo: float, batch_hi: float, bits: int, symmetric: bool,
                  momentum: float = RUNNING_MOMENTUM) -> tuple[float, float, float, float]:
    """One step of Q-Diffusion's ``act_momentum_update`` (``--running_stat``): the running extremes move
    towards the batch's, ``lo <- m lo + (1 - m) min(x)`` (and ``hi``) with ``m = 0.95``, and the step size
    follows them: ``max(|lo|, |hi|) / (2^(b-1) - 1)`` symmetric, else ``(hi - lo) / (2^b - 1)`` with the zero
    point ``round(-lo / delta)``. Returns ``(lo, hi, delta, zero_point)``."""
    lo = lo * momentum + batch_lo * (1 - momentum)
    hi = hi * momentum + batch_hi * (1 - momentum)
    if symmetric:
        delta = max(max(abs(lo), abs(hi)) / (2 ** (bits - 1) - 1), AUTHORS_MIN_DELTA)
        return lo, hi, delta, 0.0
    delta = max((hi - lo) / (2 ** bits - 1), AUTHORS_MIN_DELTA)
    return lo, hi, delta, float(round(-lo / delta))


class ActQuantizer(nn.Module):
    """Static per-tensor activation quantizer; the step size is learnable, the zero point fixed.

    ``observe()`` makes it pass values through unchanged while recording an evenly spaced subsample
    of each call, then ``initialize(method)`` fits the range by min-max (exact extremes), by the
    MSE search with the Lp loss (``p``), Q-Diffusion's initialisation, or by the authors' ``'max'``
    formula (:func:`authors_max_range`), and switches it on. ``enabled`` (off until initialised)
    switches it off during weight reconstruction. ``symmetric``: the signed grid with zero point 0
    (Q-Diffusion's ``--a_sym``). ``running = True`` (after initialisation) updates the range from every
    tensor that passes, as their ``--running_stat`` (:func:`running_range`), before quantizing it.
    """

    def __init__(self, bits: int, p: float = 2.4, symmetric: bool = False):
        super().__init__()
        self.bits = bits
        self.p = p
        self.symmetric = symmetric
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = False
        self.running = False
        self._observed: list[torch.Tensor] | None = None
        self._extremes: tuple[float, float] | None = None
        self._running_range: tuple[float, float] | None = None  # the running extremes (set by initialize)

    def observe(self) -> None:
        self._observed, self._extremes = [], None

    def initialize(self, method: str) -> None:
        if method not in INIT_METHODS:
            raise ValueError(f"activation init must be one of {', '.join(INIT_METHODS)}; got {method!r}")
        if not self._observed:
            raise RuntimeError("activation quantizer saw no data while observing")
        values = torch.cat(self._observed)
        if values.numel() > MAX_OBSERVED:  # an evenly spaced subsample of everything observed
            values = values[torch.linspace(0, values.numel() - 1, MAX_OBSERVED).long()]
        lo, hi = self._extremes
        if method == "max":
            delta, zp = authors_max_range(lo, hi, self.bits, self.symmetric)
            scale, zero_point = torch.tensor(delta), torch.tensor(zp)
        else:
            if method == "minmax":
                values = torch.tensor([lo, hi])
            elif values.numel() and (values.min() > lo or values.max() < hi):  # keep the true extremes
                values = torch.cat([values, torch.tensor([lo, hi])])
            scale, zero_point = search_range(values.view(1, -1), self.bits, self.symmetric, (1,), method, p=self.p)
        with torch.no_grad():
            self.scale.copy_(scale.view(()))
            self.zero_point.copy_(zero_point.view(()))
            self.initialized.fill_(True)
        self._running_range = (lo, hi)  # the authors' x_min / x_max start from the raw extremes
        self._observed = self._extremes = None
        self.enabled = True

    def update_running(self, x: torch.Tensor) -> None:
        """``--running_stat``: move the range towards this tensor's extremes (:func:`running_range`)."""
        if self._running_range is None:
            raise RuntimeError("running statistics need an initialised activation quantizer")
        lo, hi = self._running_range
        batch_lo, batch_hi = torch.aminmax(x.detach().float())
        lo, hi, delta, zp = running_range(lo, hi, float(batch_lo), float(batch_hi), self.bits, self.symmetric)
        self._running_range = (lo, hi)
        with torch.no_grad():
            self.scale.fill_(delta)
            self.zero_point.fill_(zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observed is not None:
            flat = x.detach().float().flatten()
            lo, hi = float(flat.min()), float(flat.max())
            self._extremes = (lo, hi) if self._extremes is None else (min(lo, self._extremes[0]),
                                                                     max(hi, self._extremes[1]))
            if flat.numel() > MAX_OBSERVED:
                flat = flat[torch.linspace(0, flat.numel() - 1, MAX_OBSERVED, device=flat.device).long()]
            self._observed.append(flat.cpu())
            return x
        if not self.enabled or self.bits >= NOT_QUANTIZED:
            return x
        if not bool(self.initialized):
            raise RuntimeError("activation quantizer used before its range was initialised")
        if self.running:
            self.update_running(x)
        if not torch.is_grad_enabled():  # sampling: the library's in-place chain, same arithmetic
            return fake_quant(x, self.scale.detach(), self.zero_point, self.bits, self.symmetric)
        qmin, qmax = grid(self.bits, self.symmetric)
        q = (round_ste(x / self.scale) + self.zero_point).clamp(qmin, qmax)
        return (q - self.zero_point) * self.scale

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, symmetric={self.symmetric}, scale={float(self.scale.detach()):.4g}, "
                f"zero_point={float(self.zero_point):g}")


class SplitActQuantizer(nn.Module):
    """Shortcut splitting: the channels ``[:split]`` (the deep feature) and ``[split:]`` (the skip
    feature) of a concatenated input get one quantizer each."""

    def __init__(self, split: int, bits: int, p: float = 2.4, symmetric: bool = False):
        super().__init__()
        self.split = split
        self.deep = ActQuantizer(bits, p, symmetric)
        self.skip = ActQuantizer(bits, p, symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.deep(x[:, : self.split]), self.skip(x[:, self.split:])], dim=1)


def beta_schedule(iteration: int, iterations: int, warmup: float, start: float, end: float) -> float | None:
    """AdaRound's temperature at ``iteration`` (0-based), as Q-Diffusion's / BRECQ's ``LossFunction`` and
    ``LinearTempDecay`` compute it: their counter is incremented before use, so iteration ``i`` is count
    ``t = i + 1``. None (no rounding loss) while ``t < warmup * iterations``; then ``end + (start - end) *
    max(0, 1 - (t - warmup * iterations) / (iterations - warmup * iterations))``."""
    t = iteration + 1
    start_decay = warmup * iterations
    if t < start_decay:
        return None
    progress = (t - start_decay) / max(iterations - start_decay, 1e-12)
    return end + (start - end) * max(0.0, 1.0 - progress)


def minibatch(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """The rows of one reconstruction iteration: ``randperm(n)[:size]`` as the authors' ``block_recon.py``,
    ``layer_recon.py`` and MoDiff's ``layer_reconstruction_modiff`` draw them (no row twice in a batch)."""
    return torch.randperm(n, generator=generator)[:size]
