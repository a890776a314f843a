"""Inception-based metrics of generated images: FID, Inception score, sFID, precision / recall.

Everything runs through the libraries made for it; this module only feeds them images, caches
the reference side and turns "no weights" into a reason instead of a download or a made-up number.

``fid``
    torch-fidelity (``inception-v3-compat``, the port of the TF graph the papers used), 2048-d
    pool features, Frechet distance by torch-fidelity's own ``fid_statistics_to_metric``.
``fid_pytorch_fid``
    The cross-check: pytorch-fid's ``InceptionV3`` 2048-d pool features, Frechet distance by
    pytorch-fid's own ``calculate_frechet_distance`` (the function ``bench.domain.frechet_distance``
    wraps; called here on statistics because the reference side is cached as statistics). Past our
    uint8 conversion the two columns share no code, so their agreement means something. The two
    models are the same network on the same weights file; the libraries differ in two details:
    torch-fidelity resizes with TF1's bilinear rule (corner-aligned, as the original graph did) and
    maps pixels with ``(x - 128) / 128``; pytorch-fid uses ``F.interpolate(align_corners=False)``
    (centre-aligned) and ``2 x / 255 - 1``. At 299 x 299 only the scaling differs (its effect on
    FID is of order ``(128 / 127.5) ** 2 - 1``, 0.8 %); upsampling small images adds the resize
    difference (a shift of about half a source pixel), which can move the two FIDs further apart.
``is_mean``, ``is_std``
    torch-fidelity's ``isc_features_to_metric`` on its ``logits_unbiased`` (its default for IS),
    10 splits; with fewer than 20 images, ``N // 2`` splits so that every split holds at least two
    images (a one-image split always scores exactly 1). ``is_std`` is missing with one split.
``sfid``
    guided-diffusion's evaluator (``evaluations/evaluator.py``) takes the TF tensor
    ``mixed_6/conv:0``, keeps its first 7 channels and flattens the 17 x 17 map: 7 * 17 * 17 = 2023
    dims. torch-fidelity's conversion script (``utils/util_convert_inception_weights.py``) maps
    TF's ``mixed_6/conv`` to ``Mixed_6d.branch1x1`` (TF's ``mixed, mixed_1, ..., mixed_7`` are
    ``Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e``; ``Mixed_6e`` would be ``mixed_7``). The graph names
    that block's ops ``mixed_6/conv/Conv2D``, ``mixed_6/conv/batchnorm`` and, last, ``mixed_6/conv``
    itself, the ReLU; so a forward hook takes the output of torch-fidelity's ``Mixed_6d.branch1x1``
    (conv, batch norm, ReLU), channels 0-6, flattened in TF's (H, W, C) order. Exact up to
    torch-fidelity's port (its resize is epsilon-exact to TF1's). The distance is torch-fidelity's
    ``fid_statistics_to_metric``: the same quantity as the evaluator's sqrtm formula (the trace of
    the square root of S1 S2 is the sum of the square roots of its eigenvalues), several times
    faster at 2023 dims and free of sqrtm's spurious imaginary parts on rank-deficient covariances.
``precision``, ``recall``
    torch-fidelity's ``prc_features_to_metric`` (k = 3 neighbours) on the same Inception 2048-d
    pool features, not on torch-fidelity's default for prc (VGG16 ``fc2_relu``, as in Kynkaanniemi
    et al. 2019): guided-diffusion's evaluator, whose numbers diffusion papers report next to FID
    and sFID, computes precision / recall on the Inception pool features, and so no second weights
    file is needed (VGG16 has no offline path in :class:`InceptionSettings`). Not comparable with
    VGG16-based precision / recall.

Images: greyscale is repeated to RGB; [-1, 1] floats are clamped and rounded to the nearest of the
256 levels, ``round((x + 1) * 127.5)`` (torchvision's ``save_image`` rule up to ties; the
guided-diffusion and latent-diffusion sample scripts truncate instead, half a level darker on
average). torch-fidelity gets those uint8 images, pytorch-fid the same images divided by 255, so
both libraries see identical pixels. Each library resizes to 299 itself.

Weights are never fetched unless ``InceptionSettings.download`` is set: the files are looked up
before any model is built (both libraries download from their constructors when a file is missing).
pytorch-fid 0.3 has no option for a weights path, so its constructor runs with its module-level
``load_state_dict_from_url`` swapped for a loader of the given file.

Reference statistics are cached under ``cache_dir``, one file per reference name, extractor and
weights file (the first 16 hex digits of its sha256), so a changed weights file never reuses
another file's statistics. The name must identify the reference data: changed data under the
same name reuses stale statistics.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import re
import sys
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from .errors import BenchError
from .provenance import sha256_file, write_atomic

COLUMNS = ("fid", "fid_pytorch_fid", "is_mean", "is_std", "sfid", "precision", "recall")
METRIC_COLUMNS = {
    "fid": ("fid", "fid_pytorch_fid"),
    "is": ("is_mean", "is_std"),
    "sfid": ("sfid",),
    "prc": ("precision", "recall"),
}

TORCH_FIDELITY = "torch-fidelity-inception-v3-compat"
PYTORCH_FID = "pytorch-fid-inception-v3"
SFID_MODULE = "Mixed_6d.branch1x1"  # TF mixed_6/conv
SFID_CHANNELS = 7
IS_SPLITS = 10
PRC_NEIGHBOURS = 3
_CACHE_FORMAT = "v1"  # bump when what goes into the cached statistics changes
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PYTORCH_FID_LOCK = threading.Lock()
# what torch.load and a strict load_state_dict raise on a file that is not the expected weights
_UNREADABLE = (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile)


@dataclass(frozen=True)
class InceptionSettings:
    weights: str | None = None  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth; None: torch hub cache
    pytorch_fid_weights: str | None = None  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth; None: hub cache
    cache_dir: str | None = None  # reference statistics; None: $MODIFF_BENCH_CACHE/inception or ~/.cache/...
    batch_size: int = 64
    device: str = "cpu"
    download: bool = False  # let the libraries fetch missing weights (off for offline clusters)


@dataclass(frozen=True)
class ReferenceSet:
    name: str  # cache key of the statistics, e.g. "digits-train"; must identify the data
    load: Callable[[], torch.Tensor]  # float images in [-1, 1], (N, C, H, W), C in {1, 3}; called on a cache miss


def inception_metrics(
    images: torch.Tensor,
    reference: ReferenceSet,
    metrics: Iterable[str],
    settings: InceptionSettings | None = None,
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Values for every column of ``metrics`` (a subset of ``METRIC_COLUMNS``) and, for each
    column left None, a one-line reason. Missing weights or too few images give reasons, never
    exceptions; bad arguments raise ``ValueError``, an unreadable weights file ``BenchError``."""
    settings = settings or InceptionSettings()
    wanted = _parse_metrics(metrics)
    columns = [c for c in COLUMNS if any(c in METRIC_COLUMNS[m] for m in wanted)]
    values: dict[str, float | None] = dict.fromkeys(columns)
    missing: dict[str, str] = {}
    if not columns:
        return values, missing
    _check_images(images, "images")
    if not _NAME.fullmatch(reference.name):
        raise ValueError(f"reference name {reference.name!r} is not a plain file-name stem ([A-Za-z0-9._-])")
    if len(images) == 0:
        return values, dict.fromkeys(columns, "no generated images")
    bad = int((~torch.isfinite(images.detach())).flatten(1).any(1).sum())
    if bad:  # a diverged sampler: no metric of these samples means anything
        return values, dict.fromkeys(columns, f"{bad} of {len(images)} generated images contain NaN or inf")

    ref = _LazyReference(reference)
    cache_dir = _cache_dir(settings)
    fidelity_columns = [c for c in columns if c != "fid_pytorch_fid"]
    if fidelity_columns:
        path, reason = _weights_file(settings.weights, _torch_fidelity_url(), "torch-fidelity", "weights",
                                     settings.download)
        if reason:
            missing.update(dict.fromkeys(fidelity_columns, reason))
        else:
            got, why = _torch_fidelity_metrics(images, ref, wanted, path, settings, cache_dir)
            values.update(got)
            missing.update(why)
    if "fid_pytorch_fid" in columns:
        path, reason = _weights_file(settings.pytorch_fid_weights, _pytorch_fid_url(), "pytorch-fid",
                                     "pytorch_fid_weights", settings.download)
        if reason:
            missing["fid_pytorch_fid"] = reason
        else:
            values["fid_pytorch_fid"], why = _pytorch_fid_metric(images, ref, path, settings, cache_dir)
            if why:
                missing["fid_pytorch_fid"] = why
    for column, value in values.items():
        if value is not None and not np.isfinite(value):
            values[column], missing[column] = None, f"{column} came out {value} (not finite)"
    return values, missing


