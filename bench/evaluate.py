"""Evaluating cells: their metrics, from their files, computing only what is missing.

Like NVlabs/edm's ``fid.py`` beside ``generate.py``: a generated cell's ``result.json`` holds its
generation record; evaluation reads the cell's samples (memory-mapped and verified against the
SHA-256 recorded when they were written), computes the metrics the cell lacks, and adds them to the
same record. It is idempotent (a metric already there is not computed again), runs on one process
(rank 0), and is what ``modiff-bench evaluate DIR`` runs after an interrupted or finished
``modiff-bench run``, e.g. to add FID to a finished matrix without sampling again.

A metric that raises leaves its columns empty with the reason in ``missing_metrics`` and is tried
again by the next evaluation; the cell's samples stay. Damaged samples mark the cell for generating
again, in its ``result.json`` (``RunStore.mark_damaged``). The full-precision reference is verified
against the size and SHA-256 recorded when it was written before a metric reads it: a mismatch makes
it again where the model can be loaded (``ensure_fp_reference``), else fails the metrics that need it.
``recompute`` names metrics to compute again although a cell has them (metrics are not part of cell
ids: a fixed metric is recomputed this way).

A run directory is data: nothing it names is imported. Metrics of plugins come from the modules the
user names (``modiff-bench evaluate --import``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cell import CELL_FIELDS, CellSpec, fp_reference_cell
from .devices import pick_device
from .distributed import World
from .errors import BenchError
from .generate import Generator
from .matrix import Matrix, cell_id
from .metrics import METRICS, MetricInputs, check_metrics, compute_metrics
from .plugins import import_plugins
from .store import Cell, RunStore, now, one_line, read_run_json
from .zoo import load_model


class Evaluator:
    """Computes the metrics ``metrics`` (names) of a run directory's cells.

    ``ensure_fp_reference(spec)``: makes the full-precision reference of a cell when a metric needs it
    and it is missing (None: such metrics are left missing, with the reason)."""

    def __init__(self, store: RunStore, metrics: list[str], inception: dict, device: torch.device,
                 ensure_fp_reference: Callable[[CellSpec], None] | None = None, recompute: list[str] = ()):
        self.store = store
        self.recompute = list(dict.fromkeys(recompute))
        self.metrics = list(dict.fromkeys([*metrics, *self.recompute]))
        self.inception = dict(inception)
        self.device = device
        self.ensure_fp_reference = ensure_fp_reference
        self.errors: dict[str, str] = {}  # cell id -> the metric that raised, and its one-line error

    def wanted(self, row: dict) -> list[str]:
        """The metrics of this evaluator the row does not have yet, those to recompute, and those an older
        version of the metric computed (``MetricSpec.version``)."""
        have = set(row.get("metrics") or []) - set(self.recompute) - set(stale_metrics(row))
        return [n for n in self.metrics if n not in have]

    def todo(self) -> list[Cell]:
        """Generated cells (of this process's share) that lack a metric."""
        cells = []
        for cell in self.store.cells():
            if not self.store.mine(cell.key) or not self.store.finished(cell.key)[0]:
                continue
            row, _ = cell.read_result()
            if row is not None and self.wanted(row):
                cells.append(cell)
        return cells

    def needs_fp_reference(self, names: list[str]) -> bool:
        return any(METRICS[n].needs_fp_reference for n in names if n in METRICS)

    def fp_reference_path(self, row: dict, spec: CellSpec) -> Path:
        """The reference of the device the cell was generated on."""
        return self.store.fp_reference_path(spec, torch.device(row.get("device") or "cpu").type)

    def evaluate(self, cell: Cell, samples: torch.Tensor | None = None) -> dict | None:
        """Add the missing metrics to a generated cell and rewrite its result.json; returns the row
        (None when the cell has no valid ok result, or its samples turned out damaged: then it is
        marked for generating again). ``samples``: the images just generated (else read from disk)."""
        row, _ = cell.read_result()
        if row is None or row["status"] != "ok":
            return None
        names = self.wanted(row)
        if not names:
            return row
        spec = cell.spec
        store = self.store
        if samples is None:
            samples, reason = cell.load_samples(row)
            if samples is None:
                store.mark_damaged(cell.key, reason, row)
                store.log(f"cell {cell.key} ({spec.label}): {reason}; sampling it "
                          "again")
                fp_reference = self.fp_reference_path(row, spec)
                if store.out / row["samples_file"] == fp_reference:
                    store.discard_fp_reference(fp_reference)  # the fp cell's samples: made again
                return None
        for name in (n for n in names if n in (row.get("metrics") or []) and n in METRICS):  # as if never computed
            for column in METRICS[name].columns:
                row[column] = None
                (row.get("missing_metrics") or {}).pop(column, None)
            row["metrics"] = [m for m in row.get("metrics") or [] if m != name]
        fp_reference, unusable = None, None
        if self.needs_fp_reference(names):
            fp_reference, unusable = self._fp_reference(row, fp_reference_cell(spec))
        inception = None
        if any(METRICS[n].group == "inception" for n in names):
            from .inception import InceptionSettings

            inception = InceptionSettings(device=str(self.device), **self.inception)
        # the stored float16 samples as they are: metrics convert chunk by chunk (LSUN at 50k would need
        # 39 GB as one float32 tensor)
        done, values, missing = [], {}, {}

        def failed(name: str, reason: str) -> None:  # its columns empty with the reason; tried again next time
            error = f"metric {name!r} failed: {reason}"
            self.errors[cell.key] = error
            store.log(f"cell {cell.key} ({spec.method}): {error}")
            for column in METRICS[name].columns:
                values[column], missing[column] = None, error

        for name in names:  # one by one: a metric that raises costs only its own columns
            if unusable is not None and METRICS[name].needs_fp_reference:
                failed(name, unusable)
                continue
            try:
                got, why = compute_metrics([name], MetricInputs(samples, spec.model, spec.checkpoint, fp_reference,
                                                                inception))
            except Exception as exc:  # recorded; tried again by the next evaluation
                failed(name, one_line(exc))
                continue
            values.update(got)
            missing.update(why)
            done.append(name)
        if inception is not None:  # provenance of the Inception columns: which weights file, its SHA-256
            from .inception import weights_used

            used = weights_used() or None
            values["inception_weights"] = {**(row.get("inception_weights") or {}), **(used or {})} or None
        row.update(values)
        row["missing_metrics"] = {**{k: v for k, v in (row.get("missing_metrics") or {}).items()
                                     if k not in values}, **missing}
        row["metrics"] = list(dict.fromkeys([*(row.get("metrics") or []), *done]))
        row["metric_columns"] = {**(row.get("metric_columns") or {}),
                                 **{n: list(METRICS[n].columns) for n in done}}
        versions = {**(row.get("metric_versions") or {}), **{n: METRICS[n].version for n in done}}
        versions = {n: v for n, v in versions.items() if v > 1}  # version 1 is what no record means
        if versions:
            row["metric_versions"] = versions
        else:
            row.pop("metric_versions", None)
        row["finished_utc"] = now()
        cell.write_result(row)
        return row

    def _fp_reference(self, row: dict, spec: CellSpec) -> tuple[torch.Tensor | None, str | None]:
        """The full-precision samples a metric compares with, verified against the size and SHA-256
        recorded when they were written: (images, None), (None, None) when there are none, or (None,
        why they cannot be used). A missing or mismatching file is made again when ``ensure_fp_reference``
        can."""
        store = self.store
        path = self.fp_reference_path(row, spec)
        problem = store.verify_fp_reference(path) if path.is_file() else None
        if (problem is not None or not path.is_file()) and self.ensure_fp_reference is not None:
            if problem is not None:
                store.log(f"{path.relative_to(store.out)} {problem}; regenerating it")
                store.discard_fp_reference(path)
            self.ensure_fp_reference(spec)
            problem = store.verify_fp_reference(path) if path.is_file() else None
        if not path.is_file():
            return None, None
        if problem is not None:
            return None, f"its full-precision reference {path.relative_to(store.out)} {problem}"
        return store.load_fp_reference(path)["images"], None


def stale_metrics(row: dict) -> list[str]:
    """The metrics a row holds that an older version of the metric computed (``metric_versions``; a
    metric it does not list was computed by version 1)."""
    recorded = row.get("metric_versions") if isinstance(row.get("metric_versions"), dict) else {}
    return [n for n in row.get("metrics") or [] if n in METRICS and recorded.get(n, 1) < METRICS[n].version]


def evaluate_run(out: str | Path, metrics: list[str] | None = None, device: str = "auto", progress: bool = True,
                 argv: list[str] | None = None, log: Callable[[str], None] = print, imports: list[str] = (),
                 recompute: list[str] = ()) -> tuple[int, int, list[str]]:
    """``modiff-bench evaluate``: add the missing metrics (the matrix's, plus ``metrics``) to every
    generated cell of a run directory, and compute those of ``recompute`` again, then rewrite its
    tables. Returns (cells evaluated, cells skipped because another process holds them, cells that
    need generating again or whose metric failed). The matrix comes from ``run.json``; plugins from
    ``imports`` only (never from the directory); full-precision references that are missing or do not
    match their record are made again (this loads the model)."""
    out = Path(out)
    matrix = matrix_from_run_json(out, imports)
    names = list(dict.fromkeys([*matrix.metrics, *(metrics or []), *recompute]))
    unknown = [n for n in names if n not in METRICS]
    recorded = matrix.run.get("imports") if isinstance(matrix.run.get("imports"), list) else []
    if unknown and recorded:
        raise BenchError(f"unknown metric {unknown[0]!r}; this run's matrix imported {', '.join(map(str, recorded))}"
                         f"{_relative_to(matrix.source)}, which evaluate does not import from a run directory: pass "
                         "the plugin that registers it with --import")
    for model in {c.model for c in matrix.cells}:
        check_metrics(names, model)
    dev = pick_device(device)
    store = RunStore(out, matrix, log=log)
    store.check()
    generator = None

    def ensure_fp_reference(spec: CellSpec) -> None:
        nonlocal generator
        if generator is None:
            models = {m: load_model(m, c.checkpoint, str(dev)) for m, c in
                      {c.model: c for c in matrix.cells}.items()}
            generator = Generator(store, models, dev, World())
        log(f"making the full-precision reference of {spec.model} {spec.sampler} {spec.steps} steps")
        generator.fp_reference(spec, load=False)

    evaluator = Evaluator(store, names, matrix.inception, dev, ensure_fp_reference, recompute)
    with store.open(exclusive=False):
        store.share()
        store.record_invocation({"started_utc": now(), "argv": argv, "command": "evaluate", "metrics": names,
                                 "recompute": list(recompute), "imports": list(imports), "device": str(dev),
                                 "world_size": 1, "force": False, "cells": None})
        todo = evaluator.todo()
        log(f"{out}: {len(todo)} generated cell(s) lack some of {', '.join(names)}"
            + (f" or recompute {', '.join(recompute)}" if recompute else ""))
        done, busy, bad = 0, 0, []
        for cell in tqdm(todo, desc="evaluate", unit="cell", disable=not progress):
            with cell.lock() as mine:
                if not mine:
                    log(f"cell {cell.key}: held by another process, skipped")
                    busy += 1
                    continue
                row = evaluator.evaluate(cell)
            if row is None or cell.key in evaluator.errors:
                bad.append(cell.key)
                continue
            done += 1
        store.write_tables()
    return done, busy, bad


def _relative_to(source: str) -> str:
    return f" (relative to {Path(source).parent})" if source.endswith(".toml") else ""


def matrix_from_run_json(out: Path, imports: list[str] = ()):
    """The matrix of a run directory, from its ``run.json``: the cells as recorded (their ids checked
    against this version's), the run settings and ``[inception]``. The plugins it names
    (``run.imports``) are not imported: a run directory is data, and a shared one could carry any
    code; ``imports`` (the user's ``--import``, relative to the working directory) are."""
    data, problem = read_run_json(out / "run.json")
    if data is None:
        if not out.is_dir():
            raise BenchError(f"{out} is not a run directory (no such directory)")
        raise BenchError(f"{out}/run.json is {problem}; run 'modiff-bench run MATRIX --out {out}' (it repairs "
                         "run.json from the matrix)")
    resolved = data.get("resolved") if isinstance(data.get("resolved"), dict) else {}
    run = resolved.get("run") if isinstance(resolved.get("run"), dict) else {}
    source = str(data.get("source") or resolved.get("source") or out)
    import_plugins(list(imports))
    names = set(CELL_FIELDS)
    cells = []
    for entry in data.get("cells") if isinstance(data.get("cells"), list) else []:
        try:
            spec = CellSpec(**{k: v for k, v in entry.items() if k in names})
        except TypeError as exc:
            raise BenchError(f"{out}/run.json: a cell cannot be read ({one_line(exc)}); run 'modiff-bench run "
                             f"MATRIX --out {out}'") from None
        if cell_id(spec) != entry.get("cell_id"):
            raise BenchError(f"{out}/run.json was written by a version whose cell ids differ from this one's; run "
                             f"'modiff-bench run MATRIX --out {out}' instead")
        cells.append(spec)
    if not cells:
        raise BenchError(f"{out}/run.json lists no cells")
    metrics = run.get("metrics") if isinstance(run.get("metrics"), list) else []
    axes = resolved.get("matrix") or {}
    matrix = Matrix(source=source, run={**run, "metrics": metrics}, axes=axes if isinstance(axes, list) else [axes],
                    params=resolved.get("params") or {}, inception=resolved.get("inception") or {}, cells=cells,
                    skipped=data.get("skipped") or [])
    if matrix.matrix_hash != data["matrix_hash"]:
        raise BenchError(f"{out}/run.json's cells do not match its matrix_hash; run 'modiff-bench run MATRIX "
                         f"--out {out}'")
    return matrix
