"""The metric formulas, on features (numpy arrays or CPU tensors), each the library's own function.

``fid``
    torch-fidelity (``inception-v3-compat``, the port of the TF graph the papers used), 2048-d
    pool features, Frechet distance by torch-fidelity's own ``fid_statistics_to_metric``.
``fid_pytorch_fid``
    The cross-check: pytorch-fid's ``InceptionV3`` 2048-d pool features, Frechet distance by
    pytorch-fid's own ``calculate_frechet_distance`` (the function ``bench.domain.frechet_distance``
    wraps; called here on statistics because the reference side is cached as statistics). Past our
    uint8 conversion the two columns share no code, so their agreement means something (how the two
    libraries' inputs differ: ``bench.inception.features``).
``is_mean``, ``is_std``
    torch-fidelity's ``isc_features_to_metric`` on its ``logits_unbiased`` (its default for IS),
    10 splits; with fewer than 20 images, ``N // 2`` splits so that every split holds at least two
    images (a one-image split always scores exactly 1). ``is_std`` is missing with one split.
``sfid``
    guided-diffusion's spatial features (``mixed_6/conv``, 2023 dims; how they are taken:
    ``bench.inception.features``). The distance is torch-fidelity's ``fid_statistics_to_metric``: the
    same quantity as the evaluator's sqrtm formula (the trace of the square root of S1 S2 is the sum of
    the square roots of its eigenvalues), several times faster at 2023 dims and free of sqrtm's spurious
    imaginary parts on rank-deficient covariances.
``precision``, ``recall``
    torch-fidelity's ``prc_features_to_metric`` (k = 3 neighbours) on the same Inception 2048-d
    pool features, not on torch-fidelity's default for prc (VGG16 ``fc2_relu``, as in Kynkaanniemi
    et al. 2019): guided-diffusion's evaluator, whose numbers diffusion papers report next to FID
    and sFID, computes precision / recall on the Inception pool features, and so no second weights
    file is needed (VGG16 has no offline path in ``InceptionSettings``). Not comparable with
    VGG16-based precision / recall.
``kid``, ``kid_std``, ``kid_subset_size``
    torch-fidelity's ``kid_features_to_metric`` (unbiased MMD^2, cubic polynomial kernel, 100 subsets) on
    the same pool features. The library's subset size is 1000 and it asserts both sides hold a whole
    subset; here it is ``min(1000, N generated, N reference)``, recorded in ``kid_subset_size`` (KID is
    unbiased at any subset size, only noisier when it is small).

How many images each formula needs, and the reasons given when there are too few, are
``bench.inception.metrics``'s business; these functions only compute.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import numpy as np
import torch

IS_SPLITS = 10
PRC_NEIGHBOURS = 3
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults
STATS_KEYS = ("pool_mu", "pool_sigma", "spatial_mu", "spatial_sigma")  # torch-fidelity's statistics of a set


def fid_sfid_statistics(pool: torch.Tensor, spatial: torch.Tensor) -> dict[str, np.ndarray]:
    """torch-fidelity's mean and covariance of the pool and the spatial features (``STATS_KEYS``)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    pool_stats, spatial_stats = fid_features_to_statistics(pool), fid_features_to_statistics(spatial)
    return {"pool_mu": pool_stats["mu"], "pool_sigma": pool_stats["sigma"],
            "spatial_mu": spatial_stats["mu"], "spatial_sigma": spatial_stats["sigma"]}


def fidelity_frechet_distance(features: torch.Tensor, mu: np.ndarray, sigma: np.ndarray) -> float:
    """torch-fidelity's Frechet distance between the statistics of ``features`` (N, D) and ``mu`` /
    ``sigma`` (the reference's): ``fid`` on pool features, ``sfid`` on spatial ones."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    # float64 on both sides: torch-fidelity wants equal dtypes, and precomputed statistics
    # (guided-diffusion's) are float64 where its own means are float32
    generated = {k: np.asarray(v, np.float64) for k, v in fid_features_to_statistics(features).items()}
    reference = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    return fid_statistics_to_metric(generated, reference, verbose=False)["frechet_inception_distance"]


def fidelity_inception_score(logits: torch.Tensor, splits: int) -> tuple[float, float]:
    """torch-fidelity's Inception score (mean, std over ``splits``) of unbiased logits (N, 1008)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(logits, splits=splits)
    return out["inception_score_mean"], out["inception_score_std"]


def fidelity_precision_recall(generated: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """torch-fidelity's precision and recall (``PRC_NEIGHBOURS`` neighbours) of two feature sets, on the
    device they are on."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = prc_features_to_metric(generated, reference, prc_neighborhood=PRC_NEIGHBOURS, save_cpu_ram=True,
                                 verbose=False)
    return out["precision"], out["recall"]


def fidelity_kernel_distance(generated: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, int]:
    """torch-fidelity's KID (mean, std over ``KID_SUBSETS`` subsets) of two feature sets, and the subset size:
    ``KID_SUBSET_SIZE`` capped at the smaller set (``bench.domain.kernel_distance``)."""
    from ..domain import kernel_distance

    return kernel_distance(generated, reference, KID_SUBSETS, KID_SUBSET_SIZE)


def pytorch_fid_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of (N, 2048) features, as pytorch-fid's ``calculate_activation_statistics``."""
    return features.mean(0), np.cov(features, rowvar=False)


def pytorch_fid_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's ``calculate_frechet_distance``, quietly (its notes go to stderr). Raises its
    ``ValueError`` ("Imaginary component ...") when there is no trustworthy number."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    from scipy.linalg import LinAlgWarning

    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        # Fewer images than dimensions make the covariance product singular; its square root is
        # still defined, and the library adds an offset (printing a note) when it is not finite.
        warnings.simplefilter("ignore", LinAlgWarning)
        warnings.filterwarnings("ignore", message="The `disp` argument is deprecated", category=DeprecationWarning)
        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
