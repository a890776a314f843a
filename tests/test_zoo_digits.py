"""The digits zoo entry's committed checkpoint (``bench.zoo.digits``): its recorded hashes, manifest and
architecture, and corrupt, missing or mismatched checkpoints refused."""

import hashlib
import json
import shutil

import pytest

from bench.errors import BenchError
from bench.zoo import load_model
from bench.zoo.checkpoints import write_manifest
from bench.zoo.digits import ASSET_DIR, CLASSIFIER_FILES, UNET_FILES, load_classifier


def test_recorded_hashes_match_the_committed_files():
    manifest = json.loads((ASSET_DIR / "manifest.json").read_text())
    assert set(manifest["files"]) == set(UNET_FILES + CLASSIFIER_FILES)
    for name, recorded in manifest["files"].items():
        assert hashlib.sha256((ASSET_DIR / name).read_bytes()).hexdigest() == recorded, name
    assert (ASSET_DIR / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size < 5_000_000


def test_committed_checkpoint_loads_as_a_diffusers_unet(digits_model):
    from diffusers import UNet2DModel

    unet = digits_model.unet
    assert isinstance(unet, UNet2DModel)
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1
    assert any("Attn" in t for t in unet.config.down_block_types)  # attention, needed by the baselines
    assert len(unet.down_blocks) == len(unet.up_blocks) == 3  # skip connections between them
    assert 100_000 < sum(p.numel() for p in unet.parameters()) < 2_000_000


def test_manifest_records_training_config_and_measured_quality():
    manifest = json.loads((ASSET_DIR / "manifest.json").read_text())
    assert manifest["unet"]["train"]["seed"] == 0
    assert manifest["unet"]["train"]["ema_decay"] > 0
    assert manifest["schedule"] == {"betas": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                                    "num_train_timesteps": 1000}
    assert manifest["classifier"]["heldout_accuracy"] > 0.95
    assert manifest["quality"]["passes"] is True
    assert manifest["provenance"]["versions"]["torch"]


def _copy(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(ASSET_DIR, dst)
    return dst


def test_corrupt_checkpoint_is_rejected(tmp_path):
    ckpt = _copy(tmp_path)
    weights = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BenchError, match="corrupt"):
        load_model("digits", ckpt)


def test_missing_checkpoint_is_rejected(tmp_path):
    with pytest.raises(BenchError, match="does not exist"):
        load_model("digits", tmp_path / "nowhere")
    ckpt = _copy(tmp_path)
    (ckpt / "classifier" / "model.safetensors").unlink()
    with pytest.raises(BenchError, match="missing"):
        load_classifier(ckpt)


def test_checkpoint_with_a_different_architecture_is_rejected(tmp_path):
    ckpt = _copy(tmp_path)
    config_path = ckpt / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [32, 64, 64]
    config_path.write_text(json.dumps(config))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    write_manifest(ckpt, list(manifest.pop("files")), manifest)  # hashes valid, config wrong
    with pytest.raises(BenchError, match="block_out_channels"):
        load_model("digits", ckpt)


def test_unknown_model_and_device_rejected():
    with pytest.raises(BenchError, match="unknown model 'cifar99'"):
        load_model("cifar99")
    with pytest.raises(BenchError, match="device"):
        load_model("digits", device="tpu")