def _parse_metrics(metrics: Iterable[str]) -> list[str]:
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in names if m not in METRIC_COLUMNS]
    if unknown:
        raise ValueError(f"unknown Inception metric(s) {', '.join(map(repr, unknown))}; "
                         f"available: {', '.join(METRIC_COLUMNS)}")
    return list(dict.fromkeys(names))


def _check_images(images: torch.Tensor, what: str) -> None:
    if not (torch.is_tensor(images) and images.is_floating_point() and images.dim() == 4
            and images.shape[1] in (1, 3)):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{what} must be float (N, C, H, W) with C in {{1, 3}}, got {shape}")


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    x = images.detach().float().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return ((x + 1) * 127.5).round().to(torch.uint8)


class _LazyReference:
    """Loads the reference images at most once per call, and only if some cache file is missing."""

    def __init__(self, reference: ReferenceSet):
        self.name = reference.name
        self._load = reference.load
        self._images: torch.Tensor | None = None

    def images(self) -> torch.Tensor:
        if self._images is None:
            images = self._load()
            _check_images(images, f"reference {self.name!r}")
            if not torch.isfinite(images).all():
                raise BenchError(f"reference {self.name!r} contains NaN or inf pixels")
            self._images = images
        return self._images


# --- weights -------------------------------------------------------------------------------------


