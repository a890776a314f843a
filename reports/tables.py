"""Paper-style tables from a results table (``bench.runner``'s one row per cell).

Each builder returns a :class:`Table` of formatted strings, or None when the run holds nothing
for it. Values never measured render as an em dash, never as 0 or NaN. Published numbers
(``reports/data/*.csv``, copied from the papers) appear in their own columns labelled
"(paper)", and only where the run's setting matches the paper's.

A report merged from runs of the same matrix with other seeds (``run.seed``) holds each setting once per
seed set: a value is then the mean over the runs with its range, ``mean [min, max]``. A value computed on
fewer images than its metric needs (``bench.metrics`` ``min_images``: FD in 64-d features on 8 images)
carries ``SHORT_MARK`` and its table a note saying so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import numpy as np
import pandas as pd

from bench.cell import LATER_DEFAULTS, SETTING_COLUMNS, later_settings
from bench.metrics import column_info, column_min_images

MISSING = "—"
SHORT_MARK = "†"  # a value computed on fewer images than its metric needs
# what makes two rows the same setting measured twice: everything a cell is, but its seeds
REPLICATE_KEYS = (*(c for c in SETTING_COLUMNS if c != "seed"), "params", "device")


def setting_key(frame: pd.DataFrame) -> pd.Series:
    """One string per row naming its setting without the seeds: rows of one setting from runs with other
    seed sets share it."""
    columns = [c for c in REPLICATE_KEYS if c in frame]
    if not columns:
        return pd.Series([""] * len(frame), index=frame.index, dtype=object)
    return pd.Series(["|".join(map(str, row)) for row in frame[columns].itertuples(index=False)], index=frame.index,
                     dtype=object)


def replicated(frame: pd.DataFrame) -> bool:
    """Whether some setting of ``frame`` was measured under more than one seed set (a merged report)."""
    if frame.empty or "seed" not in frame:
        return False
    return bool((frame.groupby(setting_key(frame)).seed.nunique() > 1).any())


class Measured(float):
    """A table value: the mean over the runs (seed sets) that measured one setting, with their range and
    count, and whether it rests on fewer images than its metric needs. Behaves as the float it is."""

    lo: float
    hi: float
    runs: int
    short: bool

    def __new__(cls, values, short: bool = False):
        values = [float(v) for v in values]
        self = super().__new__(cls, float(np.mean(values)))
        self.lo, self.hi, self.runs, self.short = min(values), max(values), len(values), short
        return self


def measured(rows: pd.DataFrame, metric: str) -> Measured | None:
    """``metric`` of one setting: the setting of the first row that has a value, over every seed set that
    measured it (``Measured``), or None when no row has a value."""
    rows = rows[rows[metric].notna()] if metric in rows else rows.iloc[:0]
    if rows.empty:
        return None
    keys = setting_key(rows)
    same = rows[keys == keys.iloc[0]]
    if "seed" in same:  # one value per seed set (the same cell on two devices is two settings already)
        same = same.drop_duplicates("seed")
    need = column_min_images().get(metric, 1)
    images = pd.to_numeric(same["n_samples"], errors="coerce") if "n_samples" in same else pd.Series(dtype=float)
    return Measured(same[metric].astype(float), short=bool((images < need).any()))


class MetricLabels(Mapping):
    """Metric column -> (label, "higher" | "lower"), for every registered metric column with a
    direction, read from the metric registry (``bench.metrics``) at each use: the labels live beside
    the metrics, and a user metric imported later shows with its own. ``order``: the columns to put
    first (the rest follow in registration order); ``quality_only``: only the quality columns."""

    def __init__(self, order: tuple[str, ...] = (), quality_only: bool = False):
        self.order, self.quality_only = order, quality_only

    def _items(self) -> dict[str, tuple[str, str]]:
        info = {n: c for n, c in column_info().items() if c.better and (c.quality or not self.quality_only)}
        names = [*(n for n in self.order if n in info), *(n for n in info if n not in self.order)]
        return {n: (info[n].label or n, info[n].better) for n in names}

    def __getitem__(self, key: str) -> tuple[str, str]:
        return self._items()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


# the papers' order of the built-in quality columns; other quality columns (user metrics) follow
QUALITY_ORDER = ("fid", "sfid", "is_mean", "kid", "fd_domain", "is_domain", "kid_domain", "psnr_to_fp")
METRIC_LABELS = MetricLabels(QUALITY_ORDER)
QUALITY_LABELS = MetricLabels(QUALITY_ORDER, quality_only=True)
MODULATION_LABELS = {"off": "alone", "plain": "+ plain mod.", "ec": "+ MoDiff"}
# zoo model name -> (dataset, model) in the papers' tables
PAPER_MODELS = {
    "ddpm-cifar10": ("cifar10", "ddpm-cifar10"),
    "ldm-church": ("lsun-church", "ldm-8"),
    "ldm-bedroom": ("lsun-bedroom", "ldm-4"),
}


@dataclass
class Table:
    name: str
    title: str
    caption: str
    columns: list[tuple[str, str]]  # (group, label); group "" for row headers
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def groups(self) -> list[tuple[str, int]]:
        """Consecutive column groups and their spans, for a two-level header."""
        out: list[tuple[str, int]] = []
        for group, _ in self.columns:
            if out and out[-1][0] == group:
                out[-1] = (group, out[-1][1] + 1)
            else:
                out.append((group, 1))
        return out

    def to_markdown(self) -> str:
        header = [f"{g} {c}".strip() for g, c in self.columns]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def fmt(value, digits: int = 2) -> str:
    """A table cell: em dash for missing, fixed decimals for ordinary values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, str):
        return value
    if isinstance(value, Measured):
        text = fmt(float(value), digits)
        if value.runs > 1:
            text += f" [{fmt(value.lo, digits)}, {fmt(value.hi, digits)}]"
        return text + (SHORT_MARK if value.short else "")
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if isinstance(value, int | bool):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.{min(digits, 1)}f}"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def quality_metrics(frame: pd.DataFrame) -> list[str]:
    """The quality columns the run measured, in the papers' order."""
    return [m for m in QUALITY_LABELS if m in frame and frame[m].notna().any()]


