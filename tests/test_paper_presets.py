"""The paper-scale presets: their settings are the papers', and they run end to end on random weights of
the exact published architectures (the real checkpoints cannot be downloaded here), through the same
loaders, runner, methods and CLI a user with the weights runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.cli import main
from bench.matrix import load_matrix
from bench.matrix_file import presets
from bench.methods import base_quantizer

PAPER_PRESETS = ("cifar10-paper", "cifar10-quick", "cifar10-ablations", "cifar10-deepcache", "lsun-church-paper",
                 "lsun-bedroom-paper")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_paper_presets_ship_with_the_papers_settings():
    assert set(PAPER_PRESETS) <= set(presets())
    table1 = load_matrix("cifar10-paper")
    # FP + {qdiff, paper-lcq, paper-ltq} x {off, ec} x W8/W4 x A8..A2, but Q-Diffusion + MoDiff on the authors'
    # residual grid at A2 (their start divides by zero there)
    assert len(table1.cells) == 1 + 3 * 2 * 2 * 5 - 2
    assert {(s["base"], s["modulation"], s["a_bits"]) for s in table1.skipped} == {("qdiff", "ec", 2)}
    assert {(c.model, c.sampler, c.steps, c.eta, c.n_samples, c.seed, c.batch_size) for c in table1.cells} == {
        ("ddpm-cifar10", "ddim-quad", 100, 0.0, 50_000, 1234, 64)}
    assert {c.base for c in table1.cells} == {"fp", "qdiff", "paper-lcq", "paper-ltq"}  # the authors' settings
    assert {c.a_granularity for c in table1.cells if c.base.startswith("paper-")} == {"tensor", "sample"}
    assert all(c.params["paper-lcq"] == {**base_quantizer("paper-lcq").PARAMS} for c in table1.cells
               if c.base == "paper-lcq")  # symmetric, split, Q-Diffusion weights: the CIFAR-10 command
    assert all(c.params["qdiff"]["authors_grid"] for c in table1.cells if c.base == "qdiff")
    # Q-Diffusion's activations as their CIFAR-10 command: --a_sym, 'max' from 64 samples drawn without repeats
    assert {tuple(c.params["qdiff"][k] for k in ("act_symmetric", "act_init", "act_init_samples", "act_init_pick",
                                                 "running_stat", "out_penalty"))
            for c in table1.cells if c.base == "qdiff"} == {(True, "max", 64, "random", False, 0.0)}
    assert {c.a_bits for c in table1.cells if c.base != "fp"} == {8, 6, 4, 3, 2}
    assert {"fid", "is", "sfid"} <= set(table1.metrics)
    quick = load_matrix("cifar10-quick")
    assert [c.n_samples for c in quick.cells] == [5_000] * len(table1.cells)
    assert {(c.base, c.modulation, c.w_bits, c.a_bits) for c in quick.cells} == {
        (c.base, c.modulation, c.w_bits, c.a_bits) for c in table1.cells}

    ablations = load_matrix("cifar10-ablations").cells
    warmups = {(c.modulation, c.a_bits, c.params["paper-ltq"]["warmup"]) for c in ablations
               if c.base == "paper-ltq" and c.sampler == "ddim-quad" and c.steps == 100}
    assert warmups == {(m, a, w) for m in ("off", "ec") for a in (8, 6, 4) for w in (True, False)}
    assert {(c.sampler, c.steps) for c in ablations} == {("ddim-quad", 100), ("dpm-solver++", 20), ("ddim-quad", 20)}
    assert {c.modulation for c in ablations if c.base == "paper-lcq"} == {"off", "plain", "ec"}

    deepcache = load_matrix("cifar10-deepcache").cells
    assert {c.cache for c in deepcache if c.base == "fp"} == {"none", "deepcache-u2", "deepcache-u3", "deepcache-u5",
                                                               "deepcache-u10"}
    church, bedroom = load_matrix("lsun-church-paper").cells, load_matrix("lsun-bedroom-paper").cells
    # the authors' commands, not the paper's text (200 / 500 steps): -c 400 / -c 200, seed 41, batch 8
    assert {(c.model, c.sampler, c.steps, c.seed, c.batch_size) for c in church} == {("ldm-church", "ddim-ldm", 400,
                                                                                      41, 8)}
    assert {(c.model, c.sampler, c.steps, c.seed, c.batch_size) for c in bedroom} == {("ldm-bedroom", "ddim-ldm", 200,
                                                                                       41, 8)}
    assert {c.base for c in church} == {"fp", "qdiff", "paper-lcq"} and {c.base for c in bedroom} == {"fp", "paper-lcq"}
    for cell in [*church, *bedroom, *load_matrix("lsun-bedroom-ddpm").cells]:
        if cell.base == "paper-lcq":  # no --a_sym, no --split in the LSUN commands
            assert cell.params["paper-lcq"]["symmetric"] is False and cell.params["paper-lcq"]["split"] is False
            assert cell.params["qdiff"]["weight_init"] == "mse"
        if cell.base == "qdiff":
            assert cell.params["qdiff"]["authors_grid"] is False
            # their church command: asymmetric, MSE-searched ranges from the first 64 rows, no running statistics
            assert {k: cell.params["qdiff"][k] for k in ("act_symmetric", "act_init", "act_init_samples",
                                                         "act_init_pick", "running_stat")} == {
                "act_symmetric": False, "act_init": "mse", "act_init_samples": 64, "act_init_pick": "first",
                "running_stat": False}


@pytest.fixture(scope="module")
def cifar10_checkpoint(tmp_path_factory) -> Path:
    from bench.zoo.architectures import DDPM_CIFAR10_32, build_random_unet

    folder = tmp_path_factory.mktemp("ddpm-cifar10")
    build_random_unet(DDPM_CIFAR10_32, seed=3).save_pretrained(folder)
    return folder


def test_cifar10_table1_preset_runs_end_to_end_on_random_weights(cifar10_checkpoint, tmp_path, capsys):
    """Table 1's preset, cut to 4 images, 2 steps and W8A4, with every base of the table (Q-Diffusion
    calibrating for real, on a tiny budget) and the Inception metrics requested without weights."""
    out = tmp_path / "c10"
    code = main(["run", "cifar10-paper", "--out", str(out), "--device", "cpu", "--no-progress",
                 "--set", f"run.checkpoint={json.dumps(str(cifar10_checkpoint))}", "--set", "run.n_samples=4",
                 "--set", "run.batch_size=2", "--set", "steps=2", "--set", "matrix.w_bits=[8]",
                 "--set", "matrix.a_bits=[4]", "--set", "params.qdiff.cali_n=2", "--set", "params.qdiff.cali_st=2",
                 "--set", "params.qdiff.weight_iters=2", "--set", "params.qdiff.act_iters=2",
                 "--set", 'run.metrics=["psnr_to_fp", "fid"]', "--set", 'inception.cache_dir="%s"' % (tmp_path / "ic")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "estimate: 7 cells, 28 images:" in captured.out  # printed before the run, from measured calls
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 7 and (table["status"] == "ok").all()
    assert set(table["method"]) == {"fp", "qdiff", "qdiff+ec", "paper-lcq", "paper-lcq+ec", "paper-ltq",
                                    "paper-ltq+ec"}
    assert table["fid"].isna().all()  # no Inception weights here: a reason, never a number
    assert all("fid" in json.loads(m) for m in table["missing_metrics"])
    for row in table.itertuples():
        images = torch.load(out / row.samples_file, weights_only=True)["images"]
        assert images.shape == (4, 3, 32, 32) and images.isfinite().all()
    models = json.loads((out / "run.json").read_text())["models"]
    assert models["ddpm-cifar10"]["checkpoint"] == str(cifar10_checkpoint)
    assert len(models["ddpm-cifar10"]["files"]) == 1  # the weights file, with its sha256


def test_lsun_church_preset_runs_end_to_end_on_random_weights(tmp_path, capsys):
    """The LDM-8 church preset: latent sampling with LDM's DDIM grid, MoDiff on the UNet, decoding by
    the (full-precision) KL-f8 autoencoder, 256x256 images out."""
    from diffusers import AutoencoderKL, UNet2DModel

    from bench.zoo import ldm

    checkpoint = tmp_path / "church"
    torch.manual_seed(0)
    UNet2DModel(**ldm.CHURCH_UNET).save_pretrained(checkpoint / "unet")
    AutoencoderKL(**ldm.CHURCH_AUTOENCODER).save_pretrained(checkpoint / "vae")
    out = tmp_path / "church-run"
    # one cell (LCQ + MoDiff, W8A4) and FID without reference statistics: no full-precision reference
    # run is needed, which keeps this 295M-parameter model's test short
    code = main(["run", "lsun-church-paper", "--out", str(out), "--device", "cpu", "--no-progress",
                 "--set", f"run.checkpoint={json.dumps(str(checkpoint))}", "--set", "run.n_samples=2",
                 "--set", "run.batch_size=2", "--set", "steps=2", "--set", "matrix.a_bits=[4]",
                 "--set", 'matrix.base=["paper-lcq"]', "--set", 'matrix.modulation=["ec"]',
                 "--set", 'run.metrics=["fid"]', "--set", 'params.paper-lcq.weights="minmax"'])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "estimate: 1 cells, 2 images:" in captured.out
    table = pd.read_csv(out / "results.csv")
    assert list(table["method"]) == ["paper-lcq+ec"] and (table["status"] == "ok").all()
    assert table["sampler"].iloc[0] == "ddim-ldm" and table["decode_s"].iloc[0] > 0
    assert "reference_stats" in json.loads(table["missing_metrics"].iloc[0])["fid"]  # says what to provide
    images = torch.load(out / table["samples_file"].iloc[0], weights_only=True)["images"].float()
    assert images.shape == (2, 3, 256, 256) and images.isfinite().all() and images.abs().max() <= 1.0
