"""The method registry: base quantizers and caching schemes that compose into one sampled model.

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
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import sys
import types
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import nn

import modiff
from modiff.config import COMPUTE_DTYPES, GRANULARITIES, NOT_QUANTIZED, WEIGHT_METHODS
from modiff.config import EXECUTIONS as _EXECUTIONS

from .errors import BenchError
from .samplers import Denoiser, NoiseStd, SamplerConfig
from .zoo import ZooModel

# Settings added after run directories existed: at these values they stay out of a cell's id (bench.matrix.cell_id),
# so the cells of older runs keep their ids and resume.
LATER_DEFAULTS: dict[str, Any] = {"execution": "fake", "dtype": "float32", "memory_format": "contiguous"}
TORCH_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
MEMORY_FORMATS = tuple(TORCH_MEMORY_FORMATS)
LATER_PARAM_DEFAULTS: dict[str, Any] = {"weight_symmetric": None, "compile": False,  # method parameters added later
                                        "authors_grid": False, "out_penalty": 0.0, "act_symmetric": False,
                                        "act_init_samples": 0, "act_init_pick": "random", "running_stat": False,
                                        "regularize_both_halves": False}
EXECUTIONS = _EXECUTIONS
DTYPES = COMPUTE_DTYPES


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


def id_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (a cell's fields as a dict, or a result row) without the settings and method
    parameters added later that sit at their defaults: what a cell's id hashes, so that cells made
    before those existed keep their ids."""
    out = {k: v for k, v in settings.items() if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}
    later = LATER_PARAM_DEFAULTS
    if isinstance(out.get("params"), dict):
        _load_builtins()
        params = {}
        for m, p in out["params"].items():
            if isinstance(p, dict):
                if m in REGISTRY:  # the method's parameters that cannot change this cell stay out of its id
                    p = REGISTRY[m].id_params(p)
                kept = {k: v for k, v in p.items() if k not in later or v != later[k]}
                if p and not kept:  # only parameters added later, at their defaults (fp's compile): as before
                    continue
                p = kept
            params[m] = p
        out["params"] = params
    versions = method_versions(settings)
    if versions:  # a method changed what it computes: its cells get new ids (and run again)
        out["method_versions"] = versions
    else:
        out.pop("method_versions", None)
    return out


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
AUTO = "auto"  # a_granularity: the base quantizer's own (or channel for the generic one)
NONE = "none"  # a_granularity of unquantized activations; the empty cache


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
    dtype: str = "float32"  # float32 | bfloat16: the precision of what is not quantized, and of full precision
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


def metric_reference(cell: CellSpec) -> CellSpec:
    """The cell whose full-precision samples ``psnr_to_fp`` / ``mse_to_fp`` compare with: float32 in the
    contiguous layout, so that a BF16 (or channels-last) cell's quality includes what BF16 (or the
    layout) itself costs; such full-precision cells keep their own samples, under their own reference key."""
    return dataclasses.replace(cell, dtype="float32", memory_format="contiguous")


@dataclass
class BuildContext:
    """What a method may use to build its denoiser. ``model`` is full precision and shared by all
    cells: copy before modifying (``fp_unet_copy``). ``cache_dir`` (None: no disk cache) is where
    expensive, reusable preparation (calibration data, calibrated models) may be kept; a method
    keys what it stores there by everything the stored result depends on."""

    model: ZooModel
    cell: CellSpec
    sampler: SamplerConfig
    device: torch.device
    progress: bool = False
    cache_dir: Path | None = None

    def fp_unet_copy(self) -> nn.Module:
        """A copy of the full-precision UNet, in the cell's memory format (its weights laid out so)."""
        unet = copy.deepcopy(self.model.unet)
        return unet if self.cell.memory_format == "contiguous" else unet.to(memory_format=torch.channels_last)


