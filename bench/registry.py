"""The method registry: the base quantizers and cache schemes a matrix may name, and what each contributes to a cell.

A method is a class registered by name (``register_method``, with optional aliases); the built-in ones live in
``bench.quantizers`` and the baselines' ``method`` modules (``BUILTIN_MODULES``), imported on the first lookup.
The registry knows what a method contributes to a cell: its parameters (checked against the types their
``Params`` declare: ``bench.params``), the settings it fixes and the combinations it refuses
(``BaseQuantizer.normalise`` / ``check``), what it makes of the settings once (``configure``) and what it adds to
the cell's id (``ID_RULES``: its version, the parameters that cannot change its samples). Resolving and building
a cell is ``bench.build``'s, and ``bench.methods`` is the one module a plugin imports. Nothing here loads a model.
"""
from __future__ import annotations

import dataclasses
import importlib
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from modiff.config import GRANULARITIES, NOT_QUANTIZED

from . import cell as cell_record
from .cell import AUTO, NONE, CellSpec, IdRules
from .context import BuildContext, Prepared
from .errors import BenchError
from .params import ParamField, accepts, dataclass_fields, describe_type, make_field


# -- methods and their registry ----------------------------------------------------------------
@dataclass(frozen=True)
class NoParams:
    """The ``Params`` of a method without parameters."""


