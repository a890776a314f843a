"""torchao as peers of MoDiff (issue #28, item 6): ``torchao-w8a8``, ``torchao-w8`` and ``torchao-fp8`` quantize the
UNet's linears with torchao's own ``quantize_`` and run them for real; the convolutions stay float and the record
says so, what a cell records is what ran, modulated cells and a missing torchao are skipped with their reasons."""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import baselines.torchao.method  # noqa: F401  registers the methods (bench.registry.BUILTIN_MODULES may not list it)
from baselines.torchao import INSTALL_HINT, is_torchao_tensor, quantize_linears, unavailable
from bench.build import resolve_cell
from bench.errors import BenchError
from bench.matrix import load_matrix
from bench.runner import Runner, device_skip_reason, without_device_skips

pytestmark = pytest.mark.usefixtures("one_thread")
needs_torchao = pytest.mark.skipif(unavailable() is not None, reason=f"torchao is not installed ({INSTALL_HINT})")

HEADER = ('[run]\nsteps = 10\nn_samples = 8\nbatch_size = 8\nmetrics = ["psnr_to_fp"]\n'
          'imports = ["baselines.torchao.method"]\n')


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "m.toml"
    path.write_text(HEADER + text)
    return str(path)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4.0 / ((a - b) ** 2).mean()))  # images in [-1, 1]: peak-to-peak 2


