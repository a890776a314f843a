"""The run directory (``bench.store``) is data (issue #25, items 1-5 and 13's ``evaluate --recompute``):
opening one runs none of its code, and what its files say is checked against what was recorded when they were written
(the full-precision reference, the samples a report draws, the derived tables) before it is used.

Every test starts from a copy of one small uninterrupted run (``baseline``: the smoke preset, FP, LCQ
and LCQ + MoDiff at W8A4 on digits, 8 samples in two chunks of 4), damages or edits it, and compares
with the baseline's numbers exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import bench.generate
import reports.plots
from bench.cli import main
from bench.evaluate import Evaluator
from bench.matrix import load_matrix
from bench.metrics import METRICS
from bench.provenance import sha256_file
from bench.runner import Runner
from bench.store import RunStore

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = ["steps=6", "n_samples=8", "batch_size=4", "run.metrics=['psnr_to_fp','mse_to_fp']"]

PLUGIN = '''
from bench.metrics import Column, register_metric


@register_metric("trust_mean", columns=[Column("trust_mean", "mean pixel (trust test)")],
                 summary="mean pixel value")
def trust_mean(inputs):
    return {"trust_mean": float(inputs.samples.double().mean())}
'''


def _matrix():
    return load_matrix("smoke", SETTINGS)


def _run(out: Path):
    lines: list[str] = []
    summary = Runner(_matrix(), out, device="cpu", progress=False, log=lines.append).run()
    return summary, lines


def _rows(out: Path) -> dict[str, dict]:
    """method -> result.json."""
    rows = [json.loads(p.read_text()) for p in out.glob("cells/*/result.json")]
    return {r["method"]: r for r in rows}


def _write_row(out: Path, row: dict) -> None:
    (out / "cells" / row["cell_id"] / "result.json").write_text(json.dumps(row))


def _reference(out: Path) -> Path:
    (path,) = (out / "reference").glob("*.pt")
    return path


def _no_sampling(monkeypatch) -> None:
    monkeypatch.setattr(bench.generate, "sample", lambda *a, **k: pytest.fail("sampled again"))


def _swap_images(path: Path) -> None:
    """Edit a samples file in place: the tensor bytes of its first two images trade places. The file
    keeps its size, still loads, and every value stays finite; only its SHA-256 tells."""
    images = torch.load(path, weights_only=True)["images"]
    first, second = (images[k].contiguous().numpy().tobytes() for k in (0, 1))
    data = path.read_bytes()
    start = data.index(first + second)
    edited = data[:start] + second + first + data[start + 2 * len(first):]
    assert len(edited) == len(data)
    path.write_bytes(edited)
    swapped = torch.load(path, weights_only=True)["images"]
    assert torch.equal(swapped[0], images[1]) and swapped.isfinite().all()


def _forget_psnr(out: Path, method: str) -> dict:
    """As if the cell had never computed psnr_to_fp."""
    row = _rows(out)[method]
    row["metrics"] = [m for m in row["metrics"] if m != "psnr_to_fp"]
    row["psnr_to_fp"] = None
    _write_row(out, row)
    return row


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("trust") / "baseline"
    summary, _ = _run(out)
    assert summary.ran == 3 and not summary.failed
    return out


@pytest.fixture
def copy(baseline: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    return out


@pytest.fixture(autouse=True)
def _forget_user_metric():
    yield
    METRICS.pop("trust_mean", None)


# --------------------------------------------------------------------------------------------
# 1. opening a run directory runs none of its code
# --------------------------------------------------------------------------------------------
def test_report_and_evaluate_import_nothing_a_run_directory_names(copy, tmp_path, monkeypatch, capsys):
    """The issue's reproduction: a shared run directory with a helpers.py its run.json imports."""
    marker = tmp_path / "ran"
    (copy / "helpers.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    info = json.loads((copy / "run.json").read_text())
    info["resolved"]["run"]["imports"] = ["helpers.py"]
    (copy / "run.json").write_text(json.dumps(info))
    monkeypatch.chdir(copy)
    assert main(["report", "."]) == 0
    assert not marker.exists()
    _no_sampling(monkeypatch)
    assert main(["evaluate", ".", "--no-progress"]) == 0
    assert not marker.exists()
    assert "Traceback" not in capsys.readouterr().err


def test_plugins_come_from_import_and_the_report_names_those_it_lacks(copy, tmp_path, monkeypatch, capsys):
    plugin = tmp_path / "trust_plugin.py"
    plugin.write_text(PLUGIN)
    _no_sampling(monkeypatch)
    assert main(["evaluate", str(copy), "--import", str(plugin), "--metrics", "trust_mean", "--no-progress"]) == 0
    assert all(r["trust_mean"] is not None for r in _rows(copy).values())
    # the matrix had imported it: run.json lists it, as a run of such a matrix records
    info = json.loads((copy / "run.json").read_text())
    info["resolved"]["run"]["imports"] = ["trust_plugin.py"]
    (copy / "run.json").write_text(json.dumps(info))
    METRICS.pop("trust_mean")  # a new process
    capsys.readouterr()
    assert main(["evaluate", str(copy), "--metrics", "trust_mean", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trust_plugin.py" in err[0] and "--import" in err[0], err
    assert "trust_mean" not in METRICS
    assert main(["report", str(copy)]) == 0  # still renders, and says what it lacked
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "trust_mean" in err[0] and "trust_plugin.py" in err[0], err
    md = (copy / "report.md").read_text()
    assert "trust_mean" in md and "--import trust_plugin.py" in md and "mean pixel (trust test)" not in md
    assert main(["report", str(copy), "--import", str(plugin)]) == 0
    assert capsys.readouterr().err == ""
    md = (copy / "report.md").read_text()
    assert "needs plugins" not in md


# --------------------------------------------------------------------------------------------
# 2. the full-precision reference
# --------------------------------------------------------------------------------------------
def test_a_reference_records_its_size_and_sha256_beside_it(baseline):
    path = _reference(baseline)
    record = json.loads(path.with_name(path.name + ".sha256.json").read_text())
    assert record == {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def test_evaluate_remakes_an_edited_reference_no_cell_vouches_for(copy, baseline, monkeypatch, capsys):
    """The issue's case: no finished fp cell recorded the reference's hash; its bytes edited in place
    (same size, finite) once gave a wrong psnr_to_fp with exit status 0."""
    shutil.rmtree(copy / "cells" / _rows(copy)["fp"]["cell_id"])
    _forget_psnr(copy, "lcq")
    reference = _reference(copy)
    _swap_images(reference)
    assert main(["evaluate", str(copy), "--no-progress"]) == 0
    assert _rows(copy)["lcq"]["psnr_to_fp"] == _rows(baseline)["lcq"]["psnr_to_fp"]
    assert torch.equal(torch.load(reference, weights_only=True)["images"],
                       torch.load(_reference(baseline), weights_only=True)["images"])
    log = (copy / "run.log").read_text()
    assert f"reference/{reference.name} does not match the size and SHA-256 recorded" in log


def test_run_remakes_an_edited_reference_no_cell_vouches_for(copy, baseline):
    """The next run, too: it once made the fp cell record the edited file, and kept the wrong number."""
    shutil.rmtree(copy / "cells" / _rows(copy)["fp"]["cell_id"])
    _forget_psnr(copy, "lcq")
    _swap_images(_reference(copy))
    summary, log = _run(copy)
    assert summary.ran == 1 and not summary.failed
    assert any("regenerating" in line and _reference(copy).name in line for line in log), log
    for method, row in _rows(baseline).items():
        assert _rows(copy)[method]["psnr_to_fp"] == row["psnr_to_fp"], method
    assert torch.equal(torch.load(_reference(copy), weights_only=True)["images"],
                       torch.load(_reference(baseline), weights_only=True)["images"])


def test_without_a_way_to_remake_it_the_metric_fails_with_the_reason(copy):
    row = _forget_psnr(copy, "lcq")
    reference = _reference(copy)
    _swap_images(reference)
    store = RunStore(copy, _matrix(), log=lambda text: None)
    evaluator = Evaluator(store, ["psnr_to_fp", "mse_to_fp"], {}, torch.device("cpu"))
    got = evaluator.evaluate(store.cell(row["cell_id"]))
    assert got["psnr_to_fp"] is None and "psnr_to_fp" not in got["metrics"]
    reason = got["missing_metrics"]["psnr_to_fp"]
    assert f"reference/{reference.name} is not the file whose SHA-256" in reason, reason
    assert row["cell_id"] in evaluator.errors  # -> exit status 1, tried again by the next evaluation


def test_a_reference_without_its_record_is_adopted_when_its_cell_vouches(copy, monkeypatch):
    """References of older versions have no record: the fp cell's recorded SHA-256 stands in for it."""
    reference = _reference(copy)
    record = reference.with_name(reference.name + ".sha256.json")
    expected = json.loads(record.read_text())
    record.unlink()
    _forget_psnr(copy, "lcq")
    _no_sampling(monkeypatch)
    assert main(["evaluate", str(copy), "--no-progress"]) == 0
    assert json.loads(record.read_text()) == expected


# --------------------------------------------------------------------------------------------
# 3. damage found by evaluate is remembered
# --------------------------------------------------------------------------------------------
def test_damaged_samples_found_by_evaluate_are_generated_again_by_the_next_run(copy, baseline, monkeypatch):
    key = _rows(copy)["lcq"]["cell_id"]
    samples = copy / "cells" / key / "samples.pt"
    _swap_images(samples)
    with monkeypatch.context() as m:
        _no_sampling(m)
        assert main(["evaluate", str(copy), "--metrics", "fd_domain", "--no-progress"]) == 1
    assert "does not match the SHA-256" in _rows(copy)["lcq"]["damaged"]
    # another process: what `run` will do
    assert [k for k, _ in Runner(_matrix(), copy, device="cpu", progress=False, log=lambda t: None).pending()] \
        == [key]
    summary, log = _run(copy)
    assert summary.ran == 1 and not summary.failed
    assert any(key in line and "running it again" in line for line in log), log
    assert sha256_file(samples) == sha256_file(baseline / "cells" / key / "samples.pt")
    assert "damaged" not in _rows(copy)["lcq"]


# --------------------------------------------------------------------------------------------
# 4. report draws only verified samples
# --------------------------------------------------------------------------------------------
def test_report_does_not_draw_samples_that_fail_their_hash(copy, monkeypatch):
    key = _rows(copy)["lcq"]["cell_id"]
    _swap_images(copy / "cells" / key / "samples.pt")
    drawn: list[Path] = []
    real = reports.plots._load_mosaic

    def load_mosaic(path, max_images):
        drawn.append(Path(path))
        return real(path, max_images)

    monkeypatch.setattr(reports.plots, "_load_mosaic", load_mosaic)
    assert main(["report", str(copy)]) == 0
    assert copy / "cells" / key / "samples.pt" not in drawn
    assert copy / "cells" / _rows(copy)["lcq+ec"]["cell_id"] / "samples.pt" in drawn  # the others are drawn
    md = (copy / "report.md").read_text()
    assert f"cell {key}" in md and "left out of the sample grids" in md
    assert "does not match" in _rows(copy)["lcq"]["damaged"]  # and the next run makes it again


# --------------------------------------------------------------------------------------------
# 5. the derived tables are rebuilt when their content differs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["results.csv", "results.md"])
def test_report_rebuilds_an_edited_table(copy, baseline, name):
    path = copy / name
    if name == "results.csv":
        table = pd.read_csv(path)
        table.loc[table.method == "lcq", "psnr_to_fp"] = 99.0
        table.to_csv(path, index=False)
    else:
        path.write_text(path.read_text().replace("lcq", "lcq-edited"))
    assert main(["report", str(copy)]) == 0
    assert path.read_bytes() == (baseline / name).read_bytes()
    assert f"{name} is out of date" in (copy / "report.md").read_text()


# --------------------------------------------------------------------------------------------
# 13. evaluate --recompute
# --------------------------------------------------------------------------------------------
def test_evaluate_recompute_computes_a_metric_again(copy, baseline, monkeypatch, capsys):
    for row in _rows(copy).values():  # as if an older, wrong psnr_to_fp had computed them
        row["psnr_to_fp"] = 1.0
        _write_row(copy, row)
    _no_sampling(monkeypatch)
    assert main(["evaluate", str(copy), "--no-progress"]) == 0
    assert "0 cell(s) evaluated" in capsys.readouterr().out  # only missing metrics, by default
    assert main(["evaluate", str(copy), "--recompute", "psnr_to_fp", "--no-progress"]) == 0
    assert "3 cell(s) evaluated" in capsys.readouterr().out
    for method, row in _rows(baseline).items():
        got = _rows(copy)[method]
        assert got["psnr_to_fp"] == row["psnr_to_fp"] and got["mse_to_fp"] == row["mse_to_fp"], method
        assert got["metrics"] == ["mse_to_fp", "psnr_to_fp"]
    assert sorted(pd.read_csv(copy / "results.csv").psnr_to_fp) == sorted(pd.read_csv(baseline / "results.csv")
                                                                            .psnr_to_fp)
    assert main(["evaluate", str(copy), "--recompute", "nope", "--no-progress"]) == 2
    assert "unknown metric 'nope'" in capsys.readouterr().err


def test_a_metric_whose_version_rose_is_computed_again_by_the_next_run_and_evaluate(copy, baseline, monkeypatch,
                                                                                     capsys):
    """A fixed metric (issue #25: the domain classifier's clamp) raises its version: values an older version
    recorded are stale, and 'run' / 'evaluate' compute them again instead of mixing old and new values."""
    import dataclasses

    from bench.evaluate import stale_metrics

    for row in _rows(copy).values():  # as if an older, wrong psnr_to_fp had computed them
        row["psnr_to_fp"] = 1.0
        _write_row(copy, row)
    monkeypatch.setitem(METRICS, "psnr_to_fp", dataclasses.replace(METRICS["psnr_to_fp"], version=2))
    rows = _rows(copy)
    assert all(stale_metrics(row) == ["psnr_to_fp"] for row in rows.values() if "psnr_to_fp" in row["metrics"])
    _no_sampling(monkeypatch)
    summary, _ = _run(copy)  # the next run: nothing sampled, the stale metric computed again
    assert summary.ran == 0 and not summary.failed
    for method, row in _rows(baseline).items():
        got = _rows(copy)[method]
        assert got["psnr_to_fp"] == row["psnr_to_fp"], method
        if "psnr_to_fp" in got["metrics"]:
            assert got["metric_versions"] == {"psnr_to_fp": 2} and not stale_metrics(got), method
    assert main(["evaluate", str(copy), "--no-progress"]) == 0
    assert "0 cell(s) evaluated" in capsys.readouterr().out  # up to date now


def test_evaluate_and_report_help_say_what_they_do(capsys):
    for command, expected in (("evaluate", ["--recompute", "--import", "marked (in its result.json)"]),
                              ("report", ["--import"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(e in text for e in expected), (command, text)
