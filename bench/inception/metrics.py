"""The Inception columns of a cell: which columns each metric gives, one streamed pass over the
generated images, and a value or a one-line reason for every column (missing weights, missing
reference data, too few images, a non-finite result), never a made-up number. Images are clamped to
[-1, 1] before the networks (``bench.inception.features``): stored samples are unclipped."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from . import features, formulas, stats_cache, weights
from .features import Images
from .formulas import IS_SPLITS, PRC_NEIGHBOURS
from .reference import ReferenceSet, _check_name, _reference_side
from .settings import InceptionSettings
from .weights import _one_line

COLUMNS = ("fid", "fid_pytorch_fid", "is_mean", "is_std", "sfid", "precision", "recall", "kid", "kid_std",
           "kid_subset_size")
METRIC_COLUMNS = {
    "fid": ("fid", "fid_pytorch_fid"),
    "is": ("is_mean", "is_std"),
    "sfid": ("sfid",),
    "prc": ("precision", "recall"),
    "kid": ("kid", "kid_std", "kid_subset_size"),
}


def inception_metrics(
    images: Images,
    reference: ReferenceSet | None,
    metrics: Iterable[str],
    settings: InceptionSettings | None = None,
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Values for every column of ``metrics`` (a subset of ``METRIC_COLUMNS``) and, for each
    column left None, a one-line reason. ``images``: one tensor, or an iterable of tensors (batches),
    float in [-1, 1] or uint8; a tensor may be memory-mapped (``torch.load(mmap=True)``): it is read
    ``batch_size`` images at a time. ``reference`` may be None when only ``is`` is asked for. Missing
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
    if reference is not None:
        _check_name(reference)
    if torch.is_tensor(images):  # a tensor is checked before any work; an iterable while it streams
        features._check_images(images, "images")
        if len(images) == 0:
            return values, dict.fromkeys(columns, "no generated images")
        bad = features._count_non_finite(images, settings.batch_size)
        if bad:  # a diverged sampler: no metric of these samples means anything
            return values, dict.fromkeys(columns, f"{bad} of {len(images)} generated images contain NaN or inf")

    cache_dir = stats_cache.cache_dir(settings)
    fidelity_path = pytorch_fid_path = None
    fidelity_columns = [c for c in columns if c != "fid_pytorch_fid"]
    if fidelity_columns:
        fidelity_path, reason = weights._weights_file(settings.weights, weights._torch_fidelity_url(),
                                                      "torch-fidelity", "weights", settings.download)
        if reason:
            missing.update(dict.fromkeys(fidelity_columns, reason))
    if "fid_pytorch_fid" in columns:
        pytorch_fid_path, reason = weights._weights_file(settings.pytorch_fid_weights, weights._pytorch_fid_url(),
                                                         "pytorch-fid", "pytorch_fid_weights", settings.download)
        if reason:
            missing["fid_pytorch_fid"] = reason

    ref = _reference_side(reference, wanted, fidelity_path, pytorch_fid_path, settings, cache_dir, missing)
    if all(c in missing for c in columns):
        return values, missing

    pending = [c for c in columns if c not in missing]
    fidelity = None
    if any(c != "fid_pytorch_fid" for c in pending):
        names = [f for f, used in (("2048", bool({"fid", "precision", "recall", "kid"} & set(pending))),
                                   ("logits_unbiased", "is_mean" in pending)) if used]
        fidelity = features._FidelityPass(
            weights._load_torch_fidelity(fidelity_path, names or ["768"], settings.device), spatial="sfid" in pending)
    pytorch_fid = None
    if "fid_pytorch_fid" in pending:
        pytorch_fid = features._PytorchFidPass(weights._load_pytorch_fid(pytorch_fid_path, settings.device))
    stream = features._Stream(images, settings.batch_size, "images")
    features._run(stream, [p for p in (fidelity, pytorch_fid) if p is not None], settings.device)
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


def _parse_metrics(metrics: Iterable[str]) -> list[str]:
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in names if m not in METRIC_COLUMNS]
    if unknown:
        raise ValueError(f"unknown Inception metric(s) {', '.join(map(repr, unknown))}; "
                         f"available: {', '.join(METRIC_COLUMNS)}")
    return list(dict.fromkeys(names))


def _torch_fidelity_values(gen: dict[str, torch.Tensor], n: int, ref: dict, pending: list[str],
                           settings: InceptionSettings):
    values: dict[str, float | None] = {}
    missing: dict[str, str] = {}
    for column, feats, key in (("fid", "2048", "pool"), ("sfid", "spatial", "spatial")):
        if column in pending and n < 2:
            missing[column] = f"{column} needs at least 2 generated images, got {n}"
        elif column in pending:
            values[column] = formulas.fidelity_frechet_distance(gen[feats], ref["stats"][f"{key}_mu"],
                                                                ref["stats"][f"{key}_sigma"])
    if "is_mean" in pending:
        splits = min(IS_SPLITS, n // 2)
        if splits < 1:
            missing["is_mean"] = missing["is_std"] = f"the Inception score needs at least 2 images, got {n}"
        else:
            values["is_mean"], values["is_std"] = formulas.fidelity_inception_score(gen["logits_unbiased"], splits)
            if splits == 1:
                values["is_std"], missing["is_std"] = None, f"one split only ({n} images): no spread to report"
    if "precision" in pending:
        n_ref = len(ref["pool"]["pool"])
        if min(n, n_ref) <= PRC_NEIGHBOURS:
            missing["precision"] = missing["recall"] = (
                f"precision / recall need more than {PRC_NEIGHBOURS} images on each side (k = {PRC_NEIGHBOURS}), "
                f"got {n} generated and {n_ref} reference")
        else:
            values["precision"], values["recall"] = formulas.fidelity_precision_recall(
                gen["2048"].to(settings.device), torch.from_numpy(ref["pool"]["pool"]).to(settings.device))
    if "kid" in pending:
        n_ref = len(ref["pool"]["pool"])
        if min(n, n_ref) < 2:
            missing["kid"] = missing["kid_std"] = missing["kid_subset_size"] = (
                f"KID needs at least 2 images on each side, got {n} generated and {n_ref} reference")
        else:
            values["kid"], values["kid_std"], size = formulas.fidelity_kernel_distance(
                gen["2048"], torch.from_numpy(ref["pool"]["pool"]))
            values["kid_subset_size"] = float(size)
    return values, missing


def _pytorch_fid_value(feats: np.ndarray, stats: dict) -> tuple[float | None, str | None]:
    n, n_ref = len(feats), int(stats["n"])
    if min(n, n_ref) < 2:
        return None, f"fid_pytorch_fid needs at least 2 images on each side, got {n} generated and {n_ref} reference"
    mu, sigma = formulas.pytorch_fid_statistics(feats)
    try:
        return formulas.pytorch_fid_frechet_distance(mu, sigma, stats["pool_mu"], stats["pool_sigma"]), None
    except ValueError as exc:  # "Imaginary component ...": no trustworthy number
        return None, f"pytorch-fid could not compute the distance: {_one_line(exc)}"

