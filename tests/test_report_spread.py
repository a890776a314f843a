"""The spread over runs of one matrix with other seed sets: a merged report shows it (issue #25, item 15; tables
give ``mean [min, max]``, figures error bars, and a figure of one run says so), and ``python -m reports.spread``
prints each setting's mean and range over the runs."""

import re

import pandas as pd
import pytest

from bench.cli import main
from reports.plots import quality_vs_bits, quality_vs_gbops
from reports.spread import main as spread_main
from reports.tables import all_tables

pytestmark = pytest.mark.usefixtures("one_thread")
SINGLE_RUN = "Single run"  # how a figure's caption says its values rest on one run


def _row(seed, fd, base="lcq", modulation="off", w=8, a=4):
    return {"cell_id": f"{base}-{modulation}-{w}-{a}-s{seed}", "status": "ok", "error": "", "model": "digits",
            "checkpoint": None, "sampler": "ddim-quad", "steps": 25, "eta": 0.0, "n_samples": 512, "seed": seed,
            "batch_size": 256, "method": base if modulation == "off" else f"{base}+{modulation}", "base": base,
            "modulation": modulation, "cache": "none", "w_bits": w, "a_bits": a,
            "a_granularity": "none" if base == "fp" else "channel", "execution": "fake", "dtype": "float32",
            "memory_format": "contiguous", "fd_domain": fd, "psnr_to_fp": 30.0 - fd / 10, "gbops": w * a / 8,
            "img_per_s": 10.0, "wall_s": 1.0, "state_mb": 0.0, "peak_mem_mb": 1.0, "device": "cpu", "params": "{}",
            "missing_metrics": "{}", "git_rev": "abc", "samples_file": None, "trace_file": None,
            "finished_utc": f"2026-01-0{1 + seed // 100_000}T00:00:00"}


def _seed_set(seed, shift):
    return [_row(seed, 5.0 + shift, "fp", w=32, a=32), _row(seed, 10.0 + shift), _row(seed, 20.0 + 2 * shift, a=3),
            _row(seed, 8.0 + shift, modulation="ec"), _row(seed, 12.0 + shift, modulation="ec", a=3)]


def test_merged_seed_sets_show_mean_and_range_in_the_tables():
    merged = pd.DataFrame(_seed_set(0, 0.0) + _seed_set(100_000, 2.0))
    table1 = all_tables(merged)[0]
    header = [f"{g}|{c}" for g, c in table1.columns]
    rows = {r[0]: r for r in table1.rows}
    assert rows["W8A4"][header.index("LCQ alone|FD (domain)")] == "11.00 [10.00, 12.00]"
    assert rows["W8A3"][header.index("LCQ + MoDiff|FD (domain)")] == "13.00 [12.00, 14.00]"
    assert rows["FP (W32A32)"][header.index("LCQ alone|FD (domain)")] == "6.00 [5.00, 7.00]"
    assert any("seed sets" in note and "mean [min, max]" in note for note in table1.notes)
    single = all_tables(pd.DataFrame(_seed_set(0, 0.0)))[0]
    assert {r[0]: r for r in single.rows}["W8A4"][header.index("LCQ alone|FD (domain)")] == "10.00"
    assert not single.notes


def test_merged_seed_sets_draw_error_bars_and_single_runs_say_so(tmp_path):
    merged = pd.DataFrame(_seed_set(0, 0.0) + _seed_set(100_000, 2.0))
    (figure,) = quality_vs_bits(merged, "fd_domain", tmp_path / "merged")  # one figure, not one per seed set
    assert figure.series["LCQ"] == [(4, 11.0), (3, 22.0)]
    assert figure.series["LCQ | range"] == [(4, 10.0, 12.0), (3, 20.0, 24.0)]
    assert figure.series["FP | range"] == [(32, 5.0, 7.0)]
    assert "Mean over the 2 runs" in figure.caption and SINGLE_RUN not in figure.caption
    gbops = quality_vs_gbops(merged, "fd_domain", tmp_path / "merged")
    assert "Mean over the 2 runs" in gbops.caption
    assert len(next(iter(gbops.series.values()))) == 5  # one point per setting, not one per run
    (single,) = quality_vs_bits(pd.DataFrame(_seed_set(0, 0.0)), "fd_domain", tmp_path / "single")
    assert SINGLE_RUN in single.caption and not any("range" in k for k in single.series)
    assert SINGLE_RUN in quality_vs_gbops(pd.DataFrame(_seed_set(0, 0.0)), "fd_domain", tmp_path / "single").caption


