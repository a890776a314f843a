"""``modiff-bench report DIR [DIR ...]``: tables, figures, ``report.html`` and ``report.md``.

Everything comes from the run directories: the cells' results (``cells/*/result.json``, each
validated; ``results.parquet`` only for a directory without cells), ``run.json`` and the files the
cells saved (samples, traces); nothing is sampled here. The derived tables (``results.csv`` /
``.parquet`` / ``.md``) are rewritten when they are stale or damaged (a run killed between a cell
and its table), and a damaged ``run.json`` costs the header its matrix details, never the report.
Several directories are merged into one report, e.g. a new method's run next to the baselines' run,
or a CPU run next to a GPU run.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.errors import BenchError
from bench.methods import LATER_DEFAULTS, later_settings, method_versions
from bench.provenance import package_versions, write_atomic

from .tables import MODULATION_LABELS, Table, all_tables, param_value, with_later_defaults

# The settings a reader sees in a report; cells alike in these but with different ids differ in
# something hidden (the checkpoint) and must not be merged.
VISIBLE = ["model", "sampler", "steps", "eta", "n_samples", "seed", "batch_size", "base", "modulation", "cache",
           "w_bits", "a_bits", "a_granularity", "execution", "dtype", "memory_format", "params", "device"]


def paper_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The rows of fake-quantized float32 contiguous uncompiled cells (``LATER_DEFAULTS``: what the
    paper-style tables and figures compare), and how many other rows there are (int8 / fp8 execution,
    bfloat16, channels-last, compiled: in results.csv, Table 1's extra columns, the wall-clock table and
    the quality-vs-throughput figure)."""
    frame = with_later_defaults(frame)
    keep = (frame[list(LATER_DEFAULTS)] == pd.Series(LATER_DEFAULTS)).all(axis=1)
    keep &= pd.Series([param_value(row, "compile") is not True for _, row in frame.iterrows()], index=frame.index,
                      dtype=bool)
    return frame[keep], int((~keep).sum())


@dataclass
class Run:
    directory: Path
    label: str
    info: dict
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)  # what loading found damaged, and repaired


def _read_info(path: Path) -> tuple[dict, str | None]:
    """run.json, or ({}, why not): the report is built without it then."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        text = str(exc).strip().splitlines()
        return {}, f"{type(exc).__name__}: {text[0] if text else ''}"
    if not isinstance(info, dict):
        return {}, f"a JSON {type(info).__name__}, not an object"
    return info, None


def _ordered_ids(directory: Path, info: dict) -> list[str]:
    """The run's cell ids in run.json's order (the matrix order), then any others present, sorted."""
    present = sorted(p.name for p in (directory / "cells").iterdir() if p.is_dir())
    listed = [c.get("cell_id") for c in info.get("cells", []) if isinstance(c, dict)] \
        if isinstance(info.get("cells"), list) else []
    listed = [k for k in dict.fromkeys(listed) if k in present]
    return listed + [k for k in present if k not in set(listed)]


def _stale_tables(directory: Path, frame: pd.DataFrame) -> str | None:
    """Why results.parquet / results.csv do not hold the cells' rows, or None when they do."""

    def one_line(exc: Exception) -> str:
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0] if text else ''}"

    by_cell = frame.sort_values("cell_id").reset_index(drop=True)
    for name in ("results.parquet", "results.csv"):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            table = pd.read_parquet(path) if name.endswith(".parquet") else pd.read_csv(path)
            ids = list(table["cell_id"])
        except Exception as exc:  # garbled: ArrowInvalid, ParserError, OSError, no cell_id column
            return f"{name} is unreadable ({one_line(exc)})"
        if sorted(map(str, ids)) != sorted(by_cell["cell_id"]):
            return f"{name} held {len(ids)} row(s) for {len(frame)} cell result(s)"
        if name.endswith(".parquet"):  # every value (a metric added to a finished cell, ...)
            try:
                pd.testing.assert_frame_equal(table.sort_values("cell_id").reset_index(drop=True), by_cell,
                                              check_dtype=False)
            except (AssertionError, KeyError, TypeError, ValueError):
                return f"{name} is out of date"
    return None