def ok_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame.status == "ok"]


def bits_label(w: int, a: int) -> str:
    return f"W{w}A{a}" if (w, a) != (32, 32) else "FP (W32A32)"


def _ordered_bits(frame: pd.DataFrame) -> list[tuple[int, int]]:
    pairs = {(int(w), int(a)) for w, a in zip(frame.w_bits, frame.a_bits, strict=True)}
    return sorted(pairs, key=lambda p: (-(p == (32, 32)), -p[0], -p[1]))


def _bases(frame: pd.DataFrame) -> list[str]:
    return [b for b in dict.fromkeys(frame.base) if b != "fp"]


# --------------------------------------------------------------------------------------------
# published numbers
# --------------------------------------------------------------------------------------------
@cache
def paper_data(name: str) -> pd.DataFrame:
    with resources.files("reports.data").joinpath(name).open() as f:
        return pd.read_csv(f, comment="#")


# our sampler that ran each LSUN table's algorithm (the clipping ddpm-* of the DDIM code base did not run Table 5)
LSUN_SAMPLERS = {"ddim-ldm": "ddim", "ddpm-ldm-uniform": "ddpm"}


# Our base that runs each paper column's setting (the authors' scripts): the paper's "LCQ" rows ran one dynamic scale
# per batch tensor (no --act_tensor), its "LTQ" rows one per sample (--act_tensor), symmetric where --a_sym, split
# where --split, on Q-Diffusion-calibrated weights: paper-lcq / paper-ltq (baselines/modiff_authors_act). The suite's
# own lcq (per channel) and ltq (per batch tensor) ran nothing in the paper and get no "(paper)" column.
PAPER_BASES = {"fp": "fp-act", "qdiff": "qdiff", "paper-lcq": "lcq", "paper-ltq": "ltq"}
# Q-Diffusion + MoDiff: the authors' CIFAR-10 command has --a_sym (their symmetric residual grid, qdiff's
# authors_grid = true); the LSUN ones do not (authors_grid = false)
AUTHORS_GRID = {"cifar10": True, "lsun-church": False, "lsun-bedroom": False}
# Q-Diffusion alone: the activation quantizers of the authors' command per dataset (qdiff's parameters that differ
# from their defaults; reports/data/README.md): CIFAR-10 --a_sym with 'max' ranges from 64 random calibration
# samples, LSUN-Churches MSE ranges from the first 64 rows, LSUN-Bedrooms --a_sym --a_min_max --running_stat
AUTHORS_ACT = {"cifar10": {"act_symmetric": True, "act_init": "max", "act_init_samples": 64},
               "lsun-church": {"act_init_samples": 64, "act_init_pick": "first"},
               "lsun-bedroom": {"act_symmetric": True, "act_init": "max", "running_stat": True}}
ACT_DEFAULTS = {"act_symmetric": False, "act_init": "mse", "act_init_samples": 0, "act_init_pick": "random",
                "running_stat": False}


