"""Real low-bit execution of one conv/linear: integer kernels (an 8-bit container) and float8.

**What a kernel receives.** The quantizer hands over ``u`` (uint8): the integers of the
activation's grid shifted to be non-negative, with a per-tensor or per-sample ``scale`` and
``offset`` such that the dequantized activation is ``(u - offset) * scale``. Symmetric grids
use the constant offset ``2^(b-1)``; asymmetric ones use their zero point. Every integer backend
computes ``y = s_w * (W_int * (u - base))``, where ``*`` is the layer's conv or matmul with zero
padding and ``s_w`` the per-output-channel weight scale. By linearity,

    A(d) = scale * (y - (offset - base) * M),   M = s_w * (W_int * 1)   (same zero padding)

exactly, up to float rounding of the accumulation. This holds for any stride, padding, dilation
or group count, and for per-sample scales and zero points, which the kernels themselves refuse
(oneDNN takes one activation scale and zero point per call). ``M`` depends only on the input's
spatial shape; it is computed once per shape and cached.

**Backends.**
- ``onednn`` (CPU, int8): ``torch.ops.onednn.qconv2d_pointwise`` (Conv1d runs as a 1xL Conv2d)
  and ``qlinear_pointwise``, ``base = 0``. Weights are prepacked lazily, per device, and never
  stored: prepacked tensors cannot be copied or saved. On CPUs without VNNI, oneDNN multiplies
  u8 x s8 pairs into saturating int16 sums (``vpmaddubsw``). It is exact only while
  ``u <= 127``, so 8-bit activations run as two kernels there (``u = min(u, 127) + rest``).
  The first call probes the machine for this (:func:`onednn_u8_exact`).
- ``int_mm`` (CUDA's int8 path; also runs on CPU, where the tests exercise it):
  ``torch._int_mm`` on ``int8(u - 128)``, ``base = 128``. Convolutions are lowered to an unfold
  plus one matmul per group. On CUDA, K and N are padded to multiples of 16 and M to at least 32.
  **Not verified on a GPU.**
- ``scaled_mm`` (fp8): ``torch._scaled_mm`` on float8 e4m3 values with unit scales and a float32
  output. The per-sample and per-channel scales are applied afterwards; there is no offset.
  It runs on CPU (the tests), and on CUDA where the device supports float8 (compute capability
  8.9 or newer). **Not verified on a GPU.**
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .quant import FP8_DTYPE, dequantize_weight, dynamic_scale, fake_quant_fp8, fp8_scale, quantize_over, to_fp8

BACKENDS = ("onednn", "int_mm", "scaled_mm")


class _Cache(dict):
    """Per-layer kernel caches (prepacked weights, correction maps): dropped by copies and pickles,
    rebuilt on first use (oneDNN's prepacked weights cannot be deep-copied or saved)."""

    def __deepcopy__(self, memo):
        return _Cache()

    def __reduce__(self):
        return (_Cache, ())


@functools.cache
def onednn_u8_exact() -> bool:
    """Whether oneDNN's int8 kernels on this CPU are exact for the full uint8 range (VNNI, AMX),
    or saturate u8 x s8 pair sums to int16 (AVX2 without VNNI): a 1x1 conv of 255 x 127 pairs."""
    u = torch.full((1, 4, 1, 1), 255, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    w = torch.full((1, 4, 1, 1), 127, dtype=torch.int8)
    one = torch.ones(1)
    packed = torch.ops.onednn.qconv_prepack(w, one, 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
    y = torch.ops.onednn.qconv2d_pointwise(u, 1.0, 0, packed, one, torch.zeros(1, dtype=torch.int64), None,
                                           [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")
    return float(y.flatten()[0]) == 255 * 127 * 4


def default_backend(execution: str, device: torch.device) -> str:
    if execution == "fp8":
        return "scaled_mm"
    return "onednn" if device.type == "cpu" else "int_mm"


def _pad_to(t: torch.Tensor, dim: int, multiple: int, minimum: int = 0) -> torch.Tensor:
    size = t.shape[dim]
    target = max(minimum, -(-size // multiple) * multiple)
    if target == size:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, target - size]
    return F.pad(t, pad)


class Operator:
    """The integer or float8 form of one Conv1d/Conv2d/Linear; weights are passed at each call
    (they are the wrapping layer's buffers, so ``.to(device)`` moves them)."""

    def __init__(self, layer: nn.Module, execution: str, a_bits: int = 8):
        self.execution = execution
        self.wide = execution == "int8" and a_bits == 8  # u may exceed 127
        self.linear = isinstance(layer, nn.Linear)
        self.conv1d = isinstance(layer, nn.Conv1d)
        if not self.linear:
            def two(v):
                v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
                return (1, v[0]) if self.conv1d else v
            if isinstance(layer.padding, str):
                raise ValueError(f"padding={layer.padding!r} is not supported by real execution; use explicit padding")
            if layer.padding_mode != "zeros":
                raise ValueError(f"padding_mode={layer.padding_mode!r} is not supported by real execution")
            pad = two(layer.padding) if not self.conv1d else (0, tuple(layer.padding)[0])
            self.stride, self.padding, self.dilation = list(two(layer.stride)), list(pad), list(two(layer.dilation))
            self.groups = layer.groups
            self.kernel = two(layer.kernel_size)
        self.backend: str | None = None  # None: default_backend(); the tests force the others
        self.align: int | None = None  # None: 16 on CUDA, 1 elsewhere
        self._packed = _Cache()
        self._corr = _Cache()

    def __deepcopy__(self, memo):
        new = object.__new__(Operator)
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("_packed", "_corr")})
        new._packed, new._corr = _Cache(), _Cache()
        return new

    def __getstate__(self):
        return {**self.__dict__, "_packed": _Cache(), "_corr": _Cache()}

    # -- geometry -----------------------------------------------------------------------------
    def _as2d(self, t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(2) if self.conv1d else t

    def _weight2d(self, w: torch.Tensor) -> torch.Tensor:
        return w.unsqueeze(2) if self.conv1d else w

    def base(self, u: torch.Tensor) -> int:
        """What the kernel subtracts from ``u``: ``_int_mm`` takes int8, so a full 8-bit ``u`` is shifted by 128."""
        if self.wide and self._backend(u.device) == "int_mm":
            return 128
        return 0

    def _backend(self, device: torch.device) -> str:
        return self.backend or default_backend(self.execution, device)

    def correction(self, x_shape: torch.Size, w_q: torch.Tensor, w_scale: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
        """``M = A(1)`` with the layer's zero padding, shaped to broadcast over the output, on the dequantized weight
        ``w_q * w_scale`` in ``dtype`` (the wrapped layer's float dtype): made once per input shape and kept."""
        key = (tuple(x_shape[1:]) if not self.linear else (), w_q.device, dtype, w_q.data_ptr(), w_q._version,
               w_scale.data_ptr(), w_scale._version)  # new weights (load_state_dict) mean a new map
        m = self._corr.get(key)
        if m is None:
            with torch.no_grad():
                w_deq = dequantize_weight(w_q, w_scale, dtype)
                if self.linear:
                    m = w_deq.float().sum(dim=1)
                else:
                    ones = self._as2d(torch.ones((1, *x_shape[1:]), device=w_deq.device))
                    m = F.conv2d(ones, self._weight2d(w_deq.float()), None, self.stride, self.padding,
                                 self.dilation, self.groups)
                    m = m.squeeze(2) if self.conv1d else m
            self._corr[key] = m
        return m

    # -- the kernels --------------------------------------------------------------------------
    def __call__(self, u: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
        """``y = s_w * (W_q * (u - base))`` in float32; ``u`` uint8 (int8 backends) or e4m3 (fp8),
        shaped like the layer's input (a linear's leading dims are kept)."""
        backend = self._backend(u.device)
        if backend == "onednn":
            if u.dtype != torch.uint8:
                raise TypeError(f"the onednn backend takes uint8 activations, got {u.dtype}")
            if self.wide and not onednn_u8_exact():
                # non-VNNI CPUs saturate u8 x s8 pair sums: split into two exact halves
                low = u.clamp(max=127)
                return self._onednn(low, w_q, w_scale).add_(self._onednn(u - low, w_q, w_scale))
            return self._onednn(u, w_q, w_scale)
        if backend in ("int_mm", "scaled_mm"):
            return self._matmul(u, w_q, w_scale, backend)
        raise ValueError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")

    def _onednn(self, u: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
        zeros_key = ("zp", w_q.device, w_q.shape[0])
        zp = self._packed.get(zeros_key)
        if zp is None:
            zp = self._packed[zeros_key] = torch.zeros(w_q.shape[0], dtype=torch.int64, device=w_q.device)
        key = (w_q.device, w_q.data_ptr(), w_q._version)
        packed = self._packed.get(key)
        if self.linear:
            if packed is None:
                packed = self._packed[key] = torch.ops.onednn.qlinear_prepack(w_q, None)
            rows = u.reshape(-1, u.shape[-1])
            y = torch.ops.onednn.qlinear_pointwise(rows, 1.0, 0, packed, w_scale, zp, None, 1.0, 0, torch.float32,
                                                   "none", [], "")
            return y.view(*u.shape[:-1], y.shape[-1])
        if packed is None:
            packed = self._packed[key] = torch.ops.onednn.qconv_prepack(
                self._weight2d(w_q), w_scale, 1.0, 0, self.stride, self.padding, self.dilation, self.groups, None)
        x = self._as2d(u).contiguous(memory_format=torch.channels_last)
        y = torch.ops.onednn.qconv2d_pointwise(x, 1.0, 0, packed, w_scale, zp, None, self.stride, self.padding,
                                               self.dilation, self.groups, 1.0, 0, torch.float32, "none", [], "")
        return y.squeeze(2) if self.conv1d else y

    def _matmul(self, u: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, backend: str) -> torch.Tensor:
        align = self.align if self.align is not None else (16 if u.device.type == "cuda" else 1)
        if backend == "int_mm":
            if u.dtype != torch.uint8:
                raise TypeError(f"the int_mm backend takes uint8 activations, got {u.dtype}")
            values = u.to(torch.float16)  # exact: u <= 255
            if self.base(u):
                values.sub_(128)
        else:
            if u.dtype != FP8_DTYPE:
                raise TypeError(f"the scaled_mm backend takes {FP8_DTYPE} activations, got {u.dtype}")
            values = u.to(torch.float16)  # e4m3 values are exact in float16
        w = w_q if backend == "scaled_mm" else w_q.to(torch.int8)
        if self.linear:
            rows = values.reshape(-1, values.shape[-1])
            out = self._mm(rows, w, backend, align)
            return out.mul_(w_scale).view(*u.shape[:-1], out.shape[-1])
        x = self._as2d(values)
        n = x.shape[0]
        cols = F.unfold(x, self.kernel, self.dilation, self.padding, self.stride)  # (N, C*kh*kw, L)
        h_out = (x.shape[2] + 2 * self.padding[0] - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        w_out = (x.shape[3] + 2 * self.padding[1] - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        rows = cols.transpose(1, 2).reshape(n * h_out * w_out, cols.shape[1])
        weight = self._weight2d(w).reshape(w.shape[0], -1)
        out_g, in_g = weight.shape[0] // self.groups, rows.shape[1] // self.groups
        parts = [self._mm(rows[:, g * in_g:(g + 1) * in_g], weight[g * out_g:(g + 1) * out_g], backend, align)
                 for g in range(self.groups)]
        out = parts[0] if self.groups == 1 else torch.cat(parts, dim=1)
        out = out.mul_(w_scale).view(n, h_out, w_out, -1).permute(0, 3, 1, 2)  # channels-last memory
        return out.squeeze(2) if self.conv1d else out

    @staticmethod
    def _mm(rows: torch.Tensor, weight: torch.Tensor, backend: str, align: int) -> torch.Tensor:
        """rows (M, K) float16 holding exact values, weight (N, K) int8 / e4m3 -> (M, N) float32."""
        m, n = rows.shape[0], weight.shape[0]
        if backend == "int_mm":
            a = _pad_to(_pad_to(rows.to(torch.int8), 1, align), 0, 1, minimum=32 if align > 1 else 0)
            b = _pad_to(_pad_to(weight, 1, align), 0, align)
            out = torch._int_mm(a.contiguous(), b.t()).float()
        else:
            a = _pad_to(rows.to(FP8_DTYPE), 1, align).contiguous()
            b = _pad_to(_pad_to(weight, 1, align), 0, align)
            one = torch.ones((), device=rows.device)
            out = torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        return out[:m, :n]


# -- activation quantizers of the real path ------------------------------------------------------
def int_quantize(r: torch.Tensor, dims: tuple[int, ...], bits: int, symmetric: bool,
                 static: tuple[torch.Tensor, torch.Tensor] | None = None, want_dequantized: bool = False,
                 inplace: bool = True, rows: bool = False):
    """Quantize ``r`` (in place if ``inplace``: a temporary the caller owns) to ``(u, scale, offset, d)``:
    ``u`` uint8 with ``(u - offset) * scale`` on the grid, ``d`` that dequantized tensor (or None). The arithmetic
    is :func:`modiff.quant.fake_quant`'s, op for op, so ``d`` is bit-equal to the fake path's."""
    scale, zero_point = static if static is not None else dynamic_scale(r, dims, bits, symmetric)
    q = (r.div_(scale) if inplace else torch.div(r, scale)).round_()
    if symmetric:
        half = 2 ** (bits - 1)
        q.clamp_(-half, half - 1)
        d = q.mul(scale) if want_dequantized else None
        return q.add_(half).to(torch.uint8, memory_format=_layout(rows)), scale, half, d
    q.add_(zero_point).clamp_(0, 2**bits - 1)
    d = torch.sub(q, zero_point).mul_(scale) if want_dequantized else None
    return q.to(torch.uint8, memory_format=_layout(rows)), scale, zero_point, d


def _layout(rows: bool) -> torch.memory_format:
    """``u``'s layout: a linear's kernel reads rows, so ``u`` is written contiguous in the same pass (an attention
    projection's input is often a transposed view: diffusers' group norm returns (B, C, HW), transposed to
    (B, HW, C)); a conv's keeps the input's (channels-last in, channels-last out)."""
    return torch.contiguous_format if rows else torch.preserve_format


def fp8_quantize(r: torch.Tensor, dims: tuple[int, ...], want_dequantized: bool = False,
                 scale: torch.Tensor | None = None):
    """``(e4m3 values, scale, 0, d)`` with ``d`` bit-equal to :func:`modiff.quant.fake_quant_fp8`;
    ``scale`` given: use it (a tensor-wise scale taken over a larger batch)."""
    if scale is None:
        scale = fp8_scale(r, dims)
    a8 = to_fp8(r, scale)
    d = a8.to(r.dtype).mul_(scale) if want_dequantized else None
    return a8, scale, 0, d


def quantize_real(r: torch.Tensor, dims: tuple[int, ...], bits: int, symmetric: bool, fp8: bool,
                  static: tuple[torch.Tensor, torch.Tensor] | None = None, want_dequantized: bool = False,
                  inplace: bool = True, rows: bool = False):
    """:func:`int_quantize` or, with ``fp8``, :func:`fp8_quantize` (``static``'s scale, if given;
    e4m3 has no zero point) -> ``(u, scale, offset, d)``."""
    if fp8:
        return fp8_quantize(r, dims, want_dequantized, scale=None if static is None else static[0])
    return int_quantize(r, dims, bits, symmetric, static, want_dequantized, inplace, rows)


def epilogue(y: torch.Tensor, scale: torch.Tensor, offset, m: torch.Tensor | None, add: torch.Tensor | None,
             bias: torch.Tensor | None) -> torch.Tensor:
    """``scale * (y - offset * M) + add + bias``, in ``y``'s storage (the kernel's fresh output)."""
    if m is not None:
        if isinstance(offset, torch.Tensor):
            y.addcmul_(offset, m, value=-1)
        elif offset:
            y.sub_(m, alpha=offset)
    y.mul_(scale)
    if add is not None:
        y.add_(add)
    if bias is not None:  # shaped by the caller to broadcast (conv: (C, 1, ...); linear: (N,))
        y.add_(bias)
    return y


def epilogue_to(y: torch.Tensor, scale: torch.Tensor, offset, m: torch.Tensor | None, add: torch.Tensor | None,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`epilogue` written in ``out_dtype`` (a bfloat16 / float16 output or state): computed in float32, one
    fused pass that writes only the result when compiled (no float32 copy beside it)."""
    if m is not None and (isinstance(offset, torch.Tensor) or offset):
        y = y - offset * m
    y = y * scale
    if add is not None:
        y = y + add
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


def quantize_input(x: torch.Tensor, dims: tuple[int, ...], bits: int, symmetric: bool, fp8: bool,
                   static: tuple[torch.Tensor, torch.Tensor] | None = None, rows: bool = False):
    """Plain PTQ: quantize the layer's input (left untouched) -> ``(u, scale, offset)``; ``rows``: ``u`` contiguous
    (a linear's input)."""
    r = x if x.dtype == torch.float32 else x.float()
    return quantize_real(r, dims, bits, symmetric, fp8, static, inplace=r is not x, rows=rows)[:3]


def quantize_residual(x: torch.Tensor, ref: torch.Tensor, dims: tuple[int, ...], bits: int, symmetric: bool,
                      fp8: bool, update_ref: bool, static: tuple[torch.Tensor, torch.Tensor] | None = None,
                      rows: bool = False):
    """Modulated modes: quantize ``x - ref`` -> ``(u, scale, offset)``; with ``update_ref`` (MoDiff's
    error compensation) also ``ref += dequantized residual`` in place; ``rows`` as in :func:`quantize_input`."""
    r = torch.sub(x, ref) if x.dtype == torch.float32 else x.float().sub_(ref)
    u, scale, offset, d = quantize_real(r, dims, bits, symmetric, fp8, static, want_dequantized=update_ref, rows=rows)
    if update_ref:
        ref.add_(d)
    return u, scale, offset


def quantize_input_silu(x: torch.Tensor, dims: tuple[int, ...], bits: int, symmetric: bool, fp8: bool,
                        static: tuple[torch.Tensor, torch.Tensor] | None = None, rows: bool = False):
    """:func:`quantize_input` of ``silu(x)`` (a resnet block's normalised activation): one pass when compiled,
    ``silu(x)`` never written."""
    return quantize_input(F.silu(x), dims, bits, symmetric, fp8, static, rows)


def quantize_residual_silu(x: torch.Tensor, ref: torch.Tensor, dims: tuple[int, ...], bits: int, symmetric: bool,
                           fp8: bool, update_ref: bool, static: tuple[torch.Tensor, torch.Tensor] | None = None,
                           rows: bool = False):
    """:func:`quantize_residual` of ``silu(x)`` (``ref`` updated in place with ``update_ref``)."""
    return quantize_residual(F.silu(x), ref, dims, bits, symmetric, fp8, update_ref, static, rows)


def fake_input(x: torch.Tensor, dims: tuple[int, ...], bits: int, symmetric: bool, fp8: bool) -> torch.Tensor:
    """The fake path's ``Q(x)`` (a new tensor), as one fusable function."""
    return fake_quant_fp8(x, dims) if fp8 else quantize_over(x, dims, bits, symmetric)


def fake_residual(x: torch.Tensor, ref: torch.Tensor, dims: tuple[int, ...], bits: int, symmetric: bool, fp8: bool,
                  update_ref: bool) -> torch.Tensor:
    """The fake path's ``d = Q(x - ref)`` (and ``ref += d`` with ``update_ref``), as one fusable function."""
    r = torch.sub(x, ref)
    d = fake_quant_fp8(r, dims) if fp8 else quantize_over(r, dims, bits, symmetric, inplace=True)
    if update_ref:
        ref.add_(d)
    return d


_COMPILED: dict[str, object] = {}
RECOMPILE_LIMIT = 64
_FUSABLE = ("quantize_input", "quantize_residual", "quantize_input_silu", "quantize_residual_silu", "epilogue",
            "epilogue_to", "fake_input", "fake_residual")


def compiled(name: str):
    """``torch.compile`` (dynamic shapes) of one of this module's fusable passes, made once per process."""
    fn = _COMPILED.get(name)
    if fn is None:
        if name not in _FUSABLE:
            raise ValueError(f"no fusable pass {name!r}; one of {', '.join(_FUSABLE)}")
        # one graph per input rank, dtype, layout and optional operand (a UNet and a transformer in one process,
        # bfloat16 and float32 cells, linears and convs): more than dynamo's default of 8 per function, after
        # which it would silently run the rest eager
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        fn = _COMPILED[name] = torch.compile(globals()[name], dynamic=True)
    return fn


def reset_compiled() -> None:
    """Forget the compiled passes (and dynamo's caches): the next call compiles again; used to time compilation."""
    _COMPILED.clear()
    torch._dynamo.reset()