def _metric_names(info: dict) -> list[str] | None:
    run = info.get("resolved", {}).get("run", {}) if isinstance(info.get("resolved"), dict) else {}
    metrics = run.get("metrics") if isinstance(run, dict) else None
    return metrics if isinstance(metrics, list) and all(isinstance(m, str) for m in metrics) else None


def _import_plugins(info: dict | None, label: str, notes: list[str]) -> None:
    """Import the plugins the run's matrix imported (user metrics bring their columns' labels)."""
    from bench.methods import import_plugins

    resolved = (info or {}).get("resolved") if isinstance((info or {}).get("resolved"), dict) else {}
    run = resolved.get("run") if isinstance(resolved.get("run"), dict) else {}
    imports = run.get("imports") if isinstance(run.get("imports"), list) else []
    source = str((info or {}).get("source") or "")
    try:
        import_plugins(imports, Path(source).parent if source.endswith(".toml") else None)
    except BenchError as exc:
        notes.append(f"{label}: the matrix's plugins could not be imported ({exc}); their metrics show under "
                     "their column names")


def _current(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """``rows`` made by the current version of each of their methods, and the labels of the others
    (``bench.methods.method_versions``: a fix that changes a method's samples raises its version)."""
    keep, old = [], []
    for row in rows:
        recorded = row.get("method_versions") if isinstance(row.get("method_versions"), dict) else {}
        if recorded == method_versions(row):
            keep.append(row)
        else:
            made = ", ".join(f"{k} v{v}" for k, v in sorted(recorded.items())) or "version 1"
            old.append(f"{row.get('cell_id')} {row.get('method')} W{row.get('w_bits')}A{row.get('a_bits')} ({made})")
    return keep, old


def load_run(directory: str | Path) -> Run:
    """One run directory. Its table is built from the cells' valid results (invalid ones are left out
    with a note), and results.csv / .parquet / .md are rewritten when they do not hold those rows; a
    directory without cells (tables copied alone) is read from results.parquet."""
    from bench.store import collect_rows, table_frame, write_tables  # (the run directory's own rows and tables)

    directory = Path(directory)
    label = directory.name or str(directory)
    results = directory / "results.parquet"
    has_cells = any((directory / "cells").glob("*/result.json")) if (directory / "cells").is_dir() else False
    if not has_cells and not results.is_file():
        raise BenchError(f"{directory} is not a run directory (no results.parquet; run 'modiff-bench run' first)")
    notes = []
    info, problem = _read_info(directory / "run.json")
    if problem is not None:
        notes.append(f"{label}: run.json could not be read ({problem}); the header shows what the cells record "
                     "(the next 'modiff-bench run' of this matrix rebuilds it)")
    _import_plugins(info, label, notes)
    if has_cells:
        problems: dict[str, str] = {}
        rows = collect_rows(directory, _ordered_ids(directory, info), problems)
        for key, reason in sorted(problems.items()):
            notes.append(f"{label}: cell {key} left out, its result.json is invalid ({reason}); the next "
                         "'modiff-bench run' runs it again")
        rows, superseded = _current(rows)
        if superseded:
            notes.append(f"{label}: {len(superseded)} cell(s) made by an earlier version of their method are left "
                         f"out ({', '.join(superseded)}); the next 'modiff-bench run' of the matrix remakes them under "
                         "new ids")
        if not rows:
            raise BenchError(f"{directory} holds no valid cell result ({len(problems)} invalid result.json file(s))")
        frame = table_frame(rows)
        stale = _stale_tables(directory, frame)
        if stale is not None:
            try:
                write_tables(directory, rows, _metric_names(info))
                notes.append(f"{label}: {stale}; results.csv, .parquet and .md were rebuilt from the "
                             f"{len(rows)} cell result(s)")
            except OSError as exc:
                notes.append(f"{label}: {stale}; the tables could not be rebuilt ({exc}); this report uses "
                             "the cell results")
    else:
        try:
            frame = pd.read_parquet(results)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise BenchError(f"cannot read {results} ({type(exc).__name__}: {text[0] if text else ''}) and "
                             f"{directory} has no cell results to rebuild it from") from None
    frame["run_dir"] = str(directory)
    return Run(directory, label, info, frame, notes)


def merge(runs: list[Run]) -> pd.DataFrame:
    """One table from several runs. The same cell measured twice on one device is refused, and so
    are cells that look the same but differ in hidden settings."""
    frame = with_later_defaults(pd.concat([r.frame for r in runs], ignore_index=True))
    twice = frame[frame.duplicated(["cell_id", "device"], keep=False)]
    if len(runs) > 1 and not twice.empty:
        cell = twice.iloc[0]
        dirs = ", ".join(sorted(set(twice[twice.cell_id == cell.cell_id].run_dir)))
        raise BenchError(f"cell {cell.cell_id} ({cell.method} W{cell.w_bits}A{cell.a_bits}) was measured on "
                         f"{cell.device} in more than one run ({dirs}); merge runs of different cells or devices")
    visible = frame[VISIBLE].astype(str).agg("|".join, axis=1)
    ids = frame.groupby(visible).cell_id.nunique()
    if (ids > 1).any():
        key = ids[ids > 1].index[0]
        rows = frame[visible == key]
        raise BenchError(f"{rows.iloc[0].method} W{rows.iloc[0].w_bits}A{rows.iloc[0].a_bits} appears in "
                         f"{', '.join(sorted(set(rows.run_dir)))} with the same visible settings but different hidden "
                         "ones (checkpoint); they cannot share a table")
    return frame


def _meta(run: Run) -> list[tuple[str, str]]:
    frame, info = run.frame, run.info
    prov = _dict(info.get("provenance"))
    versions = _dict(prov.get("versions"))
    revisions = sorted(set(frame.git_rev.dropna()))
    seeds = sorted({(int(s), int(s) + int(n) - 1) for s, n in zip(frame.seed, frame.n_samples, strict=True)})
    status = frame.status.value_counts().to_dict()
    return [
        ("matrix", f"{info.get('source', '?')} (hash {info.get('matrix_hash', '?')})"),
        ("cells", ", ".join(f"{n} {s}" for s, n in status.items()) + f"; {len(_skipped(info))} "
         "invalid combinations skipped"),
        ("model", ", ".join(sorted(set(frame.model)))),
        ("sampler / steps / eta", ", ".join(sorted({f"{a} / {b} / {c}" for a, b, c in
                                                    zip(frame.sampler, frame.steps, frame.eta, strict=True)}))),
        ("samples per cell / seeds", ", ".join(f"{b - a + 1} / {a}-{b}" for a, b in seeds)),
        ("batch size", ", ".join(sorted({str(int(b)) for b in frame.batch_size}))),
        ("device", ", ".join(sorted(set(frame.device))) + (f" — {prov['device']}" if prov.get("device") else "")),
        ("git revision", ", ".join(revisions) or "unknown"),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)),
        ("started", _started(info)),
    ]


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _skipped(info: dict) -> list[dict]:
    skipped = info.get("skipped")
    return [s for s in skipped if isinstance(s, dict)] if isinstance(skipped, list) else []


