"""Issue #14, parameters and input: typed method parameters, and one line + exit status 2 (never a
traceback) for every user mistake a probe of the CLI found; SIGTERM like SIGINT; a full or read-only
disk in one line. Each test failed on the code before the fix."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from test_harness import SMOKE_METRICS, assert_not_resampled

from bench.cli import main
from bench.errors import BenchError
from bench.matrix import build_matrix, load_config, load_matrix
from bench.methods import methods

ROOT = Path(__file__).resolve().parents[1]
FAST_SAMPLE = ["--n", "4", "--steps", "3", "--no-progress"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("modiff-bench: error:"), err[0]
    return err[0]


def _smoke(**params) -> dict:
    data, _, _ = load_config("smoke")
    data["params"] = params
    return data


# -- 9: method parameters are typed ----------------------------------------------------------
@pytest.mark.parametrize("method,key,value,match", [
    ("lcq", "warmup", "false", "params.lcq.warmup must be true or false, got 'false'"),
    ("lcq", "warmup", "False", "TOML booleans are lower case"),
    ("lcq", "symmetric", "no", "params.lcq.symmetric must be true or false"),
    ("lcq", "warmup", 1, "params.lcq.warmup must be true or false, got 1"),
    ("lcq", "weight_method", "percentile", "params.lcq.weight_method must be one of 'minmax', 'mse'"),
    ("lcq", "residual_tolerance", "0.1", "params.lcq.residual_tolerance must be a number (or left unset)"),
    ("lcq", "residual_tolerance", True, "residual_tolerance must be a number"),
    ("qdiff", "quant_attention", 1, "params.qdiff.quant_attention must be one of 'auto', true, false"),
    ("qdiff", "cali_n", 2.5, "params.qdiff.cali_n must be an integer"),
    ("qdiff", "weight_lr", "1e-3", "params.qdiff.weight_lr must be a number"),
    ("ptqd", "correct_variance", "yes", "params.ptqd.correct_variance must be true or false"),
    ("deepcache", "center", 1.5, "params.deepcache.center must be an integer (or left unset)"),
])
def test_wrongly_typed_parameters_are_refused_when_the_matrix_is_resolved(method, key, value, match):
    with pytest.raises(BenchError, match=match.replace("(", r"\(").replace(")", r"\)")):
        build_matrix(_smoke(**{method: {key: value}}), "test")


def test_well_typed_parameters_are_accepted_and_keep_their_meaning():
    matrix = build_matrix(_smoke(lcq={"warmup": False, "residual_tolerance": 0, "weight_method": "mse"}), "test")
    lcq = [c for c in matrix.cells if c.base == "lcq"]
    assert lcq and all(c.params["lcq"]["warmup"] is False for c in lcq)
    assert all(c.params["lcq"]["residual_tolerance"] == 0 for c in lcq)
    build_matrix(_smoke(deepcache={"center": 2, "power": 2}, qdiff={"quant_attention": "auto"}), "test")
    # defaults of None declare nothing unless PARAM_TYPES says so; every built-in parameter has a type
    from bench.methods import param_type

    untyped = [(n, k) for n, cls in methods().items() for k in cls.PARAMS if param_type(cls, k) is None]
    assert untyped == [], untyped


def test_set_with_a_python_boolean_is_one_line_exit_2(capsys, tmp_path):
    """``--set params.lcq.warmup=False`` used to run WITH warm-up (the string 'False' is true)."""
    assert main(["run", "smoke", "--out", str(tmp_path / "o"), "--dry-run",
                 "--set", "params.lcq.warmup=False"]) == 2
    line = _error_line(capsys)
    assert "params.lcq.warmup must be true or false, got 'False'" in line and "lower case" in line
    assert main(["run", "smoke", "--out", str(tmp_path / "o"), "--dry-run",
                 "--set", "params.lcq.weight_method='bogus'"]) == 2  # an enum: caught before any cell runs
    assert "weight_method must be one of" in _error_line(capsys)


# -- 10: one line and exit 2 instead of a traceback -------------------------------------------
def test_binary_matrix_file(tmp_path, capsys):
    path = tmp_path / "matrix.toml"
    path.write_bytes(bytes(range(256)) * 4)
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "is not a text (UTF-8 TOML) file" in _error_line(capsys)


@pytest.mark.parametrize("text,match", [
    ("run = 5\n", "run must be a table"),
    ("params = 'x'\n", "params must be a table"),
    ("inception = [1]\n", "inception must be a table"),
])
def test_sections_that_are_not_tables(tmp_path, capsys, text, match):
    path = tmp_path / "m.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert match in _error_line(capsys)


def test_matrix_path_that_is_a_directory(tmp_path, capsys):
    folder = tmp_path / "grid.toml"
    folder.mkdir()
    for path in (folder, tmp_path):
        assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
        assert "is a directory" in _error_line(capsys)


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("this is not python\n")
    (tmp_path / "raising.py").write_text("raise RuntimeError('plugin broke\\non two lines')\n")
    (tmp_path / "raising_mod_xyz.py").write_text("raise ValueError('module-level failure')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("raising_mod_xyz", None)


@pytest.mark.parametrize("spec,match", [
    ("notes.txt", "is not a Python (.py) file"),
    ("", "expected a module name or a path to a .py file"),
    ("raising.py", "importing 'raising.py' failed: RuntimeError: plugin broke on two lines"),
    ("raising_mod_xyz", "importing 'raising_mod_xyz' failed: ValueError: module-level failure"),
])
def test_bad_imports_in_matrix_and_methods(plugins, capsys, spec, match):
    matrix = plugins / "m.toml"
    matrix.write_text(f"[run]\nimports = [{spec!r}]\n".replace("'", '"'))
    assert main(["run", str(matrix), "--out", str(plugins / "o"), "--dry-run"]) == 2
    assert match in _error_line(capsys)
    assert main(["methods", "--import", spec]) == 2
    assert match in _error_line(capsys)


def test_out_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    under = blocker / "sub"
    for argv in (["run", "smoke", "--out", str(under)], ["sample", *FAST_SAMPLE, "--out", str(under)],
                 ["report", str(tmp_path), "--out", str(under)], ["run", "smoke", "--out", str(blocker)]):
        assert main(argv) == 2, argv
        assert "not a directory" in _error_line(capsys)
    assert blocker.read_text() == "x"


def test_report_into_a_run_directory_that_is_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["report", str(blocker / "run")]) == 2
    _error_line(capsys)


def _read_only(monkeypatch, root: Path) -> None:
    """Writes under ``root`` fail as on a read-only mount (tests run as root: chmod cannot do it)."""
    real_mkstemp, real_open, real_mkdir = tempfile.mkstemp, os.open, Path.mkdir

    def under(path) -> bool:
        return str(Path(path).resolve()).startswith(str(root.resolve()))

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 (tempfile's name)
        if dir is not None and under(dir):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    def mkdir(self, *args, **kwargs):
        if under(self) and not self.exists():
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(Path, "mkdir", mkdir)


def test_out_on_a_read_only_file_system_is_refused_before_work(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    for argv in (["run", "smoke", "--out", str(ro / "run")], ["sample", *FAST_SAMPLE, "--out", str(ro / "s")],
                 ["quality", *FAST_SAMPLE, "--out", str(ro / "q")], ["report", str(tmp_path), "--out", str(ro)],
                 ["train-tiny", "--out", str(ro / "t")]):
        assert main(argv) == 2, argv
        assert "Read-only file system" in _error_line(capsys)
    assert list(ro.iterdir()) == []


def test_a_read_only_error_while_writing_is_one_line(tmp_path, capsys, monkeypatch):
    """The early check passed, the file system turned read-only later (a remount): still one line."""
    import bench.cli

    monkeypatch.setattr(bench.cli, "check_out_dir", lambda out, probe=True: Path(out))
    _read_only(monkeypatch, tmp_path / "s")
    assert main(["sample", *FAST_SAMPLE, "--out", str(tmp_path / "s")]) == 2
    assert "Read-only file system" in _error_line(capsys)


def test_a_full_disk_while_writing_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import torch

    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "s"
    assert main(["sample", *FAST_SAMPLE, "--out", str(out)]) == 1
    line = _error_line(capsys)
    assert line.startswith("modiff-bench: error: no space left on device while writing ") and "samples.pt" in line
    assert not list(out.glob(".tmp-*")) and not (out / "samples.pt").exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["sample", *FAST_SAMPLE, "--out", str(out)]) == 0  # space freed: the rerun works


@pytest.mark.parametrize("argv,match", [
    (["sample", "--seed", "18446744073709551600", "--n", "20"], "runs past the largest seed 2^64 - 1"),
    (["sample", "--seed", "-5"], "--seed must be >= 0, got -5"),
    (["quality", "--seed", "-1"], "--seed must be >= 0"),
    (["train-tiny", "--seed", "-1"], "--seed must be between 0 and 2^64 - 1"),
    (["run", "smoke", "--set", "seed=-5"], "run.seed must be >= 0, got -5"),
    (["run", "smoke", "--set", "seed=18446744073709551610"], "runs past the largest seed"),
])
def test_one_seed_rule_for_every_command(argv, match, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert match in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_the_largest_seeds_are_accepted(tmp_path):
    matrix = load_matrix("smoke", ["seed=18446744073709551608"])  # 8 samples: the last is 2^64 - 1
    assert max(matrix.cells[0].seeds) == 2**64 - 1


def test_steps_above_T_are_caught_by_dry_run(tmp_path, capsys):
    assert main(["run", "smoke", "--out", str(tmp_path / "o"), "--dry-run", "--set", "steps=1001"]) == 2
    assert "steps must be between 1 and 1000" in _error_line(capsys)
    assert main(["run", "smoke", "--out", str(tmp_path / "o"), "--dry-run", "--set", "steps=1000"]) == 0


def test_models_checkpoint_without_check(capsys, tmp_path):
    assert main(["models", "--checkpoint", str(tmp_path)]) == 2
    assert "--checkpoint needs --check NAME" in _error_line(capsys)


# -- 12: SIGTERM is an interruption like SIGINT -----------------------------------------------
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


# -- real mounts, where this machine permits them (root with CAP_SYS_ADMIN) -------------------
def _mount(target: Path, options: str) -> bool:
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    target = tmp_path / "mnt"
    target.mkdir()
    mounted = []

    def mount(options: str) -> Path:
        if not _mount(target, options):
            pytest.skip("mounting a tmpfs is not permitted here (needs root with CAP_SYS_ADMIN)")
        mounted.append(target)
        return target

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_real_read_only_mount(tmpfs, capsys):
    ro = tmpfs("ro,size=1m")
    assert main(["sample", *FAST_SAMPLE, "--out", str(ro / "s")]) == 2
    assert "Read-only file system" in _error_line(capsys)


def test_real_full_disk_then_rerun_after_freeing_space(tmpfs, capsys):
    mnt = tmpfs("size=64k")
    filler = mnt / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill it up (unbuffered: closing it writes nothing)
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    out = mnt / "s"
    code = main(["sample", *FAST_SAMPLE, "--out", str(out)])
    line = _error_line(capsys)
    assert code == 1 and line.startswith("modiff-bench: error: no space left on device"), line
    assert not list(mnt.rglob(".tmp-*"))
    filler.unlink()
    assert main(["sample", *FAST_SAMPLE, "--out", str(out)]) == 0
    assert (out / "samples.pt").is_file()
