"""`modiff-bench report`: from a real (small) run directory to report.html and report.md."""

import os
import re

import pytest

from bench.cli import main
from reports.check import BROWSERS, check, find_browser

BROWSER = find_browser()  # the first of reports.check.BROWSERS on PATH: Debian's package installs /usr/bin/chromium
NO_BROWSER = (f"none of {', '.join(BROWSERS)} is on PATH; install Debian's chromium to run the browser check: "
              "apt-get install -y chromium (as root; .ci/run does it)")
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "smoke"
    argv = ["run", "smoke", "--out", str(out), "--no-progress", "--set", "steps=8",
            "--set", "trace_layer='mid_block.resnets.0.conv1'", "--set", "trace_samples=4",
            "--set", "matrix.modulation=['off','plain','ec']", "--set", "matrix.a_bits=[6,3]",
            "--set", "run.metrics=['psnr_to_fp','fd_domain','fid']"]
    with pytest.MonkeyPatch.context() as mp:  # no Inception weights, whatever this machine's torch hub holds
        mp.setenv("TORCH_HOME", str(out.parent / "empty-torch-home"))
        assert main(argv) == 0
    assert main(["report", str(out)]) == 0
    return out


def test_report_html_and_markdown_hold_tables_figures_and_notes(run_dir):
    html = (run_dir / "report.html").read_text()
    md = (run_dir / "report.md").read_text()
    for title in ("Quantization results", "Error compensation ablation", "Memory and compute per batch",
                  "Wall-clock"):
        assert title in html and title in md
    assert "Caching" not in md and "Warm-up ablation" not in md  # nothing measured for them
    # every figure is embedded in the HTML and linked from the Markdown, the Fig. 3 trace among them
    embedded = re.findall(r'src="data:image/png;base64,', html)
    linked = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    assert len(embedded) == len(linked) >= 4
    assert all((run_dir / path).is_file() and (run_dir / path).with_suffix(".svg").is_file() for path in linked)
    assert any("step" in path for path in linked)
    # the Inception weights are not on this machine: said in the notes, never a number
    assert "fid not computed for 7 cell(s)" in md
    assert "| nan" not in md.lower() and ">nan<" not in html.lower()
    for key in ("git revision", "versions", "sampler / steps / eta", "samples per cell / seeds", "device"):
        assert key in md


def test_report_bad_input_is_one_line_exit_2(run_dir, tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run directory" in err[0]
    assert main(["report", str(run_dir), str(run_dir)]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["report", str(run_dir), str(run_dir), "--out", str(tmp_path / "merged")]) == 2
    assert "more than one run" in capsys.readouterr().err


@pytest.mark.skipif(BROWSER is None and not IN_CI, reason=NO_BROWSER)
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    """Skipped only off CI: with CI set a missing browser fails, so CI cannot silently lose this check."""
    if BROWSER is None:
        pytest.fail(f"CI is set but {NO_BROWSER}")
    shot = tmp_path / "shot.png"
    assert check(run_dir / "report.html", shot, BROWSER) == []
    assert shot.stat().st_size > 10_000
    broken = tmp_path / "broken.html"
    html = (run_dir / "report.html").read_text()
    broken.write_text(html.replace("data:image/png;base64,", "data:image/png;base64,X"))
    problems = check(broken, tmp_path / "broken.png", BROWSER)
    assert any("images decoded" in p or "missing image" in p for p in problems)
