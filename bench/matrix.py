"""Resolving a matrix file (``bench.matrix_file``) against the registry: a validated, expanded grid of cells.

Values that are invalid on their own (an unknown method, a bit width out of range, an empty file,
more samples than a cell can hold) are rejected before anything runs; a ``[params.X]`` table for a
method no cell runs or builds on is a warning (``Matrix.warnings``). Combinations that are invalid
only together (modulation at 32-bit activations, a granularity that contradicts the base quantizer,
0-bit activations without modulation) are skipped, each with its reason, and recorded in
``run.json``. Cells that resolve to the same settings (every bit width of the ``fp`` base) are run
once.

Flow-matching samplers (``flow-euler``, ``flow-heun``: ``modiff.flow.FlowSamplerConfig``) run on flow-matching
models (SD3, FLUX; ``bench.zoo.model.is_flow_model``) and the DDPM-family samplers (``modiff.samplers``) on the
others; a matrix that pairs a model with a sampler of the other kind is refused before anything runs.
``bench.build.resolve_cell`` resolves a cell of either kind (:func:`resolve` is its former name here).
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modiff.config import COMPUTE_DTYPES, EXECUTIONS, GRANULARITIES, MODULATIONS, check_bits
from modiff.flow import FLOW_SAMPLER_NAMES
from modiff.samplers import SAMPLER_NAMES, check_seeds

from .build import ResolvedCell, resolve_cell, sampler_from_name  # noqa: F401 (sampler_from_name: its old home)
from .cell import AUTO, MEMORY_FORMATS, CellSpec, IdRules
from .errors import BenchError, user_input
from .matrix_file import (
    AXES,
    AXIS_DEFAULTS,
    INCEPTION_KEYS,
    RUN_DEFAULTS,
    SECTIONS,
    apply_overrides,
    load_config,
    matrix_blocks,
)
from .metrics import check_metrics
from .params import OrNone
from .plugins import import_plugins
from .registry import ID_RULES, base_quantizer, cache_method, cell_id, methods, registered_name

# A cell keeps all its samples together, in memory and in one samples.pt (float16), and its seeds as a list;
# n_samples is refused when that would pass 1 TiB at 3 channels (the most any zoo model decodes): beyond any
# machine's memory, while 50,000 Stable Diffusion images at 512x512 (73 GiB, the papers' largest sets) pass
MAX_SAMPLE_BYTES = 2**40
ALL_SAMPLER_NAMES = (*SAMPLER_NAMES, *FLOW_SAMPLER_NAMES)


def sampler_mismatch(model: str, is_flow: bool, sampler: str) -> str | None:
    """Why ``sampler`` cannot sample ``model`` (a flow-matching model or not), or None."""
    if is_flow and sampler not in FLOW_SAMPLER_NAMES:
        return (f"model {model} is a flow-matching model: sampler {sampler!r} is a DDPM-family sampler; use one of "
                f"{', '.join(FLOW_SAMPLER_NAMES)} (another [[matrix]] block can pair other models with other samplers)")
    if not is_flow and sampler in FLOW_SAMPLER_NAMES:
        return (f"sampler {sampler!r} samples flow-matching models (SD3, FLUX); model {model} is a DDPM-family "
                "model: use a DDPM-family sampler (another [[matrix]] block can pair other models with other samplers)")
    return None


def trace_layer(run: dict[str, Any], model: str) -> str:
    """The layer ``run.trace_layer`` names for ``model``: the one name (every model), or the model's entry of a
    table of names per model ("" for a model it does not name: not traced)."""
    layer = run.get("trace_layer", "")
    return layer.get(model, "") if isinstance(layer, dict) else layer


def resolve(cell: CellSpec, tables: dict[str, Any] | None = None) -> ResolvedCell:
    """``bench.build.resolve_cell``, which resolves cells of either sampler kind (its former home)."""
    return resolve_cell(cell, tables)


@dataclass
class Matrix:
    """A validated, expanded matrix: the cells to run and the ones skipped, with reasons."""

    source: str
    run: dict[str, Any]
    axes: list[dict[str, list]]  # one product per [[matrix]] block
    params: dict[str, dict[str, Any]]
    inception: dict[str, Any]
    cells: list[CellSpec]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # one line each, printed by 'run' (--dry-run too)
    # what the methods add to a cell's id (their versions): the store reads ids through them (bench.cell.settings_id)
    id_rules: IdRules = field(default=ID_RULES, repr=False, compare=False)
    # cell id -> the cell resolved against the registry (build_matrix resolves each once; a matrix read back from
    # run.json resolves a cell when a step first needs it)
    resolutions: dict[str, ResolvedCell] = field(default_factory=dict, repr=False, compare=False)

    @property
    def metrics(self) -> list[str]:
        return list(self.run["metrics"])

    @property
    def matrix_hash(self) -> str:
        return hashlib.sha256("\n".join(sorted(cell_id(c) for c in self.cells)).encode()).hexdigest()[:16]

    def resolution(self, cell: CellSpec) -> ResolvedCell:
        """``cell`` (one of ``cells``) resolved: what building and sampling it reads."""
        key = cell_id(cell)
        if key not in self.resolutions:
            resolved = resolve(cell)
            if resolved.skip is not None:
                raise BenchError(f"cell {key} ({cell.label}) cannot run under this version: {resolved.skip}")
            self.resolutions[key] = resolved
        return self.resolutions[key]

    def resolved(self) -> dict[str, Any]:
        return {"source": self.source, "run": self.run,
                "matrix": self.axes[0] if len(self.axes) == 1 else self.axes, "params": self.params,
                "inception": self.inception}


def _type_name(expected) -> str:
    return expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)


def _check_type(where: str, value: Any, expected) -> None:
    if isinstance(value, bool) and expected in (int, float, (int, float)):
        raise BenchError(f"{where} must be {_type_name(expected)}, got {value!r}")
    if not isinstance(value, expected):
        raise BenchError(f"{where} must be {_type_name(expected)}, got {value!r}")


RUN_TYPES: dict[str, Any] = {
    "description": str, "model": str, "checkpoint": str, "sampler": str, "steps": int, "eta": (int, float),
    "n_samples": int, "seed": int, "batch_size": int, "metrics": list, "imports": list, "trace_layer": (str, dict),
    "trace_samples": int, "timing_repeats": int,
}
AXIS_TYPES: dict[str, Any] = {"model": str, "sampler": str, "steps": int, "eta": (int, float), "w_bits": int,
                              "a_bits": int, "base": str, "a_granularity": str, "modulation": str, "cache": str,
                              "execution": str, "dtype": str, "memory_format": str}


def build_matrix(data: dict, source: str = "<dict>", base_dir: Path | None = None) -> Matrix:
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise BenchError(f"{source}: unknown section(s) {', '.join(unknown)}; allowed: {', '.join(SECTIONS)}")
    for section in ("run", "params", "inception"):
        if not isinstance(data.get(section, {}), dict):
            raise BenchError(f"{source}: {section} must be a table ([{section}]), got {data[section]!r}")
    raw_run = dict(data.get("run", {}))
    raw_blocks = matrix_blocks(data)
    if not raw_blocks or not all(isinstance(b, dict) for b in raw_blocks):
        raise BenchError(f"{source}: [matrix] must be a table or a list of [[matrix]] tables")
    for key in raw_run:
        if key not in RUN_DEFAULTS:
            raise BenchError(f"{source}: unknown key run.{key}; allowed: {', '.join(RUN_DEFAULTS)}")
    for raw_axes in raw_blocks:
        for key in raw_axes:
            if key not in AXES and key != "params":
                raise BenchError(f"{source}: unknown key matrix.{key}; allowed: {', '.join(AXES)}, params")
        both = sorted(set(raw_run) & set(raw_axes))
        if both:
            raise BenchError(f"{source}: {', '.join(both)} given in both [run] and [matrix]; keep one")

    run = {**RUN_DEFAULTS, **raw_run}
    for key, value in run.items():
        _check_type(f"run.{key}", value, RUN_TYPES[key])
    for key in ("metrics", "imports"):
        for item in run[key]:
            _check_type(f"run.{key} item", item, str)
    if isinstance(run["trace_layer"], dict):  # one layer per model: {digits = "mid_block...", digits-dit = "..."}
        for model, layer in run["trace_layer"].items():
            _check_type(f"run.trace_layer.{model}", layer, str)
    import_plugins(run["imports"], base_dir)

    blocks = [_block_axes(raw_axes, run, source) for raw_axes in raw_blocks]
    for key in ("model", "sampler", "steps", "eta"):
        run.pop(key)
    for axes in blocks:
        _validate_axes(axes)
    for key in ("n_samples", "batch_size", "trace_samples", "timing_repeats"):
        if run[key] < 1:
            raise BenchError(f"run.{key} must be >= 1, got {run[key]}")
    with user_input():
        check_seeds(run["seed"], run["n_samples"], "run.seed")
    _check_sample_bytes(run["n_samples"], {m for axes in blocks for m in axes["model"]})
    if not run["metrics"]:
        raise BenchError("run.metrics is empty; name at least one metric")
    for model in {m for axes in blocks for m in axes["model"]}:
        check_metrics(run["metrics"], model)

    params = data.get("params", {})
    _check_type("[params]", params, dict)
    registered = methods()
    for where, table in [("[params]", params)] + [("matrix.params", b.get("params", {})) for b in raw_blocks]:
        _check_type(where, table, dict)
        for name, values in table.items():
            if registered_name(name) not in registered:
                close = difflib.get_close_matches(name, registered, n=1)
                raise BenchError(f"{where}.{name}: unknown method" + (f" (did you mean {close[0]!r}?)" if close else "")
                                 + f"; available: {', '.join(registered)}")
            _check_type(f"{where}.{name}", values, dict)
    params = _registered_tables(params, "[params]")  # an alias's table is its method's
    block_tables = [_registered_tables(b.get("params", {}), "matrix.params") for b in raw_blocks]
    block_params = []  # per [[matrix]] block: every variant of the global [params] with the block's own on top
    for tables in block_tables:
        merged = {name: dict(values) for name, values in params.items()}
        for name, values in tables.items():
            merged[name] = {**merged.get(name, {}), **values}
        variants = _param_sweep(merged, registered)
        for variant in variants:
            for name, values in variant.items():
                registered[name].check_params(values)
        block_params.append(variants)
    inception = data.get("inception", {})
    _check_type("[inception]", inception, dict)
    for key, value in inception.items():
        if key not in INCEPTION_KEYS:
            raise BenchError(f"unknown key inception.{key}; allowed: {', '.join(INCEPTION_KEYS)}")
        _check_type(f"inception.{key}", value, INCEPTION_KEYS[key])
    from .references import check_settings  # paths exist, reference data readable, no contradictions

    check_settings(inception, [m for axes in blocks for m in axes["model"]])

    skipped: list[dict[str, Any]] = []
    seen: dict[str, ResolvedCell] = {}  # cell id -> the cell resolved, once
    named: list[set[str]] = [set() for _ in blocks]  # per block: the methods its combinations run or carry
    combos = [(index, combo, variant) for index, axes in enumerate(blocks)
              for combo in itertools.product(*(axes[k] for k in AXES)) for variant in block_params[index]]
    for index, combo, variant in combos:
        values = dict(zip(AXES, combo, strict=True))
        cell = CellSpec(checkpoint=run["checkpoint"] or None, n_samples=run["n_samples"], seed=run["seed"],
                        batch_size=run["batch_size"], **{**values, "eta": float(values["eta"])})
        resolved = resolve(cell, variant)
        named[index].update(resolved.methods)
        if resolved.skip is not None:
            skipped.append({**values, "reason": resolved.skip})
            continue
        key = cell_id(resolved.spec)
        if key not in seen:
            seen[key] = resolved
    skipped = list({json.dumps(s, sort_keys=True): s for s in skipped}.values())  # once per parameter variant
    if not seen:
        reasons = sorted({s["reason"] for s in skipped})
        raise BenchError(f"{source}: the matrix is empty: every combination is invalid ({'; '.join(reasons)})")
    warnings = [f"{source}: [params.{name}] is not used: no cell runs {name} or a method built on it "
                f"(matrix.base: {', '.join(sorted({b for axes in blocks for b in axes['base']}))})"
                for name in params if not any(name in used for used in named)]
    warnings += [f"{source}: " + ("matrix.params" if len(raw_blocks) == 1 else f"[[matrix]] block {index + 1}: params")
                 + f".{name} is not used: none of its cells runs {name} or a method built on it"
                 for index, tables in enumerate(block_tables) for name in tables
                 if name not in named[index]]
    return Matrix(source, run, blocks, params, inception, [r.spec for r in seen.values()], skipped, warnings,
                  resolutions=seen)


def _registered_tables(tables: dict[str, Any], where: str) -> dict[str, Any]:
    """``tables`` (method -> its parameters) under the methods' registered names (an alias's table is its
    method's); a method given under two names is an error."""
    out: dict[str, Any] = {}
    for name, values in tables.items():
        key = registered_name(name)
        if key in out:
            raise BenchError(f"{where}: {name!r} and {key!r} name the same method; give its parameters once")
        out[key] = values
    return out


