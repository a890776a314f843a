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
from .quant import dynamic_fake_quant, fake_quant, quantize_weight, reduce_dims, search_range

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
MAX_OBSERVED = 1 << 16  # values kept per calibration call and layer


class QuantLayer(nn.Module):
    def __init__(self, layer: nn.Module, config: ModiffConfig, name: str = ""):
        super().__init__()
        if not isinstance(layer, QUANTIZABLE):
            raise TypeError(f"QuantLayer wraps Conv1d/Conv2d/Linear, not {type(layer).__name__}")
        self.layer = layer
        self.config = config
        self.name = name
        self.channel_axis = -1 if isinstance(layer, nn.Linear) else 1
        with torch.no_grad():
            layer.weight.copy_(quantize_weight(layer.weight, config.w_bits, config.weight_method))
        self.register_buffer("static_scale", None)
        self.register_buffer("static_zero_point", None)
        self._observed: list[torch.Tensor] | None = None
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

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.a_bits == NOT_QUANTIZED:
            return x
        if c.act_scale == "static":
            if self.static_scale is None:
                raise RuntimeError(f"layer {self.name!r} uses static scales but was never calibrated "
                                   "(run modiff.calibrate first)")
            return fake_quant(x, self.static_scale, self.static_zero_point, c.a_bits, c.symmetric)
        return dynamic_fake_quant(x, c.a_bits, c.granularity, c.symmetric, self.channel_axis)

    # -- calibration of static scales -----------------------------------------------------
    def start_observing(self) -> None:
        self._observed = []
        self.reset_state()

    def finish_observing(self, method: str = "minmax") -> None:
        if not self._observed:
            raise RuntimeError(f"layer {self.name!r} saw no data during calibration")
        c = self.config
        if c.granularity == "channel":
            values = torch.cat([v.movedim(self.channel_axis, 1).flatten(2).transpose(0, 1).flatten(1)
                                for v in self._observed], dim=1)  # (C, N)
            scale, zp = search_range(values, c.a_bits, c.symmetric, (1,), method)
            shape = [1] * self._observed[0].dim()
            shape[self.channel_axis] = -1
            scale, zp = scale.view(shape), zp.view(shape)
        else:
            values = torch.cat([v.flatten() for v in self._observed])
            scale, zp = search_range(values, c.a_bits, c.symmetric, (0,), method)
            scale, zp = scale.view(()), zp.view(())
        self.static_scale, self.static_zero_point = scale, zp
        self._observed = None
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
            value = value.detach()
            if self.config.granularity != "channel" and value.numel() > MAX_OBSERVED:
                value = value.flatten()[torch.linspace(0, value.numel() - 1, MAX_OBSERVED).long()]
            self._observed.append(value.cpu())
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
            d = self.quantize_activation(residual)
            if keep is not None:
                d = d * keep.view(-1, *([1] * (d.dim() - 1)))
            out = self._o_ref + self.linear(d, bias=False)
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
