"""The resumable runner: open the run directory, generate the pending cells, evaluate, write the table.

It joins three pieces, each usable alone:

- ``bench.store``: the run directory (locks, ``run.json``, the cells' files, the references, the
  tables, and the repair of anything damaged in them);
- ``bench.generate``: one cell's samples and generation record (the only step where ``torchrun``
  ranks work together);
- ``bench.evaluate``: the metrics a generated cell lacks, from its files (rank 0; also
  ``modiff-bench evaluate DIR``).

A cell is generated under a per-cell lock (``DIR/locks/``), so several runners sharing one directory
(SLURM array tasks, see ``bench.launch``) never run the same cell twice; a failed cell is retried by
the next run, and a cell whose samples turn out damaged is generated again in the same invocation.
If the metric list grows, finished cells get the new metrics from their saved samples.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modiff.layers import QUANTIZABLE

from .cell import CellSpec, fp_reference_cell, later_settings
from .devices import float16_emulated, pick_device
from .distributed import World
from .errors import BenchError, plain, user_input
from .evaluate import Evaluator
from .generate import Generator, together
from .matrix import AXES, Matrix, trace_layer
from .metrics import METRICS
from .provenance import git_revision, provenance
from .store import RESULT_COLUMNS, RunStore, collect_rows, describe, now, read_results, table_frame, write_tables
from .zoo import ZooModel, load_model

__all__ = ["RESULT_COLUMNS", "RunSummary", "Runner", "collect_rows", "read_results", "run_matrix",
           "table_frame", "write_tables"]


@dataclass
class RunSummary:
    out: Path
    total: int
    ran: int
    reused: int
    failed: list[str]  # cells that failed, or whose samples are fine but a metric raised (``unevaluated``)
    skipped: int
    seconds: float
    unevaluated: list[str] = field(default_factory=list)  # a metric raised; reasons in ``missing_metrics``
    held: list[str] = field(default_factory=list)  # pending cells another runner was generating: not done here


FP8_CAPABILITY = (8, 9)  # float8 matmuls (torch._scaled_mm) on CUDA: Ada Lovelace / Hopper and newer


def device_skip_reason(cell: CellSpec, device: torch.device, capability: tuple[int, int] | None = None,
                       base=None) -> str | None:
    """Why ``cell`` cannot run on ``device`` although its settings are valid (fp8 on a GPU without float8
    kernels; what its base's ``device_check`` says), or None. ``capability``: the CUDA compute capability
    (default: asked of the device); ``base``: the cell's resolved base quantizer."""
    reason = None if base is None else base.device_check(cell, device)
    if reason:
        return reason
    if cell.execution != "fp8" or device.type != "cuda":
        return None
    capability = tuple(capability or torch.cuda.get_device_capability(device))
    if capability < FP8_CAPABILITY:
        return (f"execution=fp8 needs float8 kernels (CUDA compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} "
                f"or newer); this GPU has {capability[0]}.{capability[1]}")
    return None


def without_device_skips(matrix: Matrix, device: torch.device, capability: tuple[int, int] | None = None) -> Matrix:
    """``matrix`` with the cells this device cannot run moved to its skipped combinations, with reasons."""
    keep, skipped = [], list(matrix.skipped)
    for cell in matrix.cells:
        reason = device_skip_reason(cell, device, capability, matrix.resolution(cell).base)
        if reason is None:
            keep.append(cell)
        else:
            skipped.append({**{k: getattr(cell, k) for k in AXES}, "reason": reason})
    return matrix if len(keep) == len(matrix.cells) else dataclasses.replace(matrix, cells=keep, skipped=skipped)


class Runner:
    def __init__(self, matrix: Matrix, out: str | Path, device: str = "auto", force: bool = False,
                 progress: bool = True, argv: list[str] | None = None, log: Callable[[str], None] | None = None,
                 world: World | None = None, only: set[str] | None = None):
        """``world``: this process's place among torchrun ranks (default: alone). ``only``: run just
        these cell ids (a SLURM array task's share); the tables still list every finished cell."""
        self.out = Path(out)
        self.device = pick_device(device)
        self.matrix = matrix = without_device_skips(matrix, self.device)
        self.force = force
        self.world = world or World()
        self.progress = progress and sys.stderr.isatty() and self.world.main  # bars only for a person watching
        self.argv = argv
        printer = log or (lambda text: tqdm.write(text, file=sys.stdout))
        self.store = RunStore(out, matrix, force, only, printer if self.world.main else None)
        self.models: dict[str, ZooModel] = {}
        needs_fp_reference = any(METRICS[n].needs_fp_reference for n in matrix.metrics)
        self.generator = Generator(self.store, self.models, self.device, self.world, self.progress,
                                   matrix.run.get("trace_layer", ""), matrix.run.get("trace_samples", 1),
                                   needs_fp_reference, matrix.run.get("timing_repeats", 1))
        self.evaluator = Evaluator(self.store, matrix.metrics, matrix.inception, self.device)

    @property
    def ids(self) -> list[str]:
        return self.store.ids

    def log(self, text: str) -> None:
        self.store.log(plain(text))  # a cell's error may quote a library's escape codes

    def load_models(self) -> None:
        """Load every model of the matrix and check the matrix against them (trace layer, timesteps)."""
        for cell in self.matrix.cells:
            if cell.model not in self.models:
                self.models[cell.model] = load_model(cell.model, cell.checkpoint, str(self.device))
                names = dict(self.models[cell.model].unet.named_modules())
                layer = trace_layer(self.matrix.run, cell.model)
                if layer and not isinstance(names.get(layer), QUANTIZABLE):
                    raise BenchError(f"run.trace_layer {layer!r} is not a conv/linear layer of model {cell.model!r}"
                                     + (" (give one layer per model: trace_layer = {model = \"layer\", ...})"
                                        if isinstance(self.matrix.run.get("trace_layer"), str) else ""))
            with user_input():  # steps the model's timestep grid cannot have
                self.matrix.resolution(cell).sampler.timesteps(self.models[cell.model].schedule)

    def pending(self) -> list[tuple[str, CellSpec]]:
        """The cells this runner still has to generate (not finished, and in ``only`` if given)."""
        return self.store.pending()

    def invocation(self) -> dict:
        return {"started_utc": now(), "argv": self.argv, "git_revision": git_revision(), "device": str(self.device),
                "world_size": self.world.size, "force": self.force,
                "cells": None if self.store.only is None else sorted(self.store.only)}

    def prepare(self) -> None:
        """Under ``store.open()``: set the directory up and record this invocation in run.json."""
        self.store.prepare(self.invocation(), {n: dict(m.info) for n, m in self.models.items()},
                           provenance(str(self.device)))

    def run(self, before: Callable[[list[tuple[str, CellSpec]]], None] | None = None) -> RunSummary:
        """Generate and evaluate the pending cells. ``before(todo)`` runs on rank 0 once the work is
        known (the CLI prints its cost estimate there)."""
        start, world, store = time.perf_counter(), self.world, self.store
        main = world.main
        # every step that may fail on rank 0 alone is collective (``together``), so that no rank is left
        # waiting in a collective the others never reach
        together(world, lambda: store.check() if main else None)
        together(world, self.load_models)
        with ExitStack() as stack:

            def set_up() -> None:
                if main:
                    stack.enter_context(store.open())
                    self.prepare()
                    store.share()
                    store.log_damaged()

            together(world, set_up)
            todo = world.broadcast(self.pending() if main else None)
            self.log(f"{self.matrix.source}: {len(self.ids)} cells ({len(self.ids) - len(todo) if main else 0} "
                     f"finished, {len(todo)} to run" + (f" by this task, of {len(store.only)}" if store.only is not None
                                                       else "")
                     + f", {len(self.matrix.skipped)} invalid combinations skipped) on {self.device}"
                     + (f" x {world.size} processes" if world.distributed else "") + f" -> {self.out}")
            for skip in self.matrix.skipped:
                later = "".join(f" {value}" for value in later_settings(skip))
                self.log(f"  skipped {skip['base']} {skip['modulation']} W{skip['w_bits']}A{skip['a_bits']} "
                         f"{skip['a_granularity']} {skip['cache']}{later}: {skip['reason']}")
            if any(cell.dtype == "float16" for _, cell in todo) and float16_emulated(self.device):
                self.log("  float16 cells run emulated on this CPU (no native float16 kernels: no AVX512-FP16 or "
                         "AMX-FP16), many times slower than float32; their timings are not the hardware's")
            if before is not None and todo:
                together(world, lambda: before(todo) if main else None)
            self._evaluate_finished()  # may find finished cells' samples damaged: they run again
            todo = world.broadcast(self.pending() if main else None)
            ran, seen, batch, held_elsewhere, finished_elsewhere = 0, set(), todo, [], 0
            while batch:
                bar, total = tqdm(batch, desc="cells", unit="cell", disable=not self.progress), len(batch)
                for done, (key, spec) in enumerate(bar, start=1):
                    seen.add(key)
                    bar.set_postfix_str(spec.label)
                    cell = store.cell(key)
                    with ExitStack() as held:
                        mine = held.enter_context(cell.lock()) if main else None
                        state = world.broadcast(("run" if not store.finished(key)[0] else "finished") if mine
                                                else "held" if main else None)
                        if state == "held":  # another runner sharing this directory is generating it
                            self.log(f"[{done}/{total}] {spec.label}: held by another runner, skipped")
                            held_elsewhere.append(key)
                            continue
                        if state == "finished":  # another runner has just finished it
                            self.log(f"[{done}/{total}] {spec.label}: finished meanwhile by another runner")
                            finished_elsewhere += 1
                            continue
                        row, record = self.generator.generate(cell)
                        if main and row["status"] == "ok":
                            row = self.evaluator.evaluate(cell, record.images) or row
                    ran += 1

                    def tables(row=row, done=done, total=total) -> None:
                        if main:
                            store.write_tables()
                            self.log(f"[{done}/{total}] {describe(row)}")

                    together(world, tables)
                bar.close()
                # a finished cell found damaged meanwhile (its reference made again) runs in this invocation
                batch = world.broadcast([(k, c) for k, c in self.pending() if k not in seen] if main else None)
                todo = todo + batch
            rows = store.rows() if main else []
            together(world, lambda: store.write_tables() if main else None)
        wanted = set(self.ids) if store.only is None else store.only
        failed = [r["cell_id"] for r in rows if (r["status"] != "ok" or r["cell_id"] in self.evaluator.errors)
                  and r["cell_id"] in wanted and r["cell_id"] not in held_elsewhere]  # (its row: an earlier try)
        unevaluated = [key for key in failed if key in self.evaluator.errors]
        return RunSummary(self.out, len(self.ids), ran, len(self.ids) - len(todo) + finished_elsewhere, failed,
                          len(self.matrix.skipped), time.perf_counter() - start, unevaluated, held_elsewhere)

    def _evaluate_finished(self) -> None:
        """Finished cells lacking a metric the matrix now asks for get it from their saved samples (the
        references those metrics need are made first, by every rank); a cell whose samples file turns
        out damaged is marked to run again."""
        todo = []
        if self.world.main:
            for cell in self.evaluator.todo():
                row, _ = cell.read_result()
                todo.append((cell.key, self.evaluator.wanted(row)))
        for key, wanted in self.world.broadcast(todo):  # the same list on every rank
            cell = self.store.cell(key)
            if self.evaluator.needs_fp_reference(wanted):
                self.generator.fp_reference(fp_reference_cell(cell.spec), load=False)  # every rank takes part

            def evaluate(cell=cell, wanted=wanted) -> None:
                if self.world.main and self.evaluator.evaluate(cell) is not None:
                    self.log(f"added {', '.join(wanted)} to finished cell {cell.key} ({cell.spec.method})")

            together(self.world, evaluate)


def run_matrix(matrix: Matrix, out: str | Path, **kwargs) -> RunSummary:
    return Runner(matrix, out, **kwargs).run()
