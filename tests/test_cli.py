import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.zoo.checkpoints import write_manifest
from bench.zoo.digits import ASSET_DIR

FAST = ["--n", "4", "--steps", "3", "--no-progress"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


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
    for command in ("sample", "quality", "train-tiny", "models", "run", "presets", "methods", "report"):
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
