"""The zoo's registry: one :class:`ZooEntry` per model name, declared beside its loader.

An entry says what the harness needs to know about a model before (or without) loading its weights:

- ``load(checkpoint or None) -> ZooModel`` (see :mod:`bench.zoo.model`);
- ``train_timesteps``: T of the training schedule; a matrix's ``steps`` are checked against it before anything runs
  (``--dry-run`` too), and the loaded model's schedule is checked again;
- ``description``: one line for ``modiff-bench models``;
- ``output_size``: ``(height, width)`` of the decoded images, the size reference images are brought to;
- ``reference``: the real data its Inception metrics (FID, sFID, precision / recall) compare against
  (:class:`ReferenceData`, read by :mod:`bench.references`);
- ``family``: ``"unet"`` or ``"transformer"``, the kind of denoiser; reports lay out a transformer's results as the
  DiT quantization papers do.

The built-in entries register themselves with :func:`register_model` in their own modules (``bench.zoo.digits``,
``bench.zoo.ddpm_cifar10``, ``bench.zoo.ldm``, ``bench.zoo.sd``, ``bench.zoo.sdxl``), which ``bench.zoo`` imports; a
plugin module named in a matrix's ``run.imports`` can register more the same way. A name with a scheme prefix
(``diffusers:<directory or hub id>``) is not registered one by one: :func:`register_scheme` maps the prefix to a
function that builds the entry from the rest of the name (``bench.zoo.generic``), reading only config files.

``MODELS``, ``TRAIN_TIMESTEPS`` and ``DESCRIPTIONS`` are read-only views of the registered names (live: a model
registered later shows up in them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BenchError

if TYPE_CHECKING:
    from .model import ZooModel

Loader = Callable[[Path | None], "ZooModel"]
FAMILIES = ("unet", "transformer")


@dataclass(frozen=True)
class ReferenceData:
    """The real images a model's Inception metrics compare against, unless ``[inception] reference_images`` or
    ``reference_stats`` names other data.

    ``dataset``: a reference set :mod:`bench.references` provides (``bench.references.DATASETS``: ``"digits-train"``,
    ``"cifar10-train"``); None when there is none to provide (data that is not redistributable, or a model without a
    known training set). ``about``: what the real images are, named in the reason the metrics give when there is no
    reference (e.g. ``"LSUN Churches, church_outdoor train"``)."""

    dataset: str | None = None
    about: str = ""


@dataclass(frozen=True)
class ZooEntry:
    """A model of the zoo; see the module docstring."""

    name: str
    load: Loader
    train_timesteps: int
    description: str
    output_size: tuple[int, int]  # (height, width) of the decoded images
    reference: ReferenceData = field(default_factory=ReferenceData)
    family: str = "unet"  # the kind of denoiser: one of FAMILIES

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a zoo entry needs a name, got {self.name!r}")
        if not callable(self.load):
            raise TypeError(f"zoo entry {self.name!r}: load must be callable, got {self.load!r}")
        if not isinstance(self.train_timesteps, int) or isinstance(self.train_timesteps, bool) \
                or self.train_timesteps < 1:
            raise ValueError(f"zoo entry {self.name!r}: train_timesteps must be a positive int, "
                             f"got {self.train_timesteps!r}")
        size = tuple(self.output_size) if isinstance(self.output_size, (tuple, list)) else ()
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise ValueError(f"zoo entry {self.name!r}: output_size must be (height, width), got {self.output_size!r}")
        object.__setattr__(self, "output_size", size)
        if self.family not in FAMILIES:
            raise ValueError(f"zoo entry {self.name!r}: family must be one of {', '.join(FAMILIES)}, "
                             f"got {self.family!r}")
        if not isinstance(self.reference, ReferenceData):
            raise TypeError(f"zoo entry {self.name!r}: reference must be a ReferenceData, got {self.reference!r}")


# name -> entry, in registration order (the order 'modiff-bench models' lists them in)
_ENTRIES: dict[str, ZooEntry] = {}
# prefix -> (build the entry from what follows "prefix:", how to write such a name, one line for the listing)
_SCHEMES: dict[str, tuple[Callable[[str], ZooEntry], str, str]] = {}


def _same_loader(a: Callable, b: Callable) -> bool:
    """The same function, possibly from a module imported again (a plugin file read by a second matrix)."""
    def key(f) -> tuple:
        return getattr(f, "__module__", None), getattr(f, "__qualname__", None)

    return a is b or (key(a) == key(b) and key(a)[1] is not None)


def register_model(entry: ZooEntry) -> ZooEntry:
    """Add ``entry`` under its name. Registering a name again is an error unless it is the same loader (a module
    imported twice), which replaces the entry. Names may not contain ':' (reserved for schemes) or whitespace."""
    if not isinstance(entry, ZooEntry):
        raise TypeError(f"register_model takes a ZooEntry, got {entry!r}")
    if ":" in entry.name or any(ch.isspace() for ch in entry.name):
        raise ValueError(f"model names may not contain ':' or whitespace; got {entry.name!r}")
    existing = _ENTRIES.get(entry.name)
    if existing is not None and not _same_loader(existing.load, entry.load):
        raise ValueError(f"model {entry.name!r} is already registered by "
                         f"{existing.load.__module__}.{existing.load.__qualname__}")
    _ENTRIES[entry.name] = entry
    return entry


def register_scheme(prefix: str, make_entry: Callable[[str], ZooEntry], usage: str, description: str = "") -> None:
    """Names ``prefix:<rest>`` resolve to ``make_entry(rest)``, which reads what it needs (configs, not weights) and
    raises a one-line BenchError for anything unusable. ``usage``: how to write such a name (error messages, the
    listing); ``description``: one line for the listing."""
    if not prefix or ":" in prefix or any(ch.isspace() for ch in prefix):
        raise ValueError(f"a scheme prefix is a word without ':' or whitespace; got {prefix!r}")
    _SCHEMES[prefix] = (make_entry, usage, description)


def model_names() -> list[str]:
    """The registered names (not the scheme-built ones), in registration order."""
    return list(_ENTRIES)


def scheme_usages() -> list[str]:
    return [usage for _, usage, _ in _SCHEMES.values()]


def schemes() -> dict[str, str]:
    """How to write each scheme's names -> its one-line description (for 'modiff-bench models')."""
    return {usage: description for _, usage, description in _SCHEMES.values()}


