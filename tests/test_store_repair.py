"""The run directory (``bench.store``) repairs what the runner wrote itself and later found damaged (the
full-precision reference, a cell's samples, result.json, run.json, the derived tables), never a reason for every
later run to fail; samples that do not fit float16 fail their cell; a full disk stops the run in one line and
records nothing half-written (issue #14).

Every test starts from a copy of one uninterrupted run (``baseline``), or runs the same small matrix
from scratch, damages it, runs again and compares the metric columns of results.csv with the
uninterrupted run's, exactly.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import bench.generate
import bench.runner
import bench.store
from bench.cli import main
from bench.matrix import load_matrix
from bench.methods import BaseQuantizer, Prepared, register_method
from bench.provenance import sha256_file
from bench.runner import Runner
from bench.store import collect_rows, read_result, read_results, write_tables

pytestmark = pytest.mark.usefixtures("one_thread")

# the smoke preset (FP, LCQ and LCQ + MoDiff at W8A4 on digits), 16 samples in two chunks of 8
SETTINGS = ["steps=10", "n_samples=16", "batch_size=8", "run.metrics=['psnr_to_fp','mse_to_fp']"]
WITH_FD = "run.metrics=['psnr_to_fp','mse_to_fp','fd_domain']"
NUMBERS = ["cell_id", "method", "status", "psnr_to_fp", "mse_to_fp"]


def _matrix(*extra: str):
    return load_matrix("smoke", [*SETTINGS, *extra])


def _argv(out: Path, *extra: str) -> list[str]:
    sets = [item for setting in (*SETTINGS, *extra) for item in ("--set", setting)]
    return ["run", "smoke", "--out", str(out), "--no-progress", *sets]


def _run(out: Path, matrix=None, **kwargs):
    lines: list[str] = []
    summary = Runner(matrix or _matrix(), out, device="cpu", progress=False, log=lines.append, **kwargs).run()
    return summary, lines


def _numbers(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv")[NUMBERS].sort_values("cell_id").reset_index(drop=True)


def _assert_same_numbers(out: Path, baseline: Path) -> None:
    pd.testing.assert_frame_equal(_numbers(out), _numbers(baseline), check_exact=True)


def _keys(out: Path) -> dict[str, str]:
    """method -> cell id."""
    table = pd.read_csv(out / "results.csv")
    return dict(zip(table["method"], table["cell_id"], strict=True))


def _reference(out: Path) -> Path:
    (path,) = (out / "reference").glob("*.pt")
    return path


def _assert_nothing_half_written(out: Path) -> None:
    """No temporary file, no failed cell, no empty file; every result valid, every tensor file loads."""
    assert not list(out.rglob(".tmp-*"))
    assert not [p for p in out.rglob("*") if p.is_file() and p.stat().st_size == 0 and not p.name.endswith(".lock")]
    assert not list(out.glob("cells/*/error.txt"))
    for path in out.glob("cells/*/result.json"):
        row, reason = read_result(path, path.parent.name)
        assert row is not None, reason
        assert row["status"] == "ok", row["error"]
    for path in out.rglob("*.pt"):
        torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("hardening") / "baseline"
    summary, _ = _run(out)
    assert summary.ran == 3 and not summary.failed
    return out


@pytest.fixture
def copy(baseline: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    return out


# --------------------------------------------------------------------------------------------
# 3. the full-precision reference
# --------------------------------------------------------------------------------------------
def _damage_reference(path: Path, damage: str) -> None:
    data = torch.load(path, weights_only=True)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return
    if damage == "other-seeds":  # the images of seeds 1..16, not 0..15
        data["images"] = torch.roll(data["images"], -1, dims=0)
        data["seeds"] = [s + 1 for s in data["seeds"]]
    elif damage == "inf":
        data["images"][3, 0, 5, 5] = float("inf")
    elif damage == "too-few":
        data["images"], data["seeds"] = data["images"][:8], data["seeds"][:8]
    elif damage == "not-a-dict":
        data = data["images"]
    torch.save(data, path)


@pytest.mark.parametrize("damage", ["truncated", "other-seeds", "inf", "too-few", "not-a-dict"])
def test_a_damaged_reference_is_regenerated_with_a_note_naming_it(copy, baseline, damage):
    reference = _reference(copy)
    _damage_reference(reference, damage)
    shutil.rmtree(copy / "cells" / _keys(copy)["lcq"])  # a cell still to run, which needs the reference
    summary, log = _run(copy)
    assert not summary.failed
    name = f"reference/{reference.name}"
    notes = [line for line in log if name in line and "regenerating" in line]
    assert len(notes) == 1, log
    assert name in (copy / "run.log").read_text()
    _assert_same_numbers(copy, baseline)
    assert torch.equal(torch.load(reference, weights_only=True)["images"],
                       torch.load(_reference(baseline), weights_only=True)["images"])
    _assert_nothing_half_written(copy)


# --------------------------------------------------------------------------------------------
# 4. a finished cell's samples
# --------------------------------------------------------------------------------------------
def _damage_file(path: Path, damage: str) -> None:
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "garbled":  # the same size: only the recorded SHA-256 tells
        middle = len(data) // 2
        data[middle: middle + 64] = bytes(b ^ 0x55 for b in data[middle: middle + 64])
        path.write_bytes(bytes(data))
    elif damage == "deleted":
        path.unlink()


def test_sample_files_are_recorded_with_size_and_sha256(baseline):
    for path in baseline.glob("cells/*/result.json"):
        row = json.loads(path.read_text())
        samples = baseline / row["samples_file"]
        assert row["samples_bytes"] == samples.stat().st_size
        assert row["samples_sha256"] == sha256_file(samples)
    fp = json.loads((baseline / "cells" / _keys(baseline)["fp"] / "result.json").read_text())
    assert fp["samples_file"].startswith("reference/")  # the fp cell's samples are the reference file


@pytest.mark.parametrize("damage", ["truncated", "garbled", "deleted"])
def test_damaged_samples_of_a_finished_cell_are_sampled_again(copy, baseline, damage):
    """Adding a metric reads the saved samples: a damaged file must not crash every rerun."""
    key = _keys(copy)["lcq"]
    _damage_file(copy / "cells" / key / "samples.pt", damage)
    summary, log = _run(copy, _matrix(WITH_FD))
    assert summary.ran == 1 and not summary.failed
    assert any(key in line and "samples.pt" in line for line in log), log
    assert key in (copy / "run.log").read_text()
    _assert_same_numbers(copy, baseline)
    assert torch.equal(torch.load(copy / "cells" / key / "samples.pt", weights_only=True)["images"],
                       torch.load(baseline / "cells" / key / "samples.pt", weights_only=True)["images"])
    assert pd.read_csv(copy / "results.csv").fd_domain.notna().all()
    _assert_nothing_half_written(copy)


def test_a_damaged_reference_behind_the_fp_cell_is_caught_by_its_hash(copy, baseline):
    """Garbled tensor bytes still load: the SHA-256 the fp cell recorded for its samples (the reference
    file) is what tells, when a metric is added."""
    reference = _reference(copy)
    _damage_file(reference, "garbled")
    summary, log = _run(copy, _matrix(WITH_FD))
    assert not summary.failed and summary.ran == 1
    assert any(_keys(copy)["fp"] in line and reference.name in line for line in log), log
    _assert_same_numbers(copy, baseline)
    assert torch.equal(torch.load(reference, weights_only=True)["images"],
                       torch.load(_reference(baseline), weights_only=True)["images"])


def test_cells_of_older_versions_stay_finished_while_their_samples_exist(copy, baseline, monkeypatch):
    """No size or hash recorded (older versions): not sampled again; damage is still caught on reading."""
    for path in copy.glob("cells/*/result.json"):
        row = json.loads(path.read_text())
        del row["samples_bytes"], row["samples_sha256"]
        path.write_text(json.dumps(row))
    stamps = {p: p.stat().st_mtime_ns for p in copy.rglob("*.pt")}
    with monkeypatch.context() as m:  # deciding what is finished hashes nothing (a cell may be 19.6 GB)
        m.setattr(bench.store, "sha256_file", lambda path: pytest.fail(f"hashed {path}"))
        assert Runner(_matrix(), copy, device="cpu", progress=False, log=lambda text: None).pending() == []
        summary, _ = _run(copy)
    assert summary.ran == 0 and summary.reused == 3
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*.pt")} == stamps
    key = _keys(copy)["lcq+ec"]
    _damage_file(copy / "cells" / key / "samples.pt", "truncated")
    summary, log = _run(copy, _matrix(WITH_FD))
    assert summary.ran == 1 and not summary.failed
    assert any(key in line and "cannot be loaded" in line for line in log), log
    _assert_same_numbers(copy, baseline)


# --------------------------------------------------------------------------------------------
# 5. result.json
# --------------------------------------------------------------------------------------------
def _corrupt_result(path: Path, how: str, other: Path) -> None:
    text = path.read_text()
    if how == "truncated":
        path.write_text(text[: len(text) // 2])
    elif how == "list":
        path.write_text("[]")
    elif how == "status-only":
        path.write_text('{"status": "ok"}')
    elif how == "metric-not-a-number":
        row = json.loads(text)
        row["psnr_to_fp"] = "abc"
        path.write_text(json.dumps(row))
    elif how == "other-cell":  # another cell's result under this cell's directory
        path.write_text(other.read_text())


@pytest.mark.parametrize("how", ["truncated", "list", "status-only", "metric-not-a-number", "other-cell"])
def test_an_invalid_result_json_means_the_cell_runs_again(copy, baseline, how, capsys):
    keys = _keys(copy)
    damaged = [keys["lcq"], keys["lcq+ec"]]  # two cells
    for key, other in zip(damaged, [keys["fp"], keys["lcq"]], strict=True):
        _corrupt_result(copy / "cells" / key / "result.json", how, copy / "cells" / other / "result.json")
    assert main(_argv(copy)) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "modiff-bench: error" not in captured.err
    log = (copy / "run.log").read_text()
    for key in damaged:
        assert f"cells/{key}/result.json is invalid" in log
    _assert_same_numbers(copy, baseline)
    assert len(pd.read_csv(copy / "results.csv")) == 3
    _assert_nothing_half_written(copy)


def test_tables_leave_out_invalid_results_of_cells_this_task_does_not_run(copy):
    """A SLURM task runs its share only, but rewrites the tables of every cell: invalid ones are left out."""
    keys = _keys(copy)
    (copy / "cells" / keys["lcq"] / "result.json").write_text('{"cell_id": "')
    summary, _ = _run(copy, only={keys["fp"]})
    assert summary.ran == 0
    assert sorted(pd.read_csv(copy / "results.csv").method) == ["fp", "lcq+ec"]
    problems: dict[str, str] = {}
    rows = collect_rows(copy, None, problems)
    assert len(rows) == 2 and list(problems) == [keys["lcq"]] and "unreadable" in problems[keys["lcq"]]


# --------------------------------------------------------------------------------------------
# 6. run.json
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage,reason", [("list", "not a run description"), ("truncated", "unreadable"),
                                           ("empty", "unreadable"), ("deleted", "missing")])
def test_a_damaged_run_json_is_rebuilt_with_a_warning(copy, baseline, damage, reason):
    run_json = copy / "run.json"
    text = run_json.read_text()
    if damage == "deleted":
        run_json.unlink()
    else:
        run_json.write_text({"list": "[]", "truncated": text[: len(text) // 3], "empty": ""}[damage])
    results = {p: p.read_bytes() for p in copy.glob("cells/*/result.json")}
    assert main(_argv(copy)) == 0
    info = json.loads(run_json.read_text())
    assert info["matrix_hash"] == _matrix().matrix_hash and len(info["cells"]) == 3
    assert len(info["invocations"]) == 1 and info["repaired_utc"]
    assert info["repair_reason"].startswith(f"run.json {reason}")
    assert any("warning" in line and "run.json" in line and reason in line
               for line in (copy / "run.log").read_text().splitlines())
    assert {p: p.read_bytes() for p in copy.glob("cells/*/result.json")} == results  # nothing ran again
    _assert_same_numbers(copy, baseline)
    assert main(_argv(copy)) == 0  # the next run appends to the rebuilt file
    again = json.loads(run_json.read_text())
    assert len(again["invocations"]) == 2 and again["repaired_utc"] == info["repaired_utc"]


def test_a_damaged_run_json_with_cells_of_another_matrix_is_still_refused(copy, capsys):
    (copy / "run.json").write_text('{"matrix_hash": "12')
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert main(_argv(copy, "steps=4")) == 2  # another matrix: other cell ids
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds results of a different matrix" in err[0] and "--force" in err[0], err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_the_report_does_not_need_a_readable_run_json(copy, capsys):
    (copy / "run.json").write_text("[]")
    assert main(["report", str(copy)]) == 0
    md = (copy / "report.md").read_text()
    assert "run.json could not be read" in md and "3 ok" in md
    assert main(["report", str(copy)]) == 0  # and the same with a truncated one
    (copy / "run.json").write_text('{"matrix_hash": ')
    assert main(["report", str(copy)]) == 0
    assert "run.json could not be read" in (copy / "report.md").read_text()


# --------------------------------------------------------------------------------------------
# 7. the derived tables
# --------------------------------------------------------------------------------------------
def test_the_report_rebuilds_a_garbled_results_parquet_from_the_cells(copy, baseline):
    (copy / "results.parquet").write_bytes(b"PAR1" + os.urandom(300))
    assert main(["report", str(copy)]) == 0
    md = (copy / "report.md").read_text()
    assert "3 ok" in md and "results.parquet is unreadable" in md
    table = pd.read_parquet(copy / "results.parquet")
    assert len(table) == 3 and (table.status == "ok").all()
    _assert_same_numbers(copy, baseline)


def test_the_report_after_a_kill_counts_every_finished_cell(copy, baseline):
    """Killed between a cell's result and the tables: results.csv/.parquet hold fewer rows."""
    rows = collect_rows(copy, sorted(_keys(copy).values()))
    write_tables(copy, rows[:2], ["psnr_to_fp", "mse_to_fp"])
    assert main(["report", str(copy)]) == 0
    md = (copy / "report.md").read_text()
    assert "3 ok" in md and "held 2 row(s) for 3 cell result(s)" in md
    assert len(pd.read_csv(copy / "results.csv")) == 3 and len(pd.read_parquet(copy / "results.parquet")) == 3
    _assert_same_numbers(copy, baseline)
    assert len(read_results(copy)) == 3
    # fresh tables are left as they are, and the report says nothing about them
    stamp = (copy / "results.parquet").stat().st_mtime_ns
    assert main(["report", str(copy)]) == 0
    assert (copy / "results.parquet").stat().st_mtime_ns == stamp
    assert "rebuilt" not in (copy / "report.md").read_text()
    # killed after a metric was added to a finished cell, before the tables: same rows, older values
    path = copy / "cells" / _keys(copy)["lcq"] / "result.json"
    row = json.loads(path.read_text())
    row.update(fd_domain=12.5, metrics=[*row["metrics"], "fd_domain"])
    path.write_text(json.dumps(row))
    assert main(["report", str(copy)]) == 0
    assert "results.parquet is out of date" in (copy / "report.md").read_text()
    assert pd.read_csv(copy / "results.csv").set_index("method").loc["lcq", "fd_domain"] == 12.5


