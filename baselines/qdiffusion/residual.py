"""Static residual step sizes of Q-Diffusion + MoDiff: the authors' grid and their learned path.

The MoDiff authors' ``layer_reconstruction_modiff`` (WeizhiGao/MoDiff ``qdiff/layer_recon.py``) starts
every layer's residual step size from one min-max value over the whole calibration residual,
``delta = (max(r) - min(r)) / (n_levels - 1)``, the same for both halves of a shortcut-split input
(``act_quantizer`` and ``act_quantizer_0``); with ``--cali_min_max`` that is all. Otherwise it learns the
step sizes, each half its own (the two quantizers are separate parameters), with Adam (``--cali_lr``), a
cosine learning rate over ``--cali_iters_a`` iterations, batches of ``--cali_batch_size`` rows drawn by
``randperm`` (no row twice in a batch), and the loss ``lp_loss(out, target, p) + out_penalty *
sum(|target - out|`` where the target leaves the output's range ``)`` (``LossFunction``): one layer at a
time, the rest of the model in full precision, the layer's previous-step input run first, then the current
one. ``out_penalty``: the library function defaults to 1.0, but their scripts pass ``--out_penalty``, whose
default is 0.0, and none of their commands sets it, so what they ran is 0.0, our default. (The term is a sum
over every element, so it can outweigh the averaged Lp term: measured on a toy layer at a learning rate 10x
theirs, at 1.0 it drove a half's step size to zero.)

Here the layer runs as our ``QuantLayer`` does on a trajectory, and as their ``QuantModule`` with
``modulate``: its previous-step input is the full-precision warm-up (``A(a_prev) + bias``: the bias enters
once, on the first call after ``reset_cache``, when ``o_hat`` is empty), then ``o_hat + A(Q(a - a_prev))``
without the bias on the current input; the target is the full-precision layer on the current input.

Their symmetric quantizer (``--a_sym``, ``qdiff/quant_layer.py``) has ``n_levels = 2^(b-1) - 1`` and clamps to
``[-n_levels - 1, n_levels]``; the min-max start above, written for the asymmetric ``n_levels = 2^b``, then
gives ``delta = (max - min) / (2^(b-1) - 2)``: a residual symmetric about zero lands on ``+-(2^(b-1) - 2) / 2``
levels (+-3 of the +-8 grid at A4, +-1 at A3; A2 divides by zero). That is ``authors_grid`` below, used only
where the authors' settings are reproduced.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

import modiff
from modiff.layers import QuantLayer
from modiff.quant import MIN_SCALE, grid

from .calibration import CalibrationData, cond_leaves, map_cond
from .quantizers import lp_loss, minibatch, round_ste
from .reconstruction import capture_inputs

OUT_PENALTY = 0.0  # what the authors ran: their scripts' --out_penalty default (the library function's is 1.0)
MAX_ROWS = 512  # calibration pairs (rows) whose layer inputs are kept per layer


def authors_grid_scale(layer: QuantLayer) -> None:
    """Turn a layer's min-max static residual scale (asymmetric, as ``modiff.calibrate`` fits it) into the
    authors' symmetric one: range / (2^(b-1) - 2), zero point 0 (see the module docstring)."""
    bits = layer.config.a_bits
    if bits < 3:
        raise ValueError(f"the authors' symmetric residual grid needs a_bits >= 3 (their min-max start divides by "
                         f"2^(b-1) - 2); got {bits}")
    width = layer.static_scale * (2 ** bits - 1)  # max - min of the calibration residuals
    layer.static_scale = (width / (2 ** (bits - 1) - 2)).clamp_min(MIN_SCALE)
    layer.static_zero_point = torch.zeros_like(layer.static_scale)


def _pair_rows(data: CalibrationData, rows: int) -> tuple[torch.Tensor, ...]:
    """``(x_prev, t_prev, x, t, cond)`` of (up to ``rows``, evenly spaced) calibration pairs."""
    pairs = data.pairs()
    x_prev, t_prev, x, t = (torch.cat([p[i] for p in pairs]) for i in range(4))
    per_step = len(pairs[0][0])
    cond = map_cond(data.cond, lambda v: v.repeat(len(pairs), *([1] * (v.dim() - 1))))
    assert all(len(v) == per_step * len(pairs) for v in cond_leaves(cond).values())
    pick = torch.linspace(0, len(x) - 1, min(rows, len(x))).round().long().unique()
    return x_prev[pick], t_prev[pick], x[pick], t[pick], map_cond(cond, lambda v: v[pick])


