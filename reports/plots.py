"""Paper-style figures rendered from a results table (``DIR/results.parquet``, one row per cell).

Every figure is written twice, as PNG (for a quick look and Markdown) and SVG (for papers), and is
described by a :class:`Figure` whose caption says what is plotted and from which columns. Figures
are drawn on bare :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
``pyplot``: nothing is shown, no global figure list grows, and importing this module does not
change the backend of a notebook that imports it.

Only what was measured is drawn: failed cells and NaN / infinite values are left out rather than
interpolated or replaced, so a missing point in a figure means a missing measurement.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .tables import MetricLabels, later_label, measured, replicated, setting_key

DPI = 120

# quality columns -> (label, direction), from the metric registry: these first, then any other (user metrics)
QUALITY_METRICS = MetricLabels(("fid", "fd_domain", "psnr_to_fp", "sfid", "is_mean", "is_domain"), quality_only=True)
PRIMARY_ORDER = ("fid", "fd_domain", "psnr_to_fp", "sfid")

# A figure compares methods within one experiment. These settings also change a metric's value, so a
# group is split on each of them that varies in the frame: two different experiments are never drawn
# as one point or one line.
GROUP_KEYS = ("model", "sampler", "steps", "w_bits")
CONTEXT_KEYS = ("checkpoint", "eta", "n_samples", "seed")
NUMERIC_COLUMNS = ("mse_to_fp", "gbops", "gbops_honest", "macs_g", "wall_s", "img_per_s", "img_per_s_lo",
                   "img_per_s_hi", "speedup_fp32", "speedup_bf16", "steps", "w_bits", "a_bits", "n_samples", "eta",
                   "seed")

MODULATIONS = ("off", "plain", "ec")
MODULATION_SUFFIX = {"off": "", "plain": " + plain mod.", "ec": " + MoDiff"}
MODULATION_STYLE = {"off": (":", "o"), "plain": ("--", "s"), "ec": ("-", "^")}  # linestyle, marker
MODULATION_NAME = {"off": "no modulation", "plain": "plain modulation", "ec": "MoDiff (error-compensated)"}
_OTHER_STYLE = ("-.", "D")

# Fixed colours for the built-in bases so that LCQ is the same colour in every figure of a report;
# bases that arrive later take the remaining palette colours in name order.
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
            "#7f7f7f")
_KNOWN_COLOURS = {"ltq": "#1f77b4", "lcq": "#ff7f0e", "psq": "#2ca02c", "dynamic": "#9467bd", "qdiff": "#d62728",
                  "ptqd": "#8c564b"}
_FP_COLOUR = "black"
LOG_SPAN = 100.0  # a y axis turns logarithmic when its values span more than this factor (two decades)


@dataclass
class Figure:
    """One rendered figure. ``series`` holds exactly the numbers that were drawn (label -> points), so
    tests and reports can check a figure without parsing images."""

    name: str
    title: str
    caption: str
    png: Path
    svg: Path
    series: dict[str, list[tuple]] = field(default_factory=dict, repr=False)


# -- labels --------------------------------------------------------------------------------------
def method_label(base: str, modulation: str = "off", cache: str = "none") -> str:
    """Paper-style names ("LCQ + MoDiff") rather than the matrix spelling ("lcq+ec")."""
    text = "FP" if base == "fp" else str(base).upper()
    text += MODULATION_SUFFIX.get(modulation, f" + {modulation}")
    if cache not in (None, "none") and not _is_missing(cache):
        text += f" + {cache}"
    return text


def _metric_info(metric: str) -> tuple[str, str]:
    return QUALITY_METRICS.get(metric, (metric, "lower"))


def _axis_label(metric: str) -> str:
    label, direction = _metric_info(metric)
    return f"{label}, {direction} is better"


def _bits_label(bits: int) -> str:
    if bits >= 32:
        return f"{bits}\n(float)"
    if bits == 0:
        return "0\n(reuse)"
    return str(bits)


def _slug(text: str) -> str:
    """File stems that are safe on every file system and in URLs."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.") or "figure"


def _unique(name: str, used: set[str]) -> str:
    stem, n = name, 2
    while name in used:
        name, n = f"{stem}-{n}", n + 1
    used.add(name)
    return name


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _fmt(value: float) -> str:
    return f"{value:.3g}"


# -- frames --------------------------------------------------------------------------------------
def _prepared(frame: pd.DataFrame, ok_only: bool = True) -> pd.DataFrame:
    """Finished cells with numeric metric columns: tables merged from CSVs or from runs that never
    measured a metric can hold None/strings where a float is expected."""
    out = frame.copy()
    if ok_only and "status" in out.columns:
        out = out[out["status"] == "ok"]
    for column in (*QUALITY_METRICS, *NUMERIC_COLUMNS):
        if column in out.columns:
            out[column] = pd.to_numeric(out[column], errors="coerce")
    if "modulation" not in out.columns:
        out["modulation"] = "off"
    if "cache" not in out.columns:
        out["cache"] = "none"
    out["cache"] = out["cache"].fillna("none")
    return out


def _varying(frame: pd.DataFrame, columns: Iterable[str]) -> list[str]:
    return [c for c in columns if c in frame.columns and frame[c].astype(str).nunique() > 1]


