"""Report figures: drawn from small hand-made result tables, so that every expected point is known."""

import math
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure as MplFigure

from reports.plots import (
    Figure,
    _log_if_wide,
    all_figures,
    cache_speedup_vs_quality,
    pareto_front,
    primary_metric,
    quality_vs_bits,
    quality_vs_gbops,
    sample_grids,
    step_error,
)

NAN = float("nan")


def _row(base, modulation="off", a_bits=8, w_bits=8, status="ok", cache="none", **values):
    row = {"cell_id": f"{base}-{modulation}-{cache}-w{w_bits}a{a_bits}-{status}", "status": status,
           "model": "digits", "sampler": "ddim-quad", "steps": 5, "n_samples": 8, "eta": 0.0, "seed": 0,
           "base": base, "modulation": modulation, "cache": cache, "w_bits": w_bits, "a_bits": a_bits,
           "a_granularity": "none" if base == "fp" else "channel",
           "method": "+".join([base] + ([modulation] if modulation != "off" else []) + ([cache] if cache != "none"
                                                                                         else [])),
           "fid": NAN, "fd_domain": NAN, "psnr_to_fp": NAN, "sfid": NAN, "is_mean": NAN, "is_domain": NAN,
           "gbops": w_bits * a_bits / 64, "img_per_s": 10.0, "samples_file": None}
    row.update(values)
    return row


def _fp(**values):
    return _row("fp", a_bits=32, w_bits=32, **values)


def _check_files(figure: Figure) -> np.ndarray:
    assert figure.png.is_file() and figure.png.stat().st_size > 0
    assert figure.svg.is_file() and figure.svg.stat().st_size > 0
    assert figure.svg.read_text().lstrip().startswith("<?xml")
    assert figure.png.stem == figure.svg.stem == figure.name
    assert figure.title and figure.caption
    image = mpimg.imread(figure.png)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    return image


def test_pareto_front_picks_exactly_the_non_dominated_points():
    # (gbops, FID): 0, 2, 4 trade cost for quality; 1 is beaten by 0 on both; 3 costs as much as 2 and is worse;
    # 5 is a copy of 4 (kept: neither beats the other); 6 has no measurement
    points = [(1.0, 50.0), (1.5, 60.0), (2.0, 20.0), (2.0, 25.0), (8.0, 5.0), (8.0, 5.0), (0.5, NAN)]
    assert pareto_front(points, higher_is_better=False) == [0, 2, 4, 5]
    # PSNR: higher is better
    psnr = [(1.0, 10.0), (2.0, 30.0), (3.0, 25.0), (4.0, 31.0), (1.0, 9.0)]
    assert pareto_front(psnr, higher_is_better=True) == [0, 1, 3]
    assert pareto_front([], higher_is_better=False) == []
    assert pareto_front([(1.0, math.inf)], higher_is_better=True) == []


def test_primary_metric_prefers_fid_and_ignores_failed_and_infinite_values():
    frame = pd.DataFrame([_fp(psnr_to_fp=math.inf, fd_domain=3.0), _row("lcq", fd_domain=4.0, psnr_to_fp=20.0)])
    assert primary_metric(frame) == "fd_domain"
    frame.loc[1, "fid"] = 12.0
    assert primary_metric(frame) == "fid"
    only_failed = pd.DataFrame([_row("lcq", status="failed", fid=1.0), _fp(psnr_to_fp=math.inf)])
    assert primary_metric(only_failed) is None


def test_quality_vs_bits_draws_measured_points_only(tmp_path):
    rows = [_fp(fd_domain=100.0)]
    for a_bits, base_value, ec_value in [(8, 110.0, 105.0), (4, 400.0, 120.0), (3, 2000.0, NAN)]:
        rows += [_row("lcq", a_bits=a_bits, fd_domain=base_value),
                 _row("lcq", "ec", a_bits=a_bits, fd_domain=ec_value),
                 _row("lcq", "plain", a_bits=a_bits, fd_domain=NAN),  # never measured: no line
                 _row("ltq", a_bits=a_bits, status="failed", fd_domain=1.0)]  # failed: left out
    rows.append(_row("lcq", a_bits=4, w_bits=4, fd_domain=900.0))
    figures = quality_vs_bits(pd.DataFrame(rows), "fd_domain", tmp_path)

    assert len(figures) == 2 and len({f.name for f in figures}) == 2
    w4, w8 = sorted(figures, key=lambda f: f.name)
    assert "w8" in w8.name and "W8" in w8.title and "digits" in w8.title and "5 steps" in w8.title
    assert w8.series == {"LCQ": [(8, 110.0), (4, 400.0), (3, 2000.0)], "LCQ + MoDiff": [(8, 105.0), (4, 120.0)],
                         "FP": [(32, 100.0)]}
    assert w4.series == {"LCQ": [(4, 900.0)], "FP": [(32, 100.0)]}
    assert "lower is better" in w8.caption and "`fd_domain`" in w8.caption
    image = _check_files(w8)
    assert image.shape[1] > image.shape[0]  # a wide plot with the legend beside it