def _check_sample_bytes(n_samples: int, models: set[str]) -> None:
    """Refuse ``n_samples`` whose float16 samples would pass ``MAX_SAMPLE_BYTES`` for one of ``models``
    (counted at 3 channels of the model's output size), before any cell fails on it."""
    from .zoo import model_entry

    for model in sorted(models):
        height, width = model_entry(model).output_size
        per_sample = 3 * height * width * 2
        if n_samples * per_sample > MAX_SAMPLE_BYTES:
            raise BenchError(
                f"run.n_samples = {n_samples} is more than a cell can hold: its samples stay together in memory and "
                f"in one file, {_size(n_samples * per_sample)} for {model} ({height}x{width} images at 3 channels, "
                f"float16); the limit is {_size(MAX_SAMPLE_BYTES)}, {MAX_SAMPLE_BYTES // per_sample} samples of "
                f"{model}")


def _size(n_bytes: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n_bytes < 1024 or unit == "EiB":
            break
        n_bytes /= 1024
    return f"{n_bytes:.3g} {unit}"


def _declares_list(kind: Any) -> bool:
    """Whether a parameter type takes a list as one value: ``list``, or ``list`` or unset (``OrNone(list)``: e.g.
    TaylorSeer's ``cache_identifiers``, MagCache's ``mag_ratios``)."""
    return kind is list or (isinstance(kind, OrNone) and _declares_list(kind.of))


def _param_sweep(table: dict[str, dict[str, Any]], registered: dict) -> list[dict[str, dict[str, Any]]]:
    """A parameter given as a list where its method declares a single value (``warmup = [true, false]``)
    is an axis: one table per combination of the listed values, in order. A parameter declared as a
    list (or as anything) keeps a list as its value; unknown names are left to ``check_params``."""
    sweeps = []
    for name, values in table.items():
        fields = registered[name].param_fields()
        for key, value in values.items():
            kind = fields[key].type if key in fields else None
            if isinstance(value, list) and kind is not None and not _declares_list(kind):
                if not value:
                    raise BenchError(f"params.{name}.{key} = []: a swept parameter needs at least one value")
                sweeps.append((name, key, value))
    variants = []
    for combo in itertools.product(*(values for _, _, values in sweeps)):
        variant = {name: dict(values) for name, values in table.items()}
        for (name, key, _), value in zip(sweeps, combo, strict=True):
            variant[name][key] = value
        variants.append(variant)
    return variants


def _block_axes(raw_axes: dict, run: dict, source: str) -> dict[str, list]:
    axes: dict[str, list] = {}
    if raw_axes.get("params"):
        tables = raw_axes["params"]
        axes["params"] = _registered_tables(tables, "matrix.params") if isinstance(tables, dict) else tables
    for key in AXES:
        if key in raw_axes:
            values = raw_axes[key] if isinstance(raw_axes[key], list) else [raw_axes[key]]
        elif key in AXIS_DEFAULTS:
            values = list(AXIS_DEFAULTS[key])
        else:
            values = [run[key]]
        if not values:
            raise BenchError(f"{source}: the matrix is empty (matrix.{key} = [])")
        for value in values:
            _check_type(f"matrix.{key} value", value, AXIS_TYPES[key])
        if key == "base":  # an alias runs (and records) its method's registered name
            values = [registered_name(value) for value in values]
        axes[key] = list(dict.fromkeys(values))
    return axes


def _validate_axes(axes: dict[str, list]) -> None:
    from .zoo import model_entry
    from .zoo.model import is_flow_model

    for sampler in axes["sampler"]:
        if sampler not in ALL_SAMPLER_NAMES:
            raise BenchError(f"unknown sampler {sampler!r}; available: {', '.join(ALL_SAMPLER_NAMES)}")
    for model in axes["model"]:
        # a registered name, or diffusers:<directory or hub id> (its configs are read and checked, no weights);
        # anything else is a one-line BenchError naming what is available
        T = model_entry(model).train_timesteps
        for steps in axes["steps"]:
            if steps > T:
                raise BenchError(f"steps must be between 1 and {T} (T of {model}), got {steps}")
        for sampler in axes["sampler"]:
            reason = sampler_mismatch(model, is_flow_model(model), sampler)
            if reason is not None:
                raise BenchError(reason)
    for steps in axes["steps"]:
        if steps < 1:
            raise BenchError(f"steps must be >= 1, got {steps}")
    for eta in axes["eta"]:
        if not 0.0 <= eta <= 1.0:
            raise BenchError(f"eta must be in [0, 1], got {eta}")
    for name, allow_zero in (("w_bits", False), ("a_bits", True)):
        for bits in axes[name]:
            with user_input():
                check_bits(name, bits, allow_zero=allow_zero)
    for value in axes["a_granularity"]:
        if value != AUTO and value not in GRANULARITIES:
            raise BenchError(f"unknown a_granularity {value!r}; available: auto, {', '.join(GRANULARITIES)}")
    for axis, allowed in (("modulation", MODULATIONS), ("execution", EXECUTIONS), ("dtype", COMPUTE_DTYPES),
                          ("memory_format", MEMORY_FORMATS)):
        for value in axes[axis]:
            if value not in allowed:
                raise BenchError(f"unknown {axis} {value!r}; available: {', '.join(allowed)}")
    for value in axes["base"]:
        base_quantizer(value)
    for value in axes["cache"]:
        cache_method(value)


def load_matrix(name_or_path: str, overrides: list[str] | None = None) -> Matrix:
    data, source, folder = load_config(name_or_path)
    return build_matrix(apply_overrides(data, overrides or []), source, folder)
