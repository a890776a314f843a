"""The scripts in ``benchmarks/``, end to end on the digits model: ``execution.py`` (speed and memory of
int8, fp8 and fake execution against FP32 and BF16), ``deepcache_speedup.py``, ``psnr_table.py`` (its layout too) and
``gpu_check.py`` (the prepared GPU check, at CPU size), ``kernel_ceiling.py``, and their one-line errors for bad
settings."""

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


def _last_table(stdout: str) -> list[dict[str, str]]:
    """The last Markdown table printed, as one dict per row (column header -> cell)."""
    lines = stdout.splitlines()
    starts = [i for i in range(len(lines) - 1) if lines[i].startswith("| ") and lines[i + 1].startswith("| ---")]
    assert starts, stdout[-2000:]
    head = [c.strip() for c in lines[starts[-1]].strip().strip("|").split("|")]
    rows = []
    for line in lines[starts[-1] + 2:]:
        if not line.startswith("| "):
            break
        rows.append(dict(zip(head, [c.strip() for c in line.strip().strip("|").split("|")], strict=True)))
    return rows


def test_execution_benchmark_end_to_end(tmp_path):
    out = tmp_path / "execution.json"
    configs = ["fp32", "fp32-cl", "bf16-cl", "fake-modiff", "int8-ptq-w8a8-sample", "int8-modiff-w8a4-sample",
               "int8-modiff-w8a8-sample"]
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

    # the allocator it set up at start-up (--allocator tuned, the default) is in the header and in every result
    from bench.provenance import cpu_flags
    from modiff.allocator import allocator_settings

    report = json.loads(out.read_text())
    glibc = allocator_settings()["allocator"] == "glibc"
    for r in results.values():
        assert r["allocator"] == "tuned" and r["allocator_settings"]["choice"] == "tuned"
        assert r["allocator_settings"]["allocator"] == report["allocator"]["allocator"]
        assert bool(r["allocator_settings"]["mallopt"]) == glibc  # tune_allocator's settings, where glibc's
        assert r["environment"]["cpu_flags"] == cpu_flags()  # the table holds for this CPU
    assert report["cpu_flags"] == cpu_flags() and report["timing_environment"]["cpu_flags"] == cpu_flags()
    assert "; allocator: tuned (" in done.stdout.split("\n| model |")[0]

    # mod. overhead: MoDiff's modulated call over its PTQ twin's of the same run; none where the twin did not run
    modiff_a8, ptq_a8 = results["digits/int8-modiff-w8a8-sample"], results["digits/int8-ptq-w8a8-sample"]
    assert modiff_a8["mod_overhead_vs"] == "int8-ptq-w8a8-sample"
    assert modiff_a8["mod_overhead"] == pytest.approx(modiff_a8["modulated_call"] / ptq_a8["modulated_call"])
    for name in ("int8-modiff-w8a4-sample", "fake-modiff", "int8-ptq-w8a8-sample", "fp32"):
        assert results[f"digits/{name}"]["mod_overhead"] is None, name
    # kernel %: the int8 kernels' share of one profiled modulated call; none without real low-bit execution
    for name in ("int8-ptq-w8a8-sample", "int8-modiff-w8a4-sample", "int8-modiff-w8a8-sample"):
        r = results[f"digits/{name}"]
        assert 0 < r["kernel_pct"] <= 100 and r["kernel_basis"] == "self CPU time", (name, r["kernel_pct"])
        ops = r["top_ops"]
        assert 1 <= len(ops) <= 6 and [o["self_ms"] for o in ops] == sorted((o["self_ms"] for o in ops), reverse=True)
        assert any("qconv2d_pointwise" in o["op"] for o in ops)  # the convolutions lead on the int8 path
    for name in ("fp32", "fp32-cl", "bf16-cl", "fake-modiff"):
        assert results[f"digits/{name}"]["kernel_pct"] is None and results[f"digits/{name}"]["top_ops"] is None
    table = {row["config"]: row for row in _last_table(done.stdout)}
    assert set(table) == set(configs)
    assert table["fp32"]["kernel %"] == "—" and table["fp32"]["mod. overhead"] == "—"
    assert 0 <= int(table["int8-modiff-w8a8-sample"]["kernel %"]) <= 100
    assert float(table["int8-modiff-w8a8-sample"]["mod. overhead"]) == pytest.approx(modiff_a8["mod_overhead"],
                                                                                     abs=0.006)
    assert table["int8-modiff-w8a4-sample"]["mod. overhead"] == "—"


