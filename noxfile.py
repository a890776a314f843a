"""Sessions for the suite. All sessions share ONE virtual environment (.nox/shared): the
pinned torch stack is ~6 GB, too big to build once per session. It is (re)built only when
pyproject.toml or constraints.txt change, and 'nox -s clean' removes it.

    nox -s demo          # the 'digits' matrix on the embedded model (resumable) + its report, runs/demo/
    nox -s report        # report.html / report.md from run directories ('-- DIR ...')
    nox -s report-check  # render report.html in headless Chromium, fail on console errors / broken images
    nox -s tests         # the full test suite (what CI runs)
    nox -s lint          # ruff
    nox -s train-tiny    # retrain the embedded UNet + classifier from scratch, check the quality bar
    nox -s bench         # wall-clock / memory of fake-quant and MoDiff vs full precision
    nox -s psnr-table    # PSNR to FP on digits: modulation x activation bits x granularity
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
ENV = ROOT / ".nox" / "shared"
STAMP = ENV / "installed.sha256"
BIN = ENV / ("Scripts" if os.name == "nt" else "bin")

nox.options.sessions = ["tests"]


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def _shared_env(session: nox.Session) -> dict[str, str]:
    """Create or update .nox/shared; return the environment variables that activate it."""
    fingerprint = _fingerprint()
    if not (STAMP.is_file() and STAMP.read_text().strip() == fingerprint):
        if not (BIN / "python").exists():
            session.run(sys.executable, "-m", "venv", str(ENV), external=True)
        session.run(str(BIN / "python"), "-m", "pip", "install", "--quiet", "--upgrade", "pip", external=True)
        # --no-cache-dir: the wheels would double the ~6 GB footprint on small disks.
        session.run(
            str(BIN / "python"), "-m", "pip", "install", "--no-cache-dir", "-c", "constraints.txt",
            "-e", ".[dev,sd,cluster]", external=True,
        )
        STAMP.write_text(fingerprint + "\n")
    else:
        session.log(f"reusing the shared environment {ENV}")
    return {"VIRTUAL_ENV": str(ENV), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _run(session: nox.Session, env: dict[str, str], program: str, *args: str) -> None:
    # nox looks programs up on its own PATH, not on env's: name the shared env's copy explicitly.
    session.run(str(BIN / program), *args, env=env, external=True)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the full pytest suite (extra arguments go to pytest)."""
    env = _shared_env(session)
    _run(session, env, "python", "-m", "pytest", *session.posargs)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff."""
    env = _shared_env(session)
    _run(session, env, "ruff", "check", ".")


@nox.session(venv_backend="none")
def demo(session: nox.Session) -> None:
    """The main job on the embedded default: the 'digits' matrix preset (runs/demo/, ~11 min on 2 CPU cores).

    Resumable: interrupt it and run it again. Extra arguments go to 'modiff-bench run'
    (e.g. '-- --force' to start over, '-- --set run.n_samples=128' for a quicker look)."""
    env = _shared_env(session)
    _run(session, env, "modiff-bench", "sample", "--n", "64", "--out", "runs/demo/grid", "--no-progress")
    _run(session, env, "modiff-bench", "run", "digits", "--out", "runs/demo", *session.posargs)
    _run(session, env, "modiff-bench", "report", "runs/demo")
    session.log("report: runs/demo/report.html (and report.md)   results: runs/demo/results.{csv,parquet}")


@nox.session(venv_backend="none")
def report(session: nox.Session) -> None:
    """Tables, figures, report.html and report.md for run directories ('-- DIR [DIR ...] [--out OUT]').

    Default: runs/demo."""
    env = _shared_env(session)
    _run(session, env, "modiff-bench", "report", *(session.posargs or ["runs/demo"]))


@nox.session(name="report-check", venv_backend="none")
def report_check(session: nox.Session) -> None:
    """Render a report.html in headless Chromium: screenshot, fail on console errors or broken images.

    Needs Debian's chromium (apt-get install chromium); skipped without it. Default: runs/demo/report.html."""
    import shutil as _shutil

    env = _shared_env(session)
    if not any(_shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")):
        session.skip("Debian's chromium is not installed (apt-get install chromium)")
    _run(session, env, "python", "-m", "reports.check", *(session.posargs or ["runs/demo/report.html"]))


@nox.session(name="train-tiny", venv_backend="none")
def train_tiny(session: nox.Session) -> None:
    """Retrain the embedded UNet and its classifier from scratch (runs/train-tiny), check the bar.

    Fails unless the result meets the quality bar; pass '--install' to replace the packaged
    checkpoint with it."""
    env = _shared_env(session)
    _run(session, env, "modiff-bench", "train-tiny", "--out", "runs/train-tiny", *session.posargs)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Time and memory of fake-quant and MoDiff vs full precision (runs/bench/overhead.json), and
    DeepCache's speed-ups for N = 2, 3, 5, 10 beside the paper's (runs/bench/deepcache.json).

    Digits model and the CIFAR-10 architecture; extra arguments go to both scripts
    (e.g. '-- --device cuda')."""
    env = _shared_env(session)
    _run(session, env, "python", "benchmarks/overhead.py", *session.posargs)
    _run(session, env, "python", "benchmarks/deepcache_speedup.py", *session.posargs)


@nox.session(name="psnr-table", venv_backend="none")
def psnr_table(session: nox.Session) -> None:
    """PSNR to full precision on digits: modulation x activation bits x granularity.

    Writes runs/bench/psnr_table.{csv,md,json}."""
    env = _shared_env(session)
    _run(session, env, "python", "benchmarks/psnr_table.py", *session.posargs)


@nox.session(venv_backend="none")
def clean(session: nox.Session) -> None:
    """Delete the shared environment and everything generated under runs/."""
    for path in (ENV, ROOT / "runs"):
        if path.exists():
            session.log(f"removing {path}")
            shutil.rmtree(path)