def paper_setting(model: str, base: str, modulation: str, authors_grid: bool | None = None,
                  act_setting: dict | None = None) -> str | None:
    """The paper's base name of the column this setting reproduces, or None where no paper number came from it
    (qdiff + MoDiff with a residual grid other than the authors' command for that dataset; Q-Diffusion alone
    with activation quantizers other than that command's, when ``act_setting``, the cells' values of
    ``ACT_DEFAULTS``' parameters, is given)."""
    paper_base = PAPER_BASES.get(base)
    if paper_base is None or model not in PAPER_MODELS:
        return None
    dataset = PAPER_MODELS[model][0]
    if base == "qdiff" and modulation != "off" and authors_grid is not None \
            and bool(authors_grid) != AUTHORS_GRID.get(dataset, False):
        return None
    if base == "qdiff" and modulation == "off" and act_setting is not None \
            and act_setting != {**ACT_DEFAULTS, **AUTHORS_ACT.get(dataset, {})}:
        return None
    return paper_base


def paper_table1_value(model: str, sampler: str, steps: int, w: int, a: int, base: str, modulation: str,
                       metric: str, authors_grid: bool | None = None, act_setting: dict | None = None) -> float | None:
    """MoDiff Table 1/2/3/14 number for exactly this setting (``base`` ours: see ``PAPER_BASES``), or None."""
    if model not in PAPER_MODELS or metric not in ("fid", "sfid", "is_mean"):
        return None
    paper_base = paper_setting(model, base, modulation, authors_grid, act_setting)
    if paper_base is None:
        return None
    dataset, paper_model = PAPER_MODELS[model]
    for name in ("paper_cifar10_ddim100.csv", "paper_lsun_ldm.csv"):
        data = paper_data(name)
        if metric not in data:
            continue
        sel = data[(data.dataset == dataset) & (data.model == paper_model) & (data.w_bits == w) & (data.a_bits == a)
                   & (data.base == paper_base) & (data.modulation == modulation)]
        if "steps" in data:
            sel = sel[(sel.steps == steps) & (sel.sampler == sampler)]
        else:  # the LSUN tables name the algorithm: latent-diffusion's DDIM and its unclipped DDPM
            sel = sel[sel.sampler == LSUN_SAMPLERS.get(sampler, "")]
        values = sel[metric].dropna()
        if len(values):
            return float(values.iloc[0])
    return None


T4_VARIANTS = {"off": "lcq", "plain": "modulated-no-ec", "ec": "modulated-ec"}  # paper Table 4, LCQ only


def paper_ablation_value(model: str, sampler: str, steps: int, w: int, a: int, base: str, modulation: str,
                         metric: str) -> float | None:
    """MoDiff Table 4 (CIFAR-10, DDIM quad 100 steps, the authors' "LCQ": our ``paper-lcq``) number for exactly
    this setting, or None."""
    if (PAPER_MODELS.get(model, ("",))[0] != "cifar10" or (sampler, steps) != ("ddim-quad", 100) or base != "paper-lcq"
            or metric != "fid"):
        return None
    data = paper_data("paper_ablations.csv")
    sel = data[(data.table == "t4") & (data.w_bits == w) & (data.a_bits == a)
               & (data.variant == T4_VARIANTS[modulation]) & (data.metric == metric)]
    return float(sel.value.iloc[0]) if len(sel) else None


def paper_deepcache_row(model: str, sampler: str, steps: int, cache: str, base: str) -> pd.Series | None:
    """DeepCache Table 2 (CIFAR-10 DDPM, DDIM quad 100 steps, uniform 1:N) row for ``deepcache-u<N>``."""
    if (PAPER_MODELS.get(model, ("",))[0] != "cifar10" or (sampler, steps) != ("ddim-quad", 100) or base != "fp"
            or not cache.startswith("deepcache-u")):
        return None
    try:
        interval = int(cache.removeprefix("deepcache-u"))
    except ValueError:
        return None
    data = paper_data("deepcache_cifar10.csv")
    sel = data[data.interval_n == interval]
    return sel.iloc[0] if len(sel) else None


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def _setting_groups(frame: pd.DataFrame):
    keys = ["model", "sampler", "steps"]
    for values, group in frame.groupby(keys, sort=False):
        yield dict(zip(keys, values, strict=True)), group


def _value(group: pd.DataFrame, metric: str, **match) -> Measured | None:
    """``metric`` of the rows of ``group`` matching ``match``: one setting over its seed sets (``measured``)."""
    sel = group
    for key, value in match.items():
        sel = sel[sel[key] == value]
    return measured(sel, metric)