@needs_torchao
@pytest.mark.parametrize("scheme", ["w8a8", "w8"])
def test_the_linears_become_torchao_tensors_and_the_convolutions_stay_float(digits_model, scheme):
    unet = copy.deepcopy(digits_model.unet)
    summary = quantize_linears(unet, scheme)
    fp = dict(digits_model.unet.named_modules())
    linears = [(n, m) for n, m in unet.named_modules() if isinstance(m, nn.Linear)]
    convs = [(n, m) for n, m in unet.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(linears) == 29 and len(convs) == 35  # the digits UNet: time MLP, time projections, attention
    assert all(type(m.weight).__name__ == "Int8Tensor" for _, m in linears)
    for name, conv in convs:  # untouched: the very same float weights
        assert type(conv.weight) is nn.Parameter and torch.equal(conv.weight, fp[name].weight), name
    assert (len(summary.quantized_linears), len(summary.float_linears), len(summary.float_convs)) == (29, 0, 35)
    assert summary.config == {"w8a8": "Int8DynamicActivationInt8WeightConfig", "w8": "Int8WeightOnlyConfig"}[scheme]


@needs_torchao
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_stay_close_to_float32(digits_model, dtype):
    """The dtypes torchao-w8a8 accepts (its cells cast the UNet before quantizing): finite, and near the float32
    full-precision output (measured max |difference| on one call: 0.018 in bfloat16, 0.007 in float16)."""
    x = torch.randn(2, *digits_model.image_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 500)
    with torch.no_grad():
        reference = digits_model.unet(x, t).sample
        unet = nn.Module.to(copy.deepcopy(digits_model.unet), dtype)
        summary = quantize_linears(unet, "w8a8")
        out = unet(x.to(dtype), t).sample
    assert len(summary.quantized_linears) == 29 and out.dtype == dtype
    assert torch.isfinite(out).all() and (out.float() - reference).abs().max() < 0.05


@needs_torchao
def test_torchao_has_no_convolution_which_is_why_they_stay_float():
    """The fact behind "on a UNet the convolutions stay in float": torchao 0.18's int8 tensor implements no
    convolution. If a later torchao runs this, the methods could quantize convolutions and the docs must change."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    conv = nn.Conv2d(16, 16, 3, padding=1)
    quantize_(conv, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
              filter_fn=lambda module, *args: isinstance(module, nn.Conv2d))
    assert is_torchao_tensor(conv.weight)
    with pytest.raises(NotImplementedError, match="aten.convolution"):
        conv(torch.randn(1, 16, 8, 8))


@needs_torchao
def test_a_tiny_matrix_runs_them_beside_fp_and_ltq(tmp_path):
    """fp, ltq, torchao-w8a8, torchao-w8 with and without MoDiff, and DeepCache on fp and on torchao-w8a8: 8 images of
    10 DDIM steps. Measured on 2 CPU cores (digits): torchao-w8a8 61.0 dB, torchao-w8 65.6 dB to full precision, ltq
    W8A8 31.5 dB (torchao quantizes the linears only, 5.5% of the conv/linear MACs); with deepcache-u2 24.7 dB, as
    fp + deepcache-u2 (the caching's own error dominates)."""
    config = _config(tmp_path, '[[matrix]]\nbase = ["fp", "ltq", "torchao-w8a8", "torchao-w8"]\na_bits = [8]\n'
                               'modulation = ["off", "ec"]\n'
                               '[[matrix]]\nbase = ["fp", "torchao-w8a8"]\ncache = ["deepcache-u2"]\n')
    matrix = load_matrix(config)
    skipped = {(s["base"], s["modulation"]): s["reason"] for s in matrix.skipped}
    assert set(skipped) == {("torchao-w8a8", "ec"), ("torchao-w8", "ec")}
    assert all(r.startswith("torchao has no MoDiff: modulation=ec") for r in skipped.values())
    summary = Runner(matrix, tmp_path / "o", device="cpu", progress=False, log=lambda line: None).run()
    assert not summary.failed
    rows = {(r["base"], r["modulation"], r["cache"]): r
            for r in (json.loads(p.read_text()) for p in (tmp_path / "o").glob("cells/*/result.json"))}
    assert len(rows) == 7

    def samples(row):
        return torch.load(tmp_path / "o" / row["samples_file"], weights_only=True)["images"].float()

    fp = samples(rows[("fp", "off", "none")])
    w8a8, w8 = rows[("torchao-w8a8", "off", "none")], rows[("torchao-w8", "off", "none")]
    # what each record says is what ran
    assert (w8a8["w_bits"], w8a8["a_bits"], w8a8["a_granularity"], w8a8["execution"]) == (8, 8, "token", "int8")
    assert (w8["w_bits"], w8["a_bits"], w8["a_granularity"], w8["execution"]) == (8, 32, "none", "fake")
    for row in (w8a8, w8):
        info = row["method_info"]
        assert (info["torchao_quantized_linears"], info["torchao_float_linears"], info["torchao_float_convs"]) == \
            (29, 0, 35)
        assert 0.05 < info["torchao_quantized_mac_share"] < 0.06 and info["torchao_version"]
        images = samples(row)
        assert torch.isfinite(images).all() and not torch.equal(images, fp)  # quantized, and it ran
        assert row["psnr_to_fp"] == pytest.approx(_psnr(images, fp), abs=0.1)
    assert 45 < w8a8["psnr_to_fp"] < 80 and 45 < w8["psnr_to_fp"] < 90
    assert w8a8["psnr_to_fp"] > rows[("ltq", "off", "none")]["psnr_to_fp"] + 10  # linears only vs every layer
    cached, fp_cached = rows[("torchao-w8a8", "off", "deepcache-u2")], rows[("fp", "off", "deepcache-u2")]
    assert cached["method_info"]["deepcache_full_steps"] == [0, 2, 4, 6, 8]
    assert cached["method_info"]["torchao_quantized_linears"] == 29
    assert cached["psnr_to_fp"] < 40 and abs(cached["psnr_to_fp"] - fp_cached["psnr_to_fp"]) < 1
    from bench.cli import main

    assert main(["report", str(tmp_path / "o")]) == 0  # the report says the convolutions stayed float
    report = (tmp_path / "o" / "report.md").read_text()
    assert ("torchao-w8a8 on digits: torchao quantizes linears only, so on a UNet the convolutions stay in float "
            "(35 convolutions; 5.") in report


def _cell(tmp_path, base, **changes):
    cell = next(c for c in load_matrix(_config(tmp_path, f'[matrix]\nbase = ["{base}"]\n')).cells)
    return replace(cell, **changes) if changes else cell


@needs_torchao
def test_the_record_holds_what_runs_and_other_settings_are_skipped(tmp_path):
    """Every bit width is the same cell (as for fp); execution and a_granularity at their defaults take the base's
    own; anything else is not what torchao runs, and is skipped with the reason."""
    matrix = load_matrix(_config(tmp_path, '[matrix]\nbase = ["torchao-w8a8", "torchao-w8"]\nw_bits = [8, 4]\n'
                                           'a_bits = [8, 4, 3]\ndtype = ["float32", "bfloat16"]\n'))
    got = sorted((c.base, c.w_bits, c.a_bits, c.a_granularity, c.execution, c.dtype) for c in matrix.cells)
    assert got == [("torchao-w8", 8, 32, "none", "fake", "bfloat16"), ("torchao-w8", 8, 32, "none", "fake", "float32"),
                   ("torchao-w8a8", 8, 8, "token", "int8", "bfloat16"),
                   ("torchao-w8a8", 8, 8, "token", "int8", "float32")]
    w8a8 = _cell(tmp_path, "torchao-w8a8", a_granularity="auto")
    reasons = {
        "fp8": resolve_cell(replace(w8a8, execution="fp8")).skip,
        "tensor": resolve_cell(replace(w8a8, a_granularity="tensor")).skip,
        "w8 int8": resolve_cell(replace(_cell(tmp_path, "torchao-w8", a_granularity="auto"), execution="int8")).skip,
        "plain": resolve_cell(replace(w8a8, modulation="plain")).skip,
        "fp8 float16": resolve_cell(replace(_cell(tmp_path, "torchao-fp8", a_granularity="auto"),
                                            dtype="float16")).skip,
    }
    assert reasons["fp8"] == ("torchao-w8a8 runs int8 matmul kernels; execution=fp8 is not what it runs "
                              "(leave execution at its default)")
    assert "per row of each linear's input (per token); a_granularity=tensor contradicts it" in reasons["tensor"]
    assert reasons["w8 int8"].startswith("torchao-w8 runs its matmuls in float (int8 weights only)")
    assert reasons["plain"].startswith("torchao has no MoDiff: modulation=plain")
    assert reasons["fp8 float16"] == ("torchao-fp8 runs in float32, bfloat16 only; "
                                      "dtype=float16 is not implemented for it")


def test_without_torchao_every_cell_is_skipped_with_the_install_hint(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)  # 'import torchao' now fails, as where it is not installed
    monkeypatch.setitem(sys.modules, "torchao", None)
    assert unavailable() == "torchao is not installed: pip install 'modiff-bench[torchao]'"
    matrix = load_matrix(_config(tmp_path, '[matrix]\nbase = ["fp", "torchao-w8a8", "torchao-w8", "torchao-fp8"]\n'))
    assert [c.base for c in matrix.cells] == ["fp"]
    reasons = {s["base"]: s["reason"] for s in matrix.skipped}
    assert reasons == dict.fromkeys(["torchao-w8a8", "torchao-w8", "torchao-fp8"],
                                    "torchao is not installed: pip install 'modiff-bench[torchao]'")


@needs_torchao
def test_fp8_needs_float8_matmuls(tmp_path, digits_model):
    """torchao-fp8 records fp8 execution: on a GPU below compute capability 8.9 the runner skips it as it skips every
    fp8 cell; on a CPU, where torchao refuses float8 quantization, building it is a one-line error. (Not run on a
    GPU here: this machine has none.)"""
    from bench.build import build

    cell = _cell(tmp_path, "torchao-fp8")
    assert (cell.w_bits, cell.a_bits, cell.a_granularity, cell.execution) == (8, 8, "tensor", "fp8")
    old_gpu = device_skip_reason(cell, torch.device("cuda"), (8, 0))
    assert "compute capability 8.9 or newer); this GPU has 8.0" in old_gpu
    assert device_skip_reason(cell, torch.device("cuda"), (9, 0)) is None
    resolved = resolve_cell(cell)
    assert resolved.base.device_check(cell, torch.device("cpu")) == (
        "torchao's float8 quantization needs float8 matmuls (CUDA compute capability 8.9 or newer); the device is cpu")
    # the runner asks the base before anything runs: on a CPU the cell is a skip with that reason, not a failure
    matrix = load_matrix(_config(tmp_path, '[matrix]\nbase = ["fp", "torchao-fp8"]\n'))
    kept = without_device_skips(matrix, torch.device("cpu"))
    assert [c.base for c in kept.cells] == ["fp"]
    assert [s["reason"] for s in kept.skipped if s["base"] == "torchao-fp8"] == [
        "torchao's float8 quantization needs float8 matmuls (CUDA compute capability 8.9 or newer); the device is cpu"]
    with pytest.raises(BenchError, match=r"^torchao-fp8: torchao's float8 quantization needs float8 matmuls") as err:
        build(resolved, digits_model, torch.device("cpu"))
    assert "\n" not in str(err.value)


@needs_torchao
def test_compile_is_a_cell_of_its_own(tmp_path, monkeypatch):
    """The compile parameter reaches the quantized UNet (torch.compile replaced by a recorder: the wiring is ours),
    and the cell is labelled compiled with its own id."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    config = _config(tmp_path, '[[matrix]]\nbase = ["torchao-w8"]\n[[matrix]]\nbase = ["torchao-w8"]\n'
                               'params.torchao-w8.compile = true\n')
    matrix = load_matrix(config)
    assert len({c.params["torchao-w8"]["compile"] for c in matrix.cells}) == 2
    Runner(matrix, tmp_path / "o", device="cpu", progress=False, log=lambda line: None).run()
    assert compiled == ["UNet2DModel"]
    rows = [json.loads(p.read_text()) for p in (tmp_path / "o").glob("cells/*/result.json")]
    comp = next(r for r in rows if r["params"]["torchao-w8"]["compile"])
    assert comp["timing_env"]["compile"] is True and comp["method_info"]["compiled"] is True


@needs_torchao
def test_torchao_layers_compile_to_the_eager_result():
    """A real torch.compile (inductor, CPU) of torchao-quantized linears gives the eager result: about 7 s on 2 CPU
    cores here. (The whole digits UNet compiles in about 60 s, measured; too slow for the suite: its cell measured
    61.2 dB to full precision, the eager cell 61.0 dB.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 64))
    x = torch.randn(8, 64)
    with torch.no_grad():
        reference = model(x)
        quantize_linears(model, "w8a8")
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert 0 < float((eager - reference).norm() / reference.norm()) < 0.05  # quantized (measured 0.010)
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5)
