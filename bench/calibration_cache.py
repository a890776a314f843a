"""The disk cache of calibration products under a run's ``cache/`` folder (Q-Diffusion's calibration
data, weights and step sizes, PTQD's statistics), written and read in one place.

    cache = DiskCache(ctx.cache_dir, "qdiff")          # <cache_dir>/qdiff/<name>.pt; None: no cache
    name = f"data-{key(description, 16)}"               # key: sha256 of the description's JSON
    value = cache.load(name, check=as_dict)             # None: absent, or damaged (a note is logged)
    if value is None:
        value = make()
        cache.save(name, value)                         # atomic: never a half-written file

A description names everything the product depends on (a JSON-able dict; other values count by
``str``), and a format number its owner bumps when what it stores changes meaning. Files are read
with ``torch.load(weights_only=True)``: tensors and plain containers only, no pickled code runs.
A file that does not load or that ``check`` refuses (truncated, garbage, a pickle with code, an
older layout) is a miss: the product is made again and overwrites it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .provenance import write_atomic

__all__ = ["DiskCache", "as_dict", "key"]

_log = logging.getLogger(__name__)


def key(description: Any, length: int = 64) -> str:
    """The first ``length`` hex digits of the sha256 of ``description`` as canonical JSON (sorted keys,
    values JSON cannot hold written with ``str``)."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


class DiskCache:
    """Files ``<root>/<namespace>/<name>.pt``. ``root`` None switches caching off: ``file`` is None,
    ``load`` misses and ``save`` does nothing. ``log`` receives the one-line note about a damaged
    file (default: a warning on the ``bench.calibration_cache`` logger)."""

    def __init__(self, root: str | os.PathLike | None, namespace: str, log: Callable[[str], None] | None = None):
        self.root = None if root is None else Path(root)
        self.namespace = namespace
        self.log = log or _log.warning

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def file(self, name: str) -> Path | None:
        """Where ``name`` is stored (None when caching is off)."""
        return None if self.root is None else self.root / self.namespace / f"{name}.pt"

    def load(self, name: str, check: Callable[[Any], Any] | None = None, map_location: Any = None) -> Any | None:
        """The stored value (``check(value)`` of it when given: it may convert, and raise to refuse), or
        None when caching is off, the file is absent, or it is damaged (logged; it will be overwritten)."""
        path = self.file(name)
        if path is None or not path.is_file():
            return None
        try:
            value = torch.load(path, map_location=map_location, weights_only=True)
            return value if check is None else check(value)
        except Exception as exc:  # unreadable, unsafe or refused: a miss
            self.log(f"cache: ignoring {path} ({' '.join(f'{type(exc).__name__}: {exc}'.split())[:200]}); "
                     "computing it again")
            return None

    def save(self, name: str, value: Any) -> None:
        """Store ``value`` (tensors and plain containers) atomically; nothing when caching is off."""
        path = self.file(name)
        if path is not None:
            write_atomic(path, lambda tmp: torch.save(value, tmp))


def as_dict(value: Any) -> dict:
    """A ``check`` for ``DiskCache.load``: the stored value must be a dict."""
    if not isinstance(value, dict):
        raise TypeError(f"expected a dict, found {type(value).__name__}")
    return value
