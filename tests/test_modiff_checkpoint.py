"""Compact real-execution layers and quantized checkpoints (issue #29, item 5).

A real-execution (int8 / fp8) layer keeps its 8-bit weights and scales only, and rebuilds the float weight where
it needs it (the warm-up, the correction maps): a model is about a quarter of its FP32 bytes and computes what it
computed when it also kept the float weight. ``modiff.save_quantized`` / ``load_quantized`` write and read such a
model as one safetensors file; loading never unpickles (``torch.load`` raises throughout this module), a file
that is not such a checkpoint or does not fit the model is a one-line ValueError.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file
from torch import nn

import modiff
from bench.zoo.architectures import DDPM_CIFAR10_32, build_random_unet
from bench.zoo.digits import UNET_ARCH
from modiff.quant import quantize_weight

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_BYTES_RATIO = 0.3  # observed: 0.25 (CIFAR-10 DDPM), 0.27 (digits) of the FP32 model's bytes

INT8 = dict(w_bits=8, weight_symmetric=True, execution="int8")
FP8 = dict(w_bits=8, a_bits=8, weight_symmetric=True, symmetric=True, number_format="fp8", execution="fp8")
CONFIGS = {
    "int8-ec-tensor-a8": dict(INT8, a_bits=8, modulation="ec", granularity="tensor"),
    "int8-ec-sample-a4": dict(INT8, a_bits=4, modulation="ec", granularity="sample"),
    "int8-off-sample-a8": dict(INT8, a_bits=8, modulation="off", granularity="sample", symmetric=True),
    "int8-ec-sample-bf16": dict(INT8, a_bits=8, modulation="ec", granularity="sample", compute_dtype="bfloat16"),
    "int8-ec-static-tensor": dict(INT8, a_bits=8, modulation="ec", granularity="tensor", act_scale="static"),
    "fp8-ec-sample": dict(FP8, modulation="ec", granularity="sample"),
}


@pytest.fixture(autouse=True)
def _no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")
    monkeypatch.setattr(torch, "load", refuse)


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def fresh_digits_unet(seed: int = 1) -> nn.Module:
    """A float digits UNet with random weights: load_quantized must not need the trained ones."""
    torch.manual_seed(seed)
    return UNet2DModel(**UNET_ARCH).eval()


def calls(unet: nn.Module, n: int = 4) -> list[torch.Tensor]:
    """One trajectory of ``n`` denoiser calls on a drifting input: the warm-up, then modulated steps."""
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    modiff.reset(unet)
    with torch.no_grad():
        return [unet(x * (1 - 0.02 * k), torch.tensor([500 - 10 * k] * 2)).sample for k in range(n)]


def quantized(digits_model, name: str) -> nn.Module:
    unet = modiff.quantize(copy.deepcopy(digits_model.unet).eval(), modiff.ModiffConfig(**CONFIGS[name]))
    if modiff.ModiffConfig(**CONFIGS[name]).act_scale == "static":
        modiff.calibrate(unet, lambda: calls(unet, 3))
    return unet


@pytest.fixture(scope="module")
def cifar10():
    """The CIFAR-10 DDPM architecture (random weights): its FP32 bytes, and the model quantized for int8."""
    unet = build_random_unet(DDPM_CIFAR10_32).eval().requires_grad_(False)
    fp32 = model_bytes(unet)
    state_bytes = sum(t.numel() * t.element_size() for t in unet.state_dict().values())
    modiff.quantize(unet, modiff.ModiffConfig(**INT8, a_bits=8, granularity="sample"))
    return unet, fp32, state_bytes


# -- 1. real-execution layers keep the 8-bit weights only -------------------------------------------------
def test_a_real_execution_model_is_under_a_third_of_its_fp32_bytes(digits_model, cifar10):
    unet, fp32, _ = cifar10
    int8 = model_bytes(unet)
    print(f"CIFAR-10 DDPM: FP32 {fp32} bytes, int8 {int8} bytes ({int8 / fp32:.3f})")
    assert int8 <= MAX_BYTES_RATIO * fp32
    for name in ("int8-ec-sample-a4", "fp8-ec-sample"):
        q = quantized(digits_model, name)
        ratio = model_bytes(q) / model_bytes(digits_model.unet)
        print(f"digits {name}: {ratio:.3f} of FP32")
        assert ratio <= MAX_BYTES_RATIO
        layers = modiff.quant_layers(q)
        assert all(layer.layer.weight is None for layer in layers)
        assert not any(key.endswith(".layer.weight") for key in q.state_dict())


def test_the_float_weight_is_rebuilt_bit_equal_and_the_inner_layer_cannot_run_without_it(digits_model):
    """The rebuilt weight is the fake-quantized weight the layer used to keep (``quantize_weight`` on the symmetric
    grid, per output channel); ``layer.weight`` reads through the wrapper give it, in the model's dtype and device."""
    unet = quantized(digits_model, "int8-ec-sample-a4")
    originals = dict(digits_model.unet.named_modules())
    for layer in modiff.quant_layers(unet):
        want = quantize_weight(originals[layer.name].weight, 8, "minmax", symmetric=True)
        assert torch.equal(layer.weight, want), layer.name
        assert layer.weight.dtype == torch.float32 and layer.weight.shape == layer.w_q.shape
    conv = unet.conv_in
    with pytest.raises(TypeError):  # the wrapped conv has no weight of its own: it fails, never runs a stale one
        conv.layer(torch.randn(1, 1, 16, 16))
    half = copy.deepcopy(unet).half()
    assert half.conv_in.weight.dtype == torch.float16 and half.conv_in.w_scale.dtype == torch.float32
    assert torch.equal(half.conv_in.weight, conv.weight.half())


