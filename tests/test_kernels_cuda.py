"""Real execution on a GPU: ``torch._int_mm`` (int8) and ``torch._scaled_mm`` (fp8) equal the fake
path per layer, and an int8 / fp8 CIFAR-10-architecture UNet runs a few modulated steps. Skipped
without CUDA; the same kernels' lowering (unfold, padding to multiples of 16) is tested on the CPU
in test_kernels.py."""

import copy

import pytest
import torch
from torch import nn

import modiff
from modiff.layers import QuantLayer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LAYERS = {
    "conv3x3": lambda: nn.Conv2d(3, 24, 3, padding=1),  # K = 27: padded to 32
    "conv-stride2": lambda: nn.Conv2d(32, 48, 3, stride=2, padding=1),
    "linear": lambda: nn.Linear(40, 72),
}


def _sequence(shape, steps=6):
    torch.manual_seed(0)
    seq = [torch.randn(shape, device="cuda")]
    for _ in range(steps - 1):
        seq.append(seq[-1] + 0.1 * torch.randn(shape, device="cuda"))
    return seq


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("execution", ["int8", "fp8"])
@pytest.mark.parametrize("modulation", ["off", "ec"])
def test_gpu_kernels_equal_fake_quantization_per_layer(name, execution, modulation):
    if execution == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmuls need compute capability 8.9 or newer")
    torch.manual_seed(1)
    layer = LAYERS[name]().cuda()
    fmt = {"number_format": "fp8", "symmetric": True} if execution == "fp8" else {"symmetric": False}
    base = dict(w_bits=8, a_bits=8 if execution == "fp8" else 4, modulation=modulation, granularity="sample",
                weight_symmetric=True, **fmt)
    fake = QuantLayer(copy.deepcopy(layer), modiff.ModiffConfig(**base), name)
    real = QuantLayer(copy.deepcopy(layer), modiff.ModiffConfig(**base, execution=execution), name)
    shape = (20, 40) if name == "linear" else (20, layer.in_channels, 12, 12)
    for x in _sequence(shape):
        expected, got = fake(x), real(x)
        assert torch.linalg.vector_norm(got - expected) <= 1e-4 * torch.linalg.vector_norm(expected)


@pytest.mark.parametrize("execution", ["int8", "fp8"])
def test_cifar10_architecture_runs_modulated_steps_on_the_gpu(execution):
    if execution == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmuls need compute capability 8.9 or newer")
    from bench.zoo.architectures import DDPM_CIFAR10_32, build_random_unet

    unet = build_random_unet(DDPM_CIFAR10_32).eval().cuda()
    fmt = {"number_format": "fp8"} if execution == "fp8" else {}
    config = dict(w_bits=8, a_bits=8, modulation="ec", granularity="sample", symmetric=True, weight_symmetric=True,
                  **fmt)
    fake = modiff.quantize(copy.deepcopy(unet), modiff.ModiffConfig(**config))
    real = modiff.quantize(copy.deepcopy(unet), modiff.ModiffConfig(**config, execution=execution))
    t = torch.full((32,), 500, device="cuda")
    with torch.no_grad():
        for x in _sequence((32, 3, 32, 32), steps=3):
            expected, got = fake(x, t).sample, real(x, t).sample
            assert torch.isfinite(got).all()
            assert torch.linalg.vector_norm(got - expected) <= 1e-2 * torch.linalg.vector_norm(expected)
