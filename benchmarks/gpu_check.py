"""One prepared GPU check: everything of the suite that only a GPU exercises, in one command, one table.

When a GPU machine is lent, its minutes are few (15 in all, the machine's start included), it has its own
Python and torch but no diffusers, no nox and no package registry. This script is what to run there, once:

- ``setup``: installs the wheels carried with the working tree (``--wheels``: diffusers and the project's
  pure-Python dependencies the machine lacks, see ``--prepare``) into a directory of its own, never touching the
  machine's torch; imports the suite with them and records the machine (GPU, capability, driver, CUDA, torch);
- ``cuda-tests``: the CUDA-only tests (``tests/*_cuda.py``; they skip themselves without CUDA);
- ``execution``: ``benchmarks/execution.py`` on the CIFAR-10 DDPM architecture at batch 256, eager: FP32, BF16,
  FP16, int8 and fp8 PTQ, int8 and fp8 MoDiff (W8A8, per-sample scales), one row per configuration with its
  images/s and its ratios to FP32 and BF16; ``execution-compiled``: the quantized ones with torch.compile, run
  last and apart (compilation is the part most likely to run long), with their own FP32 / BF16 baselines;
- ``matrix``: a tiny matrix on digits (fp, ltq, ltq+ec x fake, int8, fp8 x float16, bfloat16, W8A8), one row
  per cell with its PSNR to the float32 reference and, for int8, its distance to the fake cell on the same grid;
  ``report``: its report (``modiff-bench report``);
- ``estimate``: ``modiff-bench run cifar10-paper --estimate`` on the random-weight CIFAR-10 entry (the real
  checkpoint is not on that machine): device-hours of the paper's Table 1 on this GPU.

Each check runs in its own process under its own time limit (``LIMITS_S``: 290 s together, so the whole check
stays under 5 minutes on one H100): one that fails or runs out of time is a FAIL row, and the others still run.
The table (check, what ran, result: ok / FAIL / skip with the reason, key numbers, seconds) is printed and
written, with the machine's facts, to OUT/gpu_check.md and OUT/gpu_check.json after every check (a run killed
from outside still leaves the rows so far); every command's full output goes to OUT/gpu_check.log, and the
execution tables, the matrix's results.csv and report.md are copied beside them. Exit status: 0 when no row is
a FAIL, 1 otherwise, 2 for bad input.

``--device cpu --quick`` runs the same checks at CPU size (digits, batch 2-4, 3 steps, one compiled
configuration, generous limits): CI runs it so that the script is known to work before a GPU is lent.

    python benchmarks/gpu_check.py --prepare                 (here, with the registry: fills .gpu-wheels/)
    python3 benchmarks/gpu_check.py --wheels .gpu-wheels --out $OUT     (on the GPU machine)
    python benchmarks/gpu_check.py --device cpu --quick      (or: nox -s gpu-check -- --device cpu --quick)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the GPU machine has the working tree, not an installed modiff-bench

from _common import run_script  # noqa: E402

from bench.errors import BenchError  # noqa: E402

# What the GPU machine lacks among the suite's dependencies (it has torch, torchvision, numpy, scipy, scikit-learn,
# pandas, pyarrow, matplotlib, jinja2, tabulate, tqdm, pillow, safetensors, huggingface-hub: see
# docs/performance.md#gpu-check), downloaded as pure-Python wheels by --prepare, at constraints.txt's versions.
CARRIED = ("diffusers", "pytorch-fid", "torch-fidelity")
# the oldest Python the wheels must install on: diffusers 0.42 needs 3.11 (the GPU machine has 3.12), and from
# 3.11 on matrix files need no tomli
WHEEL_PYTHON = "3.11"
TRAVEL_LIMIT_MIB = 64  # the working tree that travels to the GPU machine, carried paths included
DEFAULT_WHEELS = ROOT / ".gpu-wheels"

# seconds per check on the GPU (--quick: QUICK_LIMIT_SCALE times as many, for a loaded CPU)
LIMITS_S = {"setup": 25, "cuda-tests": 40, "execution": 60, "matrix": 50, "report": 20, "estimate": 25,
            "execution-compiled": 70}
QUICK_LIMIT_SCALE = 4
CHECKS = tuple(LIMITS_S)

# benchmarks/execution.py configurations: the baselines, then what the issue asked to see on a GPU
BASELINES = ("fp32-cl", "bf16-cl")
EAGER = ("fp32", "fp32-cl", "bf16-autocast-cl", "bf16-cl", "fp16-cl", "int8-ptq-w8a8-sample", "fp8-ptq",
         "int8-modiff-w8a8-sample", "fp8-modiff")
COMPILED = ("int8-ptq-w8a8-sample-compiled", "fp8-ptq-compiled", "int8-modiff-w8a8-sample-compiled",
            "fp8-modiff-compiled")
QUICK_COMPILED = ("int8-modiff-w8a8-sample-compiled",)  # torch.compile takes 10-20 s per configuration on a CPU
FP8_CAPABILITY = (8, 9)  # float8 matmuls (torch._scaled_mm): Ada and Hopper on


@dataclass(frozen=True)
class Sizes:
    """How big each check runs: the GPU sizes, or ``--quick``'s CPU sizes."""

    execution_args: tuple[str, ...]  # benchmarks/execution.py: model, batch, steps, rounds
    matrix_run: dict  # the tiny matrix's [run] table (digits)
    estimate_sets: tuple[str, ...]  # extra --set of the estimate
    compiled: tuple[str, ...]
    limit_scale: int


