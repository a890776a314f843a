"""Compute and memory accounting for (modulated) quantized denoisers.

Two cost figures are reported side by side:

* ``gbops_paper`` reproduces the MoDiff paper's "GBops": MACs of conv/linear layers (plus the attention matmuls a FLOP
  profiler sees) times weight bits times activation bits, per image per denoising step. It ignores the full-precision
  warm-up step, the min/max reductions of dynamic scales and the residual additions of modulation.
* ``gbops_honest`` averages over a whole trajectory and charges the warm-up step at 32-bit activations plus the
  float32 additions modulation needs at every later step. (The min/max reductions are still not charged.)

MACs come from one real forward pass with hooks (``count_macs``), so they follow whatever the model actually runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import EXECUTIONS, MODULATIONS, NOT_QUANTIZED, check_bits, check_choice
from .layers import QUANTIZABLE, QuantLayer

__all__ = [
    "LayerCount",
    "MacReport",
    "count_macs",
    "gbops_paper",
    "gbops_honest",
    "ran_bits",
    "state_bytes_estimate",
]

FP_BITS = NOT_QUANTIZED  # bit width of an unquantized (float32) operand


@dataclass
class LayerCount:
    """Cost of one call of one layer, per image: the unit everything else is summed from."""

    name: str
    kind: str  # "conv" | "linear" | "attention"
    macs: int  # multiply-accumulates per image, one forward
    in_elements: int  # input activation elements per image
    out_elements: int  # output activation elements per image


@dataclass
class MacReport:
    """Per-image, per-denoiser-call counts of a model; sums are split because attention is not quantized the same."""

    layers: list[LayerCount] = field(default_factory=list)

    def _weighted(self) -> Iterable[LayerCount]:
        return (layer for layer in self.layers if layer.kind in ("conv", "linear"))

    @property
    def conv_linear_macs(self) -> int:
        """MACs of every conv/linear call: the part the quantizer wraps."""
        return sum(layer.macs for layer in self._weighted())

    @property
    def attention_macs(self) -> int:
        """MACs of the QK^T and softmax*V matmuls (the q/k/v/out projections are counted as linear)."""
        return sum(layer.macs for layer in self.layers if layer.kind == "attention")

    @property
    def total_macs(self) -> int:
        return self.conv_linear_macs + self.attention_macs

    @property
    def in_elements(self) -> int:
        """Input activation elements of all conv/linear calls: what modulation subtracts from and accumulates."""
        return sum(layer.in_elements for layer in self._weighted())

    @property
    def out_elements(self) -> int:
        """Output activation elements of all conv/linear calls: what modulation accumulates its outputs into."""
        return sum(layer.out_elements for layer in self._weighted())


def _first_tensor(values: Iterable) -> torch.Tensor | None:
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (tuple, list)):
            found = _first_tensor(value)
            if found is not None:
                return found
    return None


def _per_image(total: int, batch: int) -> int:
    return total // batch if total % batch == 0 else round(total / batch)


def _layer_macs(layer: nn.Module, out_numel: int) -> int:
    if isinstance(layer, nn.Linear):
        return out_numel * layer.in_features
    kernel = 1
    for k in layer.kernel_size:
        kernel *= k
    return out_numel * (layer.in_channels // layer.groups) * kernel


def _attention_class() -> type | None:
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # diffusers absent: nothing of that kind to hook
        return None
    return Attention


def _tokens(x: torch.Tensor) -> int:
    """Number of tokens of an attention input: (B, C, H, W) -> H*W, (B, L, C) -> L."""
    if x.ndim == 4:
        return x.shape[2] * x.shape[3]
    if x.ndim == 3:
        return x.shape[1]
    raise ValueError(f"cannot count tokens of an attention input with shape {tuple(x.shape)}")


def _attention_inner_dim(attn: nn.Module) -> int:
    inner = getattr(attn, "inner_dim", None)
    if inner:
        return int(inner)
    heads, dim_head = getattr(attn, "heads", None), getattr(attn, "dim_head", None)
    if heads and dim_head:
        return int(heads * dim_head)
    return int(attn.to_q.out_features)


def count_macs(model: nn.Module, *args, **kwargs) -> MacReport:
    """Run ``model(*args, **kwargs)`` once under ``torch.no_grad()`` and count MACs per image from forward hooks.

    Counting a real forward pass (rather than walking the module tree) follows the control flow the model really takes:
    modules called twice count twice, unused ones not at all. The batch size is dim 0 of the first tensor argument.
    Conv1d/Conv2d: output elements * in_channels / groups * prod(kernel_size); Linear: output elements * in_features.
    A ``modiff.QuantLayer`` counts as the layer it wraps (it calls the weights functionally, so the inner module's own
    hooks would not fire); the inner module is not hooked, so it is never counted twice.
    diffusers ``Attention`` modules add 2 * L_q * L_kv * inner_dim for QK^T and softmax*V.
    The forward pass is real: on a model with stateful (modulated) layers it advances that state, so reset it after.
    """
    first = _first_tensor(list(args) + list(kwargs.values()))
    if first is None or first.ndim == 0:
        raise ValueError("count_macs needs a batched tensor argument to take the batch size from")
    batch = int(first.shape[0])
    if batch < 1:
        raise ValueError("count_macs needs a non-empty batch")

    layers: list[LayerCount] = []
    attention_cls = _attention_class()

    def layer_hook(name: str, layer: nn.Module):
        def hook(module, hook_args, hook_kwargs, output):
            # with_kwargs: a layer called as layer(input=x) has its tensor in kwargs, not in args
            x = _first_tensor(list(hook_args) + list(hook_kwargs.values()))
            y = _first_tensor([output])
            if x is None or y is None:
                return
            kind = "linear" if isinstance(layer, nn.Linear) else "conv"
            layers.append(
                LayerCount(
                    name=name,
                    kind=kind,
                    macs=_per_image(_layer_macs(layer, y.numel()), batch),
                    in_elements=_per_image(x.numel(), batch),
                    out_elements=_per_image(y.numel(), batch),
                )
            )

        return hook

    def attention_hook(name: str):
        def hook(module, hook_args, hook_kwargs, output):
            hidden = hook_args[0] if hook_args else hook_kwargs.get("hidden_states")
            if len(hook_args) > 1:
                context = hook_args[1]
            else:
                context = hook_kwargs.get("encoder_hidden_states")
            if not isinstance(hidden, torch.Tensor):
                return
            l_q = _tokens(hidden)
            l_kv = _tokens(context) if isinstance(context, torch.Tensor) else l_q
            total = 2 * l_q * l_kv * _attention_inner_dim(module) * hidden.shape[0]
            y = _first_tensor([output])
            layers.append(
                LayerCount(
                    name=name,
                    kind="attention",
                    macs=_per_image(total, batch),
                    in_elements=_per_image(hidden.numel(), batch),
                    out_elements=_per_image(y.numel(), batch) if y is not None else 0,
                )
            )

        return hook

    modules = dict(model.named_modules(remove_duplicate=False))
    wrapped_inner = {id(m.layer) for m in modules.values() if isinstance(m, QuantLayer)}
    handles = []
    seen: set[int] = set()
    try:
        for name, module in modules.items():
            if id(module) in seen:  # shared module: one hook, it fires once per call
                continue
            seen.add(id(module))
            if isinstance(module, QuantLayer):
                handles.append(module.register_forward_hook(layer_hook(name, module.layer), with_kwargs=True))
            elif isinstance(module, QUANTIZABLE) and id(module) not in wrapped_inner:
                handles.append(module.register_forward_hook(layer_hook(name, module), with_kwargs=True))
            elif attention_cls is not None and isinstance(module, attention_cls):
                handles.append(module.register_forward_hook(attention_hook(name), with_kwargs=True))
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return MacReport(layers=layers)


def gbops_paper(report: MacReport, w_bits: int, a_bits: int, include_attention: bool = True) -> float:
    """GBops as the MoDiff paper reports them: MACs * w_bits * a_bits / 1e9, per image per step.

    Kept separate from ``gbops_honest`` so paper tables can be reproduced exactly. Like the paper's profiler count, the
    same bit widths are applied to the attention matmuls (``include_attention``). 32 bits means unquantized.
    """
    check_bits("w_bits", w_bits)
    check_bits("a_bits", a_bits)
    macs = report.conv_linear_macs + (report.attention_macs if include_attention else 0)
    return macs * w_bits * a_bits / 1e9


def ran_bits(bits: int, execution: str = "fake", float_bits: int = FP_BITS) -> int:
    """The bit width an operand of ``bits`` is charged at in ``gbops_honest``: what actually runs. Unquantized
    (32) operands are floats of ``float_bits`` (16 for bfloat16); real execution (``int8`` / ``fp8``) holds every
    quantized operand in an 8-bit container whatever its grid (an A4 residual still costs an 8-bit multiply);
    fake quantization is charged at its grid's width, the cost a kernel of that width would have."""
    if bits == NOT_QUANTIZED:
        return float_bits
    return 8 if execution != "fake" else bits


