"""Sessions for the suite. All sessions share ONE virtual environment (.nox/shared): the
pinned torch stack is ~6 GB, too big to build once per session. It is (re)built only when
pyproject.toml or constraints.txt change, and 'nox -s clean' removes it.

    nox -s demo          # the 'digits' matrix on the embedded model (resumable) + its report, runs/demo/
    nox -s report        # report.html / report.md from run directories ('-- DIR ...')
    nox -s report-check  # render report.html in headless Chromium, fail on console errors / broken images
    nox -s tests         # the full test suite (what CI runs)
    nox -s lint          # ruff
    nox -s train-tiny    # retrain the embedded UNet + classifier from scratch, check the quality bar
    nox -s train-dit     # retrain the embedded transformer (digits-dit) from scratch, check the bar
    nox -s bench         # speed / memory of int8, fp8 and fake execution vs FP32 and BF16, per allocator
    nox -s bench-deepcache  # DeepCache's measured speed-ups beside the paper's
    nox -s gpu-check     # the prepared GPU check, one table ('-- --prepare' first; '-- --device cpu --quick' here)
    nox -s speed         # the 'cifar10-speed' matrix (random weights): wall-clock table, ratios to FP32 and BF16
    nox -s qdiff-act-digits  # Q-Diffusion's activation quantizers: ours vs the authors' CIFAR-10 setting, digits
    nox -s psnr-table    # PSNR to FP on digits: modulation x activation bits x granularity
    nox -s reproduce-cifar10 [-- --nproc 8 --set run.checkpoint=...]   # paper-scale presets (GPU), and
        reproduce-cifar10-quick, reproduce-cifar10-ablations, reproduce-cifar10-deepcache,
        reproduce-lsun-church, reproduce-lsun-bedroom, reproduce-lsun-bedroom-ddpm,
        reproduce-dit-imagenet256
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
            "-e", ".[dev,sd,cluster,torchao]", external=True,
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
    """The main job on the embedded models: the 'digits' matrix preset, the digits UNet and the digits DiT
    (runs/demo/, about 40 min on 2 CPU cores).

    Resumable: interrupt it and run it again. Extra arguments go to 'modiff-bench run'
    (e.g. '-- --force' to start over, '-- --set run.n_samples=128' for a quicker look)."""
    env = _shared_env(session)
    # the run first: 'run --out' refuses an existing directory that is not yet a run directory (runs/demo/grid alone)
    _run(session, env, "modiff-bench", "run", "digits", "--out", "runs/demo", *session.posargs)
    _run(session, env, "modiff-bench", "sample", "--n", "64", "--out", "runs/demo/grid", "--no-progress")
    _run(session, env, "modiff-bench", "report", "runs/demo")
    session.log("report: runs/demo/report.html (and report.md)   results: runs/demo/results.{csv,parquet}")


@nox.session(venv_backend="none")
def speed(session: nox.Session) -> None:
    """The speed matrix on the CIFAR-10 DDPM architecture with random weights ('cifar10-speed' preset:
    FP32/BF16 baselines in both layouts, LTQ / MoDiff fake and int8): runs/cifar10-speed and its report,
    whose wall-clock table carries each row's ratio to FP32 and BF16. About 20 min on 2 CPU cores.

    Extra arguments go to 'modiff-bench run' (e.g. '-- --device cuda')."""
    env = _shared_env(session)
    _run(session, env, "modiff-bench", "run", "cifar10-speed", "--out", "runs/cifar10-speed", *session.posargs)
    _run(session, env, "modiff-bench", "report", "runs/cifar10-speed")
    session.log("report: runs/cifar10-speed/report.html (the wall-clock table)")


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


@nox.session(name="train-dit", venv_backend="none")
def train_dit(session: nox.Session) -> None:
    """Retrain the embedded digits transformer (digits-dit) from scratch (runs/train-dit), check the bar.

    Fails unless the result meets the quality bar; pass '--install' to replace the packaged
    checkpoint with it."""
    env = _shared_env(session)
    _run(session, env, "modiff-bench", "train-dit", "--out", "runs/train-dit", *session.posargs)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Speed and memory of real int8 / fp8 execution, fake quantization and MoDiff against FP32 and BF16,
    measured in one run per memory allocator (runs/bench/execution.json): glibc's malloc tuned
    (modiff.allocator.tune_allocator) and as it comes, and tcmalloc where libtcmalloc is installed, each in its own
    process, merged into one table. CIFAR-10 architecture and digits model.

    Extra arguments go to benchmarks/execution.py (e.g. '-- --device cuda --batch 256', '-- --configs ...';
    '-- --allocator tuned' for one process and allocator only)."""
    env = _shared_env(session)
    allocators = []
    if not any(a in ("--allocator", "--allocators") for a in session.posargs):
        # benchmarks/_common.py's TCMALLOC_PATHS: the script skips tcmalloc, saying why, where neither exists
        tcmalloc = any(os.path.exists(p) for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                                                   "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"))
        allocators = ["--allocators", "tuned", "default", *(["tcmalloc"] if tcmalloc else [])]
    _run(session, env, "python", "benchmarks/execution.py", *allocators, *session.posargs)