def _torch_fidelity_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def _pytorch_fid_url() -> str:
    from pytorch_fid.inception import FID_WEIGHTS_URL

    return FID_WEIGHTS_URL


def _hub_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (what both libraries call) keeps ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _weights_file(explicit: str | None, url: str, library: str, option: str,
                  download: bool) -> tuple[Path | None, str | None]:
    """The weights file to use, or why there is none; downloads only when allowed."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path, None
        return None, (f"{library} Inception weights not found: {explicit} is not a file "
                      f"([inception] {option} / InceptionSettings.{option})")
    path = _hub_file(url)
    if path.is_file():
        return path, None
    if not download:
        return None, (f"{library} Inception weights not found: looked in {path} (torch hub cache, $TORCH_HOME); "
                      f"set [inception] {option} = '/path/to/{path.name}' in the matrix "
                      f"(InceptionSettings.{option}) or allow download")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as exc:  # any network or disk failure is a reason, not a crash
        return None, f"{library} Inception weights: download of {url} to {path} failed: {_one_line(exc)}"
    return path, None


@functools.lru_cache(maxsize=8)
def _sha16_cached(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)[:16]


def _sha16(path: Path) -> str:
    st = path.stat()
    return _sha16_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _load_torch_fidelity(path: Path, features: list[str], device: str) -> torch.nn.Module:
    from torch_fidelity.utils import create_feature_extractor

    try:
        model = create_feature_extractor("inception-v3-compat", features, cuda=False,
                                         feature_extractor_weights_path=str(path), verbose=False)
    except _UNREADABLE as exc:
        raise BenchError(f"{path} is not a torch-fidelity Inception weights file: {_one_line(exc)}") from exc
    return model.to(device).eval()


def _load_pytorch_fid(path: Path, device: str) -> torch.nn.Module:
    import pytorch_fid.inception as pfi

    def load(url: str, *args, **kwargs) -> dict:
        if url != pfi.FID_WEIGHTS_URL:
            raise RuntimeError(f"pytorch-fid asked for unexpected weights {url}")
        return torch.load(path, map_location="cpu", weights_only=True)

    # The swap is process-wide while it lasts; the lock keeps two threads from interleaving it.
    with _PYTORCH_FID_LOCK, _swapped(pfi, "load_state_dict_from_url", load):
        try:
            model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        except _UNREADABLE as exc:
            raise BenchError(f"{path} is not a pytorch-fid Inception weights file: {_one_line(exc)}") from exc
    return model.to(device).eval()


@contextlib.contextmanager
def _swapped(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


# --- features ------------------------------------------------------------------------------------


@torch.no_grad()
def _fidelity_features(model, images: torch.Tensor, spatial: bool, settings: InceptionSettings) -> dict:
    """torch-fidelity's requested features, plus the sFID map when ``spatial``, on CPU."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in model.features_list}
    maps: list[torch.Tensor] = []

    def grab(_module, _inputs, output):
        # (N, 7, 17, 17) -> (N, 17, 17, 7) -> (N, 2023): guided-diffusion's spatial[..., :7] in TF's layout
        maps.append(output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1).to("cpu", torch.float32))

    handle = model.get_submodule(SFID_MODULE).register_forward_hook(grab) if spatial else None
    try:
        for chunk in images.split(settings.batch_size):
            feats = model.convert_features_tuple_to_dict(model(_to_uint8(chunk).to(settings.device)))
            for name, value in feats.items():
                out[name].append(value.to("cpu", torch.float32))
    finally:
        if handle is not None:
            handle.remove()
    result = {name: torch.cat(parts) for name, parts in out.items()}
    if spatial:
        result["spatial"] = torch.cat(maps)
    return result


