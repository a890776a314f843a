"""The embedded model's quality bar, measured afresh from the committed checkpoint."""

import numpy as np
import pytest
import torch

from bench.data import load_digits_split
from bench.domain import features_and_logits, frechet_distance, quality_report
from bench.errors import BenchError
from modiff.samplers import SamplerConfig, sample


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.standard_normal((20000, 4)))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # N(0, I) vs N(m, 4 I): |m|^2 + tr(I + 4I - 2*2I) = |m|^2 + 4
    b = torch.from_numpy(rng.standard_normal((20000, 4)) * 2 + np.array([1.0, 0, 0, 2.0]))
    assert frechet_distance(a, b) == pytest.approx(5.0 + 4.0, rel=0.03)


def test_classifier_accuracy_on_heldout_digits(classifier):
    heldout = load_digits_split("heldout")
    _, logits = features_and_logits(classifier, heldout.images)
    assert (logits.argmax(1) == heldout.labels).double().mean() > 0.95


def test_quality_bar_accepts_real_digits_and_rejects_noise_and_smeared_digits(classifier):
    """The bar can fail: real digits pass it, pure noise and heavily degraded digits do not."""
    real = load_digits_split("train").images[:360]
    assert quality_report(classifier, real).passes
    noise = torch.rand(360, 1, 16, 16) * 2 - 1
    assert not quality_report(classifier, noise).passes
    smeared = torch.nn.functional.avg_pool2d(real, 5, stride=1, padding=2)
    assert not quality_report(classifier, smeared).passes


def test_quality_bar_compares_equally_large_unseen_sets(classifier):
    report = quality_report(classifier, load_digits_split("train").images[:300])
    assert report.n_fd == len(load_digits_split("heldout-b").images) == 179
    with pytest.raises(BenchError, match="at least 179 samples"):
        quality_report(classifier, load_digits_split("train").images[:100])


def test_committed_model_meets_the_quality_bar(digits_model, classifier):
    config = SamplerConfig.from_name("ddim-quad", 100)
    samples = sample(digits_model.denoiser(), digits_model.schedule, config, range(360),
                     digits_model.image_shape, batch_size=120, progress=False)
    report = quality_report(classifier, samples)
    assert report.fd_ratio <= 3.0, report
    assert report.samples.confident_rate >= report.heldout.confident_rate - 0.05, report
    assert report.passes
    assert min(report.samples.class_histogram) >= 10  # no mode collapse onto a few digits
