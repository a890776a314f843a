"""Typed configuration for ``modiff.quantize``."""

from __future__ import annotations

from dataclasses import dataclass

MODULATIONS = ("off", "plain", "ec")
GRANULARITIES = ("tensor", "sample", "channel", "sample-channel", "token")
WEIGHT_METHODS = ("minmax", "mse")
ACT_SCALES = ("dynamic", "static")
EXECUTIONS = ("fake", "int8", "fp8")
NUMBER_FORMATS = ("int", "fp8")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
STATE_DTYPES = ("float32", "bfloat16", "float16")
NOT_QUANTIZED = 32
REAL_GRANULARITIES = ("tensor", "sample", "token")  # scales that factor out of the reduction over input channels


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
    ``granularity`` applies to dynamic activation scales; only ``sample``, ``sample-channel`` and
    ``token`` make an image's result independent of the rest of its batch. The channel axis is dim 1 of a
    conv input and the last dim of a linear input. On a 2-D linear input ``(batch, features)`` (the
    time-embedding MLP, every ``time_emb_proj``) ``sample-channel`` is ``sample``, one scale per row:
    one per (sample, feature) would be one per element, an exact layer charged at ``a_bits``.
    ``channel`` there is one scale per feature over the batch, which is exact at batch 1 (one scale
    per element) and at any batch whose rows are equal: the samplers give every sample the same
    timestep, so under ``channel`` scales the time-embedding MLP (and ``time_emb_proj``, unless class
    labels differ) is not quantized. That is the definition (LCQ), kept as it is; ``sample`` or
    ``tensor`` quantize those layers.
    ``token``: one scale per row of a linear's input (per token of a transformer's ``(batch, tokens,
    features)``; per sample on a 2-D input), reducing over the features only, so it factors out of the
    matmul and runs on the integer kernels too; on a conv input it is ``sample`` (an output position
    of a conv reads a window of input positions, so a per-position scale would not factor out).
    Static scales (``act_scale="static"``) are fitted on the true temporal residuals in the modulated
    modes, so they need the full-precision warm-up (``warmup=True``): without it the first step would
    quantize a whole activation with a residual's scale, and the combination is refused.

    ``execution``: ``fake`` quantizes and dequantizes in float (accuracy studies); ``int8`` runs the
    conv/linear on integer kernels (oneDNN on CPU, ``torch._int_mm`` on CUDA) with the activation,
    or in the modulated modes the residual, on the ``a_bits`` grid in an 8-bit container;
    ``fp8`` runs them through ``torch._scaled_mm`` on float8 e4m3 values. Real execution needs
    symmetric per-output-channel weights (``weight_symmetric=True``), ``w_bits`` and ``a_bits`` of at
    most 8 and ``tensor``, ``sample`` or ``token`` scales: see ``modiff/kernels.py``. ``weight_symmetric`` puts
    the fake path on the same weight grid, so the two can be compared.
    ``number_format``: ``int`` (uniform integer grids) or ``fp8`` (float8 e4m3 with a max-abs
    scale: ``w_bits = a_bits = 8``, symmetric); ``execution="fp8"`` needs ``number_format="fp8"``
    and ``execution="fake"`` with ``number_format="fp8"`` is its float twin.
    ``compute_dtype``: the dtype of everything that is not quantized (norms, nonlinearities,
    attention, the layers' returned outputs); the layers keep their weights, state and arithmetic in
    float32 either way. (A model cast to float16 or bfloat16 before ``quantize`` is another thing: its
    layers run ``A`` in that dtype and keep scales and state in float32; see ``QuantLayer.forward``.)
    ``compile``: fuse the layers' elementwise passes with ``torch.compile``.
    ``fuse_norms``: the SiLU after each GroupNorm of diffusers' resnet blocks computed by the next conv's
    quantizing pass instead of as a pass of its own (real execution; one compiled pass with ``compile``): see
    ``modiff/fusion.py`` for which blocks and when.
    ``state_dtype``: the dtype the modulated modes keep ``â`` and ``ô`` in between steps (float32 by default;
    ``bfloat16`` or ``float16`` halve the state's bytes). The arithmetic stays float32: the residual is taken
    against the stored ``â``, so error compensation folds ``â``'s storage rounding into the next residual; ``ô``'s
    rounding is not compensated (its cost is measured in docs/modiff.md#state-dtype).
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
    execution: str = "fake"
    weight_symmetric: bool = False
    number_format: str = "int"
    compute_dtype: str = "float32"
    compile: bool = False
    state_dtype: str = "float32"
    fuse_norms: bool = False

    def __post_init__(self) -> None:
        check_choice("modulation", self.modulation, MODULATIONS)
        check_bits("w_bits", self.w_bits)
        check_bits("a_bits", self.a_bits, allow_zero=self.modulation != "off")
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("act_scale", self.act_scale, ACT_SCALES)
        check_choice("weight_method", self.weight_method, WEIGHT_METHODS)
        if self.act_scale == "static" and self.granularity not in ("tensor", "channel"):
            raise ValueError(f"granularity must be 'tensor' or 'channel' with static scales; got {self.granularity!r}")
        if self.a_bits == 0 and not self.warmup:
            raise ValueError("a_bits=0 (reuse the cached output) needs warmup=True: without the full-precision first "
                             "step there is no output to reuse (the first step would quantize to 0 bits)")
        if self.act_scale == "static" and not self.warmup and self.modulation != "off":
            raise ValueError(f"act_scale='static' with warmup=False (modulation {self.modulation!r}) would quantize "
                             "the whole first-step input with a scale fitted on residuals (~10x too narrow); keep "
                             "warmup=True or use act_scale='dynamic'")
        if self.residual_tolerance is not None:
            if self.modulation == "off":
                raise ValueError("residual_tolerance needs modulation 'plain' or 'ec'")
            if not self.residual_tolerance >= 0:
                raise ValueError(f"residual_tolerance must be >= 0; got {self.residual_tolerance!r}")
        if isinstance(self.skip, str):
            raise ValueError("skip must be a tuple of name patterns, not a string")
        check_choice("execution", self.execution, EXECUTIONS)
        check_choice("number_format", self.number_format, NUMBER_FORMATS)
        check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        check_choice("state_dtype", self.state_dtype, STATE_DTYPES)
        for flag in ("weight_symmetric", "compile", "symmetric", "warmup", "fuse_norms"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False; got {getattr(self, flag)!r}")
        if self.number_format == "fp8":
            if self.w_bits != 8 or self.a_bits not in (8, 0):
                raise ValueError(f"number_format 'fp8' is float8 e4m3: w_bits and a_bits must be 8 "
                                 f"(a_bits 0 to reuse the cache); got w_bits={self.w_bits}, a_bits={self.a_bits}")
            if not (self.symmetric and self.weight_symmetric):
                raise ValueError("number_format 'fp8' needs symmetric=True and weight_symmetric=True "
                                 "(e4m3 has no zero point)")
            if self.act_scale != "dynamic":
                raise ValueError("number_format 'fp8' supports act_scale 'dynamic' only")
        if self.execution == "fake":
            return
        real = f"execution {self.execution!r}"
        if self.execution == "fp8" and self.number_format != "fp8":
            raise ValueError(f"{real} needs number_format='fp8'")
        if self.execution == "int8" and self.number_format != "int":
            raise ValueError(f"{real} needs number_format='int'")
        if self.w_bits > 8:
            raise ValueError(f"{real} needs w_bits <= 8 (an 8-bit container); got w_bits={self.w_bits}")
        if self.a_bits > 8:
            raise ValueError(f"{real} needs a_bits <= 8 (an 8-bit container; 32 means not quantized, "
                             f"which has nothing to run on integers); got a_bits={self.a_bits}")
        if self.granularity not in REAL_GRANULARITIES:
            raise ValueError(f"{real} needs granularity 'tensor', 'sample' or 'token' (channel scales do not factor "
                             f"out of the reduction over input channels); got granularity={self.granularity!r}")
        if not self.weight_symmetric:
            raise ValueError(f"{real} needs weight_symmetric=True (the integer kernels take no weight zero point)")
