"""The passes around the integer kernels (issue #29, items 2-3): no layout copy at a wrapped layer's boundary, and a
half-precision model's input and output casts folded into the quantizing pass and the kernel's epilogue."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import modiff
from modiff.layers import QuantLayer

INT8 = dict(w_bits=8, a_bits=8, execution="int8", weight_symmetric=True, symmetric=True)


class _Count(TorchDispatchMode):
    """The aten ops run inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _copies(layer: nn.Module, x: torch.Tensor) -> list[str]:
    with torch.no_grad(), _Count() as count:
        layer(x)
    return [op for op in count.ops if op in ("clone", "copy_", "contiguous")]


@pytest.mark.parametrize("modulation", ["off", "ec"])
def test_a_transposed_linear_input_is_quantized_into_rows_without_a_copy(modulation):
    """diffusers' attention hands its projections (B, HW, C) views of a (B, C, HW) tensor: the quantizing pass
    writes ``u`` contiguous itself (before: a clone of ``u`` in the kernel's reshape, 20 per CIFAR-10 call)."""
    layer = QuantLayer(nn.Linear(16, 8), modiff.ModiffConfig(granularity="sample", modulation=modulation, **INT8), "l")
    xs = [torch.randn(2, 16, 6).transpose(1, 2) for _ in range(3)]
    assert not xs[0].is_contiguous()
    for x in xs[:2]:
        layer(x)
    assert _copies(layer, xs[2]) == []
    reference = QuantLayer(nn.Linear(16, 8), layer.config, "r")
    reference.load_state_dict(layer.state_dict())
    layer.reset_state()
    for x in xs:  # the values a contiguous input gives (the float warm-up's matmul may round another way)
        out, expected = layer(x), reference(x.contiguous())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_a_channels_last_conv_input_needs_no_copy():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = QuantLayer(conv, modiff.ModiffConfig(granularity="sample", modulation="ec", **INT8), "c")
    xs = [torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last) for _ in range(3)]
    for x in xs[:2]:
        layer(x)
    assert _copies(layer, xs[2]) == []


@pytest.mark.parametrize("execution", ["fake", "int8"])
def test_a_bfloat16_state_under_bfloat16_compute_is_what_the_layer_returns(execution):
    """compute_dtype bfloat16 with state_dtype bfloat16: the epilogue writes ``ô`` in bfloat16 and that tensor is the
    output (before: ``ô`` float32 plus a cast of it at every call)."""
    options = INT8 if execution == "int8" else dict(w_bits=8, a_bits=8)
    config = modiff.ModiffConfig(granularity="sample", modulation="ec", compute_dtype="bfloat16",
                                 state_dtype="bfloat16", **{**options})
    layer = QuantLayer(nn.Conv2d(4, 6, 3, padding=1), config, "c")
    x = torch.randn(2, 4, 5, 5, dtype=torch.bfloat16)
    layer(x)
    out = layer(x + 0.1)
    assert out.dtype == torch.bfloat16
    if execution == "int8":
        assert out is layer._o_ref
    # and it matches the float32-state layer up to the state's rounding
    twin = QuantLayer(nn.Conv2d(4, 6, 3, padding=1), modiff.ModiffConfig(
        granularity="sample", modulation="ec", compute_dtype="bfloat16", **options), "t")
    twin.load_state_dict(layer.state_dict())
    twin(x)
    assert torch.allclose(twin(x + 0.1).float(), out.float(), rtol=2e-2, atol=2e-2)


def test_the_fused_passes_may_compile_more_graphs_than_dynamos_default():
    """A process with linears and convs, float32 and bfloat16 cells needs more than 8 graphs of one pass; past the
    limit dynamo runs the rest eager without failing (the benchmark's bf16 configurations did, until this)."""
    import torch._dynamo

    from modiff import kernels

    kernels.compiled("epilogue")
    assert torch._dynamo.config.recompile_limit >= kernels.RECOMPILE_LIMIT == 64