GPU_SIZES = Sizes(
    # 5 steps: MoDiff's first modulated call allocates its state; the later ones are what a trajectory costs
    execution_args=("--models", "cifar10", "--batch", "256", "--steps-cifar10", "5", "--rounds", "2"),
    matrix_run={"n_samples": 256, "batch_size": 256, "steps": 10},
    estimate_sets=(), compiled=COMPILED, limit_scale=1)
QUICK_SIZES = Sizes(
    execution_args=("--models", "digits", "--batch", "2", "--steps-digits", "3", "--rounds", "1"),
    matrix_run={"n_samples": 4, "batch_size": 4, "steps": 3},
    estimate_sets=("--set", "run.batch_size=2"), compiled=QUICK_COMPILED, limit_scale=QUICK_LIMIT_SCALE)


@dataclass
class Row:
    """One line of the table. ``result``: ``ok``, ``FAIL`` or ``skip``; ``reason`` says why when it is not ok."""

    check: str
    what: str
    result: str = "ok"
    reason: str = ""
    numbers: str = ""
    seconds: float | None = None


@dataclass
class Call:
    """A finished (or killed) child process: exit status, its output (stdout and stderr together), seconds."""

    returncode: int | None
    output: str
    seconds: float
    limit: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.returncode == 0

    def why(self) -> str:
        """One line saying why the call failed: the time limit, or its last line of output."""
        if self.timed_out:
            return f"time limit of {self.limit:.0f} s reached (killed)"
        lines = [line.strip() for line in self.output.splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        return f"exit status {self.returncode}: {last[:200]}"


@dataclass
class Context:
    """What every check shares: settings, directories, the environment of the child processes, the machine."""

    device: str
    sizes: Sizes
    out: Path
    work: Path
    env: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    commands: dict = field(default_factory=dict)  # check -> the command lines it ran
    deadlines: dict = field(default_factory=dict)  # check -> when its time is up (its commands share its limit)

    @property
    def python(self) -> str:
        return sys.executable

    def limit(self, check: str) -> float:
        return LIMITS_S[check] * self.sizes.limit_scale

    def call(self, check: str, command: list[str], limit: float | None = None) -> Call:
        """Run ``command`` in the repository within what is left of the check's time limit (or ``limit``
        seconds), in a process group of its own so that a timeout kills it with its children (compile workers,
        pytest's); log its output."""
        start = time.monotonic()
        if limit is None:
            limit = max(1.0, self.deadlines.setdefault(check, start + self.limit(check)) - start)
        self.commands.setdefault(check, []).append(" ".join(command))
        proc = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended in the meantime
                pass
            output, _ = proc.communicate()
            timed_out = True
        call = Call(proc.returncode, output, time.monotonic() - start, limit, timed_out)
        with open(self.out / "gpu_check.log", "a") as log:
            log.write(f"==== {check}: {' '.join(command)}\n{output}\n==== {check}: "
                      f"{'killed at the time limit' if timed_out else f'exit status {proc.returncode}'} "
                      f"after {call.seconds:.1f} s\n\n")
        return call


# ------------------------------------------------------------------------------------------------------- setup

# run in a fresh interpreter with the carried wheels on its path, as every check runs: the machine, and whether the
# whole suite imports there
_FACTS = r"""
import importlib, json, os, platform, subprocess, sys
from importlib import metadata
import torch
facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(),
         "cpu_cores": os.cpu_count(), "platform": platform.platform(),
         "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}}
device = torch.device(os.environ["GPU_CHECK_DEVICE"])
if device.type == "cuda":
    p = torch.cuda.get_device_properties(device)
    facts.update(gpu=p.name, capability=list(torch.cuda.get_device_capability(device)),
                 gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        facts["driver"] = smi[0] if smi else None
    except (OSError, subprocess.SubprocessError):
        facts["driver"] = None
for module in ("modiff", "bench.cli", "bench.zoo", "baselines", "reports.render", "diffusers", "pytorch_fid",
               "torch_fidelity"):
    importlib.import_module(module)
from modiff.config import COMPUTE_DTYPES
facts["compute_dtypes"] = list(COMPUTE_DTYPES)
carried = os.environ.get("GPU_CHECK_SITE")
versions = {}
for name in ("diffusers", "pytorch-fid", "torch-fidelity", "numpy", "scipy", "scikit-learn", "pandas", "pyarrow",
             "matplotlib", "jinja2", "tabulate", "tqdm", "pillow", "safetensors", "huggingface-hub", "pytest"):
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        versions[name] = None
        continue
    where = str(dist.locate_file(""))
    versions[name] = dist.version + (" (carried)" if carried and where.startswith(carried) else "")
facts["packages"] = versions
print("FACTS " + json.dumps(facts))
"""


def check_setup(ctx: Context, wheels: Path | None) -> list[Row]:
    rows = []
    if wheels is not None:
        site = ctx.work / "site"
        found = sorted(wheels.glob("*.whl"))
        call = ctx.call("setup", [ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                  "--no-cache-dir", "--disable-pip-version-check", "--target", str(site),
                                  *map(str, found)])
        names = ", ".join(w.name.split("-")[0] + " " + w.name.split("-")[1] for w in found)
        if not call.ok:
            return [Row("setup", f"pip install --no-index --target {site} ({names})", "FAIL", call.why(),
                        seconds=call.seconds)]
        ctx.env["PYTHONPATH"] = os.pathsep.join([str(site), ctx.env["PYTHONPATH"]])
        ctx.env["GPU_CHECK_SITE"] = str(site)
        rows.append(Row("setup", f"carried wheels installed to a directory of their own: {names}",
                        seconds=call.seconds))
    call = ctx.call("setup", [ctx.python, "-c", _FACTS])
    line = next((x for x in call.output.splitlines() if x.startswith("FACTS ")), None)
    if not call.ok or line is None:
        rows.append(Row("setup", "import the suite (modiff, bench, baselines, reports, diffusers, metrics) and "
                        "record the machine", "FAIL", call.why() if not call.ok else "no facts printed",
                        seconds=call.seconds))
        return rows
    ctx.facts.update(json.loads(line[len("FACTS "):]))
    packages = ctx.facts["packages"]
    missing = sorted(name for name, version in packages.items() if version is None and name != "pytest")
    rows.append(Row("setup", "import the suite (modiff, bench, baselines, reports, diffusers, metrics) and record the "
                    "machine", "FAIL" if missing else "ok", f"not installed: {', '.join(missing)}" if missing else "",
                    ", ".join(f"{k} {packages[k]}" for k in ("diffusers", "numpy", "pandas")), call.seconds))
    return rows


# --------------------------------------------------------------------------------------------------- CUDA tests

def check_cuda_tests(ctx: Context) -> list[Row]:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*_cuda.py"))
    what = "pytest " + " ".join(files)
    if not files:
        return [Row("cuda-tests", "pytest tests/test_*_cuda.py", "skip", "no CUDA-only test files")]
    junit = ctx.work / "cuda-tests.xml"
    call = ctx.call("cuda-tests", [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                                   f"--junitxml={junit}", *files])
    if call.timed_out or not junit.is_file() or call.returncode not in (0, 1, 5):  # 1: failures, 5: none collected
        return [Row("cuda-tests", what, "FAIL", call.why(), seconds=call.seconds)]
    counts, failed, skips = _junit(junit)
    numbers = f"{counts['passed']} passed, {counts['skipped']} skipped, {counts['failed']} failed"
    if counts["failed"] or call.returncode == 1:
        first = f": first {failed[0]}" if failed else ""
        return [Row("cuda-tests", what, "FAIL", f"{counts['failed']} failed{first}", numbers, call.seconds)]
    if counts["passed"] == 0:
        reason = "; ".join(sorted(skips)) or "no tests collected"
        return [Row("cuda-tests", what, "skip", reason, numbers, call.seconds)]
    return [Row("cuda-tests", what, "ok", "", numbers, call.seconds)]


def _junit(path: Path) -> tuple[dict, list[str], set[str]]:
    """Counts (passed, skipped, failed: failures and errors), the failed tests' names and the skip reasons."""
    counts, failed, skips = {"passed": 0, "skipped": 0, "failed": 0}, [], set()
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            skips.add(outcome.get("message", "").removeprefix("Skipped: "))
        else:
            counts["failed"] += 1
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return counts, failed, skips


# ------------------------------------------------------------------------------------------- execution benchmark

def _unrunnable(ctx: Context, name: str) -> str | None:
    """Why configuration ``name`` cannot run on this machine (fp8 below compute capability 8.9, float16 where the
    checkout's harness does not take it yet), else None."""
    capability = ctx.facts.get("capability")  # unknown when the setup check failed: then let it try
    if name.startswith("fp8") and ctx.device.startswith("cuda") and capability:
        if tuple(capability) < FP8_CAPABILITY:
            return (f"float8 matmuls need compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} "
                    f"(this GPU: {'.'.join(map(str, capability))})")
    if name.startswith("fp16") and "float16" not in ctx.facts.get("compute_dtypes", ("float16",)):
        return "this checkout's harness does not take dtype float16 (modiff.config.COMPUTE_DTYPES)"
    return None


def check_execution(ctx: Context, check: str, configs: tuple[str, ...], skipped: dict[str, str]) -> list[Row]:
    """``benchmarks/execution.py`` over ``configs`` but those in ``skipped`` (name -> why) or that this machine cannot
    run, with the FP32 and BF16 baselines (the ratios are against the baselines of the same run); one row per
    configuration, in order."""
    args = ctx.sizes.execution_args
    models = args[args.index("--models") + 1]
    what = f"benchmarks/execution.py --device {ctx.device} {' '.join(args)}"
    why_not = {name: skipped.get(name) or _unrunnable(ctx, name) for name in configs}
    runnable = [name for name in configs if why_not[name] is None]
    rows = {name: Row(f"{check} {models} {name}", what, "skip", why) for name, why in why_not.items() if why}
    if runnable:
        out = ctx.work / f"{check}.json"
        call = ctx.call(check, [ctx.python, "benchmarks/execution.py", "--device", ctx.device, *args, "--configs",
                                *[b for b in BASELINES if b not in runnable], *runnable, "--out", str(out)])
        results = json.loads(out.read_text())["results"] if call.ok and out.is_file() else None
        if results is not None:
            shutil.copyfile(out, ctx.out / f"{check}.json")
        for name in runnable:
            if results is None:
                rows[name] = Row(f"{check} {models} {name}", what, "FAIL", call.why(), seconds=call.seconds)
                continue
            r = results[f"{models}/{name}"]
            rows[name] = Row(f"{check} {models} {name}", what, "ok", "",
                             f"{r['images_per_s']:,.0f} img/s ({r['modulated_call'] * 1e3:.1f} ms/call); "
                             f"x FP32 {_ratio(r['x_fp32'])}, x BF16 {_ratio(r['x_bf16'])}"
                             + (f"; compile {r['compile_s']:.0f} s" if name.endswith("-compiled") else ""),
                             call.seconds)
    return [rows[name] for name in configs]


def _ratio(value) -> str:
    return f"{value:.2f}" if value is not None else "-"


# ------------------------------------------------------------------------------------------------------- matrix

def matrix_toml(sizes: Sizes, dtypes: list[str]) -> str:
    """The tiny matrix: digits, full precision (float32 too: the wall-clock ratios' FP32 baseline) and LTQ without
    and with MoDiff (W8A8: fp8's only width) on fake, int8 and fp8 layers, in ``dtypes``. Symmetric activation and
    weight grids on every cell, so that each int8 cell has a fake twin on its own grid."""
    run = sizes.matrix_run
    return "\n".join([
        "# written by benchmarks/gpu_check.py",
        "[run]",
        'description = "GPU check: fp, ltq, ltq+ec x fake, int8, fp8 x half precisions, digits W8A8"',
        'model = "digits"', 'sampler = "ddim-quad"', f"steps = {run['steps']}", "eta = 0.0",
        f"n_samples = {run['n_samples']}", "seed = 0", f"batch_size = {run['batch_size']}",
        'metrics = ["psnr_to_fp", "mse_to_fp", "fd_domain", "is_domain"]', "",
        "[[matrix]]", 'base = ["fp"]', f"dtype = {json.dumps(['float32', *dtypes])}", "",
        "[[matrix]]", 'base = ["ltq"]', "w_bits = [8]", "a_bits = [8]", 'modulation = ["off", "ec"]',
        'execution = ["fake", "int8", "fp8"]', f"dtype = {json.dumps(dtypes)}", "",
        "[params.ltq]", "symmetric = true", "weight_symmetric = true", ""])


def _label(cell: dict) -> str:
    method = cell["base"] + ("+" + cell["modulation"] if cell["modulation"] != "off" else "")
    return f"{method} {cell['execution']} {cell['dtype']}"


def check_matrix(ctx: Context) -> list[Row]:
    dtypes = [d for d in ("float16", "bfloat16") if d in ctx.facts.get("compute_dtypes", ("float16", "bfloat16"))]
    rows = [Row("matrix float16 cells", "", "skip", "this checkout's harness does not take dtype float16 "
                "(modiff.config.COMPUTE_DTYPES)")] if "float16" not in dtypes else []
    config = ctx.work / "gpu-check-matrix.toml"
    config.write_text(matrix_toml(ctx.sizes, dtypes))
    run_dir = ctx.work / "matrix"
    what = (f"modiff-bench run (digits, {ctx.sizes.matrix_run['n_samples']} samples, "
            f"{ctx.sizes.matrix_run['steps']} steps) --device {ctx.device}")
    call = ctx.call("matrix", [ctx.python, "-m", "bench", "run", str(config), "--out", str(run_dir), "--device",
                               ctx.device, "--no-progress"])
    try:
        run = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return [*rows, Row("matrix", what, "FAIL", call.why() if not call.ok else "no run.json", seconds=call.seconds)]
    results = {}
    for path in (run_dir / "cells").glob("*/result.json"):
        try:
            row = json.loads(path.read_text())
        except ValueError:
            continue
        results[row.get("cell_id")] = row
    if (run_dir / "results.csv").is_file():
        shutil.copyfile(run_dir / "results.csv", ctx.out / "matrix-results.csv")
    done = sum(1 for r in results.values() if r.get("status") == "ok")
    summary = f"{done} of {len(run['cells'])} cells done, {len(run['skipped'])} combinations skipped"
    rows.append(Row("matrix", what, "ok" if call.ok else "FAIL", "" if call.ok else call.why(), summary,
                    call.seconds))
    fakes = {_twin_key(r): r for r in results.values() if r.get("execution") == "fake" and r.get("status") == "ok"}
    for cell in run["cells"]:
        result = results.get(cell["cell_id"])
        name = f"matrix {_label(cell)}"
        if result is None:
            rows.append(Row(name, "", "FAIL", "not run" + (f" ({call.why()})" if not call.ok else "")))
        elif result.get("status") != "ok":
            rows.append(Row(name, "", "FAIL", (result.get("error") or "failed").splitlines()[0][:200]))
        else:
            rows.append(Row(name, "", "ok", "", _cell_numbers(run_dir, result, fakes.get(_twin_key(result)))))
    for skip in run["skipped"]:
        rows.append(Row(f"matrix {_label(skip)}", "", "skip", skip.get("reason", "")))
    return rows


def _twin_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("base", "modulation", "w_bits", "a_bits", "a_granularity", "dtype"))


