"""``modiff-bench report DIR [DIR ...]``: tables, figures, ``report.html`` and ``report.md``.

Everything comes from the run directories: the cells' results (``cells/*/result.json``, each
validated; ``results.parquet`` only for a directory without cells), ``run.json`` and the files the
cells saved (samples, traces); nothing is sampled here. The derived tables (``results.csv`` /
``.parquet`` / ``.md``) are rewritten when their content differs from the cells' (a run killed
between a cell and its table, an edited file), and a damaged ``run.json`` costs the header its
matrix details, never the report. A run directory is data: the plugins its ``run.json`` lists are
never imported (``modiff-bench report --import`` names them; without, the report says which it
needed), and samples are drawn only when they match the SHA-256 their cell recorded.
Several directories are merged into one report, e.g. a new method's run next to the baselines' run,
or a CPU run next to a GPU run.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.cell import LATER_DEFAULTS, later_settings
from bench.errors import BenchError
from bench.provenance import package_versions, write_atomic
from bench.registry import method_versions, methods

from .tables import MODULATION_LABELS, Table, all_tables, param_value, with_later_defaults

# The settings a reader sees in a report; cells alike in these but with different ids differ in
# something hidden (the checkpoint) and must not be merged.
VISIBLE = ["model", "sampler", "steps", "eta", "n_samples", "seed", "batch_size", "base", "modulation", "cache",
           "w_bits", "a_bits", "a_granularity", "execution", "dtype", "memory_format", "params", "device"]


def paper_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The rows of fake-quantized float32 contiguous uncompiled cells (``LATER_DEFAULTS``: what the
    paper-style tables and figures compare), and how many other rows there are (int8 / fp8 execution,
    bfloat16 or float16, channels-last, compiled: in results.csv, Table 1's extra columns, the wall-clock table and
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
    recorded: dict[str, dict] = field(default_factory=dict)  # cell id -> its result (the samples it recorded)
    missing_plugins: str | None = None  # the plugins the run needs that this process has not imported


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


def _stale_tables(directory: Path, frame: pd.DataFrame, markdown: str | None = None) -> str | None:
    """Why results.parquet / results.csv (and results.md, given its expected text) do not hold the
    cells' rows, or None when they do: every value is compared, not only the cell ids."""

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
        # every value (a metric added to a finished cell, an edited file); the CSV against the text the
        # cells' rows write, read back alike
        expected = by_cell if name.endswith(".parquet") else pd.read_csv(io.StringIO(by_cell.to_csv(index=False)))
        try:
            pd.testing.assert_frame_equal(table.sort_values("cell_id").reset_index(drop=True), expected,
                                          check_dtype=False)
        except (AssertionError, KeyError, TypeError, ValueError):
            return f"{name} is out of date"
    if markdown is not None:
        try:
            if (directory / "results.md").read_text() != markdown:
                return "results.md is out of date"
        except (OSError, ValueError):
            return "results.md is missing or unreadable"
    return None


def _metric_names(info: dict) -> list[str] | None:
    run = info.get("resolved", {}).get("run", {}) if isinstance(info.get("resolved"), dict) else {}
    metrics = run.get("metrics") if isinstance(run, dict) else None
    return metrics if isinstance(metrics, list) and all(isinstance(m, str) for m in metrics) else None


def _missing_plugins(info: dict, rows: list[dict]) -> str | None:
    """The plugins a run needs and this process lacks, in words, or None: the metrics and methods its
    cells recorded that are not registered, and the imports its run.json lists (which are never
    imported from a run directory: ``modiff-bench report --import``)."""
    from bench.metrics import METRICS

    resolved = info.get("resolved") if isinstance(info.get("resolved"), dict) else {}
    run = resolved.get("run") if isinstance(resolved.get("run"), dict) else {}
    imports = [str(i) for i in run.get("imports")] if isinstance(run.get("imports"), list) else []
    registered = methods()
    metrics = {m for r in rows for m in (r.get("metrics") or []) if m not in METRICS}
    used = {r.get("base") for r in rows} | {r.get("cache") for r in rows if r.get("cache") != "none"}
    unknown = sorted(str(m) for m in used if m is not None and m not in registered
                     and not any(str(m).startswith(f"{n}-") for n in registered))
    if not metrics and not unknown:
        return None
    parts = ([f"metric(s) {', '.join(sorted(metrics))}"] if metrics else []) + (
        [f"method(s) {', '.join(unknown)}"] if unknown else [])
    source = str(info.get("source") or "")
    where = f" (relative to {Path(source).parent})" if source.endswith(".toml") and imports else ""
    return (f"needs plugins this report was not given: {' and '.join(parts)} not registered"
            + (f"; its matrix imported {', '.join(imports)}{where}, which a report never imports from a run "
               f"directory: pass --import {' --import '.join(imports)}" if imports else "")
            + ("; those metrics show under their column names" if metrics else ""))


