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
    from bench.registry import BUILTIN_MODULES, methods

    assert {"qdiff", "ptqd"} <= set(methods("base")) and "deepcache" in methods("cache")
    assert all(m == "bench.quantizers" or m.endswith(".method") for m in BUILTIN_MODULES)


# -- the import graph, read statically: every import statement counts, inside functions and under TYPE_CHECKING
PACKAGES = ("bench", "baselines", "modiff", "reports", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports anywhere in its text (a package's ``__init__`` counts as
    the package; ``from package import name`` counts as the submodule ``name`` when there is one)."""
    import ast

    paths = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(known(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module
                targets.update(known(f"{base}.{alias.name}") if f"{base}.{alias.name}" in paths else known(base)
                               for alias in node.names)
        graph[module] = {t for t in targets if t and t != module}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_circles_are_found():
    """The check below can fail: a two-module loop and a three-module loop are found, a chain is not."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"g"}, "g": set()}
    assert sorted(_circles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_no_import_circles_counting_imports_inside_functions():
    graph = _import_graph()
    assert {"bench.store", "bench.cell", "bench.registry", "bench.zoo", "baselines.ptqd.method"} <= set(graph)
    assert "bench.cell" in graph["bench.store"] and "bench.registry" in graph["bench.matrix"]
    circles = _circles(graph)
    ties = [[f"{a} -> {b}" for a in circle for b in sorted(graph[a]) if b in circle] for circle in circles]
    assert not circles, ties


def test_the_baselines_libraries_name_nothing_of_bench_even_inside_functions():
    """Only the glue (``baselines/*/method.py``) knows the harness; the libraries and ``modiff`` import nothing
    of ``bench``, ``reports`` or ``benchmarks`` anywhere in their text (the probe above sees load time only)."""
    graph = _import_graph()
    libraries = [m for m in graph if m.startswith("baselines.") and not m.endswith(".method")]
    assert {"baselines.qdiffusion.authors_checkpoint", "baselines.qdiffusion.reconstruction"} <= set(libraries)
    harness = ("bench", "reports", "benchmarks")
    found = {m: sorted(t for t in graph[m] if t.split(".")[0] in harness)
             for m in libraries + [m for m in graph if m.split(".")[0] == "modiff"]}
    assert not {m: t for m, t in found.items() if t}, found


def test_the_record_loads_no_model_code():
    """The run directory and the reports read cells through the record (``bench.cell``): importing them in a
    fresh interpreter loads no model (``bench.zoo``), no method (``baselines``, the registry) and no diffusers."""
    code = ("import json, sys, bench.store, reports.tables; print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('baselines', 'diffusers') or m.startswith(('bench.zoo', 'bench.registry', "
            "'bench.methods', 'bench.quantizers', 'bench.build')))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_reading_a_matrix_file_needs_no_torch():
    """A matrix file as data (``bench.matrix_file``) and the cell record are plain Python: reading, overriding and
    listing presets load no torch, no registry and no model; resolving them is ``bench.matrix``'s."""
    code = ("import json, sys, bench.matrix_file, bench.cell; bench.matrix_file.presets(); "
            "bench.matrix_file.apply_overrides(bench.matrix_file.load_config('smoke')[0], ['steps=3']); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'modiff', 'baselines') "
            "or m.startswith(('bench.registry', 'bench.zoo', 'bench.matrix.')) or m == 'bench.matrix')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []

