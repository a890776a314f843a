"""bench.inception with randomly initialised Inception weights (the real ones cannot be fetched here).

One weights file serves both libraries: torchvision's ``Inception3`` (``aux_logits=False``,
``num_classes=1008``) has exactly the state-dict keys that pytorch-fid (which builds its model from
it) and torch-fidelity (whose port keeps torchvision's names) load strictly. Batch-norm statistics
measured on smooth random images keep the 94 conv layers' activations unit-scale instead of
exploding. Zero-mean conv filters keep the network close to positively homogeneous and make the
first layer blind to a constant offset, so the libraries' pixel maps, ``(x - 128) / 128`` against
``2 x / 255 - 1`` (equal up to a factor 128 / 127.5 and a constant), scale the FID by about
``(128 / 127.5) ** 2``, i.e. 0.8 %; without them the random network amplifies the difference
layer by layer, unpredictably (0.1-3 % on the image sets tried).

The FID comparison uses 299 x 299 images, which neither library resizes. At 16 x 16 the libraries'
resizes differ (TF1's corner-aligned bilinear against PyTorch's centre-aligned one: a shift of
about half a source pixel, and other edge rows replicated), and on this random network that alone
moves the two FIDs 1-12 % apart depending on the images (7 % on the sets used here);
``test_the_libraries_differ_only_in_resize_and_pixel_scaling`` shows that nothing else differs.

Runtime is dominated by three 2048 x 2048 eigen / square-root problems (the libraries' FID
formulas), so every Inception pass is shared through module-scoped fixtures.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bench import inception
from bench.domain import frechet_distance
from bench.errors import BenchError
from bench.inception import COLUMNS, METRIC_COLUMNS, InceptionSettings, ReferenceSet, inception_metrics

N = 10  # images per set: 5 IS splits of 2, more than k = 3 neighbours for precision / recall


def _smooth_rgb(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=size, mode="bilinear")


def _strokes(n: int, size: int, seed: int) -> torch.Tensor:
    """Greyscale (C = 1) digit-like images: one vertical and one horizontal white stroke on black."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, 16, 16)
    for img in x:
        a, b, c, d = torch.randint(3, 13, (4,), generator=g).tolist()
        img[0, min(a, b):max(a, b) + 1, c] = 1
        img[0, d, min(b, c):max(b, c) + 1] = 1
    return x if size == 16 else F.interpolate(x, size=size, mode="nearest")


def _random_inception_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight -= module.weight.mean(dim=(1, 2, 3), keepdim=True)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average: the stats of exactly the calibration batch
        model.fc.weight.mul_(20)  # logits spread enough that the Inception score is not just 1
        model.train()
        model(_smooth_rgb(8, 299, seed=1000 + seed))
    return model.state_dict()


class _Counted:
    def __init__(self, images: torch.Tensor):
        self.images, self.calls = images, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.images


def _never() -> torch.Tensor:
    pytest.fail("the reference images were loaded")


@contextlib.contextmanager
def _no_network():
    """Every way the libraries could fetch a file raises and is recorded."""
    import pytorch_fid.inception
    import torch_fidelity.feature_extractor_inceptionv3

    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network access in an offline test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(urllib.request, "urlopen", refuse)
        mp.setattr(torch.hub, "download_url_to_file", refuse)
        mp.setattr(torch.hub, "load_state_dict_from_url", refuse)
        mp.setattr(torch_fidelity.feature_extractor_inceptionv3, "load_state_dict_from_url", refuse)
        mp.setattr(pytorch_fid.inception, "load_state_dict_from_url", refuse)
        yield attempts


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "random-inception.pth"
    torch.save(_random_inception_state(seed=0), path)
    return path


@pytest.fixture(scope="module")
def run(weights, tmp_path_factory) -> dict:
    """All five metrics, explicit weight paths, no network: RGB images against greyscale ones."""
    reference = _Counted(_strokes(N, 299, seed=2))
    settings = InceptionSettings(weights=str(weights), pytorch_fid_weights=str(weights),
                                 cache_dir=str(tmp_path_factory.mktemp("cache")), batch_size=8)
    with _no_network() as attempts:
        values, missing = inception_metrics(_smooth_rgb(N, 299, seed=1), ReferenceSet("strokes", reference),
                                            ["fid", "is", "sfid", "prc", "kid"], settings)
    return {"values": values, "missing": missing, "attempts": attempts, "reference": reference,
            "settings": settings}


