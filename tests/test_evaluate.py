"""The generate / evaluate seam: `modiff-bench evaluate`, metric plugins, and the harness's layering."""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

import bench.evaluate
import bench.generate
from bench.cli import main
from bench.matrix import load_matrix
from bench.metrics import METRICS
from bench.runner import Runner

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
# the smoke preset (FP, LCQ and LCQ + MoDiff at W8A4 on digits), 8 samples in two chunks of 4
SETTINGS = ["steps=6", "n_samples=8", "batch_size=4", "run.metrics=['psnr_to_fp','mse_to_fp']"]

PLUGIN = '''
from bench.metrics import Column, register_metric


@register_metric("mean_abs", columns=[Column("mean_abs", "mean |pixel|", better="lower"),
                                      Column("max_abs", quality=False)],
                 summary="mean and largest absolute pixel value")
def mean_abs(inputs):
    total, largest = 0.0, 0.0
    for i in range(0, len(inputs.samples), 3):  # chunk by chunk, as a metric on 50,000 images must
        chunk = inputs.samples[i: i + 3].double().abs()
        total, largest = total + float(chunk.sum()), max(largest, float(chunk.max()))
    return {"mean_abs": total / inputs.samples.numel(), "max_abs": largest}
'''


@pytest.fixture(autouse=True)
def _forget_user_metric():
    yield
    METRICS.pop("mean_abs", None)


def _run(out: Path, *extra: str, **kwargs):
    lines: list[str] = []
    summary = Runner(load_matrix("smoke", [*SETTINGS, *extra]), out, device="cpu", progress=False, log=lines.append,
                     **kwargs).run()
    return summary, lines


def _rows(out: Path) -> dict[str, dict]:
    """method -> result.json."""
    rows = [json.loads(p.read_text()) for p in out.glob("cells/*/result.json")]
    return {r["method"]: r for r in rows}


def _no_sampling(monkeypatch) -> None:
    monkeypatch.setattr(bench.generate, "sample", lambda *a, **k: pytest.fail("sampled again"))


def test_a_metric_plugin_in_one_file_end_to_end(tmp_path, monkeypatch, capsys):
    """Registered from one file named in run.imports, computed by `evaluate --import` on finished cells
    without sampling again, in the results table, and in the report (`--import`) under its own label. A
    run directory is data: evaluate and report import only what the command line names."""
    (tmp_path / "my_metric.py").write_text(PLUGIN)
    matrix = tmp_path / "m.toml"
    matrix.write_text(textwrap.dedent('''
        [run]
        model = "digits"
        sampler = "ddim-quad"
        steps = 6
        n_samples = 8
        batch_size = 4
        imports = ["my_metric.py"]
        metrics = ["psnr_to_fp"]

        [matrix]
        w_bits = [8]
        a_bits = [4]
        base = ["fp", "lcq"]
        modulation = ["off", "ec"]
        '''))
    out = tmp_path / "o"
    assert main(["run", str(matrix), "--out", str(out), "--no-progress"]) == 0
    before = {m: (r["samples_sha256"], r["samples_bytes"]) for m, r in _rows(out).items()}
    assert all("mean_abs" not in r for r in _rows(out).values())
    METRICS.pop("mean_abs")  # as in a new process: run.json's imports are not imported
    _no_sampling(monkeypatch)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--metrics", "mean_abs", "--no-progress"]) == 2
    assert "my_metric.py" in capsys.readouterr().err and "mean_abs" not in METRICS
    plugin = ["--import", str(tmp_path / "my_metric.py")]
    assert main(["evaluate", str(out), "--metrics", "mean_abs", "--no-progress", *plugin]) == 0
    assert "3 cell(s) evaluated" in capsys.readouterr().out
    rows = _rows(out)
    assert {m: (r["samples_sha256"], r["samples_bytes"]) for m, r in rows.items()} == before
    for row in rows.values():
        images = torch.load(out / row["samples_file"], weights_only=True)["images"].double().abs()
        assert row["mean_abs"] == pytest.approx(float(images.mean()), rel=1e-12)
        assert row["max_abs"] == float(images.max())
        assert row["metrics"] == ["psnr_to_fp", "mean_abs"]
        assert row["metric_columns"]["mean_abs"] == ["mean_abs", "max_abs"]
    table = pd.read_csv(out / "results.csv")
    assert table.mean_abs.notna().all() and table.max_abs.notna().all()
    assert list(table.columns).index("mean_abs") < list(table.columns).index("gbops")
    # idempotent: nothing left to compute (the plugin is registered in this process now)
    assert main(["evaluate", str(out), "--metrics", "mean_abs", "--no-progress"]) == 0
    assert "0 cell(s) evaluated" in capsys.readouterr().out
    assert {r["finished_utc"] for r in _rows(out).values()} == {r["finished_utc"] for r in rows.values()}
    # the report, in a process that has not imported the plugin, labels it from the registry once given
    METRICS.pop("mean_abs")
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "mean |pixel|" not in report and "--import my_metric.py" in report
    assert main(["report", str(out), *plugin]) == 0
    report = (out / "report.md").read_text()
    assert "mean |pixel|" in report


