"""Render a report in headless Chromium: a PNG screenshot, and failure on console errors or
images that do not decode (``nox -s report-check``).

    python -m reports.check runs/demo/report.html [--screenshot runs/demo/report.png]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# no background traffic: this machine's network is closed, and the report needs none
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=10000"]


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def check(html: Path, screenshot: Path, browser: str, width: int = 1400, height: int = 6000) -> list[str]:
    """Problems found; empty when the page rendered cleanly."""
    url = html.resolve().as_uri()
    problems = []
    with tempfile.TemporaryDirectory() as profile:
        common = [browser, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        shot = subprocess.run([*common, f"--screenshot={screenshot.resolve()}", f"--window-size={width},{height}",
                               url], capture_output=True, text=True, timeout=120)
    for run in (dom, shot):
        for line in run.stderr.splitlines():
            if "CONSOLE" in line and ("error" in line.lower() or "missing image" in line):
                problems.append(f"console: {line.strip()}")
    body = re.search(r"<body[^>]*>", dom.stdout)
    ok = re.search(r'data-images-ok="(\d+)"', body.group(0)) if body else None
    total = re.search(r'data-images-total="(\d+)"', body.group(0)) if body else None
    if not (ok and total):
        problems.append("the page's image self-check did not run (no data-images-ok on <body>)")
    elif ok.group(1) != total.group(1):
        problems.append(f"only {ok.group(1)} of {total.group(1)} images decoded")
    if dom.returncode or shot.returncode:
        problems.append(f"chromium exited with {dom.returncode} / {shot.returncode}")
    if not screenshot.is_file() or screenshot.stat().st_size == 0:
        problems.append("no screenshot was written")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("html", type=Path, help="report.html to check")
    parser.add_argument("--screenshot", type=Path, default=None, help="PNG to write (default: next to the HTML)")
    args = parser.parse_args(argv)
    if not args.html.is_file():
        print(f"report-check: error: {args.html} not found (run 'modiff-bench report DIR' first)", file=sys.stderr)
        return 2
    browser = find_browser()
    if browser is None:
        print("report-check: error: no Chromium found; install Debian's: apt-get install chromium", file=sys.stderr)
        return 2
    screenshot = args.screenshot or args.html.with_name("report-screenshot.png")
    problems = check(args.html, screenshot, browser)
    for problem in problems:
        print(f"report-check: {problem}", file=sys.stderr)
    print(f"screenshot: {screenshot}" + ("" if not problems else f"  ({len(problems)} problem(s))"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
