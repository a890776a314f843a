"""Loading the files a user (or a cache) points at (issue #14): none is ever read in a way that can run code
from it (Inception weights, reference statistics, CIFAR-10 batches, calibration caches, the zoo's checkpoints),
weights load strictly, and an unreadable file is one line and exit status 2.

Every path a user (or a cache) can point at is fed a pickle whose reconstruction would create a marker
file (three payloads: a function of this module, ``builtins.exec`` and ``os.system``); each test
asserts that the marker was not created and that the user gets a one-line ``BenchError`` (for the
calibration caches: a cache miss). ``test_the_payloads_run_under_a_plain_unpickler`` shows the
payloads do fire when unpickled the unsafe way, so their absence means something. Everything uses
tiny stand-ins or random weights and needs no download.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from test_cli import _cli_error

from bench import inception
from bench.cli import main
from bench.errors import BenchError
from bench.inception import InceptionSettings, ReferenceSet, inception_metrics
from bench.zoo import digits, ldm, load_model
from bench.zoo.architectures import DDPM_CIFAR10_32
from bench.zoo.checkpoints import write_manifest

PAYLOADS = ("function", "exec", "system")
IMAGES = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)


def _plant(marker: str) -> None:
    """What a malicious pickle would run: here it only creates the marker."""
    Path(marker).touch()


class Payload:
    """Unpickling this object creates ``marker`` (if anything runs its reduction)."""

    def __init__(self, marker: Path, how: str = "function"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "exec":
            return exec, (f"open({self.marker!r}, 'w').close()",)
        if self.how == "system":
            return os.system, (f"touch '{self.marker}'",)
        return _plant, (self.marker,)


@pytest.fixture(params=PAYLOADS)
def payload(request, tmp_path):
    """A payload object and the marker it would create."""
    marker = tmp_path / f"marker-{request.param}"
    return Payload(marker, request.param), marker


def _malicious(path: Path, payload, writer: str = "torch") -> Path:
    """``path``: a torch.save (or plain pickle) file holding a tensor beside the payload."""
    obj = {"fc.weight": torch.zeros(2), "x": payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    if writer == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message, message
    return message


def _rehash(directory: Path) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    write_manifest(directory, list(manifest.pop("files")), manifest)


def _digits_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(digits.ASSET_DIR, tmp_path / "digits"))


def test_the_payloads_run_under_a_plain_unpickler(payload, tmp_path):
    """The control: unpickled without restrictions, every payload creates its marker."""
    obj, marker = payload
    path = _malicious(tmp_path / "plain.pt", obj)
    torch.load(path, weights_only=False)
    assert marker.exists()


# ---- Inception weights -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_state() -> dict[str, torch.Tensor]:
    """Random weights with the keys and shapes both libraries load (torchvision's Inception3 layout)."""
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    return model.state_dict()


def test_inception_weights_never_run_pickled_code(payload, tmp_path):
    obj, marker = payload
    bad = _malicious(tmp_path / "weights.pth", obj)
    settings = InceptionSettings(weights=str(bad), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(BenchError) as exc:
        inception_metrics(IMAGES, None, ["is"], settings)
    assert "not a torch-fidelity Inception weights file" in _one_line(exc) and str(bad) in str(exc.value)
    assert not marker.exists()


def test_pytorch_fid_weights_never_run_pickled_code(payload, tmp_path):
    obj, marker = payload
    bad = _malicious(tmp_path / "pt_weights.pth", obj)
    settings = InceptionSettings(weights=str(tmp_path / "absent.pth"), pytorch_fid_weights=str(bad),
                                 cache_dir=str(tmp_path / "cache"))
    with pytest.raises(BenchError) as exc:
        inception_metrics(IMAGES, ReferenceSet("ref", lambda: IMAGES), ["fid"], settings)
    assert "not a pytorch-fid Inception weights file" in _one_line(exc)
    assert not marker.exists()


@pytest.mark.parametrize("library", ["torch-fidelity", "pytorch-fid"])
def test_the_torch_hub_cache_file_never_runs_pickled_code(library, payload, tmp_path, monkeypatch):
    obj, marker = payload
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    url = inception._torch_fidelity_url() if library == "torch-fidelity" else inception._pytorch_fid_url()
    _malicious(inception._hub_file(url), obj)
    assert str(tmp_path / "torch-home") in str(inception._hub_file(url))
    if library == "torch-fidelity":
        settings = InceptionSettings(cache_dir=str(tmp_path / "cache"))
        call = (IMAGES, None, ["is"], settings)
    else:
        settings = InceptionSettings(weights=str(tmp_path / "absent.pth"), cache_dir=str(tmp_path / "cache"))
        call = (IMAGES, ReferenceSet("ref", lambda: IMAGES), ["fid"], settings)
    with pytest.raises(BenchError, match=f"not a {library} Inception weights file") as exc:
        inception_metrics(*call)
    _one_line(exc)
    assert not marker.exists()


def test_downloaded_weights_never_run_pickled_code(payload, tmp_path, monkeypatch):
    obj, marker = payload
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, *a, **k: _malicious(Path(dst), obj))
    settings = InceptionSettings(cache_dir=str(tmp_path / "cache"), download=True)
    with pytest.raises(BenchError, match="not a torch-fidelity Inception weights file") as exc:
        inception_metrics(IMAGES, None, ["is"], settings)
    _one_line(exc)
    assert not marker.exists()


def test_run_with_malicious_inception_weights_fails_the_metric_without_running_them(tmp_path, monkeypatch, capsys):
    """The issue's scenario: ``modiff-bench run`` with ``[inception] weights`` and an ``is`` cell. Since
    the generate / evaluate split (#15) the samples stay (status ok); the metric's columns are empty with
    the reason, the run exits 1 and the next run or ``evaluate`` tries the metric again."""
    import pandas as pd

    marker = tmp_path / "marker"
    bad = _malicious(tmp_path / "weights.pth", Payload(marker))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    config = tmp_path / "m.toml"
    config.write_text('[run]\nsteps = 2\nn_samples = 4\nbatch_size = 4\nmetrics = ["is"]\n[matrix]\nbase = ["fp"]\n'
                      f'[inception]\nweights = "{bad}"\ncache_dir = "{tmp_path / "c"}"\n')
    assert main(["run", str(config), "--out", str(tmp_path / "o"), "--no-progress"]) == 1  # the cell failed
    assert not marker.exists()
    assert "sampled but a metric failed" in capsys.readouterr().err
    table = pd.read_csv(tmp_path / "o" / "results.csv")
    assert (table.status == "ok").all() and table.is_mean.isna().all()
    assert all("not a torch-fidelity Inception weights file" in json.loads(m)["is_mean"]
               for m in table.missing_metrics)
    assert main(["evaluate", str(tmp_path / "o"), "--no-progress"]) == 1  # tried again, refused again
    assert not marker.exists()


@pytest.mark.parametrize("library", ["torch-fidelity", "pytorch-fid"])
def test_inception_weights_must_match_the_network_key_by_key(library, inception_state, tmp_path):
    load = inception._load_torch_fidelity if library == "torch-fidelity" else inception._load_pytorch_fid
    args = (["2048"], "cpu") if library == "torch-fidelity" else ("cpu",)
    state = dict(inception_state)
    del state["Mixed_6d.branch1x1.conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(BenchError) as exc:
        load(path, *args)
    message = _one_line(exc)
    assert str(path) in message and f"not a {library} Inception weights file" in message
    assert "missing keys: Mixed_6d.branch1x1.conv.weight" in message and "unexpected keys: extra.weight" in message

    state = dict(inception_state)
    state["fc.bias"] = torch.zeros(10)
    torch.save(state, path)
    with pytest.raises(BenchError, match=r"shape mismatches: fc.bias \(10,\) \(expected \(1008,\)\)"):
        load(path, *args)


def test_the_libraries_networks_are_built_from_the_checked_tensors(inception_state, tmp_path, monkeypatch):
    """Both networks hold exactly the file's tensors, built without the libraries' loaders (which would
    download, or unpickle unrestricted) and without replacing them; each file's SHA-256 is recorded."""
    import pytorch_fid.inception as pfi
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def refuse(*args, **kwargs):
        pytest.fail("a library loader was called")

    for module, name in ((pfi, "load_state_dict_from_url"), (pfi, "fid_inception_v3"),
                         (tfi, "load_state_dict_from_url")):
        monkeypatch.setattr(module, name, refuse)
    path = tmp_path / "good.pth"
    torch.save(inception_state, path)
    expected = {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    fidelity = inception._load_torch_fidelity(path, ["2048"], "cpu")
    assert inception.weights_used()["torch-fidelity"] == expected
    pytorch_fid = inception._load_pytorch_fid(path, "cpu")
    assert inception.weights_used()["pytorch-fid"] == expected
    assert isinstance(fidelity, tfi.FeatureExtractorInceptionV3) and isinstance(pytorch_fid, pfi.InceptionV3)
    assert pfi.load_state_dict_from_url is refuse and pfi.fid_inception_v3 is refuse  # nothing swapped
    assert fidelity.state_dict().keys() == inception_state.keys()
    for key, value in inception_state.items():
        assert torch.equal(fidelity.state_dict()[key].to(value.dtype), value), key
    key = "Mixed_7c.branch_pool.conv.weight"
    assert torch.equal(pytorch_fid.blocks[3][2].branch_pool.conv.weight, inception_state[key])
    assert pytorch_fid.output_blocks == [3] and not any(p.requires_grad for p in pytorch_fid.parameters())
    assert not hasattr(inception, "_swapped")


# ---- reference statistics, CIFAR-10, the statistics cache --------------------------------------------


def _object_npz(path: Path, obj) -> Path:
    mu = np.empty(2048, dtype=object)
    mu[:] = [obj] * 2048
    np.savez(path, mu=mu, sigma=np.zeros((2048, 2048), np.float16))
    return path


def test_reference_statistics_never_unpickle(payload, tmp_path):
    from bench.references import check_settings, npz_reference

    obj, marker = payload
    bad = _object_npz(tmp_path / "ref.npz", obj)
    with pytest.raises(BenchError, match="mu in .* is object, expected floating point") as exc:
        check_settings({"reference_stats": str(bad)}, ["ldm-church"])
    _one_line(exc)
    with pytest.raises(BenchError):
        npz_reference(bad)
    assert not marker.exists()


def test_the_statistics_cache_never_unpickles(payload, tmp_path):
    obj, marker = payload
    bad = _object_npz(tmp_path / "cached.npz", obj)
    assert inception.read_cache(bad, ("mu",)) is None  # a miss: recomputed and rewritten
    assert not marker.exists()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _cifar10_folder(root: Path, batches: dict[str, bytes], monkeypatch) -> Path:
    """torchvision's cifar-10-batches-py layout with these files; its md5 list set to theirs."""
    CIFAR10 = torchvision.datasets.CIFAR10
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, data in batches.items():
        (folder / name).write_bytes(data)
    (folder / "test_batch").write_bytes(batches["data_batch_1"])
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2))
    monkeypatch.setattr(CIFAR10, "train_list", [[name, _md5(folder / name)] for name in batches])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    return folder


def _py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR-10 batch as the release files are: Python 2 cPickle, protocol 2, str (not bytes) keys and
    data, written opcode by opcode (Python 3 cannot write Python 2 strings)."""

    def string(text: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING: a Python 2 str
        return (b"U" + bytes([len(text)]) if len(text) < 256 else b"T" + len(text).to_bytes(4, "little")) + text

    def int4(n: int) -> bytes:
        return b"J" + n.to_bytes(4, "little", signed=True)

    dtype = (b"cnumpy\ndtype\n" + string(b"u1") + int4(0) + int4(1) + b"\x87R"
             + b"(" + int4(3) + string(b"|") + b"NNN" + int4(-1) + int4(-1) + int4(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + int4(0) + b"\x85" + string(b"b") + b"\x87R"
             + b"(" + int4(1) + int4(data.shape[0]) + int4(data.shape[1]) + b"\x86" + dtype + b"\x89"
             + string(data.tobytes()) + b"tb")
    items = (string(b"batch_label") + string(b"training batch 1 of 5") + string(b"labels") + b"]("
             + b"".join(int4(label) for label in labels) + b"e" + string(b"data") + array)
    return b"\x80\x02}(" + items + b"u."


def test_cifar10_batches_are_read_without_pickle_load(payload, tmp_path, monkeypatch):
    from bench.references import reference_for

    obj, marker = payload
    rows = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    evil = pickle.dumps({"data": rows, "labels": [0, 1], "x": obj}, protocol=2)
    _cifar10_folder(tmp_path / "data", {"data_batch_1": evil}, monkeypatch)
    reference = reference_for("ddpm-cifar10", InceptionSettings(cifar10_root=str(tmp_path / "data")), (32, 32))
    with pytest.raises(BenchError, match="data_batch_1 is not a CIFAR-10 python batch") as exc:
        list(reference.load())
    _one_line(exc)
    assert not marker.exists()


def test_genuine_cifar10_batches_still_load(tmp_path, monkeypatch):
    """The release format (Python 2), and batches Python 3 writes (protocol 2 with bytes through _codecs,
    protocol 4, bytes keys): the same images, in torchvision's order and layout."""
    from bench.references import read_cifar10_batch, reference_for

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 256, (n, 3072), dtype=np.uint8) for n in (3, 2, 1)]
    py2 = _py2_batch(rows[0], [1, 2, 3])
    assert b"numpy.core.multiarray\n_reconstruct" in py2 and b"_codecs" not in py2
    batches = {"data_batch_1": py2,
               "data_batch_2": pickle.dumps({"data": rows[1], "labels": [4, 5]}, protocol=2),
               "data_batch_3": pickle.dumps({"data": rows[2], "labels": [6]}, protocol=4)}
    folder = _cifar10_folder(tmp_path / "data", batches, monkeypatch)
    images, labels = read_cifar10_batch(folder / "data_batch_1")
    assert labels == [1, 2, 3] and images.dtype == np.uint8
    np.testing.assert_array_equal(images, rows[0].reshape(3, 3, 32, 32))
    (tmp_path / "bytes-keys").write_bytes(pickle.dumps({b"data": rows[2], b"labels": [6]}, protocol=4))
    assert read_cifar10_batch(tmp_path / "bytes-keys")[1] == [6]
    reference = reference_for("ddpm-cifar10", InceptionSettings(cifar10_root=str(folder), batch_size=4), (32, 32))
    got = torch.cat(list(reference.load()))
    expected = torch.from_numpy(np.concatenate(rows).reshape(-1, 3, 32, 32))
    assert torch.equal(got, expected)
    # what torch-fidelity's cifar10-train input gives for the same files (read by torchvision's pickle.load)
    from torch_fidelity.registry import DATASETS_REGISTRY

    dataset = DATASETS_REGISTRY["cifar10-train"](str(folder.parent), False)
    assert torch.equal(torch.stack([dataset[i] for i in range(len(dataset))]), expected)


