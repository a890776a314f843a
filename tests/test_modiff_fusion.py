"""``ModiffConfig.fuse_norms``: a resnet block's SiLU computed in its convs' quantizing pass (issue #29, item 3).

The fused model must give the unfused model's outputs (bit-equal: the same ops, eager or compiled on this
machine's inductor), take the fused pass on every quantized step, and fall back to the block's own order
wherever it cannot fuse."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

import modiff
from modiff import kernels
from modiff.fusion import fusable_block, is_fused

INT8 = dict(w_bits=8, a_bits=8, execution="int8", weight_symmetric=True, symmetric=True, granularity="sample")


def calls(unet, n: int = 4) -> list[torch.Tensor]:
    """One trajectory of ``n`` denoiser calls on a drifting input: the warm-up, then modulated steps."""
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    modiff.reset(unet)
    with torch.no_grad():
        return [unet(x * (1 - 0.02 * k), torch.tensor([500 - 10 * k] * 2)).sample for k in range(n)]


def pair(digits_model, **options):
    """The digits UNet quantized twice with ``options``: unfused and fused."""
    plain = modiff.quantize(copy.deepcopy(digits_model.unet).eval(), modiff.ModiffConfig(**options))
    fused = modiff.quantize(copy.deepcopy(digits_model.unet).eval(), modiff.ModiffConfig(**options, fuse_norms=True))
    return plain, fused


def resnets(unet) -> list[torch.nn.Module]:
    return [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]


class Counting:
    """Counts calls of the fused (SiLU inside) and plain quantizing passes, eager (compile=False)."""

    def __init__(self, monkeypatch):
        self.fused = self.plain = 0
        for name in ("quantize_residual_silu", "quantize_input_silu", "quantize_residual", "quantize_input"):
            original, fused = getattr(kernels, name), name.endswith("_silu")

            def counted(*args, _original=original, _fused=fused, **kwargs):
                if _fused:
                    self.fused += 1
                else:
                    self.plain += 1
                return _original(*args, **kwargs)
            monkeypatch.setattr(kernels, name, counted)


@pytest.mark.parametrize("modulation", ["ec", "off"])
def test_fused_equals_unfused_eager_and_takes_the_fused_pass(digits_model, monkeypatch, modulation):
    plain, fused = pair(digits_model, **INT8, modulation=modulation)
    blocks = resnets(fused)
    assert blocks and all(is_fused(b) for b in blocks)
    assert not any(is_fused(b) for b in resnets(plain))
    expected = calls(plain)
    count = Counting(monkeypatch)
    got = calls(fused)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)
    # ec: the warm-up step applies the prologue first (full precision), the 3 quantized steps fuse both convs of
    # every block; off: all 4 steps fuse
    steps = 3 if modulation == "ec" else 4
    assert count.fused == 2 * len(blocks) * steps


@pytest.mark.parametrize("options", [
    dict(INT8, modulation="ec", compile=True),
    dict(INT8, modulation="off", compile=True),
    dict(INT8, modulation="ec", compile=True, compute_dtype="bfloat16", state_dtype="bfloat16"),
], ids=["ec", "off", "ec-bf16"])
def test_fused_compiled_matches_unfused_compiled(digits_model, options):
    """Compiled, the SiLU is inductor's inside the pass: equal here; on another CPU's vector code a last-bit
    difference of silu may move a value across a rounding boundary, so the test allows a few grid steps of the
    output's range and checks the outputs stay as close to full precision as unfused."""
    fp = calls(copy.deepcopy(digits_model.unet).eval())
    plain, fused = pair(digits_model, **options)
    for f, e, g in zip(fp, calls(plain), calls(fused), strict=True):
        assert g.dtype == e.dtype and torch.isfinite(g).all()
        err_plain, err_fused = (e.float() - f).pow(2).mean().sqrt(), (g.float() - f).pow(2).mean().sqrt()
        assert err_fused <= 1.2 * err_plain + 1e-6
        assert (g.float() - e.float()).abs().max() <= 0.05 * f.abs().max()


@pytest.mark.parametrize("options", [
    dict(INT8, modulation="ec", a_bits=0),
    dict(INT8, modulation="ec", residual_tolerance=0.05),
    dict(INT8, modulation="plain"),
    dict(INT8, modulation="ec", execution="fake"),
    dict(INT8, modulation="ec", granularity="tensor", act_scale="static"),
], ids=["a0", "tolerance", "plain", "fake", "static"])
def test_where_it_cannot_fuse_the_block_applies_the_prologue_first(digits_model, monkeypatch, options):
    plain, fused = pair(digits_model, **options)
    if options.get("act_scale") == "static":  # calibration: full precision with the prologue applied first
        for model in (plain, fused):
            modiff.calibrate(model, lambda model=model: calls(model, 3))
    expected = calls(plain)
    count = Counting(monkeypatch)
    got = calls(fused)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)
    cannot = (options["execution"] == "fake" or options["modulation"] != "ec" or options["a_bits"] == 0
              or "residual_tolerance" in options)
    assert count.fused == 0 if cannot else count.fused > 0  # static scales fuse once calibrated