@nox.session(name="bench-deepcache", venv_backend="none")
def bench_deepcache(session: nox.Session) -> None:
    """DeepCache's speed-ups for N = 2, 3, 5, 10 beside the paper's (runs/bench/deepcache.json).

    Extra arguments go to benchmarks/deepcache_speedup.py (e.g. '-- --device cuda')."""
    env = _shared_env(session)
    _run(session, env, "python", "benchmarks/deepcache_speedup.py", *session.posargs)


@nox.session(name="gpu-check", venv_backend="none")
def gpu_check(session: nox.Session) -> None:
    """The prepared GPU check (benchmarks/gpu_check.py): CUDA-only tests, the execution benchmark at batch 256,
    a tiny digits matrix on CUDA with its report, and a paper preset's estimate, in one table (runs/gpu-check/).

    '-- --prepare' downloads the wheels a GPU machine without diffusers needs into .gpu-wheels/ (needs the package
    registry); '-- --device cpu --quick' runs every check at CPU size, as CI does. On the lent GPU machine, which
    has no nox, the script runs on its own: docs/performance.md#gpu-check gives the command."""
    env = _shared_env(session)
    _run(session, env, "python", "benchmarks/gpu_check.py", *session.posargs)


@nox.session(name="authors-digits", venv_backend="none")
def authors_digits(session: nox.Session) -> None:
    """How much the MoDiff authors' settings matter on digits ('digits-authors' preset: lcq/ltq against the
    authors' paper-lcq/paper-ltq, Q-Diffusion + MoDiff residual step sizes min-max or learned), for two seed
    sets (runs/digits-authors/seed-<S>; each calibrates Q-Diffusion on its own trajectories), then one report
    of both (runs/digits-authors/report.html) and the spread table (runs/digits-authors/spread.md). Resumable.

    Extra arguments go to every 'modiff-bench run' (e.g. '-- --set run.n_samples=256')."""
    _two_seed_sets(session, "digits-authors")


@nox.session(name="qdiff-act-digits", venv_backend="none")
def qdiff_act_digits(session: nox.Session) -> None:
    """Q-Diffusion's activation quantizers on digits, ours (asymmetric, MSE ranges over every calibration row)
    against the authors' CIFAR-10 command (--a_sym, 'max' ranges from 64 samples), W8A4/W8A3 ('digits-qdiff-act'
    preset), for two seed sets: runs/digits-qdiff-act/report.html and spread.md. About 12 min. Resumable.

    Extra arguments go to every 'modiff-bench run'."""
    _two_seed_sets(session, "digits-qdiff-act")


def _two_seed_sets(session: nox.Session, preset: str) -> None:
    """``preset`` for the seed sets 0 and 100000 (runs/<preset>/seed-<S>), one report of both and the spread table."""
    env = _shared_env(session)
    dirs = []
    for seed in (0, 100_000):
        out = f"runs/{preset}/seed-{seed}"
        _run(session, env, "modiff-bench", "run", preset, "--out", out, "--set", f"run.seed={seed}", *session.posargs)
        dirs.append(out)
    _run(session, env, "modiff-bench", "report", *dirs, "--out", f"runs/{preset}")
    _run(session, env, "python", "-m", "reports.spread", *dirs, "--out", f"runs/{preset}/spread.md")
    session.log(f"report: runs/{preset}/report.html   spread over seed sets: runs/{preset}/spread.md")


