"""Matrix files as data: a declared grid of cells in TOML (a shipped preset or a path), read and overridden.

    [run]                     # settings shared by every cell
    model = "digits"
    sampler = "ddim-quad"
    steps = 100
    eta = 0.0
    n_samples = 64
    seed = 0                  # image i of every cell uses seed SEED + i
    batch_size = 64
    metrics = ["psnr_to_fp", "fd_domain", "is_domain"]
    timing_repeats = 1        # time the first batch this many times (a spread beside every img/s)
    [matrix]                  # the cartesian product of these lists is the set of cells
    w_bits = [8]
    a_bits = [8, 4, 3]
    base = ["lcq"]
    a_granularity = ["auto"]  # auto: the base quantizer's own
    modulation = ["off", "plain", "ec"]
    cache = ["none"]
    execution = ["fake"]      # fake | int8 | fp8 (real low-bit kernels; modiff-wrapped bases)
    dtype = ["float32"]       # float32 | bfloat16 | float16 (what is not quantized, and full precision)
    memory_format = ["contiguous"]  # contiguous | channels_last (the faster layout for convs on CPU)
    [params.lcq]              # optional, per method (see 'modiff-bench methods')
    warmup = true
    [inception]               # optional: offline Inception weights for fid / is / sfid / prc
    weights = "/path/to/weights-inception-2015-12-05-6726825d.pth"

``model``, ``sampler``, ``steps`` and ``eta`` may be lists in ``[matrix]`` instead of scalars in
``[run]``. A ``[[matrix]]`` block may hold a ``params`` table (method -> values) that applies to its
cells on top of the global ``[params]`` (e.g. a warm-up ablation next to the default). A parameter
given as a list where the method declares one value (``warmup = [true, false]``) is an axis: the
cells are crossed with each listed value (results show it as the ``p_<method>_<name>`` column). Several
``[[matrix]]`` blocks give the union of their products (e.g. a caching block
next to the quantization grid); ``--set matrix.KEY=...`` then sets KEY in every block.

This module reads a file (``load_config``), applies ``--set`` (``apply_overrides``) and lists the presets; it knows
no method, model or torch. Resolving what it declares against the registry is ``bench.matrix``'s.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from .cell import AUTO
from .errors import BenchError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RUN_DEFAULTS: dict[str, Any] = {
    "description": "", "model": "digits", "checkpoint": "", "sampler": "ddim-quad", "steps": 100, "eta": 0.0,
    "n_samples": 64, "seed": 0, "batch_size": 64, "metrics": ["psnr_to_fp"], "imports": [], "trace_layer": "",
    "trace_samples": 16, "timing_repeats": 1,
}
AXES: tuple[str, ...] = ("model", "sampler", "steps", "eta", "w_bits", "a_bits", "base", "a_granularity",
                         "modulation", "cache", "execution", "dtype", "memory_format")
AXIS_DEFAULTS: dict[str, list] = {"w_bits": [8], "a_bits": [8], "base": ["lcq"], "a_granularity": [AUTO],
                                  "modulation": ["off"], "cache": ["none"], "execution": ["fake"],
                                  "dtype": ["float32"], "memory_format": ["contiguous"]}
INCEPTION_KEYS = {"weights": str, "pytorch_fid_weights": str, "cache_dir": str, "batch_size": int, "download": bool,
                  "cifar10_root": str, "reference_images": str, "reference_stats": str}  # see bench.references
SECTIONS = ("run", "matrix", "params", "inception")
PRESET_PACKAGE = "bench.presets"


def presets() -> dict[str, str]:
    """Shipped preset names -> their one-line description."""
    out = {}
    for entry in sorted(resources.files(PRESET_PACKAGE).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text())
            out[entry.name[:-5]] = str(data.get("run", {}).get("description", ""))
    return out


def load_config(name_or_path: str) -> tuple[dict, str, Path | None]:
    """Raw TOML of a preset name or a file path; returns (data, source, folder for relative imports)."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.exists():
        if path.is_dir():
            raise BenchError(f"matrix file {name_or_path!r} is a directory; give a .toml file or a preset name")
        if not path.is_file():
            raise BenchError(f"matrix file {name_or_path!r} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise BenchError(f"matrix file {name_or_path!r} is not a text (UTF-8 TOML) file") from None
        except OSError as exc:
            raise BenchError(f"cannot read matrix file {name_or_path!r}: {exc.strerror}") from None
        source, folder = str(path), path.resolve().parent
    else:
        entry = resources.files(PRESET_PACKAGE) / f"{name_or_path}.toml"
        if not entry.is_file():
            raise BenchError(f"unknown preset {name_or_path!r}; available: {', '.join(presets())} "
                             "(or give a path to a .toml file)")
        text, source, folder = entry.read_text(), f"preset:{name_or_path}", None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"malformed TOML in {source}: {exc}") from None
    if not data:  # every setting has a default, so an empty file would run a cell nobody declared
        raise BenchError(f"matrix file {source} is empty (no [run] or [matrix] table); declare what to run, "
                         "e.g. [matrix] base = [\"lcq\"], or name a preset")
    return data, source, folder


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def apply_overrides(data: dict, assignments: list[str]) -> dict:
    """``--set key=value``: ``run.steps=50``, ``matrix.a_bits=[4,3]``, ``params.lcq.warmup=false``,
    ``matrix.params.lcq.warmup=[true,false]`` (in every [[matrix]] block), or a bare key (``steps=50``),
    looked up in [matrix] then [run]. Values are TOML."""
    data = json.loads(json.dumps(data))  # deep copy
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BenchError(f"--set expects KEY=VALUE, got {assignment!r}")
        value = _parse_value(text.strip())
        path = key.split(".")
        blocks = matrix_blocks(data)
        if len(path) == 1:
            in_matrix = any(key in block for block in blocks)
            section = "matrix" if in_matrix or (key in AXES and key not in RUN_DEFAULTS) else "run"
            if section == "run" and key not in RUN_DEFAULTS:
                raise BenchError(f"--set {key}: unknown key; use run.KEY, matrix.KEY, params.METHOD.KEY or "
                                 "inception.KEY")
            path = [section, key]
        if path[0] not in SECTIONS:
            raise BenchError(f"--set {key}: unknown section {path[0]!r}; sections: {', '.join(SECTIONS)}")
        if path[0] == "run" and path[-1] in AXES:
            for block in blocks:
                block.pop(path[-1], None)  # a scalar in [run] replaces the axis
        if len(path) > 2 and path[:2] != ["matrix", "params"] and path[0] != "params":
            raise BenchError(f"--set {key}: expected {path[0]}.KEY")
        if path[0] == "matrix" and len(path) == 2 and path[1] in data.get("run", {}):
            data["run"].pop(path[1])
        if path[0] == "matrix":
            data.setdefault("matrix", {})
            for block in matrix_blocks(data):  # every [[matrix]] block
                _set(block, path[1:], value, key)
        else:
            _set(data, path, value, key)
    return data


def _set(node: dict, path: list[str], value: Any, key: str) -> None:
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise BenchError(f"--set {key}: {part!r} is not a table")
    node[path[-1]] = value


def matrix_blocks(data: dict) -> list[dict]:
    """The [matrix] table, or every [[matrix]] block (cells are the union of their products)."""
    raw = data.get("matrix", {})
    return raw if isinstance(raw, list) else [raw]