def test_the_warm_up_step_is_the_float_model_with_its_weights_on_the_grid(digits_model):
    """The first call of a modulated model runs every layer in float: with the float weights gone it must still be
    the float model whose conv/linear weights were fake-quantized, bit for bit (as before they were dropped)."""
    unet = quantized(digits_model, "int8-ec-sample-a4")
    reference = copy.deepcopy(digits_model.unet).eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.copy_(quantize_weight(module.weight, 8, "minmax", symmetric=True))
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    modiff.reset(unet)
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, reference(x, t).sample)


# -- 2. save_quantized / load_quantized ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_loaded_model_gives_bit_identical_outputs(digits_model, tmp_path, name):
    unet = quantized(digits_model, name)
    calls(unet, 2)  # a used model: prepacked weights and correction maps are cached, never saved
    path = modiff.save_quantized(unet, tmp_path / "unet.safetensors")
    loaded = modiff.load_quantized(fresh_digits_unet(), path)
    assert [layer.name for layer in modiff.quant_layers(loaded)] == [layer.name for layer in modiff.quant_layers(unet)]
    assert modiff.quant_layers(loaded)[0].config == unet.conv_in.config
    static = unet.conv_in.config.act_scale == "static"
    assert all((layer.static_scale is not None) == static for layer in modiff.quant_layers(loaded))
    want = calls(unet)
    got = calls(loaded)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"{name}: step {step} differs"
    # the same again through the state_dict of the loaded model (nothing hidden outside it)
    twin = modiff.load_quantized(fresh_digits_unet(2), modiff.save_quantized(loaded, tmp_path / "again.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(calls(twin), want, strict=True))


def test_the_checkpoint_is_a_quarter_of_the_fp32_state_dict(cifar10, tmp_path):
    unet, _, fp32_state = cifar10
    path = modiff.save_quantized(unet, tmp_path / "cifar10-int8.safetensors")
    size = path.stat().st_size
    print(f"CIFAR-10 DDPM: int8 checkpoint {size} bytes, FP32 state_dict tensors {fp32_state} bytes "
          f"({size / fp32_state:.3f})")
    assert size <= MAX_BYTES_RATIO * fp32_state
    assert not list(tmp_path.glob("*.partial"))


# -- 3. what is refused, in one line ---------------------------------------------------------------------
def one_line_error(fn, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


@pytest.fixture(scope="module")
def saved(digits_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "digits-int8.safetensors"
    return modiff.save_quantized(quantized(digits_model, "int8-ec-sample-a4"), path)


def test_a_pickle_or_garbage_is_refused_without_unpickling(tmp_path):
    pickled = tmp_path / "state.safetensors"
    with open(pickled, "wb") as f:
        torch.save(fresh_digits_unet().state_dict(), f)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07" * 100)
    plain = tmp_path / "plain.safetensors"
    save_file(fresh_digits_unet().state_dict(), str(plain))
    for path in (pickled, garbage):
        model = fresh_digits_unet()
        one_line_error(lambda p=path, m=model: modiff.load_quantized(m, p), "is not a safetensors file")
        assert not modiff.quant_layers(model)
    one_line_error(lambda: modiff.load_quantized(fresh_digits_unet(), plain), "not a modiff.save_quantized checkpoint")


def test_a_truncated_checkpoint_is_refused(saved, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(saved.read_bytes()[:-1000])
    one_line_error(lambda: modiff.load_quantized(fresh_digits_unet(), cut), "safetensors")


def test_another_architecture_dtype_or_config_is_refused_before_the_model_changes(saved):
    other = UNet2DModel(**{**UNET_ARCH, "block_out_channels": [16, 32, 64]})
    message = one_line_error(lambda: modiff.load_quantized(other, saved), "does not match the model")
    assert "shape mismatches: down_blocks.2.resnets.0.conv1.layer.bias (32,) (expected (64,))" in message
    assert not modiff.quant_layers(other)
    smaller = UNet2DModel(**{**UNET_ARCH, "layers_per_block": 2})
    one_line_error(lambda: modiff.load_quantized(smaller, saved), "missing keys")
    cifar = build_random_unet(DDPM_CIFAR10_32)
    one_line_error(lambda: modiff.load_quantized(cifar, saved), "does not match the model")
    assert not modiff.quant_layers(cifar)
    tiny = nn.Sequential(nn.Linear(4, 4))
    one_line_error(lambda: modiff.load_quantized(tiny, saved), "not a Conv1d/Conv2d/Linear of this model")
    half = fresh_digits_unet().half()
    one_line_error(lambda: modiff.load_quantized(half, saved), "dtype mismatches")
    wanted = modiff.ModiffConfig(**{**CONFIGS["int8-ec-sample-a4"], "a_bits": 8})
    one_line_error(lambda: modiff.load_quantized(fresh_digits_unet(), saved, config=wanted),
                   r"another config: a_bits=4 \(expected 8\)")
    same = modiff.ModiffConfig(**CONFIGS["int8-ec-sample-a4"])
    loaded = modiff.load_quantized(fresh_digits_unet(), saved, config=same)
    one_line_error(lambda: modiff.load_quantized(loaded, saved), "already quantized")


def test_fake_and_unquantized_models_are_not_saved(digits_model, tmp_path):
    fake = modiff.quantize(copy.deepcopy(digits_model.unet), modiff.ModiffConfig(w_bits=8, a_bits=8))
    one_line_error(lambda: modiff.save_quantized(fake, tmp_path / "fake.safetensors"), "real-execution models")
    one_line_error(lambda: modiff.save_quantized(fresh_digits_unet(), tmp_path / "fp.safetensors"), "no QuantLayer")
    assert not list(tmp_path.iterdir())
