"""Report tables on small synthetic results tables, and merging runs."""

import json

import pandas as pd
import pytest

from bench.errors import BenchError
from reports.render import Run, merge
from reports.tables import MISSING, ablation_ec, cache_table, fmt, paper_table1_value, table1, wallclock_table


def _row(base, modulation, w, a, model="digits", **extra):
    row = {"cell_id": f"{model}-{base}-{modulation}-{w}-{a}", "status": "ok", "error": "", "model": model,
           "checkpoint": None, "sampler": "ddim-quad", "steps": 100, "eta": 0.0, "n_samples": 50000, "seed": 0,
           "batch_size": 64, "base": base, "modulation": modulation, "cache": "none", "w_bits": w, "a_bits": a,
           "a_granularity": "channel", "fd_domain": float(w + a), "fid": float("nan"), "sfid": float("nan"),
           "is_mean": float("nan"), "gbops": 6.05 * w * a, "macs_g": 6.05, "img_per_s": 100.0 / (1 + (a < 32)),
           "wall_s": 1.0, "state_mb": 0.0, "peak_mem_mb": 10.0, "device": "cpu", "params": "{}",
           "missing_metrics": "{}", "git_rev": "abc"}
    row["method"] = base + ("" if modulation == "off" else f"+{modulation}")
    row.update(extra)
    return row


def _frame(rows):
    return pd.DataFrame(rows)


def test_table1_layout_rows_columns_and_missing_cells():
    frame = _frame([_row("fp", "off", 32, 32), _row("lcq", "off", 8, 8), _row("lcq", "ec", 8, 8),
                    _row("lcq", "off", 8, 4), _row("ltq", "off", 8, 4),
                    _row("ltq", "ec", 8, 4, fd_domain=float("nan"))])
    (table,) = table1(frame)
    labels = [f"{g}|{c}" for g, c in table.columns]
    assert labels == ["|W/A", "|GBops", "LCQ alone|FD (domain)", "LCQ + MoDiff|FD (domain)",
                      "LTQ alone|FD (domain)", "LTQ + MoDiff|FD (domain)"]
    rows = {r[0]: r for r in table.rows}
    assert list(rows) == ["FP (W32A32)", "W8A8", "W8A4"]
    assert rows["FP (W32A32)"][2] == "64.00" and rows["FP (W32A32)"][3] == MISSING
    assert rows["W8A8"][2:4] == ["16.00", "16.00"] and rows["W8A8"][4:] == [MISSING, MISSING]  # ltq not run at A8
    assert rows["W8A4"][5] == MISSING  # measured as NaN: a dash, never 'nan' or 0
    assert rows["W8A4"][1] == fmt(6.05 * 32)
    assert not any("paper" in c for _, c in table.columns)  # digits matches no paper setting
    assert all("nan" not in cell.lower() for row in table.rows for cell in row)


def test_paper_columns_appear_only_for_matching_settings():
    assert paper_table1_value("ddpm-cifar10", "ddim-quad", 100, 8, 4, "paper-lcq", "ec", "fid") is not None
    assert paper_table1_value("ddpm-cifar10", "ddim-quad", 50, 8, 4, "paper-lcq", "ec", "fid") is None  # steps differ
    assert paper_table1_value("ddpm-cifar10", "ddim-uniform", 100, 8, 4, "paper-lcq", "ec", "fid") is None
    assert paper_table1_value("digits", "ddim-quad", 100, 8, 4, "paper-lcq", "ec", "fid") is None
    # the suite's own lcq / ltq are not the authors' "LCQ" / "LTQ" (issue 17): no paper number beside them
    assert paper_table1_value("ddpm-cifar10", "ddim-quad", 100, 8, 4, "lcq", "ec", "fid") is None
    assert paper_table1_value("ddpm-cifar10", "ddim-quad", 100, 8, 4, "ltq", "ec", "fid") is None
    assert paper_table1_value("ddpm-cifar10", "ddim-quad", 100, 8, 4, "paper-ltq", "ec", "fid") is not None
    # Q-Diffusion + MoDiff: CIFAR-10's number came with the authors' --a_sym residual grid, LSUN's without
    assert paper_table1_value("ddpm-cifar10", "ddim-quad", 100, 8, 4, "qdiff", "ec", "fid", True) is not None
    assert paper_table1_value("ddpm-cifar10", "ddim-quad", 100, 8, 4, "qdiff", "ec", "fid", False) is None
    assert paper_table1_value("ddpm-cifar10", "ddim-quad", 100, 8, 4, "qdiff", "off", "fid", False) is not None
    assert paper_table1_value("ldm-church", "ddim-ldm", 400, 8, 4, "qdiff", "ec", "fid", False) is not None
    assert paper_table1_value("ldm-church", "ddim-ldm", 400, 8, 4, "qdiff", "ec", "fid", True) is None
    rows = [_row("fp", "off", 32, 32, model="ddpm-cifar10", fid=4.3),
            _row("paper-lcq", "off", 8, 4, model="ddpm-cifar10", fid=30.0),
            _row("paper-lcq", "ec", 8, 4, model="ddpm-cifar10", fid=5.0),
            _row("lcq", "ec", 8, 4, model="ddpm-cifar10", fid=6.0, cell_id="own"),
            _row("qdiff", "ec", 8, 4, model="ddpm-cifar10", fid=7.0, cell_id="q")]
    (table,) = table1(_frame(rows))
    header = [f"{g}|{c}" for g, c in table.columns]
    assert "PAPER-LCQ + MoDiff|FID (paper)" in header and "PAPER-LCQ alone|FID (paper)" in header
    assert "LCQ + MoDiff|FID" in header and "LCQ + MoDiff|FID (paper)" not in header
    assert "QDIFF + MoDiff|FID (paper)" not in header  # default residual grid: not the authors' CIFAR-10 setting
    row = {r[0]: r for r in table.rows}["W8A4"]
    paper = fmt(paper_table1_value("ddpm-cifar10", "ddim-quad", 100, 8, 4, "paper-lcq", "ec", "fid"))
    assert row[header.index("PAPER-LCQ + MoDiff|FID (paper)")] == paper
    assert row[header.index("PAPER-LCQ + MoDiff|FID")] == "5.00"
    authors = [*rows[:-1], _row("qdiff", "ec", 8, 4, model="ddpm-cifar10", fid=7.0, cell_id="q",
                                p_qdiff_authors_grid=True)]  # results.csv's flat parameter column
    (table,) = table1(_frame(authors))
    assert "QDIFF + MoDiff|FID (paper)" in [f"{g}|{c}" for g, c in table.columns]


