"""The converter of the MoDiff / Q-Diffusion authors' calibrated CIFAR-10 checkpoints
(:mod:`baselines.qdiffusion.authors_checkpoint`), on a synthetic checkpoint in their format: the real DDPM CIFAR-10
layout with random weights, a per-output-channel min-max 4-bit grid and random AdaRound ``alpha`` for every
Conv2d / Linear, one split decoder shortcut, activation-quantizer and unknown keys."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baselines.modiff_authors_act.method import (
    dequantize_authors_state_dict,
    load_authors_checkpoint,
    to_diffusers_weights,
)
from bench.errors import BenchError
from bench.zoo.architectures import DDPM_CIFAR10_32
from bench.zoo.convert.ddpm import layout

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
BITS = 4
SPLIT_LAYER, SPLIT = "up.1.block.2.nin_shortcut", 256  # 256 channels of h + 128 of the skip connection -> 256
ACT_KEYS = ["model.conv_in.act_quantizer.delta", "model.conv_in.act_quantizer.zero_point",
            f"model.{SPLIT_LAYER}.act_quantizer_0.delta", "model.mid.attn_1.act_quantizer_w.delta"]
UNKNOWN_KEYS = ["model.logvar", "model.mid.attn_1.q.weight_quantizer.x_min", "cache.step"]


def minmax_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel asymmetric min-max grid (the authors' channel-wise 'max' initialisation)."""
    flat = w.reshape(w.shape[0], -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    delta = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    zero_point = torch.round(-lo / delta)
    shape = (-1,) + (1,) * (w.dim() - 1)
    return delta.reshape(shape), zero_point.reshape(shape)


def adaround_expected(w, delta, zero_point, alpha, bits):
    """The hard AdaRound value written out: round down, plus one where alpha >= 0, clamp to the grid, scale back."""
    levels = torch.floor(w / delta) + torch.where(alpha >= 0, 1.0, 0.0)
    levels = torch.minimum(torch.maximum(levels + zero_point, torch.zeros(())), torch.full((), 2.0**bits - 1))
    return (levels - zero_point) * delta


def is_quantized(key: str, value: torch.Tensor) -> bool:
    return key.endswith(".weight") and value.dim() >= 2


@pytest.fixture(scope="module")
def original() -> dict[str, torch.Tensor]:
    """Random tensors in the original DDIM ``Model`` layout of DDPM CIFAR-10 (the real shapes)."""
    generator = torch.Generator().manual_seed(0)
    return {key: torch.randn(shape, generator=generator) * 0.05 for key, shape in layout()[2].items()}


def authors_format(original: dict[str, torch.Tensor], bits: int = BITS) -> dict[str, torch.Tensor]:
    """What ``torch.save(qnn.state_dict())`` writes for this model after AdaRound calibration."""
    generator = torch.Generator().manual_seed(1)
    out = {}
    for key, value in original.items():
        out["model." + key] = value
        if not is_quantized(key, value):
            continue
        layer = key[: -len(".weight")]
        split = SPLIT if layer == SPLIT_LAYER else 0
        pieces = [("weight_quantizer", value[:, :split]), ("weight_quantizer_0", value[:, split:])] if split else \
            [("weight_quantizer", value)]
        for name, piece in pieces:
            delta, zero_point = minmax_grid(piece, bits)
            out[f"model.{layer}.{name}.alpha"] = torch.randn(piece.shape, generator=generator)
            out[f"model.{layer}.{name}.delta"] = delta
            out[f"model.{layer}.{name}.zero_point"] = zero_point
    for key in ACT_KEYS + UNKNOWN_KEYS:
        out[key] = torch.tensor(0.25)
    return out


@pytest.fixture(scope="module")
def authors(original) -> dict[str, torch.Tensor]:
    return authors_format(original)


@pytest.fixture(scope="module")
def converted(authors):
    return dequantize_authors_state_dict(authors, BITS)


def test_weights_are_the_adaround_values(original, authors, converted):
    out, report = converted
    assert set(out) == set(original)
    layers = [k[: -len(".weight")] for k, v in original.items() if is_quantized(k, v)]
    assert report["layers"] == report["adaround_layers"] == len(layers) and report["nearest_layers"] == 0
    for layer in layers:
        if layer == SPLIT_LAYER:
            continue
        q = {n: authors[f"model.{layer}.weight_quantizer.{n}"] for n in ("delta", "zero_point", "alpha")}
        expected = adaround_expected(original[layer + ".weight"], q["delta"], q["zero_point"], q["alpha"], BITS)
        torch.testing.assert_close(out[layer + ".weight"], expected, rtol=0, atol=1e-7, msg=layer)
    # rounding really happened: the weights moved, by less than one step except where the grid clamps them
    w, w_hat = original["conv_in.weight"], out["conv_in.weight"]
    assert not torch.equal(w, w_hat)
    assert bool(((w - w_hat).abs() <= authors["model.conv_in.weight_quantizer.delta"] * (1 + 1e-5)).all())


def test_other_tensors_pass_through_unchanged(original, converted):
    out, report = converted
    kept = [k for k, v in original.items() if not is_quantized(k, v)]
    assert kept and any(".norm" in k for k in kept) and any(k.endswith(".bias") for k in kept)
    for key in kept:
        assert out[key] is original[key] or torch.equal(out[key], original[key]), key
    assert report["passed_through"] == len(kept)


def test_report_lists_split_activation_and_unknown_keys(converted):
    _, report = converted
    assert report["split_layers"] == {SPLIT_LAYER: SPLIT}
    assert report["act_quantizer_keys"] == sorted(ACT_KEYS)
    assert report["unknown_keys"] == sorted(UNKNOWN_KEYS)
    assert report["w_bits"] == BITS
    json.dumps(report)  # plain data, fit for a run record


def test_split_halves_use_their_own_quantizers(original, authors, converted):
    out, _ = converted
    w = original[SPLIT_LAYER + ".weight"]
    q0, q1 = ({n: authors[f"model.{SPLIT_LAYER}.{name}.{n}"] for n in ("delta", "zero_point", "alpha")}
              for name in ("weight_quantizer", "weight_quantizer_0"))
    first = adaround_expected(w[:, :SPLIT], q0["delta"], q0["zero_point"], q0["alpha"], BITS)
    second = adaround_expected(w[:, SPLIT:], q1["delta"], q1["zero_point"], q1["alpha"], BITS)
    torch.testing.assert_close(out[SPLIT_LAYER + ".weight"], torch.cat([first, second], dim=1), rtol=0, atol=1e-7)
    wrong = adaround_expected(w[:, SPLIT:], q0["delta"], q0["zero_point"], q1["alpha"], BITS)  # first half's grid
    assert not torch.allclose(out[SPLIT_LAYER + ".weight"][:, SPLIT:], wrong)

    # the split point comes from alpha: from the second quantizer's when the first has none (it then rounds to nearest)
    changed = dict(authors)
    del changed[f"model.{SPLIT_LAYER}.weight_quantizer.alpha"]
    out2, report2 = dequantize_authors_state_dict(changed, BITS)
    assert report2["split_layers"] == {SPLIT_LAYER: SPLIT} and report2["nearest_layer_names"] == [SPLIT_LAYER]
    nearest = torch.clamp(torch.round(w[:, :SPLIT] / q0["delta"]) + q0["zero_point"], 0, 15)
    torch.testing.assert_close(out2[SPLIT_LAYER + ".weight"][:, :SPLIT], (nearest - q0["zero_point"]) * q0["delta"])
    torch.testing.assert_close(out2[SPLIT_LAYER + ".weight"][:, SPLIT:], second)
    del changed[f"model.{SPLIT_LAYER}.weight_quantizer_0.alpha"]
    with pytest.raises(BenchError, match="split point"):
        dequantize_authors_state_dict(changed, BITS)


def test_every_value_lies_on_its_channels_grid(authors, converted):
    out, _ = converted
    for key, w_hat in out.items():
        if not is_quantized(key, w_hat):
            continue
        layer = key[: -len(".weight")]
        halves = [(w_hat[:, :SPLIT], "weight_quantizer"), (w_hat[:, SPLIT:], "weight_quantizer_0")] \
            if layer == SPLIT_LAYER else [(w_hat, "weight_quantizer")]
        for part, name in halves:
            level = part / authors[f"model.{layer}.{name}.delta"] + authors[f"model.{layer}.{name}.zero_point"]
            assert float((level - level.round()).abs().max()) < 1e-4, key
            assert float(level.round().min()) >= 0 and float(level.round().max()) <= 2**BITS - 1, key


def test_hand_made_rounding(authors):
    """Known numbers in output channel 0 of conv_in (AdaRound) and conv_out (no alpha: round to nearest).
    Grid: delta 0.5, zero point 2, 16 levels, so a weight maps to ``clamp(level + 2, 0, 15) - 2`` steps of 0.5."""
    state = dict(authors)
    w = torch.tensor([0.6, 0.6, -0.6, -0.6, 0.5, 0.75, 7.0, -1.1, 0.8, 0.1])
    alpha = torch.tensor([0.3, -0.3, 2.0, -2.0, -1.0, 0.0, 5.0, -5.0, -0.1, 1e-6])
    # 0.6/0.5 = 1.2: up 1.0, down 0.5; -1.2: up -0.5, down -1.0; an exact 1.0 stays; alpha 0 rounds 1.5 up to 2 (1.0);
    # 14 + 1 + 2 = 17 clamps to 15 (6.5); -3 + 2 = -1 clamps to 0 (-1.0); 1.6 down 0.5; 0.2 up 0.5
    expected_adaround = torch.tensor([1.0, 0.5, -0.5, -1.0, 0.5, 1.0, 6.5, -1.0, 0.5, 0.5])
    # nearest: 1.2 -> 1, -1.2 -> -1, 1 -> 1, 1.5 -> 2 (even), 14 + 2 clamps to 15, -2.2 -> -2, 1.6 -> 2, 0.2 -> 0
    expected_nearest = torch.tensor([0.5, 0.5, -0.5, -0.5, 0.5, 1.0, 6.5, -1.0, 1.0, 0.0])
    for layer, with_alpha in (("conv_in", True), ("conv_out", False)):
        weight = state[f"model.{layer}.weight"].clone()
        weight[0].view(-1)[: len(w)] = w
        state[f"model.{layer}.weight"] = weight
        for name, value in (("delta", 0.5), ("zero_point", 2.0)):
            grid = state[f"model.{layer}.weight_quantizer.{name}"].clone()
            grid[0] = value
            state[f"model.{layer}.weight_quantizer.{name}"] = grid
        if with_alpha:
            a = state[f"model.{layer}.weight_quantizer.alpha"].clone()
            a[0].view(-1)[: len(w)] = alpha
            state[f"model.{layer}.weight_quantizer.alpha"] = a
        else:
            del state[f"model.{layer}.weight_quantizer.alpha"]
    out, report = dequantize_authors_state_dict(state, BITS)
    assert out["conv_in.weight"][0].reshape(-1)[: len(w)].tolist() == expected_adaround.tolist()
    assert out["conv_out.weight"][0].reshape(-1)[: len(w)].tolist() == expected_nearest.tolist()
    assert report["nearest_layer_names"] == ["conv_out"] and report["nearest_layers"] == 1
    assert report["clamped_values"] >= 3  # 7.0 twice, -1.1 once


def test_loads_strictly_into_the_diffusers_unet(converted):
    from diffusers import UNet2DModel

    out, _ = converted
    weights = to_diffusers_weights(out)
    with torch.device("meta"):
        unet = UNet2DModel(**{k: (list(v) if isinstance(v, list) else v) for k, v in DDPM_CIFAR10_32.items()})
    unet.load_state_dict(weights, strict=True, assign=True)
    assert torch.equal(unet.conv_in.weight, out["conv_in.weight"])
    channels = out["mid.attn_1.q.weight"].shape[0]
    assert torch.equal(unet.mid_block.attentions[0].to_q.weight, out["mid.attn_1.q.weight"].reshape(channels, -1))
    assert torch.equal(unet.up_blocks[2].resnets[2].conv_shortcut.weight, out[SPLIT_LAYER + ".weight"])


def _without(state, *keys):
    return {k: v for k, v in state.items() if k not in keys}


@pytest.mark.parametrize("change, match", [
    (lambda s: _without(s, "model.conv_in.weight_quantizer.delta"), "conv_in.weight_quantizer is incomplete"),
    (lambda s: _without(s, *[k for k in s if k.startswith("model.temb.dense.1.weight_quantizer.")]),
     "temb.dense.1.weight has no weight_quantizer"),
    (lambda s: {**s, "model.conv_in.weight_quantizer.delta": torch.ones(5, 1, 1, 1)}, "does not broadcast"),
    (lambda s: {**s, "model.conv_in.weight_quantizer.alpha": torch.ones(128, 3, 3)}, "alpha has shape"),
    (lambda s: {**s, "model.conv_in.weight_quantizer.delta": torch.zeros(128, 1, 1, 1)}, "non-positive"),
    (lambda s: _without(s, "model.norm_out.weight"), "missing keys: norm_out.weight"),
    (lambda s: {k[len("model."):]: v for k, v in s.items()}, "no 'model.' keys"),
    (lambda s: {**s, "model.up.0.extra.weight_quantizer.delta": torch.ones(1)}, "does not have: up.0.extra"),
])
def test_malformed_state_dicts_are_one_line_errors(authors, change, match):
    with pytest.raises(BenchError, match=match) as info:
        dequantize_authors_state_dict(change(authors), BITS)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("w_bits", [1, 9, 0, 4.0, True, "4"])
def test_bad_w_bits(authors, w_bits, tmp_path):
    with pytest.raises(BenchError, match="w_bits"):
        dequantize_authors_state_dict(authors, w_bits)
    with pytest.raises(BenchError, match="w_bits"):
        load_authors_checkpoint(tmp_path / "ckpt.pth", w_bits)


def test_checkpoint_file_round_trip(authors, converted, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(authors, path)
    out, report = load_authors_checkpoint(path, BITS)
    assert report == converted[1]
    assert all(torch.equal(out[k], v) for k, v in converted[0].items())
    torch.save({"state_dict": authors}, path)  # a wrapper some scripts write
    out, _ = load_authors_checkpoint(str(path), BITS)
    assert torch.equal(out[SPLIT_LAYER + ".weight"], converted[0][SPLIT_LAYER + ".weight"])
    path.unlink()
    with pytest.raises(BenchError, match="does not exist"):
        load_authors_checkpoint(path, BITS)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(BenchError, match="cannot read"):
        load_authors_checkpoint(path, BITS)
    torch.save([1, 2], path)
    with pytest.raises(BenchError, match="holds a list"):
        load_authors_checkpoint(path, BITS)
    torch.save(_without(authors, "model.conv_out.weight_quantizer.zero_point"), path)
    with pytest.raises(BenchError, match=re.escape(str(path)) + ": .*conv_out.weight_quantizer is incomplete"):
        load_authors_checkpoint(path, BITS)


class Payload:
    """Unpickling this would create ``marker``: a stand-in for code a malicious checkpoint runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Plain:
    def __init__(self):
        self.value = 3


def test_pickled_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model.conv_in.weight": torch.zeros(1), "payload": Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(BenchError, match="cannot read") as info:
        load_authors_checkpoint(path, BITS)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    torch.save({"state_dict": Plain()}, path)  # an arbitrary class instance
    with pytest.raises(BenchError, match="cannot read"):
        load_authors_checkpoint(path, BITS)


def test_importing_the_converter_imports_nothing_from_bench():
    """The baselines' libraries stay usable without the harness (tests/test_layering.py's rule)."""
    probe = ("import sys, baselines.qdiffusion.authors_checkpoint; "
             "print(sorted(m for m in sys.modules if m == 'bench' or m.startswith('bench.')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