def _cell_numbers(run_dir: Path, row: dict, fake: dict | None) -> str:
    psnr = row.get("psnr_to_fp")
    text = [f"PSNR to FP32 {psnr:.1f} dB" if isinstance(psnr, float) else "", f"{row.get('img_per_s') or 0:,.0f} img/s"]
    if row["execution"] == "int8" and fake is not None:
        text.append(_versus_fake(run_dir, row, fake))
    elif row["execution"] == "fp8":
        text.append("fp8 grid: no fake twin in the matrix (the CUDA tests compare it per layer)")
    return "; ".join(t for t in text if t)


def _versus_fake(run_dir: Path, row: dict, fake: dict) -> str:
    """How far an int8 cell's samples are from its fake twin's. Same grid, so each layer agrees to float rounding;
    a value on a rounding boundary flips one level, though, and the flip propagates through the later layers."""
    try:
        import torch

        from bench.metrics import psnr_to_fp

        real = torch.load(run_dir / row["samples_file"], weights_only=True)["images"].float()
        reference = torch.load(run_dir / fake["samples_file"], weights_only=True)["images"].float()
        return (f"vs fake: max |diff| {float((real - reference).abs().max()):.3g}, "
                f"PSNR {psnr_to_fp(real, reference):.1f} dB")
    except Exception as exc:  # a number of the table, not a reason to lose the row
        return f"vs fake: not compared ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"