# ---- calibration caches --------------------------------------------------------------------------------


def _cache_contents(kind: str, obj) -> bytes:
    if kind == "malicious":
        buffer = io.BytesIO()
        torch.save({"data": obj}, buffer)
        return buffer.getvalue()
    if kind == "truncated":
        buffer = io.BytesIO()
        torch.save({"data": torch.zeros(1000)}, buffer)
        return buffer.getvalue()[:-100]
    return np.random.default_rng(0).bytes(4096)


@pytest.mark.parametrize("kind", ["malicious", "truncated", "garbage"])
def test_a_bad_qdiffusion_cache_file_is_a_miss(kind, payload, tmp_path):
    from baselines.qdiffusion.method import QDiffusion, _key

    obj, marker = payload
    payload_key = {"cell": 1}
    path = tmp_path / "qdiff" / f"data-{_key(payload_key)}.pt"
    path.parent.mkdir()
    path.write_bytes(_cache_contents(kind, obj))
    info: dict = {}
    value = QDiffusion()._cached(types.SimpleNamespace(cache_dir=tmp_path), "data", payload_key,
                                 lambda: {"made": torch.ones(2)}, info)
    assert torch.equal(value["made"], torch.ones(2)) and "cache_hits" not in info  # a miss, made again
    assert torch.equal(torch.load(path, weights_only=True)["made"], torch.ones(2))  # and overwritten
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["malicious", "truncated", "garbage"])
def test_a_bad_ptqd_cache_file_is_a_miss(kind, payload, tmp_path, monkeypatch):
    import baselines.ptqd.method as ptqd_method

    obj, marker = payload
    method = ptqd_method.PTQD()
    monkeypatch.setattr(ptqd_method.PTQD, "cache_key", lambda self, ctx, base: "fixed")
    (tmp_path / "ptqd").mkdir()
    (tmp_path / "ptqd" / "fixed.pt").write_bytes(_cache_contents(kind, obj))
    fresh = types.SimpleNamespace(to_dict=lambda: {"fresh": torch.ones(1)})
    monkeypatch.setattr(ptqd_method, "collect_statistics", lambda *args, **kwargs: fresh)
    model = types.SimpleNamespace(denoiser=lambda: None, schedule=None, image_shape=(1, 4, 4), start_batch=None)
    ctx = types.SimpleNamespace(cache_dir=tmp_path, cell=types.SimpleNamespace(seed=0, batch_size=4), model=model,
                                sampler=None, device=torch.device("cpu"), progress=False)
    prepared = types.SimpleNamespace(denoiser=lambda: None, start_trajectory=None)
    stats, cached = method.statistics(ctx, None, prepared)
    assert stats is fresh and cached is False
    assert not marker.exists()


