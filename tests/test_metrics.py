"""The metrics (``bench.metrics``): PSNR / MSE to full precision on known images, and every metric on what is
really stored and on few images (issue #25, items 7, 13 and 14).

Stored samples are the sampler's output, unclipped (values to +-28 in quantized cells): every metric that
needs [-1, 1] clamps itself. The Inception-score analogue splits so that every split holds two images, the
report marks values computed on fewer images than their metric needs, and KID (torch-fidelity's
``kid_features_to_metric``) takes a subset size that fits the sets and records it.
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.data import load_digits_split
from bench.metrics import mse_to_fp, psnr_to_fp

pytestmark = pytest.mark.usefixtures("one_thread")
SHORT_MARK = "†"  # reports.tables marks a value computed on fewer images than its metric needs


@pytest.fixture(scope="module")
def digits():
    return load_digits_split("heldout").images  # 364 real digits in [-1, 1]


def _beyond(images: torch.Tensor) -> torch.Tensor:
    """The same images with every saturated pixel pushed far outside [-1, 1], as an unclipped sampler leaves
    them (clamping gives back ``images``)."""
    out = torch.where(images >= 1, images * 5, images)
    return torch.where(images <= -1, images * 3, out)


# -- item 7: what each metric does with values outside [-1, 1] -------------------------------------------
def test_domain_metrics_clamp_unclipped_samples(digits):
    """The domain classifier was trained on [-1, 1] digits: fed an unclipped sample, fd_domain, is_domain
    (and the quality bar, through the same features) must see the clamped image."""
    from bench.domain import features_and_logits
    from bench.metrics import MetricInputs, compute_metrics
    from bench.zoo.digits import load_classifier

    x = digits[:80]
    y = _beyond(x)
    assert (y.abs() > 1).float().mean() > 0.1 and torch.equal(y.clamp(-1, 1), x)
    feats_x, logits_x = features_and_logits(load_classifier(), x)
    feats_y, logits_y = features_and_logits(load_classifier(), y)
    assert torch.equal(feats_x, feats_y) and torch.equal(logits_x, logits_y)
    got_x, _ = compute_metrics(["fd_domain", "is_domain"], MetricInputs(x, "digits"))
    got_y, _ = compute_metrics(["fd_domain", "is_domain"], MetricInputs(y.half(), "digits"))
    assert got_x == pytest.approx(got_y, rel=1e-6)


def test_psnr_and_mse_compare_images_clipped_to_0_1():
    """PSNR / MSE to full precision compare the images as they would be saved: [0, 1], clipped. A value
    beyond [-1, 1] on either side is the saturated pixel (this did not change: it was already so)."""
    from bench.metrics import mse_to_fp, psnr_to_fp

    reference = torch.tensor([[[[-1.0, 1.0, 0.0, 0.5]]]])
    samples = torch.tensor([[[[-28.0, 2.4, 0.0, 0.5]]]], dtype=torch.float16)
    assert mse_to_fp(samples, reference) == 0 and psnr_to_fp(samples, reference) == float("inf")
    off = torch.tensor([[[[-1.0, 1.0, 0.0, 1.5]]]])  # 0.5 -> 1.5 is 0.75 -> 1.0 after mapping and clipping
    assert mse_to_fp(off, reference) == pytest.approx(0.25 ** 2 / 4)


def test_inception_inputs_are_clamped_before_uint8():
    from bench.inception.features import _to_uint8

    images = torch.tensor([-28.0, -2.4, -1.0, 0.0, 1.0, 2.4, 28.0]).view(1, 1, 1, 7)
    assert _to_uint8(images)[0, 0, 0].tolist() == [0, 0, 0, 128, 255, 255, 255]


# -- item 13: the Inception-score analogue on few images, and the table's mark ----------------------------
def test_is_domain_on_eight_samples_is_not_one_by_construction(digits):
    """``splits = min(10, n)`` made eight one-image splits, each scoring exactly 1: IS 1.00 +- 0 whatever
    the images. Splits of at least two images, as the Inception score's N // 2."""
    from bench.metrics import is_domain

    mean, std = is_domain(digits[:8])
    assert mean > 1.5  # four splits of two different confident digits: about 2
    assert (mean, std) != (1.0, 0.0)
    from bench.domain import is_splits

    assert [is_splits(n) for n in (2, 3, 8, 19, 20, 512)] == [1, 1, 4, 9, 10, 10]


def _row(n_samples, fd, base="lcq", modulation="off", w=8, a=4, **extra):
    row = {"cell_id": f"{base}-{modulation}-{w}-{a}-{n_samples}", "status": "ok", "error": "", "model": "digits",
           "checkpoint": None, "sampler": "ddim-quad", "steps": 25, "eta": 0.0, "n_samples": n_samples, "seed": 0,
           "batch_size": 8, "method": base if modulation == "off" else f"{base}+{modulation}", "base": base,
           "modulation": modulation, "cache": "none", "w_bits": w, "a_bits": a, "a_granularity": "channel",
           "fd_domain": fd, "psnr_to_fp": 20.0, "gbops": 1.0, "img_per_s": 10.0, "wall_s": 1.0, "state_mb": 0.0,
           "peak_mem_mb": 1.0, "device": "cpu", "params": "{}", "missing_metrics": "{}", "git_rev": "abc"}
    row.update(extra)
    return row


