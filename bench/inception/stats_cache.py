"""The on-disk cache of the reference side's statistics and features.

Statistics computed from a reference's images are cached under ``cache_dir``, one file per reference
name, extractor, weights file (the first 16 hex digits of its sha256) and data identity (the first 16
hex digits of the sha256 of the reference's ``identity``: a content hash or a file listing), so neither
a changed weights file nor changed data reuses stale statistics. Each file is an ``.npz`` with a JSON
``meta`` entry (reference, identity, image count, extractor, weights path and SHA-256, cache format),
written atomically and read with ``allow_pickle=False``: an unreadable or tampered file is a cache
miss (recomputed and rewritten), never unpickled.
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from ..provenance import sha256_file, write_atomic
from .settings import InceptionSettings


class CachedReference(Protocol):
    """What the cache reads of a reference set (a :class:`bench.inception.reference.ReferenceSet`): its name,
    its data identity and its key. Declared here so this module needs nothing from ``reference``."""

    @property
    def name(self) -> str: ...

    @property
    def identity(self) -> str | Callable[[], str]: ...

    def key(self) -> str: ...


_CACHE_FORMAT = "v2"  # bump when what goes into the cached statistics or their key changes


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def _sha256(path: Path) -> str:
    """A file's sha256, computed once per process per (path, mtime, size)."""
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


def sha16(path: Path) -> str:
    """First 16 hex digits of a file's sha256 (part of cache file names)."""
    return _sha256(path)[:16]


def cache_dir(settings: InceptionSettings) -> Path:
    if settings.cache_dir:
        return Path(settings.cache_dir).expanduser()
    root = os.environ.get("MODIFF_BENCH_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "modiff-bench") / "inception"


def cache_file(cache_dir: Path, reference: CachedReference, extractor: str, sha16: str, part: str) -> Path:
    return cache_dir / f"{reference.name}--{extractor}--{sha16}--{reference.key()}--{part}.{_CACHE_FORMAT}.npz"


def read_cache(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent or unreadable (then recomputed and rewritten)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def write_cache(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)

    write_atomic(path, write)


def meta(reference: CachedReference, extractor: str, weights: Path, n: int) -> dict:
    identity = reference.identity() if callable(reference.identity) else reference.identity
    return {"reference": reference.name, "identity": identity, "reference_key": reference.key(), "n_images": n,
            "extractor": extractor, "weights": str(weights), "weights_sha256": _sha256(weights),
            "format": _CACHE_FORMAT}
