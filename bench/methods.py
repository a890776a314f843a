"""What a plugin imports to add a method: base quantizers and caching schemes that compose into one sampled model.

A cell of a matrix names a base quantizer (``fp``, ``ltq``, ``lcq``, ``psq``, ``dynamic``, and the
baselines as they land), a modulation (``off`` | ``plain`` | ``ec``) and a cache (``none``, ...).
The base quantizer builds the denoiser for the cell's bit widths and modulation; the cache scheme
then wraps what the base built. A new method is one module:

    from bench.methods import DynamicQuantizer, register_method

    @register_method("lcq-sym")
    class SymmetricLCQ(DynamicQuantizer):
        '''LCQ with a symmetric (zero-point-free) activation grid.'''
        granularity = "channel"
        def modiff_options(self):
            return {**super().modiff_options(), "symmetric": True}

Matrix files load such modules with ``[run] imports = ["my_module"]`` (a module name or a .py
path); ``modiff-bench methods --import my_module`` lists them.

Each method may declare its parameters as a frozen dataclass ``Params`` (fields with types and
defaults; enums as ``Literal[...]``, "unset" as ``X | None = None``); a matrix sets them in
``[params.<name>]``, the harness checks each table by building that dataclass, and they become part
of the cell's identity:

    @register_method("lcq-clip")
    class ClippedLCQ(LCQ):
        @dataclass(frozen=True)
        class Params(LCQ.Params):
            clip: float = 3.0
            mode: Literal["hard", "soft"] = "hard"

``self.settings`` is the built ``Params``; ``self.params`` the same values as a dict (what the
cell records). The older ``PARAMS`` (name -> default) and ``PARAM_TYPES`` dicts keep working, with
a DeprecationWarning when such a method is registered.

A base quantizer may also fix settings of the cells it runs (``normalise``: a copy of the cell, e.g. its own
activation granularity for ``auto``), refuse combinations (``check``: the reason, or None) and make what its
``build`` needs from the settings once, when the cell is resolved (``configure``: ``ctx.config`` in ``build``).

The names come from where they live: the cell record (``bench.cell``), the registry (``bench.registry``, parameter
types in ``bench.params``), what a method gets and gives (``bench.context``), resolving and building a cell
(``bench.build``), the built-in quantizers (``bench.quantizers``) and the plugin loader (``bench.plugins``).
"""

from __future__ import annotations

from modiff.config import EXECUTIONS

from .build import TORCH_MEMORY_FORMATS, ResolvedCell, build, resolve_cell
from .cell import (
    AUTO,
    LATER_DEFAULTS,
    LATER_PARAM_DEFAULTS,
    MEMORY_FORMATS,
    NONE,
    CellSpec,
    fp_reference_cell,
    is_compiled,
    later_settings,
)
from .context import BuildContext, Prepared
from .params import Choice, OrNone, ParamField, toml_value
from .plugins import import_plugins
from .quantizers import DTYPES, LCQ, LTQ, PSQ, DynamicQuantizer, FullPrecision
from .registry import (
    BUILTIN_MODULES,
    REGISTRY,
    BaseQuantizer,
    CacheMethod,
    Method,
    NoParams,
    base_quantizer,
    cache_method,
    id_settings,
    method_versions,
    methods,
    param_type,
    register_method,
)

__all__ = [
    "AUTO", "BUILTIN_MODULES", "DTYPES", "EXECUTIONS", "LATER_DEFAULTS", "LATER_PARAM_DEFAULTS", "LCQ", "LTQ",
    "MEMORY_FORMATS", "NONE", "PSQ", "REGISTRY", "TORCH_MEMORY_FORMATS", "BaseQuantizer", "BuildContext",
    "CacheMethod", "CellSpec", "Choice", "DynamicQuantizer", "FullPrecision", "Method", "NoParams", "OrNone",
    "ParamField", "Prepared", "ResolvedCell", "base_quantizer", "build", "cache_method", "fp_reference_cell",
    "id_settings", "import_plugins", "is_compiled", "later_settings", "method_versions", "methods", "param_type",
    "register_method", "resolve_cell", "toml_value",
]