def later_label(row: pd.Series) -> str:
    """The settings beyond the paper's where a row has them (``int8``, ``bfloat16 channels_last``,
    ``compiled``; empty for a fake-quantized float32 contiguous cell): part of Table 1's column labels."""
    present = {k: row.get(k) for k in LATER_DEFAULTS if pd.notna(row.get(k))}  # (the compile flag: a p_ column)
    return " ".join(later_settings(present) + (["compiled"] if param_value(row, "compile") is True else []))


def table1(frame: pd.DataFrame) -> list[Table]:
    """Paper Table 1: rows = W/A bits with GBops; column groups = base x {alone, + MoDiff}, and x what
    the cells run on where that is not the paper's fake-quantized float32 (``LTQ + MoDiff int8``: the
    FP row under such a group is the full-precision cell of the same dtype and layout, if any). A
    "(paper)" column only stands beside the paper's own setting."""
    frame = with_later_defaults(ok_rows(frame))
    frame = frame[frame.cache == "none"].copy()
    frame["later"] = [later_label(row) for _, row in frame.iterrows()]
    metrics = quality_metrics(frame)
    tables = []
    for setting, group in _setting_groups(frame):
        bases = _bases(group)
        if not bases or not metrics:
            continue
        quantized = group[group.base != "fp"]
        groups = [(base, mod, later) for later in sorted(dict.fromkeys(quantized.later), key=lambda x: (x != "", x))
                  for base in bases for mod in ("off", "ec")
                  if ((quantized.base == base) & (quantized.modulation == mod) & (quantized.later == later)).any()
                  or (mod == "off" and ((quantized.base == base) & (quantized.later == later)).any())]
        columns = [("", "W/A"), ("", "GBops")]
        paper_cols: set[tuple[str, str, str]] = set()
        grids = {(base, mod): _authors_grid(quantized[(quantized.base == base) & (quantized.modulation == mod)])
                 for base, mod, _ in groups}
        acts = {(base, mod): _act_setting(quantized[(quantized.base == base) & (quantized.modulation == mod)])
                for base, mod, _ in groups}
        for base, mod, later in groups:
            head = f"{base.upper()} {MODULATION_LABELS[mod]}" + (f" {later}" if later else "")
            for metric in metrics:
                columns.append((head, METRIC_LABELS[metric][0]))
                if not later and any(paper_table1_value(setting["model"], setting["sampler"], setting["steps"], w, a,
                                                        base, mod, metric, grids[base, mod], acts[base, mod])
                                            is not None
                                     for w, a in _ordered_bits(group)):
                    paper_cols.add((base, mod, metric))
                    columns.append((head, f"{METRIC_LABELS[metric][0]} (paper)"))
        rows = []
        for w, a in _ordered_bits(group):
            cells = group[(group.w_bits == w) & (group.a_bits == a)]
            row = [bits_label(w, a), fmt(cells.gbops.dropna().iloc[0] if cells.gbops.notna().any() else None)]
            for base, mod, later in groups:
                for metric in metrics:
                    if (w, a) == (32, 32):
                        value = _value(cells, metric, base="fp", later=later) if mod == "off" else None
                    else:
                        value = _value(cells, metric, base=base, modulation=mod, later=later)
                    row.append(fmt(value))
                    if not later and (base, mod, metric) in paper_cols:
                        row.append(fmt(paper_table1_value(setting["model"], setting["sampler"],
                                                          setting["steps"], w, a, base, mod, metric,
                                                          grids[base, mod], acts[base, mod])))
            rows.append(row)
        arrows = ", ".join(f"{METRIC_LABELS[m][0]} {'↓' if METRIC_LABELS[m][1] == 'lower' else '↑'}" for m in metrics)
        extra = (" Groups named int8 / fp8 run real low-bit kernels, bfloat16 / float16 / channels_last / compiled "
                 "name the float precision, layout or compilation of what is not quantized; their FP row is the "
                 "full-precision cell run the same way." if (quantized.later != "").any() else "")
        tables.append(Table(
            name=f"table1-{setting['model']}-{setting['sampler']}-{setting['steps']}",
            title=f"Quantization results: {setting['model']}, {setting['sampler']} {setting['steps']} steps",
            caption=f"Paper Table 1 layout. GBops per image per step, paper convention. {arrows}. "
                    "The FP row is the unquantized model, shown under each base's 'alone' columns." + extra,
            columns=columns, rows=rows))
    return tables


