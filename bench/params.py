"""The declared types of a method's parameters: what a matrix's ``[params.<method>]`` table may hold.

A method declares its parameters as a frozen dataclass ``Params`` (``bench.registry.Method``); its fields'
annotations become the checks here (``bool``, ``int``, ``float``, ``str``, ``list``, ``dict``, ``Literal[...]``,
``X | None``, ``Any``), each with the words an error message uses ("true or false", "one of 'minmax', 'mse'").
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple


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
        return value is None or accepts(self.of, value)

    def describe(self) -> str:
        return f"{describe_type(self.of)} (or left unset)"


def toml_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else repr(value)


def accepts(expected: Any, value: Any) -> bool:
    if isinstance(expected, (Choice, OrNone)):
        return expected.accepts(value)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:  # an integer is a float too (TOML's 1 for 1.0)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def describe_type(expected: Any) -> str:
    if isinstance(expected, (Choice, OrNone)):
        return expected.describe()
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(expected, getattr(expected, "__name__", str(expected)))


class ParamField(NamedTuple):
    """One declared parameter of a method (``Method.param_fields``)."""

    type: Any  # what is accepted: bool, int, float (integers too), str, another class, a Choice, an OrNone, None: any
    default: Any
    description: str  # the accepted values in words, as error messages put them ("true or false", ...)


def make_field(kind: Any, default: Any) -> ParamField:
    return ParamField(kind, default, "anything" if kind is None else describe_type(kind))


_NONE_TYPE = type(None)


def type_of_annotation(annotation: Any, where: str) -> Any:
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
            inner = type_of_annotation(others[0], where)
            return None if inner is None else OrNone(inner)
        raise TypeError(f"{where}: {annotation} is not a parameter type (use Literal[...] for a choice of values, "
                        "X | None for an optional one)")
    if origin is not None and isinstance(origin, type):
        return origin
    if isinstance(annotation, type):
        return annotation
    raise TypeError(f"{where}: {annotation!r} is not a parameter type")


def dataclass_fields(params_cls: Any, owner: type) -> dict[str, ParamField]:
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
        kind = type_of_annotation(hints[f.name], f"{where}.{f.name}")
        if kind is not None and not accepts(kind, default):
            raise TypeError(f"{where}.{f.name}: the default {default!r} is not {describe_type(kind)}")
        out[f.name] = make_field(kind, default)
    return out
