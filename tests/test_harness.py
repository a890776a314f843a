"""The bench harness: matrix files, the method registry, the resumable runner and its CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.cli import main
from bench.errors import BenchError
from bench.matrix import apply_overrides, build_matrix, cell_id, load_config, load_matrix, presets
from bench.methods import BaseQuantizer, DynamicQuantizer, Prepared, methods, register_method
from bench.runner import RESULT_COLUMNS, Runner

ROOT = Path(__file__).resolve().parent.parent
ISSUE_COLUMNS = ("cell_id status error model sampler steps eta n_samples seed method base modulation cache w_bits "
                 "a_bits a_granularity psnr_to_fp mse_to_fp fd_domain is_domain fid is_mean is_std sfid gbops "
                 "gbops_honest wall_s img_per_s peak_mem_mb device torch_version git_rev").split()


def _smoke(**run):
    data, source, folder = load_config("smoke")
    data["run"].update(run)
    return data


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def _run(matrix, out, **kwargs):
    return Runner(matrix, out, device="cpu", progress=False, log=lambda text: None, **kwargs).run()


# --------------------------------------------------------------------------------------------
# matrix files
# --------------------------------------------------------------------------------------------
def test_presets_ship_and_the_digits_preset_is_the_issue_matrix():
    assert {"digits", "smoke"} <= set(presets())
    matrix = load_matrix("digits")
    later = [c for c in matrix.cells if (c.execution, c.dtype) != ("fake", "float32")]
    # int8: {ltq (tensor), psq (sample)} x {off, ec} x W8 x A{8, 4, 3}; and the BF16 full-precision cell
    assert sorted((c.base, c.execution, c.dtype, c.modulation, c.a_bits) for c in later) == sorted(
        [(b, "int8", "float32", m, a) for b in ("ltq", "psq") for m in ("off", "ec") for a in (8, 4, 3)]
        + [("fp", "fake", "bfloat16", "off", 32)])
    cells = [c for c in matrix.cells if c.cache == "none" and c.base not in ("qdiff", "ptqd") and c not in later]
    # FP once + {ltq, lcq} x {off, plain, ec} x W{8, 4} x A{8, 6, 4, 3, 2}
    assert len(cells) == 1 + 2 * 3 * 2 * 5 and not matrix.skipped
    baselines = sorted((c.method, c.w_bits, c.a_bits) for c in matrix.cells if c.base in ("qdiff", "ptqd"))
    assert baselines == [("ptqd", 8, 3), ("ptqd", 8, 4), ("qdiff", 8, 3), ("qdiff", 8, 4), ("qdiff+ec", 8, 3),
                         ("qdiff+ec", 8, 4)]
    cached = sorted(c.method for c in matrix.cells if c.cache != "none")
    assert cached == ["fp+deepcache-u2", "fp+deepcache-u3", "fp+deepcache-u5", "lcq+deepcache-u3",
                      "lcq+deepcache-u3", "lcq+ec+deepcache-u3", "lcq+ec+deepcache-u3"]
    assert sum(c.base == "fp" for c in cells) == 1
    assert {(c.base, c.a_granularity) for c in cells if c.base != "fp"} == {("ltq", "tensor"), ("lcq", "channel")}
    assert {c.a_bits for c in cells if c.base != "fp"} == {8, 6, 4, 3, 2}
    assert matrix.run["n_samples"] >= 512
    assert len({cell_id(c) for c in cells}) == len(cells)


def test_cell_ids_are_stable_and_depend_on_every_setting():
    a = load_matrix("smoke").cells
    b = load_matrix("smoke").cells
    assert [cell_id(c) for c in a] == [cell_id(c) for c in b]
    assert cell_id(a[1]) == "6e0c57afb68f"  # recorded: a changed id would orphan every finished result
    for override in ("steps=6", "seed=1", "run.batch_size=2", "params.lcq.warmup=false", "n_samples=9"):
        changed = load_matrix("smoke", [override]).cells
        assert cell_id(changed[1]) != cell_id(a[1]), override
    assert cell_id(load_matrix("smoke", ["run.metrics=['psnr_to_fp']"]).cells[1]) == cell_id(a[1])


def test_invalid_combinations_are_skipped_with_reasons_and_duplicates_merged():
    data = _smoke()
    data["matrix"].update(a_bits=[32, 4, 0], base=["fp", "lcq", "ltq"], modulation=["off", "ec"],
                          a_granularity=["auto", "channel"])
    matrix = build_matrix(data)
    reasons = {s["reason"] for s in matrix.skipped}
    assert any("32-bit activations is the identity" in r for r in reasons)
    assert any("a_bits=0" in r and "modulation" in r for r in reasons)
    assert any("ltq quantizes activations tensor-wise" in r for r in reasons)
    assert sum(c.base == "fp" for c in matrix.cells) == 1  # 2 x 3 x 2 fp combinations, one cell
    kept = {(c.base, c.modulation, c.a_bits, c.a_granularity) for c in matrix.cells}
    assert ("lcq", "ec", 0, "channel") in kept  # 0-bit residuals: MoDiff as a cache
    assert ("lcq", "off", 32, "channel") in kept  # weight-only quantization
    assert ("ltq", "off", 4, "tensor") in kept and ("ltq", "off", 4, "channel") not in kept


def test_overrides_and_axes_given_as_run_scalars():
    data = apply_overrides(load_config("smoke")[0], ["steps=7", "matrix.a_bits=[3, 2]", "run.sampler='ddpm-quad'",
                                                     "model=digits"])
    matrix = build_matrix(data)
    assert {c.steps for c in matrix.cells} == {7} and {c.sampler for c in matrix.cells} == {"ddpm-quad"}
    assert {c.a_bits for c in matrix.cells if c.base != "fp"} == {3, 2}
    data = apply_overrides(load_config("smoke")[0], ["matrix.steps=[3, 4]"])
    assert {c.steps for c in build_matrix(data).cells} == {3, 4}


@pytest.mark.parametrize("argv,match", [
    (["run", "nosuchpreset"], "unknown preset 'nosuchpreset'"),
    (["run", "smoke", "--set", "matrix.base=['qdiff9']"], "unknown base quantizer 'qdiff9'"),
    (["run", "smoke", "--set", "matrix.cache=['bogus-x']"], "unknown cache 'bogus-x'"),
    (["run", "smoke", "--set", "matrix.cache=['deepcache-x3']"], "expected deepcache-u<N>"),
    (["run", "smoke", "--set", "model=cifar99"], "unknown model 'cifar99'"),
    (["run", "smoke", "--set", "run.metrics=['fid2']"], "unknown metric 'fid2'"),
    (["run", "smoke", "--set", "matrix.a_bits=[1]"], "a_bits must be 2..16"),
    (["run", "smoke", "--set", "matrix.w_bits=[0]"], "w_bits must be 2..16"),
    (["run", "smoke", "--set", "matrix.a_bits=[]"], "the matrix is empty"),
    (["run", "smoke", "--set", "matrix.base=['lcq']", "--set", "matrix.a_bits=[32]",
      "--set", "matrix.modulation=['ec']"], "the matrix is empty"),
    (["run", "smoke", "--set", "run.steps=5000"], "steps must be between 1 and 1000"),
    (["run", "smoke", "--set", "params.lcq.nonsense=1"], "has no parameter 'nonsense'"),
    (["run", "smoke", "--set", "bogus=1"], "unknown key"),
    (["run", "smoke", "--device", "tpu"], "device"),
    (["methods", "--import", "no_such_module_xyz"], "cannot import module"),
    (["run", "smoke", "--set", "inception.weights='/nonexistent/w.pth'"], "is not a file"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, match, capsys, tmp_path):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out), "--no-progress"] if argv[0] == "run" else argv) == 2
    line = _error_line(capsys)
    assert line.startswith("modiff-bench: error:") and match in line, line
    assert not out.exists()


def test_malformed_toml_is_one_line_error(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nsteps = = 3\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "malformed TOML" in _error_line(capsys)
    bad.write_text("[run]\nsteps = 'many'\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "run.steps must be int" in _error_line(capsys)
    assert main(["run", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in _error_line(capsys)


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    summary = _run(load_matrix("smoke"), out)
    return out, summary


def test_run_writes_one_tidy_row_per_cell(smoke_run):
    out, summary = smoke_run
    assert summary.ran == 3 and not summary.failed
    table = pd.read_parquet(out / "results.parquet")
    csv = pd.read_csv(out / "results.csv")
    assert list(table.columns) == list(csv.columns)
    n = len(RESULT_COLUMNS)
    assert list(table.columns[:n]) == list(RESULT_COLUMNS)
    # then the method parameters, flat (benchopt's p_<method>_<field>): no JSON to decode
    assert list(table.columns[n:]) == ["p_fp_compile", "p_lcq_compile", "p_lcq_residual_tolerance",
                                       "p_lcq_symmetric", "p_lcq_warmup", "p_lcq_weight_method",
                                       "p_lcq_weight_symmetric"]
    lcq = table[table.base == "lcq"]
    assert (lcq.p_lcq_warmup == True).all() and (lcq.p_lcq_weight_method == "minmax").all()  # noqa: E712
    assert table[table.base == "fp"].p_lcq_warmup.isna().all()
    assert set(ISSUE_COLUMNS) <= set(table.columns)
    assert len(table) == 3 and table.cell_id.is_unique and (table.status == "ok").all()
    fp = table[table.base == "fp"].iloc[0]
    assert fp.psnr_to_fp == float("inf") and fp.mse_to_fp == 0.0 and fp.w_bits == 32
    ec = table[table.modulation == "ec"].iloc[0]
    off = table[(table.base == "lcq") & (table.modulation == "off")].iloc[0]
    assert ec.psnr_to_fp > off.psnr_to_fp  # MoDiff at A4 stays closer to full precision
    assert ec.state_mb > 0 and off.state_mb == 0
    assert off.gbops == pytest.approx(fp.macs_g * 8 * 4) and ec.gbops_honest > ec.gbops
    assert (table.wall_s > 0).all() and (table.img_per_s > 0).all() and (table.peak_mem_mb > 0).all()
    assert table.fid.isna().all() and table.git_rev.notna().all()
    assert (table.torch_version == torch.__version__.split("+")[0]).all() or table.torch_version.notna().all()
    run = json.loads((out / "run.json").read_text())
    assert run["matrix_hash"] and len(run["cells"]) == 3 and run["provenance"]["versions"]["torch"]
    samples = torch.load(out / ec.samples_file, weights_only=True)
    assert samples["images"].shape == (8, 1, 16, 16) and samples["seeds"] == list(range(8))
    assert len(list((out / "reference").glob("*.pt"))) == 1  # FP reference made once, shared


def test_rerun_skips_finished_cells_and_force_reruns(smoke_run, tmp_path):
    out, _ = smoke_run
    before = {p: p.read_bytes() for p in sorted(out.glob("cells/*/result.json"))}
    summary = _run(load_matrix("smoke"), out)
    assert summary.ran == 0 and summary.reused == 3
    assert {p: p.read_bytes() for p in sorted(out.glob("cells/*/result.json"))} == before
    assert len(pd.read_csv(out / "results.csv")) == 3
    summary = _run(load_matrix("smoke"), out, force=True)
    assert summary.ran == 3 and len(pd.read_csv(out / "results.csv")) == 3


def test_a_different_matrix_is_refused_and_results_untouched(smoke_run, capsys):
    out, _ = smoke_run
    before = (out / "results.csv").read_bytes()
    assert main(["run", "smoke", "--out", str(out), "--set", "steps=4", "--no-progress"]) == 2
    assert "holds results of a different matrix" in _error_line(capsys)
    assert (out / "results.csv").read_bytes() == before


def test_new_metrics_are_computed_from_saved_samples(tmp_path):
    matrix = build_matrix(_smoke(metrics=["psnr_to_fp"]))
    _run(matrix, tmp_path)
    samples = {p: p.stat().st_mtime_ns for p in tmp_path.glob("cells/*/samples.pt")}
    assert pd.read_csv(tmp_path / "results.csv").fd_domain.isna().all()
    summary = _run(build_matrix(_smoke(metrics=["psnr_to_fp", "fd_domain"])), tmp_path)
    assert summary.ran == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("cells/*/samples.pt")} == samples
    assert pd.read_csv(tmp_path / "results.csv").fd_domain.notna().all()


@register_method("test-raises")
class _Raises(BaseQuantizer):
    """Test only: building fails."""

    def build(self, ctx):
        raise RuntimeError("calibration diverged\nsecond line")


@register_method("test-nan")
class _NaN(BaseQuantizer):
    """Test only: the denoiser returns NaN."""

    def build(self, ctx):
        return Prepared(unet=ctx.model.unet, wrap=lambda denoiser: lambda x, t: denoiser(x, t) * float("nan"))


def test_failing_cells_are_recorded_and_the_run_goes_on(tmp_path, capsys):
    config = tmp_path / "m.toml"
    config.write_text('[run]\nsteps = 3\nn_samples = 4\nbatch_size = 4\nmetrics = ["psnr_to_fp"]\n'
                      '[matrix]\nbase = ["test-raises", "lcq", "test-nan"]\na_bits = [6]\n')
    assert main(["run", str(config), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "2 cell(s) failed" in err and "Traceback" not in err
    table = pd.read_csv(tmp_path / "o" / "results.csv").set_index("base")
    assert table.loc["lcq", "status"] == "ok" and table.loc["lcq", "psnr_to_fp"] > 0
    assert table.loc["test-raises", "status"] == "failed"
    assert table.loc["test-raises", "error"] == "RuntimeError: calibration diverged"
    assert table.loc["test-nan", "status"] == "failed" and "NaN/Inf (4 of 4 images" in table.loc["test-nan", "error"]
    assert pd.isna(table.loc["test-nan", "psnr_to_fp"])
    key = table.loc["test-raises", "cell_id"]
    assert "Traceback" in (tmp_path / "o" / "cells" / key / "error.txt").read_text()


def test_per_sample_scales_make_results_independent_of_the_batch(tmp_path):
    """psq images barely move with the batch size; ltq (one scale per batch tensor) ones do.

    Not bitwise: batched convolutions round differently for different batch sizes, and a
    1e-7 change that crosses a rounding boundary of the activation grid moves a value by a
    whole quantization step."""
    data = _smoke(metrics=["mse_to_fp"], n_samples=6)
    data["matrix"].update(base=["psq", "ltq"], modulation=["off"], a_bits=[4])
    images = {}
    for batch_size in (2, 6):
        data["run"]["batch_size"] = batch_size
        out = tmp_path / str(batch_size)
        _run(build_matrix(data), out)
        for row in pd.read_csv(out / "results.csv").itertuples():
            images[row.base, batch_size] = torch.load(out / row.samples_file, weights_only=True)["images"].float()
    moved = {base: float((images[base, 2] - images[base, 6]).abs().mean()) for base in ("psq", "ltq")}
    assert moved["psq"] < 0.02 and moved["ltq"] > 0.2, moved


def test_a_method_plugin_is_one_file(tmp_path, capsys):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(
        "from bench.methods import DynamicQuantizer, register_method\n\n"
        "@register_method('lcq-sym-test')\n"
        "class SymmetricLCQ(DynamicQuantizer):\n"
        "    '''LCQ with a symmetric activation grid.'''\n"
        "    granularity = 'channel'\n\n"
        "    def modiff_options(self):\n"
        "        return {**super().modiff_options(), 'symmetric': True}\n")
    assert main(["methods", "--import", str(plugin)]) == 0
    assert "lcq-sym-test" in capsys.readouterr().out
    config = tmp_path / "mine.toml"
    config.write_text('[run]\nimports = ["my_method.py"]\nsteps = 3\nn_samples = 4\nbatch_size = 4\n'
                      'metrics = ["psnr_to_fp"]\n[matrix]\nbase = ["lcq", "lcq-sym-test"]\na_bits = [4]\n')
    assert main(["run", str(config), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "o" / "results.csv").set_index("base")
    assert table.loc["lcq-sym-test", "status"] == "ok"
    assert table.loc["lcq-sym-test", "psnr_to_fp"] != table.loc["lcq", "psnr_to_fp"]


def test_registry_rejects_clashes_and_non_methods():
    assert {"fp", "ltq", "lcq", "psq", "dynamic"} <= set(methods("base"))
    with pytest.raises(ValueError, match="already registered"):
        register_method("lcq")(type("Other", (DynamicQuantizer,), {}))
    with pytest.raises(TypeError):
        register_method("not-a-method")(object)
    with pytest.raises(BenchError, match="no parameter"):
        methods()["lcq"]({"bits": 3})


def test_sigkill_mid_run_then_rerun_finishes_without_recomputing(tmp_path):
    """The resume guarantee, end to end: SIGKILL the CLI after some cells, run it again."""
    out = tmp_path / "o"
    argv = [sys.executable, "-m", "bench", "run", "smoke", "--out", str(out), "--no-progress",
            "--set", "steps=20", "--set", "matrix.a_bits=[8, 6, 4, 3]"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("cells/*/result.json"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.read_bytes() for p in out.glob("cells/*/result.json")}
    assert 2 <= len(finished) < 9, "the run should have been killed part-way"
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{len(finished)} already finished" in done.stdout
    for path, content in finished.items():
        assert_not_resampled(path, content, SMOKE_METRICS)
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 9 and table.cell_id.is_unique and (table.status == "ok").all()
    assert not list(out.rglob(".tmp-*"))


SMOKE_METRICS = {"psnr_to_fp", "mse_to_fp", "fd_domain", "is_domain"}


def assert_not_resampled(path: Path, content: bytes, metrics: set[str]) -> None:
    """A cell's ``result.json`` read before an interruption (``content``) against the file after the
    rerun: a cell that was generated and evaluated is untouched; one killed between generation and
    evaluation was evaluated from the same samples, not generated again."""
    before, after = json.loads(content), json.loads(path.read_bytes())
    if set(before["metrics"]) == metrics:
        assert path.read_bytes() == content
    else:
        assert set(after["metrics"]) == metrics
        for key in ("generated_utc", "samples_sha256", "wall_s", "gbops"):
            assert after[key] == before[key], key


def test_layer_trace_shows_error_compensation_damping(tmp_path):
    """Paper Fig. 3 data: per-step relative error of one layer; MoDiff ends lower than plain modulation."""
    data = _smoke(trace_layer="mid_block.resnets.0.conv1", trace_samples=4, steps=10)
    data["matrix"].update(modulation=["off", "plain", "ec"], a_bits=[4])
    _run(build_matrix(data), tmp_path)
    table = pd.read_csv(tmp_path / "results.csv").set_index("method")
    assert pd.isna(table.loc["fp", "trace_file"])  # nothing quantized, nothing to trace
    traces = {m: json.loads((tmp_path / table.loc[m, "trace_file"]).read_text()) for m in ("lcq", "lcq+plain",
                                                                                          "lcq+ec")}
    for trace in traces.values():
        assert trace["layer"] == "mid_block.resnets.0.conv1" and len(trace["rel_l2"]) == len(trace["timesteps"]) == 10
    assert traces["lcq+ec"]["rel_l2"][0] == traces["lcq+plain"]["rel_l2"][0] == 0.0  # full-precision warm-up step
    assert traces["lcq"]["rel_l2"][0] > 0
    assert traces["lcq+ec"]["rel_l2"][-1] < traces["lcq+plain"]["rel_l2"][-1]


def test_several_matrix_blocks_give_the_union_of_their_products(tmp_path):
    config = tmp_path / "m.toml"
    config.write_text('[run]\nsteps = 4\n[[matrix]]\nbase = ["fp", "lcq"]\na_bits = [8, 4]\n'
                      '[[matrix]]\nbase = ["fp"]\ncache = ["deepcache-u2"]\n')
    matrix = load_matrix(str(config))
    assert sorted(c.method for c in matrix.cells) == ["fp", "fp+deepcache-u2", "lcq", "lcq"]
    assert len(matrix.resolved()["matrix"]) == 2
    changed = load_matrix(str(config), ["matrix.steps=[3]"])  # --set reaches every block
    assert {c.steps for c in changed.cells} == {3}
    assert len(changed.cells) == len(matrix.cells)


def test_a_parameter_given_as_a_list_is_an_axis(tmp_path, capsys):
    config = tmp_path / "m.toml"
    config.write_text('[run]\nsteps = 4\n[[matrix]]\nbase = ["lcq"]\na_bits = [4, 3]\nmodulation = ["ec"]\n'
                      '[matrix.params.lcq]\nwarmup = [true, false]\nsymmetric = false\n'
                      '[[matrix]]\nbase = ["fp"]\n')
    matrix = load_matrix(str(config))
    swept = sorted((c.a_bits, c.params["lcq"]["warmup"], c.params["lcq"]["symmetric"])
                   for c in matrix.cells if c.base == "lcq")
    assert swept == [(3, False, False), (3, True, False), (4, False, False), (4, True, False)]
    assert len({cell_id(c) for c in matrix.cells}) == 5
    # the same cells as two blocks written out by hand: same ids, so results are shared with such runs
    by_hand = tmp_path / "h.toml"
    by_hand.write_text('[run]\nsteps = 4\n' + "".join(
        f'[[matrix]]\nbase = ["lcq"]\na_bits = [4, 3]\nmodulation = ["ec"]\n'
        f'[matrix.params.lcq]\nwarmup = {w}\nsymmetric = false\n' for w in ("true", "false")) +
        '[[matrix]]\nbase = ["fp"]\n')
    assert sorted(map(cell_id, load_matrix(str(by_hand)).cells)) == sorted(map(cell_id, matrix.cells))
    # --set reaches a block's params, a swept value is type-checked like any other
    plain = tmp_path / "p.toml"
    plain.write_text('[run]\nsteps = 4\n[matrix]\nbase = ["lcq"]\na_bits = [4]\n')
    swept = load_matrix(str(plain), ["matrix.params.lcq.symmetric=[true,false]"])
    assert sorted(c.params["lcq"]["symmetric"] for c in swept.cells) == [False, True]
    with pytest.raises(BenchError, match="params.lcq.warmup must be true or false, got 'no'"):
        load_matrix(str(plain), ["matrix.params.lcq.warmup=[true,'no']"])
    with pytest.raises(BenchError, match="at least one value"):
        load_matrix(str(plain), ["params.lcq.warmup=[]"])