def _authors_grid(cells: pd.DataFrame) -> bool | None:
    """Whether a group's Q-Diffusion cells put residuals on the authors' grid (``authors_grid``; False when
    unset: the parameter's default), None for other bases."""
    if cells.empty or cells.base.iloc[0] != "qdiff":
        return None
    return any(param_value(row, "authors_grid") is True for _, row in cells.iterrows())


def _act_setting(cells: pd.DataFrame) -> dict | None:
    """The activation-quantizer parameters (``ACT_DEFAULTS``' keys) of a group's Q-Diffusion cells, their
    defaults where unset (the first cell's: one group is one setting), None for other bases."""
    if cells.empty or cells.base.iloc[0] != "qdiff":
        return None
    row = cells.iloc[0]
    out = {}
    for key, default in ACT_DEFAULTS.items():
        value = param_value(row, key)
        if value is None:
            value = default
        elif type(default) is int:  # read back from results.csv as a float where other rows lack it: 64.0
            value = int(value)
        out[key] = value
    return out


def ablation_ec(frame: pd.DataFrame) -> list[Table]:
    """Paper Table 4: PTQ vs modulation without / with error compensation."""
    frame = ok_rows(frame)
    frame = frame[(frame.cache == "none") & (frame.base != "fp")]
    metrics = quality_metrics(frame)
    if frame.empty or not metrics or frame.modulation.nunique() < 2:
        return []
    metric = metrics[0]
    tables = []
    for setting, group in _setting_groups(frame):
        mods = [m for m in ("off", "plain", "ec") if (group.modulation == m).any()]
        paper = {(b, w, a, m): paper_ablation_value(setting["model"], setting["sampler"], setting["steps"], w, a, b,
                                                    m, metric)
                 for b in _bases(group) for w, a in _ordered_bits(group) for m in mods}
        with_paper = any(v is not None for v in paper.values())
        columns = [("", "base"), ("", "W/A")]
        for m in mods:
            columns.append((METRIC_LABELS[metric][0], MODULATION_LABELS[m]))
            if with_paper:
                columns.append((METRIC_LABELS[metric][0], f"{MODULATION_LABELS[m]} (paper)"))
        rows = []
        for base in _bases(group):
            for w, a in _ordered_bits(group[group.base == base]):
                row = [base.upper(), bits_label(w, a)]
                for m in mods:
                    row.append(fmt(_value(group, metric, base=base, modulation=m, w_bits=w, a_bits=a)))
                    if with_paper:
                        row.append(fmt(paper[base, w, a, m]))
                rows.append(row)
        tables.append(Table(
            name=f"ablation-ec-{setting['model']}-{setting['steps']}",
            title=f"Error compensation ablation: {setting['model']}, {setting['sampler']} {setting['steps']} steps",
            caption=f"Paper Table 4 layout: {METRIC_LABELS[metric][0]} "
                    f"({METRIC_LABELS[metric][1]} is better) of plain PTQ, modulation against the true previous "
                    "input (no compensation) and MoDiff (error-compensated).",
            columns=columns, rows=rows))
    return tables


def param_value(row: pd.Series, key: str):
    """A method parameter of a row, from its flat ``p_<method>_<key>`` column (the first set)."""
    for column, value in row.items():
        if isinstance(column, str) and column.startswith("p_") and column.endswith(f"_{key}") \
                and not (pd.api.types.is_scalar(value) and pd.isna(value)):  # None, NaN, pd.NA: not set
            return bool(value) if isinstance(value, (bool, np.bool_)) else value
    return None


def warmup_table(frame: pd.DataFrame) -> list[Table]:
    """Paper Table 18: the same cells with and without the full-precision warm-up step."""
    frame = ok_rows(frame)
    frame = frame[frame.base != "fp"].copy()
    if frame.empty:
        return []
    frame["warmup"] = [param_value(row, "warmup") for _, row in frame.iterrows()]
    if not ((frame.warmup == False).any() and (frame.warmup == True).any()):  # noqa: E712 (object column)
        return []
    metrics = quality_metrics(frame)
    if not metrics:
        return []
    metric = metrics[0]
    rows = []
    for (base, mod, w, a), group in frame.groupby(["base", "modulation", "w_bits", "a_bits"], sort=False):
        rows.append([base.upper(), MODULATION_LABELS[mod], bits_label(int(w), int(a)),
                     fmt(_value(group, metric, warmup=True)), fmt(_value(group, metric, warmup=False))])
    return [Table("warmup", "Warm-up ablation", f"Paper Table 18 layout: {METRIC_LABELS[metric][0]} with the first "
                  "step in full precision (warm-up on) or quantized (off).",
                  [("", "base"), ("", "variant"), ("", "W/A"), (METRIC_LABELS[metric][0], "warm-up on"),
                   (METRIC_LABELS[metric][0], "warm-up off")], rows)]


