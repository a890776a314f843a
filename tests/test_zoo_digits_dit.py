"""The embedded transformer ``digits-dit`` (``bench.zoo.digits_dit``): its committed checkpoint and recorded quality,
refused corrupt or missing files, classifier-free guidance on the seeds' classes, MoDiff on a DiT, the harness on it,
and its training entry points."""

import copy
import dataclasses
import hashlib
import json
import shutil

import pytest
import torch

import modiff
from bench.cli import main
from bench.errors import BenchError
from bench.train import DiTTrainConfig, class_accuracy, train_dit_checkpoint
from bench.zoo import load_model, model_entry
from bench.zoo.checkpoints import write_manifest
from bench.zoo.digits_dit import (
    ASSET_DIR,
    DIT_FILES,
    GUIDANCE_SCALE,
    NULL_CLASS,
    ClassConditioning,
    class_of,
)
from modiff.samplers import SamplerConfig, sample, sample_batch

pytestmark = pytest.mark.usefixtures("one_thread")

DDIM25 = SamplerConfig.from_name("ddim-quad", 25)


@pytest.fixture(scope="module")
def dit_model():
    return load_model("digits-dit")


def guided(model, seeds, config=DDIM25, batch_size=64, net=None, on_trajectory_start=None):
    return sample(model.denoiser(net), model.schedule, config, seeds, model.image_shape, batch_size=batch_size,
                  progress=False, on_batch=model.start_batch, on_trajectory_start=on_trajectory_start)