def test_report_tables_mark_values_on_fewer_images_than_the_metric_needs():
    """FD in the classifier's 64-d features on 8 images is a singular covariance, not a distance: the
    registry says how many images each metric needs, and the tables mark the value and say why."""
    from reports.tables import all_tables

    frame = pd.DataFrame([_row(8, 30.0, "fp", w=32, a=32), _row(8, 40.0), _row(8, 35.0, modulation="ec")])
    (table1, *_) = all_tables(frame)
    header = [f"{g}|{c}" for g, c in table1.columns]
    row = {r[0]: r for r in table1.rows}["W8A4"]
    assert row[header.index("LCQ alone|FD (domain)")] == "40.00" + SHORT_MARK
    assert row[header.index("LCQ alone|PSNR to FP (dB)")] == "20.00"  # needs one image
    assert any("FD (domain) on 8 images (needs at least 65)" in note for note in table1.notes)
    enough = pd.DataFrame([_row(512, 30.0, "fp", w=32, a=32), _row(512, 40.0)])
    (table1, *_) = all_tables(enough)
    assert not any(SHORT_MARK in cell for r in table1.rows for cell in r) and not table1.notes
    from bench.metrics import METRICS, column_min_images

    assert METRICS["fd_domain"].min_images == 65 and column_min_images()["psnr_to_fp"] == 1


# -- item 14: KID ---------------------------------------------------------------------------------------
def test_kid_domain_is_registered_with_a_subset_that_fits_and_is_recorded(digits):
    """torch-fidelity asserts N >= kid_subset_size (default 1000); a digits cell has 512 samples and the
    held-out set 364 images: the subset is min(1000, N, 364), recorded in kid_domain_subset_size."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    from bench.domain import features_and_logits
    from bench.metrics import METRICS, MetricInputs, compute_metrics
    from bench.zoo.digits import load_classifier

    spec = METRICS["kid_domain"]
    assert spec.columns == ("kid_domain", "kid_domain_std", "kid_domain_subset_size")
    assert spec.models == ("digits", "digits-dit")
    real = load_digits_split("train").images[:50]
    values, missing = compute_metrics(["kid_domain"], MetricInputs(real.half(), "digits"))
    assert missing == {} and values["kid_domain_subset_size"] == 50
    classifier = load_classifier()
    expected = kid_features_to_metric(features_and_logits(classifier, real.half())[0],
                                      features_and_logits(classifier, digits)[0], kid_subset_size=50,
                                      verbose=False)
    assert values["kid_domain"] == pytest.approx(expected["kernel_inception_distance_mean"])
    assert values["kid_domain_std"] == pytest.approx(expected["kernel_inception_distance_std"])
    noise = torch.rand(512, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    far, _ = compute_metrics(["kid_domain"], MetricInputs(noise, "digits"))
    assert far["kid_domain_subset_size"] == 364 and far["kid_domain"] > values["kid_domain"] + 10 * far[
        "kid_domain_std"]


def test_inception_kid_takes_its_subset_from_n_and_needs_the_reference_images(tmp_path):
    """``kid`` on torch-fidelity's pool features: subset min(1000, N, N_ref), recorded; a reference that is
    statistics only cannot give it (a reason, not a number)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    from bench.inception import METRIC_COLUMNS, InceptionSettings, ReferenceSet
    from bench.inception.metrics import _torch_fidelity_values
    from bench.inception.reference import _reference_side
    from bench.metrics import METRICS

    assert METRIC_COLUMNS["kid"] == ("kid", "kid_std", "kid_subset_size") and METRICS["kid"].group == "inception"
    g = torch.Generator().manual_seed(0)
    gen, ref = torch.rand(30, 2048, generator=g), torch.rand(200, 2048, generator=g)
    values, missing = _torch_fidelity_values({"2048": gen}, 30, {"pool": {"pool": ref.numpy()}},
                                             ["kid", "kid_std", "kid_subset_size"], InceptionSettings())
    expected = kid_features_to_metric(gen.double(), ref.double(), kid_subset_size=30, verbose=False)
    assert missing == {} and values["kid_subset_size"] == 30
    assert values["kid"] == pytest.approx(expected["kernel_inception_distance_mean"])
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not read")
    stats_only = ReferenceSet("stats", statistics=lambda: pytest.fail("statistics read"))
    missing = {}
    _reference_side(stats_only, ["kid"], weights, None, InceptionSettings(), tmp_path, missing)
    assert set(missing) == {"kid", "kid_std", "kid_subset_size"} and "needs its images" in missing["kid"]


def test_kid_columns_reach_a_cell_result(tmp_path):
    """A digits matrix naming kid_domain gets its three columns in results.csv (metrics are not part of
    cell ids: no new cells)."""
    from bench.cli import main

    config = tmp_path / "m.toml"
    config.write_text('[run]\nsteps = 2\nn_samples = 8\nbatch_size = 8\nmetrics = ["kid_domain", "is_domain"]\n'
                      '[matrix]\nbase = ["fp"]\n')
    assert main(["run", str(config), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "o" / "results.csv")
    assert table.kid_domain_subset_size.tolist() == [8] and np.isfinite(table.kid_domain).all()
    assert table.is_domain.iloc[0] != 1.0
    result = json.loads(next(Path(tmp_path / "o" / "cells").glob("*/result.json")).read_text())
    assert result["kid_domain_subset_size"] == 8


# -- PSNR / MSE to full precision on known images --------------------------------------------
def test_psnr_and_mse_on_known_images():
    ref = torch.zeros(2, 1, 4, 4)  # mid-grey in [0, 1]
    assert mse_to_fp(ref, ref) == 0 and psnr_to_fp(ref, ref) == math.inf
    off = ref + 0.2  # 0.1 in [0, 1] units everywhere -> MSE 0.01 -> 20 dB
    assert mse_to_fp(off, ref) == pytest.approx(0.01)
    assert psnr_to_fp(off, ref) == pytest.approx(20.0)
    assert mse_to_fp(torch.full_like(ref, 5.0), ref) == pytest.approx(0.25)  # clipped to [0, 1] first
    with pytest.raises(ValueError, match="shape"):
        mse_to_fp(ref[:1], ref)