def _available() -> str:
    return ", ".join([*sorted(_ENTRIES), *(f"or {usage}" for usage in scheme_usages())])


def model_entry(name: str) -> ZooEntry:
    """The entry of a registered name, or the one a scheme builds for ``prefix:<rest>``; anything else is a
    one-line BenchError naming what is available."""
    if not isinstance(name, str):
        raise BenchError(f"a model name is a string, got {name!r}")
    entry = _ENTRIES.get(name)
    if entry is not None:
        return entry
    prefix, colon, rest = name.partition(":")
    if colon and prefix in _SCHEMES:
        make_entry, usage, _ = _SCHEMES[prefix]
        if not rest.strip():
            raise BenchError(f"model {name!r} names nothing after '{prefix}:'; write {usage}")
        return make_entry(rest)
    raise BenchError(f"unknown model {name!r}; available: {_available()}")


class _View(Mapping):
    """A read-only, live view of the registered entries: name -> ``get(entry)``."""

    def __init__(self, get: Callable[[ZooEntry], Any], what: str):
        self._get = get
        self._what = what

    def __getitem__(self, name: str):
        return self._get(_ENTRIES[name])

    def __iter__(self) -> Iterator[str]:
        return iter(list(_ENTRIES))

    def __len__(self) -> int:
        return len(_ENTRIES)

    def __repr__(self) -> str:
        return f"<{self._what}: {', '.join(_ENTRIES)}>"


def _constant(value: int) -> Callable[[], int]:
    return lambda: value


# name -> loader(checkpoint or None) -> ZooModel
MODELS: Mapping[str, Loader] = _View(lambda e: e.load, "zoo loaders")
# name -> () -> the training schedule's T, known without loading the weights
TRAIN_TIMESTEPS: Mapping[str, Callable[[], int]] = _View(lambda e: _constant(e.train_timesteps), "zoo train T")
# name -> one line for 'modiff-bench models'
DESCRIPTIONS: Mapping[str, str] = _View(lambda e: e.description, "zoo descriptions")
