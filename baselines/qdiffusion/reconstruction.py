"""BRECQ-style reconstruction as Q-Diffusion uses it, on the module structure of a diffusers UNet.

Units: every residual block (``ResnetBlock2D``), attention block (``Attention``) and transformer
block (``BasicTransformerBlock``) is reconstructed as one unit; every other conv / linear layer
(``conv_in``, ``conv_out``, the time-embedding MLP, down/up-sampling convs, ``proj_in``/``proj_out``)
is a unit of its own. Units are visited in the order the forward pass runs them.

For each unit, its input is taken from the partly quantized model (units before it already
quantized) and its target output from the full-precision model on the same calibration input
(BRECQ's asymmetric reconstruction), and the unit's quantization parameters are optimised to match
the target:

1. weight phase (activations in float): AdaRound's rounding variables, Adam, loss
   ``||out - target||^2 + round_weight * sum(1 - |2h - 1|^beta)``, beta annealed 20 -> 2 after a
   20% warm-up without the rounding term (counted from 1, as the authors' ``LossFunction``:
   ``quantizers.beta_schedule``); then rounding is made hard and written into the weight. As in the
   authors' loss, the regulariser covers each layer's first weight grid only: of a split layer the
   second half (their ``weight_quantizer_0``) is optimised but not pushed to 0/1, unless
   ``regularize_both_halves`` (AdaRound's paper regularises every rounding variable);
2. activation phase (weights fixed): every activation quantizer of the unit is initialised by
   min-max, the MSE search or the authors' ``'max'`` formula on the unit's inputs (all rows, or
   ``act_init_samples`` of them, as their one forward pass of 64), optionally followed by their
   running statistics (``running_stat``), then its step size alone is learned, Adam with a cosine
   learning-rate schedule, loss ``||out - target||_p^p`` with p = 2.4 (a softmax quantizer at 16 bits,
   Stable Diffusion's ``sm_abit``, keeps its initial step size, as in the authors' code).

Every iteration of both phases draws its rows as the authors do, ``randperm(n)[:batch_size]``
(``quantizers.minibatch``).

Shortcut splitting: the 1x1 shortcut conv of a decoder residual block reads
``concat([h_deep, h_skip])``; its input gets one activation quantizer per part and its weight one
AdaRound grid per part (split along input channels). The split point is measured on a forward
pass: ``channels(input) - channels(skip tensor the up block pops for that resnet)``.

Conditioning: a text-conditioned UNet is called as ``unet(x, t, encoder_hidden_states=...)`` (SDXL's
also with ``added_cond_kwargs``, a dict of tensors). Every function that runs the model takes the
calibration rows' keyword tensors as ``cond`` (name -> tensor, or dict of tensors, with one row per row
of ``xs``; ``CalibrationData.conditioning()``; an example is ``(x, t)`` or ``(x, t, cond)``), so the
inputs a unit records (and replays) carry what the UNet passed it: a transformer block's
``encoder_hidden_states``, a residual block's time embedding (with SDXL's added embedding in it), for
classifier-free guidance the doubled batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from modiff.config import NOT_QUANTIZED
from modiff.layers import QUANTIZABLE

from .attention import fixed_step_sizes, quantize_attention
from .calibration import call_network, cond_leaves
from .quantizers import ActQuantizer, AdaRoundWeight, SplitActQuantizer, beta_schedule, lp_loss, minibatch

BLOCK_TYPES = ("ResnetBlock2D", "ResnetBlockCondNorm2D", "Attention", "BasicTransformerBlock")
EVAL_SAMPLES = 256  # calibration samples the before/after reconstruction losses are measured on
Cond = dict  # the UNet's keyword inputs (``encoder_hidden_states``, ``added_cond_kwargs``), one row per input row


@dataclass(frozen=True)
class ReconConfig:
    """Q-Diffusion's knobs (paper values as defaults; small iteration counts for CPU presets)."""

    w_bits: int
    a_bits: int
    sm_abit: int = 8
    quant_attention: bool = True
    split_shortcut: bool = True
    weight_init: str = "minmax"  # minmax | mse (80 shrinking ranges, Lp loss with p)
    weight_iters: int = 20000
    weight_lr: float = 1e-3
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    beta_warmup: float = 0.2
    act_init: str = "mse"  # minmax | mse | max (the authors' 'max' formula)
    act_iters: int = 5000
    act_lr: float = 4e-4
    p: float = 2.4
    batch_size: int = 32
    seed: int = 0
    act_symmetric: bool = False  # the authors' --a_sym: signed activation grids, zero point 0
    act_init_samples: int = 0  # rows the initial activation ranges are fitted on (0: all; the authors' 64)
    act_init_pick: str = "random"  # random (drawn without repeats, their np.random.choice) | first (their cali_xs[:64])
    running_stat: bool = False  # the authors' --running_stat after the initialisation
    regularize_both_halves: bool = False  # AdaRound's regulariser on both weight grids of a split layer