def check_report(ctx: Context) -> list[Row]:
    run_dir = ctx.work / "matrix"
    what = "modiff-bench report on the matrix"
    if not list(run_dir.glob("cells/*/result.json")):
        return [Row("report", what, "skip", "the matrix check left no finished cell")]
    call = ctx.call("report", [ctx.python, "-m", "bench", "report", str(run_dir)])
    if not call.ok or not (run_dir / "report.md").is_file():
        return [Row("report", what, "FAIL", call.why() if not call.ok else "no report.md", seconds=call.seconds)]
    shutil.copyfile(run_dir / "report.md", ctx.out / "matrix-report.md")
    figures = len(list((run_dir / "figures").glob("*")))
    return [Row("report", what, "ok", "", f"report.md, report.html, {figures} figures", call.seconds)]


# ----------------------------------------------------------------------------------------------------- estimate

def check_estimate(ctx: Context) -> list[Row]:
    command = [ctx.python, "-m", "bench", "run", "cifar10-paper", "--estimate", "--device", ctx.device,
               "--set", 'run.model="ddpm-cifar10-random"', *ctx.sizes.estimate_sets, "--out",
               str(ctx.work / "estimate")]
    what = "modiff-bench run cifar10-paper --estimate on ddpm-cifar10-random" + (
        f" ({' '.join(ctx.sizes.estimate_sets[1::2])})" if ctx.sizes.estimate_sets else "")
    call = ctx.call("estimate", command)
    line = next((x for x in call.output.splitlines() if x.startswith("estimate:")), None)
    if not call.ok or line is None:
        return [Row("estimate", what, "FAIL", call.why() if not call.ok else "no estimate printed",
                    seconds=call.seconds)]
    head = re.search(r"estimate: (.*?device-hours)", line)
    measured = re.search(r"measured per denoiser call: (.*?);", line)
    numbers = "; ".join(m.group(1) for m in (head, measured) if m) or line[:200]
    return [Row("estimate", what, "ok", "", numbers, call.seconds)]


