"""Read the calibrated CIFAR-10 DDPM checkpoints of the MoDiff and Q-Diffusion authors' code bases.

``scripts/sample_diffusion_ddim.py`` of github WeizhiGao/MoDiff (and of Xiuyu-Li/q-diffusion) saves
``torch.save(qnn.state_dict(), "ckpt.pth")``, the file ``--resume --cali_ckpt`` reads back. What that file holds,
as checked in the reference code:

- ``qdiff/quant_model.py`` ``QuantModel`` keeps the DDIM ``Model`` as ``self.model`` (keys start with ``model.``) and
  replaces every Conv2d / Conv1d / Linear by a ``QuantModule`` (``qdiff/quant_layer.py``), which keeps the original
  ``weight`` and ``bias`` (full precision) under the same names, plus ``weight_quantizer`` and ``act_quantizer``.
- ``qdiff/quant_block.py`` ``QuantResnetBlock`` / ``QuantAttnBlock`` copy ``norm1, conv1, temb_proj, norm2, conv2,
  nin_shortcut`` / ``norm, q, k, v, proj_out`` from the wrapped block under the *same* names, so every key below
  ``model.`` is an original DDIM name; the wrappers only add activation quantizers (``act_quantizer``, and
  ``act_quantizer_w/q/k/v`` in attention).
- ``UniformAffineQuantizer`` keeps ``delta`` / ``zero_point`` as plain attributes; the sampling script wraps them in
  ``nn.Parameter`` for every ``AdaRoundQuantizer`` just before saving (``qdiff/utils.py`` ``resume_cali_model`` does the
  same before ``load_state_dict(strict=True)``), so a calibrated weight quantizer saves ``alpha`` (``nn.Parameter``,
  the weight's shape), ``delta`` and ``zero_point`` (per output channel, ``[C_out, 1, 1, 1]`` or ``[C_out, 1]``).
- Shortcut splitting (``QuantModule.forward``): ``weight_quantizer`` quantizes ``weight[:, :split]`` and
  ``weight_quantizer_0`` quantizes ``weight[:, split:]``, concatenated along dim 1. ``split`` is a plain int
  attribute, not saved: it is read here from ``alpha``'s shape (the AdaRound quantizer of each half is built on
  that half, ``convert_adaround`` in ``qdiff/utils.py`` and ``layer_reconstruction`` in ``qdiff/layer_recon.py``).

Dequantization, in the reference's float32 operation order (so the values are the ones its forward pass uses):

- AdaRound, hard rounding: Q-Diffusion ``qdiff/adaptive_rounding.py`` ``AdaRoundQuantizer.forward``, round mode
  ``learned_hard_sigmoid`` with ``soft_targets`` False (set at the end of ``layer_reconstruction``):
  ``x_int = floor(w / delta) + (alpha >= 0)``, ``x_q = clamp(x_int + zero_point, 0, n_levels - 1)``,
  ``w_hat = (x_q - zero_point) * delta``.
- No ``alpha`` (a plain ``UniformAffineQuantizer``): ``qdiff/quant_layer.py`` ``UniformAffineQuantizer.forward``,
  asymmetric branch: ``x_q = clamp(round(w / delta) + zero_point, 0, n_levels - 1)``, same ``w_hat``.
- ``n_levels = 2 ** w_bits``: ``UniformAffineQuantizer.__init__`` for ``symmetric=False``, which the scripts' weight
  parameters ``{'n_bits', 'channel_wise': True, 'scale_method': 'max'}`` leave at its default; ``AdaRoundQuantizer``
  copies it. ``w_bits`` is not in the file, so the caller states it.

A library module: it needs ``torch`` only, and its problems are :class:`CheckpointError` (a ``ValueError``;
:class:`CheckpointTypeError` is also a ``TypeError``), one line naming the key or parameter. It reads no file
and knows no model: the caller loads the file (``torch.load(weights_only=True)``: unpickling it must never run code)
and states the model's layout. The glue to the harness, :mod:`baselines.modiff_authors_act.method`, does both for the
CIFAR-10 DDPM (the harness's safe reader, the zoo's DDPM layout and key conversion) and reports these errors as the
harness's one-line errors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

PREFIX = "model."  # QuantModel.model
WEIGHT_QUANTIZERS = ("weight_quantizer", "weight_quantizer_0")  # the second covers input channels [split:]
QUANTIZER_TENSORS = ("alpha", "delta", "zero_point")
W_BITS_RANGE = (2, 8)


class CheckpointError(ValueError):
    """A malformed authors' checkpoint, or a bad argument to read one: one line naming the key, file or parameter."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class CheckpointTypeError(CheckpointError, TypeError):
    """A :class:`CheckpointError` about a value of the wrong type (also a ``TypeError``)."""