def _current(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """``rows`` made by the current version of each of their methods, and the labels of the others
    (``bench.registry.method_versions``: a fix that changes a method's samples raises its version)."""

    registered = methods()
    keep, old = [], []
    for row in rows:
        recorded = row.get("method_versions") if isinstance(row.get("method_versions"), dict) else {}
        recorded = {k: v for k, v in recorded.items() if k in registered}  # (a plugin not imported: not known)
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
    from bench.store import collect_rows, markdown_text, table_frame, write_tables  # (the directory's own)

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
    missing_plugins, recorded = None, {}
    if has_cells:
        problems: dict[str, str] = {}
        rows = collect_rows(directory, _ordered_ids(directory, info), problems)
        missing_plugins = _missing_plugins(info, rows)
        if missing_plugins is not None:
            notes.append(f"{label}: {missing_plugins}")
        recorded = {r["cell_id"]: r for r in rows if r.get("samples_sha256") is not None}
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
        stale = _stale_tables(directory, frame, markdown_text(rows, frame, _metric_names(info)))
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
    return Run(directory, label, info, frame, notes, recorded, missing_plugins)


def _unverified_samples(runs: list[Run], frame: pd.DataFrame) -> dict[int, str]:
    """The rows of ``frame`` (by index) whose samples file is not the one their cell recorded (size and
    SHA-256), with the reason: their samples are not drawn, and the cell is marked (in its result.json)
    for the next run to generate again. Cells of older versions recorded no hash: drawn when they load,
    as a run treats them."""
    from bench.provenance import sha256_file
    from bench.store import mark_result_damaged

    by_dir = {str(r.directory): r for r in runs}
    checked: dict[Path, tuple[int, str] | str] = {}
    bad = {}
    for index, row in frame.iterrows():
        run = by_dir.get(str(row.get("run_dir")))
        recorded = run.recorded.get(row.get("cell_id")) if run is not None else None
        file = row.get("samples_file")
        if recorded is None or row.get("status") != "ok" or not isinstance(file, str) or not file:
            continue
        path = run.directory / file
        if path not in checked:
            try:
                checked[path] = (path.stat().st_size, sha256_file(path))
            except OSError as exc:
                checked[path] = f"cannot be read ({type(exc).__name__})"
        found = checked[path]
        if isinstance(found, str):
            bad[index] = f"its samples file {file} {found}"
        elif found != (recorded.get("samples_bytes", found[0]), recorded["samples_sha256"]):
            bad[index] = f"its samples file {file} does not match the SHA-256 recorded when it was written"
        else:
            continue
        try:
            mark_result_damaged(run.directory, row["cell_id"], bad[index], recorded)
        except OSError:  # a read-only copy of a run: the note is all
            pass
    return bad


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
    notes.extend(_torchao_notes(frame))
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


def _torchao_notes(frame: pd.DataFrame) -> list[str]:
    """torchao quantizes linears only: on a UNet its cells leave the convolutions in float (their ``method_info``)."""
    if "method_info" not in frame:
        return []
    notes, seen = [], set()
    for _, cell in frame[(frame.status == "ok") & frame.base.astype(str).str.startswith("torchao-")].iterrows():
        info = json.loads(cell.method_info) if isinstance(cell.method_info, str) else {}
        convs, share = info.get("torchao_float_convs"), info.get("torchao_quantized_mac_share")
        if convs and (cell.model, cell.base) not in seen:
            seen.add((cell.model, cell.base))
            ran = f"; {share:.1%} of the conv/linear MACs run quantized" if isinstance(share, float) else ""
            notes.append(f"{cell.base} on {cell.model}: torchao quantizes linears only, so on a UNet the convolutions "
                         f"stay in float ({convs} convolutions{ran}); the gbops columns charge them at the cell's bit "
                         "widths")
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


def build_report(directories: list[str | Path], out: str | Path | None = None, imports: list[str] = (),
                 warn=None) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ ``figures/``) into ``out``
    (default: the only run directory). Returns their paths. ``imports``: plugins to import first (the
    user's ``--import``; never those a run.json lists); ``warn``: where the one line per run that
    lacks its plugins goes (default stderr)."""
    import sys

    from jinja2 import Environment, PackageLoader, select_autoescape

    from bench.plugins import import_plugins

    from .plots import all_figures

    if not directories:
        raise BenchError("name at least one run directory")
    import_plugins(list(imports))
    runs = [load_run(d) for d in directories]
    for run in runs:
        if run.missing_plugins is not None:
            (warn or (lambda text: print(text, file=sys.stderr)))(
                f"modiff-bench: warning: {run.directory}: {run.missing_plugins}")
    if out is None:
        if len(runs) > 1:
            raise BenchError("several run directories: say where the merged report goes with --out")
        out = runs[0].directory
    out = Path(out)
    everything = merge(runs)
    notes = _notes(runs, everything)
    frame, others = paper_rows(everything)
    if others:
        notes.append(f"{others} cell(s) with real low-bit execution, half precision, channels-last or compilation are "
                     "in results.csv (columns execution, dtype, memory_format, speedup_fp32, speedup_bf16), in Table 1 "
                     "under their own column groups, in the wall-clock table and in the quality-vs-throughput "
                     "figure; the other tables and figures compare the paper's fake-quantized float32 cells")
    tables: list[Table] = all_tables(frame, everything)
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    unverified = _unverified_samples(runs, frame)
    drawn = frame.copy()
    for index, reason in unverified.items():  # their grid cells show "no samples"
        cell = frame.loc[index]
        drawn.loc[index, "samples_file"] = None
        notes.append(f"cell {cell.cell_id} ({cell.method} W{cell.w_bits}A{cell.a_bits}): {reason}; its samples are "
                     "left out of the sample grids, and the next 'modiff-bench run' generates it again")
    try:
        figures = all_figures(drawn, {str(r.directory): r.directory for r in runs}, figures_dir, _traces(frame),
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
        lines += [line for note in table.notes for line in (f"*{note}*", "")]
    if figures:
        lines += ["## Figures", ""]
        for f in figures:
            lines += [f"![{f.title}]({Path(f.png).relative_to(out)})", "", f"*{f.title}.* {f.caption}", ""]
    return "\n".join(lines)