# ---------------------------------------------------------------------------------------------------- the table

def run_checks(checks: list[tuple[str, Callable[[], list[Row]]]], write: Callable[[list[Row]], None],
               only: set[str] | None = None) -> list[Row]:
    """Run each check in turn; one that raises is a FAIL row (with the exception's first line) and the next one
    still runs. ``write`` gets the rows so far after every check."""
    rows: list[Row] = []
    for name, check in checks:
        if only is not None and name not in only:
            rows.append(Row(name, "", "skip", "not selected (--only)"))
            continue
        start = time.monotonic()
        print(f"[gpu-check] {name} ...", flush=True)
        try:
            got = check()
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            got = [Row(name, "", "FAIL", f"{type(exc).__name__}: {first}"[:200], seconds=time.monotonic() - start)]
        rows.extend(got)
        bad = sum(r.result == "FAIL" for r in got)
        print(f"[gpu-check] {name}: {len(got)} rows, {bad} FAIL ({time.monotonic() - start:.1f} s)", flush=True)
        write(rows)
    return rows


def machine_line(facts: dict, device: str) -> str:
    if not facts:
        return "machine: unknown (the setup check failed)"
    gpu = (f"{facts['gpu']}, capability {'.'.join(map(str, facts['capability']))}, {facts['gpu_memory_gib']} GiB, "
           f"{facts['multiprocessors']} SMs, driver {facts.get('driver') or 'unknown'}; "
           if device.startswith("cuda") and facts.get("gpu") else "CPU only; ")
    tf32 = ", ".join(f"{k} {'on' if v else 'off'}" for k, v in facts["tf32"].items())
    return (f"machine: {gpu}torch {facts['torch']} (CUDA {facts['cuda']}, cuDNN {facts['cudnn']}; TF32 in FP32: "
            f"{tf32}), Python {facts['python']}, {facts['cpu_cores']} CPU cores, {facts['platform']}")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(rows: list[Row], ctx: Context, started: str, seconds: float, mode: str) -> str:
    fails = sum(r.result == "FAIL" for r in rows)
    lines = [f"# GPU check ({mode})", "", machine_line(ctx.facts, ctx.device), "",
             f"{started}, {seconds:.0f} s in all (limits {sum(LIMITS_S.values()) * ctx.sizes.limit_scale} s); "
             f"{len(rows)} rows, {fails} FAIL", "",
             "| check | what ran | result | numbers | s |", "| --- | --- | --- | --- | --- |"]
    previous = None
    for r in rows:
        result = r.result + (f": {r.reason}" if r.reason else "")
        what, previous = ("" if r.what == previous else r.what), r.what  # a group's command once
        lines.append(f"| {_cell(r.check)} | {_cell(what)} | {_cell(result)} | {_cell(r.numbers)} | "
                     f"{'' if r.seconds is None else f'{r.seconds:.1f}'} |")
    lines += ["", "x FP32 / x BF16: the fastest FP32 / BF16 variant's modulated call of the same run divided by this "
              "one's (above 1 = faster). Commands: gpu_check.json; their output: gpu_check.log.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ prepare

def _pins() -> dict[str, str]:
    """``name -> version`` from constraints.txt, names normalised (PEP 503)."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            pins[_normal(match.group(1))] = match.group(2)
    return pins


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried_requirements() -> list[str]:
    """What --prepare downloads: the versions constraints.txt pins (the ones CI tested)."""
    pins = _pins()
    return [f"{name}=={pins[_normal(name)]}" for name in CARRIED]


def _travelling_bytes() -> int | None:
    """The tracked and the untracked-but-not-ignored files of the checkout: what travels besides carried paths."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum((ROOT / name).stat().st_size for name in listed.decode().split("\0")
               if name and (ROOT / name).is_file())


