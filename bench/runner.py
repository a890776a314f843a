"""The resumable runner: expand a matrix, run every cell, keep one tidy results table.

Layout of an output directory::

    DIR/run.json                  resolved matrix, skipped combinations, versions, every invocation
    DIR/results.csv, .parquet     one row per cell (rebuilt from the cell files after every cell)
    DIR/results.md                the main columns as a Markdown table
    DIR/cells/<cell_id>/result.json   the row of one cell: settings, metrics, costs, provenance
    DIR/cells/<cell_id>/samples.pt    its samples (float16 in [-1, 1]) and seeds
    DIR/cells/<cell_id>/chunks/   while a cell runs: one file per batch of seeds (see below)
    DIR/reference/<key>.pt        full-precision samples shared by every cell with the same
                                  model, sampler, steps, eta, seeds and batch size
    DIR/cache/                    calibration data and calibrated models methods keep for reuse
                                  (keyed by what they depend on; safe to delete)
    DIR/run.log                   what each invocation did

Every file is written to a temporary name and renamed, and ``result.json`` is written last, so a
crash or SIGKILL leaves either a finished cell or none: a rerun skips finished cells and runs the
others (failed cells are retried). Rows come from the cell files alone, so none is ever duplicated.
If the metric list grows, finished cells get the new metrics from their saved samples.

The files are the tool's own, so damage found in them is repaired, never a reason to refuse later
runs (each repair is a note in ``run.log``):

- ``result.json`` is validated (``check_result``): an invalid one means the cell is not finished, and
  the tables leave it out;
- ``result.json`` records the size and SHA-256 of the samples file (``samples_bytes``,
  ``samples_sha256``; for the full-precision cell, of its reference file). Deciding what is finished
  compares the size only (cheap: a cell may be 19.6 GB); reading the samples (adding a metric) verifies
  the hash. A missing, resized or mismatching file means the cell is sampled again. Cells of older
  versions recorded neither: they count as finished while their file exists and loads;
- a reference file is checked on its first use (loadable with ``weights_only=True``, its keys, one
  finite image per seed, the seeds, the SHA-256 its full-precision cell recorded) and made again when
  it is not valid (that cell then runs again);
- a missing or unreadable ``run.json`` is rebuilt from the current matrix when every cell present
  belongs to it (``repaired_utc`` and ``repair_reason`` say so); cells of another matrix are refused;
- ``results.*`` are derived: rebuilt from the cells after every cell (and by the report when stale).

Samples are checked as stored: float16 that overflows (beyond +-65504), or NaN/Inf in the sampler's
output or in a latent model's decoded images, fails the cell. A full disk (ENOSPC, EDQUOT) is not a
cell's failure: the OSError, its ``filename`` the file being written, leaves ``Runner.run`` and nothing
is recorded, so the rerun after freeing space resumes where the run stopped.

Sampling is chunked the NVlabs/edm way: chunk k of a cell is seeds[k*B:(k+1)*B] (B = batch_size),
written to ``chunks/`` as soon as it is sampled, and chunks already on disk are not sampled again, so
an interrupted cell resumes mid-way. Under ``torchrun`` (see ``bench.distributed``) rank r samples the
chunks k with k % world_size == r; rank 0 assembles ``samples.pt`` once all exist and computes the
metrics. A cell is run under a per-cell lock (``DIR/locks/``), so several runners sharing one directory
(SLURM array tasks, see ``bench.launch``) never run the same cell twice.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import math
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

import modiff
from modiff.layers import QUANTIZABLE, QuantLayer

from .distributed import World
from .errors import BenchError
from .matrix import Matrix, cell_id
from .measure import measured
from .methods import BuildContext, CellSpec, Prepared, build
from .metrics import ALL_COLUMNS, INCEPTION_METRICS, METRICS, MetricInputs, compute_metrics
from .provenance import (
    git_revision,
    is_disk_full,
    package_versions,
    provenance,
    save_torch_atomic,
    sha256_file,
    write_atomic,
    write_json_atomic,
)
from .samplers import SamplerConfig, sample
from .zoo import ZooModel, load_model, resolve_device

SETTING_COLUMNS = ("model", "checkpoint", "sampler", "steps", "eta", "n_samples", "seed", "batch_size", "method",
                   "base", "modulation", "cache", "w_bits", "a_bits", "a_granularity")
METRIC_COLUMNS = ALL_COLUMNS
COST_COLUMNS = ("gbops", "gbops_honest", "macs_g", "state_mb", "prepare_s", "wall_s", "img_per_s", "decode_s",
                "peak_mem_mb", "peak_rss_mb", "cuda_peak_mb")
PROVENANCE_COLUMNS = ("device", "world_size", "torch_version", "git_rev", "modiff_bench_version", "started_utc",
                      "finished_utc", "samples_file", "trace_file", "params", "method_info", "missing_metrics",
                      "versions", "inception_weights")
RESULT_COLUMNS = ("cell_id", "status", "error", *SETTING_COLUMNS, *METRIC_COLUMNS, *COST_COLUMNS,
                  *PROVENANCE_COLUMNS)
JSON_COLUMNS = ("params", "method_info", "missing_metrics", "versions", "inception_weights")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- what a valid result.json holds -----------------------------------------------------------
_INT_SETTINGS = ("steps", "n_samples", "seed", "batch_size", "w_bits", "a_bits")
_STR_SETTINGS = ("model", "sampler", "method", "base", "modulation", "cache", "a_granularity")
_NUMBER_STRINGS = ("inf", "-inf", "nan")  # what _jsonable writes for non-finite floats
FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_result(row, key: str) -> str | None:
    """Why ``row`` (a parsed ``cells/<key>/result.json``) is not a valid cell result, or None.

    A dict with ``cell_id`` = the directory name, ``status`` ok or failed, every setting with its type,
    metric and cost columns that are numbers, None or the strings 'inf' / '-inf' / 'nan', and, for a
    finished cell, the samples file it read (with its size and SHA-256, recorded since they exist)."""
    if not isinstance(row, dict):
        return f"not a JSON object but {type(row).__name__}"
    if row.get("cell_id") != key:
        return f"cell_id is {row.get('cell_id')!r}, not the directory's {key!r}"
    if row.get("status") not in ("ok", "failed"):
        return f"status is {row.get('status')!r}, not 'ok' or 'failed'"
    missing = [c for c in SETTING_COLUMNS if c not in row]
    if missing:
        return f"no {', '.join(missing)}"
    for column in _INT_SETTINGS:
        if not _is_int(row[column]):
            return f"{column} is {row[column]!r}, not an integer"
    for column in _STR_SETTINGS:
        if not isinstance(row[column], str):
            return f"{column} is {row[column]!r}, not a string"
    if not _is_number(row["eta"]):
        return f"eta is {row['eta']!r}, not a number"
    if row["checkpoint"] is not None and not isinstance(row["checkpoint"], str):
        return f"checkpoint is {row['checkpoint']!r}, not a string"
    for column in (*METRIC_COLUMNS, *COST_COLUMNS):
        value = row.get(column)
        if value is not None and not _is_number(value) and value not in _NUMBER_STRINGS:
            return f"{column} is {value!r}, not a number"
    if row.get("error") is not None and not isinstance(row["error"], str):
        return f"error is {row['error']!r}, not a string"
    for column in ("params", "missing_metrics", "versions"):
        if row.get(column) is not None and not isinstance(row[column], dict):
            return f"{column} is {row[column]!r}, not a JSON object"
    metrics = row.get("metrics")
    if metrics is not None and not (isinstance(metrics, list) and all(isinstance(m, str) for m in metrics)):
        return f"metrics is {metrics!r}, not a list of names"
    if row["status"] == "ok":
        file = row.get("samples_file")
        if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
            return f"samples_file is {file!r}, not a path inside the run directory"
    size, digest = row.get("samples_bytes"), row.get("samples_sha256")
    if size is not None and not (_is_int(size) and size >= 0):
        return f"samples_bytes is {size!r}, not a size"
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        return f"samples_sha256 is {digest!r}, not a SHA-256"
    return None


def read_result(path: Path, key: str) -> tuple[dict | None, str | None]:
    """``cells/<key>/result.json``: (the row, None) when valid, else (None, why not)."""
    try:
        row = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # ValueError: truncated or not JSON (also UnicodeDecodeError)
        return None, f"unreadable: {_one_line(exc)}"
    reason = check_result(row, key)
    return (None, reason) if reason else (row, None)


def collect_rows(out: str | Path, ids: list[str] | None = None, problems: dict[str, str] | None = None
                 ) -> list[dict]:
    """The valid ``result.json`` rows of a run directory, in the order of ``ids`` (default: every cell
    directory, sorted). Invalid ones are left out, with the reason in ``problems`` (cell id -> reason)
    when given; cells without a result (not run, or running) are not rows."""
    cells = Path(out) / "cells"
    if ids is None:
        ids = sorted(p.name for p in cells.iterdir() if p.is_dir()) if cells.is_dir() else []
    rows = []
    for key in ids:
        path = cells / key / "result.json"
        if not path.is_file():
            continue
        row, reason = read_result(path, key)
        if row is None:
            if problems is not None:
                problems[key] = reason
            continue
        rows.append(row)
    return rows


def table_frame(rows: list[dict]):
    """The results table (one row per cell, the columns of ``RESULT_COLUMNS``) of these rows."""
    import pandas as pd

    frame = pd.DataFrame([{c: r.get(c) for c in RESULT_COLUMNS} for r in rows], columns=list(RESULT_COLUMNS))
    for column in JSON_COLUMNS:
        frame[column] = [json.dumps(v, sort_keys=True) if v is not None else None for v in frame[column]]
    for column in (*METRIC_COLUMNS, *COST_COLUMNS):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def write_tables(out: str | Path, rows: list[dict], metrics: list[str] | None = None):
    """Write ``results.csv``, ``results.parquet`` and ``results.md`` of a run directory from its rows;
    ``metrics``: the columns of results.md (default: every metric some row computed). Returns the frame."""
    out = Path(out)
    frame = table_frame(rows)
    if metrics is None:
        metrics = list(dict.fromkeys(m for r in rows for m in (r.get("metrics") or []) if m in METRICS))
    write_atomic(out / "results.csv", lambda tmp: frame.to_csv(tmp, index=False))
    write_atomic(out / "results.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
    text = markdown_table(frame, [m for m in metrics if m in METRICS])
    write_atomic(out / "results.md", lambda tmp: tmp.write_text(text))
    return frame


def check_samples(data, n_samples: int, seeds: list[int], image_shape: tuple[int, ...] | None = None,
                  keys: tuple[str, ...] = ("images", "seeds")) -> str | None:
    """Why a loaded samples file (a cell's ``samples.pt``, a reference, a chunk) is not the images of
    these seeds, or None: the keys, one image per seed, the seeds, their shape, finite values."""
    if not isinstance(data, dict):
        return f"holds {type(data).__name__}, not a dict"
    absent = [k for k in keys if k not in data]
    if absent:
        return f"has no {', '.join(absent)}"
    images = data["images"]
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        return "its images are not a float tensor of shape (N, C, H, W)"
    if len(images) != n_samples:
        return f"holds {len(images)} images, not {n_samples}"
    if list(data["seeds"] if isinstance(data["seeds"], list) else []) != list(seeds):
        return "its seeds are not the cell's"
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        return f"its images have shape {tuple(images.shape[1:])}, not {tuple(image_shape)}"
    for i in range(0, len(images), 256):  # in chunks: no bool copy of 50,000 LSUN images at once
        if not bool(images[i: i + 256].isfinite().all()):
            return "its images contain NaN/Inf"
    return None


@dataclass
class RunSummary:
    out: Path
    total: int
    ran: int
    reused: int
    failed: list[str]
    skipped: int
    seconds: float


@dataclass
class SampleRecord:
    images: torch.Tensor  # float16, CPU, [-1, 1]
    seeds: list[int]
    seconds: float  # sampling, summed over chunks (device-seconds when several ranks sampled)
    peak_rss_bytes: int
    cuda_peak_bytes: int | None
    state_bytes: int
    decode_seconds: float = 0.0  # latent models: the autoencoder's decoding, not in ``seconds``


class RankFailed(RuntimeError):
    """A collective step failed on some rank; raised on every rank so that none waits forever."""

    def __init__(self, message: str, details: str):
        super().__init__(message)
        self.details = details


class Runner:
    def __init__(self, matrix: Matrix, out: str | Path, device: str = "auto", force: bool = False,
                 progress: bool = True, argv: list[str] | None = None, log: Callable[[str], None] | None = None,
                 world: World | None = None, only: set[str] | None = None):
        """``world``: this process's place among torchrun ranks (default: alone). ``only``: run just
        these cell ids (a SLURM array task's share); the tables still list every finished cell."""
        self.matrix = matrix
        self.out = Path(out)
        self.device = _pick_device(device)
        self.force = force
        self.world = world or World()
        self.only = only
        self._alone = False  # set by _locked: whether this runner holds the directory exclusively
        self._lock_handle = None
        self.progress = progress and sys.stderr.isatty() and self.world.main  # bars only for a person watching
        self.argv = argv
        self._print = log or (lambda text: tqdm.write(text, file=sys.stdout))
        self._models: dict[str, ZooModel] = {}
        self._macs: dict[str, object] = {}
        self.ids = [cell_id(c) for c in matrix.cells]
        self._damaged: dict[str, str] = {}  # finished cells found damaged when read (rank 0): run again
        self._run_json_problem: str | None = None  # set by _check_out_dir: run.json to be rebuilt, and why
        self._references: dict[Path, tuple[int, int, str | None]] = {}  # checked: (size, mtime_ns, sha256)

    # -- paths ---------------------------------------------------------------------------
    def cell_dir(self, key: str) -> Path:
        return self.out / "cells" / key

    def reference_path(self, cell: CellSpec) -> Path:
        fields = {k: getattr(cell, k) for k in ("model", "checkpoint", "sampler", "steps", "eta", "n_samples", "seed",
                                                "batch_size")}
        fields["device"] = self.device.type
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
        return self.out / "reference" / f"{key}.pt"

    def log(self, text: str) -> None:
        if not self.world.main:
            return
        self._print(text)
        try:
            with open(self.out / "run.log", "a") as f:
                f.write(f"{_now()} {text}\n")
        except OSError:
            pass

    # -- checks before anything is written --------------------------------------------------
    def _check_out_dir(self) -> None:
        """Refuse a directory that holds another matrix. A missing or damaged run.json (the tool's own
        file) is not a reason to refuse: when every cell present belongs to this matrix it is rebuilt
        (``_run_json_problem`` says why; ``_write_run_json`` does it)."""
        self._run_json_problem = None
        run_json = self.out / "run.json"
        if self.out.exists() and not self.out.is_dir():
            raise BenchError(f"--out {self.out} exists and is not a directory")
        if self.force:
            return
        previous, problem = _read_run_json(run_json)
        if previous is None and problem == "missing" and not (self.out / "cells").is_dir():
            return  # a new directory
        if previous is not None:
            if previous["matrix_hash"] != self.matrix.matrix_hash:
                cells = previous.get("cells")
                raise BenchError(
                    f"{self.out} holds results of a different matrix ({previous.get('source', '?')}, "
                    f"{len(cells) if isinstance(cells, list) else '?'} cells); use another --out, or --force to "
                    "replace them")
            return
        foreign = self._foreign_cells()
        if foreign:
            raise BenchError(
                f"{self.out} holds results of a different matrix (run.json {problem}; {len(foreign)} cell(s) not "
                f"in this matrix, e.g. {foreign[0]}); use another --out, or --force to replace them")
        self._run_json_problem = problem

    def _foreign_cells(self) -> list[str]:
        """Cell directories that do not belong to this matrix: an id it does not have, or a result whose
        settings differ from the matrix's cell of that id."""
        cells = self.out / "cells"
        if not cells.is_dir():
            return []
        specs = dict(zip(self.ids, self.matrix.cells, strict=True))
        foreign = []
        for directory in sorted(p for p in cells.iterdir() if p.is_dir()):
            spec = specs.get(directory.name)
            if spec is None:
                foreign.append(directory.name)
                continue
            row, _ = read_result(directory / "result.json", directory.name)
            if row is not None:
                expected = json.loads(json.dumps(asdict(spec)))
                if any(k in row and row[k] != v for k, v in expected.items()):
                    foreign.append(directory.name)
        return foreign

    def _load_models(self) -> None:
        layer = self.matrix.run.get("trace_layer")
        for cell in self.matrix.cells:
            if cell.model not in self._models:
                self._models[cell.model] = load_model(cell.model, cell.checkpoint, str(self.device))
                names = dict(self._models[cell.model].unet.named_modules())
                if layer and not isinstance(names.get(layer), QUANTIZABLE):
                    raise BenchError(f"run.trace_layer {layer!r} is not a conv/linear layer of model {cell.model!r}")
            SamplerConfig.from_name(cell.sampler, cell.steps, cell.eta).timesteps(self._models[cell.model].schedule)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Runners of the same matrix may share a directory (they split the cells through per-cell
        locks); ``--force``, which deletes results, needs it alone."""
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / ".lock", "w") as handle:
            self._alone = _try_flock(handle, fcntl.LOCK_EX)
            if not self._alone:
                # another runner: wait (up to a minute) for it to finish setting up, then share
                if self.force or not _try_flock(handle, fcntl.LOCK_SH, patience_s=60.0):
                    raise BenchError(f"another modiff-bench run is using {self.out}"
                                     + ("; --force needs the directory to itself" if self.force else ""))
            self._lock_handle = handle
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _share_directory(self) -> None:
        """Set-up done: let runners of the same matrix join (a --force run keeps the directory)."""
        if self._alone and not self.force:
            fcntl.flock(self._lock_handle, fcntl.LOCK_SH)

    @contextmanager
    def _cell_lock(self, key: str) -> Iterator[bool]:
        """Rank 0 holds ``DIR/locks/<key>.lock`` while the cell runs; False (on every rank) when another
        runner holds it."""
        handle = None
        if self.world.main:
            (self.out / "locks").mkdir(exist_ok=True)
            handle = open(self.out / "locks" / f"{key}.lock", "w")  # noqa: SIM115 (closed below)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
            except OSError:
                got = False
        got = self.world.broadcast(got if handle is not None else None)
        try:
            yield got
        finally:
            if handle is not None:
                handle.close()

    def _together(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on every rank; if it raised anywhere, raise on every rank (no rank is left waiting
        in a collective). Alone, exceptions pass through untouched."""
        if not self.world.distributed:
            return fn()
        result, failure = None, None
        try:
            result = fn()
        except Exception as exc:  # reported to every rank below
            failure = (self.world.rank, _one_line(exc), traceback.format_exc(),
                       str(exc) if isinstance(exc, BenchError) else None,
                       (exc.errno, exc.strerror, exc.filename) if is_disk_full(exc) else None)
        failures = [f for f in self.world.gather(failure) if f is not None]
        if failures:
            full = [f[4] for f in failures if f[4] is not None]
            if full:  # a full disk is no cell's failure: every rank stops with it
                raise OSError(*full[0])
            rank, message, details, user_error, _ = failures[0]
            if user_error is not None:  # a user mistake stays one line and exit status 2 on every rank
                raise BenchError(user_error)
            raise RankFailed(f"rank {rank}: {message}", details)
        return result

    # -- the run ---------------------------------------------------------------------------
    def pending(self) -> list[tuple[str, CellSpec]]:
        """The cells this runner still has to run (not finished, and in ``only`` if given)."""
        return [(k, c) for k, c in zip(self.ids, self.matrix.cells, strict=True)
                if (self.only is None or k in self.only) and self._needs_run(k)]

    def prepare_directory(self) -> None:
        """Check and set up the output directory and write run.json (rank 0's job, under the lock)."""
        self._check_out_dir()  # again, now that no other run can change it
        if self._alone:  # no other runner writing: temporaries are a killed run's
            for stale in self.out.rglob(".tmp-*"):
                stale.unlink(missing_ok=True)
        if self.force:
            for name in ("cells", "reference"):
                shutil.rmtree(self.out / name, ignore_errors=True)
            for name in ("results.csv", "results.parquet"):
                (self.out / name).unlink(missing_ok=True)
        self._write_run_json()

    def run(self, before: Callable[[list[tuple[str, CellSpec]]], None] | None = None) -> RunSummary:
        """Run the pending cells. ``before(todo)`` runs on rank 0 once the work is known (the CLI prints
        its cost estimate there)."""
        start = time.perf_counter()
        # every step that may fail on rank 0 alone is collective (``_together``), so that no rank is
        # left waiting in a collective the others never reach
        self._together(lambda: self._check_out_dir() if self.world.main else None)
        self._together(self._load_models)
        with ExitStack() as stack:

            def set_up() -> None:
                if self.world.main:
                    stack.enter_context(self._locked())
                    self.prepare_directory()
                    self._share_directory()

            self._together(set_up)
            if self.world.main:
                self._log_damaged()
            todo = self.world.broadcast(self.pending() if self.world.main else None)
            finished = len(self.ids) - len(self.pending()) if self.world.main else 0
            self.log(f"{self.matrix.source}: {len(self.ids)} cells ({finished} finished, {len(todo)} to run"
                     + (f" by this task, of {len(self.only)}" if self.only is not None else "")
                     + f", {len(self.matrix.skipped)} invalid combinations skipped) on {self.device}"
                     + (f" x {self.world.size} processes" if self.world.distributed else "") + f" -> {self.out}")
            for skip in self.matrix.skipped:
                self.log(f"  skipped {skip['base']} {skip['modulation']} W{skip['w_bits']}A{skip['a_bits']} "
                         f"{skip['a_granularity']} {skip['cache']}: {skip['reason']}")
            if before is not None and todo:
                self._together(lambda: before(todo) if self.world.main else None)
            self._update_finished_metrics()  # may find finished cells' samples damaged: they run again
            todo = self.world.broadcast(self.pending() if self.world.main else None)
            ran, seen, batch = 0, set(), todo
            while batch:
                bar = tqdm(batch, desc="cells", unit="cell", disable=not self.progress)
                total = len(batch)
                for done, (key, cell) in enumerate(bar, start=1):
                    seen.add(key)
                    bar.set_postfix_str(f"{cell.method} W{cell.w_bits}A{cell.a_bits}")
                    with self._cell_lock(key) as mine:
                        if not mine or not self.world.broadcast(self._needs_run(key) if self.world.main else None):
                            # another runner has it (or just finished it)
                            self.log(f"[{done}/{total}] {cell.method} W{cell.w_bits}A{cell.a_bits}: "
                                     "run by another runner sharing this directory, skipped")
                            continue
                        row = self._run_cell(key, cell)
                    ran += 1

                    def tables(row=row, done=done, total=total) -> None:
                        if self.world.main:
                            self._write_tables()
                            self.log(f"[{done}/{total}] {_describe(row)}")

                    self._together(tables)
                bar.close()
                # a finished cell found damaged meanwhile (its reference made again) runs in this invocation
                batch = self.world.broadcast([(k, c) for k, c in self.pending() if k not in seen]
                                             if self.world.main else None)
                todo = todo + batch
            rows = self._rows() if self.world.main else []
            self._together(lambda: self._write_tables() if self.world.main else None)
        wanted = set(self.ids) if self.only is None else self.only
        failed = [r["cell_id"] for r in rows if r["status"] != "ok" and r["cell_id"] in wanted]
        return RunSummary(self.out, len(self.ids), ran, len(self.ids) - len(todo), failed,
                          len(self.matrix.skipped), time.perf_counter() - start)

    def _needs_run(self, key: str) -> bool:
        return not self._finished(key)[0]

    def _finished(self, key: str) -> tuple[bool, str | None]:
        """Whether the cell is finished; when it looks finished but is damaged, why not. Cheap: it reads
        result.json and the size of the samples file, and hashes nothing (samples are verified when
        read, see ``_load_samples``)."""
        if key in self._damaged:
            return False, self._damaged[key]
        path = self.cell_dir(key) / "result.json"
        if not path.is_file():
            return False, None
        row, reason = read_result(path, key)
        if row is None:
            return False, f"{path.relative_to(self.out)} is invalid ({reason})"
        if row["status"] != "ok":
            return False, None
        file = row["samples_file"]
        try:
            size = (self.out / file).stat().st_size
        except OSError:
            return False, f"its samples file {file} is missing"
        recorded = row.get("samples_bytes")
        if recorded is not None and size != recorded:  # cells of older versions recorded no size
            return False, f"its samples file {file} has {size} bytes, not the {recorded} written"
        return True, None

    def _log_damaged(self) -> None:
        """A note in the log for every cell that looked finished but is damaged (it runs again)."""
        for key, cell in zip(self.ids, self.matrix.cells, strict=True):
            if self.only is not None and key not in self.only:
                continue
            finished, reason = self._finished(key)
            if not finished and reason:
                self.log(f"cell {key} ({cell.method} W{cell.w_bits}A{cell.a_bits}): {reason}; running it again")

    def _write_run_json(self) -> None:
        with open(self.out / ".run-json.lock", "w") as handle:  # runners sharing the directory append in turn
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._write_run_json_locked()

    def _write_run_json_locked(self) -> None:
        path = self.out / "run.json"
        invocations, repaired = [], {}
        previous, problem = _read_run_json(path)
        if self.force:
            pass
        elif previous is not None:  # (valid, and of this matrix: _check_out_dir refused any other)
            invocations = [i for i in previous.get("invocations", []) if isinstance(i, dict)] \
                if isinstance(previous.get("invocations"), list) else []
            repaired = {k: previous[k] for k in ("repaired_utc", "repair_reason") if k in previous}
        elif self._run_json_problem is not None:  # checked: every cell present belongs to this matrix
            finished = sum(not self._needs_run(k) for k in self.ids)
            reason = f"run.json {problem}"
            repaired = {"repaired_utc": _now(), "repair_reason": f"{reason}; rebuilt from the current matrix, "
                        f"whose cells include every cell present ({finished} finished)"}
            self.log(f"warning: {path} was {problem}; rebuilt it from the current matrix ({finished} finished "
                     "cell(s) present belong to it; earlier invocations are not known)")
        invocations.append({"started_utc": _now(), "argv": self.argv, "git_revision": git_revision(),
                            "device": str(self.device), "world_size": self.world.size, "force": self.force,
                            "cells": None if self.only is None else sorted(self.only)})
        write_json_atomic(path, {
            "matrix_hash": self.matrix.matrix_hash,
            "source": self.matrix.source,
            "resolved": self.matrix.resolved(),
            "cells": [{"cell_id": k, "method": c.method, **asdict(c)}
                      for k, c in zip(self.ids, self.matrix.cells, strict=True)],
            "skipped": self.matrix.skipped,
            "models": {name: dict(m.info) for name, m in self._models.items()},
            "provenance": provenance(str(self.device)),
            "invocations": invocations,
            **repaired,
        })

    # -- one cell --------------------------------------------------------------------------
    def _run_cell(self, key: str, cell: CellSpec) -> dict | None:
        """Run one cell on every rank; rank 0 returns its row (other ranks None)."""
        directory = self.cell_dir(key)
        if self.world.main:  # leftovers of an interrupted or failed attempt, except its finished chunks
            directory.mkdir(parents=True, exist_ok=True)
            for item in directory.iterdir():
                if item.name != "chunks":
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
        self.world.barrier()
        row = self._base_row(key, cell)
        model = self._models[cell.model]
        disk_full: OSError | None = None
        try:
            # collective steps first (every rank takes part), then rank 0's own work: a failure in the
            # latter never leaves the other ranks waiting in a collective
            sampler = SamplerConfig.from_name(cell.sampler, cell.steps, cell.eta)
            reference = cell.base == "fp" and cell.cache == "none"
            if reference:
                record, row["prepare_s"] = self._reference(cell), 0.0
            else:
                t0 = time.perf_counter()
                ctx = BuildContext(model, cell, sampler, self.device, self.progress, self.out / "cache")
                # rank 0 first: what it calibrates and caches, the other ranks then load
                prepared = self._together(lambda: build(ctx) if self.world.main else None)
                prepared = self._together(lambda: prepared if self.world.main else build(ctx))
                row["prepare_s"] = time.perf_counter() - t0
                record = self._sample_chunks(prepared, model, cell, sampler, key, directory / "chunks")
            if any(METRICS[n].needs_fp_reference for n in self.matrix.metrics):
                self._reference(cell, load=False)
            if self.world.main and reference:
                path = self.reference_path(cell)
                row["samples_file"] = str(path.relative_to(self.out))
                row["samples_bytes"], row["samples_sha256"] = self._reference_digest(path)
            elif self.world.main:
                row["samples_bytes"], row["samples_sha256"] = save_torch_atomic(
                    directory / "samples.pt", {"images": record.images, "seeds": record.seeds, "cell_id": key})
                shutil.rmtree(directory / "chunks", ignore_errors=True)
                trace = self._trace(prepared, model, cell, sampler)
                if trace is not None:
                    write_json_atomic(directory / "trace.json", trace)
                    row["trace_file"] = str((directory / "trace.json").relative_to(self.out))
                row["samples_file"] = str((directory / "samples.pt").relative_to(self.out))
            if self.world.main:
                row.update(self._costs(cell, model, record, 1.0 if reference else prepared.mac_fraction))
                if not reference:
                    row["method_info"] = prepared.info
                values, missing = self._metrics(cell, record.images)
                row.update(values)
                row["missing_metrics"] = missing
                row["metrics"] = self.matrix.metrics
                row["status"] = "ok"
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a failing cell is recorded and the run goes on
            if is_disk_full(exc):  # the disk is full, not the method: stop the run, record nothing
                disk_full = exc
            else:
                row["status"] = "failed"
                row["error"] = str(exc) if isinstance(exc, RankFailed) else _one_line(exc)
                if self.world.main:
                    details = exc.details if isinstance(exc, RankFailed) else traceback.format_exc()
                    try:
                        write_atomic(directory / "error.txt", lambda tmp: tmp.write_text(details))
                    except OSError as failed_write:
                        if not is_disk_full(failed_write):
                            self.log(f"could not write {directory / 'error.txt'}: {failed_write}")
                        else:
                            failed_write.__cause__ = exc
                            disk_full = failed_write
        self._stop_if_disk_full(disk_full)  # (also the barrier: every rank finished the cell)
        if not self.world.main:
            return None
        row["finished_utc"] = _now()
        write_json_atomic(directory / "result.json", _jsonable(row))
        self._damaged.pop(key, None)
        return row

    def _stop_if_disk_full(self, error: OSError | None) -> None:
        """Raise ``error`` (a full disk) out of the run, on every rank when any rank met one."""
        if not self.world.distributed:
            if error is not None:
                raise error
            return
        found = [f for f in self.world.gather(None if error is None else (error.errno, error.strerror,
                                                                          error.filename)) if f is not None]
        if error is not None:
            raise error
        if found:
            raise OSError(*found[0])

    def _base_row(self, key: str, cell: CellSpec) -> dict:
        versions = package_versions()
        row = {c: None for c in RESULT_COLUMNS}
        row.update({"cell_id": key, "status": "running", "error": "", **asdict(cell), "method": cell.method,
                    "device": str(self.device), "world_size": self.world.size, "torch_version": versions["torch"],
                    "git_rev": git_revision(), "modiff_bench_version": versions["modiff-bench"],
                    "started_utc": _now(), "versions": versions, "missing_metrics": {}})
        return row

    def _reference(self, cell: CellSpec, load: bool = True) -> SampleRecord | None:
        """Full-precision samples for the cell's model, sampler and seeds: made once (by every rank,
        chunk by chunk), then reused. Rank 0 gets the record (unless ``load`` is False: then None, and an
        existing file checked before is not loaded again), the other ranks None. Runners sharing the
        directory make it in turn (a lock per reference), so none assembles another's half-made chunks.
        A file that is not a valid reference of these seeds (truncated, garbled, other seeds, NaN/Inf,
        not the file the full-precision cell recorded) is made again, with a note in the log, and the
        full-precision cell that recorded the old file runs again."""
        path = self.reference_path(cell)
        lock = None
        if self.world.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115 (closed below)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = None
            if self.world.main and path.is_file():
                data, reason = self._check_reference(cell, path)
                if reason is not None:  # the tool's own file, damaged: make it again
                    self.log(f"{path.relative_to(self.out)} is not a valid reference of its cells ({reason}); "
                             "regenerating it")
                    path.unlink(missing_ok=True)
            if self.world.broadcast(path.is_file() if self.world.main else None):
                if not self.world.main or not load:
                    return None
                if data is None:  # checked before by this runner: loaded only when the record is needed
                    data = _load_reference(path)
                return SampleRecord(**{k: v for k, v in data.items() if k in REFERENCE_KEYS})
            model = self._models[cell.model]
            fp_cell = CellSpec(**{**asdict(cell), "base": "fp", "cache": "none", "modulation": "off", "w_bits": 32,
                                  "a_bits": 32, "a_granularity": "none", "params": {}})
            sampler = SamplerConfig.from_name(cell.sampler, cell.steps, cell.eta)
            prepared = build(BuildContext(model, fp_cell, sampler, self.device))
            chunks = path.with_suffix(".chunks")
            record = self._sample_chunks(prepared, model, fp_cell, sampler, path.stem, chunks)

            def save() -> None:
                if self.world.main:
                    size, digest = save_torch_atomic(path, asdict(record))
                    self._references[path] = (size, path.stat().st_mtime_ns, digest)
                    shutil.rmtree(chunks, ignore_errors=True)
                    self._forget_reference_cells(path)

            self._together(save)  # (collective, so that a failed write stops every rank alike)
            return record
        finally:
            if lock is not None:
                lock.close()

    def _check_reference(self, cell: CellSpec, path: Path) -> tuple[dict | None, str | None]:
        """Validate a reference file on its first use by this runner (it is loaded for that): (its data
        or None when already checked and unchanged, None) when valid, else (None, why not)."""
        try:
            stat = path.stat()
        except OSError as exc:
            return None, f"cannot be read: {_one_line(exc)}"
        known = self._references.get(path)
        if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
            return None, None
        try:
            data = torch.load(path, weights_only=True)
        except Exception as exc:  # truncated, garbled, or not a plain tensor file
            return None, f"cannot be loaded with weights_only=True: {_one_line(exc)}"
        model = self._models[cell.model]
        reason = check_samples(data, cell.n_samples, list(cell.seeds), model.image_output_shape,
                               keys=tuple(k for k in REFERENCE_KEYS if k != "decode_seconds"))
        if reason is None and set(data) - set(REFERENCE_KEYS):
            reason = f"unexpected keys {sorted(set(data) - set(REFERENCE_KEYS))}"
        if reason is not None:
            return None, reason
        digest = None
        for key, row in self._reference_rows(path):
            if row.get("samples_sha256") is not None:
                digest = digest or sha256_file(path)
                if (stat.st_size, digest) != (row.get("samples_bytes", stat.st_size), row["samples_sha256"]):
                    return None, f"not the file whose SHA-256 the full-precision cell {key} recorded"
        self._references[path] = (stat.st_size, stat.st_mtime_ns, digest)
        return data, None

    def _reference_rows(self, path: Path) -> list[tuple[str, dict]]:
        """The finished cells whose samples are this reference file (full-precision cells), with their
        results."""
        rows = []
        for key, cell in zip(self.ids, self.matrix.cells, strict=True):
            if cell.base == "fp" and cell.cache == "none" and self.reference_path(cell) == path:
                row, _ = read_result(self.cell_dir(key) / "result.json", key)
                if row is not None and row["status"] == "ok" and self.out / row["samples_file"] == path:
                    rows.append((key, row))
        return rows

    def _forget_reference_cells(self, path: Path) -> None:
        """A reference was made again: the finished cells whose samples it is recorded the old file; they
        run again (their result is removed, so that a later run knows it too)."""
        for key, _ in self._reference_rows(path):
            (self.cell_dir(key) / "result.json").unlink(missing_ok=True)
            self._damaged[key] = f"its samples file {path.relative_to(self.out)} was made again"
            self.log(f"cell {key} (fp): its samples file {path.relative_to(self.out)} was made again; running it "
                     "again")

    def _discard_reference(self, path: Path) -> None:
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path.unlink(missing_ok=True)
            self._references.pop(path, None)

    def _reference_digest(self, path: Path) -> tuple[int, str]:
        """Size and SHA-256 of a reference file (hashed once per runner, or known from writing it)."""
        stat = path.stat()
        known = self._references.get(path)
        if known is None or known[:2] != (stat.st_size, stat.st_mtime_ns) or known[2] is None:
            known = (stat.st_size, stat.st_mtime_ns, sha256_file(path))
            self._references[path] = known
        return known[0], known[2]

    def _sample_chunks(self, prepared: Prepared, model: ZooModel, cell: CellSpec, sampler: SamplerConfig,
                       tag: str, chunk_dir: Path) -> SampleRecord | None:
        """Sample this rank's missing chunks (chunk k = seeds[k*B:(k+1)*B], rank k % world_size) into
        ``chunk_dir``; once every rank is done, rank 0 returns the whole cell's record."""
        seeds = list(cell.seeds)
        size = cell.batch_size
        chunks = [seeds[i: i + size] for i in range(0, len(seeds), size)]
        paths = [chunk_dir / f"chunk-{k:06d}.pt" for k in range(len(chunks))]

        def work() -> None:
            todo = [k for k in range(len(chunks)) if self.world.owns(k) and _read_chunk(paths[k], tag, chunks[k])
                    is None]
            if not todo:
                return
            chunk_dir.mkdir(parents=True, exist_ok=True)
            denoiser = prepared.denoiser()
            self._warm_up(prepared, denoiser, model, cell, sampler)
            desc = f"{cell.method} W{cell.w_bits}A{cell.a_bits}" if cell.base != "fp" else "full precision"
            for k in tqdm(todo, desc=desc, unit="batch", disable=not self.progress, leave=False):
                images, m = measured(lambda k=k: sample(
                    denoiser, model.schedule, sampler, chunks[k], model.image_shape, size, self.device,
                    progress=False, on_trajectory_start=prepared.start_trajectory, noise_std=prepared.noise_std,
                    on_batch=model.start_batch), self.device)
                bad = int((~images.isfinite().flatten(1).all(dim=1)).sum())
                if bad:
                    raise FloatingPointError(f"samples contain NaN/Inf ({bad} of {len(images)} images, seeds "
                                             f"{chunks[k][0]}-{chunks[k][-1]})")
                state = modiff.state_bytes(prepared.unet)
                decode_start = time.perf_counter()
                if model.decoder is not None:
                    images = model.decode(images.to(self.device)).cpu()
                    bad = int((~images.isfinite().flatten(1).all(dim=1)).sum())
                    if bad:
                        raise FloatingPointError(f"decoded images contain NaN/Inf ({bad} of {len(images)} images, "
                                                 f"seeds {chunks[k][0]}-{chunks[k][-1]})")
                decode_seconds = time.perf_counter() - decode_start
                stored = _to_float16(images, chunks[k])
                data = {"images": stored, "seeds": chunks[k], "tag": tag, "seconds": m.seconds,
                        "decode_seconds": decode_seconds, "peak_rss_bytes": m.peak_rss_bytes,
                        "cuda_peak_bytes": m.cuda_peak_bytes, "state_bytes": state, "rank": self.world.rank}
                save_torch_atomic(paths[k], data)

        def assemble() -> SampleRecord | None:
            if not self.world.main:
                return None
            parts = [_read_chunk(path, tag, chunk) for path, chunk in zip(paths, chunks, strict=True)]
            if any(part is None for part in parts):
                raise RuntimeError(f"chunks missing in {chunk_dir} after sampling")
            cuda = [p["cuda_peak_bytes"] for p in parts if p["cuda_peak_bytes"] is not None]
            return SampleRecord(
                images=torch.cat([p["images"] for p in parts]), seeds=seeds,
                seconds=float(sum(p["seconds"] for p in parts)),
                peak_rss_bytes=max(p["peak_rss_bytes"] for p in parts), cuda_peak_bytes=max(cuda) if cuda else None,
                state_bytes=max(p["state_bytes"] for p in parts),
                decode_seconds=float(sum(p["decode_seconds"] for p in parts)))

        self._together(work)
        return self._together(assemble)

    def _warm_up(self, prepared: Prepared, denoiser, model: ZooModel, cell: CellSpec, sampler: SamplerConfig) -> None:
        """Untimed: two denoiser calls at the batch size (allocator, kernel selection, caches)."""
        n = min(cell.batch_size, cell.n_samples)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((n, *model.image_shape), generator=generator).to(self.device)
        t = torch.full((n,), sampler.evaluation_timesteps(model.schedule)[0], dtype=torch.long, device=self.device)
        if model.start_batch is not None:
            model.start_batch(list(cell.seeds)[:n])
        prepared.start_trajectory()
        with torch.no_grad():
            for _ in range(2):
                denoiser(x, t)

    def _trace(self, prepared: Prepared, model: ZooModel, cell: CellSpec, sampler: SamplerConfig) -> dict | None:
        """Paper Fig. 3: per step, the relative L2 error of one layer's output against the same
        layer (same, possibly quantized, weights) with float activations on the same input, over
        an untimed pass on the first ``trace_samples`` seeds. It isolates the activation error
        that modulation and error compensation act on."""
        name = self.matrix.run.get("trace_layer")
        layer = dict(prepared.unet.named_modules()).get(name) if name else None
        if not isinstance(layer, QuantLayer):
            return None
        timesteps = sampler.evaluation_timesteps(model.schedule)
        errors: list[float | None] = [None] * len(timesteps)  # None: the layer did not run (caching)
        step = {"index": -1}

        def hook(module, inputs, output):
            reference = module.linear(inputs[0], bias=True)
            errors[step["index"]] = float((output - reference).norm() / reference.norm().clamp_min(1e-12))

        inner = prepared.denoiser()

        def denoiser(x, t):
            step["index"] += 1
            return inner(x, t)

        def start() -> None:
            step["index"] = -1
            prepared.start_trajectory()

        seeds = list(cell.seeds)[: self.matrix.run["trace_samples"]]
        handle = layer.register_forward_hook(hook)
        try:
            sample(denoiser, model.schedule, sampler, seeds, model.image_shape, len(seeds), self.device,
                   progress=False, on_trajectory_start=start, noise_std=prepared.noise_std,
                   on_batch=model.start_batch)
        finally:
            handle.remove()
        return {"layer": name, "timesteps": timesteps, "rel_l2": errors, "seeds": [seeds[0], seeds[-1]],
                "reference": "same layer, float activations, same input"}

    def _costs(self, cell: CellSpec, model: ZooModel, record: SampleRecord, mac_fraction: float = 1.0) -> dict:
        """Wall-clock, memory and compute. ``mac_fraction`` (caching) scales the MACs and GBops of the
        full UNet to the average step actually run."""
        from modiff.accounting import gbops_honest, gbops_paper

        if cell.model not in self._macs:
            self._macs[cell.model] = _count_model_macs(model, self.device)
        report = self._macs[cell.model]
        out = {"macs_g": mac_fraction * report.total_macs / 1e9, "wall_s": record.seconds,
               "decode_s": record.decode_seconds,
               "img_per_s": cell.n_samples / record.seconds if record.seconds > 0 else None,
               "peak_rss_mb": record.peak_rss_bytes / 2**20, "state_mb": record.state_bytes / 2**20,
               "cuda_peak_mb": None if record.cuda_peak_bytes is None else record.cuda_peak_bytes / 2**20}
        out["peak_mem_mb"] = out["cuda_peak_mb"] if out["cuda_peak_mb"] is not None else out["peak_rss_mb"]
        try:  # 0-bit activations (pure caching) have no paper convention
            out["gbops"] = mac_fraction * gbops_paper(report, cell.w_bits, cell.a_bits)
            sampler = SamplerConfig.from_name(cell.sampler, cell.steps, cell.eta)
            calls = len(sampler.evaluation_timesteps(model.schedule))
            out["gbops_honest"] = mac_fraction * gbops_honest(report, cell.w_bits, cell.a_bits, calls,
                                                              cell.modulation)
        except ValueError:
            out["gbops"] = out["gbops_honest"] = None
        return out

    def _metrics(self, cell: CellSpec, images: torch.Tensor, names: list[str] | None = None):
        names = names or self.matrix.metrics
        reference = None
        if any(METRICS[n].needs_fp_reference for n in names):  # made (and checked) beforehand by every rank
            reference = _load_reference(self.reference_path(cell))["images"]
        inception = None
        if any(n in INCEPTION_METRICS for n in names):
            from .inception import InceptionSettings

            inception = InceptionSettings(device=str(self.device), **self.matrix.inception)
        # the stored float16 samples as they are: metrics convert chunk by chunk (LSUN at 50k would need 39 GB
        # as one float32 tensor)
        values, missing = compute_metrics(names, MetricInputs(images, cell.model, cell.checkpoint, reference,
                                                               inception))
        if inception is not None:  # provenance of the Inception columns: which weights file, its SHA-256
            from .inception import weights_used

            values["inception_weights"] = weights_used() or None
        return values, missing

    def _update_finished_metrics(self) -> None:
        """Finished cells lacking a metric the matrix now asks for get it from their saved samples; a
        cell whose samples file turns out damaged (hash, or unreadable) is marked to run again."""
        todo = []
        if self.world.main:
            for key, cell in zip(self.ids, self.matrix.cells, strict=True):
                if self._needs_run(key) or (self.only is not None and key not in self.only):
                    continue
                row, _ = read_result(self.cell_dir(key) / "result.json", key)
                wanted = [n for n in self.matrix.metrics if n not in (row.get("metrics") or [])]
                if wanted:
                    todo.append((key, cell, wanted))
        for key, cell, wanted in self.world.broadcast(todo):  # the same list on every rank
            if any(METRICS[n].needs_fp_reference for n in wanted):
                self._reference(cell, load=False)  # every rank takes part in making it

            def update(key=key, cell=cell, wanted=wanted) -> None:
                if not self.world.main:
                    return
                path = self.cell_dir(key) / "result.json"
                row, _ = read_result(path, key)
                if row is None:
                    return
                samples, reason = self._load_samples(cell, row)
                if samples is None:
                    self._damaged[key] = reason
                    self.log(f"cell {key} ({cell.method} W{cell.w_bits}A{cell.a_bits}): {reason}; sampling it "
                             "again")
                    if self.out / row["samples_file"] == self.reference_path(cell):
                        self._discard_reference(self.reference_path(cell))  # the fp cell's samples: made again
                    return
                values, missing = self._metrics(cell, samples, wanted)
                if "inception_weights" in values and row.get("inception_weights"):  # keep what earlier metrics used
                    values["inception_weights"] = {**row["inception_weights"], **(values["inception_weights"] or {})}
                row.update(_jsonable(values))
                row["missing_metrics"] = {**(row.get("missing_metrics") or {}), **missing}
                row["metrics"] = list(dict.fromkeys([*(row.get("metrics") or []), *wanted]))
                write_json_atomic(path, row)
                self.log(f"added {', '.join(wanted)} to finished cell {key} ({cell.method})")

            self._together(update)

    def _load_samples(self, cell: CellSpec, row: dict) -> tuple[torch.Tensor | None, str | None]:
        """A finished cell's stored images, verified against the size and SHA-256 recorded when they were
        written (cells of older versions recorded none: then loadable and the right images is all that
        is checked); (None, why) when damaged."""
        file = row["samples_file"]
        path = self.out / file
        if row.get("samples_sha256") is not None:
            try:
                size, digest = path.stat().st_size, sha256_file(path)
            except OSError as exc:
                return None, f"its samples file {file} cannot be read ({_one_line(exc)})"
            if (size, digest) != (row.get("samples_bytes", size), row["samples_sha256"]):
                return None, f"its samples file {file} does not match the SHA-256 recorded when it was written"
        try:
            data = torch.load(path, weights_only=True)
        except Exception as exc:
            return None, f"its samples file {file} cannot be loaded ({_one_line(exc)})"
        reason = check_samples(data, cell.n_samples, list(cell.seeds))
        if reason is not None:
            return None, f"its samples file {file} {reason}"
        return data["images"], None

    # -- the table -------------------------------------------------------------------------
    def _rows(self) -> list[dict]:
        """The valid results of this matrix's cells (an invalid result.json is not a row: its cell runs
        again)."""
        return collect_rows(self.out, self.ids)

    def _write_tables(self) -> None:
        write_tables(self.out, self._rows(), self.matrix.metrics)


def markdown_table(frame, metrics: list[str]) -> str:
    """A flat Markdown view of the main columns (the paper-style tables are the report's job)."""
    metric_columns = [c for name in metrics for c in METRICS[name].columns]
    columns = ["method", "w_bits", "a_bits", "a_granularity", *metric_columns, "gbops", "wall_s", "status"]
    view = frame[columns].copy()
    for column in metric_columns + ["gbops", "wall_s"]:
        view[column] = view[column].map(lambda v: "" if v != v else f"{v:.4g}")  # NaN -> empty
    return view.to_markdown(index=False) + "\n"


def _jsonable(row: dict) -> dict:
    """JSON has no inf/nan: store them as strings 'inf' / 'nan' (pandas reads them back as floats)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = str(v)
        else:
            out[k] = v
    return out


def _to_float16(images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """The samples as stored (float16), refused when that overflows: values beyond +-65504 in [-1, 1]
    images are a broken method, and storing float32 instead would double a 19.6 GB cell."""
    stored = images.to(torch.float16)
    bad = int((~stored.isfinite().flatten(1).all(dim=1)).sum())
    if bad:
        largest = float(images.abs().max())
        raise FloatingPointError(f"samples overflow float16, the storage format ({bad} of {len(images)} images "
                                 f"beyond +-{FLOAT16_MAX:.0f}, largest |value| {largest:.3g}; seeds "
                                 f"{seeds[0]}-{seeds[-1]})")
    return stored


REFERENCE_KEYS = tuple(f.name for f in fields(SampleRecord))


def _load_reference(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"cannot load the full-precision reference {path}: {_one_line(exc)}") from exc


def _read_run_json(path: Path) -> tuple[dict | None, str]:
    """(run.json's content, "") when it describes a run, else (None, what is wrong with it)."""
    if not path.exists():
        return None, "missing"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({_one_line(exc)})"
    if not isinstance(data, dict) or not isinstance(data.get("matrix_hash"), str):
        return None, f"not a run description (a JSON {type(data).__name__} without matrix_hash)"
    return data, ""


def _describe(row: dict) -> str:
    head = f"{row['method']} W{row['w_bits']}A{row['a_bits']} {row['a_granularity']}"
    if row["status"] != "ok":
        return f"{head}: FAILED {row['error']}"
    shown = [f"{c} {float(row[c]):.3g}" for c in METRIC_COLUMNS if row.get(c) is not None]
    return f"{head}: {'  '.join(shown)}  ({row['wall_s']:.1f} s sampling)"


def _try_flock(handle, mode: int, patience_s: float = 0.0) -> bool:
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)


def _read_chunk(path: Path, tag: str, seeds: list[int]) -> dict | None:
    """A finished chunk file of this cell and these seeds, or None (missing, unreadable, foreign or
    damaged: it is sampled again)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
    except Exception:  # truncated or corrupt: sample it again
        return None
    if not isinstance(data, dict) or data.get("tag") != tag:
        return None
    keys = ("images", "seeds", "seconds", "decode_seconds", "peak_rss_bytes", "cuda_peak_bytes", "state_bytes")
    return data if check_samples(data, len(seeds), seeds, keys=keys) is None else None


def _count_model_macs(model: ZooModel, device: torch.device):
    """MACs of one denoiser call on one image (on the doubled batch for classifier-free guidance)."""
    from modiff.accounting import count_macs

    denoiser = model.denoiser()
    x = torch.zeros((1, *model.image_shape), device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    if model.start_batch is not None:
        model.start_batch([0])
    class Call(torch.nn.Module):  # count_macs hooks the modules of what it calls: the UNet inside
        def __init__(self):
            super().__init__()
            self.unet = model.unet

        def forward(self, x, t):
            return denoiser(x, t)

    return count_macs(Call(), x, t)


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_device(device)


def run_matrix(matrix: Matrix, out: str | Path, **kwargs) -> RunSummary:
    return Runner(matrix, out, **kwargs).run()


def read_results(out: str | Path):
    """The results table of a run directory as a DataFrame: built from its cells' valid results (the
    tables on disk may be stale or damaged), or read from results.parquet when it has no cells."""
    import pandas as pd

    out = Path(out)
    if list(out.glob("cells/*/result.json")):
        return table_frame(collect_rows(out))
    path = out / "results.parquet"
    if not path.is_file():
        raise BenchError(f"no results in {out} (expected {path})")
    try:
        return pd.read_parquet(path)
    except Exception as exc:
        raise BenchError(f"cannot read {path}: {_one_line(exc)}") from None