def test_evaluate_after_an_interrupted_generate(tmp_path, monkeypatch):
    """Killed between a cell's generation and its evaluation: `evaluate` adds the metrics from the
    saved samples, equal to an uninterrupted run's, and the next run generates only what is left."""
    baseline = tmp_path / "baseline"
    _run(baseline)
    out = tmp_path / "o"
    real, calls = bench.evaluate.Evaluator.evaluate, []

    def evaluate(self, cell, samples=None):
        calls.append(cell.key)
        if len(calls) == 2:  # the second cell is generated, then the process dies
            raise KeyboardInterrupt
        return real(self, cell, samples)

    with monkeypatch.context() as m:
        m.setattr(bench.evaluate.Evaluator, "evaluate", evaluate)
        with pytest.raises(KeyboardInterrupt):
            _run(out)
    rows = _rows(out)
    assert len(rows) == 2
    (pending,) = [r for r in rows.values() if not r["metrics"]]
    assert pending["status"] == "ok" and pending["psnr_to_fp"] is None
    with monkeypatch.context() as m:
        _no_sampling(m)
        assert main(["evaluate", str(out), "--no-progress"]) == 0
    evaluated = _rows(out)[pending["method"]]
    reference = _rows(baseline)[pending["method"]]
    for column in ("psnr_to_fp", "mse_to_fp", "samples_sha256"):
        assert evaluated[column] == reference[column], column
    summary, _ = _run(out)
    assert summary.ran == 1 and summary.reused == 2 and not summary.failed
    numbers = ["method", "psnr_to_fp", "mse_to_fp"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv")[numbers].sort_values("method", ignore_index=True),
                                  pd.read_csv(baseline / "results.csv")[numbers].sort_values("method",
                                                                                             ignore_index=True))


def test_evaluate_does_not_use_damaged_samples(tmp_path, monkeypatch, capsys):
    """Samples whose SHA-256 does not match are not evaluated (exit 1); the next run samples the cell again."""
    out = tmp_path / "o"
    _run(out)
    rows = _rows(out)
    path = out / rows["lcq"]["samples_file"]
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # same size: only the hash can tell
    path.write_bytes(bytes(data))
    with monkeypatch.context() as m:
        _no_sampling(m)
        assert main(["evaluate", str(out), "--metrics", "fd_domain", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "could not be evaluated" in captured.err and rows["lcq"]["cell_id"] in captured.err
    assert "fd_domain" not in _rows(out)["lcq"]["metrics"]
    summary, lines = _run(out, "run.metrics=['psnr_to_fp','mse_to_fp','fd_domain']")
    assert summary.ran == 1 and not summary.failed
    assert any("does not match the SHA-256" in line for line in lines)
    assert all("fd_domain" in r["metrics"] for r in _rows(out).values())


def test_a_metric_that_raises_keeps_the_samples_and_is_retried(tmp_path, monkeypatch):
    out = tmp_path / "o"
    _run(out)
    spec = METRICS["mse_to_fp"]
    monkeypatch.setitem(METRICS, "mse_to_fp", spec.__class__(**{**spec.__dict__, "compute": lambda inputs: 1 / 0}))
    for row in _rows(out).values():  # as if mse_to_fp had never been computed
        path = out / "cells" / row["cell_id"] / "result.json"
        row["metrics"] = ["psnr_to_fp"]
        path.write_text(json.dumps(row))
    assert main(["evaluate", str(out), "--no-progress"]) == 1
    rows = _rows(out)
    assert all(r["metrics"] == ["psnr_to_fp"] and "ZeroDivisionError" in r["missing_metrics"]["mse_to_fp"]
               for r in rows.values())
    monkeypatch.setitem(METRICS, "mse_to_fp", spec)
    _no_sampling(monkeypatch)
    assert main(["evaluate", str(out), "--no-progress"]) == 0
    assert all(r["mse_to_fp"] is not None and "mse_to_fp" not in r["missing_metrics"] for r in _rows(out).values())


@pytest.mark.parametrize("argv,message", [
    (["evaluate", "{tmp}/nothing"], "is not a run directory"),
    (["evaluate", "{tmp}/o", "--metrics", "nope"], "unknown metric 'nope'"),
    (["evaluate", "{tmp}/file"], "is not a run directory"),
    (["evaluate", "{tmp}/empty"], "run.json is missing"),
])
def test_evaluate_user_mistakes_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    if "{tmp}/o" in argv:
        _run(tmp_path / "o")
    capsys.readouterr()
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("modiff-bench: error:") and message in err[0], err


def test_register_metric_refuses_a_results_table_column():
    from bench.metrics import register_metric

    with pytest.raises(ValueError, match="wall_s"):
        register_metric("timing", columns=["wall_s"])(lambda inputs: 0.0)
    with pytest.raises(ValueError, match="fid"):
        register_metric("my_fid", columns=["fid"])(lambda inputs: 0.0)
    assert "timing" not in METRICS and "my_fid" not in METRICS


@pytest.mark.parametrize("module", ["bench/cli.py", "bench/launch.py"])
def test_cli_and_launch_use_no_private_member(module):
    """They drive the harness through its public API (bench.store, bench.runner)."""
    tree = ast.parse((ROOT / module).read_text())
    private = [f"line {node.lineno}: .{node.attr}" for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")]
    imported = [f"line {node.lineno}: {alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names if alias.name.startswith("_")]
    assert not private and not imported, private + imported


def test_the_store_needs_no_models_and_no_distributed():
    """bench.store is the run directory alone: no rank coordination, no sampling, no model library."""
    import subprocess
    import sys

    code = ("import sys, bench.store; bad = [m for m in sys.modules if m.split('.')[:2] in (['bench', 'distributed'], "
            "['bench', 'generate'], ['bench', 'evaluate'], ['bench', 'runner']) or m.startswith('diffusers')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