# ---- the zoo: digits -------------------------------------------------------------------------------------


def test_digits_loads_safetensors_only(payload, tmp_path):
    """A pickled .bin next to the packaged safetensors is never read; pickle bytes under the safetensors name
    (manifest re-hashed) are a one-line error."""
    obj, marker = payload
    ckpt = _digits_copy(tmp_path)
    _malicious(ckpt / "unet" / "diffusion_pytorch_model.bin", obj)
    digits.load_unet(ckpt)
    _malicious(ckpt / "unet" / "diffusion_pytorch_model.safetensors", obj)
    _malicious(ckpt / "classifier" / "model.safetensors", obj)
    _rehash(ckpt)
    with pytest.raises(BenchError, match="cannot load the digits UNet") as exc:
        digits.load_unet(ckpt)
    _one_line(exc)
    with pytest.raises(BenchError, match="cannot read digits classifier weights") as exc:
        digits.load_classifier(ckpt)
    _one_line(exc)
    assert not marker.exists()


@pytest.mark.parametrize("part", ["unet", "classifier"])
def test_digits_weights_with_a_tensor_removed_are_an_error(part, tmp_path):
    ckpt = _digits_copy(tmp_path)
    weights = ckpt / (digits.UNET_FILES if part == "unet" else digits.CLASSIFIER_FILES)[1]
    state = load_file(weights)
    removed = sorted(state)[3]
    del state[removed]
    state["stray.weight"] = torch.zeros(1)
    save_file(state, weights)
    _rehash(ckpt)  # the hash check passes: only the content is wrong
    with pytest.raises(BenchError) as exc:
        digits.load_unet(ckpt) if part == "unet" else digits.load_classifier(ckpt)
    message = _one_line(exc)
    assert str(weights) in message and f"missing keys: {removed}" in message and "stray.weight" in message


