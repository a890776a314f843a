"""The reference side of FID, sFID and precision / recall: the real images (or their statistics) the
generated ones are compared against.

A :class:`ReferenceSet` (``bench.references`` builds them from the ``[inception]`` settings) is images,
precomputed statistics, or both. Statistics computed from its images are cached
(``bench.inception.stats_cache``), so each reference goes through the networks once per weights file and
data identity. Precomputed statistics (``ReferenceSet.statistics``, e.g. guided-diffusion's reference
batches) serve ``fid`` and ``sfid`` only: precision / recall need the reference's features (its
images), and pytorch-fid cannot use another extractor's statistics. A loader that finds no data
raises :class:`ReferenceUnavailable`, whose one-line message becomes the reason of every column
that needed it (the Inception score needs no reference).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BenchError
from . import features, formulas, stats_cache, weights
from .features import POOL_DIMS, SPATIAL_DIMS, Images
from .settings import InceptionSettings
from .weights import PYTORCH_FID, TORCH_FIDELITY

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ReferenceUnavailable(Exception):
    """Raised by a :class:`ReferenceSet` loader whose data is not on this machine (and may not be
    downloaded). Not an error: its one-line message is the reason of each column that needed it."""


@dataclass(frozen=True)
class ReferenceSet:
    """The real images (or their statistics) that FID, sFID and precision / recall compare against."""

    name: str  # readable part of the cache file names, e.g. "cifar10-train"
    # Images: float in [-1, 1] or uint8, (N, C, H, W) with C in {1, 3}; one tensor or an iterable of
    # batches (streamed). Called on a cache miss only; may raise ReferenceUnavailable. None: statistics only.
    load: Callable[[], Images] | None = None
    # What identifies the data beyond its name (a content hash, a file listing...), or a function
    # computing it when first needed; "" for fixed data the name identifies (the shipped digits).
    identity: str | Callable[[], str] = ""
    # Precomputed torch-fidelity-compatible statistics: pool_mu (2048,), pool_sigma (2048, 2048) and
    # optionally spatial_mu (2023,), spatial_sigma (2023, 2023); used for fid / sfid instead of the images.
    statistics: Callable[[], dict[str, np.ndarray]] | None = None

    def key(self) -> str:
        """16 hex digits identifying the data: name and identity (part of every cache file name)."""
        identity = self.identity() if callable(self.identity) else self.identity
        return hashlib.sha256(f"{self.name}\n{identity}".encode()).hexdigest()[:16]


def _check_name(reference: ReferenceSet) -> None:
    if not _NAME.fullmatch(reference.name):
        raise ValueError(f"reference name {reference.name!r} is not a plain file-name stem ([A-Za-z0-9._-])")


def reference_statistics(reference: ReferenceSet, settings: InceptionSettings | None = None) -> dict[str, np.ndarray]:
    """torch-fidelity's reference statistics (``STATS_KEYS``; the spatial pair absent when precomputed
    statistics lack it), from the reference's precomputed statistics, the cache, or one pass over its
    images (then cached). Raises ``BenchError`` without weights, ``ReferenceUnavailable`` without data."""
    settings = settings or InceptionSettings()
    _check_name(reference)
    path, reason = weights._weights_file(settings.weights, weights._torch_fidelity_url(), "torch-fidelity",
                                         "weights", settings.download)
    if reason:
        raise BenchError(reason)
    missing: dict[str, str] = {}
    ref = _reference_side(reference, ["fid", "sfid"], path, None, settings, stats_cache.cache_dir(settings),
                          missing)
    if ref["stats"] is None:
        raise ReferenceUnavailable(missing["fid"])
    return ref["stats"]


def _precomputed(reference: ReferenceSet) -> dict[str, np.ndarray]:
    stats = reference.statistics()
    expected = {"pool_mu": (POOL_DIMS,), "pool_sigma": (POOL_DIMS, POOL_DIMS),
                "spatial_mu": (SPATIAL_DIMS,), "spatial_sigma": (SPATIAL_DIMS, SPATIAL_DIMS)}
    for key in ("pool_mu", "pool_sigma"):
        if key not in stats:
            raise BenchError(f"reference {reference.name!r}: its precomputed statistics lack {key}")
    for key, value in stats.items():
        if key not in expected or np.shape(value) != expected[key]:
            raise BenchError(f"reference {reference.name!r}: precomputed {key} has shape {np.shape(value)}, "
                             f"expected {expected.get(key, 'no such key')}")
    return {key: np.asarray(value, dtype=np.float64) for key, value in stats.items()}


def _reference_side(reference: ReferenceSet | None, wanted: list[str], fidelity_path: Path | None,
                    pytorch_fid_path: Path | None, settings: InceptionSettings, cache_dir: Path,
                    missing: dict[str, str]) -> dict:
    """The reference's statistics and features each pending column needs: precomputed, cached, or
    from one pass over its images (both libraries at once), then cached. Columns the reference
    cannot serve get their reason in ``missing``."""
    ref: dict = {"stats": None, "pool": None, "pytorch_fid": None}
    if reference is None:
        return ref
    fidelity_ok = fidelity_path is not None
    fid_sfid = [c for c in ("fid", "sfid") if fidelity_ok and c in wanted and c not in missing]
    # precision / recall and KID need the reference's pool features, not only their statistics
    prc = fidelity_ok and (("prc" in wanted and "precision" not in missing)
                           or ("kid" in wanted and "kid" not in missing))
    pytorch_fid = pytorch_fid_path is not None and "fid" in wanted and "fid_pytorch_fid" not in missing
    sha16 = stats_cache.sha16(fidelity_path) if fidelity_path is not None else None
    if fid_sfid and reference.statistics is not None:
        ref["stats"] = _precomputed(reference)
        if "sfid" in fid_sfid and "spatial_mu" not in ref["stats"]:
            missing["sfid"] = (f"reference {reference.name!r} has precomputed pool statistics only "
                               "(no mu_s / sigma_s): sfid needs the spatial ones")
    elif fid_sfid:
        ref["stats"] = stats_cache.read_cache(
            stats_cache.cache_file(cache_dir, reference, TORCH_FIDELITY, sha16, "stats"), formulas.STATS_KEYS)
    if prc and reference.load is None:
        for metric, columns, what in (("prc", ("precision", "recall"), "precision / recall need"),
                                      ("kid", ("kid", "kid_std", "kid_subset_size"), "KID needs")):
            if metric in wanted:
                missing.update(dict.fromkeys(columns, f"reference {reference.name!r} is precomputed statistics "
                                                      f"only: {what} its images"))
        prc = False
    elif prc:
        ref["pool"] = stats_cache.read_cache(
            stats_cache.cache_file(cache_dir, reference, TORCH_FIDELITY, sha16, "pool-features"), ("pool",))
    if pytorch_fid and reference.statistics is not None:
        missing["fid_pytorch_fid"] = (
            f"reference {reference.name!r} gives fid from precomputed statistics, which pytorch-fid cannot use"
            + ("" if reference.load is None else " (its images need not be the set those statistics describe)"))
        pytorch_fid = False
    elif pytorch_fid:
        ref["pytorch_fid"] = stats_cache.read_cache(
            stats_cache.cache_file(cache_dir, reference, PYTORCH_FID, stats_cache.sha16(pytorch_fid_path), "stats"),
            ("pool_mu", "pool_sigma", "n"))

    need_stats = bool(fid_sfid) and ref["stats"] is None
    need_pool = prc and ref["pool"] is None
    need_pytorch_fid = pytorch_fid and ref["pytorch_fid"] is None
    if not (need_stats or need_pool or need_pytorch_fid):
        return ref
    try:
        images = reference.load()
    except ReferenceUnavailable as exc:
        reason = " ".join(str(exc).split())
        pool_columns = [c for m, cs in (("prc", ("precision", "recall")),
                                        ("kid", ("kid", "kid_std", "kid_subset_size"))) if m in wanted for c in cs]
        unserved = ((fid_sfid if need_stats else []) + (pool_columns if need_pool else [])
                    + (["fid_pytorch_fid"] if need_pytorch_fid else []))
        for column in unserved:
            missing.setdefault(column, reason)
        return ref

    # All torch-fidelity statistics at once when any is missing: the one forward pass gives them all.
    fidelity = pytorch_fid_pass = None
    if need_stats or need_pool:
        fidelity = features._FidelityPass(weights._load_torch_fidelity(fidelity_path, ["2048"], settings.device),
                                          spatial=reference.statistics is None)
    if need_pytorch_fid:
        pytorch_fid_pass = features._PytorchFidPass(weights._load_pytorch_fid(pytorch_fid_path, settings.device))
    stream = features._Stream(images, settings.batch_size, f"reference {reference.name!r}")
    features._run(stream, [p for p in (fidelity, pytorch_fid_pass) if p is not None], settings.device)
    if stream.bad:
        raise BenchError(f"reference {reference.name!r} contains NaN or inf pixels ({stream.bad} images)")
    if stream.n == 0:
        raise BenchError(f"reference {reference.name!r} has no images")
    if fidelity is not None:
        f = fidelity.result()
        meta = stats_cache.meta(reference, TORCH_FIDELITY, fidelity_path, stream.n)
        if reference.statistics is None:
            ref["stats"] = formulas.fid_sfid_statistics(f["2048"], f["spatial"])
            stats_cache.write_cache(stats_cache.cache_file(cache_dir, reference, TORCH_FIDELITY, sha16, "stats"),
                                    ref["stats"], meta)
        if prc:
            ref["pool"] = {"pool": f["2048"].numpy()}
            stats_cache.write_cache(
                stats_cache.cache_file(cache_dir, reference, TORCH_FIDELITY, sha16, "pool-features"), ref["pool"], meta)
    if pytorch_fid_pass is not None:
        feats = pytorch_fid_pass.result()
        mu, sigma = formulas.pytorch_fid_statistics(feats)
        ref["pytorch_fid"] = {"pool_mu": mu, "pool_sigma": sigma, "n": np.array(len(feats))}
        stats_cache.write_cache(stats_cache.cache_file(cache_dir, reference, PYTORCH_FID,
                                                       stats_cache.sha16(pytorch_fid_path), "stats"),
                                ref["pytorch_fid"],
                                stats_cache.meta(reference, PYTORCH_FID, pytorch_fid_path, stream.n))
    return ref