def test_a_hook_on_the_conv_sees_the_activated_input(digits_model, monkeypatch):
    plain, fused = pair(digits_model, **INT8, modulation="ec")
    seen = {}
    for name, model in (("plain", plain), ("fused", fused)):
        conv = resnets(model)[0].conv1
        conv.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0].clone()))
    expected = calls(plain)
    count = Counting(monkeypatch)
    got = calls(fused)
    assert all(torch.equal(e, g) for e, g in zip(expected, got, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(seen["plain"], seen["fused"], strict=True)) and len(seen["fused"]) == 4
    assert 0 < count.fused < 2 * len(resnets(fused)) * 3  # every block fused but the hooked conv


def test_which_blocks_fuse_and_copies(digits_model):
    torch.manual_seed(0)
    config = modiff.ModiffConfig(**INT8, modulation="ec", fuse_norms=True)
    cases = {
        "default": ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=4),
        "scale_shift": ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=4,
                                     time_embedding_norm="scale_shift"),
        "down": ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=4, down=True),
        "mish": ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=4, non_linearity="mish"),
    }
    for name, block in cases.items():
        modiff.quantize(block.eval(), config)
        assert fusable_block(block) == (name == "default") == is_fused(block), name
    assert modiff.fuse_norms(cases["default"]) == 1  # idempotent: counted, not wrapped twice
    # a copy's forward runs the copy's layers, not the original's
    unet = modiff.quantize(copy.deepcopy(digits_model.unet).eval(), modiff.ModiffConfig(**INT8, fuse_norms=True))
    twin = copy.deepcopy(unet)
    block, copied = resnets(unet)[0], resnets(twin)[0]
    assert copied.forward.block is copied and block.forward.block is block
    assert all(torch.equal(a, b) for a, b in zip(calls(unet), calls(twin), strict=True))
    unpickled = pickle.loads(pickle.dumps(unet))  # a bound method of resnet_forward would not load back
    assert resnets(unpickled)[0].forward.block is resnets(unpickled)[0]
    assert all(torch.equal(a, b) for a, b in zip(calls(unet), calls(unpickled), strict=True))
    with pytest.raises(ValueError, match="fuse_norms must be True or False"):
        modiff.ModiffConfig(fuse_norms="yes")


def test_a_saved_fused_model_loads_fused(digits_model, tmp_path):
    unet = modiff.quantize(copy.deepcopy(digits_model.unet).eval(),
                           modiff.ModiffConfig(**INT8, modulation="ec", fuse_norms=True))
    path = modiff.save_quantized(unet, tmp_path / "fused.safetensors")
    loaded = modiff.load_quantized(copy.deepcopy(digits_model.unet).eval(), path)
    assert all(is_fused(b) for b in resnets(loaded))
    assert all(torch.equal(a, b) for a, b in zip(calls(unet), calls(loaded), strict=True))


def test_stable_diffusion_resnets_fuse_and_match(tiny_sd):
    """SD's UNet2DConditionModel: its resnets (cross-attention blocks around them) fuse, outputs bit-equal."""
    unet = tiny_sd().unet
    options = dict(INT8, modulation="ec")
    plain = modiff.quantize(copy.deepcopy(unet), modiff.ModiffConfig(**options))
    fused = modiff.quantize(copy.deepcopy(unet), modiff.ModiffConfig(**options, fuse_norms=True))
    assert resnets(fused) and all(is_fused(b) for b in resnets(fused))
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 16, generator=gen)

    def trajectory(model):
        modiff.reset(model)
        with torch.no_grad():
            return [model(x * (1 - 0.05 * k), torch.tensor([900 - 100 * k] * 2), encoder_hidden_states=text).sample
                    for k in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(trajectory(plain), trajectory(fused), strict=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_fuse_bit_equal_finite_and_a_second_trajectory_repeats(digits_model, monkeypatch, dtype):
    """A model cast to float16 / bfloat16 before quantizing (the norm and the SiLU's input in that dtype): fused
    equals unfused, stays finite and near the float32 model's outputs, and a second trajectory started without
    modiff.reset (the timestep goes back up: the layers reset themselves) repeats the first."""
    options = dict(INT8, modulation="ec")
    ref = modiff.quantize(copy.deepcopy(digits_model.unet).eval(), modiff.ModiffConfig(**options, fuse_norms=True))
    plain = modiff.quantize(copy.deepcopy(digits_model.unet).to(dtype).eval(), modiff.ModiffConfig(**options))
    fused = modiff.quantize(copy.deepcopy(digits_model.unet).to(dtype).eval(),
                            modiff.ModiffConfig(**options, fuse_norms=True))
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))

    def trajectory(model, dt):
        with torch.no_grad():
            return [model((x * (1 - 0.02 * k)).to(dt), torch.tensor([500 - 10 * k] * 2)).sample for k in range(4)]
    expected = trajectory(plain, dtype)
    count = Counting(monkeypatch)
    first = trajectory(fused, dtype)
    assert count.fused == 2 * len(resnets(fused)) * 3  # every quantized step of every block, in half precision
    assert all(torch.equal(a, b) for a, b in zip(expected, first, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(trajectory(fused, dtype), first, strict=True))  # no reset between
    for out, full in zip(first, trajectory(ref, torch.float32), strict=True):
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert (out.float() - full).abs().max() <= 0.1 * full.abs().max()