@nox.session(name="psnr-table", venv_backend="none")
def psnr_table(session: nox.Session) -> None:
    """PSNR to full precision on digits: modulation x activation bits x granularity.

    Writes runs/bench/psnr_table.{csv,md,json}."""
    env = _shared_env(session)
    _run(session, env, "python", "benchmarks/psnr_table.py", *session.posargs)


def _reproduce(session: nox.Session, preset: str) -> None:
    """Run a paper-scale preset into runs/<preset>/ and render its report.

    Extra arguments go to 'modiff-bench run' (--set run.checkpoint=PATH, --set inception.weights=PATH,
    --device cuda, --estimate, ...). '--nproc N' starts N processes on this node through torchrun (one per
    GPU); every cell's seed chunks are shared among them."""
    env = _shared_env(session)
    args, nproc = list(session.posargs), 1
    for i, arg in enumerate(list(args)):
        if arg == "--nproc" or arg.startswith("--nproc="):
            value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            if not value.isdigit() or int(value) < 1:
                session.error(f"--nproc needs a positive integer, got {value!r}")
            nproc = int(value)
            del args[i: i + (1 if "=" in arg else 2)]
            break
    out = f"runs/{preset}"
    command = ["run", preset, "--out", out, *args]
    if nproc > 1:
        _run(session, env, "python", "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
             "-m", "bench", *command)
    else:
        _run(session, env, "modiff-bench", *command)
    if "--estimate" not in args and "--dry-run" not in args:
        _run(session, env, "modiff-bench", "report", out)
        session.log(f"report: {out}/report.html (and report.md)   results: {out}/results.{{csv,parquet}}")


@nox.session(name="reproduce-cifar10", venv_backend="none")
def reproduce_cifar10(session: nox.Session) -> None:
    """MoDiff Table 1 on DDPM CIFAR-10: 61 cells x 50,000 images (GPU; prints its estimate first)."""
    _reproduce(session, "cifar10-paper")


@nox.session(name="reproduce-cifar10-quick", venv_backend="none")
def reproduce_cifar10_quick(session: nox.Session) -> None:
    """Table 1's cells with 5,000 images each: a tenth of the cost, FID biased upwards."""
    _reproduce(session, "cifar10-quick")


@nox.session(name="reproduce-cifar10-ablations", venv_backend="none")
def reproduce_cifar10_ablations(session: nox.Session) -> None:
    """The CIFAR-10 ablations: error compensation, warm-up, DPM-Solver++ 20 steps, DDIM 20 steps."""
    _reproduce(session, "cifar10-ablations")


@nox.session(name="reproduce-cifar10-deepcache", venv_backend="none")
def reproduce_cifar10_deepcache(session: nox.Session) -> None:
    """DeepCache N = 2, 3, 5, 10 on CIFAR-10, and MoDiff + caching."""
    _reproduce(session, "cifar10-deepcache")


@nox.session(name="reproduce-lsun-church", venv_backend="none")
def reproduce_lsun_church(session: nox.Session) -> None:
    """MoDiff Table 2 on LDM-8 LSUN-Churches (needs --set run.checkpoint=... and reference statistics)."""
    _reproduce(session, "lsun-church-paper")


@nox.session(name="reproduce-lsun-bedroom", venv_backend="none")
def reproduce_lsun_bedroom(session: nox.Session) -> None:
    """MoDiff Table 3 on LDM-4 LSUN-Bedrooms (needs --set run.checkpoint=... and reference statistics)."""
    _reproduce(session, "lsun-bedroom-paper")


@nox.session(name="reproduce-lsun-bedroom-ddpm", venv_backend="none")
def reproduce_lsun_bedroom_ddpm(session: nox.Session) -> None:
    """MoDiff Table 5 on LDM-4 LSUN-Bedrooms with latent-diffusion's DDPM (needs --set run.checkpoint=... and stats)."""
    _reproduce(session, "lsun-bedroom-ddpm")


@nox.session(name="reproduce-dit-imagenet256", venv_backend="none")
def reproduce_dit_imagenet256(session: nox.Session) -> None:
    """DiT-XL/2 ImageNet 256 in the DiT quantization papers' setting (needs the weights and reference statistics)."""
    _reproduce(session, "dit-imagenet256")


@nox.session(venv_backend="none")
def clean(session: nox.Session) -> None:
    """Delete the shared environment and everything generated under runs/."""
    for path in (ENV, ROOT / "runs"):
        if path.exists():
            session.log(f"removing {path}")
            shutil.rmtree(path)
