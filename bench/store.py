"""The run directory: what is on disk, and nothing else (no models, no torch.distributed).

Layout::

    DIR/run.json                  resolved matrix, skipped combinations, versions, every invocation
    DIR/results.csv, .parquet     one row per cell (rebuilt from the cell files after every cell)
    DIR/results.md                the main columns as a Markdown table
    DIR/cells/<cell_id>/result.json   the row of one cell: settings, costs, provenance (the generation
                                  record) and the metrics computed so far (the metrics record)
    DIR/cells/<cell_id>/samples.pt    its samples and seeds (float16: the sampler's output, unclipped;
                                  nominally in [-1, 1], not confined to it)
    DIR/cells/<cell_id>/trace.json    per-step error of ``run.trace_layer`` (optional)
    DIR/cells/<cell_id>/chunks/   while a cell is generated: one file per batch of seeds
    DIR/reference/<key>.pt        full-precision samples shared by every cell with the same
                                  model, sampler, steps, eta, seeds and batch size
    DIR/reference/<key>.pt.sha256.json   its size and SHA-256, written with it
    DIR/cache/                    calibration data and calibrated models methods keep for reuse
                                  (keyed by what they depend on; safe to delete)
    DIR/locks/, .lock             the per-cell locks and the directory lock
    DIR/run.log                   what each invocation did

Every file is written to a temporary name and renamed, and ``result.json`` is written last, so a
crash or SIGKILL leaves either a finished cell or none: a rerun skips finished cells and generates
the others (failed cells are retried). Rows come from the cell files alone, so none is ever
duplicated.

The files are the tool's own, so damage found in them is repaired, never a reason to refuse later
runs (each repair is a note in ``run.log``):

- ``result.json`` is validated (``check_result``): an invalid one means the cell is not finished, and
  the tables leave it out;
- ``result.json`` records the size and SHA-256 of the samples file (``samples_bytes``,
  ``samples_sha256``; for the full-precision cell, of its reference file). Deciding what is finished
  compares the size only (cheap: a cell may be 19.6 GB); reading the samples (a metric) verifies the
  hash. A missing, resized or mismatching file means the cell is generated again. Cells of older
  versions recorded neither: they count as finished while their file exists and loads. A mismatch
  found by ``modiff-bench evaluate`` is recorded in the cell's ``result.json`` (``damaged``, the
  reason), so that the next run generates the cell again;
- a reference file records its size and SHA-256 beside it when written (``<key>.pt.sha256.json``);
  it is checked whenever a process first reads it (the record, loadable with ``weights_only=True``,
  its keys, one finite image per seed, the seeds, the SHA-256 its full-precision cell recorded) and
  made again when it is not valid (that cell then runs again). A reference without a record (an
  older version's, or one whose writer died between the two files) is adopted when a
  full-precision cell recorded its hash, else made again;
- a missing or unreadable ``run.json`` is rebuilt from the current matrix when every cell present
  belongs to it (``repaired_utc`` and ``repair_reason`` say so); cells of another matrix are refused;
- ``results.*`` are derived: rebuilt from the cells after every cell (and by the report when stale).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch

from .cell import (
    COST_COLUMNS,
    LATER_DEFAULTS,
    NON_METRIC_COLUMNS,
    PROVENANCE_COLUMNS,
    SETTING_COLUMNS,
    CellSpec,
    IdRules,
    cell_id,
    id_settings,
    later_settings,
    settings_id,
)
from .errors import BenchError, plain
from .metrics import ALL_COLUMNS, METRICS, metric_columns
from .provenance import save_torch_atomic, sha256_file, write_atomic, write_json_atomic

METRIC_COLUMNS = ALL_COLUMNS  # the built-in metrics' (a user metric adds its own: see result_columns)
RESULT_COLUMNS = ("cell_id", "status", "error", *SETTING_COLUMNS, *METRIC_COLUMNS, *COST_COLUMNS,
                  *PROVENANCE_COLUMNS)
JSON_COLUMNS = ("params", "method_info", "missing_metrics", "versions", "inception_weights", "timing_env",
                "method_versions")
FP_REFERENCE_KEYS = ("images", "seeds", "seconds", "peak_rss_bytes", "cuda_peak_bytes", "state_bytes",
                     "decode_seconds", "batch_seconds", "reused")
# absent in references made by older versions
OPTIONAL_FP_REFERENCE_KEYS = ("decode_seconds", "batch_seconds", "reused")
CHUNK_KEYS = ("images", "seeds", "seconds", "decode_seconds", "peak_rss_bytes", "cuda_peak_bytes", "state_bytes")


class ResolvedMatrix(Protocol):
    """What the store reads of a resolved matrix (``bench.matrix.Matrix``): its cells, and the rules
    their ids were computed under (``bench.registry.ID_RULES``)."""

    source: str
    cells: list[CellSpec]
    skipped: list[dict[str, Any]]
    id_rules: IdRules

    @property
    def metrics(self) -> list[str]: ...

    @property
    def matrix_hash(self) -> str: ...

    def resolved(self) -> dict[str, Any]: ...


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def one_line(exc: BaseException) -> str:
    text = plain(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def result_columns(rows: list[dict] = ()) -> tuple[str, ...]:
    """The results table's columns: the settings, every registered metric's columns (user metrics
    after the built-in ones), the columns of metrics these rows recorded that are not registered in
    this process (``metric_columns``), the costs and the provenance."""
    metrics = list(dict.fromkeys([*METRIC_COLUMNS, *metric_columns()]))
    for row in rows:
        for columns in (row.get("metric_columns") or {}).values():
            metrics.extend(c for c in columns if c not in metrics and c not in NON_METRIC_COLUMNS)
    return ("cell_id", "status", "error", *SETTING_COLUMNS, *metrics, *COST_COLUMNS, *PROVENANCE_COLUMNS)


# -- what a valid result.json holds -----------------------------------------------------------
_INT_SETTINGS = ("steps", "n_samples", "seed", "batch_size", "w_bits", "a_bits")
_STR_SETTINGS = ("model", "sampler", "method", "base", "modulation", "cache", "a_granularity", "execution", "dtype",
                 "memory_format")
_NUMBER_STRINGS = ("inf", "-inf", "nan")  # what jsonable writes for non-finite floats


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
    recorded = row.get("metric_columns")
    if recorded is not None and not (isinstance(recorded, dict) and all(
            isinstance(v, list) and all(isinstance(c, str) for c in v) for v in recorded.values())):
        return f"metric_columns is {recorded!r}, not metric -> list of columns"
    extra = [c for v in (recorded or {}).values() for c in v]
    for column in (*METRIC_COLUMNS, *metric_columns(), *extra, *COST_COLUMNS):
        value = row.get(column)
        if value is not None and not _is_number(value) and value not in _NUMBER_STRINGS:
            return f"{column} is {value!r}, not a number"
    if row.get("error") is not None and not isinstance(row["error"], str):
        return f"error is {row['error']!r}, not a string"
    for column in ("params", "missing_metrics", "versions", "timing_env", "method_versions", "metric_versions"):
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
    if row.get("damaged") is not None and not isinstance(row["damaged"], str):
        return f"damaged is {row['damaged']!r}, not a reason"
    return None


def read_result(path: Path, key: str) -> tuple[dict | None, str | None]:
    """``cells/<key>/result.json``: (the row, None) when valid, else (None, why not)."""
    try:
        row = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # ValueError: truncated or not JSON (also UnicodeDecodeError)
        return None, f"unreadable: {one_line(exc)}"
    if isinstance(row, dict):  # written before these settings existed: at their defaults
        for setting, default in LATER_DEFAULTS.items():
            row.setdefault(setting, default)
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


def param_columns(row: dict) -> dict:
    """A row's method parameters as flat columns, ``p_<method>_<field>`` (benchopt's convention), so
    that a table of any matrix can be filtered and grouped by any parameter without decoding JSON."""
    params = row.get("params") if isinstance(row.get("params"), dict) else {}
    return {f"p_{method}_{name}": value for method, values in sorted(params.items()) if isinstance(values, dict)
            for name, value in sorted(values.items())}


_SAME_BASELINE = ("model", "checkpoint", "sampler", "steps", "eta", "n_samples", "seed", "batch_size", "device")


def speed_ratios(rows: list[dict]) -> list[dict]:
    """Copies of ``rows`` with ``speedup_fp32`` / ``speedup_bf16``: each cell's images per second over
    those of the full-precision cell (``fp``, no cache) of the same model, checkpoint, sampler, steps,
    seeds, batch and device in float32 / bfloat16 (the faster memory format where the run has both),
    from the same run; empty where that cell is not in the run (or did not finish)."""
    def key(row: dict) -> tuple:
        return tuple(json.dumps(row.get(k)) for k in _SAME_BASELINE)

    baselines: dict[tuple, float] = {}  # the fastest full-precision cell of each dtype (over memory formats)
    for r in rows:
        if r.get("base") == "fp" and r.get("cache") == "none" and r.get("status") == "ok" \
                and _is_number(r.get("img_per_s")):
            k = (key(r), r.get("dtype", "float32"))
            baselines[k] = max(baselines.get(k, 0.0), r["img_per_s"])
    out = []
    for row in rows:
        row = dict(row)
        for column, dtype in (("speedup_fp32", "float32"), ("speedup_bf16", "bfloat16")):
            base, mine = baselines.get((key(row), dtype)), row.get("img_per_s")
            row[column] = mine / base if _is_number(mine) and _is_number(base) and base > 0 \
                and row.get("status") == "ok" else None
        out.append(row)
    return out


def table_frame(rows: list[dict]):
    """The results table (one row per cell: the columns of ``result_columns``, then the method
    parameters as ``p_<method>_<field>`` columns) of these rows."""
    import pandas as pd

    columns = list(result_columns(rows))
    rows = speed_ratios(rows)
    flat = [param_columns(r) for r in rows]
    params = sorted({c for f in flat for c in f})
    frame = pd.DataFrame([{**{c: r.get(c) for c in columns}, **f} for r, f in zip(rows, flat, strict=True)],
                         columns=columns + params)
    for column in params:  # one type per column (parquet), empty where a cell lacks the parameter
        values = [f.get(column) for f in flat]
        kinds = {type(v) for v in values if v is not None}
        dtype = {frozenset({bool}): "boolean", frozenset({int}): "Int64", frozenset({int, float}): "float64",
                 frozenset({float}): "float64", frozenset({str}): "string"}.get(frozenset(kinds))
        if dtype is None and kinds:  # lists, tables or a mix of kinds: kept as JSON text
            values, dtype = [None if v is None else json.dumps(v) for v in values], "string"
        frame[column] = pd.array(values, dtype=dtype or "string")
    for column in JSON_COLUMNS:
        frame[column] = [json.dumps(v, sort_keys=True) if v is not None else None for v in frame[column]]
    numeric = [c for c in columns[3 + len(SETTING_COLUMNS):] if c not in PROVENANCE_COLUMNS]
    for column in numeric:  # the metric and cost columns
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def markdown_table(frame, metrics: list[str], recorded: dict[str, list[str]] | None = None) -> str:
    """A flat Markdown view of the main columns (the paper-style tables are the report's job).
    ``recorded``: the columns of metrics not registered in this process, as the rows recorded them."""
    recorded = recorded or {}
    metric_columns_ = [c for name in metrics for c in (METRICS[name].columns if name in METRICS
                                                        else recorded.get(name, ())) if c in frame]
    columns = ["method", "w_bits", "a_bits", "a_granularity", *metric_columns_, "gbops", "wall_s", "status"]
    view = frame[columns].copy()
    for column in metric_columns_ + ["gbops", "wall_s"]:
        view[column] = view[column].map(lambda v: "" if v != v else f"{v:.4g}")  # NaN -> empty
    return view.to_markdown(index=False) + "\n"


def markdown_text(rows: list[dict], frame, metrics: list[str] | None = None) -> str:
    """``results.md`` of these rows (``frame``: their table): the columns of ``metrics`` (default every
    metric some row computed), from the registry or, for a plugin this process has not imported, from
    what the rows recorded: the same text whichever plugins are imported."""
    if metrics is None:
        metrics = list(dict.fromkeys(m for r in rows for m in (r.get("metrics") or [])))
    recorded = {name: list(columns) for r in rows for name, columns in (r.get("metric_columns") or {}).items()}
    return markdown_table(frame, list(dict.fromkeys(metrics)), recorded)


def write_tables(out: str | Path, rows: list[dict], metrics: list[str] | None = None):
    """Write ``results.csv``, ``results.parquet`` and ``results.md`` of a run directory from its rows;
    ``metrics``: the columns of results.md (default: every metric some row computed). Returns the frame."""
    out = Path(out)
    frame = table_frame(rows)
    write_atomic(out / "results.csv", lambda tmp: frame.to_csv(tmp, index=False))
    write_atomic(out / "results.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
    text = markdown_text(rows, frame, metrics)
    write_atomic(out / "results.md", lambda tmp: tmp.write_text(text))
    return frame


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
        raise BenchError(f"cannot read {path}: {one_line(exc)}") from None


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


def jsonable(row: dict) -> dict:
    """JSON has no inf/nan: store them as strings 'inf' / 'nan' (pandas reads them back as floats)."""
    return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def read_run_json(path: Path) -> tuple[dict | None, str]:
    """(run.json's content, "") when it describes a run, else (None, what is wrong with it)."""
    if not path.exists():
        return None, "missing"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({one_line(exc)})"
    if not isinstance(data, dict) or not isinstance(data.get("matrix_hash"), str):
        return None, f"not a run description (a JSON {type(data).__name__} without matrix_hash)"
    return data, ""


def mark_result_damaged(out: str | Path, key: str, reason: str, row: dict) -> bool:
    """Record in ``cells/<key>/result.json`` that the cell's samples are damaged (``damaged`` = the
    reason): it is not finished, and the next run generates it again. Nothing is written when the
    result is no longer ``row`` (the cell was generated again meanwhile). Returns whether it was written."""
    path = Path(out) / "cells" / key / "result.json"
    current, _ = read_result(path, key)
    if current is None or current.get("damaged") or any(current.get(k) != row.get(k) for k in (
            "samples_sha256", "generated_utc")):
        return False
    write_json_atomic(path, jsonable({**current, "damaged": reason}))
    return True


def _read_fp_reference_record(path: Path) -> dict | None:
    """A reference's ``.sha256.json`` ({"bytes", "sha256"}), or None when missing or not valid."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and _is_int(record.get("bytes")) and isinstance(record.get("sha256"), str)
            and len(record["sha256"]) == 64):
        return None
    return record


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


def describe(row: dict) -> str:
    """One line for the log: the cell and its metrics (or its error)."""
    head = " ".join([row["method"], f"W{row['w_bits']}A{row['a_bits']}", row["a_granularity"], *later_settings(row)])
    if row["status"] != "ok":
        return f"{head}: FAILED {row['error']}"
    columns = [c for c in result_columns([row]) if c in metric_columns() or c in METRIC_COLUMNS]
    shown = [f"{c} {float(row[c]):.3g}" for c in columns if row.get(c) is not None]
    return f"{head}: {'  '.join(shown)}  ({row['wall_s']:.1f} s sampling)"


class Cell:
    """The files of one cell: ``cells/<id>/`` (its chunks, samples, trace, result and error)."""

    def __init__(self, run: RunStore, key: str, spec: CellSpec):
        self.run, self.key, self.spec = run, key, spec
        self.dir = run.out / "cells" / key

    @property
    def result_path(self) -> Path:
        return self.dir / "result.json"

    @property
    def chunk_dir(self) -> Path:
        return self.dir / "chunks"

    @property
    def samples_path(self) -> Path:
        return self.dir / "samples.pt"

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.run.out))

    @contextmanager
    def lock(self) -> Iterator[bool]:
        """Hold ``DIR/locks/<id>.lock`` while the cell is generated or evaluated; yields False when
        another process holds it (it is working on the cell)."""
        (self.run.out / "locks").mkdir(exist_ok=True)
        with open(self.run.out / "locks" / f"{self.key}.lock", "w") as handle:
            yield _try_flock(handle, fcntl.LOCK_EX)

    def clear(self) -> None:
        """Remove the leftovers of an interrupted or failed attempt, except its finished chunks."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for item in self.dir.iterdir():
            if item.name != "chunks":
                shutil.rmtree(item) if item.is_dir() else item.unlink()

    def read_result(self) -> tuple[dict | None, str | None]:
        return read_result(self.result_path, self.key)

    def write_result(self, row: dict) -> None:
        write_json_atomic(self.result_path, jsonable(row))
        self.run.damaged.pop(self.key, None)

    def write_samples(self, images: torch.Tensor, seeds: list[int]) -> tuple[int, str]:
        """``samples.pt``; returns its size and SHA-256 (recorded in the result). The chunks go."""
        written = save_torch_atomic(self.samples_path, {"images": images, "seeds": seeds, "cell_id": self.key})
        shutil.rmtree(self.chunk_dir, ignore_errors=True)
        return written

    def write_trace(self, trace: dict) -> str:
        write_json_atomic(self.dir / "trace.json", trace)
        return self.relative(self.dir / "trace.json")

    def write_error(self, details: str) -> None:
        write_atomic(self.dir / "error.txt", lambda tmp: tmp.write_text(details))

    def load_samples(self, row: dict) -> tuple[torch.Tensor | None, str | None]:
        """The finished cell's stored images (memory-mapped: a 19.6 GB cell is not read into memory),
        verified against the size and SHA-256 recorded when they were written (cells of older
        versions recorded none: then loadable and the right images is all that is checked); (None,
        why) when damaged."""
        file = row["samples_file"]
        path = self.run.out / file
        if row.get("samples_sha256") is not None:
            try:
                size, digest = path.stat().st_size, sha256_file(path)
            except OSError as exc:
                return None, f"its samples file {file} cannot be read ({one_line(exc)})"
            if (size, digest) != (row.get("samples_bytes", size), row["samples_sha256"]):
                return None, f"its samples file {file} does not match the SHA-256 recorded when it was written"
        try:
            data = torch.load(path, weights_only=True, mmap=True)
        except Exception as exc:
            return None, f"its samples file {file} cannot be loaded ({one_line(exc)})"
        reason = check_samples(data, self.spec.n_samples, list(self.spec.seeds))
        if reason is not None:
            return None, f"its samples file {file} {reason}"
        return data["images"], None


def read_chunk(path: Path, tag: str, seeds: list[int]) -> dict | None:
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
    return data if check_samples(data, len(seeds), seeds, keys=CHUNK_KEYS) is None else None


class RunStore:
    """One run directory for one matrix: its lock, ``run.json``, the cells, the references, the tables.

    ``only``: the cell ids this process is responsible for (a SLURM array task's share; default all).
    ``log``: where notes go besides ``run.log`` (None: this process keeps quiet, e.g. a rank > 0)."""

    def __init__(self, out: str | Path, matrix: ResolvedMatrix, force: bool = False, only: set[str] | None = None,
                 log: Callable[[str], None] | None = None):
        self.out = Path(out)
        self.matrix = matrix
        self.force = force
        self.only = only
        self._print = log
        self.ids = [cell_id(c, matrix.id_rules) for c in matrix.cells]
        self.specs = dict(zip(self.ids, matrix.cells, strict=True))
        self.damaged: dict[str, str] = {}  # finished cells found damaged when read: generate them again
        self.run_json_problem: str | None = None  # set by check(): run.json to be rebuilt, and why
        self.alone = False  # set by open(): whether this process holds the directory exclusively
        self._lock_handle = None
        self._fp_references: dict[Path, tuple[int, int, str | None]] = {}  # checked: (size, mtime_ns, sha256)

    def cell(self, key: str) -> Cell:
        return Cell(self, key, self.specs[key])

    def cells(self) -> list[Cell]:
        return [self.cell(k) for k in self.ids]

    def log(self, text: str) -> None:
        if self._print is None:
            return
        text = plain(text)  # a library's or a file's text may carry terminal escape codes
        self._print(text)
        try:
            with open(self.out / "run.log", "a") as f:
                f.write(f"{now()} {text}\n")
        except OSError:
            pass

    # -- opening the directory ---------------------------------------------------------------
    def check(self) -> None:
        """Refuse a directory that holds another matrix. A missing or damaged run.json (the tool's own
        file) is not a reason to refuse: when every cell present belongs to this matrix it is rebuilt
        (``run_json_problem`` says why; ``prepare`` does it)."""
        self.run_json_problem = None
        if self.out.exists() and not self.out.is_dir():
            raise BenchError(f"--out {self.out} exists and is not a directory")
        if self.force:
            return
        previous, problem = read_run_json(self.out / "run.json")
        if previous is None and problem == "missing" and not (self.out / "cells").is_dir():
            return  # a new directory
        if previous is not None:
            if previous["matrix_hash"] != self.matrix.matrix_hash:
                cells = previous.get("cells")
                # the same matrix grown (a preset gained cells) or with newer method versions (its cells
                # superseded under new ids): every earlier cell is, under the current code, one of this matrix
                if isinstance(cells, list) and cells and all(
                        isinstance(c, dict) and settings_id(c, self.matrix.id_rules) in self.specs for c in cells):
                    return
                raise BenchError(
                    f"{self.out} holds results of a different matrix ({previous.get('source', '?')}, "
                    f"{len(cells) if isinstance(cells, list) else '?'} cells); use another --out, or --force to "
                    "replace them")
            return
        foreign = self.foreign_cells()
        if foreign:
            raise BenchError(
                f"{self.out} holds results of a different matrix (run.json {problem}; {len(foreign)} cell(s) not "
                f"in this matrix, e.g. {foreign[0]}); use another --out, or --force to replace them")
        self.run_json_problem = problem

    def foreign_cells(self) -> list[str]:
        """Cell directories that do not belong to this matrix: an id it does not have, or a result whose
        settings differ from the matrix's cell of that id."""
        cells = self.out / "cells"
        if not cells.is_dir():
            return []
        foreign = []
        for directory in sorted(p for p in cells.iterdir() if p.is_dir()):
            spec = self.specs.get(directory.name)
            row, _ = read_result(directory / "result.json", directory.name)
            if spec is None:  # not a cell of this matrix, unless an older version of one of its cells
                if row is None or settings_id(row, self.matrix.id_rules) not in self.specs:
                    foreign.append(directory.name)
                continue
            if row is not None:
                expected = id_settings(json.loads(json.dumps(asdict(spec))), self.matrix.id_rules)
                row = id_settings(row, self.matrix.id_rules)
                if any(k in row and row[k] != v for k, v in expected.items()):
                    foreign.append(directory.name)
        return foreign

    @contextmanager
    def open(self, exclusive: bool | None = None) -> Iterator[RunStore]:
        """Hold the directory lock. Runners of the same matrix may share a directory (they split the
        cells through per-cell locks); ``--force``, which deletes results, needs it alone. It is taken
        exclusively when possible (``alone``: temporaries found then are a killed run's), else shared
        after waiting up to a minute for the other process's set-up; ``share()`` lets others in."""
        exclusive = self.force if exclusive is None else exclusive
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / ".lock", "w") as handle:
            self.alone = _try_flock(handle, fcntl.LOCK_EX)
            if not self.alone:
                if exclusive or not _try_flock(handle, fcntl.LOCK_SH, patience_s=60.0):
                    raise BenchError(f"another modiff-bench run is using {self.out}"
                                     + ("; --force needs the directory to itself" if self.force else ""))
            self._lock_handle = handle
            try:
                yield self
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                self._lock_handle = None

    def share(self) -> None:
        """Set-up done: let runners of the same matrix join (a --force run keeps the directory)."""
        if self.alone and not self.force and self._lock_handle is not None:
            fcntl.flock(self._lock_handle, fcntl.LOCK_SH)

    def prepare(self, invocation: dict, models: dict, provenance: dict) -> None:
        """Under ``open()``: check again (no other run can change it now), remove a killed run's
        temporaries, discard everything for ``--force``, and write run.json with this invocation."""
        self.check()
        if self.alone:
            for stale in self.out.rglob(".tmp-*"):
                stale.unlink(missing_ok=True)
        if self.force:
            for name in ("cells", "reference"):
                shutil.rmtree(self.out / name, ignore_errors=True)
            for name in ("results.csv", "results.parquet"):
                (self.out / name).unlink(missing_ok=True)
        self.record_invocation(invocation, models, provenance)

    def record_invocation(self, invocation: dict, models: dict | None = None, provenance: dict | None = None) -> None:
        """Append ``invocation`` to run.json (rewriting the matrix and, when given, the models and
        provenance), rebuilding a missing or damaged run.json (see ``check``)."""
        with open(self.out / ".run-json.lock", "w") as handle:  # processes sharing the directory append in turn
            fcntl.flock(handle, fcntl.LOCK_EX)
            path = self.out / "run.json"
            invocations, kept = [], {}
            previous, problem = read_run_json(path)
            if self.force:
                pass
            elif previous is not None:  # (valid, and of this matrix: check() refused any other)
                invocations = [i for i in previous.get("invocations", []) if isinstance(i, dict)] \
                    if isinstance(previous.get("invocations"), list) else []
                kept = {k: previous[k] for k in ("repaired_utc", "repair_reason", "models", "provenance")
                        if k in previous}
            elif self.run_json_problem is not None:  # checked: every cell present belongs to this matrix
                finished = sum(self.finished(k)[0] for k in self.ids)
                kept = {"repaired_utc": now(), "repair_reason": f"run.json {problem}; rebuilt from the current "
                        f"matrix, whose cells include every cell present ({finished} finished)"}
                self.log(f"warning: {path} was {problem}; rebuilt it from the current matrix ({finished} finished "
                         "cell(s) present belong to it; earlier invocations are not known)")
            invocations.append(invocation)
            write_json_atomic(path, {
                "matrix_hash": self.matrix.matrix_hash,
                "source": self.matrix.source,
                "resolved": self.matrix.resolved(),
                "cells": [{"cell_id": k, "method": c.method, **asdict(c)} for k, c in self.specs.items()],
                "skipped": self.matrix.skipped,
                "models": models if models is not None else kept.get("models", {}),
                "provenance": provenance if provenance is not None else kept.get("provenance", {}),
                "invocations": invocations,
                **{k: v for k, v in kept.items() if k in ("repaired_utc", "repair_reason")},
            })

    # -- which cells are finished ------------------------------------------------------------
    def finished(self, key: str) -> tuple[bool, str | None]:
        """Whether the cell is generated; when it looks finished but is damaged, why not. Cheap: it
        reads result.json and the size of the samples file, and hashes nothing (samples are verified
        when read, see ``Cell.load_samples``)."""
        if key in self.damaged:
            return False, self.damaged[key]
        path = self.out / "cells" / key / "result.json"
        if not path.is_file():
            return False, None
        row, reason = read_result(path, key)
        if row is None:
            return False, f"{path.relative_to(self.out)} is invalid ({reason})"
        if row["status"] != "ok":
            return False, None
        if row.get("damaged"):  # found by an earlier evaluation (``mark_damaged``)
            return False, row["damaged"]
        file = row["samples_file"]
        try:
            size = (self.out / file).stat().st_size
        except OSError:
            return False, f"its samples file {file} is missing"
        recorded = row.get("samples_bytes")
        if recorded is not None and size != recorded:  # cells of older versions recorded no size
            return False, f"its samples file {file} has {size} bytes, not the {recorded} written"
        return True, None

    def mine(self, key: str) -> bool:
        return self.only is None or key in self.only

    def pending(self) -> list[tuple[str, CellSpec]]:
        """The cells this process still has to generate (not finished, and in ``only`` if given)."""
        return [(k, c) for k, c in self.specs.items() if self.mine(k) and not self.finished(k)[0]]

    def mark_damaged(self, key: str, reason: str, row: dict | None = None) -> None:
        """The finished cell's samples are damaged: generate it again. ``row`` (the result it was found
        with) is rewritten with ``damaged`` = the reason, so that the next process knows too (the check
        on resume compares sizes only); unless result.json changed meanwhile (regenerated by another
        runner: that one is not damaged)."""
        self.damaged[key] = reason
        if row is not None:
            mark_result_damaged(self.out, key, reason, row)

    def log_damaged(self) -> None:
        """A note in the log for every cell that looked finished but is damaged (it runs again)."""
        for key, cell in self.specs.items():
            if not self.mine(key):
                continue
            finished, reason = self.finished(key)
            if not finished and reason:
                self.log(f"cell {key} ({cell.label}): {reason}; running it again")

    # -- full-precision references -----------------------------------------------------------
    def fp_reference_path(self, cell: CellSpec, device_type: str) -> Path:
        fields = {k: getattr(cell, k) for k in ("model", "checkpoint", "sampler", "steps", "eta", "n_samples", "seed",
                                                "batch_size")}
        fields["device"] = device_type
        for setting in ("dtype", "memory_format"):  # (at their defaults: the key references had before)
            if getattr(cell, setting, LATER_DEFAULTS[setting]) != LATER_DEFAULTS[setting]:
                fields[setting] = getattr(cell, setting)
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
        return self.out / "reference" / f"{key}.pt"

    @contextmanager
    def fp_reference_lock(self, path: Path) -> Iterator[None]:
        """Processes sharing the directory make a reference in turn (none assembles another's chunks)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def check_fp_reference(self, cell: CellSpec, path: Path, image_shape: tuple[int, ...] | None
                           ) -> tuple[dict | None, str | None]:
        """Validate a reference file on its first use by this process (it is loaded for that): (its
        data, or None when already checked and unchanged; None) when valid, else (None, why not)."""
        try:
            stat = path.stat()
        except OSError as exc:
            return None, f"cannot be read: {one_line(exc)}"
        known = self._fp_references.get(path)
        if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns) and known[2] is not None:
            return None, None
        try:
            data = torch.load(path, weights_only=True)
        except Exception as exc:  # truncated, garbled, or not a plain tensor file
            return None, f"cannot be loaded with weights_only=True: {one_line(exc)}"
        reason = check_samples(data, cell.n_samples, list(cell.seeds), image_shape,
                               keys=tuple(k for k in FP_REFERENCE_KEYS if k not in OPTIONAL_FP_REFERENCE_KEYS))
        if reason is None and set(data) - set(FP_REFERENCE_KEYS):
            reason = f"unexpected keys {sorted(set(data) - set(FP_REFERENCE_KEYS))}"
        if reason is not None:
            return None, reason
        reason = self.verify_fp_reference(path)
        return (None, reason) if reason is not None else (data, None)

    @staticmethod
    def fp_reference_record_path(path: Path) -> Path:
        """Where a reference's size and SHA-256 are kept: ``reference/<key>.pt.sha256.json``."""
        return path.with_name(path.name + ".sha256.json")

    def verify_fp_reference(self, path: Path) -> str | None:
        """Why the reference file is not the one written (its size and SHA-256 against its record, and
        against those its full-precision cells recorded), or None. Hashed once per process while the
        file's size and mtime stay the same. A file without a record that a full-precision cell vouches
        for gets its record now."""
        try:
            stat = path.stat()
        except OSError as exc:
            return f"cannot be read: {one_line(exc)}"
        known = self._fp_references.get(path)
        if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns) and known[2] is not None:
            return None
        record_path = self.fp_reference_record_path(path)
        record = _read_fp_reference_record(record_path)
        digest = sha256_file(path)
        vouched = False
        for key, row in self.fp_reference_rows(path):
            if row.get("samples_sha256") is not None:
                if (stat.st_size, digest) != (row.get("samples_bytes", stat.st_size), row["samples_sha256"]):
                    return f"is not the file whose SHA-256 the full-precision cell {key} recorded"
                vouched = True
        if record is not None and (stat.st_size, digest) != (record["bytes"], record["sha256"]):
            return (f"does not match the size and SHA-256 recorded when it was written "
                    f"({record_path.relative_to(self.out)})")
        if record is None:
            if not vouched:
                return (f"has no record of its size and SHA-256 ({record_path.relative_to(self.out)} is missing "
                        "or invalid) and no full-precision cell recorded them")
            write_json_atomic(record_path, {"bytes": stat.st_size, "sha256": digest})
        self._fp_references[path] = (stat.st_size, stat.st_mtime_ns, digest)
        return None

    def load_fp_reference(self, path: Path) -> dict:
        try:
            return torch.load(path, weights_only=True, mmap=True)
        except Exception as exc:
            raise RuntimeError(f"cannot load the full-precision reference {path}: {one_line(exc)}") from exc

    def save_fp_reference(self, path: Path, record: dict) -> None:
        """Write a newly made reference; the full-precision cells that recorded the old file run again."""
        self.fp_reference_record_path(path).unlink(missing_ok=True)  # (no stale record beside a new file)
        size, digest = save_torch_atomic(path, record)
        write_json_atomic(self.fp_reference_record_path(path), {"bytes": size, "sha256": digest})
        self._fp_references[path] = (size, path.stat().st_mtime_ns, digest)
        shutil.rmtree(path.with_suffix(".chunks"), ignore_errors=True)
        for key, _ in self.fp_reference_rows(path):
            (self.out / "cells" / key / "result.json").unlink(missing_ok=True)
            self.damaged[key] = f"its samples file {path.relative_to(self.out)} was made again"
            self.log(f"cell {key} (fp): its samples file {path.relative_to(self.out)} was made again; running it "
                     "again")

    def fp_reference_rows(self, path: Path) -> list[tuple[str, dict]]:
        """The finished cells whose samples are this reference file (full-precision cells), with their
        results."""
        rows = []
        for key, cell in self.specs.items():
            if cell.base == "fp" and cell.cache == "none":
                row, _ = read_result(self.out / "cells" / key / "result.json", key)
                if row is not None and row["status"] == "ok" and self.out / row["samples_file"] == path:
                    rows.append((key, row))
        return rows

    def discard_fp_reference(self, path: Path) -> None:
        with self.fp_reference_lock(path):
            path.unlink(missing_ok=True)
            self.fp_reference_record_path(path).unlink(missing_ok=True)
            self._fp_references.pop(path, None)

    def fp_reference_digest(self, path: Path) -> tuple[int, str]:
        """Size and SHA-256 of a reference file (hashed once per process, or known from writing it)."""
        stat = path.stat()
        known = self._fp_references.get(path)
        if known is None or known[:2] != (stat.st_size, stat.st_mtime_ns) or known[2] is None:
            known = (stat.st_size, stat.st_mtime_ns, sha256_file(path))
            self._fp_references[path] = known
        return known[0], known[2]

    # -- the table ---------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """The valid results of this matrix's cells (an invalid result.json is not a row)."""
        return collect_rows(self.out, self.ids)

    def write_tables(self) -> None:
        write_tables(self.out, self.rows(), self.matrix.metrics)
