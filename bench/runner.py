"""The resumable runner: expand a matrix, run every cell, keep one tidy results table.

Layout of an output directory::

    DIR/run.json                  resolved matrix, skipped combinations, versions, every invocation
    DIR/results.csv, .parquet     one row per cell (rebuilt from the cell files after every cell)
    DIR/results.md                the main columns as a Markdown table
    DIR/cells/<cell_id>/result.json   the row of one cell: settings, metrics, costs, provenance
    DIR/cells/<cell_id>/samples.pt    its samples (float16 in [-1, 1]) and seeds
    DIR/reference/<key>.pt        full-precision samples shared by every cell with the same
                                  model, sampler, steps, eta, seeds and batch size
    DIR/cache/                    calibration data and calibrated models methods keep for reuse
                                  (keyed by what they depend on; safe to delete)
    DIR/run.log                   what each invocation did

Every file is written to a temporary name and renamed, and ``result.json`` is written last, so a
crash or SIGKILL leaves either a finished cell or none: a rerun skips finished cells and runs the
others (failed cells are retried). Rows come from the cell files alone, so none is ever duplicated.
If the metric list grows, finished cells get the new metrics from their saved samples.
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import modiff
from modiff.layers import QUANTIZABLE, QuantLayer

from .errors import BenchError
from .matrix import Matrix, cell_id
from .measure import measured
from .methods import BuildContext, CellSpec, Prepared, build
from .metrics import ALL_COLUMNS, INCEPTION_METRICS, METRICS, MetricInputs, compute_metrics
from .provenance import git_revision, package_versions, provenance, write_atomic, write_json_atomic
from .samplers import SamplerConfig, sample
from .schedules import step_pairs
from .zoo import ZooModel, load_model, resolve_device

SETTING_COLUMNS = ("model", "checkpoint", "sampler", "steps", "eta", "n_samples", "seed", "batch_size", "method",
                   "base", "modulation", "cache", "w_bits", "a_bits", "a_granularity")
METRIC_COLUMNS = ALL_COLUMNS
COST_COLUMNS = ("gbops", "gbops_honest", "macs_g", "state_mb", "prepare_s", "wall_s", "img_per_s", "peak_mem_mb",
                "peak_rss_mb", "cuda_peak_mb")
PROVENANCE_COLUMNS = ("device", "torch_version", "git_rev", "modiff_bench_version", "started_utc", "finished_utc",
                      "samples_file", "trace_file", "params", "method_info", "missing_metrics", "versions")
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
    seconds: float
    peak_rss_bytes: int
    cuda_peak_bytes: int | None
    state_bytes: int


class Runner:
    def __init__(self, matrix: Matrix, out: str | Path, device: str = "auto", force: bool = False,
                 progress: bool = True, argv: list[str] | None = None, log: Callable[[str], None] | None = None):
        self.matrix = matrix
        self.out = Path(out)
        self.device = _pick_device(device)
        self.force = force
        self.progress = progress and sys.stderr.isatty()  # bars only for a person watching
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
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise BenchError(f"another modiff-bench run is using {self.out}") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> RunSummary:
        start = time.perf_counter()
        self._check_out_dir()
        self._load_models()
        with self._locked():
            self._check_out_dir()  # again, now that no other run can change it
            for stale in self.out.rglob(".tmp-*"):  # left by a killed run (write_atomic's temporaries)
                stale.unlink(missing_ok=True)
            if self.force:
                for name in ("cells", "reference"):
                    shutil.rmtree(self.out / name, ignore_errors=True)
                for name in ("results.csv", "results.parquet"):
                    (self.out / name).unlink(missing_ok=True)
            self._write_run_json()
            todo = [(k, c) for k, c in zip(self.ids, self.matrix.cells, strict=True) if self._needs_run(k)]
            reused = len(self.ids) - len(todo)
            self.log(f"{self.matrix.source}: {len(self.ids)} cells ({reused} finished, {len(todo)} to run, "
                     f"{len(self.matrix.skipped)} invalid combinations skipped) on {self.device} -> {self.out}")
            for skip in self.matrix.skipped:
                self.log(f"  skipped {skip['base']} {skip['modulation']} W{skip['w_bits']}A{skip['a_bits']} "
                         f"{skip['a_granularity']} {skip['cache']}: {skip['reason']}")
            self._update_finished_metrics()
            bar = tqdm(todo, desc="cells", unit="cell", disable=not self.progress)
            for done, (key, cell) in enumerate(bar, start=1):
                bar.set_postfix_str(f"{cell.method} W{cell.w_bits}A{cell.a_bits}")
                row = self._run_cell(key, cell)
                self._write_tables()
                self.log(f"[{done}/{len(todo)}] {_describe(row)}")
            bar.close()
            rows = self._rows()
            self._write_tables()
        failed = [r["cell_id"] for r in rows if r["status"] != "ok"]
        return RunSummary(self.out, len(self.ids), len(todo), reused, failed, len(self.matrix.skipped),
                          time.perf_counter() - start)

    def _needs_run(self, key: str) -> bool:
        result = self.cell_dir(key) / "result.json"
        if not result.is_file():
            return True
        try:
            return json.loads(result.read_text()).get("status") != "ok"
        except (OSError, ValueError):
            return True

    def _write_run_json(self) -> None:
        path = self.out / "run.json"
        invocations = []
        if path.is_file() and not self.force:
            try:
                invocations = json.loads(path.read_text()).get("invocations", [])
            except (OSError, ValueError):
                invocations = []
        invocations.append({"started_utc": _now(), "argv": self.argv, "git_revision": git_revision(),
                            "device": str(self.device), "force": self.force})
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
    def _run_cell(self, key: str, cell: CellSpec) -> dict:
        directory = self.cell_dir(key)
        shutil.rmtree(directory, ignore_errors=True)  # leftovers of an interrupted or failed attempt
        directory.mkdir(parents=True)
        row = self._base_row(key, cell)
        model = self._models[cell.model]
        try:
            sampler = SamplerConfig.from_name(cell.sampler, cell.steps, cell.eta)
            if cell.base == "fp" and cell.cache == "none":
                record, row["prepare_s"] = self._reference(cell), 0.0
                row["samples_file"] = str(self.reference_path(cell).relative_to(self.out))
            else:
                t0 = time.perf_counter()
                prepared = build(BuildContext(model, cell, sampler, self.device, self.progress,
                                              self.out / "cache"))
                row["prepare_s"] = time.perf_counter() - t0
                record = self._sample(prepared, model, cell, sampler)
                write_atomic(directory / "samples.pt", lambda tmp: torch.save(
                    {"images": record.images, "seeds": record.seeds, "cell_id": key}, tmp))
                trace = self._trace(prepared, model, cell, sampler)
                if trace is not None:
                    write_json_atomic(directory / "trace.json", trace)
                    row["trace_file"] = str((directory / "trace.json").relative_to(self.out))
                row["samples_file"] = str((directory / "samples.pt").relative_to(self.out))
            row.update(self._costs(cell, model, record, 1.0 if cell.base == "fp" and cell.cache == "none"
                                   else prepared.mac_fraction))
            if cell.base != "fp" or cell.cache != "none":
                row["method_info"] = prepared.info
            values, missing = self._metrics(cell, record.images)
            row.update(values)
            row["missing_metrics"] = missing
            row["metrics"] = self.matrix.metrics
            row["status"] = "ok"
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a failing cell is recorded and the run goes on
            row["status"], row["error"] = "failed", _one_line(exc)
            (directory / "error.txt").write_text(traceback.format_exc())
        row["finished_utc"] = _now()
        write_json_atomic(directory / "result.json", _jsonable(row))
        return row

    def _base_row(self, key: str, cell: CellSpec) -> dict:
        versions = package_versions()
        row = {c: None for c in RESULT_COLUMNS}
        row.update({"cell_id": key, "status": "running", "error": "", **asdict(cell), "method": cell.method,
                    "device": str(self.device), "torch_version": versions["torch"], "git_rev": git_revision(),
                    "modiff_bench_version": versions["modiff-bench"], "started_utc": _now(), "versions": versions,
                    "missing_metrics": {}})
        return row

    def _reference(self, cell: CellSpec) -> SampleRecord:
        """Full-precision samples for the cell's model, sampler and seeds: made once, then reused."""
        path = self.reference_path(cell)
        if path.is_file():
            data = torch.load(path, weights_only=True)
            return SampleRecord(**data)
        model = self._models[cell.model]
        fp_cell = CellSpec(**{**asdict(cell), "base": "fp", "cache": "none", "modulation": "off", "w_bits": 32,
                              "a_bits": 32, "a_granularity": "none", "params": {}})
        sampler = SamplerConfig.from_name(cell.sampler, cell.steps, cell.eta)
        record = self._sample(build(BuildContext(model, fp_cell, sampler, self.device)), model, fp_cell, sampler)
        write_atomic(path, lambda tmp: torch.save(asdict(record), tmp))
        return record

    def _sample(self, prepared: Prepared, model: ZooModel, cell: CellSpec, sampler: SamplerConfig) -> SampleRecord:
        denoiser = prepared.denoiser()
        # untimed warm-up: two denoiser calls at the batch size (allocator, kernel selection, caches)
        n = min(cell.batch_size, cell.n_samples)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((n, *model.image_shape), generator=generator).to(self.device)
        t = torch.full((n,), sampler.timesteps(model.schedule)[-1], dtype=torch.long, device=self.device)
        prepared.start_trajectory()
        with torch.no_grad():
            for _ in range(2):
                denoiser(x, t)
        seeds = list(cell.seeds)
        images, m = measured(lambda: sample(denoiser, model.schedule, sampler, seeds, model.image_shape,
                                            cell.batch_size, self.device, progress=self.progress,
                                            on_trajectory_start=prepared.start_trajectory, leave=False,
                                            noise_std=prepared.noise_std),
                                self.device)
        bad = int((~images.isfinite().flatten(1).all(dim=1)).sum())
        if bad:
            raise FloatingPointError(f"samples contain NaN/Inf ({bad} of {len(images)} images)")
        return SampleRecord(images.to(torch.float16), seeds, m.seconds, m.peak_rss_bytes, m.cuda_peak_bytes,
                            modiff.state_bytes(prepared.unet))

    def _trace(self, prepared: Prepared, model: ZooModel, cell: CellSpec, sampler: SamplerConfig) -> dict | None:
        """Paper Fig. 3: per step, the relative L2 error of one layer's output against the same
        layer (same, possibly quantized, weights) with float activations on the same input, over
        an untimed pass on the first ``trace_samples`` seeds. It isolates the activation error
        that modulation and error compensation act on."""
        name = self.matrix.run.get("trace_layer")
        layer = dict(prepared.unet.named_modules()).get(name) if name else None
        if not isinstance(layer, QuantLayer):
            return None
        timesteps = [t for t, _ in step_pairs(sampler.timesteps(model.schedule))]
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
                   progress=False, on_trajectory_start=start, noise_std=prepared.noise_std)
        finally:
            handle.remove()
        return {"layer": name, "timesteps": timesteps, "rel_l2": errors, "seeds": [seeds[0], seeds[-1]],
                "reference": "same layer, float activations, same input"}

    def _costs(self, cell: CellSpec, model: ZooModel, record: SampleRecord, mac_fraction: float = 1.0) -> dict:
        """Wall-clock, memory and compute. ``mac_fraction`` (caching) scales the MACs and GBops of the
        full UNet to the average step actually run."""
        from modiff.accounting import count_macs, gbops_honest, gbops_paper

        if cell.model not in self._macs:
            x = torch.zeros((1, *model.image_shape), device=self.device)
            self._macs[cell.model] = count_macs(model.unet, x, torch.zeros(1, dtype=torch.long, device=self.device))
        report = self._macs[cell.model]
        out = {"macs_g": mac_fraction * report.total_macs / 1e9, "wall_s": record.seconds,
               "img_per_s": cell.n_samples / record.seconds if record.seconds > 0 else None,
               "peak_rss_mb": record.peak_rss_bytes / 2**20, "state_mb": record.state_bytes / 2**20,
               "cuda_peak_mb": None if record.cuda_peak_bytes is None else record.cuda_peak_bytes / 2**20}
        out["peak_mem_mb"] = out["cuda_peak_mb"] if out["cuda_peak_mb"] is not None else out["peak_rss_mb"]
        try:  # 0-bit activations (pure caching) have no paper convention
            out["gbops"] = mac_fraction * gbops_paper(report, cell.w_bits, cell.a_bits)
            out["gbops_honest"] = mac_fraction * gbops_honest(report, cell.w_bits, cell.a_bits, cell.steps,
                                                              cell.modulation)
        except ValueError:
            out["gbops"] = out["gbops_honest"] = None
        return out

    def _metrics(self, cell: CellSpec, images: torch.Tensor, names: list[str] | None = None):
        names = names or self.matrix.metrics
        reference = None
        if any(METRICS[n].needs_fp_reference for n in names):
            reference = self._reference(cell).images.float()
        inception = None
        if any(n in INCEPTION_METRICS for n in names):
            from .inception import InceptionSettings

            inception = InceptionSettings(device=str(self.device), **self.matrix.inception)
        return compute_metrics(names, MetricInputs(images.float(), cell.model, cell.checkpoint, reference, inception))

    def _update_finished_metrics(self) -> None:
        """Finished cells lacking a metric the matrix now asks for get it from their saved samples."""
        for key, cell in zip(self.ids, self.matrix.cells, strict=True):
            path = self.cell_dir(key) / "result.json"
            if self._needs_run(key):
                continue
            row = json.loads(path.read_text())
            wanted = [n for n in self.matrix.metrics if n not in row.get("metrics", [])]
            if not wanted:
                continue
            samples = torch.load(self.out / row["samples_file"], weights_only=True)["images"]
            values, missing = self._metrics(cell, samples, wanted)
            row.update(_jsonable(values))
            row["missing_metrics"] = {**row.get("missing_metrics", {}), **missing}
            row["metrics"] = list(dict.fromkeys([*row.get("metrics", []), *wanted]))
            write_json_atomic(path, row)
            self.log(f"added {', '.join(wanted)} to finished cell {key} ({cell.method})")

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