class ReconLayer(nn.Module):
    """A conv / linear under reconstruction: AdaRound weight grid(s) and static input quantizer(s)."""

    def __init__(self, layer: nn.Module, name: str, w_bits: int, a_bits: int, split: int = 0, p: float = 2.4,
                 act_symmetric: bool = False):
        super().__init__()
        self.layer = layer
        self.name = name
        self.w_bits = w_bits
        self.split = split
        self.weight_quantizers = nn.ModuleList()
        if a_bits >= NOT_QUANTIZED:
            self.act = None
        else:
            self.act = (SplitActQuantizer(split, a_bits, p, act_symmetric) if split
                        else ActQuantizer(a_bits, p, act_symmetric))

    def start_adaround(self, init: str, p: float) -> None:
        """Put the weight on its grid with learnable rounding (initially round-to-nearest)."""
        if self.w_bits >= NOT_QUANTIZED:
            return
        w = self.layer.weight
        parts = [w[:, : self.split], w[:, self.split:]] if self.split else [w]
        self.weight_quantizers = nn.ModuleList(AdaRoundWeight(part, self.w_bits, init, p) for part in parts)

    def weight(self) -> torch.Tensor:
        if not len(self.weight_quantizers):
            return self.layer.weight
        return torch.cat([q() for q in self.weight_quantizers], dim=1)

    def set_soft(self, soft: bool) -> None:
        for q in self.weight_quantizers:
            q.soft = soft

    def harden(self) -> None:
        """Write the hard-rounded weight into the layer and drop the rounding variables."""
        if not len(self.weight_quantizers):
            return
        self.set_soft(False)
        with torch.no_grad():
            self.layer.weight.copy_(self.weight().to(self.layer.weight.dtype))
        self.weight_quantizers = nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        w, b = self.weight(), self.layer.bias
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, b)
        return self.layer._conv_forward(x, w, b)


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