def _listing(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_w_bits(w_bits: int) -> int:
    """``w_bits`` if it is a bit width the authors' weight quantizers support, else a CheckpointError."""
    wrong_type = isinstance(w_bits, bool) or not isinstance(w_bits, int)
    if wrong_type or not W_BITS_RANGE[0] <= w_bits <= W_BITS_RANGE[1]:
        error = CheckpointTypeError if wrong_type else CheckpointError
        raise error(f"w_bits must be an integer in {W_BITS_RANGE[0]}..{W_BITS_RANGE[1]}, got {w_bits!r}")
    return w_bits


def _tensor(key: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CheckpointTypeError(f"{key} is a {type(value).__name__}, not a tensor")
    return value


def _fits(name: str, tensor: torch.Tensor, shape: torch.Size) -> None:
    """``tensor`` must broadcast to ``shape`` without growing it (a misshapen grid is an error, not a broadcast)."""
    try:
        ok = torch.broadcast_shapes(tensor.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise CheckpointError(f"{name} of shape {tuple(tensor.shape)} does not broadcast to its weight's "
                              f"{tuple(shape)}")


def _dequantize_part(name: str, w: torch.Tensor, params: Mapping[str, torch.Tensor], n_levels: int):
    """``(w_hat, clamped elements)`` for one quantizer applied to ``w`` (the weight or one split half)."""
    missing = [p for p in ("delta", "zero_point") if p not in params]
    if missing:
        raise CheckpointError(f"{PREFIX}{name} is incomplete: no {' or '.join(missing)} "
                              f"(has {sorted(params) or 'nothing'})")
    w = w.float()
    delta, zero_point = params["delta"].float(), params["zero_point"].float()
    _fits(f"{PREFIX}{name}.delta", delta, w.shape)
    _fits(f"{PREFIX}{name}.zero_point", zero_point, w.shape)
    if not bool(torch.isfinite(delta).all()) or bool((delta <= 0).any()):
        raise CheckpointError(f"{PREFIX}{name}.delta has non-positive or non-finite step sizes")
    if not bool(torch.isfinite(zero_point).all()):
        raise CheckpointError(f"{PREFIX}{name}.zero_point is not finite")
    alpha = params.get("alpha")
    if alpha is not None:
        if tuple(alpha.shape) != tuple(w.shape):
            raise CheckpointError(f"{PREFIX}{name}.alpha has shape {tuple(alpha.shape)}, its weight {tuple(w.shape)}")
        x_int = torch.floor(w / delta) + (alpha >= 0).float()  # AdaRoundQuantizer, hard rounding
    else:
        x_int = torch.round(w / delta)  # UniformAffineQuantizer
    shifted = x_int + zero_point
    x_q = torch.clamp(shifted, 0, n_levels - 1)
    return (x_q - zero_point) * delta, int((shifted != x_q).sum())


def _split_point(module: str, weight: torch.Tensor, quantizers: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    """The input channel where ``weight_quantizer_0`` takes over, read from the ``alpha`` shapes (not saved itself)."""
    in_channels = weight.shape[1]
    found = []
    first, second = (quantizers[q].get("alpha") for q in WEIGHT_QUANTIZERS)
    if first is not None and first.dim() >= 2:
        found.append(first.shape[1])
    if second is not None and second.dim() >= 2:
        found.append(in_channels - second.shape[1])
    if not found:
        raise CheckpointError(f"{PREFIX}{module} is split (weight_quantizer_0) but neither quantizer has "
                              f"alpha, so the split point cannot be read")
    if len(set(found)) > 1 or not 0 < found[0] < in_channels:
        raise CheckpointError(f"{PREFIX}{module}: the alpha shapes of its two quantizers do not split its "
                              f"{in_channels} input channels (split {found})")
    return found[0]


def dequantize_state_dict(
    state_dict: Mapping[str, torch.Tensor], w_bits: int, shapes: Mapping[str, tuple[int, ...]],
    model_name: str = "DDPM CIFAR-10",
) -> tuple[dict[str, torch.Tensor], dict]:
    """An authors' ``QuantModel`` state dict -> ``(state dict of the DDIM ``Model`` it wraps, report)``.

    ``shapes``: every tensor of the model the checkpoint calibrates, original DDIM key -> shape (for the CIFAR-10
    DDPM, the third item of the zoo's ``layout()`` in ``bench/zoo/convert/ddpm.py``); ``model_name`` names that model
    in errors.
    Every Conv2d / Linear weight becomes the weight the authors' quantized forward pass uses (float32, on its grid),
    so their calibration can be evaluated without their code; every other tensor of the model (biases, norms) is kept
    as is. Activation-quantizer keys and keys this format does not define are left out and listed in the report:
    ``w_bits``, ``layers`` (weights dequantized), ``adaround_layers`` / ``nearest_layers`` (all quantizers with
    ``alpha`` / at least one without: round to nearest) and ``nearest_layer_names``, ``split_layers`` (name -> split
    point), ``clamped_values`` (elements the ``[0, 2^b - 1]`` clamp moved: many of them hint at a wrong ``w_bits``),
    ``passed_through``, ``act_quantizer_keys``, ``unknown_keys``. A problem is a :class:`CheckpointError`.
    """
    n_levels = 2 ** check_w_bits(w_bits)
    if not isinstance(state_dict, Mapping) or not any(isinstance(k, str) and k.startswith(PREFIX) for k in state_dict):
        raise CheckpointError(f"not a Q-Diffusion / MoDiff QuantModel state dict: no '{PREFIX}' keys")
    shapes = {key: tuple(shape) for key, shape in shapes.items()}

    model: dict[str, torch.Tensor] = {}
    quantizers: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # layer -> quantizer -> alpha/delta/zero_point
    act_keys: list[str] = []
    unknown: list[str] = []
    for key, value in state_dict.items():
        if not isinstance(key, str) or not key.startswith(PREFIX):
            unknown.append(str(key))
            continue
        name = key[len(PREFIX):]
        parts = name.split(".")
        if any(part.startswith("act_quantizer") for part in parts):
            act_keys.append(key)
        elif len(parts) >= 3 and parts[-2] in WEIGHT_QUANTIZERS and parts[-1] in QUANTIZER_TENSORS:
            layer = ".".join(parts[:-2])
            quantizers.setdefault(layer, {}).setdefault(parts[-2], {})[parts[-1]] = _tensor(key, value)
        elif name in shapes:
            model[name] = _tensor(key, value)
        else:
            unknown.append(key)

    missing = [k for k in shapes if k not in model]
    wrong = [f"{k} {tuple(v.shape)} != {shapes[k]}" for k, v in model.items() if tuple(v.shape) != shapes[k]]
    if missing or wrong:
        problems = [f"{len(keys)} {label}: {_listing(keys)}"
                    for label, keys in (("missing keys", missing), ("shape mismatches", wrong)) if keys]
        raise CheckpointError(f"not a {model_name} QuantModel state dict: {'; '.join(problems)}")
    orphans = sorted(set(quantizers) - {k[: -len(".weight")] for k in shapes if k.endswith(".weight")})
    if orphans:
        raise CheckpointError(f"weight quantizer keys for layers the {model_name} model does not have: "
                              f"{_listing(orphans)}")

    out: dict[str, torch.Tensor] = {}
    report: dict = {"w_bits": w_bits, "layers": 0, "adaround_layers": 0, "nearest_layers": 0,
                    "nearest_layer_names": [], "split_layers": {}, "clamped_values": 0, "passed_through": 0}
    for key, value in model.items():
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer is None or value.dim() < 2:  # biases, GroupNorm weights
            out[key] = value
            report["passed_through"] += 1
            continue
        found = quantizers.get(layer)
        if not found:
            raise CheckpointError(f"{PREFIX}{key} has no weight_quantizer keys: not a calibrated (AdaRound) checkpoint")
        if WEIGHT_QUANTIZERS[0] not in found:
            raise CheckpointError(f"{PREFIX}{layer} has weight_quantizer_0 but no weight_quantizer keys")
        if WEIGHT_QUANTIZERS[1] in found:
            split = _split_point(layer, value, found)
            report["split_layers"][layer] = split
            pieces = [(value[:, :split], WEIGHT_QUANTIZERS[0]), (value[:, split:], WEIGHT_QUANTIZERS[1])]
        else:
            pieces = [(value, WEIGHT_QUANTIZERS[0])]
        results = [_dequantize_part(f"{layer}.{q}", w, found[q], n_levels) for w, q in pieces]
        out[key] = torch.cat([w_hat for w_hat, _ in results], dim=1) if len(results) > 1 else results[0][0]
        report["clamped_values"] += sum(clamped for _, clamped in results)
        report["layers"] += 1
        if all("alpha" in found[q] for _, q in pieces):
            report["adaround_layers"] += 1
        else:
            report["nearest_layers"] += 1
            report["nearest_layer_names"].append(layer)
    report["act_quantizer_keys"] = sorted(act_keys)
    report["unknown_keys"] = sorted(unknown)
    return out, report


def checkpoint_state_dict(obj, source: str) -> Mapping:
    """The state dict in what ``torch.load`` returned for an authors' ``ckpt.pth``: the object itself, or its
    ``"state_dict"`` entry (a wrapper some scripts write). ``source`` names the file in the error if it is neither.
    Load the file with ``torch.load(path, map_location="cpu", weights_only=True)``: a downloaded checkpoint is user
    data, and unpickling it must never run code from it."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointTypeError(f"{source} holds a {type(obj).__name__}, not a state dict")
    return obj