def test_execution_benchmark_merges_one_child_per_allocator(tmp_path):
    """--allocators: one child process per allocator (each sets up its own), their rows in one table with an
    allocator column, every ratio against the baselines of its own process; tcmalloc runs under LD_PRELOAD where
    the library is installed, else is skipped, saying why."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _common import tcmalloc_library
    finally:
        sys.path.pop(0)
    from modiff.allocator import allocator_settings

    out = tmp_path / "merged.json"
    configs = ["fp32", "int8-ptq-w8a8-sample", "int8-modiff-w8a8-sample"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "execution.py"), "--models", "digits", "--batch", "2",
         "--steps-digits", "3", "--rounds", "1", "--configs", *configs, "--allocators", "tuned", "default",
         "tcmalloc", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    allocators = ["tuned", "default"] + (["tcmalloc"] if tcmalloc_library() else [])
    results = report["results"]
    assert set(results) == {f"{a}/digits/{c}" for a in allocators for c in configs}
    assert list(report["children"]) == allocators
    pids = {line.split()[3] for line in done.stdout.splitlines() if line.startswith("[allocator ")
            and " pid " in line}
    assert len(pids) == len(allocators)  # one process each
    for a in allocators:
        rows = {c: results[f"{a}/digits/{c}"] for c in configs}
        assert all(r["allocator"] == a and r["allocator_settings"]["choice"] == a for r in rows.values())
        for r in rows.values():  # ratios within the allocator's own process
            assert r["x_fp32"] == pytest.approx(rows["fp32"]["modulated_call"] / r["modulated_call"])
        assert rows["int8-modiff-w8a8-sample"]["mod_overhead"] == pytest.approx(
            rows["int8-modiff-w8a8-sample"]["modulated_call"] / rows["int8-ptq-w8a8-sample"]["modulated_call"])
        assert 0 < rows["int8-ptq-w8a8-sample"]["kernel_pct"] <= 100 and rows["fp32"]["kernel_pct"] is None
    if allocator_settings()["allocator"] == "glibc":  # tuned in one process, as it comes in the other
        assert results["tuned/digits/fp32"]["allocator_settings"]["mallopt"]
        assert results["default/digits/int8-modiff-w8a8-sample"]["allocator_settings"]["mallopt"] == {}
    if "tcmalloc" in allocators:
        assert "tcmalloc" in results["tcmalloc/digits/fp32"]["allocator_settings"]["allocator"]
    else:
        assert "none of" in report["skipped"]["tcmalloc"] and "[allocator tcmalloc] skipped: none of" in done.stdout
    table = _last_table(done.stdout)
    assert [(r["allocator"], r["config"]) for r in table] == [(a, c) for a in allocators for c in configs]
    assert {r["kernel %"] for r in table if r["config"] == "fp32"} == {"—"}
    assert "its own process" in done.stdout and "own FP32 / BF16 baselines" in done.stdout


def test_execution_allocators_kill_the_running_child_when_interrupted(tmp_path):
    """Interrupted (SIGTERM here, Ctrl-C alike) while a child runs: the child is killed, nothing is written."""
    import signal

    out = tmp_path / "x.json"
    parent = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "execution.py"), "--models", "digits", "--batch", "2",
         "--steps-digits", "200", "--rounds", "50", "--configs", "fp32", "--allocators", "tuned", "default",
         "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    child = None
    try:
        for line in parent.stdout:
            if line.startswith("[allocator tuned] pid "):
                child = int(line.split()[3].rstrip(":"))
                break
        assert child is not None
        parent.send_signal(signal.SIGTERM)
        _, err = parent.communicate(timeout=120)
        assert parent.returncode == 130 and "interrupted" in err, err[-2000:]
        with pytest.raises(ProcessLookupError):  # killed, and reaped by the parent
            os.kill(child, 0)
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not out.exists()


def test_execution_configurations_compiled_baselines_and_twins(tmp_path):
    """The compiled full-precision baselines are the harness's fp cell with params.fp.compile (compiled on their
    first call), in the CPU default where BF16 is native; every MoDiff row's PTQ twin differs only by modulation."""
    import torch

    from bench.zoo import load_model

    _, execution = _gpu_check()
    model = load_model("digits")
    for name, dtype in (("fp32-cl-compiled", torch.float32), ("bf16-cl-compiled", torch.bfloat16),
                        ("bf16-autocast-cl-compiled", torch.float32)):
        timed = execution._build(model, name, 3, 2, torch.device("cpu"))
        assert timed.prepared.info == {"compiled": True} and next(timed.unet.parameters()).dtype == dtype, name
        assert timed.autocast == ("autocast" in name)
    native = execution.default_configs(torch.device("cpu"), "avx512_bf16")
    emulated = execution.default_configs(torch.device("cpu"), "avx2")
    assert {"fp32-cl-compiled", "bf16-cl-compiled", "bf16-autocast-cl-compiled"} <= set(native)
    assert "fp32-cl-compiled" in emulated and not set(execution.BF16_EMULATED_SKIPPED) & set(emulated)
    names = list(execution.CONFIGS)
    assert execution.ptq_twin("int8-modiff-w8a8-sample", names) == "int8-ptq-w8a8-sample"
    assert execution.ptq_twin("int8-modiff-w8a8-sample-compiled", names) == "int8-ptq-w8a8-sample-compiled"
    assert execution.ptq_twin("int8-modiff-w8a4-sample-compiled", names) == "int8-ptq-w8a4-sample-compiled"
    assert execution.ptq_twin("int8-modiff-w8a4-sample", names) is None  # no eager W8A4 PTQ configuration
    # fused norms: the fused PTQ, not the unfused one with the same compile setting
    assert execution.ptq_twin("int8-modiff-w8a8-sample-fused", names) == "int8-ptq-w8a8-sample-fused"
    assert execution.ptq_twin("int8-modiff-w8a8-sample-bf16-fused", names) == "int8-ptq-w8a8-sample-bf16-fused"
    assert execution.ptq_twin("fake-modiff", names) == "fake-ptq"
    assert execution.ptq_twin("fp8-modiff", names) == "fp8-ptq"
    assert execution.ptq_twin("int8-ptq-w8a8-sample", names) is None and execution.ptq_twin("fp32", names) is None


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
    ("execution.py", ["--models", "digits", "--allocator", "jemalloc"]),
    ("execution.py", ["--models", "digits", "--allocators", "tuned", "nope"]),
    ("execution.py", ["--models", "digits", "--allocator", "tcmalloc"]),  # not under LD_PRELOAD of it
    ("execution.py", ["--models", "digits", "--allocator", "tuned", "--allocators", "default"]),
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


