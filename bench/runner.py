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
from dataclasses import asdict, dataclass
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
from .provenance import git_revision, package_versions, provenance, write_atomic, write_json_atomic
from .samplers import SamplerConfig, sample
from .zoo import ZooModel, load_model, resolve_device

SETTING_COLUMNS = ("model", "checkpoint", "sampler", "steps", "eta", "n_samples", "seed", "batch_size", "method",
                   "base", "modulation", "cache", "w_bits", "a_bits", "a_granularity")
METRIC_COLUMNS = ALL_COLUMNS
COST_COLUMNS = ("gbops", "gbops_honest", "macs_g", "state_mb", "prepare_s", "wall_s", "img_per_s", "decode_s",
                "peak_mem_mb", "peak_rss_mb", "cuda_peak_mb")
PROVENANCE_COLUMNS = ("device", "world_size", "torch_version", "git_rev", "modiff_bench_version", "started_utc",
                      "finished_utc", "samples_file", "trace_file", "params", "method_info", "missing_metrics",
                      "versions")
RESULT_COLUMNS = ("cell_id", "status", "error", *SETTING_COLUMNS, *METRIC_COLUMNS, *COST_COLUMNS,
                  *PROVENANCE_COLUMNS)
JSON_COLUMNS = ("params", "method_info", "missing_metrics", "versions")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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
        run_json = self.out / "run.json"
        if self.out.exists() and not self.out.is_dir():
            raise BenchError(f"--out {self.out} exists and is not a directory")
        if not run_json.is_file() or self.force:
            if not run_json.is_file() and (self.out / "cells").is_dir() and not self.force:
                raise BenchError(f"{self.out} holds cell results but no run.json; use another --out or --force")
            return
        try:
            previous = json.loads(run_json.read_text())
        except (OSError, ValueError) as exc:
            raise BenchError(f"cannot read {run_json}: {exc}; use another --out or --force") from None
        if previous.get("matrix_hash") != self.matrix.matrix_hash:
            raise BenchError(
                f"{self.out} holds results of a different matrix ({previous.get('source', '?')}, "
                f"{len(previous.get('cells', []))} cells); use another --out, or --force to replace them")

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
                       str(exc) if isinstance(exc, BenchError) else None)
        failures = [f for f in self.world.gather(failure) if f is not None]
        if failures:
            rank, message, details, user_error = failures[0]
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
            self._update_finished_metrics()
            ran = 0
            bar = tqdm(todo, desc="cells", unit="cell", disable=not self.progress)
            for done, (key, cell) in enumerate(bar, start=1):
                bar.set_postfix_str(f"{cell.method} W{cell.w_bits}A{cell.a_bits}")
                with self._cell_lock(key) as mine:
                    if not mine or not self.world.broadcast(self._needs_run(key) if self.world.main else None):
                        # another runner has it (or just finished it)
                        self.log(f"[{done}/{len(todo)}] {cell.method} W{cell.w_bits}A{cell.a_bits}: "
                                 "run by another runner sharing this directory, skipped")
                        continue
                    row = self._run_cell(key, cell)
                ran += 1

                def tables(row=row, done=done) -> None:
                    if self.world.main:
                        self._write_tables()
                        self.log(f"[{done}/{len(todo)}] {_describe(row)}")

                self._together(tables)
            bar.close()
            rows = self._rows() if self.world.main else []
            self._together(lambda: self._write_tables() if self.world.main else None)
        wanted = set(self.ids) if self.only is None else self.only
        failed = [r["cell_id"] for r in rows if r["status"] != "ok" and r["cell_id"] in wanted]
        return RunSummary(self.out, len(self.ids), ran, len(self.ids) - len(todo), failed,
                          len(self.matrix.skipped), time.perf_counter() - start)

    def _needs_run(self, key: str) -> bool:
        result = self.cell_dir(key) / "result.json"
        if not result.is_file():
            return True
        try:
            return json.loads(result.read_text()).get("status") != "ok"
        except (OSError, ValueError):
            return True

    def _write_run_json(self) -> None:
        with open(self.out / ".run-json.lock", "w") as handle:  # runners sharing the directory append in turn
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._write_run_json_locked()

    def _write_run_json_locked(self) -> None:
        path = self.out / "run.json"
        invocations = []
        if path.is_file() and not self.force:
            try:
                invocations = json.loads(path.read_text()).get("invocations", [])
            except (OSError, ValueError):
                invocations = []
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
                self._reference(cell)
            if self.world.main and reference:
                row["samples_file"] = str(self.reference_path(cell).relative_to(self.out))
            elif self.world.main:
                write_atomic(directory / "samples.pt", lambda tmp: torch.save(
                    {"images": record.images, "seeds": record.seeds, "cell_id": key}, tmp))
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
            row["status"] = "failed"
            row["error"] = str(exc) if isinstance(exc, RankFailed) else _one_line(exc)
            if self.world.main:
                details = exc.details if isinstance(exc, RankFailed) else traceback.format_exc()
                (directory / "error.txt").write_text(details)
        self.world.barrier()
        if not self.world.main:
            return None
        row["finished_utc"] = _now()
        write_json_atomic(directory / "result.json", _jsonable(row))
        return row

    def _base_row(self, key: str, cell: CellSpec) -> dict:
        versions = package_versions()
        row = {c: None for c in RESULT_COLUMNS}
        row.update({"cell_id": key, "status": "running", "error": "", **asdict(cell), "method": cell.method,
                    "device": str(self.device), "world_size": self.world.size, "torch_version": versions["torch"],
                    "git_rev": git_revision(), "modiff_bench_version": versions["modiff-bench"],
                    "started_utc": _now(), "versions": versions, "missing_metrics": {}})
        return row

    def _reference(self, cell: CellSpec) -> SampleRecord | None:
        """Full-precision samples for the cell's model, sampler and seeds: made once (by every rank,
        chunk by chunk), then reused. Rank 0 gets the record, the other ranks None. Runners sharing the
        directory make it in turn (a lock per reference), so none assembles another's half-made chunks."""
        path = self.reference_path(cell)
        lock = None
        if self.world.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115 (closed below)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if self.world.broadcast(path.is_file() if self.world.main else None):
                return SampleRecord(**torch.load(path, weights_only=True)) if self.world.main else None
            model = self._models[cell.model]
            fp_cell = CellSpec(**{**asdict(cell), "base": "fp", "cache": "none", "modulation": "off", "w_bits": 32,
                                  "a_bits": 32, "a_granularity": "none", "params": {}})
            sampler = SamplerConfig.from_name(cell.sampler, cell.steps, cell.eta)
            prepared = build(BuildContext(model, fp_cell, sampler, self.device))
            chunks = path.with_suffix(".chunks")
            record = self._sample_chunks(prepared, model, fp_cell, sampler, path.stem, chunks)

            def save() -> None:
                if self.world.main:
                    write_atomic(path, lambda tmp: torch.save(asdict(record), tmp))
                    shutil.rmtree(chunks, ignore_errors=True)

            self._together(save)  # (collective, so that a failed write stops every rank alike)
            return record
        finally:
            if lock is not None:
                lock.close()

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
                decode_seconds = time.perf_counter() - decode_start
                data = {"images": images.to(torch.float16), "seeds": chunks[k], "tag": tag, "seconds": m.seconds,
                        "decode_seconds": decode_seconds, "peak_rss_bytes": m.peak_rss_bytes,
                        "cuda_peak_bytes": m.cuda_peak_bytes, "state_bytes": state, "rank": self.world.rank}
                write_atomic(paths[k], lambda tmp, data=data: torch.save(data, tmp))

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
        if any(METRICS[n].needs_fp_reference for n in names):  # made beforehand by every rank
            reference = torch.load(self.reference_path(cell), weights_only=True)["images"]
        inception = None
        if any(n in INCEPTION_METRICS for n in names):
            from .inception import InceptionSettings

            inception = InceptionSettings(device=str(self.device), **self.matrix.inception)
        # the stored float16 samples as they are: metrics convert chunk by chunk (LSUN at 50k would need 39 GB
        # as one float32 tensor)
        return compute_metrics(names, MetricInputs(images, cell.model, cell.checkpoint, reference, inception))

    def _update_finished_metrics(self) -> None:
        """Finished cells lacking a metric the matrix now asks for get it from their saved samples."""
        todo = []
        if self.world.main:
            for key, cell in zip(self.ids, self.matrix.cells, strict=True):
                if self._needs_run(key) or (self.only is not None and key not in self.only):
                    continue
                row = json.loads((self.cell_dir(key) / "result.json").read_text())
                wanted = [n for n in self.matrix.metrics if n not in row.get("metrics", [])]
                if wanted:
                    todo.append((key, cell, wanted))
        for key, cell, wanted in self.world.broadcast(todo):  # the same list on every rank
            if any(METRICS[n].needs_fp_reference for n in wanted):
                self._reference(cell)  # every rank takes part in making it

            def update(key=key, cell=cell, wanted=wanted) -> None:
                if not self.world.main:
                    return
                path = self.cell_dir(key) / "result.json"
                row = json.loads(path.read_text())
                samples = torch.load(self.out / row["samples_file"], weights_only=True)["images"]
                values, missing = self._metrics(cell, samples, wanted)
                row.update(_jsonable(values))
                row["missing_metrics"] = {**row.get("missing_metrics", {}), **missing}
                row["metrics"] = list(dict.fromkeys([*row.get("metrics", []), *wanted]))
                write_json_atomic(path, row)
                self.log(f"added {', '.join(wanted)} to finished cell {key} ({cell.method})")

            self._together(update)

    # -- the table -------------------------------------------------------------------------
    def _rows(self) -> list[dict]:
        rows = []
        for key in self.ids:
            path = self.cell_dir(key) / "result.json"
            if path.is_file():
                rows.append(json.loads(path.read_text()))
        return rows

    def _write_tables(self) -> None:
        import pandas as pd

        rows = self._rows()
        frame = pd.DataFrame([{c: r.get(c) for c in RESULT_COLUMNS} for r in rows], columns=list(RESULT_COLUMNS))
        for column in JSON_COLUMNS:
            frame[column] = [json.dumps(v, sort_keys=True) if v is not None else None for v in frame[column]]
        for column in (*METRIC_COLUMNS, *COST_COLUMNS):
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        write_atomic(self.out / "results.csv", lambda tmp: frame.to_csv(tmp, index=False))
        write_atomic(self.out / "results.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
        text = markdown_table(frame, self.matrix.metrics)
        write_atomic(self.out / "results.md", lambda tmp: tmp.write_text(text))


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
    """A finished chunk file of this cell and these seeds, or None (missing, unreadable or foreign)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
    except Exception:  # truncated or corrupt: sample it again
        return None
    return data if data.get("tag") == tag and list(data.get("seeds", [])) == list(seeds) else None


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
    """The results table of a run directory as a DataFrame."""
    import pandas as pd

    path = Path(out) / "results.parquet"
    if not path.is_file():
        raise BenchError(f"no results in {out} (expected {path})")
    return pd.read_parquet(path)


