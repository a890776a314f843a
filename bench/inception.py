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
average); uint8 images (0-255) are taken as they are. torch-fidelity gets those uint8 images,
pytorch-fid the same images divided by 255, so both libraries see identical pixels. Each library
resizes to 299 itself. Either side may be one tensor or an iterable of tensors (batches): images go
through the networks ``batch_size`` at a time and only features are kept (2048 + 2023 floats per
image for torch-fidelity, 2048 for pytorch-fid: about 1.2 GB for 50,000 images, against 39 GB for
50,000 256 x 256 images as float32). One pass over each side feeds both libraries.

Weights are never fetched unless ``InceptionSettings.download`` is set: the files are looked up
before any model is built (both libraries download from their constructors when a file is missing).
A weights file (given, in the torch hub cache, or just downloaded) is user data, and both libraries
would unpickle it with code execution allowed (torch-fidelity calls ``torch.load(weights_only=False)``).
So this module reads every file itself, with ``torch.load(weights_only=True)`` on the bytes it hashed,
checks it holds exactly the network's tensors (a missing, unexpected or misshapen one is a one-line
``BenchError`` naming the file), and builds each library's network from that state dict without
touching the library's loaders: torch-fidelity's ``FeatureExtractorInceptionV3`` reads a re-serialised
copy of the checked tensors from memory; pytorch-fid's ``InceptionV3`` (whose constructor can only
download) is assembled from pytorch-fid's own blocks (``FIDInceptionA`` ...) exactly as its constructor
does. The SHA-256 of every weights file loaded is recorded (:func:`weights_used`; no full hash of these
files is published, so this is what identifies them) and written into each cached statistics file.

The reference side (:class:`ReferenceSet`; ``bench.references`` builds them from the ``[inception]``
settings) is images, precomputed statistics, or both. Statistics computed here are cached under
``cache_dir``, one file per reference name, extractor, weights file (the first 16 hex digits of its
sha256) and data identity (the first 16 hex digits of the sha256 of the reference's ``identity``:
a content hash or a file listing), so neither a changed weights file nor changed data reuses stale
statistics. Precomputed statistics (``ReferenceSet.statistics``, e.g. guided-diffusion's reference
batches) serve ``fid`` and ``sfid`` only: precision / recall need the reference's features (its
images), and pytorch-fid cannot use another extractor's statistics. A loader that finds no data
raises :class:`ReferenceUnavailable`, whose one-line message becomes the reason of every column
that needed it (the Inception score needs no reference).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import sys
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from .errors import BenchError
from .provenance import sha256_file, write_atomic
from .zoo.checkpoints import few as _few
from .zoo.checkpoints import first_line as _first_line
from .zoo.checkpoints import state_dict_problems

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
POOL_DIMS = 2048
SPATIAL_DIMS = SFID_CHANNELS * 17 * 17  # 2023
IS_SPLITS = 10
PRC_NEIGHBOURS = 3
STATS_KEYS = ("pool_mu", "pool_sigma", "spatial_mu", "spatial_sigma")
_CACHE_FORMAT = "v2"  # bump when what goes into the cached statistics or their key changes
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_WEIGHTS_LOCK = threading.Lock()
_WEIGHTS_USED: dict[str, dict[str, str]] = {}  # library -> path and sha256 of the weights file it last loaded

Images = torch.Tensor | Iterable[torch.Tensor]


@dataclass(frozen=True)
class InceptionSettings:
    weights: str | None = None  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth; None: torch hub cache
    pytorch_fid_weights: str | None = None  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth; None: hub cache
    cache_dir: str | None = None  # reference statistics; None: $MODIFF_BENCH_CACHE/inception or ~/.cache/...
    batch_size: int = 64
    device: str = "cpu"
    download: bool = False  # let the libraries fetch missing weights and CIFAR-10 (off for offline clusters)
    cifar10_root: str | None = None  # torchvision's cifar-10-batches-py or its parent; None: torch-fidelity's
    reference_images: str | None = None  # a folder of PNG / JPEG reference images (overrides the model's default)
    reference_stats: str | None = None  # a guided-diffusion reference batch .npz (overrides the model's default)


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


