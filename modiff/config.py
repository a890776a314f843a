"""Typed configuration for ``modiff.quantize``."""

from __future__ import annotations

from dataclasses import dataclass

MODULATIONS = ("off", "plain", "ec")
GRANULARITIES = ("tensor", "sample", "channel", "sample-channel")
WEIGHT_METHODS = ("minmax", "mse")
ACT_SCALES = ("dynamic", "static")
NOT_QUANTIZED = 32


def check_bits(name: str, bits: int, allow_zero: bool = False) -> None:
    ok = isinstance(bits, int) and not isinstance(bits, bool) and (
        2 <= bits <= 16 or bits == NOT_QUANTIZED or (allow_zero and bits == 0))
    if not ok:
        allowed = "2..16 or 32 (not quantized)" + (", or 0 (reuse the cached output)" if allow_zero else "")
        raise ValueError(f"{name} must be {allowed}; got {bits!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class ModiffConfig:
    """How to fake-quantize every conv/linear layer of a denoiser.

    modulation: ``off`` = plain post-training quantization, ``A(Q(a_t))``;
    ``plain`` = residual against the TRUE previous input, no error compensation (paper Eq. 6-7);
    ``ec`` = MoDiff: residual against the RECONSTRUCTED previous input (paper Eq. 8-17).
    ``a_bits = 0`` (modulated modes only) forces zero residuals: every step after the warm-up
    returns the cached output. ``residual_tolerance`` reuses the cache for the samples whose
    residual range (max - min) is at or below it (adaptive caching, paper Remark 4.1).
    ``granularity`` applies to dynamic activation scales; only ``sample`` and ``sample-channel``
    make an image's result independent of the rest of its batch. The channel axis is dim 1 of a
    conv input and the last dim of a linear input.
    """

    w_bits: int = 8
    a_bits: int = 8
    modulation: str = "ec"
    granularity: str = "channel"
    symmetric: bool = False
    warmup: bool = True
    act_scale: str = "dynamic"
    weight_method: str = "minmax"
    residual_tolerance: float | None = None
    skip: tuple[str, ...] = ()  # fnmatch patterns of module names left in full precision

    def __post_init__(self) -> None:
        check_choice("modulation", self.modulation, MODULATIONS)
        check_bits("w_bits", self.w_bits)
        check_bits("a_bits", self.a_bits, allow_zero=self.modulation != "off")
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("act_scale", self.act_scale, ACT_SCALES)
        check_choice("weight_method", self.weight_method, WEIGHT_METHODS)
        if self.act_scale == "static" and self.granularity not in ("tensor", "channel"):
            raise ValueError(f"granularity must be 'tensor' or 'channel' with static scales; got {self.granularity!r}")
        if self.residual_tolerance is not None:
            if self.modulation == "off":
                raise ValueError("residual_tolerance needs modulation 'plain' or 'ec'")
            if not self.residual_tolerance >= 0:
                raise ValueError(f"residual_tolerance must be >= 0; got {self.residual_tolerance!r}")
        if isinstance(self.skip, str):
            raise ValueError("skip must be a tuple of name patterns, not a string")