@pytest.mark.parametrize("n, dims, dead", [(40, 8, 0), (300, 64, 0), (200, 64, 16)])
def test_our_frechet_distance_is_the_closed_form_on_gaussians(n, dims, dead):
    """With commuting covariances B diag(s1^2) B^T and B diag(s2^2) B^T (one orthogonal B, not the identity, so the
    matrix square root is exercised), FD = |mu1 - mu2|^2 + sum (s1 - s2)^2. ``dead`` directions have zero variance in
    both sets (dead ReLU units: singular covariances). A shifted copy of a set is at FD |shift|^2."""

    def exact_gaussian_features(mean, std, basis, n, seed):
        """n Gaussian draws made to have sample mean ``mean`` and sample covariance (normalised by n - 1, as np.cov)
        ``basis @ diag(std ** 2) @ basis.T`` exactly: the centred draws are orthonormalised (their columns stay
        orthogonal to the all-ones vector) and scaled by sqrt(n - 1)."""
        draws = np.random.default_rng(seed).normal(size=(n, len(mean)))
        white, _ = np.linalg.qr(draws - draws.mean(0))
        return mean + np.sqrt(n - 1) * (white * std) @ basis.T

    rng = np.random.default_rng(dims + dead)
    basis, _ = np.linalg.qr(rng.normal(size=(dims, dims)))
    mu1, mu2 = rng.normal(size=dims), rng.normal(0.3, 1.0, size=dims)
    s1, s2 = rng.uniform(0.2, 2.0, size=dims), rng.uniform(0.2, 2.0, size=dims)
    s1[:dead] = s2[:dead] = 0.0
    a = exact_gaussian_features(mu1, s1, basis, n, seed=1)
    b = exact_gaussian_features(mu2, s2, basis, n + 7, seed=2)
    np.testing.assert_allclose(np.cov(a, rowvar=False), basis @ np.diag(s1**2) @ basis.T, atol=1e-9)  # the setup

    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2))
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(torch.from_numpy(b), torch.from_numpy(a)) == pytest.approx(expected, rel=1e-6)
    shift = rng.normal(size=dims)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a + shift)) == pytest.approx(
        float(shift @ shift), rel=1e-6)


def test_fid_libraries_see_the_same_pixels_at_299(run):
    """Same weights file, same images: torch-fidelity and pytorch-fid agree within 1 %."""
    fid, fid_pytorch_fid = run["values"]["fid"], run["values"]["fid_pytorch_fid"]
    assert fid > 100  # clearly different sets
    assert fid_pytorch_fid == pytest.approx(fid, rel=0.01)