def _started(info: dict) -> str:
    invocations = info.get("invocations")
    first = invocations[0] if isinstance(invocations, list) and invocations else {}
    return str(first.get("started_utc", "?")) if isinstance(first, dict) else "?"


def _notes(runs: list[Run], frame: pd.DataFrame) -> list[str]:
    notes = [note for run in runs for note in run.notes]
    reasons: dict[tuple[str, str], int] = {}
    for missing in frame.missing_metrics.dropna():
        for column, reason in json.loads(missing).items():
            reasons[column, reason] = reasons.get((column, reason), 0) + 1
    for (column, reason), count in sorted(reasons.items()):
        notes.append(f"{column} not computed for {count} cell(s): {reason}")
    for _, cell in frame[frame.status != "ok"].iterrows():
        notes.append(f"cell {cell.cell_id} ({cell.method} W{cell.w_bits}A{cell.a_bits}) failed: {cell.error}")
    for run in runs:
        for skip in _skipped(run.info):
            later = "".join(f" {value}" for value in later_settings(skip))
            notes.append(f"{run.label}: skipped {skip.get('base')} {skip.get('modulation')} "
                         f"W{skip.get('w_bits')}A{skip.get('a_bits')}{later}: {skip.get('reason')}")
        if frame[frame.run_dir == str(run.directory)].git_rev.nunique() > 1:
            notes.append(f"{run.label}: cells were measured at different git revisions (the run was resumed "
                         "after a code change); each row records its own")
    measured = [m for m in ("fid", "fd_domain", "psnr_to_fp") if m in frame and frame[m].notna().any()]
    if not measured:
        notes.append("no quality metric was measured: the tables show costs only")
    return notes