def test_quality_with_a_corrupt_classifier_is_one_line_and_exit_2(tmp_path, capsys):
    ckpt = _digits_copy(tmp_path)
    (ckpt / "classifier" / "model.safetensors").write_bytes(np.random.default_rng(1).bytes(5000))
    _rehash(ckpt)
    assert main(["quality", "--checkpoint", str(ckpt), "--n", "4", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path / "o")]) == 2
    assert "model.safetensors" in _cli_error(capsys)


# ---- the zoo: ddpm-cifar10 --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model-790000.ckpt", "weights.pt", "weights.bin", "weights.pth"])
def test_ddpm_cifar10_original_files_never_run_pickled_code(name, payload, tmp_path):
    obj, marker = payload
    bad = _malicious(tmp_path / name, obj)
    with pytest.raises(BenchError, match="cannot read DDPM CIFAR-10 checkpoint") as exc:
        load_model("ddpm-cifar10", bad)
    assert str(bad) in _one_line(exc)
    assert not marker.exists()


def test_ddpm_cifar10_diffusers_bin_never_runs_pickled_code(payload, tmp_path):
    obj, marker = payload
    directory = tmp_path / "ddpm"
    _malicious(directory / "diffusion_pytorch_model.bin", obj)
    (directory / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **DDPM_CIFAR10_32}))
    with pytest.raises(BenchError, match="cannot read DDPM CIFAR-10 weights") as exc:
        load_model("ddpm-cifar10", directory)
    _one_line(exc)
    assert not marker.exists()