def memory_table(frame: pd.DataFrame) -> list[Table]:
    """Paper Table 6: MoDiff's state memory and compute per batch, one row per method and batch size.

    Fake quantization keeps float32 tensors, so memory does not depend on the bit width: each row
    shows the method at its widest quantized setting (W8A8 in the paper's table) and FP."""
    frame = ok_rows(frame)
    frame = frame[frame.cache == "none"]
    if frame.empty:
        return []
    rows = []
    for (method, bs), group in frame.groupby(["method", "batch_size"], sort=False):
        cell = group.sort_values(["w_bits", "a_bits"], ascending=False).iloc[0]
        gbops_batch = cell.gbops * bs if pd.notna(cell.gbops) else None
        rows.append([method, bits_label(int(cell.w_bits), int(cell.a_bits)), str(int(bs)), fmt(cell.state_mb, 1),
                     fmt(cell.peak_mem_mb, 0), fmt(gbops_batch, 1), str(cell.device)])
    return [Table("memory", "Memory and compute per batch",
                  "Paper Table 6 layout, one row per method and batch size at its widest bit setting (memory does "
                  "not depend on the bit width in fake quantization). State: MoDiff's kept reconstructions and "
                  "outputs at the end of a batch. Peak: CUDA max allocated on a GPU, else the process's peak RSS "
                  "during sampling (includes the libraries). GBops per denoising step for the whole batch, paper "
                  "convention.",
                  [("", "method"), ("", "W/A"), ("", "batch"), ("", "state MB"), ("", "peak MB"),
                   ("", "GBops / step"), ("", "device")], rows)]


def cache_table(frame: pd.DataFrame) -> list[Table]:
    """DeepCache Table 2 layout: cache interval vs MACs, speed-up and quality."""
    frame = ok_rows(frame)
    cached = frame[frame.cache != "none"]
    if cached.empty:
        return []
    metrics = quality_metrics(frame)
    metric = metrics[0] if metrics else None
    keys = ["model", "sampler", "steps", "base", "modulation", "w_bits", "a_bits", "device"]
    rows, papers = [], []
    for _, cell in cached.iterrows():
        base = frame[(frame.cache == "none")]
        for key in keys:
            base = base[base[key] == cell[key]]
        speedup = cell.img_per_s / base.img_per_s.iloc[0] if len(base) and base.img_per_s.iloc[0] else None
        macs = f"{cell.macs_g:.3g}" if pd.notna(cell.macs_g) else MISSING
        rows.append([cell.method, bits_label(int(cell.w_bits), int(cell.a_bits)), macs,
                     fmt(speedup), fmt(cell[metric]) if metric else MISSING])
        papers.append(paper_deepcache_row(cell.model, cell.sampler, cell.steps, cell.cache, cell.base))
    label = METRIC_LABELS[metric][0] if metric else "quality"
    columns = [("", "method"), ("", "W/A"), ("", "MACs (G)"), ("", "speed-up"), ("", label)]
    if any(p is not None for p in papers):
        columns += [("DeepCache (paper)", "MACs (G)"), ("DeepCache (paper)", "speed-up (paper)"),
                    ("DeepCache (paper)", "FID (paper)")]
        rows = [row + ([fmt(p.macs_g), fmt(p.speedup), fmt(p.fid)] if p is not None else [MISSING] * 3)
                for row, p in zip(rows, papers, strict=True)]
    return [Table("caching", "Caching: speed-up and quality",
                  "DeepCache Table 2 layout: MACs per image per step, speed-up against the same method without "
                  "caching on the same device, and quality.", columns, rows)]


def model_family(model: str) -> str | None:
    """``"unet"`` or ``"transformer"`` for a registered zoo model (``ZooEntry.family``), None for any other name
    (a ``diffusers:`` path is not looked at: a report reads its results, never the models)."""
    from bench.zoo import model_entry, model_names

    return model_entry(model).family if model in model_names() else None


# metrics the DiT quantization papers report, in their order, then the suite's other quality columns
TRANSFORMER_ORDER = ("fid", "sfid", "is_mean", "precision")


def _arrow_label(column, name: str) -> str:
    """A metric's label with the arrow of its better direction (``column``: its ``bench.metrics`` column info)."""
    label = (column.label or name) if column else name
    better = column.better if column else None
    return label + (" ↓" if better == "lower" else " ↑" if better == "higher" else "")