class Counting(torch.nn.Module):
    """The network, recording the batch and class labels of every call."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = []

    def forward(self, x, t, class_labels):
        self.calls.append((x.shape[0], class_labels.tolist()))
        return self.net(x, t, class_labels=class_labels)


# -- the committed checkpoint ---------------------------------------------------------------------


def test_recorded_hashes_match_the_committed_files_and_the_manifest_records_training_and_quality():
    manifest = json.loads((ASSET_DIR / "manifest.json").read_text())
    assert set(manifest["files"]) == set(DIT_FILES)
    for name, recorded in manifest["files"].items():
        assert hashlib.sha256((ASSET_DIR / name).read_bytes()).hexdigest() == recorded, name
    assert (ASSET_DIR / DIT_FILES[1]).stat().st_size < 4_000_000
    train = manifest["transformer"]["train"]
    assert train["class_dropout"] == pytest.approx(0.1) and train["ema_decay"] > 0 and train["seed"] == 0
    assert manifest["schedule"] == {"betas": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                                    "num_train_timesteps": 1000}
    quality = manifest["quality"]
    assert quality["passes"] is True and quality["sampling"]["guidance_scale"] == GUIDANCE_SCALE
    assert quality["class_accuracy"]["accuracy"] >= 0.9
    assert manifest["provenance"]["versions"]["diffusers"]


def test_committed_checkpoint_is_a_class_conditional_diffusers_dit(dit_model):
    from diffusers import DiTTransformer2DModel

    net = dit_model.unet
    assert isinstance(net, DiTTransformer2DModel)
    assert (net.config.in_channels, net.config.out_channels, net.config.sample_size) == (1, 1, 16)
    table = net.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == NULL_CLASS + 1  # ten digits and the null class of guidance
    assert 100_000 < sum(p.numel() for p in net.parameters()) < 1_500_000
    assert dit_model.info["guidance_scale"] == GUIDANCE_SCALE
    assert model_entry("digits-dit").family == "transformer"  # diffusers' caches apply, DeepCache does not
    assert model_entry("digits-dit").reference.dataset == "digits-train"


def _copy(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(ASSET_DIR, dst)
    return dst


def test_corrupt_missing_and_mismatched_checkpoints_are_one_line_errors(tmp_path, capsys):
    ckpt = _copy(tmp_path)
    weights = ckpt / DIT_FILES[1]
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BenchError, match="corrupt") as info:
        load_model("digits-dit", ckpt)
    assert "\n" not in str(info.value)
    assert main(["models", "--check", "digits-dit", "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt" in err

    weights.unlink()
    with pytest.raises(BenchError, match="missing"):
        load_model("digits-dit", ckpt)
    with pytest.raises(BenchError, match="does not exist"):
        load_model("digits-dit", tmp_path / "nowhere")

    ckpt = _copy(tmp_path / "arch")
    config_path = ckpt / DIT_FILES[0]
    config = json.loads(config_path.read_text())
    config["num_layers"] = 4
    config_path.write_text(json.dumps(config))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    write_manifest(ckpt, list(manifest.pop("files")), manifest)  # hashes valid, config wrong
    with pytest.raises(BenchError, match="num_layers"):
        load_model("digits-dit", ckpt)


# -- classifier-free guidance --------------------------------------------------------------------


def test_guided_samples_are_classified_as_their_seeds_class(dit_model, classifier):
    seeds = range(20)
    samples = guided(dit_model, seeds)
    classes = torch.tensor([class_of(s) for s in seeds])
    assert classes.tolist() == [s % 10 for s in seeds]
    result = class_accuracy(classifier, samples, classes)
    assert result["accuracy"] >= 0.8, result  # measured 1.0 (20 / 20) with the packaged checkpoint


def test_a_sample_depends_on_its_seed_only(dit_model):
    seeds, config = [3, 14, 15, 9, 26], SamplerConfig.from_name("ddim-quad", 5)
    net = Counting(dit_model.unet)
    in_twos = guided(dit_model, seeds, config, batch_size=2, net=net)
    n = NULL_CLASS
    assert net.calls[::5] == [(4, [n, n, 3, 4]), (4, [n, n, 5, 9]), (2, [n, 6])]  # 5 steps per batch
    net.calls.clear()
    at_once = guided(dit_model, seeds, config, batch_size=5, net=net)
    assert net.calls[0] == (10, [n] * 5 + [3, 4, 5, 9, 6])
    reordered = guided(dit_model, seeds[::-1], config, batch_size=5)
    # the same images up to float rounding (a matrix product's blocking depends on the batch size: ~1e-5 here);
    # a class taken from the position in the batch would change whole digits
    torch.testing.assert_close(in_twos, at_once, rtol=0, atol=1e-3)
    torch.testing.assert_close(reordered.flip(0), at_once, rtol=0, atol=1e-3)


def test_guidance_is_one_call_on_the_doubled_batch_and_scale_1_the_conditional_prediction(dit_model):
    net = Counting(dit_model.unet)
    x, t = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([900, 500, 20])
    with torch.no_grad():
        eps_c = dit_model.unet(x, t, class_labels=torch.tensor([7, 8, 9])).sample
        eps_u = dit_model.unet(x, t, class_labels=torch.full((3,), NULL_CLASS)).sample

        conditioning = ClassConditioning()
        conditioning.start_batch([17, 28, 39])
        out = conditioning.denoiser(net)(x, t)
        assert net.calls == [(6, [NULL_CLASS] * 3 + [7, 8, 9])]  # unconditional half first, as Stable Diffusion
        torch.testing.assert_close(out, eps_u + GUIDANCE_SCALE * (eps_c - eps_u), rtol=1e-4, atol=1e-5)

        net.calls.clear()
        plain = ClassConditioning(1.0)
        plain.start_batch([17, 28, 39])
        assert torch.equal(plain.denoiser(net)(x, t), eps_c)
        assert net.calls == [(3, [7, 8, 9])]  # no unconditional half

    with pytest.raises(RuntimeError, match="start_batch"):
        ClassConditioning().denoiser(net)(x, t)
    with pytest.raises(RuntimeError, match="start_batch"):
        conditioning.denoiser(net)(x[:2], t[:2])  # set for 3 samples


# -- MoDiff on a transformer ---------------------------------------------------------------------


def test_32_bit_modulation_reproduces_full_precision_on_the_dit(dit_model):
    net = modiff.quantize(copy.deepcopy(dit_model.unet), modiff.ModiffConfig(w_bits=32, a_bits=32, modulation="ec"))
    assert len(modiff.quant_layers(net)) > 30  # attention, feed-forward, adaLN and projections
    fp, quant = dit_model.denoiser(), dit_model.denoiser(net)
    worst = []

    def both(x, t):
        eps = fp(x, t)
        worst.append((quant(x, t) - eps).abs().max().item())
        return eps

    sample_batch(both, dit_model.schedule, DDIM25, range(4), dit_model.image_shape,
                 on_trajectory_start=lambda: modiff.reset(net), on_batch=dit_model.start_batch)
    assert len(worst) == 25
    assert max(worst) < 1e-4, max(worst)  # float rounding of the accumulated residuals only


def test_w8a8_modulated_dit_samples_are_finite_and_close_to_full_precision(dit_model):
    net = modiff.quantize(copy.deepcopy(dit_model.unet), modiff.ModiffConfig(w_bits=8, a_bits=8, modulation="ec"))
    seeds = range(8)
    config = SamplerConfig.from_name("ddim-quad", 10)
    quant = guided(dit_model, seeds, config, net=net, on_trajectory_start=lambda: modiff.reset(net))
    fp = guided(dit_model, seeds, config)
    assert torch.isfinite(quant).all()
    assert 0 < (quant - fp).abs().mean() < 0.1


# -- the harness ---------------------------------------------------------------------------------


def test_a_tiny_matrix_runs_on_the_dit_with_its_domain_metrics(tmp_path, capsys):
    matrix = tmp_path / "dit.toml"
    matrix.write_text(
        '[run]\nmodel = "digits-dit"\nsampler = "ddim-quad"\nsteps = 5\nn_samples = 4\nbatch_size = 4\n'
        'metrics = ["psnr_to_fp", "is_domain"]\n'
        '[matrix]\nw_bits = [8]\na_bits = [8]\nbase = ["fp", "lcq", "psq"]\nmodulation = ["off", "ec"]\n'
        'cache = ["none"]\n')
    out = tmp_path / "out"
    assert main(["run", str(matrix), "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    import csv

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {(r["base"], r["modulation"]) for r in rows} == {("fp", "off"), ("lcq", "off"), ("lcq", "ec"),
                                                           ("psq", "off"), ("psq", "ec")}
    assert all(r["status"] == "ok" and float(r["is_domain"]) > 1 for r in rows), rows


# -- training ------------------------------------------------------------------------------------


def test_train_dit_writes_a_verified_loadable_checkpoint(tmp_path, capsys):
    manifest = train_dit_checkpoint(tmp_path, DiTTrainConfig(steps=8, warmup_steps=2, log_every=4), eval_cfg=None,
                                    progress=False)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["transformer"]["loss_curve"][-1]["step"] == 8
    model = load_model("digits-dit", tmp_path)  # verifies the recorded hashes and the architecture
    model.start_batch([0, 1])
    x = torch.randn(2, 1, 16, 16)
    assert model.denoiser()(x, torch.tensor([5, 500])).shape == x.shape

    assert main(["train-dit", "--install", "--no-eval", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quality bar" in err


def test_train_dit_command_measures_the_guided_samples_and_fails_below_the_bar(tmp_path, capsys, monkeypatch):
    import bench.train

    monkeypatch.setattr(bench.train, "DEFAULT_DIT_EVAL", bench.train.DiTEvalConfig(
        n_samples=180, steps=2, batch_size=180, sweep=(1.0,)))  # 180: the bar's FD needs 179 images
    out = tmp_path / "o"
    assert main(["train-dit", "--steps", "4", "--out", str(out), "--no-progress", "--install"]) == 1
    captured = capsys.readouterr()
    assert "quality bar: FAIL" in captured.out and "guidance 1.0: FAIL" in captured.out
    assert captured.err.strip() == "modiff-bench: the retrained model does not meet the quality bar"
    quality = json.loads((out / "manifest.json").read_text())["quality"]
    assert quality["sampling"]["guidance_scale"] == GUIDANCE_SCALE and not quality["passes"]
    assert len(quality["class_accuracy"]["per_class"]) == 10 and quality["class_accuracy"]["accuracy"] < 0.5
    assert [row["guidance_scale"] for row in quality["guidance_sweep"]] == [1.0]
    assert json.loads((ASSET_DIR / "manifest.json").read_text())["files"] != \
        json.loads((out / "manifest.json").read_text())["files"]  # --install left the packaged model alone


def test_domain_metrics_read_the_digits_classifier_also_for_a_digits_dit_checkpoint(tmp_path):
    from bench.data import load_digits_split
    from bench.metrics import METRICS, MetricInputs, compute_metrics

    assert all("digits-dit" in METRICS[name].models for name in ("fd_domain", "is_domain", "kid_domain"))
    images = load_digits_split("heldout-b").images[:80].half()
    ckpt = _copy(tmp_path)  # a digits-dit checkpoint: no classifier in it
    names = ["fd_domain", "is_domain", "kid_domain"]
    values, missing = compute_metrics(names, MetricInputs(images, "digits-dit", checkpoint=str(ckpt)))
    assert missing == {}
    assert values == compute_metrics(names, MetricInputs(images, "digits"))[0]  # the packaged digits classifier


def test_deepcache_is_skipped_and_diffusers_caches_are_not():
    """DeepCache caches a UNet's up-block features: on the DiT its cells are skipped with the reason when the matrix
    is planned (they failed at build before); diffusers' transformer caches resolve."""
    from bench.build import resolve_cell
    from bench.methods import CellSpec

    def cell(cache):
        return CellSpec(model="digits-dit", checkpoint=None, sampler="ddim-quad", steps=10, eta=0.0, n_samples=1,
                        seed=0, batch_size=1, base="fp", modulation="off", cache=cache, w_bits=32, a_bits=32,
                        a_granularity="none")

    skip = resolve_cell(cell("deepcache-u2")).skip
    assert skip is not None and "digits-dit is a transformer" in skip and "\n" not in skip
    assert resolve_cell(cell("fbcache-0.05")).skip is None
    assert "is a UNet" in resolve_cell(dataclasses.replace(cell("fbcache-0.05"), model="digits")).skip
