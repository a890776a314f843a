"""Metrics of a cell's samples: a registry, like the methods', of small functions.

A metric is one function registered with :func:`register_metric`; what the harness and the report
need to know about it lives beside it: its result columns, each column's label and whether higher or
lower is better, and what it needs (the full-precision samples from the same seeds, a model)::

    from bench.metrics import Column, register_metric

    @register_metric("mean_abs", columns=[Column("mean_abs", "mean |x|", better="lower")],
                     summary="mean absolute pixel value")
    def mean_abs(inputs):                      # inputs: MetricInputs
        return {"mean_abs": float(inputs.samples.float().abs().mean())}

A matrix uses it by name (``[run] metrics = ["mean_abs"]``) once the file is imported
(``[run] imports = ["my_metric.py"]``, as for user methods); ``modiff-bench evaluate DIR`` adds it to
finished cells from their saved samples. ``inputs.samples`` is the stored float16 tensor as saved
(possibly memory-mapped): convert it chunk by chunk, never all at once (a 50,000-image LSUN cell is
19.6 GB as float16). It is the sampler's output, unclipped: nominally [-1, 1], but 14-23% of the values of
a quantized cell lie outside (to +-28), so a metric that needs [-1, 1] clamps itself, as every built-in
one does (PSNR / MSE on images mapped to [0, 1] and clipped, the domain classifier's and the Inception
networks' inputs clamped to [-1, 1]).

Built in:

- ``psnr_to_fp`` / ``mse_to_fp``: final samples vs the full-precision model's samples from the
  same noise (same seeds, sampler and steps).
- ``fd_domain`` / ``is_domain`` / ``kid_domain``: Frechet distance to the held-out digits, an
  Inception-score analogue and the kernel distance (KID) to the held-out digits, in the feature space
  of the digits model's domain classifier (digits and digits-dit only).
- ``fid``, ``is``, ``sfid``, ``prc``, ``kid``: Inception-based, through torch-fidelity and pytorch-fid
  (``bench.inception``), against each model's reference data (``bench.references``); missing with
  a reason when the weights or the reference data are unavailable. They share one feature pass
  (``group="inception"``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .cell import NON_METRIC_COLUMNS
from .errors import BenchError

NEEDS = ("fp_reference",)  # what a metric may declare it needs beyond the samples


@dataclass(frozen=True)
class Column:
    """One result column of a metric: its label in tables and figures and which way is better
    (``None``: not a quality figure, e.g. a standard deviation). ``quality``: whether the report's
    quality tables and figures show it."""

    name: str
    label: str | None = None
    better: str | None = None  # "higher" | "lower" | None
    quality: bool = True

    def __post_init__(self):
        if self.better not in (None, "higher", "lower"):
            raise ValueError(f"column {self.name!r}: better must be 'higher', 'lower' or None, not {self.better!r}")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    columns: tuple[str, ...]
    summary: str
    needs: tuple[str, ...] = ()
    models: tuple[str, ...] | None = None  # None: any model
    compute: Callable[[MetricInputs], dict] | None = None
    group: str | None = None  # metrics of one group are computed together (the Inception ones)
    column_info: tuple[Column, ...] = ()
    builtin: bool = False
    # the fewest images for which its value means what it says (FD in d-dim features: d + 1, else the
    # covariance is singular); the report marks values computed on fewer
    min_images: int = 1
    # raised when a fix changes what the metric computes: values recorded by an older version are stale and
    # computed again by the next 'run' or 'evaluate' (metrics are not part of cell ids; result.json's
    # metric_versions, absent = 1)
    version: int = 1

    @property
    def needs_fp_reference(self) -> bool:
        return "fp_reference" in self.needs


METRICS: dict[str, MetricSpec] = {}


def register_metric(name: str, columns: Sequence[str | Column] | None = None, summary: str = "",
                    needs: Iterable[str] = (), models: Iterable[str] | None = None, group: str | None = None,
                    min_images: int = 1, version: int = 1, _builtin: bool = False):
    """Decorator: register ``fn(inputs: MetricInputs) -> {column: value}`` as metric ``name``.

    ``columns``: its result columns, names or :class:`Column` (label, better); default one column
    named like the metric. ``needs``: ``"fp_reference"`` to get the full-precision samples of the
    same seeds as ``inputs.fp_reference``. ``models``: the zoo models it is defined for (default any).
    ``min_images``: the fewest images its value needs to mean what it says; the report marks values
    computed on fewer (a cell's ``n_samples``). ``version``: raise it when a fix changes the values: cells
    that recorded an older one compute it again on the next ``run`` or ``evaluate``.
    The function may also return a single number (for a one-column metric) or a tuple (one value per
    column); a column it leaves out is recorded as missing."""
    info = tuple(c if isinstance(c, Column) else Column(c) for c in (columns or [name]))
    needs = tuple(needs)
    unknown = [n for n in needs if n not in NEEDS]
    if unknown:
        raise ValueError(f"metric {name!r}: unknown needs {unknown}; available: {', '.join(NEEDS)}")
    taken = {c for m in METRICS.values() if m.name != name for c in m.columns}
    if not _builtin:
        taken |= set(NON_METRIC_COLUMNS)
    clash = [c.name for c in info if c.name in taken]
    if clash:
        raise ValueError(f"metric {name!r}: column(s) {', '.join(clash)} already used by another metric or "
                         "by the results table")

    def decorate(fn):
        text = summary or ((fn.__doc__ or "").strip().split("\n")[0] if fn is not None else "")
        METRICS[name] = MetricSpec(name, tuple(c.name for c in info), text, needs,
                                   None if models is None else tuple(models), fn, group, info, _builtin,
                                   int(min_images), int(version))
        return fn

    return decorate


def metric_columns(names: Iterable[str] | None = None) -> tuple[str, ...]:
    """The result columns of the named metrics (default: every registered one), in order."""
    chosen = METRICS if names is None else {n: METRICS[n] for n in names if n in METRICS}
    return tuple(c for m in chosen.values() for c in m.columns)


def column_info() -> dict[str, Column]:
    """Every registered metric column -> its :class:`Column` (label, better, quality)."""
    return {c.name: c for m in METRICS.values() for c in m.column_info}


def column_min_images() -> dict[str, int]:
    """Every registered metric column -> the fewest images its metric needs (``min_images``)."""
    return {c: m.min_images for m in METRICS.values() for c in m.columns}


def check_metrics(names: Iterable[str], model: str) -> None:
    for name in names:
        spec = METRICS.get(name)
        if spec is None:
            raise BenchError(f"unknown metric {name!r}; available: {', '.join(METRICS)}")
        if spec.models is not None and model not in spec.models:
            raise BenchError(f"metric {name!r} is defined for {', '.join(spec.models)} only, not model {model!r}")


@dataclass
class MetricInputs:
    # the sampler's output as stored, (N, C, H, W), float16 or float32, maybe memory-mapped; NOT clipped:
    # nominally [-1, 1], with values beyond it (to +-28 in quantized cells); clamp where [-1, 1] is needed
    samples: torch.Tensor
    model: str
    checkpoint: str | None = None
    fp_reference: torch.Tensor | None = None  # full-precision samples from the same seeds
    inception: object | None = None  # bench.inception.InceptionSettings
    extra: dict = field(default_factory=dict)

    @property
    def reference(self) -> torch.Tensor | None:
        """The former name of ``fp_reference`` (read-only)."""
        return self.fp_reference


# -- the built-in metrics ----------------------------------------------------------------------
def mse_to_fp(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error on images mapped to [0, 1] and clipped there (the images as they would be saved:
    values beyond [-1, 1] are not pixels), over all pixels of all images."""
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
    """FD between all samples and all 364 held-out digits (neither seen by the classifier); the samples
    clamped to [-1, 1] (``features_and_logits``)."""
    from .domain import features_and_logits, frechet_distance

    classifier, heldout = _digits_domain(checkpoint)
    return frechet_distance(features_and_logits(classifier, samples.float())[0], heldout)


def is_domain(samples: torch.Tensor, checkpoint: str | None = None) -> tuple[float, float]:
    """Mean and std over 10 splits, fewer below 20 samples: every split holds at least two images (a
    one-image split scores exactly 1), as the Inception score's ``N // 2``; samples clamped to [-1, 1]."""
    from .domain import features_and_logits, inception_score

    classifier, _ = _digits_domain(checkpoint)
    return inception_score(features_and_logits(classifier, samples.float())[1], splits=10)


def kid_domain(samples: torch.Tensor, checkpoint: str | None = None) -> tuple[float, float, int]:
    """KID between the samples and the 364 held-out digits in the domain classifier's features (samples
    clamped to [-1, 1]): mean and std over 100 subsets, and the subset size, ``min(1000, N, 364)``."""
    from .domain import features_and_logits, kernel_distance

    classifier, heldout = _digits_domain(checkpoint)
    return kernel_distance(features_and_logits(classifier, samples)[0], heldout)  # torch-fidelity's 100 x 1000


# the models the digits domain classifier measures: digits-dit (bench.zoo.digits_dit) reuses the digits model's
DOMAIN_MODELS = ["digits", "digits-dit"]


def _domain_checkpoint(inputs: MetricInputs) -> str | None:
    """Where the domain classifier is: a digits checkpoint holds its own, a digits-dit one none (the packaged
    digits classifier)."""
    return inputs.checkpoint if inputs.model == "digits" else None


register_metric("psnr_to_fp", [Column("psnr_to_fp", "PSNR to FP (dB)", "higher")],
                "PSNR (dB) of the [0, 1]-clipped samples vs full precision from the same noise",
                needs=["fp_reference"], _builtin=True)(
    lambda inputs: {"psnr_to_fp": psnr_to_fp(inputs.samples, inputs.fp_reference)})
register_metric("mse_to_fp", [Column("mse_to_fp", "MSE to FP", "lower", quality=False)],
                "MSE of [0, 1] samples vs full precision from the same noise", needs=["fp_reference"],
                _builtin=True)(lambda inputs: {"mse_to_fp": mse_to_fp(inputs.samples, inputs.fp_reference)})
register_metric("fd_domain", [Column("fd_domain", "FD (domain)", "lower")],
                "Frechet distance to the held-out digits in the domain classifier's 64-d features",
                models=DOMAIN_MODELS, min_images=65, version=2, _builtin=True)(  # 2: samples clamped to [-1, 1]
    lambda inputs: {"fd_domain": fd_domain(inputs.samples, _domain_checkpoint(inputs))})
register_metric("is_domain", [Column("is_domain", "IS (domain)", "higher"), Column("is_domain_std", quality=False)],
                "Inception-score analogue on the domain classifier's logits (10 splits of at least 2 images)",
                models=DOMAIN_MODELS, min_images=20, version=2, _builtin=True)(  # 2: clamped, splits of >= 2
    lambda inputs: dict(zip(("is_domain", "is_domain_std"), is_domain(inputs.samples, _domain_checkpoint(inputs)),
                            strict=True)))
# kid_domain stays out of the report's quality tables (quality=False): its scale is the classifier's features'
# (thousands), and the digits tables already carry FD and IS in those features; results.csv has it
register_metric("kid_domain", [Column("kid_domain", "KID (domain)", "lower", quality=False),
                               Column("kid_domain_std", quality=False),
                               Column("kid_domain_subset_size", quality=False)],
                "KID (torch-fidelity) to the held-out digits in the domain classifier's features; subset size "
                "min(1000, N, 364)", models=DOMAIN_MODELS, min_images=2, _builtin=True)(
    lambda inputs: kid_domain(inputs.samples, _domain_checkpoint(inputs)))
for _name, _columns, _summary, _min in (
    ("fid", [Column("fid", "FID", "lower"), Column("fid_pytorch_fid", "FID (pytorch-fid)", "lower", quality=False)],
     "FID via torch-fidelity, and pytorch-fid as a cross-check", 2049),  # 2048-d pool features
    ("is", [Column("is_mean", "IS", "higher"), Column("is_std", quality=False)], "Inception score via torch-fidelity",
     20),  # 10 splits of at least 2
    ("sfid", [Column("sfid", "sFID", "lower")], "spatial FID (guided-diffusion: Inception mixed_6/conv, first 7 "
     "channels)", 2024),  # 2023-d spatial features
    ("prc", [Column("precision", "precision", "higher", quality=False),
             Column("recall", "recall", "higher", quality=False)], "precision / recall (torch-fidelity prc, k=3)", 4),
    ("kid", [Column("kid", "KID", "lower"), Column("kid_std", quality=False),
             Column("kid_subset_size", quality=False)],
     "KID via torch-fidelity (unbiased at small N); subset size min(1000, N, reference images)", 2),
):
    register_metric(_name, _columns, _summary, group="inception", min_images=_min, _builtin=True)(None)
INCEPTION_METRICS = tuple(n for n, m in METRICS.items() if m.group == "inception")
ALL_COLUMNS = metric_columns()  # the built-in metrics' columns (user metrics add theirs when imported)


def inception_reference(model: str, settings=None, size: tuple[int, int] | None = None):
    """The real images FID / sFID / precision-recall compare against: a ``bench.inception.ReferenceSet``
    for ``model`` under the ``[inception]`` settings (``InceptionSettings``), or a one-line reason why
    there is none. ``size``: the generated images' (height, width). See ``bench.references``."""
    from .references import reference_for

    return reference_for(model, settings, size)


def _as_values(spec: MetricSpec, result) -> dict:
    """A metric function's result as {column: value} (a dict, a number, or one value per column)."""
    if isinstance(result, dict):
        unknown = [c for c in result if c not in spec.columns]
        if unknown:
            raise ValueError(f"metric {spec.name!r} returned column(s) {unknown} it did not declare "
                             f"({', '.join(spec.columns)})")
        return dict(result)
    if isinstance(result, (tuple, list)):
        if len(result) != len(spec.columns):
            raise ValueError(f"metric {spec.name!r} returned {len(result)} values for {len(spec.columns)} columns")
        return dict(zip(spec.columns, result, strict=True))
    if len(spec.columns) != 1:
        raise ValueError(f"metric {spec.name!r} returned one value for {len(spec.columns)} columns")
    return {spec.columns[0]: result}


def _number(value):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


def compute_metrics(names: Iterable[str], inputs: MetricInputs) -> tuple[dict[str, float | None], dict[str, str]]:
    """Values for every column of the named metrics, and a reason for each column left None."""
    names = list(dict.fromkeys(names))
    check_metrics(names, inputs.model)
    values: dict[str, float | None] = {}
    missing: dict[str, str] = {}
    for name in names:
        spec = METRICS[name]
        if spec.needs_fp_reference and inputs.fp_reference is None:
            for column in spec.columns:
                values[column], missing[column] = None, "no full-precision reference samples"
            continue
        if spec.compute is None:  # a group's metric: below
            continue
        got = _as_values(spec, spec.compute(inputs))
        for column in spec.columns:
            try:
                values[column] = _number(got.get(column))
            except TypeError as exc:
                raise ValueError(f"metric {name!r}, column {column!r}: {exc}") from None
            if values[column] is None:
                missing[column] = f"metric {name!r} returned no value"
    wanted = [n for n in names if METRICS[n].group == "inception"]
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
