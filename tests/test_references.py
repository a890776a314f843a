"""bench.references: the reference data of FID / sFID / precision-recall, offline, with the random
Inception weights of tests/test_inception.py (the real ones cannot be fetched here).

Every Inception pass costs seconds on CPU and a 2048 x 2048 Frechet distance more, so the five
reference images and their statistics are shared through module fixtures, most checks go through
``reference_statistics`` (no distance), and one test computes one FID.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
import torchvision.datasets.cifar
from PIL import Image
from test_inception import _no_network, _random_inception_state, _smooth_rgb

from bench import inception
from bench.errors import BenchError
from bench.inception import (
    STATS_KEYS,
    InceptionSettings,
    ReferenceSet,
    inception_metrics,
    reference_statistics,
)
from bench.matrix import build_matrix
from bench.metrics import MetricInputs, compute_metrics
from bench.references import load_image, reference_for

CIFAR10 = torchvision.datasets.CIFAR10
BATCH = 4  # reference batches of 4 + 1: streamed, not one tensor
_SHARED: dict[str, float] = {}  # the Inception score of the five images, computed once


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "random-inception.pth"
    torch.save(_random_inception_state(seed=0), path)
    return path


@pytest.fixture(scope="module")
def five() -> torch.Tensor:
    """Five 32 x 32 RGB images, uint8 (N, 3, H, W): CIFAR-sized."""
    return inception._to_uint8(_smooth_rgb(5, 32, seed=11))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def settings(weights, cache) -> InceptionSettings:
    return InceptionSettings(weights=str(weights), pytorch_fid_weights=str(weights), cache_dir=str(cache),
                             batch_size=BATCH)


@pytest.fixture(scope="module")
def tensor_stats(five, settings) -> dict[str, np.ndarray]:
    """The statistics of the five images passed as a tensor: what every other source must give."""
    return reference_statistics(ReferenceSet("five-as-tensor", lambda: five), settings)


@pytest.fixture()
def count_passes(monkeypatch):
    """The number of Inception passes (over either side) from here on."""
    calls = []
    run = inception.features._run

    def counted(stream, passes, device):
        calls.append(len(passes))
        return run(stream, passes, device)

    monkeypatch.setattr(inception.features, "_run", counted)
    return calls


def _assert_same_stats(got: dict, expected: dict) -> None:
    assert set(got) == set(STATS_KEYS)
    for key in STATS_KEYS:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fake_cifar10(parent: Path, images: torch.Tensor, monkeypatch) -> Path:
    """torchvision's cifar-10-batches-py layout (pickled dicts of (n, 3072) uint8 rows, labels,
    batches.meta) with one image per training batch; torchvision's expected md5 sums are set to
    these files' own, so its integrity check runs and passes."""
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = images.numpy().reshape(len(images), -1)
    train = []
    for i in range(5):
        name = f"data_batch_{i + 1}"
        (folder / name).write_bytes(pickle.dumps({"data": rows[i:i + 1], "labels": [i]}))
        train.append([name, _md5(folder / name)])
    (folder / "test_batch").write_bytes(pickle.dumps({"data": rows[:1], "labels": [0]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    monkeypatch.setattr(CIFAR10, "train_list", train)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    return folder


@pytest.fixture()
def no_cifar_download(monkeypatch):
    """torchvision's download helpers raise and record (the socket-level guard is _no_network)."""
    attempts = []

    def refuse(url, root, *args, **kwargs):
        attempts.append((url, Path(root)))
        raise OSError("offline")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", refuse)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", refuse)
    return attempts


def _write_pngs(folder: Path, images: torch.Tensor, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names, strict=True):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / name)


# --- CIFAR-10 ------------------------------------------------------------------------------------


def test_cifar10_from_a_local_copy_without_download_then_from_the_cache(
        five, settings, tensor_stats, tmp_path, monkeypatch, no_cifar_download):
    _fake_cifar10(tmp_path / "data", five, monkeypatch)
    local = replace(settings, cifar10_root=str(tmp_path / "data"))
    with _no_network() as attempts:
        reference = reference_for("ddpm-cifar10", local, (32, 32))
        stats = reference_statistics(reference, local)
    assert attempts == [] and no_cifar_download == []
    assert reference.name == "cifar10-train"
    _assert_same_stats(stats, tensor_stats)  # torch-fidelity's cifar10-train gave exactly these images

    def fail(*args, **kwargs):
        pytest.fail("the CIFAR-10 statistics were recomputed")

    monkeypatch.setattr(inception.features, "_run", fail)
    # the cifar-10-batches-py folder itself is accepted too, and is the same data: the cache answers
    itself = replace(settings, cifar10_root=str(tmp_path / "data" / "cifar-10-batches-py"))
    _assert_same_stats(reference_statistics(reference_for("ddpm-cifar10", itself, (32, 32)), itself), stats)


def test_no_cifar10_copy_is_a_one_line_reason_without_any_download(
        five, settings, tmp_path, monkeypatch, no_cifar_download):
    """Nothing configured for ddpm-cifar10: fid is missing with what to get and where to put it;
    the Inception score, which needs no reference, is still computed."""
    from torch_fidelity.registry import DATASETS_REGISTRY

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setitem(DATASETS_REGISTRY, "cifar10-train", lambda root, download: pytest.fail("dataset built"))
    offline = replace(settings, cache_dir=str(tmp_path / "cache"))
    samples = five.float() / 127.5 - 1  # what the runner passes: floats in [-1, 1]
    with _no_network() as attempts:
        values, missing = compute_metrics(["fid", "is"], MetricInputs(samples, "ddpm-cifar10", inception=offline))
    assert attempts == [] and no_cifar_download == []
    assert values["fid"] is None and values["fid_pytorch_fid"] is None
    reason = missing["fid"]
    assert missing["fid_pytorch_fid"] == reason and "\n" not in reason
    for needle in ("CIFAR-10", str(tmp_path / "torch-home" / "fidelity_datasets" / "cifar-10-batches-py"),
                   CIFAR10.url, "cifar10_root", "download = true"):
        assert needle in reason
    assert isinstance(values["is_mean"], float) and set(missing) == {"fid", "fid_pytorch_fid"}
    _SHARED["is_of_five"] = values["is_mean"]  # test_generated_images_may_stream compares with it


def test_download_when_allowed_goes_to_torch_fidelitys_root_and_a_failure_is_a_reason(
        five, settings, tmp_path, monkeypatch, no_cifar_download):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    allowed = replace(settings, cache_dir=str(tmp_path / "cache"), download=True)
    values, missing = compute_metrics(["fid"], MetricInputs(five.float() / 127.5 - 1, "ddpm-cifar10",
                                                            inception=allowed))
    assert values == {"fid": None, "fid_pytorch_fid": None}
    assert no_cifar_download == [(CIFAR10.url, tmp_path / "torch-home" / "fidelity_datasets")]
    assert "could not download" in missing["fid"] and "OSError: offline" in missing["fid"]


# --- image folders and reference batches ---------------------------------------------------------


def test_a_folder_and_an_npz_of_images_give_the_tensors_statistics(five, settings, tensor_stats, tmp_path):
    folder = tmp_path / "church"
    _write_pngs(folder, five, [f"img{i}.png" for i in range(5)])
    (folder / "README.txt").write_text("not an image")
    npz = tmp_path / "batch.npz"
    np.savez(npz, arr_0=five.permute(0, 2, 3, 1).numpy())  # guided-diffusion's (N, H, W, 3) uint8

    from_folder = reference_for("ldm-church", replace(settings, reference_images=str(folder)), (32, 32))
    from_npz = reference_for("ldm-church", replace(settings, reference_stats=str(npz)), (32, 32))
    for reference in (from_folder, from_npz):  # streamed: batches of at most batch_size, never one tensor
        batches = list(reference.load())
        assert [len(b) for b in batches] == [4, 1] and all(b.dtype == torch.uint8 for b in batches)
        assert torch.equal(torch.cat(batches), five)
    _assert_same_stats(reference_statistics(from_folder, settings), tensor_stats)
    _assert_same_stats(reference_statistics(from_npz, settings), tensor_stats)


def test_folder_images_follow_ldms_centre_crop_and_bicubic_resize(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # h 40, w 48: the centred 40 x 40 square
    Image.fromarray(wide).save(tmp_path / "wide.png")
    expected = np.asarray(Image.fromarray(wide[:, 4:44]).resize((32, 32), resample=Image.BICUBIC))
    np.testing.assert_array_equal(load_image(tmp_path / "wide.png", (32, 32)), expected)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.jpg")  # greyscale JPEG: RGB, no resize at the output size
    out = load_image(tmp_path / "grey.jpg", (32, 32))
    assert out.shape == (32, 32, 3) and (out[..., 0] == out[..., 2]).all()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(BenchError, match="broken.png could not be read"):
        load_image(tmp_path / "broken.png", (32, 32))


def test_a_changed_folder_is_not_served_stale_statistics(five, settings, tensor_stats, tmp_path, count_passes):
    folder = tmp_path / "lsun"
    _write_pngs(folder, five[:2], ["img0.png", "img1.png"])
    cfg = replace(settings, reference_images=str(folder))
    first = reference_for("ldm-bedroom", cfg, (32, 32))
    two = reference_statistics(first, cfg)
    reference_statistics(reference_for("ldm-bedroom", cfg, (32, 32)), cfg)
    assert count_passes == [1]  # unchanged folder: the cache

    _write_pngs(folder, five[2:], ["img2.png", "img3.png", "img4.png"])  # files added
    second = reference_for("ldm-bedroom", cfg, (32, 32))
    assert second.key() != first.key()
    _assert_same_stats(reference_statistics(second, cfg), tensor_stats)  # recomputed, over all five
    assert count_passes == [1, 1]
    assert not np.allclose(two["pool_mu"], tensor_stats["pool_mu"])
    metas = [json.loads(str(np.load(p)["meta"])) for p in Path(cfg.cache_dir).glob("lsun-32x32--*--stats.v2.npz")]
    assert sorted(m["n_images"] for m in metas) == [2, 5]

    # a rewritten file (new content and mtime), a rename or another output size: each a new key
    keys = {second.key()}
    _write_pngs(folder, five[:1], ["img4.png"])
    keys.add(reference_for("ldm-bedroom", cfg, (32, 32)).key())
    (folder / "img4.png").rename(folder / "img5.png")
    keys.add(reference_for("ldm-bedroom", cfg, (32, 32)).key())
    keys.add(reference_for("ldm-bedroom", cfg, (64, 64)).key())
    assert len(keys) == 4


def test_statistics_only_npz_gives_fid_from_them_and_reasons_for_the_rest(
        five, settings, tensor_stats, tmp_path, count_passes):
    """mu / sigma only: fid is the Frechet distance between those statistics and the generated
    images'. With the generated images' own covariance and a shifted mean that distance is exactly
    |shift|^2 (the trace terms cancel), so no second 2048 x 2048 eigenproblem is needed to check it."""
    shift = np.linspace(-1, 1, 2048)
    npz = tmp_path / "VIRTUAL_stats_only.npz"
    np.savez(npz, mu=tensor_stats["pool_mu"] + shift, sigma=tensor_stats["pool_sigma"])
    reference = reference_for("ldm-church", replace(settings, reference_stats=str(npz)), (32, 32))
    assert reference.load is None and reference.statistics is not None

    values, missing = inception_metrics(five, reference, ["fid", "sfid", "prc"], settings)
    assert count_passes == [1]  # the generated images only; nothing on the reference side
    assert values["fid"] == pytest.approx(float(shift @ shift), rel=1e-5)
    assert set(missing) == {"fid_pytorch_fid", "sfid", "precision", "recall"}
    assert "precomputed statistics only" in missing["precision"] and "images" in missing["precision"]
    assert "mu_s / sigma_s" in missing["sfid"]
    assert "pytorch-fid cannot use" in missing["fid_pytorch_fid"]
    assert all("\n" not in reason for reason in missing.values())


def test_generated_images_may_stream(five, settings):
    """uint8 batches from an iterable give the Inception score of the same images as one float tensor."""
    expected = _SHARED.get("is_of_five")
    if expected is None:  # run alone
        expected = inception_metrics(five.float() / 127.5 - 1, None, ["is"], settings)[0]["is_mean"]
    values, missing = inception_metrics(iter([five[:3], five[3:]]), None, ["is"], settings)
    assert values["is_mean"] == pytest.approx(expected, rel=1e-5) and missing == {}


# --- configuration -------------------------------------------------------------------------------


def _matrix(inception_table: dict, models=("digits",)) -> None:
    build_matrix({"run": {"steps": 2}, "matrix": {"model": list(models)}, "inception": inception_table})


@pytest.mark.parametrize("key", ["weights", "pytorch_fid_weights", "reference_stats", "reference_images",
                                 "cifar10_root"])
def test_a_missing_path_is_a_load_time_error_naming_the_key(key, tmp_path):
    with pytest.raises(BenchError, match=f"inception.{key}: .*absent is not a"):
        _matrix({key: str(tmp_path / "absent")})


def test_reference_data_is_checked_when_the_matrix_loads(five, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images")
    with pytest.raises(BenchError, match="inception.reference_images: no .png"):
        _matrix({"reference_images": str(empty)})
    np.savez(tmp_path / "other.npz", foo=np.zeros(3))
    with pytest.raises(BenchError, match="neither images .arr_0. nor statistics"):
        _matrix({"reference_stats": str(tmp_path / "other.npz")})
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(BenchError, match="mu in .* has shape \\(64,\\), expected \\(2048,\\)"):
        _matrix({"reference_stats": str(tmp_path / "small.npz")})
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(BenchError, match="uint8 images"):
        _matrix({"reference_stats": str(tmp_path / "float.npz")})
    _write_pngs(tmp_path / "imgs", five[:1], ["a.png"])
    with pytest.raises(BenchError, match="both given"):
        _matrix({"reference_images": str(tmp_path / "imgs"), "reference_stats": str(tmp_path / "float.npz")})
    with pytest.raises(BenchError, match="one model's reference data"):
        _matrix({"reference_images": str(tmp_path / "imgs")}, models=("digits", "ddpm-cifar10"))
    _matrix({"reference_images": str(tmp_path / "imgs")})  # fine: one model

    folder = _fake_cifar10(tmp_path / "data", five, monkeypatch)
    _matrix({"cifar10_root": str(tmp_path / "data")})  # torchvision's md5 check passes
    _matrix({"cifar10_root": str(folder)})
    with (folder / "data_batch_2").open("r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    with pytest.raises(BenchError, match="data_batch_2 fails torchvision's md5 check"):
        _matrix({"cifar10_root": str(tmp_path / "data")})
    _matrix({"cifar10_root": str(tmp_path / "data"), "download": True})  # torchvision will fetch a good copy
    shutil.rmtree(folder)
    (tmp_path / "data" / "cifar-10-batches-py").mkdir()
    with pytest.raises(BenchError, match="lacks data_batch_1"):
        _matrix({"cifar10_root": str(tmp_path / "data")})


def test_models_without_a_default_reference_name_what_to_give(five):
    for model, needle in (("ldm-church", "LSUN Churches"), ("ldm-bedroom", "VIRTUAL_lsun_bedroom256.npz"),
                          ("sd-v1-4", "no default reference set")):
        values, missing = compute_metrics(["fid", "sfid", "prc"], MetricInputs(five.float() / 127.5 - 1, model))
        assert all(v is None for v in values.values()) and set(missing) == set(values)
        assert needle in missing["fid"] and "reference_images" in missing["fid"] and "reference_stats" in missing["fid"]
