"""Domain metrics for the embedded digits models (``digits``, and ``digits-dit``, which reuses its classifier).

The Inception network has nothing meaningful to say about 16x16 greyscale digits, so the digits
preset measures quality with a small CNN classifier the project trains on the digits training
split: Frechet distance on its penultimate features (``fd_domain``), an Inception-score analogue
on its logits (``is_domain``), and how confidently it assigns samples a class. The distance and
score formulas are the libraries' own (pytorch-fid's ``calculate_frechet_distance`` and
torch-fidelity's ``isc_features_to_metric``); only the feature extractor is ours.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .data import load_digits_split
from .errors import BenchError

CONFIDENT_THRESHOLD = 0.9  # max-softmax at or above this counts as a confident class
FD_RATIO_LIMIT = 3.0  # quality bar: FD(samples, held-out A) <= 3 x FD(held-out B, held-out A)
CONFIDENT_RATE_SLACK = 0.05  # quality bar: confident rate of samples >= real rate - 5 points


class DigitClassifier(nn.Module):
    """Two conv stages and a 64-d penultimate layer; ~0.1M parameters."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


@dataclass
class ConfidenceStats:
    mean_max_softmax: float
    confident_rate: float
    class_histogram: list[int]


@torch.no_grad()
def features_and_logits(
    classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's penultimate features and logits of ``images``, clamped to [-1, 1] first: it was
    trained on digits in [-1, 1], and stored samples are the sampler's unclipped output (some values reach
    -2.4 or +-28), which would put its features where no digit is."""
    classifier.eval()
    feats, logits = [], []
    for chunk in images.split(batch_size):
        f = classifier.features(chunk.float().clamp(-1, 1))
        feats.append(f)
        logits.append(classifier.head(f))
    return torch.cat(feats).double(), torch.cat(logits).double()


def confidence_stats(logits: torch.Tensor) -> ConfidenceStats:
    p = logits.softmax(dim=1)
    top = p.max(dim=1)
    hist = torch.bincount(top.indices, minlength=p.shape[1])
    return ConfidenceStats(
        mean_max_softmax=float(top.values.mean()),
        confident_rate=float((top.values >= CONFIDENT_THRESHOLD).double().mean()),
        class_histogram=[int(c) for c in hist],
    )


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance
    from scipy.linalg import LinAlgWarning

    a, b = feats_a.cpu().numpy().astype(np.float64), feats_b.cpu().numpy().astype(np.float64)
    with warnings.catch_warnings():
        # Dead ReLU units give zero-variance dimensions, so the covariance product is singular; its
        # square root is still well defined and the library falls back to an offset if it is not finite.
        warnings.simplefilter("ignore", LinAlgWarning)
        return float(
            calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        )


def is_splits(n: int, splits: int = 10) -> int:
    """How many splits the Inception score of ``n`` images takes: ``splits``, fewer when that would leave a
    split with fewer than two images (a one-image split scores exactly 1), at least one."""
    return max(1, min(splits, n // 2))


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """torch-fidelity's Inception score (mean, std over splits) of ``logits``; ``splits`` is capped so that
    every split holds at least two images (:func:`is_splits`)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(logits.cpu(), splits=is_splits(len(logits), splits), shuffle=True, rng_seed=2020)
    return out["inception_score_mean"], out["inception_score_std"]


def kernel_distance(feats_a: torch.Tensor, feats_b: torch.Tensor, subsets: int = 100,
                    subset_size: int = 1000) -> tuple[float, float, int]:
    """torch-fidelity's KID (``kid_features_to_metric``: unbiased MMD^2 with its cubic polynomial kernel, mean
    and std over ``subsets`` random subsets) between two feature sets, and the subset size it used:
    ``subset_size`` capped at the smaller set (the library asserts both sets hold a whole subset)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(subset_size, len(feats_a), len(feats_b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {len(feats_a)} and {len(feats_b)}")
    out = kid_features_to_metric(feats_a.cpu().double(), feats_b.cpu().double(), kid_subsets=subsets,
                                 kid_subset_size=size, verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"], size


@dataclass
class QualityReport:
    n_samples: int
    n_fd: int  # images per set in both Frechet distances
    fd_samples_vs_heldout: float
    fd_real_vs_heldout: float
    fd_ratio: float
    is_samples: tuple[float, float]
    is_real: tuple[float, float]
    samples: ConfidenceStats
    heldout: ConfidenceStats
    passes: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        d["criteria"] = {
            "confident_threshold": CONFIDENT_THRESHOLD,
            "fd_ratio_limit": FD_RATIO_LIMIT,
            "confident_rate_slack": CONFIDENT_RATE_SLACK,
        }
        return d


def quality_report(classifier: DigitClassifier, samples: torch.Tensor) -> QualityReport:
    """The embedded model's quality bar.

    - Confidence: samples get a confident class (max softmax >= ``CONFIDENT_THRESHOLD``) at least
      as often as the held-out digits do, minus ``CONFIDENT_RATE_SLACK``.
    - Frechet distance: FD(samples, held-out half A) is within ``FD_RATIO_LIMIT`` times
      FD(held-out half B, held-out half A), both with as many images as half B. Neither half was
      seen by the classifier (training images would look closer than they are: its features
      overfit them).
    """
    reference = load_digits_split("heldout-a").images
    real = load_digits_split("heldout-b").images
    heldout = load_digits_split("heldout").images
    n_fd = len(real)
    if len(samples) < n_fd:
        raise BenchError(f"the quality bar needs at least {n_fd} samples (as many as held-out half B), "
                         f"got {len(samples)}")
    f_s, l_s = features_and_logits(classifier, samples)
    f_ref, _ = features_and_logits(classifier, reference)
    f_real, l_real = features_and_logits(classifier, real)
    _, l_h = features_and_logits(classifier, heldout)
    fd_s, fd_r = frechet_distance(f_s[:n_fd], f_ref), frechet_distance(f_real, f_ref)
    conf_s, conf_h = confidence_stats(l_s), confidence_stats(l_h)
    passes = fd_s <= FD_RATIO_LIMIT * fd_r and conf_s.confident_rate >= conf_h.confident_rate - CONFIDENT_RATE_SLACK
    return QualityReport(
        n_samples=len(samples), n_fd=n_fd, fd_samples_vs_heldout=fd_s, fd_real_vs_heldout=fd_r,
        fd_ratio=fd_s / fd_r, is_samples=inception_score(l_s[:n_fd]), is_real=inception_score(l_real),
        samples=conf_s, heldout=conf_h, passes=bool(passes),
    )
