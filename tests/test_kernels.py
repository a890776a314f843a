"""Real low-bit execution (``execution="int8"`` / ``"fp8"``, modiff/kernels.py) against its fake twin.

Per layer, the real and the fake layer see the SAME inputs, so their quantized activations are
bit-equal and only the accumulation order differs: outputs agree to 1e-5 of their norm. Over a
whole network a float-rounding difference can move one element to the neighbouring grid point of
a later layer's quantizer, so whole-network comparisons use PSNR.
"""

import copy
import io

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import modiff
from bench.metrics import psnr_to_fp
from modiff.kernels import onednn_u8_exact
from modiff.layers import QuantLayer
from modiff.samplers import SamplerConfig, sample

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5  # relative to the output norm, per layer and step
STEPS = 8  # steps of the per-layer input sequences

# name -> (layer factory, input shape); batch 3 with different magnitudes per sample (see drifting())
LAYERS = {
    "conv3x3": (lambda: nn.Conv2d(4, 6, 3, padding=1), (3, 4, 6, 6)),
    "conv3x3-stride2": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (3, 4, 7, 7)),
    "conv1x1": (lambda: nn.Conv2d(4, 6, 1), (3, 4, 5, 5)),
    "conv-groups2": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (3, 4, 6, 6)),
    "conv1d-dilation2": (lambda: nn.Conv1d(4, 6, 3, dilation=2, padding=2), (3, 4, 10)),
    "linear-2d": (lambda: nn.Linear(8, 6), (3, 8)),
    "linear-3d": (lambda: nn.Linear(8, 6), (3, 5, 8)),
}
KERNEL_OPS = ("qconv2d_pointwise", "qlinear_pointwise", "_int_mm", "_scaled_mm")
FLOAT_OPS = ("aten::conv1d", "aten::conv2d", "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution",
             "aten::linear", "aten::addmm", "aten::mm")