def test_diffusers_itself_reads_bin_files_weights_only(payload, tmp_path):
    """What the installed diffusers does with a .bin (we check first anyway): ``weights_only=True``."""
    from diffusers.models.model_loading_utils import load_state_dict

    obj, marker = payload
    bad = _malicious(tmp_path / "diffusion_pytorch_model.bin", obj)
    with pytest.raises((OSError, ValueError)):
        load_state_dict(str(bad))
    assert not marker.exists()


def test_ddpm_cifar10_diffusers_weights_with_a_tensor_removed_are_an_error(tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(**DDPM_CIFAR10_32).save_pretrained(tmp_path / "ddpm")
    weights = tmp_path / "ddpm" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["mid_block.attentions.0.to_q.weight"]
    save_file(state, weights)
    with pytest.raises(BenchError) as exc:
        load_model("ddpm-cifar10", tmp_path / "ddpm")
    message = _one_line(exc)
    assert str(weights) in message and "missing keys: mid_block.attentions.0.to_q.weight" in message


def test_ddpm_cifar10_original_weights_with_a_tensor_removed_name_the_file(tmp_path):
    from bench.zoo import ddpm_cifar10

    _, _, shapes = ddpm_cifar10._layout()
    state = {k: torch.zeros(s) for k, s in shapes.items() if k != "conv_out.bias"}
    path = tmp_path / "model-790000.ckpt"
    torch.save(state, path)
    with pytest.raises(BenchError) as exc:
        load_model("ddpm-cifar10", path)
    message = _one_line(exc)
    assert str(path) in message and "missing keys: conv_out.bias" in message


def test_models_check_with_garbage_safetensors_is_one_line_and_exit_2(tmp_path, capsys):
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(np.random.default_rng(2).bytes(10_000))
    assert main(["models", "--check", "ddpm-cifar10", "--checkpoint", str(garbage)]) == 2
    assert str(garbage) in _cli_error(capsys)


# ---- the zoo: LDM -------------------------------------------------------------------------------------------


def _lightning_module():
    """Stand-ins for pytorch_lightning's ModelCheckpoint (not installed), to write what Lightning pickles."""
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    modules = {name: types.ModuleType(name) for name in names}

    class ModelCheckpoint:
        def __init__(self):
            self.monitor = "val/loss"

        def __setstate__(self, state):  # would run only if the real class were used
            _plant(state["marker"])

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    return modules, ModelCheckpoint


def test_lightning_checkpoints_load_weights_only_with_inert_stand_ins(tmp_path, monkeypatch):
    """A Lightning-style model.ckpt: its callback class (as a dict key and an instance) and numpy scalars
    come out as inert stand-ins, its state dict as it was; nothing of theirs runs."""
    modules, ModelCheckpoint = _lightning_module()
    marker = tmp_path / "marker"
    callback = ModelCheckpoint()
    callback.__dict__["marker"] = str(marker)
    state = {"model.diffusion_model.w": torch.arange(4.0), "n": torch.tensor(3)}
    with monkeypatch.context() as m:
        for name, module in modules.items():
            m.setitem(__import__("sys").modules, name, module)
        torch.save({"state_dict": state, "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.5)}},
                    "checkpoint_callback": callback, "global_step": np.int64(7)}, tmp_path / "model.ckpt")
    names = set(torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "model.ckpt"))
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in names
    assert any(n.endswith("multiarray.scalar") for n in names)
    before = set(torch.serialization.get_safe_globals())
    got = ldm.read_lightning_state_dict(tmp_path / "model.ckpt")
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    assert not marker.exists()
    assert set(torch.serialization.get_safe_globals()) == before  # the stand-ins were allowed for that load only