def _group_keys(frame: pd.DataFrame, base_keys: Iterable[str] = GROUP_KEYS, pool_seeds: bool = False) -> list[str]:
    """The settings that split a figure; ``pool_seeds``: not the seed when some setting was measured under
    several seed sets (a merged report), whose values are then drawn as a mean with a range."""
    skip = {"seed"} if pool_seeds and replicated(frame) else set()
    return [*base_keys, *(k for k in _varying(frame, CONTEXT_KEYS) if k not in skip)]


SINGLE_RUN = "Single run: no spread over seed sets."


def _runs_text(runs: int) -> str:
    """What a figure's values rest on: one run, or the mean over several seed sets with bars."""
    if runs <= 1:
        return SINGLE_RUN
    return (f"Mean over the {runs} runs with other seed sets (run.seed) that measured each setting; bars span "
            "their minimum to maximum.")


def _newest_first(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` the most recently finished first (unfinished last; of equal times, the later row first)."""
    if "finished_utc" in rows.columns and len(rows) > 1:
        rows = rows.sort_values("finished_utc", na_position="first", kind="stable")
    return rows.iloc[::-1]


def _collapse(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per setting (the newest of it), ``metric`` its mean over the seed sets that measured it,
    with ``range_lo`` / ``range_hi`` / ``range_runs`` columns (a range and a count)."""
    rows = rows[np.isfinite(rows[metric].to_numpy(dtype=float))]
    if rows.empty:
        return rows.assign(range_lo=[], range_hi=[], range_runs=[])
    keys = setting_key(rows)
    out = []
    for key in dict.fromkeys(keys):
        newest_first = _newest_first(rows[keys == key])
        value = measured(newest_first, metric)
        row = newest_first.iloc[0].copy()
        row[metric], row["range_lo"], row["range_hi"], row["range_runs"] = float(value), value.lo, value.hi, value.runs
        out.append(row)
    return pd.DataFrame(out).reset_index(drop=True)


def _context_text(keys: list[str], values: tuple) -> str:
    """The part of a title that names the experiment: model, sampler, steps, W bits, and any other
    setting that varies in the frame."""
    named = dict(zip(keys, values, strict=True))
    parts = [str(named[k]) for k in ("model", "sampler") if k in named]
    if "steps" in named:
        parts.append(f"{int(named['steps'])} steps")
    if "w_bits" in named:
        parts.append(f"W{int(named['w_bits'])}")
    short = {"n_samples": "n", "checkpoint": "ckpt"}
    parts += [f"{short.get(k, k)}={named[k]}" for k in CONTEXT_KEYS if k in named]
    return ", ".join(parts)


def _stem(keys: list[str], values: tuple) -> str:
    named = dict(zip(keys, values, strict=True))
    parts = [str(named.get("model")), str(named.get("sampler"))]
    if "steps" in named:
        parts.append(f"{int(named['steps'])}steps")
    if "w_bits" in named:
        parts.append(f"w{int(named['w_bits'])}")
    parts += [f"{k}{named[k]}" for k in CONTEXT_KEYS if k in named]
    return _slug("_".join(_slug(p) for p in parts))


def _groups(frame: pd.DataFrame, keys: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    if frame.empty:
        return []
    out = []
    for values, group in frame.groupby(keys, sort=True, dropna=False):
        out.append((values if isinstance(values, tuple) else (values,), group))
    return out


def _matching(frame: pd.DataFrame, keys: list[str], values: tuple) -> pd.DataFrame:
    mask = pd.Series(True, index=frame.index)
    for key, value in zip(keys, values, strict=True):
        if key not in frame.columns:
            continue
        mask &= frame[key].isna() if _is_missing(value) else frame[key] == value
    return frame[mask]


def _latest(rows: pd.DataFrame) -> pd.Series:
    """One row where several runs measured the same cell: the most recently finished one."""
    return _newest_first(rows).iloc[0]


def _sort_key(key: tuple) -> tuple:
    base, modulation, cache = key[:3]
    rest = key[3] if len(key) > 3 and key[3] is not None else ""
    return (base != "fp", str(base), MODULATIONS.index(modulation) if modulation in MODULATIONS else 9,
            str(modulation), cache != "none", str(cache), str(rest))


def _lines(group: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """Rows of one group per drawn line: (base, modulation, cache), split further by activation
    granularity only when one method was run at several granularities (otherwise its points would
    collide at the same bit width)."""
    out: dict[tuple, pd.DataFrame] = {}
    for key, rows in group.groupby(["base", "modulation", "cache"], sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        split = ("a_granularity" in rows.columns and rows["a_bits"].duplicated().any()
                 and rows["a_granularity"].nunique() > 1)
        if split:
            for granularity, part in rows.groupby("a_granularity", sort=True):
                out[(*key, granularity)] = part
        else:
            out[(*key, None)] = rows
    return dict(sorted(out.items(), key=lambda item: _sort_key(item[0])))


def _line_label(key: tuple) -> str:
    label = method_label(*key[:3])
    return f"{label} ({key[3]})" if key[3] is not None else label


def _colours(bases: Iterable[str]) -> dict[str, str]:
    colours = {"fp": _FP_COLOUR}
    unknown = sorted({str(b) for b in bases} - set(_KNOWN_COLOURS) - {"fp"})
    spare = [c for c in _PALETTE if c not in _KNOWN_COLOURS.values()]
    colours.update(_KNOWN_COLOURS)
    for i, base in enumerate(unknown):
        colours[base] = spare[i % len(spare)]
    return colours


def _style(modulation: str) -> tuple[str, str]:
    return MODULATION_STYLE.get(modulation, _OTHER_STYLE)


def _fp_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[(frame["base"] == "fp") & (frame["cache"] == "none")]


# -- drawing -------------------------------------------------------------------------------------
def _new_figure(width: float, height: float) -> MplFigure:
    fig = MplFigure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: MplFigure, out_dir: Path, name: str, title: str, caption: str,
          series: dict[str, list[tuple]]) -> Figure:
    """Both formats from one drawing; the SVG carries no date and fixed element ids so that
    re-rendering an unchanged table gives an unchanged file (clean diffs of a committed report)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
    try:
        fig.tight_layout()
        with mpl.rc_context({"svg.hashsalt": "modiff-bench"}):
            fig.savefig(png, dpi=DPI, bbox_inches="tight")
            fig.savefig(svg, bbox_inches="tight", metadata={"Date": None})
    finally:
        fig.clear()  # drop the artists now rather than whenever the garbage collector runs
    return Figure(name=name, title=title, caption=caption, png=png, svg=svg, series=series)


def _log_if_wide(ax, values: list[float]) -> None:
    if values and min(values) > 0 and max(values) / min(values) > LOG_SPAN:
        ax.set_yscale("log")


def _panel_grid(fig: MplFigure, n: int, ncols_max: int = 3) -> list:
    ncols = min(n, ncols_max)
    nrows = math.ceil(n / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _legend(fig: MplFigure, bases: Iterable[str], modulations: Iterable[str], colours: dict[str, str],
            *extra: Line2D) -> None:
    """Colour = base, marker = modulation (FP first, modulations in their usual order), then ``extra``,
    to the right of the panels."""
    bases = sorted(set(bases), key=lambda b: (b != "fp", b))
    modulations = sorted(set(modulations), key=lambda m: _sort_key(("", m, "none")))
    handles = [Line2D([], [], color=colours[b], marker="o", linestyle="", label=method_label(b)) for b in bases]
    handles += [Line2D([], [], color="0.3", marker=_style(m)[1], linestyle="", label=MODULATION_NAME.get(m, m))
                for m in modulations]
    fig.legend(handles=[*handles, *extra], loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)


# -- public API ----------------------------------------------------------------------------------
def primary_metric(frame: pd.DataFrame) -> str | None:
    """The headline quality metric of a table: FID when it was measured, else the cheaper stand-ins,
    so that the summary figures of a small run still say something."""
    usable = _prepared(frame)
    for metric in PRIMARY_ORDER:
        if metric in usable.columns and np.isfinite(usable[metric].to_numpy(dtype=float)).any():
            return metric
    return None


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the non-dominated (cost, quality) points, cheapest first.

    A point is dominated when another costs no more and is no worse, and is strictly better in one of
    the two. Points with a non-finite coordinate are never on the front and dominate nothing, and
    identical points do not dominate each other (both are kept)."""
    sign = -1.0 if higher_is_better else 1.0  # compare as "lower is better"
    valid = [(i, float(x), sign * float(y)) for i, (x, y) in enumerate(points) if _finite(x) and _finite(y)]
    front = []
    for i, x, y in valid:
        dominated = any(xj <= x and yj <= y and (xj < x or yj < y) for j, xj, yj in valid if j != i)
        if not dominated:
            front.append((x, y, i))
    return [i for _, _, i in sorted(front)]


def quality_vs_bits(frame: pd.DataFrame, metric: str, out_dir: Path) -> list[Figure]:
    """The paper's main comparison: how quality degrades as activations get fewer bits, and how much
    modulation recovers, for each model / sampler / steps / weight-bit experiment."""
    out_dir = Path(out_dir)
    usable = _prepared(frame)
    if metric not in usable.columns:
        return []
    label, direction = _metric_info(metric)
    keys = _group_keys(usable, pool_seeds=True)
    fp_keys = [k for k in keys if k != "w_bits"]
    fps = _fp_rows(usable)
    figures, used = [], set()
    for values, group in _groups(usable[usable["base"] != "fp"], keys):
        series: dict[str, list[tuple]] = {}
        ranges: dict[str, dict[int, tuple[float, float]]] = {}
        styles = {}
        runs = 1
        for key, rows in _lines(group).items():
            points, spread = {}, {}
            for a_bits, rows_at in rows.groupby("a_bits", sort=False):
                rows_at = rows_at[np.isfinite(rows_at[metric].to_numpy(dtype=float))]
                if len(rows_at):
                    value = measured(_newest_first(rows_at), metric)
                    points[int(a_bits)] = float(value)
                    runs = max(runs, value.runs)
                    if value.runs > 1:
                        spread[int(a_bits)] = (value.lo, value.hi)
            if points:
                series[_line_label(key)] = sorted(points.items(), reverse=True)
                styles[_line_label(key)] = key
                ranges[_line_label(key)] = spread
        if not series:
            continue
        fp_value = fp_range = None
        fp_match = _matching(fps, fp_keys, tuple(v for k, v in zip(keys, values, strict=True) if k != "w_bits"))
        fp_match = fp_match[np.isfinite(fp_match[metric].to_numpy(dtype=float))]
        if len(fp_match):
            value = measured(_newest_first(fp_match), metric)
            fp_value, runs = float(value), max(runs, value.runs)
            fp_range = (value.lo, value.hi) if value.runs > 1 else None

        context = _context_text(keys, values)
        bits = sorted({b for points in series.values() for b, _ in points}, reverse=True)
        position = {b: i for i, b in enumerate(bits)}
        colours = _colours(k[0] for k in styles.values())
        fig = _new_figure(7.2, 4.4)
        ax = fig.subplots()
        for line_label, points in series.items():
            base, modulation = styles[line_label][:2]
            linestyle, marker = _style(modulation)
            ax.plot([position[b] for b, _ in points], [v for _, v in points], linestyle=linestyle, marker=marker,
                    color=colours[base], linewidth=2.0 if modulation == "ec" else 1.4, markersize=6,
                    label=line_label)
            spread = [(b, v, *ranges[line_label][b]) for b, v in points if b in ranges[line_label]]
            if spread:  # the range over seed sets
                ax.errorbar([position[b] for b, *_ in spread], [v for _, v, *_ in spread],
                            yerr=[[v - lo for _, v, lo, _ in spread], [hi - v for _, v, _, hi in spread]],
                            fmt="none", ecolor=colours[base], elinewidth=1.0, capsize=3)
        if fp_value is not None:
            ax.axhline(fp_value, color=_FP_COLOUR, linestyle="--", linewidth=1.0, label=f"FP ({_fmt(fp_value)})")
            if fp_range is not None:
                ax.axhspan(*fp_range, color=_FP_COLOUR, alpha=0.08, linewidth=0)
        values_drawn = [v for points in series.values() for _, v in points]
        values_drawn += [x for spread in ranges.values() for pair in spread.values() for x in pair]
        values_drawn += [fp_value] if fp_value is not None else []
        _log_if_wide(ax, values_drawn)
        ax.set_xticks(range(len(bits)), [_bits_label(b) for b in bits])
        ax.set_xlim(-0.4, len(bits) - 0.6)
        ax.set_xlabel("Activation bits (A), high to low")
        ax.set_ylabel(_axis_label(metric))
        title = f"{label} vs. activation bits: {context}"
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
        if fp_value is not None:
            series["FP"] = [(32, fp_value)]
        for line_label, spread in ranges.items():
            if spread:
                series[f"{line_label} | range"] = [(b, *spread[b]) for b in sorted(spread, reverse=True)]
        if fp_range is not None:
            series["FP | range"] = [(32, *fp_range)]
        caption = (f"{label} (column `{metric}`; {direction} is better) of each method at each activation bit "
                   f"width for {context}; line style marks the modulation (dotted: none, dashed: plain, solid: "
                   f"MoDiff)" + (", the dashed black line is full precision" if fp_value is not None else "")
                   + (" (shaded: its range)" if fp_range is not None else "")
                   + ". Failed cells and unmeasured values are not drawn. " + _runs_text(runs))
        name = _unique(_slug(f"quality_vs_bits_{metric}_{_stem(keys, values)}"), used)
        figures.append(_save(fig, out_dir, name, title, caption, series))
    return figures


def _front_panel(ax, panel: str, points: list[tuple[float, float]], tags: list[str], front: list[int],
                 xlabel: str, ylabel: str, series: dict[str, list[tuple]]) -> None:
    """One panel of a trade-off figure, its points already drawn: the Pareto front (``front``, indices into
    ``points``, in x order) as a grey step line with ringed, labelled points; log x; the drawn numbers into
    ``series``."""
    fx, fy = [points[i][0] for i in front], [points[i][1] for i in front]
    ax.step(fx, fy, where="post", color="0.35", linewidth=1.2, zorder=2)
    ax.scatter(fx, fy, marker="o", s=140, facecolors="none", edgecolors="0.35", linewidths=1.0, zorder=2)
    for i in front:
        ax.annotate(tags[i], points[i], xytext=(4, 4), textcoords="offset points", fontsize=6.5, color="0.25")
    ax.set_xscale("log")
    _log_if_wide(ax, [y for _, y in points])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(panel, fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    series[panel] = [(x, y, tags[i]) for i, (x, y) in enumerate(points)]
    series[f"{panel} | Pareto front"] = [(points[i][0], points[i][1], tags[i]) for i in front]


def _front_handle() -> Line2D:
    return Line2D([], [], color="0.35", linewidth=1.2, marker="o", markersize=10, markerfacecolor="none",
                  label="Pareto front")


def quality_vs_gbops(frame: pd.DataFrame, metric: str, out_dir: Path) -> Figure | None:
    """Quality against compute, with the cells nothing beats on both: the trade-off a reader would
    choose from. One panel per model / sampler / steps, since neither axis compares across them."""
    usable = _prepared(frame)
    if metric not in usable.columns or "gbops" not in usable.columns:
        return None
    label, direction = _metric_info(metric)
    higher = direction == "higher"
    usable = usable[np.isfinite(usable[metric].to_numpy(dtype=float))
                    & np.isfinite(usable["gbops"].to_numpy(dtype=float)) & (usable["gbops"] > 0)]
    keys = _group_keys(usable, ("model", "sampler", "steps"), pool_seeds=True)
    if "seed" not in keys:  # one point per setting: the mean over the seed sets, with its range
        usable = _collapse(usable, metric)
    panels = _groups(usable, keys)
    runs = int(usable["range_runs"].max()) if "range_runs" in usable and len(usable) else 1
    if not panels:
        return None
    colours = _colours(usable["base"])
    fig = _new_figure(4.6 * min(len(panels), 3) + 2.4, 4.0 * math.ceil(len(panels) / 3))
    series: dict[str, list[tuple]] = {}
    any_cache = bool((usable["cache"] != "none").any())
    for ax, (values, rows) in zip(_panel_grid(fig, len(panels)), panels, strict=True):
        panel = _context_text(keys, values)
        rows = rows.reset_index(drop=True)
        tags = [f"{method_label(r.base, r.modulation, r.cache)} W{int(r.w_bits)}A{int(r.a_bits)}"
                for r in rows.itertuples()]
        for r in rows.itertuples():
            colour = colours[r.base]
            cached = r.cache != "none"
            ax.scatter([r.gbops], [getattr(r, metric)], marker=_style(r.modulation)[1], s=42, zorder=3,
                       facecolors="none" if cached else colour, edgecolors=colour, linewidths=1.2)
            if getattr(r, "range_runs", 1) > 1:
                value = getattr(r, metric)
                ax.errorbar([r.gbops], [value], yerr=[[value - r.range_lo], [r.range_hi - value]], fmt="none",
                            ecolor=colour, elinewidth=1.0, capsize=3, zorder=3)
        points = list(zip(rows["gbops"].astype(float), rows[metric].astype(float), strict=True))
        front = pareto_front(points, higher_is_better=higher)
        _front_panel(ax, panel, points, tags, front, "GBOPs per image per step (paper count, log scale)",
                     _axis_label(metric), series)
    extra = [_front_handle()]
    if any_cache:
        extra.append(Line2D([], [], color="0.3", marker="o", markerfacecolor="none", linestyle="",
                            label="hollow: with cache"))
    _legend(fig, usable["base"], usable["modulation"], colours, *extra)
    title = f"{label} vs. compute (GBOPs)"
    fig.suptitle(title, fontsize=11)
    caption = (f"{label} (column `{metric}`; {direction} is better) against the paper's bit-operation count "
               f"(column `gbops`, log scale) for every finished cell; colour is the base quantizer, marker the "
               f"modulation. The grey step line joins the Pareto front: cells that no other cell beats on both "
               f"cost and quality. " + _runs_text(runs))
    return _save(fig, Path(out_dir), _slug(f"quality_vs_gbops_{metric}"), title, caption, series)


def quality_vs_throughput(frame: pd.DataFrame, metric: str, out_dir: Path) -> Figure | None:
    """Quality against measured sampling throughput relative to full precision in bfloat16 (float32 where
    a panel has no bfloat16 cell), with the Pareto front: whether a method is faster in fact, not only
    cheaper on paper. One panel per model / sampler / steps / device (ratios are within one run)."""
    usable = _prepared(frame)
    for column in ("speedup_bf16", "speedup_fp32"):
        if column in usable.columns:
            usable[column] = pd.to_numeric(usable[column], errors="coerce")
    if metric not in usable.columns or not {"speedup_bf16", "speedup_fp32"} & set(usable.columns):
        return None
    usable = usable[np.isfinite(usable[metric].to_numpy(dtype=float))]
    keys = _group_keys(usable, ("model", "sampler", "steps", "device"))
    label, direction = _metric_info(metric)
    higher = direction == "higher"
    panels = []
    for values, rows in _groups(usable, keys):
        column = "speedup_bf16" if "speedup_bf16" in rows and rows["speedup_bf16"].notna().any() else "speedup_fp32"
        if column not in rows:
            continue
        rows = rows[np.isfinite(rows[column].to_numpy(dtype=float)) & (rows[column] > 0)].reset_index(drop=True)
        if len(rows):
            panels.append((values, rows, column))
    if not panels:
        return None
    colours = _colours(usable["base"])
    fig = _new_figure(4.6 * min(len(panels), 3) + 2.4, 4.0 * math.ceil(len(panels) / 3))
    series: dict[str, list[tuple]] = {}
    for ax, (values, rows, column) in zip(_panel_grid(fig, len(panels)), panels, strict=True):
        panel = _context_text(keys, values)
        tags = [" ".join(filter(None, [method_label(r.base, r.modulation, r.cache),
                                       f"W{int(r.w_bits)}A{int(r.a_bits)}" if r.base != "fp" else "", later_label(r)]))
                for _, r in rows.iterrows()]
        for r in rows.itertuples():
            colour = _FP_COLOUR if r.base == "fp" else colours[r.base]
            real = getattr(r, "execution", "fake") not in ("fake", None)
            ax.scatter([getattr(r, column)], [getattr(r, metric)], marker=_style(r.modulation)[1], s=42, zorder=3,
                       facecolors=colour if real or r.base == "fp" else "none", edgecolors=colour, linewidths=1.2)
        points = list(zip(rows[column].astype(float), rows[metric].astype(float), strict=True))
        front = pareto_front([(-x, y) for x, y in points], higher_is_better=higher)  # faster is better
        ax.axvline(1.0, color="0.6", linestyle=":", linewidth=1.0)
        _front_panel(ax, panel, points, tags, front, f"throughput / full precision "
                     f"{'BF16' if column == 'speedup_bf16' else 'FP32'} (column `{column}`, log scale)",
                     _axis_label(metric), series)
    extra = [_front_handle(),
             Line2D([], [], color="0.3", marker="o", markerfacecolor="none", linestyle="",
                    label="hollow: fake quantization"),
             Line2D([], [], color=_FP_COLOUR, marker="o", linestyle="", label="full precision")]
    _legend(fig, [b for b in usable["base"] if b != "fp"], usable["modulation"], colours, *extra)
    title = f"{label} vs. measured throughput"
    fig.suptitle(title, fontsize=11)
    caption = (f"{label} (column `{metric}`; {direction} is better) against sampling throughput relative to the "
               f"full-precision bfloat16 cell of the same run and device (column `speedup_bf16`; `speedup_fp32` "
               f"in a panel without one), log scale; the dotted line is parity. Filled markers run real low-bit "
               f"kernels (int8 / fp8) or are full precision, hollow ones fake-quantize in float. The grey step "
               f"line joins the Pareto front: cells no other cell beats on both speed and quality. Each point is "
               f"one cell's measured images per second (its timed batches' spread is in the wall-clock table); "
               f"for a speed claim about a kernel use 'nox -s bench'. Each point is a single run.")
    return _save(fig, Path(out_dir), _slug(f"quality_vs_throughput_{metric}"), title, caption, series)


def _baseline_for(row: pd.Series, candidates: pd.DataFrame) -> pd.Series | None:
    """The uncached cell a cached one is timed against. Speed-ups only mean something on the same
    machine, so a baseline from the same run (then the same device) is preferred."""
    keys = ["model", "sampler", "steps", "base", "modulation", "w_bits", "a_bits", "a_granularity"]
    match = _matching(candidates, [k for k in keys if k in candidates.columns],
                      tuple(row[k] for k in keys if k in candidates.columns))
    for column in ("run_dir", "device"):
        if column in match.columns and len(match) > 1:
            same = match[match[column] == row[column]]
            match = same if len(same) else match
    return _latest(match) if len(match) else None


def cache_speedup_vs_quality(frame: pd.DataFrame, metric: str, out_dir: Path) -> Figure | None:
    """What a caching scheme buys and costs: throughput gained over the same method without a cache,
    against the quality it ends at."""
    usable = _prepared(frame)
    if metric not in usable.columns or "img_per_s" not in usable.columns:
        return None
    label, direction = _metric_info(metric)
    rate_ok = np.isfinite(usable["img_per_s"].to_numpy(dtype=float)) & (usable["img_per_s"] > 0)
    cached = usable[(usable["cache"] != "none") & rate_ok & np.isfinite(usable[metric].to_numpy(dtype=float))]
    uncached = usable[(usable["cache"] == "none") & rate_ok]
    points: list[tuple] = []  # (panel values, line label, base, modulation, speed-up, value, cache, baseline value)
    keys = _group_keys(usable, ("model", "sampler", "steps"))
    for _, row in cached.iterrows():
        baseline = _baseline_for(row, uncached)
        if baseline is None:
            continue
        speedup = float(row["img_per_s"]) / float(baseline["img_per_s"])
        base_value = float(baseline[metric]) if _finite(baseline[metric]) else None
        line = f"{method_label(row['base'], row['modulation'])} W{int(row['w_bits'])}A{int(row['a_bits'])}"
        points.append((tuple(row[k] for k in keys), line, row["base"], row["modulation"], speedup,
                       float(row[metric]), str(row["cache"]), base_value))
    if not points:
        return None
    panels = sorted({p[0] for p in points}, key=str)
    colours = _colours(p[2] for p in points)
    fig = _new_figure(4.8 * min(len(panels), 3) + 2.4, 4.0 * math.ceil(len(panels) / 3))
    series: dict[str, list[tuple]] = {}
    for ax, panel in zip(_panel_grid(fig, len(panels)), panels, strict=True):
        panel_text = _context_text(keys, panel)
        mine = sorted((p for p in points if p[0] == panel), key=lambda p: (p[1], p[4]))
        for _, line, base, modulation, speedup, value, cache, base_value in mine:
            colour, marker = colours[base], _style(modulation)[1]
            if base_value is not None:
                ax.plot([1.0, speedup], [base_value, value], color=colour, linewidth=0.8, alpha=0.6)
                ax.scatter([1.0], [base_value], marker=marker, facecolors="none", edgecolors=colour, s=36)
            ax.scatter([speedup], [value], marker=marker, color=colour, s=42, zorder=3)
            ax.annotate(cache, (speedup, value), xytext=(4, 4), textcoords="offset points", fontsize=7)
            series.setdefault(line, []).append((speedup, value, cache))
        _log_if_wide(ax, [p[5] for p in mine] + [p[7] for p in mine if p[7] is not None])
        ax.axvline(1.0, color="0.5", linestyle=":", linewidth=1.0)
        ax.set_xlabel("Speed-up over the same method without cache (× img/s)")
        ax.set_ylabel(_axis_label(metric))
        ax.set_title(panel_text, fontsize=9)
        ax.grid(True, alpha=0.25)
    _legend(fig, (p[2] for p in points), (p[3] for p in points), colours,
            Line2D([], [], color="0.3", marker="o", markerfacecolor="none", linestyle="",
                   label="hollow: same method, no cache"))
    title = f"{label} vs. cache speed-up"
    fig.suptitle(title, fontsize=11)
    caption = (f"Each cached cell at its speed-up (its `img_per_s` over that of the same model, sampler, steps, "
               f"method and bit widths without a cache) against its {label} (column `{metric}`; {direction} is "
               f"better), labelled with the cache scheme; hollow markers at 1× are the uncached baselines. "
               f"Timings from different machines are not comparable. Each point is a single run.")
    return _save(fig, Path(out_dir), _slug(f"cache_speedup_vs_quality_{metric}"), title, caption, series)


def step_error(traces: dict[str, dict], out_dir: Path) -> Figure | None:
    """The paper's Fig. 3: where along the trajectory quantization error builds up, and how
    modulation keeps it from growing."""
    if not traces:
        return None
    layers = {str(t.get("layer", "")) for t in traces.values()}
    shared_layer = layers.pop() if len(layers) == 1 else None
    timesteps = [tuple(t.get("timesteps") or ()) for t in traces.values()]
    shared_steps = timesteps[0] if timesteps[0] and all(ts == timesteps[0] for ts in timesteps) else None
    series: dict[str, list[tuple]] = {}
    fig = _new_figure(7.0, 4.2)
    ax = fig.subplots()
    for i, (label, trace) in enumerate(traces.items()):
        errors = list(trace.get("rel_l2") or [])
        steps = list(trace.get("timesteps") or [])
        if steps and len(steps) != len(errors):
            raise ValueError(f"trace {label!r}: {len(steps)} timesteps but {len(errors)} errors")
        points = [(k, steps[k] if steps else None, float(e)) for k, e in enumerate(errors) if _finite(e) and e > 0]
        if not points:
            continue
        name = label if shared_layer is not None else f"{label} ({trace.get('layer', '?')})"
        # NaN breaks the line where a value is missing instead of joining across the gap
        y = [float(e) if _finite(e) and e > 0 else np.nan for e in errors]
        # the same line styles as the bits figures: dotted without modulation, dashed plain, solid MoDiff
        modulation = "ec" if "MoDiff" in label else "plain" if "plain" in label else "off"
        linestyle, marker = _style(modulation)
        ax.plot(range(len(y)), y, marker=marker, markersize=4, linestyle=linestyle, label=name,
                linewidth=2.0 if modulation == "ec" else 1.4, color=_PALETTE[i % len(_PALETTE)])
        series[name] = points
    if not series:
        fig.clear()
        return None
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Sampling step (0 = first, noisiest)")
    ax.set_ylabel("Relative L2 error of the layer output (log)")
    if shared_steps is not None:
        top = ax.twiny()
        top.set_xlim(ax.get_xlim())
        stride = max(1, math.ceil(len(shared_steps) / 10))
        ticks = list(range(0, len(shared_steps), stride))
        top.set_xticks(ticks, [str(shared_steps[k]) for k in ticks], fontsize=7)
        top.set_xlabel("Timestep t", fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, frameon=False)
    title = f"Per-step quantization error: {shared_layer}" if shared_layer else "Per-step quantization error"
    ax.set_title(title, fontsize=10)
    caption = ("Relative L2 error ||y_q - y_fp|| / ||y_fp|| of " + (f"layer `{shared_layer}`" if shared_layer else
               "the named layers") + " at each sampling step (log scale; lower is better), one line per method; "
               "zero or non-finite values are not drawn.")
    return _save(fig, Path(out_dir), "step_error", title, caption, series)


def _load_mosaic(path: Path, max_images: int):
    """The first samples of a cell tiled into one near-square image, or None when the file cannot be
    read; very large images are averaged down so that a grid of many cells stays a sane size."""
    import torch

    try:
        data = torch.load(path, weights_only=True)
        images = data["images"][:max_images].float()
    except Exception:  # a missing or corrupt file is shown as a missing cell, not a crash of the report
        return None
    if images.ndim != 4 or images.shape[0] == 0:
        return None
    images = ((images.clamp(-1, 1) + 1) / 2).nan_to_num(0.0)
    n, c, h, w = images.shape
    if c not in (1, 3):
        images, c = images[:, :1], 1
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = max(1, h // 16)
    canvas = torch.ones(c, rows * (h + pad) - pad, cols * (w + pad) - pad)
    for k in range(n):
        r, q = divmod(k, cols)
        canvas[:, r * (h + pad):r * (h + pad) + h, q * (w + pad):q * (w + pad) + w] = images[k]
    longest = max(canvas.shape[1:])
    if longest > 512:
        size = (max(1, canvas.shape[1] * 512 // longest), max(1, canvas.shape[2] * 512 // longest))
        canvas = torch.nn.functional.interpolate(canvas[None], size=size, mode="area")[0]
    array = canvas.numpy()
    return array[0] if c == 1 else np.transpose(array, (1, 2, 0))


def _resolve_samples(row: pd.Series, run_dir: Path | Mapping[str, Path]) -> Path | None:
    file = row.get("samples_file")
    if _is_missing(file) or not str(file):
        return None
    if isinstance(run_dir, Mapping):
        if "run_dir" in row.index and not _is_missing(row["run_dir"]):
            root = run_dir.get(row["run_dir"])
        elif len(run_dir) == 1:
            root = next(iter(run_dir.values()))
        else:
            root = None
        if root is None:
            return None
    else:
        root = run_dir
    return Path(root) / str(file)


def sample_grids(frame: pd.DataFrame, run_dir: Path | Mapping[str, Path], out_dir: Path,
                 max_images: int = 16) -> list[Figure]:
    """What the numbers mean to the eye: the same seeds for every method and bit width, so the
    collapse at low activation bits and its recovery under modulation are visible side by side.

    ``run_dir`` is a run directory, or a mapping from the frame's ``run_dir`` column to directories
    for a table merged from several runs."""
    out_dir = Path(out_dir)
    everything = _prepared(frame, ok_only=False)
    if "samples_file" not in everything.columns:
        return []
    if "status" not in everything.columns:
        everything["status"] = "ok"
    usable = everything[everything["status"] == "ok"]
    keys = _group_keys(usable)
    fp_keys = [k for k in keys if k != "w_bits"]
    fps = _fp_rows(usable)
    metric = primary_metric(usable)
    figures, used = [], set()
    for values, _ in _groups(usable[usable["base"] != "fp"], keys):
        group = _matching(everything[everything["base"] != "fp"], keys, values)  # failed cells get a label
        fp_match = _matching(fps, fp_keys, tuple(v for k, v in zip(keys, values, strict=True) if k != "w_bits"))
        if len(fp_match):
            group = pd.concat([fp_match, group])
        lines = _lines(group)
        columns = sorted({int(b) for b in group["a_bits"].dropna()}, reverse=True)
        context = _context_text(keys, values)
        fig = _new_figure(1.6 + 1.75 * len(columns), 0.7 + 1.95 * len(lines))
        axes = fig.subplots(len(lines), len(columns), squeeze=False)
        series: dict[str, list[tuple]] = {}
        for r, (key, rows) in enumerate(lines.items()):
            row_label = _line_label(key)
            series[row_label] = []
            for q, bits in enumerate(columns):
                ax = axes[r][q]
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if r == 0:
                    ax.set_title(f"A{_bits_label(bits).replace(chr(10), ' ')}", fontsize=9)
                if q == 0:
                    ax.set_ylabel(row_label, rotation=0, ha="right", va="center", fontsize=9, labelpad=8)
                here = rows[rows["a_bits"] == bits]
                ok = here[here["status"] == "ok"]
                mosaic, state = None, "missing"
                if len(ok):
                    cell = _latest(ok)
                    path = _resolve_samples(cell, run_dir)
                    mosaic = _load_mosaic(path, max_images) if path is not None else None
                    state = "shown" if mosaic is not None else "no samples"
                    if mosaic is not None and metric and _finite(cell.get(metric)):
                        ax.set_xlabel(f"{_metric_info(metric)[0]} {_fmt(float(cell[metric]))}", fontsize=7)
                elif len(here):
                    state = str(_latest(here)["status"])
                if mosaic is not None:
                    ax.imshow(mosaic, cmap="gray" if mosaic.ndim == 2 else None, vmin=0.0, vmax=1.0,
                              interpolation="nearest")
                else:
                    note = "—" if state == "missing" else f"—\n({state})"
                    ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=14 if state == "missing" else 9,
                            color="0.55", transform=ax.transAxes)
                series[row_label].append((bits, state))
        title = f"Samples: {context}"
        fig.suptitle(title + f" (first {max_images} per cell, same seeds)", fontsize=10)
        caption = (f"The first {max_images} samples of every cell for {context} (columns `samples_file`): rows are "
                   f"methods (full precision first), columns activation bits from high to low"
                   + (f", with the cell's {_metric_info(metric)[0]} (column `{metric}`) underneath" if metric else "")
                   + "; — marks a cell that was not run, failed, or has no samples.")
        name = _unique(_slug(f"samples_{_stem(keys, values)}"), used)
        figures.append(_save(fig, out_dir, name, title, caption, series))
    return figures


def all_figures(frame: pd.DataFrame, run_dirs: dict[str, Path], out_dir: Path,
                traces: dict | None = None, everything: pd.DataFrame | None = None) -> list[Figure]:
    """Every figure the table supports, for a report to embed: the bits sweep for each measured
    quality metric, the cost, measured-speed and cache trade-offs for the headline metric, the sample
    grids, and the per-step error when traces were recorded. ``everything`` (default ``frame``) may add
    cells of other executions, dtypes and layouts: they are drawn in the measured-speed figure."""
    out_dir = Path(out_dir)
    usable = _prepared(frame)
    figures: list[Figure] = []
    for metric in QUALITY_METRICS:
        if metric in usable.columns and np.isfinite(usable[metric].to_numpy(dtype=float)).any():
            figures += quality_vs_bits(frame, metric, out_dir)
    metric = primary_metric(frame)
    if metric is not None:
        for make, rows in ((quality_vs_gbops, frame), (quality_vs_throughput, frame if everything is None
                                                                else everything), (cache_speedup_vs_quality, frame)):
            figure = make(rows, metric, out_dir)
            if figure is not None:
                figures.append(figure)
    if run_dirs:
        figures += sample_grids(frame, run_dirs, out_dir)
    if traces:
        figure = step_error(traces, out_dir)
        if figure is not None:
            figures.append(figure)
    return figures