def learn_residual_scales(unet: nn.Module, fp_unet: nn.Module, data: CalibrationData, splits: dict[str, int],
                          iterations: int, lr: float, p: float, batch_size: int, device: torch.device, seed: int,
                          progress: bool = False, out_penalty: float = OUT_PENALTY
                          ) -> tuple[dict[str, list[torch.Tensor]], list[dict]]:
    """Learn every ``QuantLayer``'s static residual step size from its current one (min-max, or the authors'
    grid), one per half for the layers in ``splits`` (name -> split channel). Returns the fitted
    ``{name: [scale, zero_point]}`` (what :func:`load_residual_scales` sets) and a report per layer: the loss
    before and after on the kept rows, and the halves' scales."""
    x_prev, t_prev, x, t, cond = _pair_rows(data, MAX_ROWS)
    generator = torch.Generator().manual_seed(seed)
    states: dict[str, list[torch.Tensor]] = {}
    report: list[dict] = []
    layers = [layer for layer in modiff.quant_layers(unet) if layer.static_scale is not None]
    for layer in tqdm(layers, desc="residual step sizes", disable=not progress, leave=False):
        fp_layer = fp_unet.get_submodule(layer.name)
        prev = capture_inputs(fp_unet, fp_layer, x_prev, t_prev, batch_size, device, cond).args[0]
        cur = capture_inputs(fp_unet, fp_layer, x, t, batch_size, device, cond).args[0]
        scale, zero_point, entry = _learn_one(layer, fp_layer, prev, cur, splits.get(layer.name, 0), iterations,
                                              lr, p, batch_size, device, generator, out_penalty)
        states[layer.name] = [scale.cpu(), zero_point.cpu()]
        report.append(entry)
    load_residual_scales(unet, states)
    return states, report


def _learn_one(layer: QuantLayer, fp_layer: nn.Module, prev: torch.Tensor, cur: torch.Tensor, split: int,
               iterations: int, lr: float, p: float, batch_size: int, device: torch.device,
               generator: torch.Generator, out_penalty: float = OUT_PENALTY) -> tuple[torch.Tensor, torch.Tensor, dict]:
    c = layer.config
    qmin, qmax = grid(c.a_bits, c.symmetric)
    channels = cur.shape[layer.channel_axis]
    bounds = [(0, split), (split, channels)] if split else [(0, channels)]
    start = layer.static_scale.detach().flatten()[0].to(device)
    zero_point = layer.static_zero_point.detach().flatten()[0].to(device)
    halves = nn.Parameter(start.repeat(len(bounds)))
    shape = [1] * cur.dim()
    shape[layer.channel_axis] = channels

    def per_channel(values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values[i].expand(hi - lo) for i, (lo, hi) in enumerate(bounds)]).view(shape)

    with torch.no_grad():
        base = torch.cat([layer.linear(prev[i: i + batch_size].to(device), bias=True).cpu()
                          for i in range(0, len(prev), batch_size)])
        target = torch.cat([fp_layer(cur[i: i + batch_size].to(device)).cpu() for i in range(0, len(cur), batch_size)])
    residual = cur - prev

    def loss_of(index, scales: torch.Tensor, penalty: bool = True) -> torch.Tensor:
        s = per_channel(scales.clamp_min(MIN_SCALE))
        q = (round_ste(residual[index].to(device) / s) + zero_point).clamp(qmin, qmax)
        out = base[index].to(device) + layer.linear((q - zero_point) * s, bias=False)
        tgt = target[index].to(device)
        loss = lp_loss(out, tgt, p)
        if penalty and out_penalty:  # the authors' overflow term: targets outside the output's range
            outside = (tgt > out.max()) | (tgt < out.min())
            loss = loss + out_penalty * torch.where(outside, tgt - out, torch.zeros_like(out)).abs().sum()
        return loss

    def evaluate(scales: torch.Tensor) -> float:
        with torch.no_grad():
            n = len(residual)
            total = sum(float(loss_of(slice(i, i + batch_size), scales, penalty=False)) * min(batch_size, n - i)
                        for i in range(0, n, batch_size))
        return total / len(residual)

    before = evaluate(halves.detach())
    optimizer = torch.optim.Adam([halves], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, iterations), eta_min=0.0)
    with torch.enable_grad():
        for _ in range(iterations):
            index = minibatch(len(residual), batch_size, generator)
            loss = loss_of(index, halves)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    learned = halves.detach().clamp_min(MIN_SCALE)
    after = evaluate(learned)
    scale = per_channel(learned) if split else learned.view(())
    entry = {"layer": layer.name, "split": split, "initial": before, "learned": after,
             "scales": [float(v) for v in learned], "initial_scale": float(start)}
    return scale, torch.full_like(scale, float(zero_point)), entry


def load_residual_scales(unet: nn.Module, states: dict[str, list[torch.Tensor]]) -> None:
    """Set the static residual scales ``{name: [scale, zero_point]}`` (per channel where a layer is split)."""
    layers = {layer.name: layer for layer in modiff.quant_layers(unet)}
    for name, (scale, zero_point) in states.items():
        layer = layers[name]
        device = layer.layer.weight.device
        layer.static_scale, layer.static_zero_point = scale.to(device), zero_point.to(device)