def prepare(wheels: Path) -> int:
    """Download the carried wheels (pure Python, any platform: the GPU machine's Python version is not known here),
    replacing older ones of the same names, and check that they travel within the limit."""
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.glob("*.whl"):
        if _normal(old.name.split("-")[0]) in {_normal(n) for n in CARRIED}:
            old.unlink()  # two versions of one package stop the install on the machine
    requirements = carried_requirements()
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "--implementation", "py", "--abi", "none", "--platform", "any", "--python-version",
                           WHEEL_PYTHON, "--disable-pip-version-check", "-d", str(wheels), *requirements])
    if done.returncode != 0:
        raise BenchError(f"pip download of {', '.join(requirements)} failed (exit status {done.returncode}; pip's "
                         "message is above; it needs the package registry)")
    sizes = {w.name: w.stat().st_size for w in sorted(wheels.glob("*.whl"))}
    tree = _travelling_bytes()
    for name, size in sizes.items():
        print(f"{size / 2**20:8.2f} MiB  {name}")
    total = sum(sizes.values()) + (tree or 0)
    print(f"{sum(sizes.values()) / 2**20:8.2f} MiB  wheels in {wheels}")
    if tree is not None:
        print(f"{tree / 2**20:8.2f} MiB  the working tree that travels (git: tracked and untracked, not ignored)")
        print(f"{total / 2**20:8.2f} MiB  of the {TRAVEL_LIMIT_MIB} MiB a call may carry")
    if total > TRAVEL_LIMIT_MIB * 2**20:
        raise BenchError(f"the wheels and the working tree come to {total / 2**20:.1f} MiB, over the "
                         f"{TRAVEL_LIMIT_MIB} MiB that travel to the GPU machine")
    return 0