def test_a_directory_holding_only_the_tables_still_reports(copy):
    shutil.rmtree(copy / "cells")
    assert main(["report", str(copy)]) == 0
    assert "3 ok" in (copy / "report.md").read_text()


# --------------------------------------------------------------------------------------------
# 8. samples that do not fit float16, and decoded images
# --------------------------------------------------------------------------------------------
@register_method("test-hardening-huge")
class _Huge(BaseQuantizer):
    """Test only: a denoiser whose outputs drive the samples far beyond float16's 65504 (still finite
    in float32)."""

    def build(self, ctx):
        return Prepared(unet=ctx.model.unet, wrap=lambda denoiser: lambda x, t: denoiser(x, t) * 1e6)


@register_method("test-hardening-raises")
class _Raises(BaseQuantizer):
    """Test only: building fails."""

    def build(self, ctx):
        raise RuntimeError("calibration diverged")


def test_samples_that_overflow_float16_fail_the_cell(tmp_path):
    matrix = _matrix("matrix.base=['fp','test-hardening-huge']", "matrix.modulation=['off']")
    summary, _ = _run(tmp_path / "o", matrix)
    table = pd.read_csv(tmp_path / "o" / "results.csv").set_index("method")
    assert table.loc["fp", "status"] == "ok"
    assert summary.failed == [table.loc["test-hardening-huge", "cell_id"]]
    assert table.loc["test-hardening-huge", "status"] == "failed"
    assert "overflow float16" in table.loc["test-hardening-huge", "error"]
    assert pd.isna(table.loc["test-hardening-huge", "psnr_to_fp"])
    assert not list((tmp_path / "o").glob("cells/*/samples.pt"))