def test_ablation_and_wallclock_tables():
    frame = _frame([_row("fp", "off", 32, 32), *[_row("lcq", m, 8, 3) for m in ("off", "plain", "ec")]])
    (ablation,) = ablation_ec(frame)
    assert [c for _, c in ablation.columns] == ["base", "W/A", "alone", "+ plain mod.", "+ MoDiff"]
    (wall,) = wallclock_table(frame)
    ratios = {r[2]: r[7] for r in wall.rows}
    assert ratios["fp"] == "1.00" and ratios["lcq+ec"] == "0.50"
    assert {r[3] for r in wall.rows} == {"fake float32"} and {r[8] for r in wall.rows} == {MISSING}  # no BF16 cell
    assert cache_table(frame) == []  # no cached cells: no table


def test_fmt_never_prints_nan_or_zero_for_missing():
    assert fmt(float("nan")) == fmt(None) == MISSING
    assert fmt(float("inf")) == "∞" and fmt(1006841.4) == "1,006,841" and fmt(0.0003) == "3.00e-04"


def _run(rows, name):
    frame = _frame(rows)
    frame["run_dir"] = name
    return Run(directory=name, label=name, info={}, frame=frame)


def test_merge_refuses_duplicates_and_hidden_differences():
    a = _run([_row("lcq", "ec", 8, 4)], "a")
    b = _run([_row("ltq", "ec", 8, 4)], "b")
    assert len(merge([a, b])) == 2
    gpu = _run([_row("lcq", "ec", 8, 4, device="cuda")], "gpu")
    assert len(merge([a, gpu])) == 2  # the same cell on another device is a timing comparison
    with pytest.raises(BenchError, match="more than one run"):
        merge([a, _run([_row("lcq", "ec", 8, 4)], "again")])
    hidden = _run([_row("lcq", "ec", 8, 4, cell_id="other-checkpoint")], "c")
    with pytest.raises(BenchError, match="hidden"):
        merge([a, hidden])
    warm = _run([_row("lcq", "ec", 8, 4, cell_id="no-warmup", params=json.dumps({"lcq": {"warmup": False}}))], "w")
    assert len(merge([a, warm])) == 2  # method parameters are visible: a warm-up ablation merges


def test_ablation_and_cache_tables_show_paper_numbers_only_where_they_match():
    rows = [_row("paper-lcq", m, 8, 4, model="ddpm-cifar10", fid=f) for m, f in (("off", 30.0), ("plain", 20.0),
                                                                                ("ec", 5.0))]
    (ablation,) = ablation_ec(_frame(rows))
    header = [c for _, c in ablation.columns]
    assert header[-1] == "+ MoDiff (paper)"
    assert ablation.rows[0][header.index("+ MoDiff (paper)")] == "4.38"  # Table 4, W8A4 modulated-ec
    (digits,) = ablation_ec(_frame([_row("lcq", m, 8, 4) for m in ("off", "ec")]))
    assert not any("paper" in c for _, c in digits.columns)
    cached = [_row("fp", "off", 32, 32, model="ddpm-cifar10", fid=4.2),
              _row("fp", "off", 32, 32, model="ddpm-cifar10", fid=4.4, cache="deepcache-u3", cell_id="c3",
                   method="fp+deepcache-u3", img_per_s=160.0)]
    (table,) = cache_table(_frame(cached))
    header = [c for _, c in table.columns]
    row = table.rows[0]
    assert row[header.index("speed-up")] == "1.60" and row[header.index("FID (paper)")] == "4.70"