class Method:
    """Common part of base quantizers and cache schemes.

    Parameters: a frozen dataclass ``Params`` whose fields (each with a default) are the parameters
    a matrix may set in ``[params.<name>]``. Field types: ``bool``, ``int`` (a boolean is not an
    integer), ``float`` (integers accepted), ``str``, ``list``, ``dict``, ``Literal[...]`` (one of
    these values, compared with their type: ``true`` is not ``1``), ``X | None`` (may stay unset)
    and ``Any``. Every table is checked when the matrix is resolved, before anything runs, by
    building ``Params`` from it: a wrongly typed value (``warmup = "false"`` is an error, not a true
    string) or a value ``Params.__post_init__`` refuses (raise ValueError) is a one-line error.
    Values are kept as given (an integer stays an integer in a float field), so a cell's identity
    does not depend on how its parameters are declared.

    ``self.settings`` is the ``Params`` instance; ``self.params`` the same values as a dict, which
    the cell records (``cell.params[<name>]``). ``PARAMS`` (name -> default) and ``PARAM_TYPES``
    (name -> type) are derived from ``Params`` for code that reads them.

    Deprecated, still accepted: declaring ``PARAMS`` (name -> default, the type is the default's)
    and ``PARAM_TYPES`` (a type, :class:`Choice` or :class:`OrNone` where the default does not say
    it) dicts instead of ``Params``; ``register_method`` warns (DeprecationWarning) and
    ``self.settings`` is then a plain namespace."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()  # other names a matrix may use (register_method)
    kind: ClassVar[str] = ""
    Params: ClassVar[type | None] = NoParams  # None for a method declared with PARAMS / PARAM_TYPES dicts
    PARAMS: ClassVar[dict[str, Any]] = {}
    PARAM_TYPES: ClassVar[dict[str, Any]] = {}
    _declared_fields: ClassVar[dict[str, ParamField]] = {}
    _dict_params: ClassVar[type | None] = None  # the class that declared PARAMS / PARAM_TYPES dicts, if any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "resolve" in own:  # the hook of earlier versions, which changed the cell in place
            raise TypeError(f"{cls.__module__}.{cls.__qualname__}.resolve: a method no longer changes the cell; "
                            "override normalise(cell) (returns the normalised copy) and check(cell) (returns why "
                            "the cell is invalid, or None)")
        if "Params" in own:
            if "PARAMS" in own or "PARAM_TYPES" in own:
                raise TypeError(f"{cls.__module__}.{cls.__qualname__} declares both Params and PARAMS/PARAM_TYPES; "
                                "keep the Params dataclass")
            fields = dataclass_fields(cls.Params, cls)
            cls._declared_fields = fields
            cls._dict_params = None
            cls.PARAMS = {key: f.default for key, f in fields.items()}
            cls.PARAM_TYPES = {key: f.type for key, f in fields.items()}
        elif "PARAMS" in own or "PARAM_TYPES" in own:
            cls._dict_params = cls
            cls.Params = None

    @classmethod
    def param_fields(cls) -> dict[str, ParamField]:
        """Each parameter: name -> ``ParamField(type, default, description)``, in declaration order."""
        if cls._dict_params is None:
            return dict(cls._declared_fields)
        types_ = cls.PARAM_TYPES
        return {key: make_field(types_[key] if key in types_ else None if default is None else type(default), default)
                for key, default in cls.PARAMS.items()}

    def __init__(self, params: Mapping[str, Any] | None = None):
        params = dict(params or {})
        self.settings = self.check_params(params)
        self.params = {**self.PARAMS, **params}

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> Any:
        """Known names, declared types, then ``Params`` built from them (BenchError otherwise); run for
        every ``[params.<name>]`` table when a matrix is resolved, whether or not a cell uses the
        method. Returns the built ``Params`` (a namespace for a method declared with dicts)."""
        fields = cls.param_fields()
        unknown = sorted(set(params) - set(fields))
        if unknown:
            known = ", ".join(sorted(fields)) or "none"
            raise BenchError(f"method {cls.name!r} has no parameter {', '.join(map(repr, unknown))} (known: {known})")
        for key, value in params.items():
            expected = fields[key].type
            if expected is not None and not accepts(expected, value):
                hint = ""
                if expected is bool and isinstance(value, str) and value.lower() in ("true", "false"):
                    hint = f" (TOML booleans are lower case, unquoted: {value.lower()})"
                raise BenchError(f"params.{cls.name}.{key} must be {describe_type(expected)}, got {value!r}{hint}")
        if cls.Params is None:
            return types.SimpleNamespace(**{**{key: f.default for key, f in fields.items()}, **params})
        try:
            return cls.Params(**params)
        except (TypeError, ValueError) as exc:  # refused by Params.__post_init__
            raise BenchError(f"params.{cls.name}: {' '.join(str(exc).split())}") from None

    @classmethod
    def version(cls, settings: Mapping[str, Any]) -> int:
        """What this method computes for a cell with ``settings`` (its fields, or a result row), as a
        number: raise it (for the cells concerned) when a fix changes the samples, so those cells get
        new ids and run again (``method_versions``). 1 until then."""
        return 1

    @classmethod
    def id_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` (this method's, as a cell records them) without those that cannot change what the
        cell computes given the others (Q-Diffusion's ``out_penalty`` unless its residual scales are
        learned): what the cell's id hashes (``id_settings``). All of them unless a method says otherwise."""
        return params

    def depends_on(self) -> tuple[str, ...]:
        """Other registered methods this one builds on: their ``[params.<name>]`` become part of
        each cell's parameters (and so of its identity)."""
        return ()

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


