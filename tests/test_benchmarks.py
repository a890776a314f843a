"""The scripts in ``benchmarks/``, end to end on the digits model: ``execution.py`` (speed and memory of
int8, fp8 and fake execution against FP32 and BF16), ``deepcache_speedup.py``, ``psnr_table.py`` (its layout too) and
``gpu_check.py`` (the prepared GPU check, at CPU size), and their one-line errors for bad settings."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_psnr_table_layout():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import psnr_table
    finally:
        sys.path.pop(0)
    rows = [{"granularity": g, "a_bits": b, "modulation": m, "psnr_to_fp_db": float(b + i)}
            for g in ("tensor", "channel") for b in (8, 3) for i, m in enumerate(("off", "plain", "ec"))]
    wide = psnr_table.pivot(pd.DataFrame(rows))
    assert list(wide.columns) == ["granularity", "A bits", "off (PTQ)", "plain modulation", "ec (MoDiff)"]
    assert wide[["granularity", "A bits"]].values.tolist() == [["channel", 8], ["channel", 3], ["tensor", 8],
                                                                ["tensor", 3]]
    assert wide.iloc[1].tolist()[2:] == [3.0, 4.0, 5.0]


def test_execution_benchmark_end_to_end(tmp_path):
    out = tmp_path / "execution.json"
    configs = ["fp32", "fp32-cl", "bf16-cl", "fake-modiff", "int8-ptq-w8a8-sample", "int8-modiff-w8a4-sample"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "execution.py"), "--models", "digits", "--batch", "4",
         "--steps-digits", "3", "--rounds", "1", "--configs", *configs, "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {f"digits/{c}" for c in configs}
    fastest_fp32 = min(results["digits/fp32"]["modulated_call"], results["digits/fp32-cl"]["modulated_call"])
    assert max(results["digits/fp32"]["x_fp32"], results["digits/fp32-cl"]["x_fp32"]) == 1.0
    assert results["digits/bf16-cl"]["x_bf16"] == 1.0
    for r in results.values():  # every ratio is against the baselines of the same run
        assert r["x_fp32"] == pytest.approx(fastest_fp32 / r["modulated_call"])
        assert r["modulated_min"] <= r["modulated_call"] <= r["modulated_max"] and r["warmup_call"] > 0
    assert results["digits/fp32"]["state_bytes"] == results["digits/int8-ptq-w8a8-sample"]["state_bytes"] == 0
    assert results["digits/int8-modiff-w8a4-sample"]["state_bytes"] > 0  # read after a full trajectory
    assert "| digits | int8-modiff-w8a4-sample |" in done.stdout and "CPU flags" in done.stdout


def test_deepcache_benchmark_end_to_end(tmp_path):
    out = tmp_path / "deepcache.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "deepcache_speedup.py"), "--models", "digits", "--batch-digits",
         "4", "--steps-digits", "10", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    assert [len(results[f"digits/u{n}"]["full_steps"]) for n in (2, 3, 5, 10)] == [5, 4, 2, 1]
    macs = [results[f"digits/u{n}"]["macs_per_step_g"] for n in (2, 3, 5, 10)]
    assert macs == sorted(macs, reverse=True) and all(r["speedup"] > 0 for r in results.values())
    assert "| 10 |" in done.stdout


@pytest.mark.parametrize("script,args", [
    ("psnr_table.py", ["--a-bits", "1"]), ("psnr_table.py", ["--granularity", "pixel"]),
    ("execution.py", ["--models", "digits", "--configs", "int9"]),
    ("execution.py", ["--models", "digits", "--batch", "0"]),
    ("deepcache_speedup.py", ["--models", "digits", "--steps-digits", "0"]),
    ("gpu_check.py", ["--device", "tpu"]), ("gpu_check.py", ["--device", "cpu", "--wheels", "no-such-dir"]),
    ("gpu_check.py", ["--device", "cpu", "--work", "benchmarks"]),  # not empty: a work directory is the check's own
])
def test_benchmarks_reject_bad_settings_in_one_line(script, args, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "error:" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


def test_psnr_table_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "psnr_table.py"), "--a-bits", "32", "3",
                           "--granularity", "channel", "--w-bits", "32", "--steps", "4", "--n", "4",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(tmp_path / "psnr_table.csv")
    assert len(table) == 2 * 3
    exact = table[table.a_bits == 32].set_index("modulation").psnr_to_fp_db
    assert exact["off"] == math.inf or exact["off"] > 100  # W32A32 off is the full-precision model itself
    assert (exact > 80).all()  # plain / ec at 32 bits: float rounding only
    assert json.loads((tmp_path / "psnr_table.json").read_text())["settings"]["steps"] == 4


# -- benchmarks/gpu_check.py: the prepared GPU check, proven on the CPU ------------------------------------------------

def _gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import execution
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check, execution


def test_gpu_check_runs_every_check_on_the_cpu(tmp_path):
    """The whole check at CPU size (what CI can prove before a GPU is lent): every check gives its rows, none FAIL,
    every skip says why; float16 cells run wherever the harness takes float16."""
    from modiff.config import COMPUTE_DTYPES

    gpu_check, _ = _gpu_check()
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out), "--work", str(work)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    rows = {r["check"]: r for r in report["rows"]}
    assert len(rows) == len(report["rows"])  # one row per check name
    assert {r["check"].split()[0] for r in report["rows"]} == set(gpu_check.CHECKS)
    for r in report["rows"]:
        assert r["result"] in ("ok", "skip"), r
        assert r["result"] == "ok" or r["reason"], r
    assert report["machine"]["torch"] and report["machine"]["packages"]["diffusers"]

    float16 = "float16" in COMPUTE_DTYPES
    for name in gpu_check.EAGER:  # every eager configuration ran, with its throughput and ratios
        row = rows[f"execution digits {name}"]
        if name == "fp16-cl" and not float16:
            assert row["result"] == "skip" and "float16" in row["reason"]
            continue
        assert row["result"] == "ok" and "img/s" in row["numbers"] and "x FP32" in row["numbers"], row
    compiled = [rows[f"execution-compiled digits {name}"] for name in gpu_check.COMPILED]
    assert [r["result"] for r in compiled].count("ok") == len(gpu_check.QUICK_COMPILED)
    assert all("--quick" in r["reason"] for r in compiled if r["result"] == "skip")

    dtypes = ["float16", "bfloat16"] if float16 else ["bfloat16"]
    cells = [f"matrix fp fake {d}" for d in ["float32", *dtypes]] + [
        f"matrix {m} {e} {d}" for m in ("ltq", "ltq+ec") for e in ("fake", "int8", "fp8") for d in dtypes]
    assert all(rows[c]["result"] == "ok" for c in cells)
    assert rows["matrix"]["numbers"].startswith(f"{len(cells)} of {len(cells)} cells done")
    for d in dtypes:  # the real int8 cells against their fake twins on the same grid
        assert "vs fake: max |diff|" in rows[f"matrix ltq+ec int8 {d}"]["numbers"]
    assert "device-hours" in rows["estimate"]["numbers"] and "ddpm-cifar10-random" in rows["estimate"]["numbers"]
    assert rows["cuda-tests"]["result"] == ("ok" if torch_cuda() else "skip")

    table = (out / "gpu_check.md").read_text()
    assert "| check | what ran | result | numbers | s |" in table and "0 FAIL" in table
    assert all(f"| {name} |" in table for name in rows)
    assert {p.name for p in out.iterdir()} == {"gpu_check.md", "gpu_check.json", "gpu_check.log", "execution.json",
                                               "execution-compiled.json", "matrix-results.csv", "matrix-report.md"}
    assert "==== matrix:" in (out / "gpu_check.log").read_text()
    assert (work / "matrix" / "report.html").is_file()  # --work is kept


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_gpu_check_isolates_a_failing_check_and_kills_one_out_of_time(tmp_path, monkeypatch):
    """One check that raises is a FAIL row and the next still runs; a command past its limit is killed with its
    children and reported as such, in about the limit's time; a check's commands share its limit."""
    gpu_check, _ = _gpu_check()
    written = []

    def broken():
        raise RuntimeError("kernel exploded\nsecond line")

    rows = gpu_check.run_checks([("setup", broken), ("report", lambda: [gpu_check.Row("report", "x")])],
                                lambda r: written.append(len(r)))
    assert [(r.check, r.result) for r in rows] == [("setup", "FAIL"), ("report", "ok")]
    assert rows[0].reason == "RuntimeError: kernel exploded" and written == [1, 2]

    ctx = gpu_check.Context("cpu", gpu_check.QUICK_SIZES, tmp_path, tmp_path, dict(os.environ))
    sleeper = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
               "'import time; time.sleep(60)']); print(child.pid, flush=True); time.sleep(60)")
    start = time.monotonic()
    call = ctx.call("setup", [sys.executable, "-c", sleeper], limit=3)
    assert call.timed_out and not call.ok and "time limit of 3 s" in call.why()
    assert time.monotonic() - start < 20
    grandchild = int(call.output.split()[0])
    for _ in range(50):  # reparented to init and reaped once killed
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the check's grandchild outlived its time limit")
    assert "killed at the time limit" in (tmp_path / "gpu_check.log").read_text()

    monkeypatch.setitem(gpu_check.LIMITS_S, "report", 5 / ctx.sizes.limit_scale)  # 5 s for the whole check
    assert ctx.call("report", [sys.executable, "-c", "import time; time.sleep(2)"]).ok
    second = ctx.call("report", [sys.executable, "-c", "import time; time.sleep(30)"])
    assert second.timed_out and second.limit <= 3.01 and second.seconds < 10


def test_gpu_check_configurations_and_matrix_at_gpu_size(tmp_path):
    """What the GPU run would run exists: its execution configurations (the new FP16 / fp8 PTQ ones with their
    meaning), the CPU default leaving out emulated FP16 and fp8, and its matrix file at GPU size."""
    import torch

    from bench.matrix import load_matrix
    from modiff.config import COMPUTE_DTYPES

    gpu_check, execution = _gpu_check()
    assert sum(gpu_check.LIMITS_S.values()) <= 290  # under 5 minutes on the GPU, with the script's own seconds
    assert set(gpu_check.EAGER + gpu_check.COMPILED + gpu_check.BASELINES) <= set(execution.CONFIGS)
    assert execution.CONFIGS["fp16-cl"] == {"memory_format": "channels_last", "dtype": "float16"}
    assert (execution.CONFIGS["fp8-ptq"]["execution"], execution.CONFIGS["fp8-ptq"]["modulation"]) == ("fp8", "off")
    assert execution.CONFIGS["fp8-ptq-compiled"]["params"]["dynamic"]["compile"] is True
    cpu = execution.default_configs(torch.device("cpu"), "avx512_bf16")
    cuda = execution.default_configs(torch.device("cuda"), "")
    assert not {"fp16-cl", "fp8-ptq", "fp8-modiff"} & set(cpu) and {"fp16-cl", "fp8-ptq", "fp8-modiff"} <= set(cuda)
    assert "bf16-autocast-cl" in cpu and "fake-modiff" in cpu  # the existing CPU default is unchanged

    dtypes = [d for d in ("float16", "bfloat16") if d in COMPUTE_DTYPES]
    path = tmp_path / "gpu-check-matrix.toml"
    path.write_text(gpu_check.matrix_toml(gpu_check.GPU_SIZES, dtypes))
    matrix = load_matrix(str(path))
    assert len(matrix.cells) == 1 + len(dtypes) + 6 * len(dtypes) and not matrix.skipped
    assert {(c.n_samples, c.batch_size, c.steps) for c in matrix.cells} == {(256, 256, 10)}
    assert {c.execution for c in matrix.cells} == {"fake", "int8", "fp8"}


def test_gpu_check_carries_the_tested_versions_in_an_ignored_directory():
    gpu_check, _ = _gpu_check()
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    assert gpu_check.carried_requirements() == [
        f"diffusers=={pins['diffusers']}", f"pytorch-fid=={pins['pytorch-fid']}",
        f"torch-fidelity=={pins['torch_fidelity']}"]
    ignored = subprocess.run(["git", "check-ignore", "-q", ".gpu-wheels/diffusers-0-py3-none-any.whl"], cwd=ROOT)
    assert ignored.returncode == 0  # never committed; they travel only where a device call carries them


@pytest.mark.skipif(torch_cuda(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_without_cuda_says_so_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "CUDA is not available" in done.stderr and "--device cpu --quick" in done.stderr
    assert not (tmp_path / "o").exists()