def _call_model(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> None:
    try:
        call_network(model, x, t, cond)
    except _Stop:
        pass


def _run_example(model: nn.Module, example: tuple) -> Any:
    """``model`` on an example ``(x, t)`` or ``(x, t, cond)``."""
    x, t, *rest = example
    return call_network(model, x, t, rest[0] if rest and rest[0] else None)


def _example(xs: torch.Tensor, ts: torch.Tensor, cond: Cond | None, device: torch.device) -> tuple:
    """The first two calibration rows, as an example ``(x, t, cond)``."""
    return xs[:2].to(device), ts[:2].to(device), _map(cond or {}, lambda v: v[:2].to(device))


def _check_cond(xs: torch.Tensor, cond: Cond | None) -> None:
    for name, value in cond_leaves(cond or {}).items():
        if not value.dim() or value.shape[0] != len(xs):
            raise ValueError(f"conditioning {name!r} has {tuple(value.shape)} rows for {len(xs)} calibration inputs")


def shortcut_splits(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> dict[str, int]:
    """Name of each decoder shortcut conv that reads ``concat([deep, skip])`` -> channels of ``deep``."""
    splits: dict[str, int] = {}
    handles = []
    for i, block in enumerate(getattr(unet, "up_blocks", [])):
        def hook(module, args, kwargs, prefix=f"up_blocks.{i}"):
            skips = args[1] if len(args) > 1 else kwargs.get("res_hidden_states_tuple")
            if skips is None:
                return
            channels = [s.shape[1] for s in reversed(tuple(skips))]  # the block pops from the end
            for j, resnet in enumerate(getattr(module, "resnets", [])):
                shortcut = getattr(resnet, "conv_shortcut", None)
                if shortcut is not None and j < len(channels) and 0 < resnet.in_channels - channels[j]:
                    splits[f"{prefix}.resnets.{j}.conv_shortcut"] = resnet.in_channels - channels[j]
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            call_network(unet, x, t, cond)
    finally:
        for h in handles:
            h.remove()
    return splits


def prepare(fp_unet: nn.Module, config: ReconConfig, example: tuple) -> nn.Module:
    """A copy of ``fp_unet`` with every conv / linear in a :class:`ReconLayer` (and quantized
    attention matmuls when ``quant_attention``). ``example``: ``(x, t)`` or ``(x, t, cond)``."""
    unet = copy.deepcopy(fp_unet).requires_grad_(False)
    splits = shortcut_splits(unet, *example) if config.split_shortcut else {}
    targets = [(n, m) for n, m in unet.named_modules() if isinstance(m, QUANTIZABLE) and n]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, ReconLayer(module, name, config.w_bits, config.a_bits, splits.get(name, 0), config.p,
                                          config.act_symmetric))
    if config.quant_attention and config.a_bits < NOT_QUANTIZED:
        quantize_attention(unet, config.a_bits, config.sm_abit, config.p, config.act_symmetric)
    return unet


def recon_layers(model: nn.Module) -> list[ReconLayer]:
    return [m for m in model.modules() if isinstance(m, ReconLayer)]


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer) and m.bits < NOT_QUANTIZED]


def units(model: nn.Module, example: tuple) -> list[tuple[str, nn.Module]]:
    """Reconstruction units in execution order (outermost block types, then lone layers);
    ``example``: ``(x, t)`` or ``(x, t, cond)``."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if type(module).__name__ in BLOCK_TYPES or isinstance(module, ReconLayer):
            found.append((name, module))
    order: list[str] = []
    calls: dict[str, int] = {}

    def hook(module, args, name):
        calls[name] = calls.get(name, 0) + 1
        if calls[name] == 1:
            order.append(name)

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n, m in found]
    try:
        with torch.no_grad():
            _run_example(model, example)
    finally:
        for h in handles:
            h.remove()
    repeated = sorted(n for n, c in calls.items() if c > 1)
    if repeated:
        raise ValueError(f"reconstruction units called more than once per forward pass: {', '.join(repeated)}")
    by_name = dict(found)
    return [(n, by_name[n]) for n in order]


# -- data plumbing -------------------------------------------------------------------------------
def _map(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map(v, fn) for v in value)
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return value


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return next(o for o in output if isinstance(o, torch.Tensor))


@dataclass
class UnitData:
    """A unit's captured inputs (positional and keyword, batch-first tensors concatenated) on the CPU."""

    args: tuple
    kwargs: dict
    n: int

    def take(self, index: torch.Tensor | slice, device: torch.device) -> tuple[tuple, dict]:
        def pick(v: torch.Tensor) -> torch.Tensor:
            return v[index].to(device) if v.dim() and v.shape[0] == self.n else v.to(device)

        return _map(self.args, pick), _map(self.kwargs, pick)


