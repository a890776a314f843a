"""The MoDiff layer wrapper: one conv/linear operator ``A`` with three activation modes.

- ``off``:   ``o_t = A(Q(a_t)) + bias``
- ``plain``: ``o_t = A(Q(a_t - a_{t+1})) + o_{t+1}``  (against the true previous input)
- ``ec``:    ``d_t = Q(a_t - â_{t+1})``, ``â_t = â_{t+1} + d_t``, ``ô_t = ô_{t+1} + A(d_t)``

In the modulated modes the first call after :meth:`reset_state` is the warm-up: full precision
(``â = a``, ``ô = A(a) + bias``) when ``warmup`` is on, else ``Q(a)`` with a dynamic scale (static
scales are fitted on residuals, too narrow for a whole input: ``ModiffConfig`` refuses them without
the warm-up). The bias is added there once; residuals go through ``A`` without it. State is per
layer and per sample trajectory and must be reset once per batch, before the first step -- never
per step, which would make every step a full-precision warm-up and silently switch the method off.

``execution="int8"`` / ``"fp8"`` run ``A`` on integer or float8 kernels (``modiff/kernels.py``)
with the same arithmetic around them. A layer never mutates a tensor it has returned, nor its
input: ``ô`` is rebuilt out of place at every step; only ``â``, never handed out, is updated in
place. Holders of outputs (DeepCache's cache, per-step traces) are therefore safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import NOT_QUANTIZED, ModiffConfig
from .quant import (
    FP8_DTYPE,
    HALF_DTYPES,
    dequantize_weight,
    dynamic_scale,
    fake_quant,
    fake_quant_fp8,
    fp8_scale,
    quantize_over,
    quantize_weight,
    reduce_dims,
    scale_and_zero_point,
    search_range,
    weight_fp8,
    weight_grid,
)

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
_FLOAT32_BUFFERS = ("w_scale", "static_scale", "static_zero_point")  # kept float32 whatever the model is cast to
_WRAPPED_ATTRIBUTES = frozenset({"in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride",
                                 "padding", "dilation", "groups", "padding_mode", "transposed", "output_padding",
                                 "weight", "bias"})
MAX_OBSERVED = 1 << 16  # values kept per calibration call and layer for the MSE search


class QuantLayer(nn.Module):
    """``weight_quantized=True``: the weight is already on its ``w_bits`` grid (e.g. AdaRound's) and
    is left as it is. ``act_quantizer``: a module ``x -> Q(x)`` that replaces the built-in activation
    quantizer (e.g. Q-Diffusion's learned static step sizes); in the modulated modes it quantizes
    the residuals. ``int_weights``: real execution only, ``(w_q, w_scale)`` to keep instead of quantizing the
    layer's float weight, which is neither read nor kept (``modiff.load_quantized`` fills them from a file)."""

    def __init__(self, layer: nn.Module, config: ModiffConfig, name: str = "", weight_quantized: bool = False,
                 act_quantizer: nn.Module | None = None,
                 int_weights: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if not isinstance(layer, QUANTIZABLE):
            raise TypeError(f"QuantLayer wraps Conv1d/Conv2d/Linear, not {type(layer).__name__}")
        self.layer = layer
        self.config = config
        self.name = name
        self.channel_axis = -1 if isinstance(layer, nn.Linear) else 1
        self.real = config.execution != "fake"
        if self.real and (weight_quantized or act_quantizer is not None):
            raise ValueError(f"layer {name!r}: execution {config.execution!r} does not take pre-quantized weights or "
                             "an external activation quantizer yet (Q-Diffusion's are fake-quantized only)")
        self.register_buffer("w_q", None)  # real execution: int8 weights (fp8: their uint8 bit pattern)
        self.register_buffer("w_scale", None)  # real execution: per-output-channel weight scales
        # real execution: an empty tensor in the dropped float weight's dtype, which casts (.half()) follow
        self.register_buffer("weight_template", None, persistent=False)
        if int_weights is not None:
            if not self.real:
                raise ValueError(f"layer {name!r}: int_weights are for execution 'int8' / 'fp8', not 'fake'")
            self._drop_float_weight(layer, *int_weights)
        elif not weight_quantized:
            with torch.no_grad():
                self._quantize_weight(layer, config)
        self._op = kernels.Operator(layer, config.execution, config.a_bits) if self.real else None
        self.act_quantizer = act_quantizer
        self.register_buffer("static_scale", None)
        self.register_buffer("static_zero_point", None)
        self._observed: list[torch.Tensor] | None = None
        self._dims: dict[int, tuple[int, ...]] = {}  # input ndim -> dims a dynamic scale reduces over
        self.split = 0  # shortcut splitting (set_split): channels [:split] and [split:] get their own dynamic scales
        # â and ô between steps: None keeps them in the working dtype (float32; float64 in a float64 model)
        self._state_dtype = None if config.state_dtype == "float32" else _DTYPES[config.state_dtype]
        self.reset_state()

    def set_split(self, split: int) -> None:
        """Shortcut splitting (Q-Diffusion's ``--split``, which the MoDiff authors' CIFAR-10 and SD scripts
        use): the input ``concat([deep, skip])`` of a decoder shortcut conv gets one dynamic scale per part,
        channels ``[:split]`` and ``[split:]`` (per tensor or per sample within each part). 0 switches it off.
        Fake execution with dynamic scales only (static split scales are a per-channel ``static_scale``)."""
        if not isinstance(split, int) or isinstance(split, bool) or split < 0:
            raise ValueError(f"layer {self.name!r}: split must be a non-negative integer; got {split!r}")
        if split and (self.real or self.config.act_scale != "dynamic" or self.act_quantizer is not None
                      or isinstance(self.layer, nn.Linear)):
            raise ValueError(f"layer {self.name!r}: shortcut splitting needs a conv layer with fake execution and "
                             "the built-in dynamic scales")
        if split and not 0 < split < self.layer.in_channels:
            raise ValueError(f"layer {self.name!r}: split {split} is not inside its {self.layer.in_channels} "
                             "input channels")
        self.split = split

    def _quantize_weight(self, layer: nn.Module, config: ModiffConfig) -> None:
        if config.number_format == "fp8":
            w_grid, scale = weight_fp8(layer.weight)
            stored = w_grid.view(torch.uint8)
        elif config.weight_symmetric and config.w_bits != NOT_QUANTIZED:
            w_grid, scale = weight_grid(layer.weight, config.w_bits, config.weight_method)
            stored = w_grid.to(torch.int8)
        else:
            layer.weight.copy_(quantize_weight(layer.weight, config.w_bits, config.weight_method))
            return
        if self.real:
            self._drop_float_weight(layer, stored, scale)
        else:
            layer.weight.copy_(dequantize_weight(w_grid, scale, layer.weight.dtype))

    def _drop_float_weight(self, layer: nn.Module, w_q: torch.Tensor, w_scale: torch.Tensor) -> None:
        """Real execution keeps the 8-bit weights and their scales only (a quarter of the float weight's bytes): the
        wrapped layer's ``weight`` becomes None, so calling it directly fails instead of using a stale weight, and
        the float weight is rebuilt where it is needed (:meth:`dequantized_weight`: the warm-up, correction maps)."""
        weight = layer.weight
        storage = torch.uint8 if self.config.execution == "fp8" else torch.int8
        if (w_q.shape != weight.shape or w_q.dtype != storage or w_scale.shape != (weight.shape[0],)
                or w_scale.dtype != torch.float32):
            raise ValueError(f"layer {self.name!r}: int_weights must be {storage} {tuple(weight.shape)} and float32 "
                             f"({weight.shape[0]},); got {w_q.dtype} {tuple(w_q.shape)} and {w_scale.dtype} "
                             f"{tuple(w_scale.shape)}")
        self.w_q, self.w_scale = w_q, w_scale
        self.weight_template = torch.empty(0, dtype=weight.dtype, device=weight.device)
        layer.register_parameter("weight", None)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight: the wrapped layer's own, or under real execution ``w_q * w_scale`` made anew at each
        call, in the dtype the dropped weight had (or was cast to since), bit-equal to the weight kept before."""
        if self.w_q is None:
            return self.layer.weight
        return dequantize_weight(self._grid_weight(), self.w_scale, self.weight_template.dtype)

    def _grid_weight(self) -> torch.Tensor:
        """Real execution's 8-bit weight as the kernels take it: int8, or fp8's stored bit pattern viewed as e4m3."""
        return self.w_q.view(FP8_DTYPE) if self.config.execution == "fp8" else self.w_q

    def _weight_dtype(self) -> torch.dtype:
        return self.layer.weight.dtype if self.weight_template is None else self.weight_template.dtype

    def __getattr__(self, name: str):
        """The wrapped layer's shape and weights read through the wrapper (``in_features``, ``kernel_size``,
        ``weight``...): pipelines read them off the model, e.g. diffusers' SDXL pipeline reads
        ``unet.add_embedding.linear_1.in_features``, which raised AttributeError on the wrapper. Under real
        execution ``weight`` is :meth:`dequantized_weight`, made at each read (the wrapped layer's is None)."""
        if name in _WRAPPED_ATTRIBUTES:
            if name == "weight" and self.__dict__.get("_buffers", {}).get("w_q") is not None:
                return self.dequantized_weight()  # real execution keeps no float weight
            return getattr(super().__getattr__("layer"), name)
        return super().__getattr__(name)

    def _apply(self, fn, recurse: bool = True):
        """``model.half()`` / ``.to(torch.bfloat16)`` after quantizing cast the weights (``A`` then runs in that
        dtype; real execution: ``weight_template``, the dtype the float weight is rebuilt in) but leave the scales in
        float32: a float16 scale loses precision, and a tiny one is 0."""
        kept = {name: getattr(self, name) for name in _FLOAT32_BUFFERS if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return self

    # -- state -----------------------------------------------------------------------------
    def reset_state(self) -> None:
        self._a_ref: torch.Tensor | None = None  # â (ec) or the previous true input (plain)
        self._o_ref: torch.Tensor | None = None  # ô (ec) or the previous output (plain)
        self._versions: tuple[int, int] | None = None
        self.warmup_calls = 0
        self.residual_calls = 0
        self.cached_samples = 0  # samples whose residual was zeroed (0 bits or tolerance)
        self.residual_samples = 0  # samples whose residual was checked (0 bits or tolerance): cached_samples' total

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._a_ref, self._o_ref) if t is not None)

    @property
    def reconstruction(self) -> torch.Tensor | None:
        """â: the input the layer has reconstructed so far (ec), or the last true input (plain)."""
        return self._a_ref

    # -- arithmetic ------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        """``A(x)`` (+ bias): the wrapped operator with its (already quantized) weight, in the weight's dtype;
        returned in ``x``'s dtype (the layer's float32 arithmetic)."""
        w = self.dequantized_weight()
        b = self.layer.bias if bias else None
        operand = x if x.dtype == w.dtype else x.to(w.dtype)
        y = F.linear(operand, w, b) if isinstance(self.layer, nn.Linear) else self.layer._conv_forward(operand, w, b)
        return y if y.dtype == x.dtype else y.to(x.dtype)

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
        dims = self._scale_dims(x)
        if c.number_format == "fp8":
            return fake_quant_fp8(x, dims)
        if self.split:
            return torch.cat([quantize_over(part, dims, c.a_bits, c.symmetric)
                              for part in (x[:, :self.split], x[:, self.split:])], dim=1)
        return quantize_over(x, dims, c.a_bits, c.symmetric, inplace)

    def _scale_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        dims = self._dims.get(x.dim())
        if dims is None:
            if x.dim() < 2:
                raise ValueError(f"layer {self.name!r}: activations need a batch dimension, got {tuple(x.shape)}")
            dims = self._dims[x.dim()] = reduce_dims(x.dim(), self.config.granularity, self.channel_axis)
        return dims

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
    def forward(self, x: torch.Tensor, prologue=None) -> torch.Tensor:
        """``prologue`` (a :class:`modiff.fusion.NormSiLU`, ``fuse_norms``): the layer's input is ``prologue(x)``;
        where :meth:`_fuses` allows, the norm runs first and the SiLU inside the quantizing pass, else the whole
        prologue first, as the block would have.

        Whatever the model's dtype, scales, zero points, the residual, ``â`` / ``ô`` and the error-compensation
        update are float32 (float64 in a float64 model); only ``A`` runs in its weight's dtype (a float16 or bfloat16
        model's own matmul or conv, on the operand cast to that dtype). float16 cannot hold them: a scale below
        6e-8 is 0 there (``MIN_SCALE`` too, so a zero-range channel divided by zero) and ``â`` / ``ô`` would
        accumulate half-precision rounding over the steps. Returns the input's dtype, or ``compute_dtype`` where
        that is not float32. It never mutates a tensor it has returned (nor its input): ``ô`` is rebuilt out of
        place at every step, only ``â`` (never handed out) is updated in place."""
        silu = False
        if prologue is not None:
            silu = self._fuses(x)
            x = prologue.normed(x) if silu else prologue(x)
        dtype = _DTYPES[self.config.compute_dtype] if self.config.compute_dtype != "float32" else x.dtype
        work = self._work_dtype()
        if self.real and self._observed is None:  # inference only: integer kernels have no gradient
            with torch.no_grad():  # a half input goes to the (fused) quantizer as it is: no cast pass of its own
                out = self._forward_real(x if x.dtype in HALF_DTYPES or x.dtype == work else x.to(work), dtype,
                                         silu)
        else:
            out = self._forward(x if x.dtype == work else x.to(work))
        return out if out.dtype == dtype else out.to(dtype)

    def _fuses(self, x: torch.Tensor) -> bool:
        """Whether this call computes a prologue's SiLU inside the quantizing pass: real execution's quantized steps
        of PTQ and ``ec`` (not the warm-up, calibration, 0-bit residuals or ``residual_tolerance``), on a float32 or
        half input."""
        c = self.config
        return (self.real and self._observed is None and x.dtype in (torch.float32, *HALF_DTYPES)
                and self._weight_dtype() != torch.float64
                and (c.modulation == "off" or (c.modulation == "ec" and self._a_ref is not None))
                and c.a_bits != 0 and c.residual_tolerance is None)

    def _work_dtype(self) -> torch.dtype:
        """The layer's own arithmetic: float32, float64 in a float64 model."""
        return torch.float64 if self._weight_dtype() == torch.float64 else torch.float32

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observed is not None:
            return self._observe(x)
        c = self.config
        fused = (c.compile and self.act_quantizer is None and c.act_scale == "dynamic" and c.a_bits != NOT_QUANTIZED
                 and not self.split)
        fp8 = c.number_format == "fp8"
        if c.modulation == "off":
            if fused:
                return self.linear(kernels.compiled("fake_input")(x, self._scale_dims(x), c.a_bits, c.symmetric, fp8),
                                   bias=True)
            return self.linear(self.quantize_activation(x), bias=True)
        if self._a_ref is None:
            return self._warmup(x)
        self._check_state(x)
        if fused and c.a_bits != 0 and c.residual_tolerance is None:
            with torch.no_grad():
                d = kernels.compiled("fake_residual")(x, self._a_ref, self._scale_dims(x), c.a_bits, c.symmetric, fp8,
                                                      c.modulation == "ec")
            out = self.linear(d, bias=False).add_(self._o_ref)
            return self._advance(x, out)
        residual = x - self._a_ref
        keep = self._residual_mask(residual)
        if keep is not None and not keep.any():  # every sample reuses the cache
            out = self._o_ref if self._state_dtype is None else self._o_ref.to(x.dtype)
        else:
            d = self.quantize_activation(residual, inplace=True)
            if keep is not None:
                d.mul_(keep.view(-1, *([1] * (d.dim() - 1))))
            out = self.linear(d, bias=False).add_(self._o_ref)
            if c.modulation == "ec":
                self._a_ref.add_(d)  # our own copy, never handed out
        return self._advance(x, out)

    def _advance(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """End of a modulated step: plain mode's reference becomes the true input; remember ``ô``."""
        if self.config.modulation == "plain":
            self._a_ref = self._stored(x)
        self._o_ref = self._stored(out)
        self.residual_calls += 1
        self._versions = (self._a_ref._version, self._o_ref._version)
        return out

    # -- real execution (modiff/kernels.py) ---------------------------------------------------
    def _passes(self, name: str):
        return kernels.compiled(name) if self.config.compile else getattr(kernels, name)

    def _static(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.act_scale != "static":
            return None
        if self.static_scale is None:
            raise RuntimeError(f"layer {self.name!r} uses static scales but was never calibrated "
                               "(run modiff.calibrate first)")
        return self.static_scale, self.static_zero_point

    def _kernel(self, u, scale, offset, x_shape, add, bias: bool, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``A((u - offset) * scale) (+ add) (+ bias)`` on the integer / float8 kernel, computed in float32 and
        written in ``out_dtype`` (None: float32) by the same (fused) pass."""
        w_q = self._grid_weight()
        shift = 0 if self.config.execution == "fp8" else _minus(offset, self._op.base(u))
        y = self._op(u, w_q, self.w_scale)
        m = None if _is_zero(shift) else self._op.correction(x_shape, w_q, self.w_scale, self.weight_template.dtype)
        b = self.layer.bias if bias else None
        if b is not None and not isinstance(self.layer, nn.Linear):
            b = b.view(-1, *([1] * (y.dim() - 2)))
        if out_dtype is not None and out_dtype != y.dtype:
            return self._passes("epilogue_to")(y, scale, shift, m, add, b, out_dtype)
        return self._passes("epilogue")(y, scale, shift, m, add, b)

    def _forward_real(self, x: torch.Tensor, dtype: torch.dtype, silu: bool = False) -> torch.Tensor:
        """``x``: the input in the working dtype, or as it came when that is float16 / bfloat16 (the quantizing pass
        reads it and computes in float32). The kernel's epilogue writes the returned ``dtype`` (off) or the state's
        dtype (modulated) directly: a bfloat16 model with a bfloat16 state makes no cast pass at all. ``silu`` (only
        where :meth:`_fuses`): the input is ``silu(x)``, computed by the quantizing pass."""
        c = self.config
        fp8 = c.execution == "fp8"
        fused = "_silu" if silu else ""
        if c.modulation == "off":
            u, scale, offset = self._passes("quantize_input" + fused)(x, self._scale_dims(x), c.a_bits,
                                                                      c.symmetric, fp8, self._static(), self._op.linear)
            return self._kernel(u, scale, offset, x.shape, None, bias=True, out_dtype=dtype)
        work = self._work_dtype()
        if self._a_ref is None:
            return self._warmup(x if x.dtype == work else x.to(work))
        self._check_state(x)
        ec = c.modulation == "ec"
        if c.a_bits == 0 or c.residual_tolerance is not None:
            out = self._masked_real(x if x.dtype == work else x.to(work), ec, fp8)
        else:
            u, scale, offset = self._passes("quantize_residual" + fused)(x, self._a_ref, self._scale_dims(x),
                                                                         c.a_bits, c.symmetric, fp8, ec, self._static(),
                                                                         self._op.linear)
            out = self._kernel(u, scale, offset, x.shape, self._o_ref, bias=False, out_dtype=self._state_dtype)
        return self._advance(x, out)

    def _masked_real(self, x: torch.Tensor, ec: bool, fp8: bool) -> torch.Tensor:
        """0-bit residuals and ``residual_tolerance``: the kernel runs on the samples that need it
        (the batch is compacted), the others return their cached output without any arithmetic.
        Compaction costs one copy of ``ô``; a tensor-wise scale is taken over the whole residual,
        as in the fake path."""
        c = self.config
        residual = x - self._a_ref
        keep = self._residual_mask(residual)
        if keep is not None and not keep.any():
            return self._o_ref if self._state_dtype is None else self._o_ref.to(x.dtype)
        dims = self._scale_dims(residual)
        if keep is None:
            idx = None
        else:
            idx = keep.nonzero().squeeze(1)
        static = self._static()
        if static is None and dims == tuple(range(residual.dim())):  # one scale for the whole batch, cached samples too
            static = (fp8_scale(residual, dims), 0) if fp8 else dynamic_scale(residual, dims, c.a_bits, c.symmetric)
        part = residual if idx is None else residual.index_select(0, idx)
        u, scale, offset, d = kernels.quantize_real(part, dims, c.a_bits, c.symmetric, fp8, static, want_dequantized=ec,
                                                    rows=self._op.linear)
        if idx is None:
            if ec:
                self._a_ref.add_(d)
            return self._kernel(u, scale, offset, x.shape, self._o_ref, bias=False)
        if ec:
            self._a_ref.index_add_(0, idx, d.to(self._a_ref.dtype))
        delta = self._kernel(u, scale, offset, part.shape, self._o_ref.index_select(0, idx), bias=False)
        return self._o_ref.to(delta.dtype).index_copy(0, idx, delta)  # out of place: a layer never mutates ô

    def _warmup(self, x: torch.Tensor) -> torch.Tensor:
        if self.real and not self.config.warmup:  # the first step quantized, on the kernel
            return self._warmup_real(x)
        a0 = x if self.config.warmup else self.quantize_activation(x)
        out = self.linear(a0, bias=True)
        # ec updates â in place, so it owns a copy; plain keeps a reference to the true input
        self._a_ref = self._stored(a0, copy=self.config.modulation == "ec")
        self._o_ref = self._stored(out)
        self._versions = (self._a_ref._version, self._o_ref._version)
        self.warmup_calls += 1
        return out

    def _warmup_real(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        dims = self._scale_dims(x)
        u, scale, offset, d = kernels.quantize_real(x, dims, c.a_bits, c.symmetric, c.execution == "fp8",
                                                    self._static(), want_dequantized=True, inplace=False,
                                                    rows=self._op.linear)
        out = self._kernel(u, scale, offset, x.shape, None, bias=True)
        self._a_ref = self._stored(d if c.modulation == "ec" else x)
        self._o_ref = self._stored(out)
        self._versions = (self._a_ref._version, self._o_ref._version)
        self.warmup_calls += 1
        return out

    def _stored(self, t: torch.Tensor, copy: bool = False) -> torch.Tensor:
        """``t`` as the state keeps it (``state_dtype``); ``copy``: a tensor of the layer's own even in that dtype."""
        target = self._state_dtype or self._work_dtype()
        if t.dtype == target:
            return t.clone() if copy else t
        return t.to(target)

    def _residual_mask(self, residual: torch.Tensor) -> torch.Tensor | None:
        """Which samples get a non-zero residual; None when all of them do."""
        c = self.config
        if c.a_bits == 0:
            self.cached_samples += residual.shape[0]
            self.residual_samples += residual.shape[0]
            return torch.zeros(residual.shape[0], dtype=torch.bool, device=residual.device)
        if c.residual_tolerance is None:
            return None
        self.residual_samples += residual.shape[0]
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
                f"granularity={c.granularity} scale={c.act_scale}" + ("" if c.execution == "fake" else
                                                                          f" execution={c.execution}"))


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _minus(offset, base: int):
    return offset - base if base else offset


def _is_zero(value) -> bool:
    return not isinstance(value, torch.Tensor) and value == 0