def inception_metrics(
    images: Images,
    reference: ReferenceSet | None,
    metrics: Iterable[str],
    settings: InceptionSettings | None = None,
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Values for every column of ``metrics`` (a subset of ``METRIC_COLUMNS``) and, for each
    column left None, a one-line reason. ``images``: one tensor, or an iterable of tensors (batches),
    float in [-1, 1] or uint8. ``reference`` may be None when only ``is`` is asked for. Missing
    weights or reference data, or too few images give reasons, never exceptions; bad arguments raise
    ``ValueError``, an unreadable weights file or reference ``BenchError``."""
    settings = settings or InceptionSettings()
    wanted = _parse_metrics(metrics)
    columns = [c for c in COLUMNS if any(c in METRIC_COLUMNS[m] for m in wanted)]
    values: dict[str, float | None] = dict.fromkeys(columns)
    missing: dict[str, str] = {}
    if not columns:
        return values, missing
    if reference is None and wanted != ["is"]:
        raise ValueError(f"{', '.join(m for m in wanted if m != 'is')} need a reference set")
    if reference is not None and not _NAME.fullmatch(reference.name):
        raise ValueError(f"reference name {reference.name!r} is not a plain file-name stem ([A-Za-z0-9._-])")
    if torch.is_tensor(images):  # a tensor is checked before any work; an iterable while it streams
        _check_images(images, "images")
        if len(images) == 0:
            return values, dict.fromkeys(columns, "no generated images")
        bad = _non_finite(images)
        if bad:  # a diverged sampler: no metric of these samples means anything
            return values, dict.fromkeys(columns, f"{bad} of {len(images)} generated images contain NaN or inf")

    cache_dir = _cache_dir(settings)
    fidelity_path = pytorch_fid_path = None
    fidelity_columns = [c for c in columns if c != "fid_pytorch_fid"]
    if fidelity_columns:
        fidelity_path, reason = _weights_file(settings.weights, _torch_fidelity_url(), "torch-fidelity", "weights",
                                              settings.download)
        if reason:
            missing.update(dict.fromkeys(fidelity_columns, reason))
    if "fid_pytorch_fid" in columns:
        pytorch_fid_path, reason = _weights_file(settings.pytorch_fid_weights, _pytorch_fid_url(), "pytorch-fid",
                                                 "pytorch_fid_weights", settings.download)
        if reason:
            missing["fid_pytorch_fid"] = reason

    ref = _reference_side(reference, wanted, fidelity_path, pytorch_fid_path, settings, cache_dir, missing)
    if all(c in missing for c in columns):
        return values, missing

    pending = [c for c in columns if c not in missing]
    fidelity = None
    if any(c != "fid_pytorch_fid" for c in pending):
        features = [f for f, used in (("2048", bool({"fid", "precision", "recall"} & set(pending))),
                                      ("logits_unbiased", "is_mean" in pending)) if used]
        fidelity = _FidelityPass(_load_torch_fidelity(fidelity_path, features or ["768"], settings.device),
                                 spatial="sfid" in pending)
    pytorch_fid = None
    if "fid_pytorch_fid" in pending:
        pytorch_fid = _PytorchFidPass(_load_pytorch_fid(pytorch_fid_path, settings.device))
    stream = _Stream(images, settings.batch_size, "images")
    _run(stream, [p for p in (fidelity, pytorch_fid) if p is not None], settings.device)
    if stream.n == 0:
        return dict.fromkeys(columns), dict.fromkeys(columns, "no generated images")
    if stream.bad:
        return dict.fromkeys(columns), dict.fromkeys(
            columns, f"{stream.bad} of {stream.n} generated images contain NaN or inf")

    if fidelity is not None:
        got, why = _torch_fidelity_values(fidelity.result(), stream.n, ref, pending, settings)
        values.update(got)
        missing.update(why)
    if pytorch_fid is not None:
        values["fid_pytorch_fid"], why = _pytorch_fid_value(pytorch_fid.result(), ref["pytorch_fid"])
        if why:
            missing["fid_pytorch_fid"] = why
    for column, value in values.items():
        if value is not None and not np.isfinite(value):
            values[column], missing[column] = None, f"{column} came out {value} (not finite)"
    return values, missing


def reference_statistics(reference: ReferenceSet, settings: InceptionSettings | None = None) -> dict[str, np.ndarray]:
    """torch-fidelity's reference statistics (``STATS_KEYS``; the spatial pair absent when precomputed
    statistics lack it), from the reference's precomputed statistics, the cache, or one pass over its
    images (then cached). Raises ``BenchError`` without weights, ``ReferenceUnavailable`` without data."""
    settings = settings or InceptionSettings()
    if not _NAME.fullmatch(reference.name):
        raise ValueError(f"reference name {reference.name!r} is not a plain file-name stem ([A-Za-z0-9._-])")
    path, reason = _weights_file(settings.weights, _torch_fidelity_url(), "torch-fidelity", "weights",
                                 settings.download)
    if reason:
        raise BenchError(reason)
    missing: dict[str, str] = {}
    ref = _reference_side(reference, ["fid", "sfid"], path, None, settings, _cache_dir(settings), missing)
    if ref["stats"] is None:
        raise ReferenceUnavailable(missing["fid"])
    return ref["stats"]


def _parse_metrics(metrics: Iterable[str]) -> list[str]:
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in names if m not in METRIC_COLUMNS]
    if unknown:
        raise ValueError(f"unknown Inception metric(s) {', '.join(map(repr, unknown))}; "
                         f"available: {', '.join(METRIC_COLUMNS)}")
    return list(dict.fromkeys(names))


def _check_images(images: torch.Tensor, what: str) -> None:
    if not (torch.is_tensor(images) and (images.is_floating_point() or images.dtype == torch.uint8)
            and images.dim() == 4 and images.shape[1] in (1, 3)):
        shape = (f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__)
        raise ValueError(f"{what} must be float in [-1, 1] or uint8, (N, C, H, W) with C in {{1, 3}}, got {shape}")


def _non_finite(images: torch.Tensor) -> int:
    if not images.is_floating_point():
        return 0
    return int((~torch.isfinite(images.detach())).flatten(1).any(1).sum())


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        x = images.detach()
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    x = images.detach().float().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return ((x + 1) * 127.5).round().to(torch.uint8)


class _Stream:
    """uint8 batches of at most ``batch_size`` images from a tensor or an iterable of tensors;
    counts the images and the non-finite ones as they pass."""

    def __init__(self, images: Images, batch_size: int, what: str):
        if not torch.is_tensor(images) and not isinstance(images, Iterable):
            raise ValueError(f"{what} must be a tensor or an iterable of tensors, got {type(images).__name__}")
        self.images, self.batch_size, self.what = images, batch_size, what
        self.n = self.bad = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        parts = [self.images] if torch.is_tensor(self.images) else self.images
        for part in parts:
            _check_images(part, self.what)
            for chunk in part.split(self.batch_size):
                self.n += len(chunk)
                self.bad += _non_finite(chunk)
                yield _to_uint8(chunk)


@torch.no_grad()
def _run(stream: _Stream, passes: list, device: str) -> None:
    """One pass over the stream, every batch through every extractor."""
    if not passes:
        return
    with contextlib.ExitStack() as stack:
        for p in passes:
            stack.enter_context(p)
        for batch in stream:
            x = batch.to(device)
            for p in passes:
                p.add(x)


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
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def _sha256(path: Path) -> str:
    """A file's sha256, computed once per process per (path, mtime, size)."""
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