def test_paper_qdiffusion_numbers_stand_only_beside_the_authors_activation_setting():
    """Issue #25 item 9: the paper's Q-Diffusion rows came from --a_sym with 'max' ranges from 64 samples on
    CIFAR-10 (MSE from the first 64 rows on LSUN-Churches); our default activation quantizers get no number."""
    cifar = {"act_symmetric": True, "act_init": "max", "act_init_samples": 64, "act_init_pick": "random",
             "running_stat": False}
    ours = {**cifar, "act_symmetric": False, "act_init": "mse", "act_init_samples": 0}
    value = paper_table1_value("ddpm-cifar10", "ddim-quad", 100, 8, 4, "qdiff", "off", "fid", False, cifar)
    assert value is not None
    assert paper_table1_value("ddpm-cifar10", "ddim-quad", 100, 8, 4, "qdiff", "off", "fid", False, ours) is None
    church = {**ours, "act_init_samples": 64, "act_init_pick": "first"}
    assert paper_table1_value("ldm-church", "ddim-ldm", 400, 8, 4, "qdiff", "off", "fid", False, church) is not None
    assert paper_table1_value("ldm-church", "ddim-ldm", 400, 8, 4, "qdiff", "off", "fid", False, cifar) is None
    rows = [_row("fp", "off", 32, 32, model="ddpm-cifar10", fid=4.3),
            _row("qdiff", "off", 8, 4, model="ddpm-cifar10", fid=9.0, cell_id="q")]
    (table,) = table1(_frame(rows))  # the defaults (no p_qdiff_act_* columns): not the authors' setting
    assert "QDIFF alone|FID (paper)" not in [f"{g}|{c}" for g, c in table.columns]
    authors = [rows[0], _row("qdiff", "off", 8, 4, model="ddpm-cifar10", fid=9.0, cell_id="q",
                             p_qdiff_act_symmetric=True, p_qdiff_act_init="max", p_qdiff_act_init_samples=64.0)]
    (table,) = table1(_frame(authors))
    header = [f"{g}|{c}" for g, c in table.columns]
    assert "QDIFF alone|FID (paper)" in header
    assert {r[0]: r for r in table.rows}["W8A4"][header.index("QDIFF alone|FID (paper)")] == fmt(value)


def test_transformer_models_get_the_dit_papers_layout_and_unets_do_not(monkeypatch):
    from bench.zoo import ReferenceData, ZooEntry, model_entry, registry
    from reports.tables import all_tables, transformer_table

    # in the zoo for this test only
    monkeypatch.setitem(registry._ENTRIES, "test-tiny-transformer", ZooEntry(
        name="test-tiny-transformer", load=lambda checkpoint: None, train_timesteps=1000, output_size=(16, 16),
        description="a report test's transformer", reference=ReferenceData(), family="transformer"))
    assert model_entry("test-tiny-transformer").family == "transformer" and model_entry("digits").family == "unet"
    model = "test-tiny-transformer"
    rows = [_row("fp", "off", 32, 32, model=model, speedup_fp32=1.0),
            _row("fp", "off", 32, 32, model=model, dtype="bfloat16", cell_id="bf16", img_per_s=190.0,
                 speedup_fp32=1.9),
            _row("ltq", "off", 8, 4, model=model, speedup_fp32=0.5),
            _row("ltq", "ec", 8, 4, model=model, fd_domain=float("nan"), speedup_fp32=0.5),
            _row("ltq", "ec", 8, 4, model=model, execution="int8", cell_id="int8", speedup_fp32=1.2)]
    (table,) = transformer_table(_frame(rows))
    assert [c for _, c in table.columns] == ["W/A", "method", "runs on", "GBops", "FD (domain) ↓", "images/s",
                                             "x FP32", "x BF16"]
    assert [row[:3] for row in table.rows] == [
        ["FP (W32A32)", "fp", "fake float32"], ["FP (W32A32)", "fp", "fake bfloat16"],
        ["W8A4", "ltq", "fake float32"], ["W8A4", "ltq+ec", "fake float32"], ["W8A4", "ltq+ec", "int8 float32"]]
    assert table.rows[3][4] == MISSING and table.rows[2][4] == "12.00"
    assert table.rows[4][6] == "1.20" and table.rows[1][6] == "1.90"
    # a UNet's results (digits) get Table 1 only, not this layout
    assert transformer_table(_frame([_row("fp", "off", 32, 32), _row("ltq", "ec", 8, 4)])) == []
    names = [t.name for t in all_tables(_frame(rows))]
    assert "transformer-test-tiny-transformer-ddim-quad-100" in names