@dataclass
class Prepared:
    """A built method: the UNet to sample with, an optional wrapper of its denoiser (e.g. a noise
    correction), callbacks run once per batch before the first step, an optional replacement of the
    sampler's fresh-noise std (``bench.samplers.NoiseStd``), and facts to record."""

    unet: nn.Module
    wrap: Callable[[Denoiser], Denoiser] | None = None
    on_trajectory_start: list[Callable[[], None]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    mac_fraction: float = 1.0  # share of the full UNet's MACs one network evaluation runs on average (caching < 1)
    noise_std: NoiseStd | None = None
    # the zoo model's adapter of a UNet to ``(x_t, t) -> eps`` (guidance, conditioning); set by ``build``
    make_denoiser: Callable[[nn.Module], Denoiser] | None = None

    def denoiser(self) -> Denoiser:
        """The UNet as a sampler's denoiser, with the method's wrapper applied."""
        from .zoo import unet_denoiser

        denoiser = (self.make_denoiser or unet_denoiser)(self.unet)
        return self.wrap(denoiser) if self.wrap is not None else denoiser

    def start_trajectory(self) -> None:
        """Run the per-trajectory callbacks: once per batch, before its first step."""
        for callback in self.on_trajectory_start:
            callback()


class Choice(tuple):
    """A parameter type: one of these values (compared with their type, so ``true`` is not ``1``)."""

    def __new__(cls, *values: Any):
        return super().__new__(cls, values)

    def accepts(self, value: Any) -> bool:
        return any(type(value) is type(v) and value == v for v in self)

    def describe(self) -> str:
        return "one of " + ", ".join(toml_value(v) for v in self)


@dataclass(frozen=True)
class OrNone:
    """A parameter type: ``None`` (the default meaning "not set") or a value of ``of``."""

    of: Any

    def accepts(self, value: Any) -> bool:
        return value is None or _accepts(self.of, value)

    def describe(self) -> str:
        return f"{_describe_type(self.of)} (or left unset)"


def toml_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else repr(value)


def _accepts(expected: Any, value: Any) -> bool:
    if isinstance(expected, (Choice, OrNone)):
        return expected.accepts(value)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:  # an integer is a float too (TOML's 1 for 1.0)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe_type(expected: Any) -> str:
    if isinstance(expected, (Choice, OrNone)):
        return expected.describe()
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(expected, getattr(expected, "__name__", str(expected)))


class ParamField(NamedTuple):
    """One declared parameter of a method (``Method.param_fields``)."""

    type: Any  # what is accepted: bool, int, float (integers too), str, another class, a Choice, an OrNone, None: any
    default: Any
    description: str  # the accepted values in words, as error messages put them ("true or false", ...)


def param_type(method: type[Method], key: str) -> Any:
    """The declared type of a parameter (``ParamField.type``): from the ``Params`` dataclass, or for
    methods declared with dicts ``PARAM_TYPES[key]``, else the type of its default (a default of
    ``None`` declares nothing: any value is accepted)."""
    return method.param_fields()[key].type


def _field(kind: Any, default: Any) -> ParamField:
    return ParamField(kind, default, "anything" if kind is None else _describe_type(kind))


_NONE_TYPE = type(None)


def _type_of_annotation(annotation: Any, where: str) -> Any:
    """The check of a ``Params`` field's annotation: ``Literal[...]`` -> Choice, ``X | None`` ->
    OrNone(X), ``Any`` -> None (anything), ``list[int]`` -> list (the container only), a class -> itself."""
    if annotation is Any:
        return None
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return Choice(*typing.get_args(annotation))
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(annotation)
        others = [a for a in args if a is not _NONE_TYPE]
        if len(others) == 1 and len(args) == 2:
            inner = _type_of_annotation(others[0], where)
            return None if inner is None else OrNone(inner)
        raise TypeError(f"{where}: {annotation} is not a parameter type (use Literal[...] for a choice of values, "
                        "X | None for an optional one)")
    if origin is not None and isinstance(origin, type):
        return origin
    if isinstance(annotation, type):
        return annotation
    raise TypeError(f"{where}: {annotation!r} is not a parameter type")


def _dataclass_fields(params_cls: Any, owner: type) -> dict[str, ParamField]:
    """The fields of a method's ``Params`` (TypeError for a declaration the harness cannot check)."""
    where = f"{owner.__module__}.{owner.__qualname__}.Params"
    if not (isinstance(params_cls, type) and dataclasses.is_dataclass(params_cls)):
        raise TypeError(f"{where} must be a dataclass: @dataclass(frozen=True) class Params: ...")
    if not params_cls.__dataclass_params__.frozen:
        raise TypeError(f"{where} must be frozen: @dataclass(frozen=True)")
    try:
        hints = typing.get_type_hints(params_cls)
    except Exception as exc:  # an annotation that names something undefined
        raise TypeError(f"{where}: cannot resolve its annotations ({type(exc).__name__}: {exc})") from None
    out = {}
    for f in dataclasses.fields(params_cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"{where}.{f.name} needs a default (a matrix may leave any parameter unset)")
        kind = _type_of_annotation(hints[f.name], f"{where}.{f.name}")
        if kind is not None and not _accepts(kind, default):
            raise TypeError(f"{where}.{f.name}: the default {default!r} is not {_describe_type(kind)}")
        out[f.name] = _field(kind, default)
    return out


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
    kind: ClassVar[str] = ""
    Params: ClassVar[type | None] = NoParams  # None for a method declared with PARAMS / PARAM_TYPES dicts
    PARAMS: ClassVar[dict[str, Any]] = {}
    PARAM_TYPES: ClassVar[dict[str, Any]] = {}
    _declared_fields: ClassVar[dict[str, ParamField]] = {}
    _dict_params: ClassVar[type | None] = None  # the class that declared PARAMS / PARAM_TYPES dicts, if any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "Params" in own:
            if "PARAMS" in own or "PARAM_TYPES" in own:
                raise TypeError(f"{cls.__module__}.{cls.__qualname__} declares both Params and PARAMS/PARAM_TYPES; "
                                "keep the Params dataclass")
            fields = _dataclass_fields(cls.Params, cls)
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
        return {key: _field(types_[key] if key in types_ else None if default is None else type(default), default)
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
            if expected is not None and not _accepts(expected, value):
                hint = ""
                if expected is bool and isinstance(value, str) and value.lower() in ("true", "false"):
                    hint = f" (TOML booleans are lower case, unquoted: {value.lower()})"
                raise BenchError(f"params.{cls.name}.{key} must be {_describe_type(expected)}, got {value!r}{hint}")
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

    def resolve(self, cell: CellSpec) -> str | None:
        """Normalise ``cell`` in place; return why the combination is invalid, or None."""
        if cell.execution != "fake" and not self.real_execution:
            return (f"{self.name} has no real low-bit execution (its quantizers run in float only); "
                    f"execution={cell.execution} needs a modiff-wrapped base (ltq, psq, dynamic)")
        if cell.dtype not in self.dtypes:
            return f"{self.name} runs in {', '.join(self.dtypes)} only; dtype={cell.dtype} is not implemented for it"
        if cell.a_granularity == AUTO:
            cell.a_granularity = self.granularity or "channel"
        elif self.granularity and cell.a_granularity != self.granularity:
            return (f"{self.name} quantizes activations {self.granularity}-wise by definition; "
                    f"a_granularity={cell.a_granularity} contradicts it")
        if cell.a_granularity not in GRANULARITIES:
            return f"a_granularity={cell.a_granularity} is not one of {', '.join(GRANULARITIES)}"
        if cell.modulation != "off" and cell.a_bits == NOT_QUANTIZED:
            return "modulation at 32-bit activations is the identity (same samples as modulation=off)"
        if cell.modulation == "off" and cell.a_bits == 0:
            return "a_bits=0 means 'reuse the cached output' and needs modulation plain or ec"
        return None

    def build(self, ctx: BuildContext) -> Prepared:
        raise NotImplementedError

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

    def resolve(self, cell: CellSpec) -> str | None:
        return None

    def apply(self, ctx: BuildContext, prepared: Prepared) -> Prepared:
        raise NotImplementedError


REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a ``BaseQuantizer`` or ``CacheMethod`` subclass available by ``name``
    in matrix files and ``modiff-bench methods``."""
    if not name or not all(ch.isalnum() or ch in "_." for ch in name.replace("-", "_")):
        raise ValueError(f"method names are letters, digits, '-', '_' and '.'; got {name!r}")

    def decorate(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, (BaseQuantizer, CacheMethod))):
            raise TypeError(f"@register_method({name!r}) decorates a BaseQuantizer or CacheMethod subclass")
        existing = REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"method {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        REGISTRY[name] = cls
        declared_by = cls._dict_params
        if declared_by is not None:
            warnings.warn(f"method {name!r} declares its parameters with PARAMS/PARAM_TYPES dicts "
                          f"({declared_by.__module__}.{declared_by.__qualname__}), which is deprecated: declare them "
                          "as a frozen dataclass Params (see bench.methods.Method)", DeprecationWarning, stacklevel=2)
        return cls

    return decorate


# Modules that register the built-in methods; imported on first use of the registry. The baselines'
# ``method`` modules are their glue to the harness (the libraries beside them never import bench).
BUILTIN_MODULES = ("bench.methods", "baselines.deepcache.method", "baselines.ptqd.method",
                   "baselines.qdiffusion.method", "baselines.authors.method")
_DICT_PARAMS_WARNING = r"method '.*' declares its parameters with PARAMS/PARAM_TYPES dicts"


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def import_plugins(specs: list[str] | tuple[str, ...], base_dir: Path | None = None) -> None:
    """Import user modules that register methods: dotted module names or paths to .py files
    (relative paths are taken from ``base_dir``, the matrix file's folder, then the cwd). Whatever
    goes wrong, including an exception raised by the module's own code, is a one-line BenchError.
    A method that still declares its parameters with dicts is reported (DeprecationWarning, shown)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("default", message=_DICT_PARAMS_WARNING, category=DeprecationWarning)
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


def methods(kind: str | None = None) -> dict[str, type[Method]]:
    _load_builtins()
    return {n: c for n, c in sorted(REGISTRY.items()) if kind is None or c.kind == kind}


def base_quantizer(name: str, params: dict[str, Any] | None = None) -> BaseQuantizer:
    available = methods("base")
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


def build(ctx: BuildContext) -> Prepared:
    """Build a cell's denoiser: its base quantizer, then its cache scheme."""
    cell = ctx.cell
    prepared = base_quantizer(cell.base, cell.params.get(cell.base)).build(ctx)
    if prepared.make_denoiser is None:
        prepared.make_denoiser = ctx.model.denoiser
    if cell.dtype != "float32" or cell.memory_format != "contiguous":  # before a cache scheme runs the model
        if prepared.unet is ctx.model.unet:
            raise BenchError(f"{cell.base}: dtype={cell.dtype}, memory_format={cell.memory_format} needs its own "
                             "copy of the model (the shared model is left as it is)")
        _adapt_io(prepared.unet, getattr(torch, cell.dtype), TORCH_MEMORY_FORMATS[cell.memory_format])
    cache = cache_method(cell.cache, cell.params)
    if cache is not None:
        prepared = cache.apply(ctx, prepared)
    return prepared


def _adapt_io(unet: nn.Module, dtype: torch.dtype, memory_format: torch.memory_format) -> None:
    """Feed a UNet that runs in ``dtype`` and ``memory_format`` from the float32 samplers: its image and
    conditioning inputs are cast to ``dtype`` (never the timestep), a 4-D image input laid out in
    ``memory_format``, and its output cast back to float32."""

    def cast(value: Any) -> Any:
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            return value
        value = value.to(dtype)
        return value.contiguous(memory_format=memory_format) if value.dim() == 4 else value

    def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = (cast(args[0]), *args[1:]) if args else args
        return args, {k: v if k == "timestep" else cast(v) for k, v in kwargs.items()}

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return output.float()
        if isinstance(output, tuple):
            return tuple(o.float() if isinstance(o, torch.Tensor) else o for o in output)
        if hasattr(output, "sample"):  # diffusers' UNet2DOutput / UNet2DConditionOutput
            output.sample = output.sample.float()
        return output

    unet.register_forward_pre_hook(before, with_kwargs=True)
    unet.register_forward_hook(after, with_kwargs=True)


# --------------------------------------------------------------------------------------------
# Built-in base quantizers
# --------------------------------------------------------------------------------------------
@register_method("fp")
class FullPrecision(BaseQuantizer):
    """The full-precision model: 32-bit weights and activations, nothing wrapped (optionally compiled)."""

    @dataclass(frozen=True)
    class Params:
        # torch.compile the UNet (inductor; compiled in the untimed warm-up): the strongest float baseline
        compile: bool = False

    dtypes: ClassVar[tuple[str, ...]] = DTYPES

    def resolve(self, cell: CellSpec) -> str | None:
        cell.w_bits = cell.a_bits = NOT_QUANTIZED
        cell.modulation, cell.a_granularity = "off", NONE
        if cell.execution != "fake":
            return f"the fp base quantizes nothing: execution={cell.execution} has nothing to run on low-bit kernels"
        return None

    def build(self, ctx: BuildContext) -> Prepared:
        if ctx.cell.dtype == "float32" and ctx.cell.memory_format == "contiguous" and not self.settings.compile:
            return Prepared(unet=ctx.model.unet)
        # nn.Module.to: diffusers' own .to() warns about casting when it has nothing to keep in float32
        unet = nn.Module.to(ctx.fp_unet_copy(), getattr(torch, ctx.cell.dtype))
        if self.settings.compile:
            unet.compile()  # in place: the module keeps its names (traces, MAC counts); compiles on first call
        return Prepared(unet=unet, info={"compiled": True} if self.settings.compile else {})


@register_method("dynamic")
class DynamicQuantizer(BaseQuantizer):
    """Min-max fake quantization with dynamic activation scales at any a_granularity (auto: channel)."""

    @dataclass(frozen=True)
    class Params:
        symmetric: bool = False  # symmetric (zero-point-free) activation grid
        warmup: bool = True  # the first step of a trajectory in full precision (modulated modes)
        weight_method: Literal["minmax", "mse"] = "minmax"  # modiff.config.WEIGHT_METHODS
        residual_tolerance: float | None = None  # adaptive caching: reuse the output below this residual range
        # symmetric per-output-channel weights; unset: on for int8 / fp8 execution (their kernels need it), off for
        # fake. Set it to true on fake cells to compare them with int8 cells on the same weight grid.
        weight_symmetric: bool | None = None
        compile: bool = False  # fuse the quantizers' elementwise passes with torch.compile (ModiffConfig.compile)

    real_execution: ClassVar[bool] = True
    dtypes: ClassVar[tuple[str, ...]] = DTYPES

    @classmethod
    def version(cls, settings: Mapping[str, Any]) -> int:
        # 2: sample-channel scales on 2-D inputs (the time-embedding MLP) are per sample, no longer per element
        return 2 if settings.get("a_granularity") == "sample-channel" else 1

    def modiff_options(self) -> dict[str, Any]:
        """Extra ``ModiffConfig`` fields; subclasses override this to vary the quantizer."""
        return dict(self.params)

    def resolve(self, cell: CellSpec) -> str | None:
        reason = super().resolve(cell)
        if reason is None:
            try:  # what only this combination gets wrong (channel scales, > 8 bits, fp8 bit widths, a_bits 0
                # without warm-up)
                self.config(cell)
            except BenchError as exc:
                reason = str(exc)
        return reason

    def config(self, cell: CellSpec) -> modiff.ModiffConfig:
        options = self.modiff_options()
        if options.get("weight_symmetric", False) is None:
            options["weight_symmetric"] = cell.execution != "fake"
        if cell.execution == "fp8":
            options.update(number_format="fp8", symmetric=True)
        try:
            return modiff.ModiffConfig(w_bits=cell.w_bits, a_bits=cell.a_bits, modulation=cell.modulation,
                                       granularity=cell.a_granularity, execution=cell.execution,
                                       compute_dtype=cell.dtype, **options)
        except (TypeError, ValueError) as exc:
            raise BenchError(f"{self.name}: {exc}") from None

    def build(self, ctx: BuildContext) -> Prepared:
        config = self.config(ctx.cell)
        unet = modiff.quantize(ctx.fp_unet_copy(), config)
        return Prepared(unet=unet, on_trajectory_start=[lambda: modiff.reset(unet)],
                        info={"quantized_layers": len(modiff.quant_layers(unet))})


assert DynamicQuantizer.param_fields()["weight_method"].type == Choice(*WEIGHT_METHODS)


@register_method("ltq")
class LTQ(DynamicQuantizer):
    """Layer(tensor)-wise dynamic activation scales: one per layer input for the whole batch (the paper's "LTQ" rows ran paper-ltq)."""  # noqa: E501

    granularity = "tensor"


@register_method("lcq")
class LCQ(DynamicQuantizer):
    """Channel-wise dynamic activation scales over batch and space (the paper's "LCQ" rows ran paper-lcq)."""

    granularity = "channel"


@register_method("psq")
class PSQ(DynamicQuantizer):
    """Per-sample dynamic activation scales: each image's result is independent of its batch."""

    granularity = "sample"
