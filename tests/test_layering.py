"""The layering: ``modiff`` (the method, the samplers and schedules) and the baselines' libraries
(everything in ``baselines/`` but the ``method`` modules, their glue to the harness) are usable
without the ``bench`` harness: importing them imports no ``bench`` module."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib, json, pkgutil, sys

imported = []
for package in ("modiff", "baselines"):
    root = importlib.import_module(package)
    imported.append(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        if info.name.rsplit(".", 1)[-1] == "method":  # the harness glue
            continue
        importlib.import_module(info.name)
        imported.append(info.name)
bench = sorted(name for name in sys.modules if name == "bench" or name.startswith("bench."))
print(json.dumps({"imported": imported, "bench": bench}))
"""


def _probe() -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_modiff_and_the_baselines_libraries_import_nothing_from_bench():
    found = _probe()
    expected = {"modiff", "modiff.samplers", "modiff.schedules", "baselines", "baselines.ptqd",
                "baselines.deepcache", "baselines.qdiffusion", "baselines.qdiffusion.calibration",
                "baselines.qdiffusion.reconstruction", "baselines.qdiffusion.quantizers"}
    assert expected <= set(found["imported"]), found["imported"]
    assert found["bench"] == [], f"imported {found['bench']} (through {found['imported']})"


def test_the_glue_is_where_the_harness_is_known():
    """The counterpart: the registry finds the baselines through their ``method`` modules."""
    from bench.methods import BUILTIN_MODULES, methods

    assert {"qdiff", "ptqd"} <= set(methods("base")) and "deepcache" in methods("cache")
    assert all(m == "bench.methods" or m.endswith(".method") for m in BUILTIN_MODULES)