def test_ldm_checkpoints_never_run_pickled_code(payload, tmp_path):
    obj, marker = payload
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.w": torch.zeros(2)}, "callbacks": [obj],
                "hyper_parameters": {"cfg": obj}}, path)
    try:  # an inert stand-in (the function, exec) or refused outright (os.system: torch blocks os / posix)
        assert set(ldm.read_lightning_state_dict(path)) == {"model.diffusion_model.w"}
    except BenchError as exc:
        assert obj.how == "system" and "\n" not in str(exc) and str(path) in str(exc)
    with pytest.raises(BenchError) as exc:  # not an LDM: the conversion names what is missing
        load_model("ldm-church", path)
    _one_line(exc)
    assert not marker.exists()


def test_ldm_diffusers_bin_never_runs_pickled_code(payload, tmp_path):
    obj, marker = payload
    directory = tmp_path / "unet"
    _malicious(directory / "diffusion_pytorch_model.bin", obj)
    (directory / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **ldm.CHURCH_UNET}))
    with pytest.raises(BenchError, match="cannot read ldm-church UNet weights") as exc:
        ldm._from_pretrained("UNet2DModel", directory, "ldm-church UNet")
    _one_line(exc)
    assert not marker.exists()


def test_ldm_checkpoint_with_tensors_missing_names_the_file_and_keys(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.time_embed.0.weight": torch.zeros(768, 192),
                               "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
                               "scale_factor": torch.tensor(0.2)}}, path)
    with pytest.raises(BenchError) as exc:
        load_model("ldm-church", path)
    message = _one_line(exc)
    assert str(path) in message and "missing" in message and "time_embed.0.bias" in message


