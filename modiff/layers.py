"""The MoDiff layer wrapper: one conv/linear operator ``A`` with three activation modes.

- ``off``:   ``o_t = A(Q(a_t)) + bias``
- ``plain``: ``o_t = A(Q(a_t - a_{t+1})) + o_{t+1}``  (against the true previous input)
- ``ec``:    ``d_t = Q(a_t - â_{t+1})``, ``â_t = â_{t+1} + d_t``, ``ô_t = ô_{t+1} + A(d_t)``

In the modulated modes the first call after :meth:`reset_state` is the warm-up: full precision
(``â = a``, ``ô = A(a) + bias``) when ``warmup`` is on, else ``Q(a)``. The bias is added there
once; residuals go through ``A`` without it. State is per layer and per sample trajectory and
must be reset once per batch, before the first step -- never per step, which would make every
step a full-precision warm-up and silently switch the method off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import NOT_QUANTIZED, ModiffConfig
from .quant import fake_quant, quantize_over, quantize_weight, reduce_dims, scale_and_zero_point, search_range

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
MAX_OBSERVED = 1 << 16  # values kept per calibration call and layer for the MSE search


class QuantLayer(nn.Module):
    """``weight_quantized=True``: the weight is already on its ``w_bits`` grid (e.g. AdaRound's) and
    is left as it is. ``act_quantizer``: a module ``x -> Q(x)`` that replaces the built-in activation
    quantizer (e.g. Q-Diffusion's learned static step sizes); in the modulated modes it quantizes
    the residuals."""

    def __init__(self, layer: nn.Module, config: ModiffConfig, name: str = "", weight_quantized: bool = False,
                 act_quantizer: nn.Module | None = None):
        super().__init__()
        if not isinstance(layer, QUANTIZABLE):
            raise TypeError(f"QuantLayer wraps Conv1d/Conv2d/Linear, not {type(layer).__name__}")
        self.layer = layer
        self.config = config
        self.name = name
        self.channel_axis = -1 if isinstance(layer, nn.Linear) else 1
        if not weight_quantized:
            with torch.no_grad():
                layer.weight.copy_(quantize_weight(layer.weight, config.w_bits, config.weight_method))
        self.act_quantizer = act_quantizer
        self.register_buffer("static_scale", None)
        self.register_buffer("static_zero_point", None)
        self._observed: list[torch.Tensor] | None = None
        self._dims: dict[int, tuple[int, ...]] = {}  # input ndim -> dims a dynamic scale reduces over
        self.reset_state()

    # -- state -----------------------------------------------------------------------------
    def reset_state(self) -> None:
        self._a_ref: torch.Tensor | None = None  # â (ec) or the previous true input (plain)
        self._o_ref: torch.Tensor | None = None  # ô (ec) or the previous output (plain)
        self._versions: tuple[int, int] | None = None
        self.warmup_calls = 0
        self.residual_calls = 0
        self.cached_samples = 0  # samples whose residual was zeroed (0 bits or tolerance)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._a_ref, self._o_ref) if t is not None)

    @property
    def reconstruction(self) -> torch.Tensor | None:
        """â: the input the layer has reconstructed so far (ec), or the last true input (plain)."""
        return self._a_ref

    # -- arithmetic ------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        """``A(x)`` (+ bias): the wrapped operator with its (already quantized) weight."""
        b = self.layer.bias if bias else None
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, self.layer.weight, b)
        return self.layer._conv_forward(x, self.layer.weight, b)

    def quantize_activation(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Q(x); ``inplace`` only for temporaries the layer owns (the residual)."""
        c = self.config
        if c.a_bits == NOT_QUANTIZED:
            return x
        if self.act_quantizer is not None:
            return self.act_quantizer(x)
        if c.act_scale == "static":
            if self.static_scale is None:
                raise RuntimeError(f"layer {self.name!r} uses static scales but was never calibrated "
                                   "(run modiff.calibrate first)")
            return fake_quant(x, self.static_scale, self.static_zero_point, c.a_bits, c.symmetric, inplace)
        dims = self._dims.get(x.dim())
        if dims is None:
            if x.dim() < 2:
                raise ValueError(f"layer {self.name!r}: activations need a batch dimension, got {tuple(x.shape)}")
            dims = self._dims[x.dim()] = reduce_dims(x.dim(), c.granularity, self.channel_axis)
        return quantize_over(x, dims, c.a_bits, c.symmetric, inplace)

    # -- calibration of static scales -----------------------------------------------------
    def start_observing(self) -> None:
        self._observed = []
        self._observed_min = self._observed_max = None
        self.reset_state()

    def _as_rows(self, value: torch.Tensor) -> torch.Tensor:
        """(channels, values) for channel-wise scales, (1, values) for one scale per tensor."""
        if self.config.granularity == "channel":
            return value.movedim(self.channel_axis, 0).reshape(value.shape[self.channel_axis], -1)
        return value.reshape(1, -1)

    def finish_observing(self, method: str = "minmax") -> None:
        if self._observed_min is None:
            raise RuntimeError(f"layer {self.name!r} saw no data during calibration")
        c = self.config
        if method == "minmax":  # exact extremes over everything observed
            scale, zp = scale_and_zero_point(self._observed_min, self._observed_max, c.a_bits, c.symmetric)
        else:  # the MSE search runs on the evenly spaced subsample kept per call
            scale, zp = search_range(torch.cat(self._observed, dim=1), c.a_bits, c.symmetric, (1,), method)
        if c.granularity == "channel":
            shape = [1] * self._observed_ndim
            shape[self.channel_axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        else:
            scale, zp = scale.reshape(()), zp.reshape(())
        self.static_scale, self.static_zero_point = scale, zp
        self._observed = self._observed_min = self._observed_max = None
        self.reset_state()

    def _observe(self, x: torch.Tensor) -> torch.Tensor:
        """Calibration pass: full precision; record the input (off) or the true residual."""
        out = self.linear(x, bias=True)
        if self.config.modulation == "off":
            value = x
        elif self._a_ref is None:
            value = None
        else:
            value = x - self._a_ref
        self._a_ref = x
        if value is not None:
            rows = self._as_rows(value.detach().float())
            lo, hi = rows.amin(dim=1, keepdim=True).cpu(), rows.amax(dim=1, keepdim=True).cpu()
            if self._observed_min is None:
                self._observed_min, self._observed_max, self._observed_ndim = lo, hi, value.dim()
            else:
                self._observed_min = torch.minimum(self._observed_min, lo)
                self._observed_max = torch.maximum(self._observed_max, hi)
            per_row = max(1, MAX_OBSERVED // rows.shape[0])
            if rows.shape[1] > per_row:
                rows = rows[:, torch.linspace(0, rows.shape[1] - 1, per_row).long()]
            self._observed.append(rows.cpu())
        return out

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observed is not None:
            return self._observe(x)
        c = self.config
        if c.modulation == "off":
            return self.linear(self.quantize_activation(x), bias=True)
        if self._a_ref is None:
            return self._warmup(x)
        self._check_state(x)
        residual = x - self._a_ref
        keep = self._residual_mask(residual)
        if keep is not None and not keep.any():  # every sample reuses the cache
            out = self._o_ref
        else:
            d = self.quantize_activation(residual, inplace=True)
            if keep is not None:
                d.mul_(keep.view(-1, *([1] * (d.dim() - 1))))
            out = self.linear(d, bias=False).add_(self._o_ref)
            if c.modulation == "ec":
                self._a_ref.add_(d)  # our own copy, never handed out
        if c.modulation == "plain":
            self._a_ref = x
        self._o_ref = out
        self.residual_calls += 1
        self._versions = (self._a_ref._version, out._version)
        return out

    def _warmup(self, x: torch.Tensor) -> torch.Tensor:
        a0 = x if self.config.warmup else self.quantize_activation(x)
        out = self.linear(a0, bias=True)
        # ec updates â in place, so it owns a copy; plain keeps a reference to the true input
        self._a_ref = a0.clone() if self.config.modulation == "ec" else x
        self._o_ref = out
        self._versions = (self._a_ref._version, out._version)
        self.warmup_calls += 1
        return out

    def _residual_mask(self, residual: torch.Tensor) -> torch.Tensor | None:
        """Which samples get a non-zero residual; None when all of them do."""
        c = self.config
        if c.a_bits == 0:
            self.cached_samples += residual.shape[0]
            return torch.zeros(residual.shape[0], dtype=torch.bool, device=residual.device)
        if c.residual_tolerance is None:
            return None
        dims = reduce_dims(residual.dim(), "sample", self.channel_axis)
        spread = residual.amax(dim=dims) - residual.amin(dim=dims)
        keep = spread > c.residual_tolerance
        self.cached_samples += int((~keep).sum())
        return None if bool(keep.all()) else keep

    def _check_state(self, x: torch.Tensor) -> None:
        if x.shape != self._a_ref.shape:
            raise ValueError(
                f"layer {self.name!r}: input shape {tuple(x.shape)} differs from the trajectory state "
                f"{tuple(self._a_ref.shape)}; call modiff.reset(model) before sampling a new batch"
            )
        if self._versions != (self._a_ref._version, self._o_ref._version):
            raise RuntimeError(f"layer {self.name!r}: its MoDiff state was modified in place outside the layer")

    def extra_repr(self) -> str:
        c = self.config
        return (f"{self.name or type(self.layer).__name__}: W{c.w_bits}A{c.a_bits} modulation={c.modulation} "
                f"granularity={c.granularity} scale={c.act_scale}")