def _collate(parts: list[Any], n_parts: list[int]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if first.dim() and all(p.shape[0] == k for p, k in zip(parts, n_parts, strict=True)):
            return torch.cat(parts)
        return first
    if isinstance(first, (tuple, list)):
        return type(first)(_collate([p[i] for p in parts], n_parts) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _collate([p[k] for p in parts], n_parts) for k in first}
    return first


def _batches(xs: torch.Tensor, ts: torch.Tensor, batch_size: int, cond: Cond | None = None):
    _check_cond(xs, cond)
    for i in range(0, len(xs), batch_size):
        yield xs[i: i + batch_size], ts[i: i + batch_size], _map(cond or {}, lambda v, i=i: v[i: i + batch_size])


def capture_inputs(model: nn.Module, module: nn.Module, xs: torch.Tensor, ts: torch.Tensor, batch_size: int,
                   device: torch.device, cond: Cond | None = None) -> UnitData:
    """What ``module`` receives (positional and keyword) when ``model`` runs on the calibration rows
    ``(xs, ts, cond)``, batch by batch, concatenated on the CPU."""
    store: list[tuple[tuple, dict]] = []

    def hook(mod, args, kwargs):
        store.append((_map(args, lambda v: v.detach().cpu()), _map(kwargs, lambda v: v.detach().cpu())))
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    sizes = []
    try:
        with torch.no_grad():
            for x, t, c in _batches(xs, ts, batch_size, cond):
                sizes.append(len(x))
                _call_model(model, x.to(device), t.to(device), _map(c, lambda v: v.to(device)))
    finally:
        handle.remove()
    return UnitData(_collate([a for a, _ in store], sizes), _collate([k for _, k in store], sizes), len(xs))


def capture_outputs(model: nn.Module, module: nn.Module, xs: torch.Tensor, ts: torch.Tensor, batch_size: int,
                    device: torch.device, cond: Cond | None = None) -> torch.Tensor:
    """What ``module`` outputs (its first tensor) when ``model`` runs on the calibration rows."""
    store: list[torch.Tensor] = []

    def hook(mod, args, output):
        store.append(_first_tensor(output).detach().cpu())
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for x, t, c in _batches(xs, ts, batch_size, cond):
                _call_model(model, x.to(device), t.to(device), _map(c, lambda v: v.to(device)))
    finally:
        handle.remove()
    return torch.cat(store)


def _unit_loss(unit: nn.Module, data: UnitData, target: torch.Tensor, p: float, device: torch.device,
               batch_size: int) -> float:
    """Mean per-sample Lp error of the unit on (up to EVAL_SAMPLES of) its calibration inputs."""
    n = min(data.n, EVAL_SAMPLES)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, batch_size):
            index = slice(i, min(n, i + batch_size))
            args, kwargs = data.take(index, device)
            out = _first_tensor(unit(*args, **kwargs))
            total += float(lp_loss(out, target[index].to(device), p)) * (index.stop - index.start)
    return total / n


# -- the two phases --------------------------------------------------------------------------------
def _optimize(unit, data, target, params, loss_fn, iterations, lr, cosine, config, device, generator):
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=0.0) if cosine \
        else None
    with torch.enable_grad():
        for it in range(iterations):
            index = minibatch(data.n, config.batch_size, generator)
            args, kwargs = data.take(index, device)
            out = _first_tensor(unit(*args, **kwargs))
            loss = loss_fn(out, target[index].to(device), it)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()


def rounding_regularized(layers: list[ReconLayer], both_halves: bool = False) -> list[AdaRoundWeight]:
    """The AdaRound grids whose rounding regulariser enters the loss: each layer's first (the authors'
    ``LossFunction`` reads ``module.weight_quantizer`` only, so a split layer's second half,
    ``weight_quantizer_0``, is learned without being pushed to 0/1), or every grid (``both_halves``)."""
    return [q for layer in layers for q in (layer.weight_quantizers if both_halves else layer.weight_quantizers[:1])]