class BaseQuantizer(Method):
    """Builds the (fake-)quantized denoiser of a cell."""

    kind: ClassVar[str] = "base"
    granularity: ClassVar[str | None] = None  # the activation granularity the method is defined with
    real_execution: ClassVar[bool] = False  # can run its quantized layers on int8 / fp8 kernels (cell.execution)
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)  # the float precisions it can run in (cell.dtype)

    def normalise(self, cell: CellSpec) -> CellSpec:
        """``cell`` with the settings this method fixes filled in (``a_granularity = "auto"`` becomes the method's
        own): what the cell records and its id hashes. A new record where something changes; never ``cell`` changed."""
        if cell.a_granularity == AUTO:
            return dataclasses.replace(cell, a_granularity=self.granularity or "channel")
        return cell

    def check(self, cell: CellSpec) -> str | None:
        """Why this method cannot run the (normalised) ``cell``, or None: the cell is then skipped with that reason."""
        if cell.execution != "fake" and not self.real_execution:
            return (f"{self.name} has no real low-bit execution (its quantizers run in float only); "
                    f"execution={cell.execution} needs a modiff-wrapped base (ltq, psq, dynamic)")
        if cell.dtype not in self.dtypes:
            return f"{self.name} runs in {', '.join(self.dtypes)} only; dtype={cell.dtype} is not implemented for it"
        if self.granularity and cell.a_granularity != self.granularity:
            return (f"{self.name} quantizes activations {self.granularity}-wise by definition; "
                    f"a_granularity={cell.a_granularity} contradicts it")
        if cell.a_granularity not in GRANULARITIES:
            return f"a_granularity={cell.a_granularity} is not one of {', '.join(GRANULARITIES)}"
        if cell.modulation != "off" and cell.a_bits == NOT_QUANTIZED:
            return "modulation at 32-bit activations is the identity (same samples as modulation=off)"
        if cell.modulation == "off" and cell.a_bits == 0:
            return "a_bits=0 means 'reuse the cached output' and needs modulation plain or ec"
        return None

    def configure(self, cell: CellSpec) -> Any:
        """What ``build`` needs made from the (valid) cell's settings, made once when the cell is resolved and
        handed to ``build`` as ``ctx.config`` (a ``modiff.ModiffConfig``); ValueError / TypeError (naming the
        parameter) for settings the library refuses, which skips the cell. None by default."""
        return None

    def build(self, ctx: BuildContext) -> Prepared:
        raise NotImplementedError

    def device_check(self, cell: CellSpec, device: Any) -> str | None:
        """Why this method cannot run the valid ``cell`` on ``device`` (e.g. no float8 matmul there), or None;
        the runner skips such cells with the reason before anything runs."""
        return None

    def quantizes_attention(self, cell: CellSpec) -> bool:
        """Whether the attention matmuls (QK^T, softmax x V) run quantized in this cell (honest GBops
        charge them at w x a bits then, else at the float width). modiff wraps conv/linear layers only."""
        return False


class CacheMethod(Method):
    """Wraps a built method so that some steps reuse cached features. Matrix values are the
    registered name alone or followed by ``-<argument>`` (``deepcache-u3``)."""

    kind: ClassVar[str] = "cache"

    def __init__(self, value: str, params: dict[str, Any] | None = None):
        super().__init__(params)
        self.value = value
        self.argument = value[len(self.name) + 1:] if value != self.name else ""

    def check(self, cell: CellSpec) -> str | None:
        """Why this scheme cannot run the (normalised) ``cell``, or None."""
        return None

    def apply(self, ctx: BuildContext, prepared: Prepared) -> Prepared:
        raise NotImplementedError


def param_type(method: type[Method], key: str) -> Any:
    """The declared type of a parameter (``ParamField.type``): from the ``Params`` dataclass, or for
    methods declared with dicts ``PARAM_TYPES[key]``, else the type of its default (a default of
    ``None`` declares nothing: any value is accepted)."""
    return method.param_fields()[key].type


REGISTRY: dict[str, type[Method]] = {}


ALIASES: dict[str, str] = {}  # another name a matrix may use -> the registered name (what cells record)