# --------------------------------------------------------------------------------------------------------- main

def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BenchError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"unsupported device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {device}: CUDA is not available here (--device cpu --quick checks the script on "
                         "a CPU)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true",
                        help="CPU sizes: digits, batch 2-4, 3 steps, one compiled configuration, 4x the time limits")
    parser.add_argument("--out", default="runs/gpu-check", help="the table, the log and the copied results")
    parser.add_argument("--work", help="the run directories (default: a temporary directory, removed at the end); "
                        "must be empty or new")
    parser.add_argument("--wheels", type=Path, help="install these wheels (*.whl) first, into the work directory")
    parser.add_argument("--prepare", action="store_true",
                        help=f"download the wheels the GPU machine lacks ({', '.join(CARRIED)}) into --wheels "
                        f"(default {DEFAULT_WHEELS.name}/), print their sizes, and exit")
    parser.add_argument("--only", nargs="+", choices=CHECKS, metavar="CHECK",
                        help=f"run only these checks (the others are skip rows): {', '.join(CHECKS)}")
    args = parser.parse_args(argv)

    if args.prepare:
        return prepare(args.wheels or DEFAULT_WHEELS)
    if args.wheels is not None and not list(args.wheels.glob("*.whl")):
        raise BenchError(f"--wheels {args.wheels}: no wheels there (fill it with --prepare)")
    _check_device(args.device)
    out = Path(args.out)
    if args.work is not None and Path(args.work).exists() and any(Path(args.work).iterdir()):
        raise BenchError(f"--work {args.work} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.log").write_text("")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = QUICK_SIZES if args.quick else GPU_SIZES
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GPU_CHECK_DEVICE": args.device,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    ctx = Context(args.device, sizes, out.resolve(), work.resolve(), env)
    mode = f"--device {args.device}" + (", --quick: CPU sizes" if args.quick else ", full sizes")
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    start = time.monotonic()

    def write(rows: list[Row]) -> None:
        text = render(rows, ctx, started, time.monotonic() - start, mode)
        (ctx.out / "gpu_check.md").write_text(text)
        payload = {"created_utc": started, "argv": sys.argv, "mode": mode, "seconds": time.monotonic() - start,
                   "limits_s": {k: v * sizes.limit_scale for k, v in LIMITS_S.items()}, "machine": ctx.facts,
                   "rows": [asdict(r) for r in rows], "commands": ctx.commands}
        (ctx.out / "gpu_check.json").write_text(json.dumps(payload, indent=2) + "\n")

    compiled_skips = {name: f"--quick: {len(QUICK_COMPILED)} compiled configuration only (torch.compile takes "
                      "10-20 s per configuration on a CPU)" for name in COMPILED if name not in sizes.compiled}
    checks = [
        ("setup", lambda: check_setup(ctx, args.wheels.resolve() if args.wheels else None)),
        ("cuda-tests", lambda: check_cuda_tests(ctx)),
        ("execution", lambda: check_execution(ctx, "execution", EAGER, {})),
        ("matrix", lambda: check_matrix(ctx)),
        ("report", lambda: check_report(ctx)),
        ("estimate", lambda: check_estimate(ctx)),
        ("execution-compiled", lambda: check_execution(ctx, "execution-compiled", COMPILED, compiled_skips)),
    ]
    try:
        rows = run_checks(checks, write, set(args.only) if args.only else None)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(render(rows, ctx, started, time.monotonic() - start, mode))
    print(f"-> {ctx.out / 'gpu_check.md'}, gpu_check.json, gpu_check.log")
    return 1 if any(r.result == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    run_script(main, __file__)
