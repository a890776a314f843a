"""The same matrix run with several seed sets: each setting's metrics as the mean and the range over the runs.

    python -m reports.spread runs/a runs/b runs/c [--out spread.md] [--metrics psnr_to_fp fd_domain]

A setting is a row's method, bit widths and every method parameter that takes more than one value among the
rows of that method and bit widths (e.g. ``weights=minmax``); the runs differ only in ``run.seed``. A difference
between two settings is worth reading when it is larger than their ranges. ``modiff-bench report A B --out C``
shows the same spread in its HTML and Markdown tables and figures (``reports.tables.measured``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from .tables import fmt

DEFAULT_METRICS = ("psnr_to_fp", "fd_domain")


def _frames(directories: list[Path]) -> pd.DataFrame:
    frames = []
    for directory in directories:
        path = directory / "results.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (run the matrix first)")
        frame = pd.read_csv(path)
        frames.append(frame[frame.status == "ok"].assign(run=str(directory)))
    return pd.concat(frames, ignore_index=True)


def _value(value) -> str:
    """A parameter as the matrix wrote it: an integer column read as float (NaN where unset) shows 64, not 64.0."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def setting_labels(frame: pd.DataFrame) -> pd.Series:
    """``method W8A4 [param=value ...]``: the parameters that tell apart rows of one method and bit widths."""
    params = [c for c in frame.columns if c.startswith("p_")]
    labels = []
    for _, row in frame.iterrows():
        same = frame[(frame.method == row.method) & (frame.w_bits == row.w_bits) & (frame.a_bits == row.a_bits)]
        varying = [c for c in params if same[c].astype(str).nunique() > 1]
        extra = [f"{c.split('_', 2)[2]}={_value(row[c])}" for c in varying if pd.notna(row[c])]
        bits = "FP" if (row.w_bits, row.a_bits) == (32, 32) else f"W{row.w_bits}A{row.a_bits}"
        labels.append(" ".join([row.method, bits, *extra]))
    return pd.Series(labels, index=frame.index)


def spread_table(frame: pd.DataFrame, metrics: list[str]) -> str:
    """Markdown: one row per setting, for each metric ``mean [min, max]`` over the runs, and how many runs."""
    frame = frame.assign(setting=setting_labels(frame))
    metrics = [m for m in metrics if m in frame and frame[m].notna().any()]
    lines = ["| setting | runs | " + " | ".join(f"{m} mean [min, max]" for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for setting, group in frame.groupby("setting", sort=False):
        cells = []
        for metric in metrics:
            values = group[metric].dropna()
            cells.append(f"{fmt(values.mean())} [{fmt(values.min())}, {fmt(values.max())}]" if len(values) else "-")
        lines.append(f"| {setting} | {group.run.nunique()} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of the same matrix, other seeds")
    parser.add_argument("--out", type=Path, help="write the Markdown table here (default: print it)")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    args = parser.parse_args(argv)
    try:
        table = spread_table(_frames(args.runs), args.metrics)
    except (FileNotFoundError, pd.errors.ParserError, KeyError) as exc:
        print(f"reports.spread: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