def reconstruct_weights(qmodel: nn.Module, fp_model: nn.Module, xs: torch.Tensor, ts: torch.Tensor,
                        config: ReconConfig, device: torch.device, progress: bool = False,
                        cond: Cond | None = None) -> list[dict]:
    """Weight phase over every unit (activations in float). Returns per-unit losses (squared error
    per sample) with round-to-nearest and after reconstruction. ``cond``: the keyword inputs of
    every calibration row (text conditioning), None for an unconditional UNet."""
    _check_cond(xs, cond)
    for q in act_quantizers(qmodel):
        q.enabled = False
    generator = torch.Generator().manual_seed(config.seed)
    fp_modules = dict(fp_model.named_modules())
    report = []
    example = _example(xs, ts, cond, device)
    for name, unit in tqdm(units(qmodel, example), desc=f"AdaRound W{config.w_bits}", leave=False,
                           disable=not progress):
        layers = [unit] if isinstance(unit, ReconLayer) else recon_layers(unit)
        for layer in layers:
            layer.start_adaround(config.weight_init, config.p)
        params = [q.alpha for layer in layers for q in layer.weight_quantizers]
        if not params:
            continue
        data = capture_inputs(qmodel, unit, xs, ts, config.batch_size, device, cond)
        target = capture_outputs(fp_model, fp_modules[name], xs, ts, config.batch_size, device, cond)
        for layer in layers:
            layer.set_soft(False)
        before = _unit_loss(unit, data, target, 2.0, device, config.batch_size)
        for layer in layers:
            layer.set_soft(True)
        quantizers = [q for layer in layers for q in layer.weight_quantizers]
        regularized = rounding_regularized(layers, config.regularize_both_halves)

        def loss_fn(out, tgt, it, regularized=regularized):
            loss = lp_loss(out, tgt, 2.0)
            beta = beta_schedule(it, config.weight_iters, config.beta_warmup, config.beta_start, config.beta_end)
            if beta is not None:
                loss = loss + config.round_weight * sum(q.regularizer(beta) for q in regularized)
            return loss

        _optimize(unit, data, target, params, loss_fn, config.weight_iters, config.weight_lr, False, config, device,
                  generator)
        soft = [q.h().detach() for q in quantizers]
        hard_fraction = float(sum(((h < 1e-3) | (h > 1 - 1e-3)).sum() for h in soft) / sum(h.numel() for h in soft))
        for layer in layers:
            layer.set_soft(False)
        after = _unit_loss(unit, data, target, 2.0, device, config.batch_size)
        for layer in layers:
            layer.harden()
        report.append({"unit": name, "nearest": before, "adaround": after, "hard_fraction": hard_fraction})
    return report


def init_rows(n: int, config: ReconConfig, generator: torch.Generator) -> torch.Tensor:
    """The calibration rows the initial activation ranges are fitted on: all ``n``, or ``act_init_samples``
    of them, drawn without repeats (``random``: the authors' DDIM and Stable Diffusion scripts,
    ``np.random.choice(n, 64, replace=False)``) or the first ones (``first``: their LDM script's
    ``cali_xs[:64]``, rows ordered step after step as here, so all from the first calibration step)."""
    k = config.act_init_samples
    if not k or k >= n:
        return torch.arange(n)
    if config.act_init_pick == "first":
        return torch.arange(k)
    return torch.randperm(n, generator=generator)[:k]


def running_order(n: int, config: ReconConfig, generator: torch.Generator) -> torch.Tensor:
    """The order the running statistics visit the calibration rows in: as stored (``first``: their LDM script)
    or shuffled once (``random``: their Stable Diffusion script)."""
    return torch.arange(n) if config.act_init_pick == "first" else torch.randperm(n, generator=generator)