def test_quality_vs_bits_skips_groups_and_metrics_without_values(tmp_path):
    frame = pd.DataFrame([_fp(psnr_to_fp=math.inf), _row("lcq", psnr_to_fp=NAN), _row("lcq", "ec", fid=3.0)])
    assert quality_vs_bits(frame, "psnr_to_fp", tmp_path) == []  # FP's infinite PSNR alone is no comparison
    assert quality_vs_bits(frame, "not_a_column", tmp_path) == []
    (figure,) = quality_vs_bits(frame, "fid", tmp_path)
    assert figure.series == {"LCQ + MoDiff": [(8, 3.0)]}  # no FP value measured: no FP line


def test_quality_vs_gbops_front_and_missing_values(tmp_path):
    frame = pd.DataFrame([
        _fp(fid=10.0, gbops=16.0),
        _row("lcq", a_bits=8, fid=11.0, gbops=1.0),
        _row("lcq", a_bits=4, fid=40.0, gbops=0.5),
        _row("lcq", "ec", a_bits=4, fid=12.0, gbops=0.5),
        _row("ltq", a_bits=4, fid=30.0, gbops=0.5),  # dominated by LCQ + MoDiff W8A4
        _row("ltq", a_bits=8, fid=NAN, gbops=1.0),  # unmeasured
        _row("psq", a_bits=2, fid=1.0, gbops=0.1, status="failed"),  # would dominate everything if drawn
    ])
    figure = quality_vs_gbops(frame, "fid", tmp_path)
    _check_files(figure)
    points = next(v for k, v in figure.series.items() if not k.endswith("Pareto front"))
    front = next(v for k, v in figure.series.items() if k.endswith("Pareto front"))
    assert len(points) == 5
    assert front == [(0.5, 12.0, "LCQ + MoDiff W8A4"), (1.0, 11.0, "LCQ W8A8"), (16.0, 10.0, "FP W32A32")]
    assert quality_vs_gbops(frame.assign(gbops=NAN), "fid", tmp_path) is None


def test_cache_speedup_vs_quality(tmp_path):
    plain = pd.DataFrame([_fp(fid=10.0, img_per_s=5.0), _row("lcq", "ec", a_bits=4, fid=12.0, img_per_s=8.0)])
    assert cache_speedup_vs_quality(plain, "fid", tmp_path) is None  # no cached rows yet

    cached = pd.concat([plain, pd.DataFrame([
        _fp(fid=13.0, img_per_s=15.0, cache="deepcache-u3"),
        _row("lcq", "ec", a_bits=4, fid=14.0, img_per_s=20.0, cache="deepcache-u3"),
        _row("lcq", a_bits=4, fid=50.0, img_per_s=30.0, cache="deepcache-u3"),  # no uncached LCQ W8A4: skipped
        _row("lcq", "ec", a_bits=4, fid=99.0, img_per_s=90.0, cache="deepcache-u5", status="failed"),
    ])], ignore_index=True)
    figure = cache_speedup_vs_quality(cached, "fid", tmp_path)
    _check_files(figure)
    assert figure.series == {"FP W32A32": [(3.0, 13.0, "deepcache-u3")],
                             "LCQ + MoDiff W8A4": [(2.5, 14.0, "deepcache-u3")]}
    assert "img_per_s" in figure.caption


def test_step_error(tmp_path):
    assert step_error({}, tmp_path) is None
    assert step_error({"LCQ W8A4": {"layer": "mid", "timesteps": [9, 5], "rel_l2": [NAN, 0.0]}}, tmp_path) is None
    traces = {
        "LCQ W8A4": {"layer": "down.1.conv", "timesteps": [999, 666, 333, 0], "rel_l2": [0.1, 0.3, NAN, 0.9]},
        "LCQ W8A4 + plain mod.": {"layer": "down.1.conv", "timesteps": [999, 666, 333, 0],
                                  "rel_l2": [0.1, 0.08, 0.07, 0.09]},
        "LCQ W8A4 + MoDiff": {"layer": "down.1.conv", "timesteps": [999, 666, 333, 0],
                              "rel_l2": [0.1, 0.02, 0.015, 0.02]},
    }
    figure = step_error(traces, tmp_path)
    _check_files(figure)
    assert set(figure.series) == set(traces)
    assert figure.series["LCQ W8A4"] == [(0, 999, 0.1), (1, 666, 0.3), (3, 0, 0.9)]
    assert "down.1.conv" in figure.title
    with pytest.raises(ValueError, match="timesteps"):
        step_error({"bad": {"layer": "x", "timesteps": [1, 2, 3], "rel_l2": [0.1, 0.2]}}, tmp_path)