def gbops_honest(
    report: MacReport, w_bits: int, a_bits: int, steps: int, modulation: str, include_attention: bool = True, *,
    execution: str = "fake", float_bits: int = FP_BITS, warmup: bool = True, attention_quantized: bool = True,
    reused: Mapping[str, float] | None = None,
) -> float:
    """Average GBops per image per step over a trajectory of ``steps`` denoiser calls, with modulation's real costs.

    Operands are charged at what runs (``ran_bits``): ``execution`` ``int8`` / ``fp8`` at their 8-bit containers,
    unquantized operands at ``float_bits`` (32, or 16 for bfloat16 full precision). ``"off"``: MACs * w * a (with
    the fake-execution defaults, identical to ``gbops_paper``). ``"plain"`` / ``"ec"``: the first (warm-up) step
    runs conv/linear layers with 32-bit activations (MACs * w * 32; with real execution the warm-up runs a float32
    conv, so 32 * 32; with ``warmup=False`` it is a quantized step, MACs * w * a, without modulation's additions);
    each of the other ``steps - 1`` steps costs MACs * w * a plus, for every conv/linear layer, float32 additions:
    ``ec`` does ``2 * in_elements + out_elements`` (the input difference, the update of the reconstruction â and
    the output accumulation); ``plain`` keeps the true input instead of accumulating one, so ``in_elements +
    out_elements``. Convention: a b-bit addition costs b bit-operations, so each of these costs 32 (the layers keep
    their state in float32). ``a_bits = 0`` (modulated: every later step reuses the cached output) charges those
    steps the input difference only, ``in_elements`` additions, and no MACs. Attention matmuls (QK^T, softmax x V)
    are not modulated: with ``attention_quantized`` (Q-Diffusion quantizes q, k, v and the probabilities) they are
    charged at w * a every step, else (MoDiff's wrapped layers are conv/linear only: the matmuls run in float) at
    ``float_bits`` x ``float_bits``. The min/max reductions of dynamic scales are still not charged.
    ``reused`` (adaptive caching, ``residual_tolerance``): layer name -> the fraction of its later-step samples
    that reused the cached output (``modiff.reused_samples``); such a sample costs that layer its input
    difference only (``in_elements`` additions, as at 0 bits), not its MACs, â update or output accumulation.
    """
    check_bits("w_bits", w_bits)
    check_bits("a_bits", a_bits, allow_zero=modulation != "off")
    check_choice("modulation", modulation, MODULATIONS)
    check_choice("execution", execution, EXECUTIONS)
    if float_bits not in (16, FP_BITS):
        raise ValueError(f"float_bits must be 16 or 32; got {float_bits!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    w, a = ran_bits(w_bits, execution, float_bits), ran_bits(a_bits, execution, float_bits)
    attention_bits = w * a if attention_quantized else float_bits * float_bits
    attention = report.attention_macs * attention_bits if include_attention else 0
    quantized_step = report.conv_linear_macs * w * a + attention
    if modulation == "off":
        return quantized_step / 1e9
    if a_bits == 0 and not warmup:
        raise ValueError("a_bits=0 needs the warm-up step (there is no output to reuse without it)")
    # the warm-up runs the layers at 32-bit activations (a float32 conv under real execution)
    first = report.conv_linear_macs * (FP_BITS if execution != "fake" else w) * FP_BITS + attention if warmup \
        else quantized_step
    if a_bits == 0:  # every later step reuses the cached output: only the input difference is computed
        later = report.in_elements * FP_BITS + attention
    else:
        input_passes = 2 if modulation == "ec" else 1
        later = quantized_step + (input_passes * report.in_elements + report.out_elements) * FP_BITS
        for layer in report._weighted() if reused else ():  # what a reused sample does not run
            later -= reused.get(layer.name, 0.0) * (layer.macs * w * a + ((input_passes - 1) * layer.in_elements
                                                                         + layer.out_elements) * FP_BITS)
    return (first + (steps - 1) * later) / steps / 1e9


def reused_share(report: MacReport, reused: Mapping[str, float]) -> float:
    """The MAC-weighted share of the conv/linear work of later steps that reused cached outputs (``reused`` as in
    ``gbops_honest``): 0 when every residual was computed, 1 when every layer returned its cache."""
    total = report.conv_linear_macs
    return sum(reused.get(layer.name, 0.0) * layer.macs for layer in report._weighted()) / total if total else 0.0


def state_bytes_estimate(report: MacReport, batch_size: int, modulation: str, bytes_per_element: int = 4) -> int:
    """Bytes of state modulation keeps between steps, for ``batch_size`` images: the memory price of MoDiff.

    ``"ec"`` keeps the reconstructed input (in_elements) and accumulated output (out_elements) of every conv/linear
    layer; ``"plain"`` keeps the previous true input and previous output (same sizes); ``"off"`` keeps nothing.
    """
    check_choice("modulation", modulation, MODULATIONS)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    if isinstance(bytes_per_element, bool) or not isinstance(bytes_per_element, int) or bytes_per_element < 1:
        raise ValueError(f"bytes_per_element must be an integer >= 1; got {bytes_per_element!r}")
    if modulation == "off":
        return 0
    return (report.in_elements + report.out_elements) * bytes_per_element * batch_size