def transformer_table(frame: pd.DataFrame) -> list[Table]:
    """The DiT quantization papers' layout (PTQ4DiT, Q-DiT, ViDiT-Q: one row per bit width and method, the metrics
    side by side, timesteps as the outer grouping) for the transformer models of ``frame``: rows = W/A (full
    precision first), then each method and what it runs on; columns = GBops, the quality metrics (FID, sFID, IS,
    precision first where measured), images/s and its ratios to the float32 and bfloat16 full-precision cells."""
    frame = with_later_defaults(ok_rows(frame))
    frame = frame[[model_family(str(m)) == "transformer" for m in frame.model]] if not frame.empty else frame
    if frame.empty:
        return []
    frame = frame.copy()
    frame["runs_on"] = [execution_label(row) for _, row in frame.iterrows()]
    info = column_info()
    metrics = [m for m in (*TRANSFORMER_ORDER, *QUALITY_LABELS) if m in frame and frame[m].notna().any()]
    metrics = list(dict.fromkeys(metrics))
    tables = []
    for setting, group in _setting_groups(frame):
        rows = []
        for w, a in _ordered_bits(group):
            bits = group[(group.w_bits == w) & (group.a_bits == a)]
            for (method, runs_on), cells in bits.groupby(["method", "runs_on"], sort=False):
                row = [bits_label(w, a), method, runs_on,
                       fmt(cells.gbops.dropna().iloc[0] if cells.gbops.notna().any() else None)]
                row += [fmt(measured(cells, metric)) for metric in metrics]
                row += [fmt(cells.img_per_s.mean(), 1) if "img_per_s" in cells else MISSING,
                        fmt(cells.speedup_fp32.mean()) if "speedup_fp32" in cells else MISSING,
                        fmt(cells.speedup_bf16.mean()) if "speedup_bf16" in cells else MISSING]
                rows.append(row)
        if not rows:
            continue
        columns = [("", "W/A"), ("", "method"), ("", "runs on"), ("", "GBops"),
                   *(("", _arrow_label(info.get(m), m)) for m in metrics), ("", "images/s"), ("", "x FP32"),
                   ("", "x BF16")]
        tables.append(Table(
            name=f"transformer-{setting['model']}-{setting['sampler']}-{setting['steps']}",
            title=f"Transformer results: {setting['model']}, {setting['sampler']} {setting['steps']} steps",
            caption="Layout of the DiT quantization papers (one row per bit width and method, metrics side by side). "
                    "GBops per image per step, paper convention; the method names its base, modulation and cache "
                    "(e.g. ltq+ec+fbcache-0.1); images/s and its ratios to the float32 and bfloat16 full-precision "
                    "cells of the same run and device (see the wall-clock table for their spread).",
            columns=columns, rows=rows))
    return tables


