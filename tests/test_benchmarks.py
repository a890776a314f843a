"""The scripts in ``benchmarks/``, end to end on the digits model: ``execution.py`` (speed and memory of
int8, fp8 and fake execution against FP32 and BF16), ``deepcache_speedup.py`` and ``psnr_table.py`` (its layout too),
and their one-line errors for bad settings."""

import json
import math
import subprocess
import sys
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
