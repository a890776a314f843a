import json

import torch

from bench.train import ClassifierTrainConfig, UNetTrainConfig, train_tiny, train_unet
from bench.zoo import load_model
from bench.zoo.digits import load_classifier


def test_train_tiny_writes_a_verified_loadable_checkpoint(tmp_path):
    manifest = train_tiny(tmp_path, UNetTrainConfig(steps=20, warmup_steps=5),
                          ClassifierTrainConfig(epochs=1), eval_cfg=None, progress=False)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["unet"]["train"]["steps"] == 20 and on_disk["unet"]["loss_curve"][-1]["step"] == 20
    model = load_model("digits", tmp_path)  # verifies the recorded hashes and the architecture
    load_classifier(tmp_path)
    x = torch.randn(2, 1, 16, 16)
    assert model.denoiser()(x, torch.tensor([5, 500])).shape == x.shape


def test_unet_training_is_seeded_and_lowers_the_loss():
    cfg = UNetTrainConfig(steps=60, warmup_steps=10, log_every=10)
    a, curve_a = train_unet(cfg, progress=False)
    b, curve_b = train_unet(cfg, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert curve_a == curve_b
    assert curve_a[-1]["loss"] < 0.6 * curve_a[0]["loss"]
