"""The ``modiff-bench`` command line: a mistake is one line and exit status 2 (never a traceback), a full disk
one line and exit status 1; ``--out`` is checked before any work (a file in its way, a read-only file system, a
directory of other files), every command has one seed rule and ``--device`` check; ``sample``'s outputs and
the console script."""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.devices import pick_device
from bench.errors import BenchError
from bench.zoo.checkpoints import write_manifest
from bench.zoo.digits import ASSET_DIR

FAST = ["--n", "4", "--steps", "3", "--no-progress"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def _cli_error(capsys) -> str:
    """The one line of a modiff-bench error (no traceback)."""
    line = _error_line(capsys)
    assert line.startswith("modiff-bench: error:"), line
    return line


@pytest.mark.parametrize("argv,match", [
    (["sample", "--model", "cifar99"], "unknown model 'cifar99'"),
    (["sample", "--sampler", "euler"], "unknown sampler 'euler'"),
    (["sample", "--steps", "0"], "steps must be between 1 and 1000"),
    (["sample", "--steps", "1001"], "steps must be between 1 and 1000"),
    (["sample", "--eta", "2"], "eta must be between 0"),
    (["sample", "--device", "cuda:7"] if not torch.cuda.is_available() else ["sample", "--device", "xpu9"],
     "device"),
    (["sample", "--checkpoint", "/nonexistent/ckpt"], "does not exist"),
    (["quality", "--model", "cifar99"], "only"),
    (["train-tiny", "--install", "--no-eval"], "quality bar"),
])
def test_bad_input_is_one_line_and_exit_2(argv, match, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 2
    line = _error_line(capsys)
    assert line.startswith("modiff-bench: error:") and match in line


def test_corrupt_and_mismatched_checkpoints_are_one_line_errors(capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ASSET_DIR, ckpt)
    weights = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert main(["sample", "--checkpoint", str(ckpt), *FAST, "--out", str(tmp_path / "o")]) == 2
    assert "corrupt" in _error_line(capsys)

    shutil.rmtree(ckpt)
    shutil.copytree(ASSET_DIR, ckpt)
    cfg = ckpt / "unet" / "config.json"
    cfg.write_text(cfg.read_text().replace('"sample_size": 16', '"sample_size": 32'))
    assert main(["sample", "--checkpoint", str(ckpt), *FAST, "--out", str(tmp_path / "o")]) == 2
    assert "corrupt" in _error_line(capsys)  # the config's hash is recorded too

    manifest = json.loads((ckpt / "manifest.json").read_text())
    write_manifest(ckpt, list(manifest.pop("files")), manifest)  # re-hashed: only the config is wrong
    assert main(["sample", "--checkpoint", str(ckpt), *FAST, "--out", str(tmp_path / "o")]) == 2
    line = _error_line(capsys)
    assert "does not match: sample_size is 32, expected 16" in line
    assert not (tmp_path / "o").exists()  # nothing written on failure


def test_sample_writes_grid_tensor_and_provenance(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sample", *FAST, "--seed", "10", "--batch-size", "3", "--out", str(out)]) == 0
    assert (out / "samples.png").stat().st_size > 0
    saved = torch.load(out / "samples.pt")
    assert saved["seeds"] == [10, 11, 12, 13] and saved["images"].shape == (4, 1, 16, 16)
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["sampler"] == "ddim-quad" and record["settings"]["steps"] == 3
    assert record["provenance"]["versions"]["torch"] == torch.__version__.split("+")[0] or \
        record["provenance"]["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert "git_revision" in record["provenance"]
    assert "images/s" in capsys.readouterr().out


def test_console_script_is_installed_and_helps():
    exe = shutil.which("modiff-bench") or pytest.fail("modiff-bench console script is not on PATH")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("sample", "quality", "train-tiny", "train-dit", "models", "run", "presets", "methods", "report"):
        assert command in out
    bad = subprocess.run([sys.executable, "-m", "bench", "sample", "--steps", "0", "--no-progress"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr


def test_output_piped_into_a_reader_that_stops_early_is_no_traceback(tmp_path):
    """'modiff-bench run digits --dry-run | head -1' used to end in a BrokenPipeError traceback."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "digits", "--dry-run", "--out", str(tmp_path / "o")],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written (importing torch takes seconds)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


# -- --out is checked before any work; a read-only or full disk ------------------------------
def test_out_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    under = blocker / "sub"
    for argv in (["run", "smoke", "--out", str(under)], ["sample", *FAST, "--out", str(under)],
                 ["report", str(tmp_path), "--out", str(under)], ["run", "smoke", "--out", str(blocker)]):
        assert main(argv) == 2, argv
        assert "not a directory" in _cli_error(capsys)
    assert blocker.read_text() == "x"


def test_report_into_a_run_directory_that_is_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["report", str(blocker / "run")]) == 2
    _cli_error(capsys)


def test_out_at_a_directory_of_other_files_is_refused_unless_force(tmp_path, capsys):
    """It was adopted as a run directory, and its results.csv overwritten."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.csv").write_text("my,own\n1,2\n")
    for extra in (["--dry-run"], ["--estimate"], []):
        assert main(["run", "smoke", "--out", str(mine), "--no-progress", *extra]) == 2
        line = _cli_error(capsys)
        assert "not a run directory" in line and "results.csv" in line and "--force" in line
    assert sorted(p.name for p in mine.iterdir()) == ["results.csv"]
    assert (mine / "results.csv").read_text() == "my,own\n1,2\n"
    assert main(["run", "smoke", "--out", str(mine), "--dry-run", "--force"]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", "smoke", "--out", str(empty), "--dry-run"]) == 0
    killed = tmp_path / "killed"  # a run killed before it wrote run.json is still a run directory
    (killed / "locks").mkdir(parents=True)
    assert main(["run", "smoke", "--out", str(killed), "--dry-run"]) == 0


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
    for argv in (["run", "smoke", "--out", str(ro / "run")], ["sample", *FAST, "--out", str(ro / "s")],
                 ["quality", *FAST, "--out", str(ro / "q")], ["report", str(tmp_path), "--out", str(ro)],
                 ["train-tiny", "--out", str(ro / "t")]):
        assert main(argv) == 2, argv
        assert "Read-only file system" in _cli_error(capsys)
    assert list(ro.iterdir()) == []


def test_a_read_only_error_while_writing_is_one_line(tmp_path, capsys, monkeypatch):
    """The early check passed, the file system turned read-only later (a remount): still one line."""
    import bench.cli

    monkeypatch.setattr(bench.cli, "check_out_dir", lambda out, probe=True: Path(out))
    _read_only(monkeypatch, tmp_path / "s")
    assert main(["sample", *FAST, "--out", str(tmp_path / "s")]) == 2
    assert "Read-only file system" in _cli_error(capsys)


def test_a_full_disk_while_writing_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import torch

    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "s"
    assert main(["sample", *FAST, "--out", str(out)]) == 1
    line = _cli_error(capsys)
    assert line.startswith("modiff-bench: error: no space left on device while writing ") and "samples.pt" in line
    assert not list(out.glob(".tmp-*")) and not (out / "samples.pt").exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["sample", *FAST, "--out", str(out)]) == 0  # space freed: the rerun works


# -- seeds, devices and options every command checks alike -----------------------------------
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
    assert match in _cli_error(capsys)
    assert not (tmp_path / "o").exists()


def test_unknown_device_fails_at_resolution_also_with_dry_run(tmp_path, capsys, monkeypatch):
    for device, match in (("tpu", "unknown device 'tpu'"), ("mps", "unsupported device 'mps'")):
        assert main(["run", "smoke", "--device", device, "--dry-run", "--out", str(tmp_path / "o")]) == 2
        assert match in _cli_error(capsys)
    if not torch.cuda.is_available():
        assert main(["run", "smoke", "--device", "cuda", "--dry-run", "--out", str(tmp_path / "o")]) == 2
        assert "CUDA is not available" in _cli_error(capsys)
        # jobs submitted to a cluster run on its nodes: only the name is checked here
        assert main(["run", "smoke", "--device", "cuda", "--launcher", "submitit", "--dry-run",
                     "--out", str(tmp_path / "o")]) == 0
    assert main(["run", "smoke", "--device", "cuda:x", "--launcher", "submitit", "--dry-run",
                 "--out", str(tmp_path / "o")]) == 2
    assert "unknown device 'cuda:x'" in _cli_error(capsys)
    # a GPU index this machine does not have (pretending it has one GPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(BenchError, match=r"'cuda:3' requested but this machine has 1 GPU\(s\)"):
        pick_device("cuda:3")


def test_models_checkpoint_without_check(capsys, tmp_path):
    assert main(["models", "--checkpoint", str(tmp_path)]) == 2
    assert "--checkpoint needs --check NAME" in _cli_error(capsys)


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
    assert main(["sample", *FAST, "--out", str(ro / "s")]) == 2
    assert "Read-only file system" in _cli_error(capsys)


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
    code = main(["sample", *FAST, "--out", str(out)])
    line = _cli_error(capsys)
    assert code == 1 and line.startswith("modiff-bench: error: no space left on device"), line
    assert not list(mnt.rglob(".tmp-*"))
    filler.unlink()
    assert main(["sample", *FAST, "--out", str(out)]) == 0
    assert (out / "samples.pt").is_file()
