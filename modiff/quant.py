"""Uniform affine fake quantization: round to nearest, clamp to the integer grid.

Asymmetric: ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)``,
``x_q = (clamp(round(x / s) + z, 0, 2^b - 1) - z) * s``.
Symmetric: ``s = absmax / (2^(b-1) - 1)``, ``z = 0``, clamp to ``[-2^(b-1), 2^(b-1) - 1]``.

The arithmetic is the formula above as a chain of in-place ops on one new tensor. torch's fused
``fake_quantize_per_*_affine`` multiply by ``1/s`` instead of dividing by ``s`` and so round
some ties the other way (measured: 2 of 524k elements at 8 bits per tensor, ~80 at 16 bits),
and here they were also ~10x slower than the in-place chain, so they are not used.
"""

from __future__ import annotations

import torch

from .config import GRANULARITIES, NOT_QUANTIZED, check_bits, check_choice

MIN_SCALE = 1e-8  # a constant tensor has zero range; any positive scale reproduces it exactly
# 1e-8 is 0 in float16 (its smallest subnormal is 6e-8): scales are computed in float32, never in these
HALF_DTYPES = (torch.float16, torch.bfloat16)


def grid(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def scale_and_zero_point(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if symmetric:
        scale = (torch.maximum(xmin.abs(), xmax.abs()) / (2 ** (bits - 1) - 1)).clamp_min(MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = ((xmax - xmin) / (2**bits - 1)).clamp_min(MIN_SCALE)
    return scale, torch.round(-xmin / scale)


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool, inplace: bool = False
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with broadcastable ``scale`` / ``zero_point``; a new tensor unless
    ``inplace`` (for temporaries the caller owns)."""
    qmin, qmax = grid(bits, symmetric)
    out = x.div_(scale) if inplace else torch.div(x, scale)
    out.round_()
    if symmetric:
        return out.clamp_(qmin, qmax).mul_(scale)
    # (clamp(round(x/s), qmin - z, qmax - z) would be equal and two passes shorter, but a clamp with
    # tensor bounds measured slower on CPU than add_ + scalar clamp_ + sub_)
    return out.add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


def minmax(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over ``dims`` (keepdim). Reducing the trailing dims first, then the others, is
    exact (min and max do not depend on order) and measured fastest on CPU; ``torch.aminmax`` is
    only used for whole-tensor reductions (with a ``dim`` it was 15-25x slower than amin + amax)."""
    if len(dims) == x.dim():
        lo, hi = torch.aminmax(x)
        shape = (1,) * x.dim()
        return lo.view(shape), hi.view(shape)
    last_kept = max(d for d in range(x.dim()) if d not in dims)
    trailing = tuple(d for d in dims if d > last_kept)
    rest = tuple(d for d in dims if d < last_kept)
    lo = hi = x
    for group in (trailing, rest):
        if group:
            lo, hi = lo.amin(dim=group, keepdim=True), hi.amax(dim=group, keepdim=True)
    return lo, hi


def reduce_dims(ndim: int, granularity: str, channel_axis: int) -> tuple[int, ...]:
    """Dimensions a dynamic scale is computed over (the others keep one scale each).

    ``sample-channel`` on a 2-D input ``(batch, features)`` -- the time-embedding MLP, every
    ``time_emb_proj`` -- is ``sample``: keeping both dims would reduce over nothing, one scale per
    element, so the layer would run exactly while the accounting charges it at ``a_bits``. ``channel``
    keeps its definition there (per feature, over the batch); see ``ModiffConfig`` for when that is
    exact too.

    ``token`` keeps every dim but the channel axis of a linear input (its channel axis is the last dim): one scale
    per row, which factors out of the matmul. A conv input (channel axis 1, spatial dims after it) gets ``sample``:
    each output position of a conv reads a window of input positions, so no finer scale factors out of it."""
    check_choice("granularity", granularity, GRANULARITIES)
    channel_axis %= ndim
    if granularity == "sample-channel" and ndim == 2:
        granularity = "sample"
    if granularity == "token":
        if channel_axis != ndim - 1:
            granularity = "sample"
        else:
            return (channel_axis,)
    keep = {"tensor": (), "sample": (0,), "channel": (channel_axis,), "sample-channel": (0, channel_axis)}[granularity]
    return tuple(d for d in range(ndim) if d not in keep)


def dynamic_fake_quant(
    x: torch.Tensor, bits: int, granularity: str = "tensor", symmetric: bool = False, channel_axis: int = 1
) -> torch.Tensor:
    """Fake-quantize with a min-max scale recomputed from ``x`` itself (dynamic scales, as the paper's LTQ / LCQ)."""
    check_bits("bits", bits)
    if bits == NOT_QUANTIZED:
        return x
    if x.dim() < 2:
        raise ValueError(f"activations must have a batch dimension; got shape {tuple(x.shape)}")
    dims = reduce_dims(x.dim(), granularity, channel_axis)
    if x.dtype in HALF_DTYPES:  # scales in float32 (see MIN_SCALE); the result in x's dtype
        return quantize_over(x.float(), dims, bits, symmetric, inplace=True).to(x.dtype)
    return quantize_over(x, dims, bits, symmetric)


def dynamic_scale(x: torch.Tensor, dims: tuple[int, ...], bits: int, symmetric: bool):
    """Min-max scale and zero point over ``dims`` (none: one per element)."""
    xmin, xmax = minmax(x, dims) if dims else (x, x)
    return scale_and_zero_point(xmin, xmax, bits, symmetric)


def quantize_over(x: torch.Tensor, dims: tuple[int, ...], bits: int, symmetric: bool, inplace: bool = False):
    """The hot path of dynamic quantization (arguments already validated): min-max over ``dims``."""
    scale, zero_point = dynamic_scale(x, dims, bits, symmetric)
    return fake_quant(x, scale, zero_point, bits, symmetric, inplace)


def search_range(
    x: torch.Tensor, bits: int, symmetric: bool, dims: tuple[int, ...], method: str = "minmax",
    p: float = 2.0, candidates: int = 80,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point over ``dims`` by min-max, or by the MSE search used by Q-Diffusion /
    BRECQ: shrink [min, max] by 1% steps (``candidates`` of them) and keep the range with the
    lowest mean |x - Q(x)|^p."""
    check_choice("method", method, ("minmax", "mse"))
    xmin, xmax = minmax(x, dims)
    best = scale_and_zero_point(xmin, xmax, bits, symmetric)
    if method == "minmax":
        return best
    best_err = torch.full_like(xmin, float("inf"))
    for i in range(candidates):
        factor = 1.0 - 0.01 * i
        scale, zp = scale_and_zero_point(xmin * factor, xmax * factor, bits, symmetric)
        err = (fake_quant(x, scale, zp, bits, symmetric) - x).abs().pow(p).mean(dim=dims, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, scale, best[0]), torch.where(better, zp, best[1]))
    return best


def quantize_weight(weight: torch.Tensor, bits: int, method: str = "minmax", symmetric: bool = False) -> torch.Tensor:
    """Per-output-channel (dim 0) fake quantization of a weight tensor."""
    check_bits("w_bits", bits)
    if bits == NOT_QUANTIZED:
        return weight
    w = weight.detach().float()
    scale, zp = search_range(w, bits, symmetric, tuple(range(1, w.dim())), method)
    return fake_quant(w, scale, zp, bits, symmetric).to(weight.dtype)


def weight_grid(weight: torch.Tensor, bits: int, method: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel integers and scales of a weight: ``(w_int, scale)`` with
    ``w_int * scale`` bit-equal to ``quantize_weight(weight, bits, method, symmetric=True)``."""
    check_bits("w_bits", bits)
    w = weight.detach().float()
    scale, _ = search_range(w, bits, True, tuple(range(1, w.dim())), method)
    qmin, qmax = grid(bits, True)
    return w.div(scale).round_().clamp_(qmin, qmax), scale.reshape(-1)


# -- float8 e4m3 ("fp8"): a max-abs scale maps the largest magnitude to e4m3's largest finite value
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def fp8_scale(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Scale over ``dims`` (keepdim): ``absmax / 448``; all dims = one scale for the tensor."""
    lo, hi = minmax(x, dims) if dims else (x, x)
    return torch.maximum(lo.abs(), hi.abs()).div_(FP8_MAX).clamp_min_(MIN_SCALE)


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` rounded to the nearest e4m3 value (saturating at +-448)."""
    return torch.div(x, scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fake_quant_fp8(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    scale = fp8_scale(x, dims)
    return to_fp8(x, scale).to(x.dtype).mul_(scale)


def weight_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel e4m3 weight: ``(w_fp8, scale)``."""
    w = weight.detach().float()
    scale = fp8_scale(w, tuple(range(1, w.dim())))
    return to_fp8(w, scale), scale.reshape(-1)


def dequantize_weight(w_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w_q * scale`` per output channel (dim 0), in ``dtype``: the float weight of :func:`weight_grid`'s integers or
    :func:`weight_fp8`'s e4m3 values (both exact in float32), bit-equal however often it is rebuilt. Keeps ``w_q``'s
    memory format (a channels-last model's weights stay channels-last)."""
    return torch.mul(w_q.float(), scale.view(-1, *([1] * (w_q.dim() - 1)))).to(dtype)
