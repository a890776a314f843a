"""The resumable runner (``bench.runner``): one tidy row per cell, what a cell records (samples, layer traces),
resuming after SIGKILL or SIGTERM without recomputing, ``--force``, reruns of the cells whose method version
rose and of a grown matrix, failing cells recorded while the run goes on (their messages free of terminal
escape codes), cells held by another runner (exit status 3), and per-sample scales across batch sizes."""

import argparse
import fcntl
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
from test_cli import _cli_error, _error_line
from test_matrix import _smoke

from bench.cli import main
from bench.errors import BenchError
from bench.matrix import build_matrix, cell_id, load_matrix
from bench.methods import LCQ, BaseQuantizer, Prepared, register_method
from bench.runner import RESULT_COLUMNS, Runner

ROOT = Path(__file__).resolve().parent.parent
ISSUE_COLUMNS = ("cell_id status error model sampler steps eta n_samples seed method base modulation cache w_bits "
                 "a_bits a_granularity psnr_to_fp mse_to_fp fd_domain is_domain fid is_mean is_std sfid gbops "
                 "gbops_honest wall_s img_per_s peak_mem_mb device torch_version git_rev").split()
FAST = '[run]\nsteps = 2\nn_samples = 2\nbatch_size = 2\nmetrics = ["psnr_to_fp"]\n'