def test_kernel_ceiling_at_toy_size(tmp_path):
    """benchmarks/kernel_ceiling.py (the kernel-level numbers of docs/performance.md): every measurement in the
    JSON with a positive time, GMAC/s for the three convolutions only, the allocator and CPU flags recorded; the
    quantizing passes read ``â`` in the input's channels-last layout, as the layers keep it (an NCHW ``â`` made
    them 3x slower than in a model: the script's first form did that); the resnet block as one compiled region
    gives the library's output; a bad size is one line and exit status 2."""
    out = tmp_path / "kernel_ceiling.json"
    script = str(ROOT / "benchmarks" / "kernel_ceiling.py")
    done = subprocess.run([sys.executable, script, "--batch", "2", "--channels", "32", "--size", "8", "--reps", "1",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    results = written["results"]
    assert len(results) == 15 and all(r["ms"] > 0 for r in results.values())
    passes = [r for r in results.values() if "operands" in r]
    assert len(passes) == 9 and all(r["operands"] == "channels_last" for r in passes)
    assert results["resnet block as one compiled region (dropped)"]["max_abs_diff"] <= 1e-4
    convs = [name for name, r in results.items() if r["gmacs"] is not None]
    assert convs == [name for name in results if name.startswith("conv3x3")] and len(convs) == 3
    macs = 2 * 32 * 32 * 9 * 8 * 8
    assert all(results[c]["gmacs"] == pytest.approx(macs / results[c]["ms"] / 1e6) for c in convs)
    assert written["allocator"]["allocator"] and written["cpu_flags"] and "CPU flags" in done.stdout
    bad = subprocess.run([sys.executable, script, "--channels", "0", "--out", str(tmp_path / "bad.json")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--channels must be at least 1" in bad.stderr
    assert not (tmp_path / "bad.json").exists()
