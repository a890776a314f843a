"""Loading user modules (plugins) that register methods or metrics: dotted module names or paths to ``.py`` files.

A matrix names them in ``[run] imports``; ``report``, ``evaluate`` and ``methods`` take ``--import MODULE``. A run
directory never names code to load: only the command line and the matrix file do.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from pathlib import Path

from .errors import BenchError
from .registry import DICT_PARAMS_WARNING


def import_plugins(specs: list[str] | tuple[str, ...], base_dir: Path | None = None) -> None:
    """Import user modules that register methods: dotted module names or paths to .py files
    (relative paths are taken from ``base_dir``, the matrix file's folder, then the cwd). Whatever
    goes wrong, including an exception raised by the module's own code, is a one-line BenchError.
    A method that still declares its parameters with dicts is reported (DeprecationWarning, shown)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("default", message=DICT_PARAMS_WARNING, category=DeprecationWarning)
        for spec in specs:
            _import_plugin(spec, base_dir)


def _import_plugin(spec: str, base_dir: Path | None) -> None:
    if not isinstance(spec, str) or not spec.strip():
        raise BenchError(f"cannot import {spec!r}: expected a module name or a path to a .py file")
    found = _plugin_file(spec, base_dir)
    if found is None:
        try:
            importlib.import_module(spec)
        except ImportError as exc:
            raise BenchError(f"cannot import module {spec!r}: {exc}") from None
        except Exception as exc:  # the module's own code raised
            raise BenchError(f"importing {spec!r} failed: {_one_line(exc)}") from None
        return
    name = f"modiff_bench_plugin_{found.stem}"
    module_spec = importlib.util.spec_from_file_location(name, found)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise BenchError(f"importing {spec!r} failed: {_one_line(exc)}") from None


def _plugin_file(spec: str, base_dir: Path | None) -> Path | None:
    """The .py file ``spec`` names, or None when it is a module name."""
    path = Path(spec).expanduser()
    candidates = [path] if path.is_absolute() else [(base_dir or Path.cwd()) / path, path]
    found = next((p for p in candidates if p.is_file()), None)
    looks_like_path = spec.endswith(".py") or "/" in spec or "\\" in spec
    if found is None:
        if looks_like_path:
            raise BenchError(f"cannot import {spec!r}: no such file")
        return None
    if found.suffix != ".py":
        raise BenchError(f"cannot import {spec!r}: {found} is not a Python (.py) file")
    return found


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())
