"""The zoo registry and the generic entry ``diffusers:<directory or hub id>`` (any unconditional UNet2DModel
pipeline), on a tiny random UNet2DModel saved with ``save_pretrained`` beside a DDPMScheduler config: end to end
through a matrix cell, one-line errors (exit status 2 at ``--dry-run``) for unusable directories, ``steps <= T``
from the scheduler config, and a pickle-bomb ``.bin`` that never runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_safe_loading import Payload  # a pickle that creates a marker file if anything runs it

from bench.cli import main
from bench.errors import BenchError
from bench.matrix import build_matrix
from bench.references import reference_for
from bench.runner import Runner
from bench.zoo import (
    DESCRIPTIONS,
    MODELS,
    TRAIN_TIMESTEPS,
    ReferenceData,
    ZooEntry,
    load_model,
    model_entry,
    register_model,
    registry,
    schemes,
)
from bench.zoo.checkpoints import write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

T = 100  # the tiny pipeline's num_train_timesteps
UNET = {"sample_size": 8, "in_channels": 3, "out_channels": 3, "layers_per_block": 1, "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 4}


def save_pipeline(directory: Path, unet: dict | None = None, scheduler_class: str = "DDPMScheduler",
                  **scheduler) -> Path:
    """A diffusers pipeline directory as DDPMPipeline.save_pretrained lays it out: unet/ and scheduler/."""
    import diffusers
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(**{**UNET, **(unet or {})}).save_pretrained(directory / "unet")
    getattr(diffusers, scheduler_class)(**{"num_train_timesteps": T, **scheduler}).save_config(
        directory / "scheduler")
    return directory


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return save_pipeline(tmp_path_factory.mktemp("generic") / "tiny-ddpm")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def _matrix_file(path: Path, model: str, steps: int = 4) -> Path:
    path.write_text(f"[run]\nmodel = {json.dumps(model)}\nsampler = \"ddim-uniform\"\nsteps = {steps}\n"
                    "n_samples = 4\nbatch_size = 2\nmetrics = [\"psnr_to_fp\"]\n"
                    "[matrix]\nw_bits = [8]\na_bits = [4]\nbase = [\"fp\", \"lcq\"]\nmodulation = [\"off\", \"ec\"]\n")
    return path


# ---- end to end ----------------------------------------------------------------------------------------------------


def test_a_diffusers_directory_runs_through_a_matrix_cell(pipeline, tmp_path):
    model = f"diffusers:{pipeline}"
    matrix = build_matrix({
        "run": {"model": model, "sampler": "ddim-uniform", "steps": 4, "n_samples": 4, "batch_size": 2,
                "metrics": ["psnr_to_fp", "mse_to_fp", "fid"]},
        "matrix": {"w_bits": [8], "a_bits": [4], "base": ["fp", "lcq"], "modulation": ["off", "ec"]},
    })
    assert [c.method for c in matrix.cells] == ["fp", "lcq", "lcq+ec"]
    out = tmp_path / "run"
    summary = Runner(matrix, out, device="cpu", progress=False, log=lambda text: None).run()
    assert summary.ran == 3 and not summary.failed
    rows = pd.read_csv(out / "results.csv").set_index("method")
    assert (rows["status"] == "ok").all() and (rows["model"] == model).all()
    assert rows.loc["fp", "psnr_to_fp"] == np.inf and rows.loc["fp", "mse_to_fp"] == 0
    for method in ("lcq", "lcq+ec"):
        assert 5 < rows.loc[method, "psnr_to_fp"] < np.inf and rows.loc[method, "mse_to_fp"] > 0
    assert rows["fid"].isna().all()  # no reference data: missing with a reason, not a crash
    for cell in (out / "cells").iterdir():
        result = json.loads((cell / "result.json").read_text())
        assert "no default reference set" in result["missing_metrics"]["fid"]
        assert "reference_images" in result["missing_metrics"]["fid"]
    info = json.loads((out / "run.json").read_text())["models"][model]
    weights = pipeline / "unet" / "diffusion_pytorch_model.safetensors"
    assert info["source"] == "diffusers" and info["scheduler"]["_class_name"] == "DDPMScheduler"
    assert set(info["files"]) == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                                  "scheduler/scheduler_config.json"}
    assert info["files"]["unet/diffusion_pytorch_model.safetensors"] == __import__("hashlib").sha256(
        weights.read_bytes()).hexdigest()


def test_the_loaded_model_is_the_saved_one_with_its_schedule(pipeline):
    from diffusers import UNet2DModel

    model = load_model(f"diffusers:{pipeline}")
    saved = UNet2DModel.from_pretrained(pipeline / "unet")
    assert model.unet.state_dict().keys() == saved.state_dict().keys()
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.unet.state_dict().items())
    assert not model.unet.training and not any(p.requires_grad for p in model.unet.parameters())
    assert model.image_shape == (3, 8, 8) and model.image_output_shape == (3, 8, 8) and model.decoder is None
    assert model.schedule.num_train_timesteps == T
    assert torch.equal(model.schedule.betas, torch.from_numpy(np.linspace(1e-4, 0.02, T, dtype=np.float64)))
    with pytest.raises(BenchError, match="leave run.checkpoint"):
        load_model(f"diffusers:{pipeline}", checkpoint=pipeline)


@pytest.mark.parametrize("settings", [
    {"beta_schedule": "linear", "beta_start": 2e-4, "beta_end": 0.03},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"trained_betas": list(np.linspace(1e-3, 0.05, T))},
])
@pytest.mark.parametrize("scheduler_class", ["DDPMScheduler", "DDIMScheduler"])
def test_the_schedule_is_the_scheduler_configs(settings, scheduler_class, tmp_path):
    """Every beta_schedule (and trained_betas) gives diffusers' own betas, in float64, read without weights."""
    import diffusers

    directory = save_pipeline(tmp_path / "p", scheduler_class=scheduler_class, **settings)
    (directory / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # T and the size need no weights
    entry = model_entry(f"diffusers:{directory}")
    assert entry.train_timesteps == T and entry.output_size == (8, 8) and entry.reference == ReferenceData()
    from bench.zoo.generic import read_pipeline

    ours = read_pipeline(str(directory)).betas
    theirs = getattr(diffusers, scheduler_class).from_pretrained(directory / "scheduler").betas
    assert ours.dtype == torch.float64 and ours.shape == (T,)
    assert torch.allclose(ours.float(), theirs, rtol=1e-6, atol=1e-9)


def test_a_flat_hub_style_layout_and_a_manifest(pipeline, tmp_path):
    """The first hub conversions keep config.json, weights and scheduler_config.json at the root; a manifest.json in
    the directory is verified before anything is loaded."""
    flat = tmp_path / "flat"
    shutil.copytree(pipeline / "unet", flat)
    shutil.copy(pipeline / "scheduler" / "scheduler_config.json", flat)
    model = load_model(f"diffusers:{flat}")
    assert model.schedule.num_train_timesteps == T and set(model.info["files"]) == {
        "config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"}

    write_manifest(flat, ["config.json", "diffusion_pytorch_model.safetensors"], {})
    load_model(f"diffusers:{flat}")
    weights = flat / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    with pytest.raises(BenchError, match="corrupt or was changed"):
        load_model(f"diffusers:{flat}")


# ---- one-line errors, exit status 2 at --dry-run -------------------------------------------------------------------


def _break(kind: str, directory: Path) -> None:
    scheduler = directory / "scheduler" / "scheduler_config.json"
    unet = directory / "unet" / "config.json"

    def edit(path: Path, **changes):
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    if kind == "no unet":
        shutil.rmtree(directory / "unet")
    elif kind == "no scheduler":
        shutil.rmtree(directory / "scheduler")
    elif kind == "sample prediction":
        edit(scheduler, prediction_type="sample")
    elif kind == "beta schedule":
        edit(scheduler, beta_schedule="sigmoid")
    elif kind == "scheduler class":
        edit(scheduler, _class_name="FlowMatchEulerDiscreteScheduler")
    elif kind == "zero snr":
        edit(scheduler, rescale_betas_zero_snr=True)
    elif kind == "garbage scheduler":
        scheduler.write_text("{not json")
    elif kind == "learned variance":
        edit(unet, out_channels=6)
    elif kind == "class conditional":
        edit(unet, num_class_embeds=10)
    elif kind == "conditional unet":
        edit(unet, _class_name="UNet2DConditionModel")
    elif kind == "latent pipeline":
        (directory / "model_index.json").write_text(json.dumps({
            "_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"],
            "scheduler": ["diffusers", "DDIMScheduler"], "vqvae": ["diffusers", "VQModel"]}))
    elif kind == "a file":
        shutil.rmtree(directory)
        directory.write_text("not a directory")
    elif kind == "missing":
        shutil.rmtree(directory)
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.mark.parametrize("kind,needle", [
    ("missing", "no such directory"),
    ("a file", "is a file"),
    ("no unet", "holds no unet/config.json"),
    ("no scheduler", "has no scheduler/scheduler_config.json"),
    ("sample prediction", "epsilon-predicting models only"),
    ("beta schedule", "beta_schedule 'sigmoid' is not supported"),
    ("scheduler class", "FlowMatchEulerDiscreteScheduler is not supported"),
    ("zero snr", "rescale_betas_zero_snr"),
    ("garbage scheduler", "cannot read scheduler config"),
    ("learned variance", "maps 3 channels to 6"),
    ("class conditional", "class-conditional"),
    ("conditional unet", "describes a UNet2DConditionModel"),
    ("latent pipeline", "LDMPipeline pipeline with vqvae"),
])
def test_unusable_directories_are_one_line_errors_at_dry_run(kind, needle, pipeline, tmp_path, capsys):
    directory = tmp_path / "p"
    shutil.copytree(pipeline, directory)
    _break(kind, directory)
    toml = _matrix_file(tmp_path / "m.toml", f"diffusers:{directory}")
    assert main(["run", str(toml), "--dry-run", "--out", str(tmp_path / "o")]) == 2
    line = _error_line(capsys)
    assert line.startswith("modiff-bench: error:") and needle in line, line
    with pytest.raises(BenchError) as exc:  # and the same from the zoo directly
        load_model(f"diffusers:{directory}")
    assert needle in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("scheduler_class", ["DDIMScheduler", "EulerDiscreteScheduler", "PNDMScheduler"])
def test_v_prediction_and_the_sd_schedulers_are_read(scheduler_class, tmp_path):
    """A v-predicting UNet (SD 2.x at 768 is one) gives a denoiser that turns v into eps (was refused before issue
    27); the schedulers SD and SDXL pipelines ship give their betas like DDPM's."""
    directory = save_pipeline(tmp_path / "p", scheduler_class=scheduler_class, prediction_type="v_prediction",
                              beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    model = load_model(f"diffusers:{directory}")
    assert model.info["prediction_type"] == "v_prediction" and "v_prediction" in model_entry(
        f"diffusers:{directory}").description
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 90])
    with torch.no_grad():
        v = model.unet(x, t).sample
        eps = model.denoiser()(x, t)
    ab = torch.tensor([model.schedule.alpha_bar(10), model.schedule.alpha_bar(90)]).view(2, 1, 1, 1).float()
    torch.testing.assert_close(eps, ab.sqrt() * v + (1 - ab).sqrt() * x, rtol=1e-5, atol=1e-6)
    plain = load_model(f"diffusers:{save_pipeline(tmp_path / 'q', scheduler_class=scheduler_class)}")
    with torch.no_grad():
        assert torch.equal(plain.denoiser()(x, t), plain.unet(x, t).sample)


def test_steps_are_checked_against_the_scheduler_T_at_dry_run(pipeline, tmp_path, capsys):
    model = f"diffusers:{pipeline}"
    assert main(["run", str(_matrix_file(tmp_path / "a.toml", model, steps=T + 1)), "--dry-run",
                 "--out", str(tmp_path / "o")]) == 2
    assert f"steps must be between 1 and {T} (T of {model}), got {T + 1}" in _error_line(capsys)
    assert main(["run", str(_matrix_file(tmp_path / "b.toml", model, steps=T)), "--dry-run",
                 "--out", str(tmp_path / "o")]) == 0
    assert "3 cells" in capsys.readouterr().out
    assert main(["run", str(_matrix_file(tmp_path / "c.toml", "diffusers:")), "--dry-run"]) == 2
    assert "names nothing after 'diffusers:'" in _error_line(capsys)
    assert main(["run", str(_matrix_file(tmp_path / "d.toml", "cifar99")), "--dry-run"]) == 2
    assert "or diffusers:<directory or hub id>" in _error_line(capsys)


# ---- no code from weight files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["function", "exec", "system"])
def test_a_pickle_bomb_bin_never_runs(how, pipeline, tmp_path, capsys):
    directory = tmp_path / "p"
    shutil.copytree(pipeline, directory)
    marker = tmp_path / "marker"
    bomb = {"conv_in.weight": torch.zeros(2), "x": Payload(marker, how)}
    torch.save(bomb, tmp_path / "bomb.bin")
    torch.load(tmp_path / "bomb.bin", weights_only=False)  # the payload does fire when unpickled the unsafe way
    assert marker.exists()
    marker.unlink()

    # beside the safetensors file: never read at all
    shutil.copy(tmp_path / "bomb.bin", directory / "unet" / "diffusion_pytorch_model.bin")
    assert load_model(f"diffusers:{directory}").info["files"].keys() >= {"unet/diffusion_pytorch_model.safetensors"}
    assert not marker.exists()
    # alone: refused by the weights-only reader, one line, exit status 2
    (directory / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(BenchError) as exc:
        load_model(f"diffusers:{directory}")
    message = str(exc.value)
    assert "\n" not in message and "cannot read UNet of diffusers:" in message
    assert str(directory / "unet" / "diffusion_pytorch_model.bin") in message
    assert main(["models", "--check", f"diffusers:{directory}"]) == 2
    assert "diffusion_pytorch_model.bin" in _error_line(capsys)
    assert not marker.exists()


def test_a_bin_file_of_plain_tensors_loads_strictly(pipeline, tmp_path):
    from safetensors.torch import load_file

    directory = tmp_path / "p"
    shutil.copytree(pipeline, directory)
    weights = directory / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    weights.unlink()
    torch.save(state, directory / "unet" / "diffusion_pytorch_model.bin")
    model = load_model(f"diffusers:{directory}")
    assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in state.items())
    del state["conv_out.bias"]
    torch.save({**state, "extra.weight": torch.zeros(1)}, directory / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(BenchError) as exc:
        load_model(f"diffusers:{directory}")
    message = str(exc.value)
    assert "\n" not in message and "missing keys: conv_out.bias" in message and "unexpected keys" in message


# ---- hub ids: the local cache only ---------------------------------------------------------------------------------


def test_a_hub_id_is_taken_from_the_local_cache_only(pipeline, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-ddpm"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(pipeline, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no directory called acme/tiny-ddpm here

    model = load_model("diffusers:acme/tiny-ddpm")
    assert model.info["source"] == "hub" and model.info["checkpoint"] == "acme/tiny-ddpm"
    assert model.info["revision"] == revision and model.schedule.num_train_timesteps == T
    with pytest.raises(BenchError) as exc:
        model_entry("diffusers:acme/not-cached")
    message = str(exc.value)
    assert "\n" not in message and "not in the local Hugging Face cache" in message
    assert "hf download acme/not-cached" in message


# ---- the registry --------------------------------------------------------------------------------------------------


def test_registry_views_keep_their_meaning():
    assert list(MODELS)[:8] == ["digits", "digits-dit", "ddpm-cifar10", "ddpm-cifar10-random", "ldm-church",
                                "ldm-bedroom", "sd-v1-4", "sdxl-base-1.0"]
    assert {name: TRAIN_TIMESTEPS[name]() for name in MODELS} == {name: 1000 for name in MODELS}
    assert "CIFAR-10" in DESCRIPTIONS["ddpm-cifar10"] and DESCRIPTIONS.get("nope", "") == ""
    assert {name: model_entry(name).output_size for name in MODELS} == {
        "digits": (16, 16), "digits-dit": (16, 16), "ddpm-cifar10": (32, 32), "ddpm-cifar10-random": (32, 32),
        "ldm-church": (256, 256), "ldm-bedroom": (256, 256), "sd-v1-4": (512, 512), "sdxl-base-1.0": (1024, 1024),
        "dit-xl-2-256": (256, 256), "dit-xl-2-256-random": (256, 256), "pixart-alpha-512": (512, 512),
        "pixart-alpha-512-random": (512, 512), "sd3-medium": (1024, 1024), "sd3-medium-random": (1024, 1024),
        "flux-1-schnell": (1024, 1024), "flux-1-schnell-random": (1024, 1024), "flux-1-dev": (1024, 1024),
        "flux-1-dev-random": (1024, 1024)}
    # the kind of denoiser: the DiT papers' table layout and diffusers' caches follow it
    transformers = {"digits-dit", "dit-xl-2-256", "dit-xl-2-256-random", "pixart-alpha-512", "pixart-alpha-512-random",
                    "sd3-medium", "sd3-medium-random", "flux-1-schnell", "flux-1-schnell-random", "flux-1-dev",
                    "flux-1-dev-random"}
    assert {name for name in MODELS if model_entry(name).family == "transformer"} == transformers
    assert {model_entry(name).family for name in MODELS if name not in transformers} == {"unet"}
    assert model_entry("digits").reference.dataset == "digits-train"
    assert model_entry("ddpm-cifar10").reference.dataset == "cifar10-train"
    with pytest.raises(TypeError):
        MODELS["x"] = None  # read-only
    assert "UNet2DModel pipeline" in schemes()["diffusers:<directory or hub id>"]
    assert "SDXL" in schemes()["diffusers:<directory or hub id>"]


def test_a_registered_model_is_everywhere_at_once(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "_ENTRIES", dict(registry._ENTRIES))  # forget the test's entries afterwards

    def load(checkpoint):
        return load_model("digits")

    entry = register_model(ZooEntry("my-digits", load, 1000, "the digits model again", (16, 16),
                                    ReferenceData(None, "my own digits")))
    assert MODELS["my-digits"] is load and TRAIN_TIMESTEPS["my-digits"]() == 1000 and model_entry("my-digits") is entry
    assert "no reference images for my-digits (my own digits)" in reference_for("my-digits")
    assert register_model(ZooEntry("my-digits", load, 1000, "again", (16, 16))).description == "again"  # re-import
    with pytest.raises(ValueError, match="already registered"):
        register_model(ZooEntry("digits", load, 1000, "", (16, 16)))
    for bad in ("a:b", "a b"):
        with pytest.raises(ValueError, match="may not contain"):
            register_model(ZooEntry(bad, load, 1000, "", (16, 16)))
    for kwargs in ({"train_timesteps": 0}, {"output_size": (16,)}, {"output_size": (16, 0)}):
        with pytest.raises(ValueError):
            ZooEntry(**{"name": "x", "load": load, "train_timesteps": 10, "description": "",
                        "output_size": (16, 16), **kwargs})
    build_matrix({"run": {"model": "my-digits", "steps": 5, "n_samples": 2, "batch_size": 2}})
    with pytest.raises(BenchError, match="T of my-digits"):
        build_matrix({"run": {"model": "my-digits", "steps": 1001}})

    register_model(ZooEntry("wrong-size", load, 1000, "", (32, 32)))
    with pytest.raises(RuntimeError, match="declares output_size"):
        load_model("wrong-size")


def test_models_lists_the_generic_entry(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("digits ") for line in lines)
    assert any(line.startswith("diffusers:<directory or hub id>  an unconditional") for line in lines)