def _traces(frame: pd.DataFrame) -> dict[str, dict]:
    """Fig. 3 data: the traces of one base and bit setting, with every modulation the run has."""
    if "trace_file" not in frame:
        return {}
    rows = frame[frame.trace_file.notna() & (frame.status == "ok") & (frame.cache == "none")]
    if rows.empty:
        return {}
    quantized = rows[rows.a_bits < 32]
    bits = sorted(set(quantized.a_bits)) if not quantized.empty else []
    a_bits = 4 if 4 in bits else (bits[len(bits) // 2] if bits else None)
    chosen = rows[(rows.a_bits == a_bits) & (rows.w_bits == rows.w_bits.max())] if a_bits else rows
    base = "lcq" if (chosen.base == "lcq").any() else chosen.base.iloc[0]
    out = {}
    for _, cell in chosen[chosen.base == base].iterrows():
        data = json.loads((Path(cell.run_dir) / cell.trace_file).read_text())
        out[f"{base.upper()} W{cell.w_bits}A{cell.a_bits} {MODULATION_LABELS[cell.modulation]}"] = data
    return out


def build_report(directories: list[str | Path], out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ ``figures/``) into ``out``
    (default: the only run directory). Returns their paths."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    from .plots import all_figures

    if not directories:
        raise BenchError("name at least one run directory")
    runs = [load_run(d) for d in directories]
    if out is None:
        if len(runs) > 1:
            raise BenchError("several run directories: say where the merged report goes with --out")
        out = runs[0].directory
    out = Path(out)
    everything = merge(runs)
    notes = _notes(runs, everything)
    frame, others = paper_rows(everything)
    if others:
        notes.append(f"{others} cell(s) with real low-bit execution, bfloat16, channels-last or compilation are in "
                     "results.csv (columns execution, dtype, memory_format, speedup_fp32, speedup_bf16), in Table 1 "
                     "under their own column groups, in the wall-clock table and in the quality-vs-throughput "
                     "figure; the other tables and figures compare the paper's fake-quantized float32 cells")
    tables: list[Table] = all_tables(frame, everything)
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    try:
        figures = all_figures(frame, {str(r.directory): r.directory for r in runs}, figures_dir, _traces(frame),
                              everything)
    except (OSError, ValueError, KeyError) as exc:  # a bad trace or sample file costs the figures, not the tables
        figures = []
        notes.append(f"figures could not be drawn: {type(exc).__name__}: {exc}")
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    title = "MoDiff benchmark report: " + ", ".join(r.label for r in runs)
    env = Environment(loader=PackageLoader("reports", "templates"), autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(
        title=title, created=created, version=package_versions()["modiff-bench"],
        runs=[{"label": r.label, "meta": _meta(r)} for r in runs], notes=notes, tables=tables,
        figures=[{"name": f.name, "title": f.title, "caption": f.caption, "svg_name": Path(f.svg).name,
                  "data": base64.b64encode(Path(f.png).read_bytes()).decode()} for f in figures])
    html_path, md_path = out / "report.html", out / "report.md"
    write_atomic(html_path, lambda tmp: tmp.write_text(html))
    write_atomic(md_path, lambda tmp: tmp.write_text(_markdown(title, created, runs, notes, tables, figures, out)))
    return html_path, md_path


def _markdown(title, created, runs, notes, tables, figures, out: Path) -> str:
    lines = [f"# {title}", "", f"Generated {created}. Numbers labelled \"(paper)\" are the papers' published values; "
             "all others were measured by the run(s) below.", ""]
    for run in runs:
        lines += [f"## Run: {run.label}", ""] + [f"- **{k}**: {v}" for k, v in _meta(run)] + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    for table in tables:
        lines += [f"## {table.title}", "", table.caption, "", table.to_markdown(), ""]
    if figures:
        lines += ["## Figures", ""]
        for f in figures:
            lines += [f"![{f.title}]({Path(f.png).relative_to(out)})", "", f"*{f.title}.* {f.caption}", ""]
    return "\n".join(lines)