def register_method(name: str, aliases: tuple[str, ...] = ()) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a ``BaseQuantizer`` or ``CacheMethod`` subclass available by ``name``
    in matrix files and ``modiff-bench methods``. ``aliases``: other names a matrix may use for it; a cell
    records ``name`` (its id hashes it), so an alias added later moves no id."""
    for each in (name, *aliases):
        if not each or not all(ch.isalnum() or ch in "_." for ch in each.replace("-", "_")):
            raise ValueError(f"method names are letters, digits, '-', '_' and '.'; got {each!r}")

    def decorate(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, (BaseQuantizer, CacheMethod))):
            raise TypeError(f"@register_method({name!r}) decorates a BaseQuantizer or CacheMethod subclass")
        for each in (name, *aliases):
            existing = REGISTRY.get(ALIASES.get(each, each))
            if existing is not None and existing.__qualname__ != cls.__qualname__:
                raise ValueError(f"method {each!r} is already registered by "
                                 f"{existing.__module__}.{existing.__qualname__}")
        cls.name = name
        cls.aliases = tuple(aliases)
        REGISTRY[name] = cls
        ALIASES.update(dict.fromkeys(aliases, name))
        declared_by = cls._dict_params
        if declared_by is not None:
            warnings.warn(f"method {name!r} declares its parameters with PARAMS/PARAM_TYPES dicts "
                          f"({declared_by.__module__}.{declared_by.__qualname__}), which is deprecated: declare them "
                          "as a frozen dataclass Params (see bench.methods.Method)", DeprecationWarning, stacklevel=2)
        return cls

    return decorate


# Modules that register the built-in methods; imported on first use of the registry. The baselines'
# ``method`` modules are their glue to the harness (the libraries beside them never import bench).
BUILTIN_MODULES = ("bench.quantizers", "baselines.deepcache.method", "baselines.diffusers_cache.method",
                   "baselines.ptqd.method", "baselines.qdiffusion.method", "baselines.modiff_authors_act.method",
                   "baselines.torchao.method")
DICT_PARAMS_WARNING = r"method '.*' declares its parameters with PARAMS/PARAM_TYPES dicts"  # bench.plugins shows it


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:  # by name: they import this module (a plugin's way in), not the other way round
        importlib.import_module(module)


def registered_name(name: str) -> str:
    """The registered name of ``name`` (itself, or what the alias ``name`` stands for)."""
    _load_builtins()
    return ALIASES.get(name, name)


def methods(kind: str | None = None) -> dict[str, type[Method]]:
    _load_builtins()
    return {n: c for n, c in sorted(REGISTRY.items()) if kind is None or c.kind == kind}


def base_quantizer(name: str, params: dict[str, Any] | None = None) -> BaseQuantizer:
    available, name = methods("base"), registered_name(name)
    if name not in available:
        raise BenchError(f"unknown base quantizer {name!r}; available: {', '.join(available)} "
                         "(see 'modiff-bench methods')")
    return available[name](params)


def cache_method(value: str, params_by_method: dict[str, dict[str, Any]] | None = None) -> CacheMethod | None:
    """The cache scheme named by a matrix value; None for ``none``."""
    if value == NONE:
        return None
    available = methods("cache")
    for name, cls in available.items():
        if value == name or value.startswith(name + "-"):
            return cls(value, (params_by_method or {}).get(name))
    names = ", ".join(["none", *available]) if available else "none"
    raise BenchError(f"unknown cache {value!r}; available: {names} (see 'modiff-bench methods')")


# -- what the methods add to a cell's id ------------------------------------------------------------
def method_versions(settings: Mapping[str, Any]) -> dict[str, int]:
    """The versions above 1 of the methods a cell (its fields as a dict, or a result row) uses: its base,
    its cache scheme and every method whose parameters it carries (``depends_on``: PTQD's Q-Diffusion).
    A method raises its version (``Method.version``) when a fix changes what it computes for some cells;
    the version is part of those cells' ids (``id_settings``), so a rerun recomputes exactly them."""
    _load_builtins()
    names = set(settings.get("params") or {}) if isinstance(settings.get("params"), Mapping) else set()
    names.add(str(settings.get("base")))
    cache = str(settings.get("cache", NONE))
    names.update(n for n in REGISTRY if REGISTRY[n].kind == "cache" and (cache == n or cache.startswith(n + "-")))
    out = {}
    for name in sorted(names):
        cls = REGISTRY.get(name)
        version = cls.version(settings) if cls is not None else 1
        if version > 1:
            out[name] = version
    return out


class _RegistryIdRules:
    """The registry's :class:`bench.cell.IdRules`: each method's version and ``id_params``."""

    def versions(self, settings: Mapping[str, Any]) -> dict[str, int]:
        return method_versions(settings)

    def id_params(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        _load_builtins()
        return REGISTRY[method].id_params(params) if method in REGISTRY else params


ID_RULES: IdRules = _RegistryIdRules()


def id_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``bench.cell.id_settings`` under the registered methods: what a cell's id hashes."""
    return cell_record.id_settings(settings, ID_RULES)


def settings_id(settings: Mapping[str, Any]) -> str:
    """``bench.cell.settings_id`` under the registered methods."""
    return cell_record.settings_id(settings, ID_RULES)


def cell_id(cell: CellSpec) -> str:
    """``bench.cell.cell_id`` under the registered methods: the id of a cell of the current code."""
    return cell_record.cell_id(cell, ID_RULES)