def _running_stat(unit: nn.Module, quantizers: list[ActQuantizer], data: UnitData, order: torch.Tensor,
                  config: ReconConfig, device: torch.device) -> None:
    """The authors' ``--running_stat`` after the initialisation: the unit (its quantizers on) runs over the
    calibration rows in ``order``, in batches of ``act_init_samples`` (their 64; ``batch_size`` when every row
    initialised), whole batches only (``int(n / 64)`` of them), every quantizer updating its range with
    momentum 0.95 before quantizing (``quantizers.running_range``)."""
    size = config.act_init_samples or config.batch_size
    for q in quantizers:
        q.running = True
    try:
        with torch.no_grad():
            for i in range(data.n // size):
                args, kwargs = data.take(order[i * size: (i + 1) * size], device)
                unit(*args, **kwargs)
    finally:
        for q in quantizers:
            q.running = False


def reconstruct_activations(qmodel: nn.Module, fp_model: nn.Module, xs: torch.Tensor, ts: torch.Tensor,
                            config: ReconConfig, device: torch.device, progress: bool = False,
                            cond: Cond | None = None) -> list[dict]:
    """Activation phase over every unit (weights already quantized): initialise each activation
    quantizer's range on the unit's inputs, then learn the step sizes. Returns per-unit Lp losses
    after initialisation and after learning. ``cond`` as for :func:`reconstruct_weights`."""
    _check_cond(xs, cond)
    for q in act_quantizers(qmodel):
        q.enabled = False
    generator = torch.Generator().manual_seed(config.seed + 1)
    fp_modules = dict(fp_model.named_modules())
    report = []
    example = _example(xs, ts, cond, device)
    # the same rows for every unit, as the authors' one forward pass of the whole model (and one running pass)
    rows = init_rows(len(xs), config, generator)
    order = running_order(len(xs), config, generator) if config.running_stat else None
    for name, unit in tqdm(units(qmodel, example), desc=f"step sizes A{config.a_bits}", leave=False,
                           disable=not progress):
        quantizers = act_quantizers(unit)
        if not quantizers:
            continue
        data = capture_inputs(qmodel, unit, xs, ts, config.batch_size, device, cond)
        target = capture_outputs(fp_model, fp_modules[name], xs, ts, config.batch_size, device, cond)
        for q in quantizers:
            q.observe()
        with torch.no_grad():
            for i in range(0, len(rows), config.batch_size):
                args, kwargs = data.take(rows[i: i + config.batch_size], device)
                unit(*args, **kwargs)
        for q in quantizers:
            q.initialize(config.act_init)
        if order is not None:
            _running_stat(unit, quantizers, data, order, config, device)
        before = _unit_loss(unit, data, target, config.p, device, config.batch_size)
        fixed = {id(q) for q in fixed_step_sizes(unit)}  # the 16-bit softmax keeps its initial range
        learned = [q.scale for q in quantizers if id(q) not in fixed]
        if learned:
            _optimize(unit, data, target, learned, lambda out, tgt, it: lp_loss(out, tgt, config.p), config.act_iters,
                      config.act_lr, True, config, device, generator)
        with torch.no_grad():  # a step size driven to (or below) zero would divide by zero
            for q in quantizers:
                q.scale.clamp_(min=1e-8)
        after = _unit_loss(unit, data, target, config.p, device, config.batch_size)
        report.append({"unit": name, "initial": before, "learned": after})
    return report


# -- what gets cached -------------------------------------------------------------------------------
def weight_state(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    return {layer.name: layer.layer.weight.detach().cpu().clone() for layer in recon_layers(qmodel)}


def load_weight_state(qmodel: nn.Module, state: dict[str, torch.Tensor]) -> None:
    layers = {layer.name: layer for layer in recon_layers(qmodel)}
    if set(layers) != set(state):
        raise ValueError("cached quantized weights do not match the model's layers")
    with torch.no_grad():
        for name, weight in state.items():
            layers[name].layer.weight.copy_(weight)


def act_state(qmodel: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
            for name, m in qmodel.named_modules() if isinstance(m, ActQuantizer) and m.bits < NOT_QUANTIZED}


def load_act_state(qmodel: nn.Module, state: dict[str, dict[str, torch.Tensor]]) -> None:
    modules = {name: m for name, m in qmodel.named_modules() if isinstance(m, ActQuantizer) and m.bits < NOT_QUANTIZED}
    if set(modules) != set(state):
        raise ValueError("cached activation step sizes do not match the model's quantizers")
    for name, values in state.items():
        modules[name].load_state_dict(values)
        modules[name].enabled = True