def test_models_check_with_a_garbage_ckpt_is_one_line_and_exit_2(tmp_path, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(np.random.default_rng(3).bytes(100_000))
    assert main(["models", "--check", "ldm-church", "--checkpoint", str(garbage)]) == 2
    assert "not a zip archive" in _cli_error(capsys)


# ---- the zoo: Stable Diffusion (tiny stand-ins with SD's file layout) -----------------------------------


def _tiny_sd(root: Path, unet_bin: bool = False) -> Path:
    """unet / vae / text_encoder / tokenizer / scheduler folders with tiny models, as sd.load_parts reads them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    ).save_pretrained(root / "unet", safe_serialization=not unet_bin)
    AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  sample_size=8).save_pretrained(root / "vae")
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters), "th"]
    (tokenizer / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tokenizer / "merges.txt").write_text("#version: 0.2\nt h\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tokens), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(root / "text_encoder")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return _tiny_sd(tmp_path_factory.mktemp("sd"))


def _sd_copy(tiny_sd: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_sd, tmp_path / "sd"))


def _sd_load_parts(directory: Path) -> tuple:
    """What ``bench.zoo.sd.load`` reads, without its config checks (the tiny models are not SD's architecture)."""
    from bench.zoo import sd

    parts = sd.load_parts(directory, sd.find_files(directory, sd.SD_V14), sd.SD_V14.title, sd.TEXT_PARTS)
    return tuple(parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer"))


def test_the_tiny_sd_stand_in_loads(tiny_sd):
    unet, vae, text_encoder, tokenizer = _sd_load_parts(tiny_sd)
    assert tokenizer.model_max_length == 77 and not unet.training


@pytest.mark.parametrize("part, weights", [("unet", "diffusion_pytorch_model.bin"),
                                           ("vae", "diffusion_pytorch_model.bin"),
                                           ("text_encoder", "pytorch_model.bin")])
def test_sd_bin_components_never_run_pickled_code(part, weights, payload, tiny_sd, tmp_path):
    obj, marker = payload
    directory = _sd_copy(tiny_sd, tmp_path)
    for f in (directory / part).glob("*.safetensors"):
        f.unlink()
    _malicious(directory / part / weights, obj)
    with pytest.raises(BenchError, match="cannot read Stable Diffusion v1.4") as exc:
        _sd_load_parts(directory)
    assert f"{part}/{weights}" in _one_line(exc)
    assert not marker.exists()


def test_transformers_itself_reads_bin_files_weights_only(payload, tmp_path):
    transformers = pytest.importorskip("transformers")
    obj, marker = payload
    bad = _malicious(tmp_path / "pytorch_model.bin", obj)
    with pytest.raises(Exception):  # noqa: B017 - whatever it raises, it must not run the payload
        transformers.modeling_utils.load_state_dict(str(bad))
    assert not marker.exists()


@pytest.mark.parametrize("part, weights", [("unet", "diffusion_pytorch_model.safetensors"),
                                           ("vae", "diffusion_pytorch_model.safetensors"),
                                           ("text_encoder", "model.safetensors")])
def test_sd_weights_with_a_tensor_removed_are_an_error(part, weights, tiny_sd, tmp_path):
    directory = _sd_copy(tiny_sd, tmp_path)
    state = load_file(directory / part / weights)
    removed = sorted(k for k in state if k.endswith(".weight"))[0]
    del state[removed]
    save_file(state, directory / part / weights, metadata={"format": "pt"})
    with pytest.raises(BenchError) as exc:
        _sd_load_parts(directory)
    message = _one_line(exc)
    assert f"{part}/{weights}" in message and "missing keys" in message and removed in message