def _write_samples(run_dir: Path, name: str, channels: int = 1, n: int = 4, size: int = 8) -> str:
    relative = f"cells/{name}/samples.pt"
    (run_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    images = torch.linspace(-1, 1, n * channels * size * size).reshape(n, channels, size, size).half()
    torch.save({"images": images, "seeds": list(range(n))}, run_dir / relative)
    return relative


def _grid_frame(run_dir: Path) -> pd.DataFrame:
    return pd.DataFrame([
        _fp(fd_domain=100.0, samples_file=_write_samples(run_dir, "fp")),
        _row("lcq", a_bits=8, fd_domain=110.0, samples_file=_write_samples(run_dir, "lcq8")),
        _row("lcq", a_bits=4, fd_domain=400.0, samples_file=_write_samples(run_dir, "lcq4")),
        _row("lcq", "ec", a_bits=4, fd_domain=120.0, samples_file=_write_samples(run_dir, "ec4")),
        _row("lcq", "ec", a_bits=8, fd_domain=105.0, samples_file="cells/gone/samples.pt"),  # file lost
        _row("ltq", a_bits=4, status="failed"),
        _row("lcq", a_bits=4, w_bits=4, fd_domain=900.0, samples_file=_write_samples(run_dir, "w4", channels=3)),
    ])


def test_sample_grids_one_figure_per_group_with_missing_cells_labelled(tmp_path):
    run_dir = tmp_path / "run"
    figures = sample_grids(_grid_frame(run_dir), run_dir, tmp_path / "figures", max_images=3)

    assert len(figures) == 2 and len({f.name for f in figures}) == 2
    w4, w8 = sorted(figures, key=lambda f: f.name)
    assert w8.series == {
        "FP": [(32, "shown"), (8, "missing"), (4, "missing")],
        "LCQ": [(32, "missing"), (8, "shown"), (4, "shown")],
        "LCQ + MoDiff": [(32, "missing"), (8, "no samples"), (4, "shown")],
        "LTQ": [(32, "missing"), (8, "missing"), (4, "failed")],
    }
    assert w4.series == {"FP": [(32, "shown"), (4, "missing")], "LCQ": [(32, "missing"), (4, "shown")]}
    assert "W8" in w8.title and "—" in w8.caption
    tall = _check_files(w8)
    small = _check_files(w4)
    assert tall.shape[0] > small.shape[0]  # four method rows against two


def test_all_figures_from_two_merged_runs(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    frame_a = _grid_frame(first).assign(run_dir="first")
    frame_b = pd.DataFrame([
        _fp(model="other/model v2", fd_domain=7.0, samples_file=_write_samples(second, "fp")),
        _row("lcq", "ec", model="other/model v2", a_bits=4, fd_domain=9.0,
             samples_file=_write_samples(second, "ec4")),
    ]).assign(run_dir="second")
    traces = {"LCQ W8A4": {"layer": "mid", "timesteps": [9, 0], "rel_l2": [0.1, 0.2]}}
    figures = all_figures(pd.concat([frame_a, frame_b], ignore_index=True), {"first": first, "second": second},
                          tmp_path / "out", traces=traces)

    names = [f.name for f in figures]
    assert len(names) == len(set(names))
    assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
               for name in names)
    assert "step_error" in names and "quality_vs_gbops_fd_domain" in names
    assert not any(name.startswith("cache_speedup") for name in names)  # nothing cached
    grids = [f for f in figures if f.name.startswith("samples_")]
    assert len(grids) == 3  # digits W8 and W4, other/model v2 W8
    other = next(f for f in grids if "other" in f.name)
    assert other.series == {"FP": [(32, "shown"), (4, "missing")], "LCQ + MoDiff": [(32, "missing"), (4, "shown")]}
    for figure in figures:
        assert figure.png.is_file() and figure.svg.is_file()
    assert plt.get_fignums() == []  # nothing registered with pyplot, so nothing left open


def test_log_scale_only_beyond_two_decades():
    ax = MplFigure().subplots()
    _log_if_wide(ax, [1.0, 99.0])
    assert ax.get_yscale() == "linear"
    _log_if_wide(ax, [-1.0, 1000.0])  # a log axis cannot show a negative value
    assert ax.get_yscale() == "linear"
    _log_if_wide(ax, [1.0, 101.0])
    assert ax.get_yscale() == "log"
