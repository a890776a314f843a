"""Issue #25, item 6: user mistakes that ran on, or ended in the wrong exit status. Each is one line and
exit status 2 when the matrix is resolved (``--dry-run`` too), a warning where the mistake may be
deliberate, or a distinct exit status; each test failed on the code before the fix."""

import argparse
import fcntl
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.errors import BenchError
from bench.matrix import cell_id, load_matrix, presets
from bench.methods import BaseQuantizer, register_method
from bench.runner import pick_device

FAST = '[run]\nsteps = 2\nn_samples = 2\nbatch_size = 2\nmetrics = ["psnr_to_fp"]\n'


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("modiff-bench: error:"), err[0]
    return err[0]


def _rejected_pickle(path):
    """A file ``torch.load(weights_only=True)`` refuses: torch's message carries bold on/off escape codes."""
    torch.save({"config": argparse.Namespace(lr=1e-3)}, path)
    return path


# -- n_samples that no cell can hold -----------------------------------------------------------
def test_absurd_n_samples_is_refused_at_resolution_with_the_bound(tmp_path, capsys):
    """10**12 samples ended in a bare MemoryError in every cell."""
    for extra in (["--dry-run"], []):
        assert main(["run", "smoke", "--out", str(tmp_path / "o"), "--set", "run.n_samples=1000000000000",
                     *extra]) == 2
        line = _error_line(capsys)
        assert "run.n_samples = 1000000000000" in line and "the limit is 1 TiB" in line and "digits" in line
    assert not (tmp_path / "o").exists()
    # a large but sane count still resolves (50,000 of the largest zoo images pass the bound)
    assert main(["run", "smoke", "--out", str(tmp_path / "o"), "--set", "run.n_samples=100000", "--dry-run"]) == 0
    load_matrix("cifar10-quick", ["run.n_samples=50000"])


# -- devices -----------------------------------------------------------------------------------
def test_unknown_device_fails_at_resolution_also_with_dry_run(tmp_path, capsys, monkeypatch):
    for device, match in (("tpu", "unknown device 'tpu'"), ("mps", "unsupported device 'mps'")):
        assert main(["run", "smoke", "--device", device, "--dry-run", "--out", str(tmp_path / "o")]) == 2
        assert match in _error_line(capsys)
    if not torch.cuda.is_available():
        assert main(["run", "smoke", "--device", "cuda", "--dry-run", "--out", str(tmp_path / "o")]) == 2
        assert "CUDA is not available" in _error_line(capsys)
        # jobs submitted to a cluster run on its nodes: only the name is checked here
        assert main(["run", "smoke", "--device", "cuda", "--launcher", "submitit", "--dry-run",
                     "--out", str(tmp_path / "o")]) == 0
    assert main(["run", "smoke", "--device", "cuda:x", "--launcher", "submitit", "--dry-run",
                 "--out", str(tmp_path / "o")]) == 2
    assert "unknown device 'cuda:x'" in _error_line(capsys)
    # a GPU index this machine does not have (pretending it has one GPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(BenchError, match=r"'cuda:3' requested but this machine has 1 GPU\(s\)"):
        pick_device("cuda:3")


# -- files a method's parameters name ----------------------------------------------------------
def _paper_lcq(tmp_path, cali_ckpt: str):
    path = tmp_path / "m.toml"
    path.write_text('[run]\nmodel = "ddpm-cifar10"\nsteps = 2\nn_samples = 2\nbatch_size = 2\n'
                    '[matrix]\nbase = ["paper-lcq"]\nw_bits = [4]\na_bits = [8]\n'
                    f'[params.paper-lcq]\ncali_ckpt = "{cali_ckpt}"\n')
    return path


def test_missing_cali_ckpt_stops_the_command_before_anything_runs(tmp_path, capsys, monkeypatch):
    """A missing authors' checkpoint failed the cell, after the full-precision reference was sampled."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.pth").mkdir()
    for name, match in (("cifar_w4a8_ckpt.pth", "cifar_w4a8_ckpt.pth does not exist"),
                        ("folder.pth", "folder.pth is not a file")):
        assert main(["run", str(_paper_lcq(tmp_path, name)), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
        line = _error_line(capsys)
        assert "params.paper-lcq.cali_ckpt" in line and match in line, line
        assert "current directory" in line  # where a relative path was looked for
    (tmp_path / "cifar_w4a8_ckpt.pth").write_bytes(b"")  # present: what it holds is checked when it is read
    assert main(["run", str(_paper_lcq(tmp_path, "cifar_w4a8_ckpt.pth")), "--out", str(tmp_path / "o"),
                 "--dry-run"]) == 0


# -- --out at a directory that is not a run directory ------------------------------------------
def test_out_at_a_directory_of_other_files_is_refused_unless_force(tmp_path, capsys):
    """It was adopted as a run directory, and its results.csv overwritten."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.csv").write_text("my,own\n1,2\n")
    for extra in (["--dry-run"], ["--estimate"], []):
        assert main(["run", "smoke", "--out", str(mine), "--no-progress", *extra]) == 2
        line = _error_line(capsys)
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
    line = _error_line(capsys)
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


# -- an empty matrix file ----------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "# nothing declared yet\n\n"])
def test_an_empty_matrix_file_is_refused(tmp_path, capsys, text):
    """It ran a default cell (digits, lcq W8A8) nobody declared."""
    path = tmp_path / "m.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "is empty" in _error_line(capsys)


# -- [params.X] for a method the matrix does not run -------------------------------------------
def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("modiff-bench: warning:")]


def test_params_of_a_method_the_matrix_does_not_run(tmp_path, capsys):
    """A [params.X] block for a method no cell runs was accepted without a word; a typo is an error."""
    out = ["--out", str(tmp_path / "o"), "--dry-run"]
    assert main(["run", "smoke", *out, "--set", "params.qdiff.cali_n=4"]) == 0
    warnings = _warnings(capsys)
    assert len(warnings) == 1 and "[params.qdiff] is not used" in warnings[0], warnings
    assert main(["run", "smoke", *out, "--set", "matrix.params.deepcache.center=2"]) == 0
    warnings = _warnings(capsys)
    assert len(warnings) == 1 and "matrix.params.deepcache is not used" in warnings[0], warnings

    # carried by a method built on it: PTQD's base, paper-lcq's Q-Diffusion weights
    for base in ("ptqd", "paper-lcq"):
        assert main(["run", "smoke", *out, "--set", "params.qdiff.cali_st=4", "--set", f"matrix.base=['{base}']",
                     "--set", "matrix.modulation=['off']"]) == 0
        assert _warnings(capsys) == [], base
    assert main(["run", "smoke", *out, "--set", "params.qdif.cali_n=4"]) == 2
    assert "unknown method (did you mean 'qdiff'?)" in _error_line(capsys)


def test_no_shipped_preset_warns():
    for name in presets():
        assert load_matrix(name).warnings == [], name
