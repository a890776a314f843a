"""reports.spread: one matrix run with several seed sets, each setting's mean and range over the runs."""

import pandas as pd

from reports.spread import main


def _results(directory, rows):
    directory.mkdir()
    pd.DataFrame(rows).to_csv(directory / "results.csv", index=False)


def _row(method, a, psnr, **params):
    return {"status": "ok", "method": method, "w_bits": 8, "a_bits": a, "psnr_to_fp": psnr, "fd_domain": 1.0,
            **{f"p_{k}": v for k, v in params.items()}}


def test_spread_groups_settings_over_runs(tmp_path, capsys):
    _results(tmp_path / "a", [_row("qdiff+ec", 4, 20.0, qdiff_residual_scale="minmax"),
                              _row("qdiff+ec", 4, 22.0, qdiff_residual_scale="learned"),
                              _row("lcq", 4, 10.0, qdiff_residual_scale=None)])
    _results(tmp_path / "b", [_row("qdiff+ec", 4, 24.0, qdiff_residual_scale="minmax"),
                              _row("qdiff+ec", 4, 23.0, qdiff_residual_scale="learned"),
                              {**_row("lcq", 4, 99.0), "status": "failed"}])
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    lines = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "22.00 [20.00, 24.00]" in lines["qdiff+ec W8A4 residual_scale=minmax"]
    assert "22.50 [22.00, 23.00]" in lines["qdiff+ec W8A4 residual_scale=learned"]
    assert "| 1 |" in lines["lcq W8A4"] and "10.00 [10.00, 10.00]" in lines["lcq W8A4"]  # the failed row is left out


def test_a_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
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