def _run(matrix, out, **kwargs):
    return Runner(matrix, out, device="cpu", progress=False, log=lambda text: None, **kwargs).run()


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
    assert list(table.columns[n:]) == ["p_fp_compile", "p_lcq_compile", "p_lcq_fuse_norms", "p_lcq_residual_tolerance",
                                       "p_lcq_state_dtype", "p_lcq_symmetric", "p_lcq_warmup", "p_lcq_weight_method",
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


# -- SIGTERM is an interruption like SIGINT --------------------------------------------------
def test_sigterm_prints_interrupted_and_the_rerun_finishes(tmp_path):
    out = tmp_path / "o"
    argv = [sys.executable, "-m", "bench", "run", "smoke", "--out", str(out), "--no-progress",
            "--set", "steps=20", "--set", "matrix.a_bits=[8, 6, 4, 3]"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(out.glob("cells/*/result.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "modiff-bench: interrupted (SIGTERM)", err
    assert "Traceback" not in err
    assert not list(out.rglob(".tmp-*"))
    finished = {p: p.read_bytes() for p in out.glob("cells/*/result.json")}
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for path, content in finished.items():
        assert_not_resampled(path, content, SMOKE_METRICS)
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 9 and (table.status == "ok").all()


# -- a raised method version, a grown matrix --------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_a_raised_version_reruns_exactly_its_cells_and_the_report_leaves_old_ones_out(tmp_path, monkeypatch,
                                                                                       capsys):
    out = tmp_path / "o"
    argv = ["run", "smoke", "--out", str(out), "--no-progress", "--set", "steps=4"]
    assert main(argv) == 0
    before = {p.parent.name for p in out.glob("cells/*/result.json")}
    monkeypatch.setattr(LCQ, "version", classmethod(lambda cls, settings: 2))  # a fix to LCQ
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "2 cell(s) made by an earlier version of their method are left out" in text
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 cells: 2 run, 1 already finished" in printed  # the fp cell is kept, the two LCQ cells remade
    after = {p.parent.name for p in out.glob("cells/*/result.json")}
    assert len(after - before) == 2
    rows = [json.loads((out / "cells" / k / "result.json").read_text()) for k in after - before]
    assert all(r["method_versions"] == {"lcq": 2} for r in rows)
    assert main(["report", str(out)]) == 0
    assert "earlier version" in (out / "report.md").read_text()  # the two old cells are still on disk


@pytest.mark.usefixtures("one_thread")
def test_a_grown_matrix_resumes_in_its_directory(tmp_path, capsys):
    """A preset that gained cells (the digits preset's int8 and BF16 cells) runs in the directory of its
    earlier version without --force; a changed setting is still another matrix."""
    out = tmp_path / "o"
    argv = ["run", "smoke", "--out", str(out), "--no-progress", "--set", "steps=4"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--set", "matrix.a_bits=[4, 3]"]) == 0
    assert "5 cells: 2 run, 3 already finished" in capsys.readouterr().out
    assert main([*argv, "--set", "n_samples=6"]) == 2
    assert "holds results of a different matrix" in capsys.readouterr().err


# -- a cell held by another runner -------------------------------------------------------------
def test_a_cell_held_by_another_runner_is_counted_and_ends_in_exit_status_3(tmp_path, capsys):
    """It ended with exit status 0, counted nowhere."""
    config = tmp_path / "m.toml"
    config.write_text(FAST + '[matrix]\nbase = ["fp", "lcq"]\na_bits = [8]\n')
    out = tmp_path / "o"
    fp = next(cell_id(c) for c in load_matrix(str(config)).cells if c.base == "fp")
    (out / "locks").mkdir(parents=True)
    with open(out / "locks" / f"{fp}.lock", "w") as other:  # another runner is generating the fp cell
        fcntl.flock(other, fcntl.LOCK_EX)
        assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 3
    captured = capsys.readouterr()
    assert "1 run, 0 already finished, 0 failed" in captured.out
    assert "1 skipped: held by another runner" in captured.out
    assert "1 skipped: held by another runner" in captured.err and fp in captured.err
    assert "held by another runner" in (out / "run.log").read_text()
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0  # released: it runs now
    assert "1 run, 1 already finished, 0 failed" in capsys.readouterr().out


def test_the_exit_status_for_held_cells_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "failures.md").read_text()
    assert "| 3 |" in doc and "held by another runner" in doc


# -- escape codes in messages ------------------------------------------------------------------
def _rejected_pickle(path):
    """A file ``torch.load(weights_only=True)`` refuses: torch's message carries bold on/off escape codes."""
    torch.save({"config": argparse.Namespace(lr=1e-3)}, path)
    return path


@register_method("test-user-mistakes-pickle")
class _LoadsARejectedPickle(BaseQuantizer):
    """Test only: building reads a file torch refuses to unpickle (the path is set by the test)."""

    path = None

    def build(self, ctx):
        torch.load(self.path, weights_only=True)


def test_torch_escape_codes_never_reach_the_terminal_or_run_log(tmp_path, capsys, monkeypatch):
    """torch's refusal of a pickle carries bold on/off codes; they reached the terminal and run.log."""
    bad = _rejected_pickle(tmp_path / "bad.pt")
    with pytest.raises(Exception, match="Weights only load failed") as raised:
        torch.load(bad, weights_only=True)
    assert "\x1b[" in str(raised.value)  # the codes this test is about are there to begin with

    plugin = tmp_path / "loads_bad.py"  # a plugin whose own code reads the file: one line, exit status 2
    plugin.write_text(f"import torch\ntorch.load({str(bad)!r}, weights_only=True)\n")
    matrix = tmp_path / "plugin.toml"
    matrix.write_text(f'[run]\nimports = ["{plugin}"]\n')
    assert main(["run", str(matrix), "--out", str(tmp_path / "p"), "--dry-run"]) == 2
    line = _cli_error(capsys)
    assert "Weights only load failed" in line and "\x1b" not in line

    monkeypatch.setattr(_LoadsARejectedPickle, "path", bad)  # a cell that fails on it: run.log and the terminal
    config = tmp_path / "m.toml"
    config.write_text(FAST + '[matrix]\nbase = ["test-user-mistakes-pickle"]\n')
    assert main(["run", str(config), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    captured = capsys.readouterr()
    log = (tmp_path / "o" / "run.log").read_text()
    assert "Weights only load failed" in log and "Weights only load failed" in captured.out
    assert "\x1b" not in log and "\x1b" not in captured.out and "\x1b" not in captured.err
    assert str(BenchError(f"cannot read x: {raised.value}")).startswith("cannot read x: Weights only load failed. ")
    assert "\x1b" not in str(BenchError(f"cannot read x: {raised.value}"))  # whoever makes the message

    from bench.store import one_line  # the store's own notes (repairs of damaged files) and the results' error column
    assert one_line(raised.value).startswith("UnpicklingError: Weights only load failed") and "\x1b" not in one_line(
        raised.value)


def test_trace_layer_per_model(tmp_path):
    """A matrix of two models traces one layer of each (``trace_layer = {model = layer}``); one name that only one
    model has is refused with the hint (it was the only way, so the demo could not trace both models)."""
    layers = {"digits": "mid_block.resnets.0.conv1", "digits-dit": "transformer_blocks.2.ff.net.2"}
    data = {"run": {"n_samples": 2, "batch_size": 2, "steps": 4, "metrics": ["psnr_to_fp"], "trace_layer": layers,
                    "trace_samples": 2},
            "matrix": [{"model": [model], "base": ["ltq"], "w_bits": [8], "a_bits": [4], "modulation": ["ec"]}
                       for model in layers]}
    _run(build_matrix(data), tmp_path / "a")
    table = pd.read_csv(tmp_path / "a" / "results.csv").set_index("model")
    for model, layer in layers.items():
        trace = json.loads((tmp_path / "a" / table.loc[model, "trace_file"]).read_text())
        assert trace["layer"] == layer and len(trace["rel_l2"]) == 4
    data["run"]["trace_layer"] = {"digits": layers["digits"]}  # the DiT is not traced
    _run(build_matrix(data), tmp_path / "b")
    table = pd.read_csv(tmp_path / "b" / "results.csv").set_index("model")
    assert pd.notna(table.loc["digits", "trace_file"]) and pd.isna(table.loc["digits-dit", "trace_file"])
    data["run"]["trace_layer"] = layers["digits"]
    with pytest.raises(BenchError, match="is not a conv/linear layer of model 'digits-dit' .*one layer per model"):
        _run(build_matrix(data), tmp_path / "c")
    data["run"]["trace_layer"] = {"digits": 3}
    with pytest.raises(BenchError, match="run.trace_layer.digits must be str"):
        build_matrix(data)