def _sha16(path: Path) -> str:
    """First 16 hex digits of a file's sha256 (part of cache file names)."""
    return _sha256(path)[:16]


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _read_weights(path: Path, library: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, by ``torch.load(weights_only=True)`` (no pickled code runs) from the
    very bytes whose SHA-256 is recorded in :func:`weights_used`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BenchError(f"cannot read {library} Inception weights {path}: {_one_line(exc)}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (refused code), RuntimeError, EOFError, BadZipFile, ...
        raise BenchError(f"{path} is not a {library} Inception weights file: {_first_line(exc)}") from None
    if not isinstance(state, dict) or not state:
        raise BenchError(f"{path} is not a {library} Inception weights file: it holds a {type(state).__name__}, "
                         "not a state dict")
    odd = [str(k) for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if odd:
        raise BenchError(f"{path} is not a {library} Inception weights file: {len(odd)} entries are not named "
                         f"tensors: {_few(odd)}")
    with _WEIGHTS_LOCK:
        _WEIGHTS_USED[library] = {"path": str(path.resolve()), "sha256": hashlib.sha256(data).hexdigest()}
    return state


def weights_used() -> dict[str, dict[str, str]]:
    """The Inception weights files this process has loaded, by library (``torch-fidelity``,
    ``pytorch-fid``): ``{"path", "sha256"}`` of the last file each loaded. What a run records as the
    provenance of its Inception columns."""
    with _WEIGHTS_LOCK:
        return {library: dict(entry) for library, entry in _WEIGHTS_USED.items()}


class _Mismatch(Exception):
    """A state dict that would not load strictly; its message lists the offending keys."""


@functools.cache
def _fidelity_class() -> type:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class CheckedInceptionV3(FeatureExtractorInceptionV3):
        """torch-fidelity's extractor, whose constructor's (strict) load names the keys that do not fit."""

        def load_state_dict(self, state_dict, *args, **kwargs):
            expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
            problems = state_dict_problems(state_dict, expected)
            if problems:
                raise _Mismatch(problems)
            return super().load_state_dict(state_dict, *args, **kwargs)

    return CheckedInceptionV3


def _load_torch_fidelity(path: Path, features: list[str], device: str) -> torch.nn.Module:
    checked = io.BytesIO()  # the library torch.loads what it is given, unrestricted: give it only these tensors
    torch.save(_read_weights(path, "torch-fidelity"), checked)
    checked.seek(0)
    try:
        model = _fidelity_class()("inception-v3-compat", features, feature_extractor_weights_path=checked,
                                  verbose=False)
    except _Mismatch as exc:
        raise BenchError(f"{path} is not a torch-fidelity Inception weights file: {exc}") from None
    return model.to(device).eval()


def _load_pytorch_fid(path: Path, device: str) -> torch.nn.Module:
    state = _read_weights(path, "pytorch-fid")
    inception = _pytorch_fid_inception()
    expected = {k: tuple(v.shape) for k, v in inception.state_dict().items()}
    problems = state_dict_problems(state, expected)
    if problems:
        raise BenchError(f"{path} is not a pytorch-fid Inception weights file: {problems}")
    inception.load_state_dict(state, strict=True)
    return _pytorch_fid_class()(inception).to(device).eval()


def _pytorch_fid_inception() -> torch.nn.Module:
    """pytorch-fid's ``fid_inception_v3()`` without its download: torchvision's Inception3 with the FID
    blocks patched in, from pytorch-fid's own classes, left uninitialised for the weights to fill."""
    import pytorch_fid.inception as pfi
    import torchvision

    inception = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                                init_weights=False)
    inception.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = pfi.FIDInceptionE_1(1280)
    inception.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return inception


@functools.cache
def _pytorch_fid_class() -> type:
    import pytorch_fid.inception as pfi

    class LoadedInceptionV3(pfi.InceptionV3):
        """pytorch-fid's ``InceptionV3`` (its ``forward``: resize to 299, ``2 x - 1``, the blocks) for the
        2048-d pool features, over a given network instead of one its constructor would download."""

        def __init__(self, inception: torch.nn.Module):
            torch.nn.Module.__init__(self)  # pfi.InceptionV3.__init__ would build (and fetch) its own
            self.resize_input, self.normalize_input = True, True
            self.output_blocks = [self.BLOCK_INDEX_BY_DIM[POOL_DIMS]]
            self.last_needed_block = self.output_blocks[-1]
            self.blocks = torch.nn.ModuleList([
                torch.nn.Sequential(inception.Conv2d_1a_3x3, inception.Conv2d_2a_3x3, inception.Conv2d_2b_3x3,
                                    torch.nn.MaxPool2d(kernel_size=3, stride=2)),
                torch.nn.Sequential(inception.Conv2d_3b_1x1, inception.Conv2d_4a_3x3,
                                    torch.nn.MaxPool2d(kernel_size=3, stride=2)),
                torch.nn.Sequential(inception.Mixed_5b, inception.Mixed_5c, inception.Mixed_5d, inception.Mixed_6a,
                                    inception.Mixed_6b, inception.Mixed_6c, inception.Mixed_6d, inception.Mixed_6e),
                torch.nn.Sequential(inception.Mixed_7a, inception.Mixed_7b, inception.Mixed_7c,
                                    torch.nn.AdaptiveAvgPool2d(output_size=(1, 1))),
            ])
            self.requires_grad_(False)

    return LoadedInceptionV3


# --- features ------------------------------------------------------------------------------------


class _FidelityPass:
    """torch-fidelity's requested features of every batch, plus the sFID map when ``spatial``, on CPU."""

    def __init__(self, model, spatial: bool):
        self.model, self.spatial = model, spatial
        self.out: dict[str, list[torch.Tensor]] = {name: [] for name in model.features_list}
        self.maps: list[torch.Tensor] = []
        self._handle = None

    def _grab(self, _module, _inputs, output):
        # (N, 7, 17, 17) -> (N, 17, 17, 7) -> (N, 2023): guided-diffusion's spatial[..., :7] in TF's layout
        self.maps.append(output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1).to("cpu", torch.float32))

    def __enter__(self):
        if self.spatial:
            self._handle = self.model.get_submodule(SFID_MODULE).register_forward_hook(self._grab)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def add(self, x: torch.Tensor) -> None:
        feats = self.model.convert_features_tuple_to_dict(self.model(x))
        for name, value in feats.items():
            self.out[name].append(value.to("cpu", torch.float32))

    def result(self) -> dict[str, torch.Tensor]:
        result = {name: torch.cat(parts) for name, parts in self.out.items()}
        if self.spatial:
            result["spatial"] = torch.cat(self.maps)
        return result


class _PytorchFidPass:
    """pytorch-fid's 2048-d pool features of every batch (pixels divided by 255, as it expects)."""

    def __init__(self, model):
        self.model, self.parts = model, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def add(self, x: torch.Tensor) -> None:
        self.parts.append(self.model(x.float() / 255)[0].flatten(1).cpu())

    def result(self) -> np.ndarray:
        # float64, as pytorch-fid's get_activations stores them
        return torch.cat(self.parts).numpy().astype(np.float64)


# --- reference side ------------------------------------------------------------------------------


def _cache_dir(settings: InceptionSettings) -> Path:
    if settings.cache_dir:
        return Path(settings.cache_dir).expanduser()
    root = os.environ.get("MODIFF_BENCH_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "modiff-bench") / "inception"


def _cache_file(cache_dir: Path, reference: ReferenceSet, extractor: str, sha16: str, part: str) -> Path:
    return cache_dir / f"{reference.name}--{extractor}--{sha16}--{reference.key()}--{part}.{_CACHE_FORMAT}.npz"


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


def _meta(reference: ReferenceSet, extractor: str, weights: Path, n: int) -> dict:
    identity = reference.identity() if callable(reference.identity) else reference.identity
    return {"reference": reference.name, "identity": identity, "reference_key": reference.key(), "n_images": n,
            "extractor": extractor, "weights": str(weights), "weights_sha256": _sha256(weights),
            "format": _CACHE_FORMAT}


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
    prc = fidelity_ok and "prc" in wanted and "precision" not in missing
    pytorch_fid = pytorch_fid_path is not None and "fid" in wanted and "fid_pytorch_fid" not in missing
    sha16 = _sha16(fidelity_path) if fidelity_path is not None else None
    if fid_sfid and reference.statistics is not None:
        ref["stats"] = _precomputed(reference)
        if "sfid" in fid_sfid and "spatial_mu" not in ref["stats"]:
            missing["sfid"] = (f"reference {reference.name!r} has precomputed pool statistics only "
                               "(no mu_s / sigma_s): sfid needs the spatial ones")
    elif fid_sfid:
        ref["stats"] = _read_cache(_cache_file(cache_dir, reference, TORCH_FIDELITY, sha16, "stats"), STATS_KEYS)
    if prc and reference.load is None:
        missing["precision"] = missing["recall"] = (
            f"reference {reference.name!r} is precomputed statistics only: precision / recall need its images")
        prc = False
    elif prc:
        ref["pool"] = _read_cache(_cache_file(cache_dir, reference, TORCH_FIDELITY, sha16, "pool-features"),
                                  ("pool",))
    if pytorch_fid and reference.statistics is not None:
        missing["fid_pytorch_fid"] = (
            f"reference {reference.name!r} gives fid from precomputed statistics, which pytorch-fid cannot use"
            + ("" if reference.load is None else " (its images need not be the set those statistics describe)"))
        pytorch_fid = False
    elif pytorch_fid:
        ref["pytorch_fid"] = _read_cache(_cache_file(cache_dir, reference, PYTORCH_FID, _sha16(pytorch_fid_path),
                                                     "stats"), ("pool_mu", "pool_sigma", "n"))

    need_stats = bool(fid_sfid) and ref["stats"] is None
    need_pool = prc and ref["pool"] is None
    need_pytorch_fid = pytorch_fid and ref["pytorch_fid"] is None
    if not (need_stats or need_pool or need_pytorch_fid):
        return ref
    try:
        images = reference.load()
    except ReferenceUnavailable as exc:
        reason = " ".join(str(exc).split())
        unserved = ((fid_sfid if need_stats else []) + (["precision", "recall"] if need_pool else [])
                    + (["fid_pytorch_fid"] if need_pytorch_fid else []))
        for column in unserved:
            missing.setdefault(column, reason)
        return ref

    # All torch-fidelity statistics at once when any is missing: the one forward pass gives them all.
    fidelity = pytorch_fid_pass = None
    if need_stats or need_pool:
        fidelity = _FidelityPass(_load_torch_fidelity(fidelity_path, ["2048"], settings.device),
                                 spatial=reference.statistics is None)
    if need_pytorch_fid:
        pytorch_fid_pass = _PytorchFidPass(_load_pytorch_fid(pytorch_fid_path, settings.device))
    stream = _Stream(images, settings.batch_size, f"reference {reference.name!r}")
    _run(stream, [p for p in (fidelity, pytorch_fid_pass) if p is not None], settings.device)
    if stream.bad:
        raise BenchError(f"reference {reference.name!r} contains NaN or inf pixels ({stream.bad} images)")
    if stream.n == 0:
        raise BenchError(f"reference {reference.name!r} has no images")
    if fidelity is not None:
        f = fidelity.result()
        meta = _meta(reference, TORCH_FIDELITY, fidelity_path, stream.n)
        if reference.statistics is None:
            ref["stats"] = _statistics(f["2048"], f["spatial"])
            _write_cache(_cache_file(cache_dir, reference, TORCH_FIDELITY, sha16, "stats"), ref["stats"], meta)
        if prc:
            ref["pool"] = {"pool": f["2048"].numpy()}
            _write_cache(_cache_file(cache_dir, reference, TORCH_FIDELITY, sha16, "pool-features"), ref["pool"],
                         meta)
    if pytorch_fid_pass is not None:
        feats = pytorch_fid_pass.result()
        ref["pytorch_fid"] = {"pool_mu": feats.mean(0), "pool_sigma": np.cov(feats, rowvar=False),
                              "n": np.array(len(feats))}
        _write_cache(_cache_file(cache_dir, reference, PYTORCH_FID, _sha16(pytorch_fid_path), "stats"),
                     ref["pytorch_fid"], _meta(reference, PYTORCH_FID, pytorch_fid_path, stream.n))
    return ref


def _statistics(pool: torch.Tensor, spatial: torch.Tensor) -> dict[str, np.ndarray]:
    from torch_fidelity.metric_fid import fid_features_to_statistics

    pool_stats, spatial_stats = fid_features_to_statistics(pool), fid_features_to_statistics(spatial)
    return {"pool_mu": pool_stats["mu"], "pool_sigma": pool_stats["sigma"],
            "spatial_mu": spatial_stats["mu"], "spatial_sigma": spatial_stats["sigma"]}


# --- metrics -------------------------------------------------------------------------------------


def _torch_fidelity_values(gen: dict[str, torch.Tensor], n: int, ref: dict, pending: list[str],
                           settings: InceptionSettings):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    values: dict[str, float | None] = {}
    missing: dict[str, str] = {}
    for column, feats, key in (("fid", "2048", "pool"), ("sfid", "spatial", "spatial")):
        if column in pending and n < 2:
            missing[column] = f"{column} needs at least 2 generated images, got {n}"
        elif column in pending:
            # float64 on both sides: torch-fidelity wants equal dtypes, and precomputed statistics
            # (guided-diffusion's) are float64 where its own means are float32
            generated = {k: np.asarray(v, np.float64) for k, v in fid_features_to_statistics(gen[feats]).items()}
            reference_stats = {"mu": np.asarray(ref["stats"][f"{key}_mu"], np.float64),
                               "sigma": np.asarray(ref["stats"][f"{key}_sigma"], np.float64)}
            out = fid_statistics_to_metric(generated, reference_stats, verbose=False)
            values[column] = out["frechet_inception_distance"]
    if "is_mean" in pending:
        splits = min(IS_SPLITS, n // 2)
        if splits < 1:
            missing["is_mean"] = missing["is_std"] = f"the Inception score needs at least 2 images, got {n}"
        else:
            out = isc_features_to_metric(gen["logits_unbiased"], splits=splits)
            values["is_mean"], values["is_std"] = out["inception_score_mean"], out["inception_score_std"]
            if splits == 1:
                values["is_std"], missing["is_std"] = None, f"one split only ({n} images): no spread to report"
    if "precision" in pending:
        n_ref = len(ref["pool"]["pool"])
        if min(n, n_ref) <= PRC_NEIGHBOURS:
            missing["precision"] = missing["recall"] = (
                f"precision / recall need more than {PRC_NEIGHBOURS} images on each side (k = {PRC_NEIGHBOURS}), "
                f"got {n} generated and {n_ref} reference")
        else:
            out = prc_features_to_metric(
                gen["2048"].to(settings.device), torch.from_numpy(ref["pool"]["pool"]).to(settings.device),
                prc_neighborhood=PRC_NEIGHBOURS, save_cpu_ram=True, verbose=False)
            values["precision"], values["recall"] = out["precision"], out["recall"]
    return values, missing


def _pytorch_fid_value(feats: np.ndarray, stats: dict) -> tuple[float | None, str | None]:
    n, n_ref = len(feats), int(stats["n"])
    if min(n, n_ref) < 2:
        return None, f"fid_pytorch_fid needs at least 2 images on each side, got {n} generated and {n_ref} reference"
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