@pytest.mark.parametrize("decoder,message", [(lambda x: x * 1e6, "overflow float16"),
                                             (lambda x: x * float("nan"), "decoded images contain NaN/Inf")])
def test_decoded_images_are_checked_as_stored(tmp_path, monkeypatch, decoder, message):
    """A latent model's latents are finite, its decoder's images are not (or not in float16)."""
    real = bench.runner.load_model
    monkeypatch.setattr(bench.runner, "load_model",
                        lambda *args: dataclasses.replace(real(*args), decoder=decoder))
    summary, _ = _run(tmp_path / "o")
    table = pd.read_csv(tmp_path / "o" / "results.csv")
    assert len(summary.failed) == 3 and (table.status == "failed").all()
    assert all(message in error for error in table.error), list(table.error)


# --------------------------------------------------------------------------------------------
# 11. a full disk
# --------------------------------------------------------------------------------------------
def _full_disk_on_torch_save(monkeypatch, n: int) -> None:
    """The n-th torch.save writes a few bytes, then the disk is full."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == n:
            if isinstance(f, (str, os.PathLike)):
                Path(f).write_bytes(b"PK\x03\x04 half")
            else:
                f.write(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _full_disk_on_write_text(monkeypatch, name: str, n: int = 1) -> None:
    """The n-th text write of a file called ``name`` (or its temporary) writes half, then fails."""
    real, calls = Path.write_text, []

    def write_text(self, data, *args, **kwargs):
        if self.name.endswith(name):
            calls.append(self)
            if len(calls) == n:
                real(self, data[: len(data) // 2], *args, **kwargs)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


# torch.save calls of a fresh run: the reference's two chunks and the reference (fp cell), then each
# cell's two chunks and samples.pt
@pytest.mark.parametrize("n,written", [(2, "reference/*.chunks/chunk-000001.pt"), (3, "reference/*.pt"),
                                       (5, "cells/{lcq}/chunks/chunk-000001.pt"), (6, "cells/{lcq}/samples.pt")])
def test_a_full_disk_stops_the_run_and_records_nothing(tmp_path, baseline, monkeypatch, n, written):
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        _full_disk_on_torch_save(m, n)
        with pytest.raises(OSError) as raised:
            _run(out)
    assert raised.value.errno == errno.ENOSPC
    assert Path(raised.value.filename).match(str(out / written.format(**_keys(baseline))))
    _assert_nothing_half_written(out)
    summary, _ = _run(out)  # space freed: the rerun completes, with the uninterrupted run's numbers
    assert not summary.failed
    _assert_same_numbers(out, baseline)
    _assert_nothing_half_written(out)


def test_a_full_disk_while_writing_a_result(tmp_path, baseline, monkeypatch):
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        # each cell writes result.json twice: its generation record, then with its metrics; the third
        # write is the second cell's generation record
        _full_disk_on_write_text(m, "result.json", n=3)
        with pytest.raises(OSError) as raised:
            _run(out)
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(out / "cells" / _keys(baseline)["lcq"] / "result.json")
    _assert_nothing_half_written(out)
    assert len(list(out.glob("cells/*/result.json"))) == 1
    summary, _ = _run(out)
    assert summary.ran == 2 and not summary.failed
    _assert_same_numbers(out, baseline)


def test_a_full_disk_while_recording_a_failed_cell(tmp_path, monkeypatch):
    """The failure handler itself hits the full disk: the disk-full error propagates, and no empty
    error.txt or result.json is left; the rerun records the cell's own failure."""
    out = tmp_path / "o"
    matrix = _matrix("matrix.base=['fp','test-hardening-raises']", "matrix.modulation=['off']")
    with monkeypatch.context() as m:
        _full_disk_on_write_text(m, "error.txt")
        with pytest.raises(OSError) as raised:
            _run(out, matrix)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename.endswith("error.txt")
    key = Path(raised.value.filename).parent.name
    assert not (out / "cells" / key / "error.txt").exists() and not (out / "cells" / key / "result.json").exists()
    assert not list(out.rglob(".tmp-*"))
    summary, _ = _run(out, matrix)
    assert summary.failed == [key]
    assert "calibration diverged" in (out / "cells" / key / "error.txt").read_text()


def test_a_full_disk_is_one_line_and_exit_status_1(tmp_path, baseline, monkeypatch, capsys):
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        _full_disk_on_torch_save(m, 6)
        assert main(_argv(out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    samples = out / "cells" / _keys(baseline)["lcq"] / "samples.pt"
    assert err == [f"modiff-bench: error: no space left on device while writing {samples}"]
    _assert_nothing_half_written(out)
    assert main(_argv(out)) == 0
    _assert_same_numbers(out, baseline)


def test_an_interrupt_during_a_cell_leaves_a_clean_state(tmp_path, baseline, monkeypatch):
    out = tmp_path / "o"
    real, calls = bench.generate.sample, []

    def sample(*args, **kwargs):  # the second batch of the second cell
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(bench.generate, "sample", sample)
        with pytest.raises(KeyboardInterrupt):
            _run(out)
    _assert_nothing_half_written(out)
    assert len(list(out.glob("cells/*/result.json"))) == 1
    summary, _ = _run(out)
    assert summary.ran == 2 and not summary.failed
    _assert_same_numbers(out, baseline)