@torch.no_grad()
def _pytorch_fid_features(model, images: torch.Tensor, settings: InceptionSettings) -> np.ndarray:
    parts = []
    for chunk in images.split(settings.batch_size):
        x = _to_uint8(chunk).to(settings.device).float() / 255
        parts.append(model(x)[0].flatten(1).cpu())
    # float64, as pytorch-fid's get_activations stores them
    return torch.cat(parts).numpy().astype(np.float64)


# --- reference cache -----------------------------------------------------------------------------


def _cache_dir(settings: InceptionSettings) -> Path:
    if settings.cache_dir:
        return Path(settings.cache_dir).expanduser()
    root = os.environ.get("MODIFF_BENCH_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "modiff-bench") / "inception"


def _cache_file(cache_dir: Path, name: str, extractor: str, sha16: str, part: str) -> Path:
    return cache_dir / f"{name}--{extractor}--{sha16}--{part}.{_CACHE_FORMAT}.npz"


def _read_cache(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent or unreadable (then recomputed and rewritten)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _write_cache(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)

    write_atomic(path, write)


def _meta(reference: _LazyReference, extractor: str, weights: Path, n: int) -> dict:
    return {"reference": reference.name, "n_images": n, "extractor": extractor, "weights": str(weights),
            "weights_sha256_16": _sha16(weights), "format": _CACHE_FORMAT}


# --- metrics -------------------------------------------------------------------------------------


def _torch_fidelity_metrics(images, ref: _LazyReference, wanted: list[str], weights: Path,
                            settings: InceptionSettings, cache_dir: Path):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    values: dict[str, float | None] = {}
    missing: dict[str, str] = {}
    sha16 = _sha16(weights)
    stats_file = _cache_file(cache_dir, ref.name, TORCH_FIDELITY, sha16, "stats")
    feats_file = _cache_file(cache_dir, ref.name, TORCH_FIDELITY, sha16, "pool-features")
    stats = ref_feats = None
    if "fid" in wanted or "sfid" in wanted:
        stats = _read_cache(stats_file, ("pool_mu", "pool_sigma", "spatial_mu", "spatial_sigma"))
    if "prc" in wanted:
        ref_feats = _read_cache(feats_file, ("pool",))
    need_reference = (stats is None and ("fid" in wanted or "sfid" in wanted)) or (
        ref_feats is None and "prc" in wanted)

    # Requesting only what is used lets the forward pass stop early ('768' ends after Mixed_6e).
    used = {"2048": "fid" in wanted or "prc" in wanted or need_reference, "logits_unbiased": "is" in wanted}
    model = _load_torch_fidelity(weights, [f for f, u in used.items() if u] or ["768"], settings.device)
    if need_reference:
        # All reference statistics at once: the one forward pass gives them all.
        f = _fidelity_features(model, ref.images(), spatial=True, settings=settings)
        meta = _meta(ref, TORCH_FIDELITY, weights, len(f["2048"]))
        pool, spatial = fid_features_to_statistics(f["2048"]), fid_features_to_statistics(f["spatial"])
        stats = {"pool_mu": pool["mu"], "pool_sigma": pool["sigma"],
                 "spatial_mu": spatial["mu"], "spatial_sigma": spatial["sigma"]}
        _write_cache(stats_file, stats, meta)
        if "prc" in wanted:
            ref_feats = {"pool": f["2048"].numpy()}
            _write_cache(feats_file, ref_feats, meta)

    gen = _fidelity_features(model, images, spatial="sfid" in wanted, settings=settings)
    n = len(images)
    for column, feats, key in (("fid", "2048", "pool"), ("sfid", "spatial", "spatial")):
        if column in wanted and n < 2:
            missing[column] = f"{column} needs at least 2 generated images, got {n}"
        elif column in wanted:
            reference_stats = {"mu": stats[f"{key}_mu"], "sigma": stats[f"{key}_sigma"]}
            out = fid_statistics_to_metric(fid_features_to_statistics(gen[feats]), reference_stats, verbose=False)
            values[column] = out["frechet_inception_distance"]
    if "is" in wanted:
        splits = min(IS_SPLITS, n // 2)
        if splits < 1:
            missing["is_mean"] = missing["is_std"] = f"the Inception score needs at least 2 images, got {n}"
        else:
            out = isc_features_to_metric(gen["logits_unbiased"], splits=splits)
            values["is_mean"], values["is_std"] = out["inception_score_mean"], out["inception_score_std"]
            if splits == 1:
                values["is_std"], missing["is_std"] = None, f"one split only ({n} images): no spread to report"
    if "prc" in wanted:
        n_ref = len(ref_feats["pool"])
        if min(n, n_ref) <= PRC_NEIGHBOURS:
            missing["precision"] = missing["recall"] = (
                f"precision / recall need more than {PRC_NEIGHBOURS} images on each side (k = {PRC_NEIGHBOURS}), "
                f"got {n} generated and {n_ref} reference")
        else:
            out = prc_features_to_metric(
                gen["2048"].to(settings.device), torch.from_numpy(ref_feats["pool"]).to(settings.device),
                prc_neighborhood=PRC_NEIGHBOURS, save_cpu_ram=True, verbose=False)
            values["precision"], values["recall"] = out["precision"], out["recall"]
    return values, missing


def _pytorch_fid_metric(images, ref: _LazyReference, weights: Path, settings: InceptionSettings,
                        cache_dir: Path) -> tuple[float | None, str | None]:
    stats_file = _cache_file(cache_dir, ref.name, PYTORCH_FID, _sha16(weights), "stats")
    model = _load_pytorch_fid(weights, settings.device)
    stats = _read_cache(stats_file, ("pool_mu", "pool_sigma", "n"))
    if stats is None:
        feats = _pytorch_fid_features(model, ref.images(), settings)
        stats = {"pool_mu": feats.mean(0), "pool_sigma": np.cov(feats, rowvar=False), "n": np.array(len(feats))}
        _write_cache(stats_file, stats, _meta(ref, PYTORCH_FID, weights, len(feats)))
    n, n_ref = len(images), int(stats["n"])
    if min(n, n_ref) < 2:
        return None, f"fid_pytorch_fid needs at least 2 images on each side, got {n} generated and {n_ref} reference"
    feats = _pytorch_fid_features(model, images, settings)
    return _pytorch_fid_distance(feats.mean(0), np.cov(feats, rowvar=False), stats["pool_mu"], stats["pool_sigma"])


def _pytorch_fid_distance(mu1, sigma1, mu2, sigma2) -> tuple[float | None, str | None]:
    from pytorch_fid.fid_score import calculate_frechet_distance
    from scipy.linalg import LinAlgWarning

    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        # Fewer images than dimensions make the covariance product singular; its square root is
        # still defined, and the library adds an offset (printing a note) when it is not finite.
        warnings.simplefilter("ignore", LinAlgWarning)
        warnings.filterwarnings("ignore", message="The `disp` argument is deprecated", category=DeprecationWarning)
        try:
            return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2)), None
        except ValueError as exc:  # "Imaginary component ...": no trustworthy number
            return None, f"pytorch-fid could not compute the distance: {_one_line(exc)}"