def with_later_defaults(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the settings added later (``bench.cell.LATER_DEFAULTS``: execution, dtype,
    memory format) filled in at their defaults where a table written before them lacks them."""
    frame = frame.copy()
    for column, default in LATER_DEFAULTS.items():
        frame[column] = frame[column].fillna(default) if column in frame else default
    return frame


def execution_label(row: pd.Series) -> str:
    """What a cell runs on beyond its method: ``fake float32``, ``int8 bfloat16 channels_last``,
    ``fake float32 compiled``."""
    compiled = param_value(row, "compile") is True
    return f"{row['execution']} {row['dtype']}" + (f" {row['memory_format']}" if row["memory_format"] != "contiguous"
                                                   else "") + (" compiled" if compiled else "")


def _ratio(cells: pd.DataFrame, column: str, base: pd.DataFrame) -> float | None:
    """Mean throughput ratio of ``cells`` to the fastest of ``base`` (``column`` when the table has it)."""
    if column in cells and cells[column].notna().any():
        return float(cells[column].mean())
    if base.empty:
        return None
    return float((cells.img_per_s / float(base.img_per_s.max())).mean())


def _spread(cells: pd.DataFrame) -> str:
    """The slowest to the fastest timed batch of ``cells`` (``img_per_s_lo`` / ``_hi``; tables written
    before them: the cells' own rates), with how many batches were timed."""
    lo = cells["img_per_s_lo"] if "img_per_s_lo" in cells else cells.img_per_s
    hi = cells["img_per_s_hi"] if "img_per_s_hi" in cells else cells.img_per_s
    lo, hi = lo.fillna(cells.img_per_s), hi.fillna(cells.img_per_s)
    timed = cells["timed_batches"].fillna(1) if "timed_batches" in cells else pd.Series(1, index=cells.index)
    return f"{fmt(lo.min(), 1)}–{fmt(hi.max(), 1)} ({int(timed.sum())})"


def wallclock_table(frame: pd.DataFrame) -> list[Table]:
    """Images per second and the ratios to the FP32 and BF16 full-precision cells measured in the same
    run and device, one row per method and execution (mean over its bit settings, with the spread of
    every timed batch)."""
    frame = with_later_defaults(ok_rows(frame))
    if frame.empty:
        return []
    frame["runs_on"] = [execution_label(row) for _, row in frame.iterrows()]
    rows = []
    for (device, model, sampler, steps), group in frame.groupby(["device", "model", "sampler", "steps"], sort=False):
        fp = group[(group.base == "fp") & (group.cache == "none")]
        fp32, bf16 = fp[fp.dtype == "float32"], fp[fp.dtype == "bfloat16"]
        for (method, runs_on), cells in group.groupby(["method", "runs_on"], sort=False):
            rows.append([str(device), f"{model} {sampler} {steps}", method, runs_on,
                         str(len(cells)), fmt(cells.img_per_s.mean(), 1), _spread(cells),
                         fmt(_ratio(cells, "speedup_fp32", fp32)),
                         fmt(_ratio(cells, "speedup_bf16", bf16)) if not bf16.empty else MISSING])
    return [Table("wallclock", "Wall-clock",
                  "Sampling throughput (warm-up excluded; CUDA synchronised on a GPU), averaged over each method's "
                  "bit settings, and its ratio to the float32 and the bfloat16 full-precision cells on the same "
                  "device in the same run (the faster memory format, or the compiled cell, where several were run; "
                  "empty without a bfloat16 cell). Spread: the slowest to the fastest timed batch of those cells "
                  "(every batch once, the first run.timing_repeats times), with the number of timed batches. Fake "
                  "quantization computes in float, so its ratio below 1 is the simulation's overhead; int8 / fp8 "
                  "rows run real low-bit kernels. Cells run in turn, so load on a shared machine moves single "
                  "ratios by 10-20%; 'nox -s bench' interleaves repeated timings of one layer stack for a tighter "
                  "figure.",
                  [("", "device"), ("", "setting"), ("", "method"), ("", "runs on"), ("", "cells"),
                   ("", "images/s"), ("", "spread (batches)"), ("", "x FP32"), ("", "x BF16")], rows)]


def all_tables(frame: pd.DataFrame, everything: pd.DataFrame | None = None) -> list[Table]:
    """The paper-style tables of ``frame``; Table 1 and the wall-clock table of ``everything`` (default:
    ``frame``), which may hold cells of other executions and dtypes."""
    out: list[Table] = []
    everything = frame if everything is None else everything
    out.extend(table1(everything))
    out.extend(transformer_table(everything))
    for builder in (ablation_ec, warmup_table, memory_table, cache_table):
        out.extend(builder(frame))
    out.extend(wallclock_table(everything))
    spread, short = spread_note(everything), short_note(everything)
    for table in out:
        cells = [cell for row in table.rows for cell in row]
        if spread and any(_SPREAD.search(cell) for cell in cells):
            table.notes.append(spread)
        if short and any(cell.endswith(SHORT_MARK) for cell in cells):
            table.notes.append(short)
    return out


_SPREAD = re.compile(r"^\S+ \[\S+, \S+\]")


def spread_note(frame: pd.DataFrame) -> str | None:
    """What ``mean [min, max]`` means, when ``frame`` holds settings measured under several seed sets."""
    if not replicated(frame):
        return None
    seeds = ", ".join(str(int(s)) for s in sorted(set(frame.seed.dropna())))
    return (f"Settings measured by several runs of the same matrix with other seed sets (run.seed {seeds}): "
            "mean [min, max] over the runs that measured each; a value without a range was measured once.")


def short_note(frame: pd.DataFrame) -> str | None:
    """Which metrics were computed on fewer images than they need (``SHORT_MARK``), and on how many."""
    if "n_samples" not in frame:
        return None
    need, info = column_min_images(), column_info()
    parts = []
    for column, minimum in need.items():
        if minimum <= 1 or column not in frame or not (info.get(column) and info[column].better):
            continue
        rows = frame[frame[column].notna() & (pd.to_numeric(frame.n_samples, errors="coerce") < minimum)]
        if len(rows):
            counts = ", ".join(str(int(n)) for n in sorted(set(rows.n_samples)))
            parts.append(f"{info[column].label or column} on {counts} images (needs at least {minimum})")
    if not parts:
        return None
    return (f"{SHORT_MARK}: computed on fewer images than the metric needs, so the value says little: "
            + "; ".join(parts) + " (docs/metrics.md, 'Built-in metrics').")