def test_the_libraries_differ_only_in_resize_and_pixel_scaling(weights):
    """Given torch-fidelity's resize and scaling, pytorch-fid's model reproduces its features."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    pixels = inception._to_uint8(_strokes(4, 16, seed=5))
    fidelity = inception._load_torch_fidelity(weights, ["2048"], "cpu")
    pytorch_fid = inception._load_pytorch_fid(weights, "cpu")
    resized = interpolate_bilinear_2d_like_tensorflow1x(pixels.float(), size=(299, 299), align_corners=False)
    with torch.no_grad():
        expected = fidelity(pixels)[0]
        same = pytorch_fid(resized / 256)[0].flatten(1)  # its 2 x - 1 on x / 256 is (x - 128) / 128
        own = pytorch_fid(pixels.float() / 255)[0].flatten(1)
    torch.testing.assert_close(same, expected, rtol=1e-5, atol=1e-6)
    assert (own - expected).norm() > 0.01 * expected.norm()


def test_offline_weight_paths_give_every_metric_without_network(run):
    assert run["attempts"] == []
    assert run["missing"] == {}
    assert list(run["values"]) == list(COLUMNS)
    assert all(isinstance(v, float) and math.isfinite(v) for v in run["values"].values())
    assert 0 <= run["values"]["precision"] <= 1 and 0 <= run["values"]["recall"] <= 1
    assert run["values"]["kid_subset_size"] == N  # torch-fidelity's 1000, capped at the N images of each side


def test_inception_score_and_sfid_are_sane(run):
    values = run["values"]
    assert values["is_mean"] >= 1 and values["is_std"] >= 0
    assert values["sfid"] >= 0


def test_fid_of_a_set_against_itself_is_zero_and_reuses_the_cache(run, weights):
    reference = run["reference"]
    calls = reference.calls
    settings = InceptionSettings(weights=str(weights), pytorch_fid_weights=str(weights.with_name("absent.pth")),
                                 cache_dir=run["settings"].cache_dir)
    values, missing = inception_metrics(reference.images, ReferenceSet("strokes", reference), ["fid"], settings)
    assert reference.calls == calls  # statistics came from the cache
    assert abs(values["fid"]) < 1e-6 * run["values"]["fid"]
    # one library's weights missing leaves the other's column standing
    assert values["fid_pytorch_fid"] is None and "absent.pth" in missing["fid_pytorch_fid"]
    assert set(missing) == {"fid_pytorch_fid"}


def test_reference_statistics_are_cached_per_weights_file(run, weights, tmp_path):
    reference = run["reference"]
    samples = _strokes(6, 16, seed=3)  # greyscale 16 x 16, as the digits model makes them
    calls = reference.calls
    values, _ = inception_metrics(samples, ReferenceSet("strokes", reference), ["prc"], run["settings"])
    assert reference.calls == calls and values["precision"] is not None

    state = torch.load(weights, weights_only=True)
    state["fc.bias"] += 1
    other = tmp_path / "other.pth"
    torch.save(state, other)
    settings = InceptionSettings(weights=str(other), cache_dir=run["settings"].cache_dir)
    for _ in range(2):
        inception_metrics(samples, ReferenceSet("strokes", reference), ["prc"], settings)
    assert reference.calls == calls + 1  # new weights, new key; loaded once, then cached
    keys = {p.name.split("--")[2] for p in Path(settings.cache_dir).glob("strokes--torch-fidelity*")}
    assert keys == {inception.sha16(weights), inception.sha16(other)}


def test_missing_weights_give_reasons_not_exceptions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    reference = _Counted(_strokes(N, 16, seed=2))
    settings = InceptionSettings(cache_dir=str(tmp_path / "cache"))
    with _no_network() as attempts:
        values, missing = inception_metrics(_strokes(N, 16, seed=1), ReferenceSet("strokes", reference),
                                            ["fid", "is", "sfid", "prc", "kid"], settings)
    assert attempts == [] and reference.calls == 0
    assert values == dict.fromkeys(COLUMNS) and set(missing) == set(COLUMNS)
    for column, reason in missing.items():
        assert str(tmp_path / "torch-home") in reason and "allow download" in reason, column
    assert "[inception] weights" in missing["fid"]
    assert "[inception] pytorch_fid_weights" in missing["fid_pytorch_fid"]


def test_download_only_when_allowed_into_the_libraries_cache(tmp_path, monkeypatch):
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    fetched = []

    def fail(url, dst, *args, **kwargs):
        fetched.append((url, Path(dst)))
        raise OSError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    settings = InceptionSettings(cache_dir=str(tmp_path / "cache"), download=True)
    values, missing = inception_metrics(_strokes(4, 16, seed=0), ReferenceSet("never", _never), ["fid"],
                                        settings)
    assert values == {"fid": None, "fid_pytorch_fid": None}
    assert fetched == [
        (inception._torch_fidelity_url(), hub / "weights-inception-2015-12-05-6726825d.pth"),
        (inception._pytorch_fid_url(), hub / "pt_inception-2015-12-05-6726825d.pth"),
    ]
    assert all("failed" in reason and "OSError: offline" in reason for reason in missing.values())


def test_a_file_that_is_not_inception_weights_is_an_error(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, wrong)
    settings = InceptionSettings(weights=str(wrong), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(BenchError, match="not a torch-fidelity Inception weights file"):
        inception_metrics(_strokes(4, 16, seed=0), ReferenceSet("never", _never), ["is"], settings)


def test_requested_metrics_decide_the_columns_and_unknown_names_fail():
    with pytest.raises(ValueError, match="'fidd'"):
        inception_metrics(_strokes(4, 16, seed=0), ReferenceSet("never", _never), ["fid", "fidd"],
                          InceptionSettings())
    assert set(METRIC_COLUMNS) == {"fid", "is", "sfid", "prc", "kid"}
    assert [c for cols in METRIC_COLUMNS.values() for c in cols] == list(COLUMNS)


def test_the_harness_passes_matrix_inception_settings_through(weights, tmp_path, monkeypatch):
    """`[inception] weights` of a matrix file reaches the metrics; rows get numbers, offline."""
    import pandas as pd

    import bench.metrics
    from bench.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    reference = _Counted(_strokes(N, 16, seed=2))
    monkeypatch.setattr(bench.metrics, "inception_reference",
                        lambda model, settings, size: ReferenceSet("strokes16", reference))
    config = tmp_path / "m.toml"
    config.write_text(
        '[run]\nsteps = 3\nn_samples = 12\nbatch_size = 12\nmetrics = ["psnr_to_fp", "fid", "is", "sfid"]\n'
        '[matrix]\nbase = ["lcq"]\na_bits = [6]\nmodulation = ["off", "ec"]\n'
        f'[inception]\nweights = "{weights}"\ncache_dir = "{tmp_path / "c"}"\n')
    with _no_network() as attempts:
        assert main(["run", str(config), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert attempts == [] and reference.calls == 1  # reference statistics computed once, then cached
    table = pd.read_csv(tmp_path / "o" / "results.csv")
    for column in ("fid", "is_mean", "is_std", "sfid"):
        assert table[column].notna().all() and (table[column] >= 0).all(), column
    assert table.precision.isna().all()  # not requested
    # pytorch-fid's file was not given and is not in the (empty) torch hub cache: missing, with the reason
    assert table.fid_pytorch_fid.isna().all()
    assert all("pytorch_fid_weights" in json.loads(m)["fid_pytorch_fid"] for m in table.missing_metrics)
    # the weights file each row's Inception columns came from, with its SHA-256 (no published full hash)
    from bench.provenance import sha256_file

    for used in table.inception_weights:
        assert json.loads(used)["torch-fidelity"] == {"path": str(weights), "sha256": sha256_file(weights)}
