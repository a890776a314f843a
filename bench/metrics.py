"""Metrics of a cell's samples, each a small function; the registry maps metric names to columns.

- ``psnr_to_fp`` / ``mse_to_fp``: final samples vs the full-precision model's samples from the
  same noise (same seeds, sampler and steps).
- ``fd_domain`` / ``is_domain``: Frechet distance to the held-out digits and an Inception-score
  analogue, in the feature space of the digits model's domain classifier (digits only).
- ``fid``, ``is``, ``sfid``, ``prc``: Inception-based, through torch-fidelity and pytorch-fid
  (``bench.inception``), against each model's reference data (``bench.references``); missing with
  a reason when the weights or the reference data are unavailable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .errors import BenchError


def mse_to_fp(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error on images mapped to [0, 1] (clipped), over all pixels of all images."""
    if samples.shape != reference.shape:
        raise ValueError(f"shape mismatch: {tuple(samples.shape)} vs {tuple(reference.shape)}")
    total, chunk = 0.0, 256  # in chunks: 50,000 LSUN images in float64 would take 80 GB at once
    for i in range(0, len(samples), chunk):
        a = ((samples[i: i + chunk].double() + 1) / 2).clamp(0, 1)
        b = ((reference[i: i + chunk].double() + 1) / 2).clamp(0, 1)
        total += float((a - b).pow(2).sum())
    return total / max(samples.numel(), 1)


def psnr_to_fp(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of [0, 1] images against the reference: ``10 log10(1 / MSE)`` with the MSE over
    the whole set (inf when identical)."""
    mse = mse_to_fp(samples, reference)
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    columns: tuple[str, ...]
    summary: str
    needs_fp_reference: bool = False
    models: tuple[str, ...] | None = None  # None: any model


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("psnr_to_fp", ("psnr_to_fp",), "PSNR (dB) of the samples vs full precision from the same noise", True),
    MetricSpec("mse_to_fp", ("mse_to_fp",), "MSE of [0, 1] samples vs full precision from the same noise", True),
    MetricSpec("fd_domain", ("fd_domain",), "Frechet distance to the held-out digits in the domain classifier's "
               "64-d features", models=("digits",)),
    MetricSpec("is_domain", ("is_domain", "is_domain_std"), "Inception-score analogue on the domain classifier's "
               "logits (10 splits)", models=("digits",)),
    MetricSpec("fid", ("fid", "fid_pytorch_fid"), "FID via torch-fidelity, and pytorch-fid as a cross-check"),
    MetricSpec("is", ("is_mean", "is_std"), "Inception score via torch-fidelity"),
    MetricSpec("sfid", ("sfid",), "spatial FID (guided-diffusion: Inception mixed_6/conv, first 7 channels)"),
    MetricSpec("prc", ("precision", "recall"), "precision / recall (torch-fidelity prc, k=3)"),
)}
INCEPTION_METRICS = ("fid", "is", "sfid", "prc")
ALL_COLUMNS = tuple(c for m in METRICS.values() for c in m.columns)


def check_metrics(names: Iterable[str], model: str) -> None:
    for name in names:
        spec = METRICS.get(name)
        if spec is None:
            raise BenchError(f"unknown metric {name!r}; available: {', '.join(METRICS)}")
        if spec.models is not None and model not in spec.models:
            raise BenchError(f"metric {name!r} is defined for {', '.join(spec.models)} only, not model {model!r}")


@dataclass
class MetricInputs:
    samples: torch.Tensor  # images in [-1, 1], (N, C, H, W), float16 or float32 (as stored)
    model: str
    checkpoint: str | None = None
    reference: torch.Tensor | None = None  # full-precision samples from the same seeds
    inception: object | None = None  # bench.inception.InceptionSettings
    extra: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def _digits_domain(checkpoint: str | None):
    """The domain classifier and the held-out digits' features (computed once per process)."""
    from .data import load_digits_split
    from .domain import features_and_logits
    from .zoo import digits

    classifier = digits.load_classifier(checkpoint)
    heldout_features, _ = features_and_logits(classifier, load_digits_split("heldout").images)
    return classifier, heldout_features


def fd_domain(samples: torch.Tensor, checkpoint: str | None = None) -> float:
    """FD between all samples and all 364 held-out digits (neither seen by the classifier)."""
    from .domain import features_and_logits, frechet_distance

    classifier, heldout = _digits_domain(checkpoint)
    return frechet_distance(features_and_logits(classifier, samples.float())[0], heldout)


def is_domain(samples: torch.Tensor, checkpoint: str | None = None) -> tuple[float, float]:
    """Mean and std over 10 splits (fewer when there are fewer than 10 samples)."""
    from .domain import features_and_logits, inception_score

    classifier, _ = _digits_domain(checkpoint)
    return inception_score(features_and_logits(classifier, samples.float())[1], splits=min(10, len(samples)))


def inception_reference(model: str, settings=None, size: tuple[int, int] | None = None):
    """The real images FID / sFID / precision-recall compare against: a ``bench.inception.ReferenceSet``
    for ``model`` under the ``[inception]`` settings (``InceptionSettings``), or a one-line reason why
    there is none. ``size``: the generated images' (height, width). See ``bench.references``."""
    from .references import reference_for

    return reference_for(model, settings, size)


def compute_metrics(names: Iterable[str], inputs: MetricInputs) -> tuple[dict[str, float | None], dict[str, str]]:
    """Values for every column of the named metrics, and a reason for each column left None."""
    names = list(dict.fromkeys(names))
    check_metrics(names, inputs.model)
    values: dict[str, float | None] = {}
    missing: dict[str, str] = {}
    for name in names:
        spec = METRICS[name]
        if spec.needs_fp_reference and inputs.reference is None:
            for column in spec.columns:
                values[column], missing[column] = None, "no full-precision reference samples"
            continue
        if name == "psnr_to_fp":
            values[name] = psnr_to_fp(inputs.samples, inputs.reference)
        elif name == "mse_to_fp":
            values[name] = mse_to_fp(inputs.samples, inputs.reference)
        elif name == "fd_domain":
            values[name] = fd_domain(inputs.samples, inputs.checkpoint)
        elif name == "is_domain":
            values["is_domain"], values["is_domain_std"] = is_domain(inputs.samples, inputs.checkpoint)
    wanted = [n for n in names if n in INCEPTION_METRICS]
    if wanted:
        from .inception import InceptionSettings, inception_metrics

        settings = inputs.inception or InceptionSettings()
        reference = None
        if any(n != "is" for n in wanted):  # the Inception score needs no reference
            reference = inception_reference(inputs.model, settings, tuple(inputs.samples.shape[-2:]))
        if isinstance(reference, str):
            for column in (c for n in wanted if n != "is" for c in METRICS[n].columns):
                values[column], missing[column] = None, reference
            wanted, reference = [n for n in wanted if n == "is"], None
        if wanted:
            got, why = inception_metrics(inputs.samples, reference, wanted, settings)
            values.update(got)
            missing.update(why)
    return values, missing