def make_layer(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    factory, shape = LAYERS[name]
    torch.manual_seed(0)
    return factory(), shape


def drifting(shape, steps: int = STEPS, seed: int = 0, drift: float = 0.1) -> list[torch.Tensor]:
    """A slowly drifting sequence, like a layer's input along a sampling trajectory; the samples of
    the batch have different magnitudes so that per-sample and per-tensor scales differ."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.tensor([1.0, 3.0, 0.3]).view(-1, *([1] * (len(shape) - 1)))
    seq = [torch.randn(shape, generator=g) * magnitude]
    for _ in range(steps - 1):
        seq.append(seq[-1] + drift * magnitude * torch.randn(shape, generator=g))
    return seq


def config(**kw) -> modiff.ModiffConfig:
    return modiff.ModiffConfig(**{"w_bits": 8, "weight_symmetric": True, **kw})


def fp8_config(**kw) -> modiff.ModiffConfig:
    return config(a_bits=8, symmetric=True, number_format="fp8", **kw)


def fp8_kw(execution: str) -> dict:
    return dict(a_bits=8, symmetric=True, number_format="fp8", modulation="ec", granularity="sample",
                execution=execution)


def wrap(layer: nn.Module, cfg: modiff.ModiffConfig, backend: str | None = None, align: int | None = None):
    q = QuantLayer(copy.deepcopy(layer), cfg, cfg.execution)
    if backend is not None:
        q._op.backend, q._op.align = backend, align
    return q


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def assert_twins(layer, seq, real_cfg, fake_cfg, label, backend=None, align=None):
    """Feed ``seq`` to a real and a fake layer; outputs agree to TOL at every step."""
    real, fake = wrap(layer, real_cfg, backend, align), wrap(layer, fake_cfg)
    assert real.w_q is not None and real._op is not None and fake.w_q is None
    for step, x in enumerate(seq):
        want, got = fake(x), real(x)
        assert got.shape == want.shape and got.dtype == want.dtype
        err = rel_err(got, want)
        assert err <= TOL, f"{label} step {step}: relative error {err:.2e}"
    if real_cfg.modulation != "off":
        assert real.residual_calls == len(seq) - 1


def op_names(fn):
    """Run ``fn`` under the profiler -> (its result, the kernel events (name, first input shape))."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fn()
    return out, [(e.name, e.input_shapes[0] if e.input_shapes else None) for e in prof.events()]


def ran(events, fragments) -> set[str]:
    return {name for name, _ in events if any(f in name for f in fragments)}


def quantized_unet(digits_model, **kw) -> nn.Module:
    return modiff.quantize(copy.deepcopy(digits_model.unet), config(**kw))


def draw(unet, digits_model, steps: int, n: int = 16, batch_size: int = 16) -> torch.Tensor:
    """Samples of ``unet`` (MoDiff's state reset before each batch's first step)."""
    return sample(digits_model.denoiser(unet), digits_model.schedule, SamplerConfig.from_name("ddim-quad", steps),
                  range(n), digits_model.image_shape, batch_size, progress=False,
                  on_trajectory_start=lambda: modiff.reset(unet))


# -- 1. per-layer equivalence: int8 (oneDNN) vs its fake twin --------------------------------------
@pytest.mark.parametrize("modulation", ["off", "plain", "ec"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_int8_layer_equals_its_fake_twin_at_every_step(kind, modulation):
    layer, shape = make_layer(kind)
    seq = drifting(shape)
    for symmetric in (True, False):
        for granularity in ("tensor", "sample"):
            for a_bits in (8, 4):
                kw = dict(a_bits=a_bits, modulation=modulation, symmetric=symmetric, granularity=granularity)
                assert_twins(layer, seq, config(execution="int8", **kw), config(execution="fake", **kw),
                             f"{kind} {kw}")


# -- 2. fp8, and the CUDA backends (int_mm, scaled_mm) with their padding to 16, run on the CPU --------
@pytest.mark.parametrize("variant", ["fp8", "int_mm-align16", "scaled_mm-align16"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_fp8_and_matmul_backends_equal_their_fake_twin(kind, variant):
    layer, shape = make_layer(kind)
    seq = drifting(shape, steps=6)
    backend, align = (None, None) if variant == "fp8" else (variant.split("-")[0], 16)
    for modulation in ("off", "plain", "ec"):
        for granularity in ("tensor", "sample"):
            if variant == "int_mm-align16":
                for symmetric in (True, False):
                    for a_bits in (8, 4):
                        kw = dict(a_bits=a_bits, modulation=modulation, symmetric=symmetric, granularity=granularity)
                        assert_twins(layer, seq, config(execution="int8", **kw), config(execution="fake", **kw),
                                     f"{kind} {variant} {kw}", backend, align)
            else:
                kw = dict(modulation=modulation, granularity=granularity)
                assert_twins(layer, seq, fp8_config(execution="fp8", **kw), fp8_config(execution="fake", **kw),
                             f"{kind} {variant} {kw}", backend, align)


# -- 3. end to end on the digits model -------------------------------------------------------------
@pytest.mark.parametrize("a_bits", [8, 4])
def test_int8_digits_samples_match_the_fake_path(digits_model, a_bits):
    """W8A8 / W8A4 MoDiff (ec, asymmetric per-sample scales), the full default DDIM trajectory of 100
    steps (~6 s per run at 16 samples). Observed: 91.6 dB (A8) and 60.2 dB (A4) between int8 and fake."""
    kw = dict(a_bits=a_bits, modulation="ec", granularity="sample")
    real = draw(quantized_unet(digits_model, execution="int8", **kw), digits_model, 100)
    fake = draw(quantized_unet(digits_model, execution="fake", **kw), digits_model, 100)
    assert psnr_to_fp(real, fake) >= 40.0


def test_fp8_digits_samples_match_the_fake_path(digits_model):
    """fp8 runs torch._scaled_mm, which is ~5x slower than oneDNN on the CPU: 25 steps instead of 100
    (~6 s per run). Observed: 64.7 dB between fp8 and its fake twin (80.7 dB at 100 steps)."""
    real = draw(quantized_unet(digits_model, **fp8_kw("fp8")), digits_model, 25)
    fake = draw(quantized_unet(digits_model, **fp8_kw("fake")), digits_model, 25)
    assert psnr_to_fp(real, fake) >= 40.0


# -- 4. MoDiff's identities under real execution ---------------------------------------------------
@pytest.mark.parametrize("modulation", ["plain", "ec"])
@pytest.mark.parametrize("kind", ["conv3x3", "linear-3d"])
def test_zero_bit_residuals_return_the_cache_and_run_no_kernel(kind, modulation):
    layer, shape = make_layer(kind)
    seq = drifting(shape, steps=3)
    q = wrap(layer, config(execution="int8", a_bits=0, modulation=modulation, granularity="sample"))
    first = q(seq[0]).clone()
    for x in seq[1:]:
        out, events = op_names(lambda x=x: q(x))
        assert torch.equal(out, first)
        assert not ran(events, KERNEL_OPS + FLOAT_OPS), ran(events, KERNEL_OPS + FLOAT_OPS)
    assert q.cached_samples == 3 * (len(seq) - 1) and q.residual_calls == len(seq) - 1
    # control: the profiler does see the kernel of a residual that is not zeroed
    control = wrap(layer, config(execution="int8", a_bits=4, modulation=modulation, granularity="sample"))
    control(seq[0])
    _, events = op_names(lambda: control(seq[1]))
    assert ran(events, ("onednn::qconv2d_pointwise", "onednn::qlinear_pointwise"))


@pytest.mark.parametrize("execution", ["int8", "fp8"])
@pytest.mark.parametrize("granularity", ["tensor", "sample"])
@pytest.mark.parametrize("kind", ["conv3x3", "linear-3d"])
def test_residual_tolerance_reuses_the_cache_and_runs_the_kernel_on_the_moving_samples_only(kind, granularity,
                                                                                             execution):
    # sample 2 moves by a constant: a range below the tolerance but the largest magnitude, so a
    # tensor-wise scale taken over the whole batch (as in the fake path) differs from one taken over
    # the compacted samples (what fp8 once did)
    layer, shape = make_layer(kind)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(shape, generator=g)
    still = x0 + torch.stack([0.01 * torch.randn(shape[1:], generator=g), 2.0 * torch.randn(shape[1:], generator=g),
                              10.0 + 0.01 * torch.randn(shape[1:], generator=g)])  # still, but shifted
    kw = dict(modulation="ec", granularity=granularity, residual_tolerance=0.5)
    make = config if execution == "int8" else fp8_config
    if execution == "int8":
        kw["a_bits"] = 4
    real, fake = wrap(layer, make(execution=execution, **kw)), wrap(layer, make(execution="fake", **kw))
    first = real(x0)
    fake(x0)
    out, events = op_names(lambda: real(still))
    assert torch.equal(out[0], first[0]) and torch.equal(out[2], first[2])  # below tolerance: the cache, exactly
    assert not torch.allclose(out[1], first[1])
    assert real.cached_samples == 2
    kernels = [(name, s) for name, s in events if ("pointwise" in name or "_scaled_mm" in name)]
    assert kernels, "the moving sample ran no kernel"
    if execution == "int8":  # the kernel's input: one sample's activation
        assert all(torch.Size(s).numel() == torch.Size(shape[1:]).numel() for _, s in kernels), kernels
    else:  # _scaled_mm's rows: one sample's positions (conv3x3 keeps the spatial size; linear: T tokens)
        rows = shape[2] * shape[3] if len(shape) == 4 else shape[1]
        assert all(s[0] == rows for _, s in kernels), kernels  # the batch was compacted to 1
    assert rel_err(out, fake(still)) <= TOL
    # every sample still: the previous output, without any kernel
    calm = real.reconstruction + 1e-3
    again, events = op_names(lambda: real(calm))
    assert torch.equal(again, out) and real.cached_samples == 5
    assert not ran(events, KERNEL_OPS + FLOAT_OPS)


def test_state_is_reset_once_per_trajectory_on_the_int8_unet(digits_model):
    """Counters after every UNet call: the warm-up once per batch, then residuals; resetting at every
    step (the bug test_modiff_unet.py guards against) makes every step a float warm-up."""
    unet = quantized_unet(digits_model, execution="int8", a_bits=4, modulation="ec", granularity="sample")
    layers = modiff.quant_layers(unet)
    seen = []
    hook = unet.register_forward_hook(lambda *_: seen.append({(l.warmup_calls, l.residual_calls) for l in layers}))
    good = draw(unet, digits_model, 10, n=8, batch_size=4)
    assert seen == [{(1, k)} for _ in range(2) for k in range(10)]  # two batches of 10 steps

    seen.clear()
    per_step = unet.register_forward_pre_hook(lambda module, args: modiff.reset(module))
    buggy = draw(unet, digits_model, 10, n=8, batch_size=4)
    hook.remove()
    per_step.remove()
    assert seen == [{(1, 0)}] * 20  # residual_calls == 0: no step ever ran on the integer kernels
    assert not torch.equal(buggy, good)
    # ... and the int8 model silently became a float model: bit-equal to the fake twin reset per step
    fake = quantized_unet(digits_model, execution="fake", a_bits=4, modulation="ec", granularity="sample")
    fake.register_forward_pre_hook(lambda module, args: modiff.reset(module))
    assert torch.equal(buggy, draw(fake, digits_model, 10, n=8, batch_size=4))


@pytest.mark.parametrize("modulation", ["plain", "ec"])
@pytest.mark.parametrize("kind", ["conv3x3", "conv1d-dilation2", "linear-3d"])
def test_warmup_runs_in_float_with_the_dequantized_weight(kind, modulation):
    layer, shape = make_layer(kind)
    x = drifting(shape, steps=1)[0]
    q = wrap(layer, config(execution="int8", a_bits=4, modulation=modulation, granularity="sample"))
    w_deq = q.w_q.float() * q.w_scale.view(-1, *([1] * (q.w_q.dim() - 1)))
    assert torch.equal(q.weight, w_deq) and q.layer.weight is None  # rebuilt from the int8 weights, not kept
    float_layer = copy.deepcopy(layer).requires_grad_(False)
    float_layer.weight.copy_(w_deq)
    out, events = op_names(lambda: q(x))
    assert torch.equal(out, float_layer(x))  # the float layer, bias included
    assert not ran(events, KERNEL_OPS)
    assert ran(events, FLOAT_OPS)
    assert q.warmup_calls == 1
    # control: without the float warm-up the first step runs on the kernel
    cold = wrap(layer, config(execution="int8", a_bits=4, modulation=modulation, granularity="sample", warmup=False))
    _, events = op_names(lambda: cold(x))
    assert ran(events, KERNEL_OPS)


@pytest.mark.parametrize("case", ["off", "plain", "ec", "ec-zero-bits", "ec-tolerance"])
def test_returned_tensors_are_never_modified_by_later_steps(case):
    layer, shape = make_layer("conv3x3")
    modulation, _, rest = case.partition("-")
    kw = dict(a_bits=4, modulation=modulation, granularity="sample")
    seq = drifting(shape, steps=6)
    if rest == "zero-bits":
        kw["a_bits"] = 0
    if rest == "tolerance":  # alternate moving steps with steps where every sample is cached
        kw["residual_tolerance"] = 0.5
        seq = [seq[k // 2] + (1e-3 if k % 2 else 0.0) for k in range(8)]
    q = wrap(layer, config(execution="int8", **kw))
    inputs = [(x, x.clone(), x._version) for x in seq]
    outputs = []
    for x in seq:
        out = q(x)
        outputs.append((out, out.clone(), out._version))
    for kept, copy_, version in outputs + inputs:
        assert torch.equal(kept, copy_) and kept._version == version
    if rest == "tolerance":
        assert q.cached_samples > 0 and torch.equal(outputs[3][0], outputs[2][0])  # an all-cached step


@pytest.mark.parametrize("modulation", ["plain", "ec"])
def test_in_place_edits_of_the_state_from_outside_raise(modulation):
    layer, shape = make_layer("conv3x3")
    seq = drifting(shape, steps=3)
    q = wrap(layer, config(execution="int8", a_bits=4, modulation=modulation, granularity="sample"))
    x = seq[0].clone()
    q(x)
    out = q(seq[1])
    with torch.no_grad():
        if modulation == "plain":
            seq[1].mul_(2)  # plain keeps the caller's input as its previous input
        else:
            out.add_(1)  # ec keeps the returned output as ô
    with pytest.raises(RuntimeError, match="in place"):
        q(seq[2])


# -- 5. no silent fallback to float ------------------------------------------------------------------
@pytest.mark.parametrize("a_bits", [4, 8])
def test_int8_unet_residual_steps_run_every_layer_on_onednn(digits_model, a_bits):
    """Every Conv2d and Linear of the digits UNet is wrapped (none is left in float), so a residual
    step runs no float conv/linear at all. The first residual step also computes each layer's
    correction map M (a float conv of ones, once per input shape), so the step after it is profiled."""
    unet = quantized_unet(digits_model, execution="int8", a_bits=a_bits, modulation="ec", granularity="sample")
    n_conv = sum(isinstance(l.layer, nn.Conv2d) for l in modiff.quant_layers(unet))
    n_linear = sum(isinstance(l.layer, nn.Linear) for l in modiff.quant_layers(unet))
    assert (n_conv, n_linear) == (35, 29)
    assert not any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and not isinstance(p, QuantLayer)
                   for p in unet.modules() for m in p.children())
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    modiff.reset(unet)
    with torch.no_grad():
        unet(x, t)
        unet(x * 0.98, t - 10)
        _, events = op_names(lambda: unet(x * 0.96, t - 20))
    names = [name for name, _ in events]
    per_layer = 1 if a_bits < 8 or onednn_u8_exact() else 2  # 8-bit u on a non-VNNI CPU: two exact halves
    assert names.count("onednn::qconv2d_pointwise") == per_layer * n_conv
    assert names.count("onednn::qlinear_pointwise") == per_layer * n_linear
    assert not ran(events, FLOAT_OPS), ran(events, FLOAT_OPS)


# -- 6. quality: MoDiff's advantage over PTQ carries over to int8 --------------------------------------
def test_int8_modiff_beats_int8_ptq_at_low_activation_bits(digits_model):
    """W8, asymmetric per-sample scales, DDIM quad 50 steps, 16 samples. PSNR to FP observed (dB):
    A4 ec 36.97 int8 / 37.00 fake, A4 off 20.70 / 21.19; A3 ec 31.45 / 31.72, A3 off 8.34 / 8.37.
    (At 100 steps: A4 ec 34.5 vs off 20.8, A3 ec 33.3 vs off 8.8.) On an AVX512-VNNI EPYC the fake
    path's float kernels round differently: A3 ec 31.78 int8 / 29.72 fake, the rest within 0.75 dB
    (this test's old two-sided 1.5 dB bound failed there, before and after issue #17). Rounding ties
    send 16 trajectories apart by a couple of dB either way; what must hold is that int8 loses
    nothing beyond that noise."""
    fp = draw(digits_model.unet, digits_model, 50)
    psnr = {}
    for a_bits in (4, 3):
        for modulation in ("ec", "off"):
            for execution in ("int8", "fake"):
                unet = quantized_unet(digits_model, execution=execution, a_bits=a_bits, modulation=modulation,
                                      granularity="sample")
                psnr[a_bits, modulation, execution] = psnr_to_fp(draw(unet, digits_model, 50), fp)
    print("PSNR to FP (dB):", {"A{}-{}-{}".format(*k): round(v, 2) for k, v in psnr.items()})
    for a_bits in (4, 3):
        for execution in ("int8", "fake"):
            assert psnr[a_bits, "ec", execution] >= psnr[a_bits, "off", execution] + 10.0, (a_bits, execution)
        for modulation in ("ec", "off"):  # int8 keeps the fake path's quality
            gap = psnr[a_bits, modulation, "int8"] - psnr[a_bits, modulation, "fake"]
            assert -1.5 <= gap <= 3.0, (a_bits, modulation, gap)


# -- 7. invalid configurations -------------------------------------------------------------------------
INT8 = dict(w_bits=8, a_bits=8, granularity="sample", weight_symmetric=True, execution="int8")
FP8 = dict(w_bits=8, a_bits=8, granularity="sample", weight_symmetric=True, symmetric=True, number_format="fp8",
           execution="fp8")
FAKE_FP8 = {**FP8, "execution": "fake"}


@pytest.mark.parametrize("base, override, match", [
    (INT8, dict(w_bits=16), "w_bits=16"),
    (INT8, dict(a_bits=16), "a_bits=16"),
    (INT8, dict(a_bits=32), "a_bits=32"),
    (INT8, dict(granularity="channel"), "granularity='channel'"),
    (INT8, dict(granularity="sample-channel"), "granularity='sample-channel'"),
    (INT8, dict(weight_symmetric=False), "weight_symmetric=True"),
    (FP8, dict(number_format="int"), "number_format='fp8'"),
    (INT8, dict(number_format="fp8", symmetric=True), "number_format='int'"),
    (FAKE_FP8, dict(a_bits=4), "a_bits=4"),
    (FAKE_FP8, dict(symmetric=False), "needs symmetric=True"),
    (INT8, dict(execution="int4"), "execution must be one of"),
    (INT8, dict(compute_dtype="float64"), "compute_dtype must be one of"),
    (INT8, dict(compile="yes"), "compile must be True or False"),
], ids=["int8-w16", "int8-a16", "int8-a32", "int8-channel", "int8-sample-channel", "int8-weight-asymmetric",
        "fp8-int-format", "int8-fp8-format", "fp8-format-a4", "fp8-format-asymmetric", "unknown-execution",
        "unknown-compute-dtype", "compile-not-bool"])
def test_invalid_real_execution_configs_raise_naming_the_parameter(base, override, match):
    modiff.ModiffConfig(**base)  # the base is valid: the override alone is the problem
    with pytest.raises(ValueError, match=match):
        modiff.ModiffConfig(**{**base, **override})


# -- 8. torch.compile -----------------------------------------------------------------------------------
def test_compiled_passes_equal_eager():
    """The only test that compiles (~20 s). Observed: 5e-8 (off) and 3e-8 (ec) relative; inductor
    may reorder float ops, so an element could in principle land on a neighbouring grid point."""
    layer, shape = make_layer("conv3x3")
    seq = drifting(shape, steps=5)
    for modulation in ("off", "ec"):
        kw = dict(execution="int8", a_bits=4, modulation=modulation, granularity="sample")
        eager, compiled = wrap(layer, config(**kw)), wrap(layer, config(compile=True, **kw))
        for step, x in enumerate(seq):
            err = rel_err(compiled(x), eager(x))
            assert err <= TOL, f"{modulation} step {step}: {err:.2e}"


# -- 9. bfloat16 outside the quantized layers --------------------------------------------------------
def test_bfloat16_compute_dtype_keeps_quant_layers_in_float32(digits_model):
    kw = dict(execution="int8", a_bits=4, modulation="ec", granularity="sample")
    unet = quantized_unet(digits_model, compute_dtype="bfloat16", **kw)
    assert unet.conv_norm_out.weight.dtype == torch.bfloat16
    assert unet.mid_block.attentions[0].group_norm.weight.dtype == torch.bfloat16
    layers = modiff.quant_layers(unet)
    assert all(l.weight.dtype == torch.float32 and l.w_scale.dtype == torch.float32 for l in layers)
    assert all(l.w_q.dtype == torch.int8 for l in layers)
    out_dtypes = set()
    hooks = [l.register_forward_hook(lambda m, a, out: out_dtypes.add(out.dtype)) for l in layers]
    samples = draw(unet, digits_model, 5, n=4, batch_size=4)
    for h in hooks:
        h.remove()
    assert out_dtypes == {torch.bfloat16}
    assert all(l.reconstruction.dtype == torch.float32 and l._o_ref.dtype == torch.float32 for l in layers)
    assert torch.isfinite(samples).all()
    # close to the float32 int8 model (observed 28 dB at 5 steps)
    assert psnr_to_fp(samples, draw(quantized_unet(digits_model, **kw), digits_model, 5, n=4, batch_size=4)) > 20


# -- 10. copies and checkpoints ------------------------------------------------------------------------
def test_deepcopy_and_pickle_of_a_used_int8_unet_give_identical_samples(digits_model):
    unet = quantized_unet(digits_model, execution="int8", a_bits=8, modulation="ec", granularity="sample")
    draw(unet, digits_model, 3, n=4, batch_size=4)
    assert any(l._op._packed for l in modiff.quant_layers(unet))  # prepacked oneDNN weights are cached
    twin = copy.deepcopy(unet)
    buf = io.BytesIO()
    torch.save(unet, buf)
    buf.seek(0)
    unpickled = torch.load(buf, weights_only=False)
    want = draw(unet, digits_model, 5, n=4, batch_size=4)
    assert torch.equal(draw(twin, digits_model, 5, n=4, batch_size=4), want)
    assert torch.equal(draw(unpickled, digits_model, 5, n=4, batch_size=4), want)


def test_state_dict_round_trip_keeps_the_int8_weights(digits_model):
    kw = dict(execution="int8", a_bits=4, modulation="ec", granularity="sample")
    unet = quantized_unet(digits_model, **kw)
    want = draw(unet, digits_model, 5, n=4, batch_size=4)
    buf = io.BytesIO()
    torch.save(unet.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    w_q = {k: v for k, v in state.items() if k.endswith(".w_q")}
    assert len(w_q) == 64 and all(v.dtype == torch.int8 for v in w_q.values())
    # load into a model quantized from other weights: the samples are the checkpoint's
    other = copy.deepcopy(digits_model.unet)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.1)
    target = modiff.quantize(other, config(**kw))
    target.load_state_dict(state)
    assert torch.equal(draw(target, digits_model, 5, n=4, batch_size=4), want)


def test_loading_weights_into_a_layer_that_already_ran_uses_the_new_weights():
    torch.manual_seed(0)
    cfg = config(execution="int8", a_bits=4, modulation="off", granularity="tensor")
    a, b = QuantLayer(nn.Conv2d(4, 6, 3, padding=1), cfg), QuantLayer(nn.Conv2d(4, 6, 3, padding=1), cfg)
    x = torch.randn(2, 4, 6, 6)
    b(x)  # caches b's prepacked weight and its correction map for this input shape
    # (the map was once keyed by the input shape alone, and this load left it stale: error 5.3)
    b.load_state_dict(a.state_dict())
    assert rel_err(b(x), a(x)) <= TOL
