"""The cell record: the settings of one cell of a matrix, their defaults, its id, and the columns of its result row.

Nothing here knows a model, a method or torch: the run directory (``bench.store``) and the reports read and
label cells with this module alone. What a method contributes to a cell's identity (its version, the parameters
that cannot change its samples) comes from the method registry, which hands it in as :class:`IdRules`
(``bench.registry.ID_RULES``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

AUTO = "auto"  # a_granularity: the base quantizer's own (or channel for the generic one)
NONE = "none"  # a_granularity of unquantized activations; the empty cache

# Settings added after run directories existed: at these values they stay out of a cell's id (``id_settings``),
# so the cells of older runs keep their ids and resume.
LATER_DEFAULTS: dict[str, Any] = {"execution": "fake", "dtype": "float32", "memory_format": "contiguous"}
LATER_PARAM_DEFAULTS: dict[str, Any] = {"weight_symmetric": None, "compile": False,  # method parameters added later
                                        "authors_grid": False, "out_penalty": 0.0, "act_symmetric": False,
                                        "act_init_samples": 0, "act_init_pick": "random", "running_stat": False,
                                        "regularize_both_halves": False, "state_dtype": "float32",
                                        "fuse_norms": False}
MEMORY_FORMATS = ("contiguous", "channels_last")  # the layout of the model's weights and input (torch's names)


@dataclass
class CellSpec:
    """The resolved settings of one cell: everything its samples depend on."""

    model: str
    checkpoint: str | None
    sampler: str
    steps: int
    eta: float
    n_samples: int
    seed: int
    batch_size: int
    base: str
    modulation: str
    cache: str
    w_bits: int
    a_bits: int
    a_granularity: str
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # method name -> its parameters
    execution: str = "fake"  # fake | int8 | fp8: how the quantized conv/linear layers run (modiff.ModiffConfig)
    dtype: str = "float32"  # float32 | bfloat16 | float16: the precision of what is not quantized, and of fp
    memory_format: str = "contiguous"  # contiguous | channels_last: the layout of the model's weights and input

    @property
    def method(self) -> str:
        """Display name: base, then modulation and cache when they are used (``lcq+ec``)."""
        parts = [self.base]
        if self.modulation != "off":
            parts.append(self.modulation)
        if self.cache != NONE:
            parts.append(self.cache)
        return "+".join(parts)

    @property
    def label(self) -> str:
        """For logs: ``lcq+ec W8A4``, then execution, dtype and memory format where not the defaults."""
        return " ".join([self.method, f"W{self.w_bits}A{self.a_bits}", *later_settings(vars(self))])

    @property
    def seeds(self) -> range:
        return range(self.seed, self.seed + self.n_samples)


CELL_FIELDS = tuple(f.name for f in dataclasses.fields(CellSpec))  # what a cell's id hashes (``settings_id``)


def later_settings(settings: Mapping[str, Any]) -> list[str]:
    """The values of the settings added later that ``settings`` (a cell's fields, a result row or a
    skipped combination) holds away from their defaults, for labels: ``["int8", "bfloat16"]``."""
    out = [str(settings.get(k, v)) for k, v in LATER_DEFAULTS.items() if settings.get(k, v) != v]
    return out + (["compiled"] if is_compiled(settings) else [])


def is_compiled(settings: Mapping[str, Any]) -> bool:
    """Whether ``settings`` (a cell's fields, a result row or a skipped combination) run ``torch.compile``d
    (the ``fp`` base's ``compile`` parameter)."""
    params = settings.get("params")
    return isinstance(params, Mapping) and any(isinstance(p, Mapping) and p.get("compile") is True
                                               for p in params.values())


def fp_reference_cell(cell: CellSpec) -> CellSpec:
    """The cell whose full-precision samples ``psnr_to_fp`` / ``mse_to_fp`` compare with: float32 in the
    contiguous layout, so that a BF16 (or channels-last) cell's quality includes what BF16 (or the
    layout) itself costs; such full-precision cells keep their own samples, under their own reference key."""
    return dataclasses.replace(cell, dtype="float32", memory_format="contiguous")


# -- the id -----------------------------------------------------------------------------------
class IdRules(Protocol):
    """What the methods contribute to a cell's id (``bench.registry.ID_RULES``)."""

    def versions(self, settings: Mapping[str, Any]) -> dict[str, int]:
        """The versions above 1 of the methods a cell with ``settings`` uses."""

    def id_params(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` of ``method`` without those that cannot change what the cell computes."""


def id_settings(settings: Mapping[str, Any], rules: IdRules) -> dict[str, Any]:
    """``settings`` (a cell's fields as a dict, or a result row) without the settings and method
    parameters added later that sit at their defaults: what a cell's id hashes, so that cells made
    before those existed keep their ids. A method whose version is above 1 adds it (``method_versions``)."""
    out = {k: v for k, v in settings.items() if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}
    later = LATER_PARAM_DEFAULTS
    if isinstance(out.get("params"), dict):
        params = {}
        for m, p in out["params"].items():
            if isinstance(p, dict):
                p = rules.id_params(m, p)  # the method's parameters that cannot change this cell stay out of its id
                kept = {k: v for k, v in p.items() if k not in later or v != later[k]}
                if p and not kept:  # only parameters added later, at their defaults (fp's compile): as before
                    continue
                p = kept
            params[m] = p
        out["params"] = params
    versions = rules.versions(settings)
    if versions:  # a method changed what it computes: its cells get new ids (and run again)
        out["method_versions"] = versions
    else:
        out.pop("method_versions", None)
    return out


def settings_id(settings: Mapping[str, Any], rules: IdRules) -> str:
    """The id, under the current code, of the cell whose settings ``settings`` records (a cell's fields,
    a result row, a ``run.json`` entry; other keys are ignored): the same as ``cell_id`` for a current
    cell, and for a cell made by an older version of its method the id of the cell that supersedes it."""
    fields = {k: settings[k] for k in CELL_FIELDS if k in settings}
    payload = json.dumps(id_settings(fields, rules), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def cell_id(cell: CellSpec, rules: IdRules) -> str:
    """Stable id: a hash of every resolved setting the samples depend on. Settings added later
    (``LATER_DEFAULTS``, ``LATER_PARAM_DEFAULTS``) count only away from their default (``id_settings``),
    so the ids of cells made before they existed do not change."""
    return settings_id(dataclasses.asdict(cell), rules)


# -- the columns of a cell's result row besides its metrics -----------------------------------------
SETTING_COLUMNS = ("model", "checkpoint", "sampler", "steps", "eta", "n_samples", "seed", "batch_size", "method",
                   "base", "modulation", "cache", "w_bits", "a_bits", "a_granularity", "execution", "dtype",
                   "memory_format")
COST_COLUMNS = ("gbops", "gbops_honest", "macs_g", "state_mb", "prepare_s", "wall_s", "img_per_s", "img_per_s_lo",
                "img_per_s_hi", "timed_batches", "speedup_fp32", "speedup_bf16", "decode_s", "peak_mem_mb",
                "peak_rss_mb", "cuda_peak_mb", "reused_fraction")
PROVENANCE_COLUMNS = ("device", "world_size", "torch_version", "git_rev", "modiff_bench_version", "started_utc",
                      "finished_utc", "samples_file", "trace_file", "params", "method_info", "missing_metrics",
                      "versions", "inception_weights", "timing_env", "method_versions")
# every key of a result row that is not a metric's column: a metric may not name a column so (bench.metrics)
NON_METRIC_COLUMNS = ("cell_id", "status", "error", *SETTING_COLUMNS, *COST_COLUMNS, *PROVENANCE_COLUMNS,
                      "metrics", "metric_columns", "metric_versions", "samples_bytes", "samples_sha256",
                      "generated_utc")