def test_the_html_report_of_two_seed_sets_shows_the_spread(tmp_path):
    """``modiff-bench report A B --out C`` (as ``nox -s authors-digits``) on two result tables of one matrix
    with other seeds: the HTML and the Markdown carry the ranges and the note."""
    for name, seed, shift in (("seed-0", 0, 0.0), ("seed-100000", 100_000, 2.0)):
        (tmp_path / name).mkdir()
        pd.DataFrame(_seed_set(seed, shift)).to_parquet(tmp_path / name / "results.parquet")
    assert main(["report", str(tmp_path / "seed-0"), str(tmp_path / "seed-100000"), "--out",
                 str(tmp_path / "both")]) == 0
    html = (tmp_path / "both" / "report.html").read_text()
    md = (tmp_path / "both" / "report.md").read_text()
    for text in (html, md):
        assert "11.00 [10.00, 12.00]" in text and "mean [min, max] over the runs" in text
        assert "Mean over the 2 runs" in text
    assert re.search(r'<p class="caption table-note">[^<]*seed sets', html)


# -- python -m reports.spread ------------------------------------------------------------------
def _results(directory, rows):
    directory.mkdir()
    pd.DataFrame(rows).to_csv(directory / "results.csv", index=False)


def _spread_row(method, a, psnr, **params):
    return {"status": "ok", "method": method, "w_bits": 8, "a_bits": a, "psnr_to_fp": psnr, "fd_domain": 1.0,
            **{f"p_{k}": v for k, v in params.items()}}


def test_spread_groups_settings_over_runs(tmp_path, capsys):
    _results(tmp_path / "a", [_spread_row("qdiff+ec", 4, 20.0, qdiff_residual_scale="minmax"),
                              _spread_row("qdiff+ec", 4, 22.0, qdiff_residual_scale="learned"),
                              _spread_row("lcq", 4, 10.0, qdiff_residual_scale=None)])
    _results(tmp_path / "b", [_spread_row("qdiff+ec", 4, 24.0, qdiff_residual_scale="minmax"),
                              _spread_row("qdiff+ec", 4, 23.0, qdiff_residual_scale="learned"),
                              {**_spread_row("lcq", 4, 99.0), "status": "failed"}])
    assert spread_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    lines = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "22.00 [20.00, 24.00]" in lines["qdiff+ec W8A4 residual_scale=minmax"]
    assert "22.50 [22.00, 23.00]" in lines["qdiff+ec W8A4 residual_scale=learned"]
    assert "| 1 |" in lines["lcq W8A4"] and "10.00 [10.00, 10.00]" in lines["lcq W8A4"]  # the failed row is left out


def test_a_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert spread_main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reports.spread: error:") and len(err.strip().splitlines()) == 1


def test_integer_parameters_read_back_as_floats_show_as_integers():
    """An integer parameter column with NaN in other rows is read as float: labels said act_init_samples=64.0."""
    import pandas as pd

    from reports.spread import setting_labels

    frame = pd.DataFrame({"method": ["qdiff", "qdiff", "fp"], "w_bits": [8, 8, 32], "a_bits": [4, 4, 32],
                          "p_qdiff_act_init_samples": [0.0, 64.0, float("nan")],
                          "p_qdiff_act_init": ["mse", "max", None]})
    labels = list(setting_labels(frame))
    assert labels[:2] == ["qdiff W8A4 act_init_samples=0 act_init=mse", "qdiff W8A4 act_init_samples=64 act_init=max"]
