"""Flow matching in the matrix harness (issue #28, item 2): ``flow-euler`` / ``flow-heun`` cells on a flow-matching
zoo model, here a tiny random ``SD3Transformer2DModel`` (SD3's conditioning and guidance, ``bench.zoo.sd3``) with a
``FlowGrid`` schedule. The harness's samples are ``modiff.flow.sample_flow``'s and diffusers'
``FlowMatchEulerDiscreteScheduler`` loop's; MoDiff runs on it (W8A8, and at 32 bits it is the full-precision model);
PTQD and DeepCache are skipped with their reasons; a sampler of the other kind than the model is a one-line error;
an interrupted run resumes."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import modiff
from bench import generate
from bench.build import build
from bench.cli import main
from bench.errors import BenchError
from bench.generate import sample_model, to_float16
from bench.matrix import build_matrix, resolve, sampler_from_name
from bench.runner import Runner
from bench.zoo import ZooEntry, load_model, register_model
from bench.zoo.model import ZooModel, is_flow_model, mark_flow_model
from bench.zoo.sd3 import FlowConditioning, random_encoder
from modiff.flow import FlowGrid, FlowSamplerConfig, FlowSchedule, sample_flow

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "tiny-flow-sd3"
LATENT = (4, 8, 8)
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
TINY = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8,
        "num_attention_heads": 2, "joint_attention_dim": 16, "caption_projection_dim": 16,
        "pooled_projection_dim": 8, "out_channels": 4, "pos_embed_max_size": 8}


def tiny_flow_model(checkpoint=None) -> ZooModel:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**TINY).eval().requires_grad_(False)
    encode = random_encoder({"encoder_hidden_states": (6, 16), "pooled_projections": (8,)})
    conditioning = FlowConditioning(encode, ["a red cube", "a blue sphere"], 3.0)
    return ZooModel(name=NAME, unet=transformer, schedule=FlowGrid(FlowSchedule.from_config(SCHEDULER)),
                    image_shape=LATENT, default_sampler="flow-euler", default_steps=6,
                    make_denoiser=conditioning.denoiser, start_batch=conditioning.start_batch, default_batch_size=2)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    """The tiny model in the zoo for this module only (the zoo's listing stays the zoo's for the others)."""
    from bench.zoo import model as zoo_model
    from bench.zoo import registry

    register_model(ZooEntry(NAME, tiny_flow_model, 1000, "a tiny random SD3-shaped flow model", LATENT[1:],
                            family="transformer"))
    mark_flow_model(NAME)
    yield
    registry._ENTRIES.pop(NAME, None)
    zoo_model._FLOW_MODELS.discard(NAME)


@pytest.fixture(scope="module")
def model(_registered):
    return load_model(NAME)


def _matrix(**matrix):
    axes = {"model": NAME, "sampler": "flow-euler", "steps": 4, "base": ["fp"], **matrix}
    return build_matrix({"run": {"n_samples": 3, "batch_size": 2, "metrics": ["psnr_to_fp"]}, "matrix": axes})


def _diffusers_loop(model: ZooModel, seeds: list[int], steps: int) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER)
    scheduler.set_timesteps(steps)
    x = torch.stack([torch.randn(LATENT, generator=torch.Generator().manual_seed(s)) for s in seeds])
    model.start_batch(seeds)
    denoiser = model.denoiser()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(denoiser(x, t.expand(len(seeds))), t, x, return_dict=False)[0]
    return x


def test_flow_euler_in_the_harness_is_sample_flow_and_diffusers_loop(model):
    seeds = [5, 6]
    sampler = sampler_from_name("flow-euler", 5)
    assert isinstance(sampler, FlowSamplerConfig) and sampler.name == "flow-euler" and sampler.eta == 0.0
    harness = sample_model(model.denoiser(), model, sampler, seeds, 2, torch.device("cpu"))
    model.start_batch(seeds)
    library = sample_flow(model.denoiser(), model.schedule.schedule, 5, seeds, LATENT, on_batch=model.start_batch)
    assert torch.equal(harness, library)
    torch.testing.assert_close(harness, _diffusers_loop(model, seeds, 5), rtol=1e-5, atol=1e-5)
    # the grid the harness records: float model times, Heun evaluating twice per step but the last
    assert sampler.evaluation_timesteps(model.schedule) == pytest.approx(
        [float(t) for t in _scheduler_timesteps(5)])
    heun = sampler_from_name("flow-heun", 5)
    assert len(heun.evaluation_timesteps(model.schedule)) == 9
    assert sampler.timesteps(model.schedule) == sorted(sampler.evaluation_timesteps(model.schedule))


def _scheduler_timesteps(steps: int) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


def test_modiff_at_32_bits_is_the_full_precision_model(model):
    seeds = [1, 2]
    sampler = sampler_from_name("flow-heun", 3)
    fp = sample_model(model.denoiser(), model, sampler, seeds, 2, torch.device("cpu"))
    unet = modiff.quantize(copy.deepcopy(model.unet), modiff.ModiffConfig(w_bits=32, a_bits=32, modulation="ec"))
    modulated = sample_model(model.denoiser(unet), model, sampler, seeds, 2, torch.device("cpu"),
                             on_trajectory_start=lambda: modiff.reset(unet))
    torch.testing.assert_close(modulated, fp, rtol=1e-4, atol=1e-4)
    assert sum(layer.residual_calls for layer in unet.modules() if isinstance(layer, modiff.QuantLayer)) > 0


def test_a_matrix_runs_fp_and_modiff_and_resumes(tmp_path, model, monkeypatch):
    matrix = _matrix(base=["fp", "ltq"], w_bits=8, a_bits=8, modulation=["ec"], a_granularity="tensor")
    assert {(c.base, c.sampler) for c in matrix.cells} == {("fp", "flow-euler"), ("ltq", "flow-euler")}
    out = tmp_path / "o"
    summary = Runner(matrix, out, device="cpu", progress=False, log=lambda line: None).run()
    assert not summary.failed
    rows = {r["base"]: r for r in (json.loads(p.read_text()) for p in out.glob("cells/*/result.json"))}
    assert rows["fp"]["status"] == rows["ltq"]["status"] == "ok"
    assert rows["ltq"]["sampler"] == "flow-euler" and rows["ltq"]["modulation"] == "ec"
    fp = torch.load(out / rows["fp"]["samples_file"], weights_only=True)["images"]
    seeds = list(range(3))
    expected = sample_model(model.denoiser(), model, sampler_from_name("flow-euler", 4), seeds, 2,
                            torch.device("cpu"))
    assert torch.equal(fp.float(), expected.half().float())
    quantized = torch.load(out / rows["ltq"]["samples_file"], weights_only=True)["images"]
    assert not torch.equal(quantized, fp) and float((quantized.float() - fp.float()).abs().max()) < 1.0
    assert 20 < rows["ltq"]["psnr_to_fp"] < float("inf")
    # resume: a run interrupted in the modulated cell's second chunk samples only that chunk when run again
    shutil.rmtree(out)
    calls = []

    def stored(images, seeds):
        calls.append(list(seeds))
        if len(calls) == 4 and interrupt:  # fp reference: 2 chunks, then chunk 0 of the ltq cell, then this
            raise KeyboardInterrupt
        return to_float16(images, seeds)

    monkeypatch.setattr(generate, "to_float16", stored)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        Runner(matrix, out, device="cpu", progress=False, log=lambda line: None).run()
    calls.clear()
    interrupt = False
    summary = Runner(_matrix(base=["fp", "ltq"], w_bits=8, a_bits=8, modulation=["ec"], a_granularity="tensor"),
                     out, device="cpu", progress=False, log=lambda line: None).run()
    assert not summary.failed and calls == [[2]]
    rows = {r["base"]: r for r in (json.loads(p.read_text()) for p in out.glob("cells/*/result.json"))}
    assert torch.equal(torch.load(out / rows["ltq"]["samples_file"], weights_only=True)["images"], quantized)


def test_ptqd_and_deepcache_are_skipped_with_their_reasons():
    matrix = _matrix(base=["fp", "ptqd"], cache=["none", "deepcache-u2"], w_bits=8, a_bits=8, modulation=["off"])
    reasons = {(s["base"], s["cache"]): s["reason"] for s in matrix.skipped}
    assert "PTQD's noise correction is derived from the DDPM/DDIM step's variance; no flow-matching analogue is " \
           "published" in reasons[("ptqd", "none")]
    assert "DeepCache caches a U-Net's skip-branch features" in reasons[("fp", "deepcache-u2")]
    assert {(c.base, c.cache) for c in matrix.cells} == {("fp", "none")}


def test_qdiffusion_calibration_keeps_float_timesteps(model):
    from baselines.qdiffusion import calibration

    sampler = sampler_from_name("flow-euler", 4)
    data = calibration.collect(model.denoiser(), model.schedule, sampler, 2, [0, 1], LATENT, 2,
                               on_batch=model.start_batch)
    times = sampler.evaluation_timesteps(model.schedule)
    assert data.steps == [0, 2] and data.t == {i: times[i] for i in (0, 1, 2)}
    xs, ts = data.inputs()
    assert ts.dtype == torch.float32 and ts.tolist() == pytest.approx([times[0]] * 2 + [times[2]] * 2)
    again = calibration.CalibrationData.from_dict(data.to_dict())
    assert again.t == data.t and all(isinstance(t, float) for t in again.t.values())


def test_a_sampler_of_the_other_kind_is_one_line(capsys, tmp_path, model):
    assert is_flow_model(NAME) and not is_flow_model("digits")
    with pytest.raises(BenchError, match="flow-matching model: sampler 'ddim-quad' is a DDPM-family sampler"):
        _matrix(sampler="ddim-quad")
    with pytest.raises(BenchError, match="sampler 'flow-euler' samples flow-matching models .* model digits is a "
                                         "DDPM-family model"):
        build_matrix({"run": {"model": "digits", "sampler": "flow-euler", "steps": 4}, "matrix": {"base": ["fp"]}})
    assert main(["run", "smoke", "--out", str(tmp_path / "o"), "--dry-run", "--set", "run.sampler='flow-heun'"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "samples flow-matching models" in err[0]
    # at run time too (a flow model its entry does not declare): one line, before any work
    with pytest.raises(BenchError, match="is a flow-matching model"):
        sample_model(model.denoiser(), model, sampler_from_name("ddim-quad", 4), [0], 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="flow-euler samples flow-matching models"):
        sampler_from_name("flow-euler", 4).evaluation_timesteps(load_model("digits").schedule)
    with pytest.raises(ValueError, match="deterministic: eta must be 0"):
        FlowSamplerConfig.from_name("flow-euler", 4, 0.5)
    assert resolve(_matrix().cells[0]).sampler == sampler_from_name("flow-euler", 4)


def test_the_fp_cell_builds_for_a_flow_model(model):
    resolved = resolve(_matrix().cells[0])
    prepared = build(resolved, model, torch.device("cpu"))
    assert prepared.unet is model.unet


def test_the_estimate_times_flow_cells(model):
    """``--estimate`` on flow cells: it stopped at "unknown sampler 'flow-euler'" before resolve_cell knew them."""
    from bench.build import resolve_cell
    from bench.estimate import estimate

    matrix = _matrix(base=["fp", "ltq"], w_bits=8, a_bits=8, modulation=["ec"], a_granularity="tensor")
    assert all(resolve_cell(cell).skip is None for cell in matrix.cells)
    result = estimate(matrix.cells, {NAME: model}, torch.device("cpu"))
    assert result.cells == 2 and result.images == 6 and result.device_hours > 0
    assert all(s > 0 for times in result.seconds_per_call.values() for s in times.values())


def test_qdiffusion_calibrates_a_flow_transformer_whose_timestep_is_a_keyword(model):
    """SD3's ``forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)``: Q-Diffusion's
    calibration records the flow sampler's float times and replays the timestep by name."""
    from bench.build import build, resolve_cell
    from bench.methods import CellSpec

    params = {"qdiff": {"cali_st": 2, "cali_n": 2, "weight_iters": 2, "act_iters": 2, "batch_size": 2}}
    cell = CellSpec(model=NAME, checkpoint=None, sampler="flow-euler", steps=3, eta=0.0, n_samples=2, seed=0,
                    batch_size=2, base="qdiff", modulation="ec", cache="none", w_bits=8, a_bits=8,
                    a_granularity="auto", params=params)
    resolved = resolve_cell(cell, params)
    assert resolved.skip is None
    prepared = build(resolved, model, torch.device("cpu"))
    x = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(3))
    model.start_batch([0, 1])
    prepared.start_trajectory()
    with torch.no_grad():
        q = prepared.denoiser()(x, torch.tensor([900.0, 900.0]))
        fp = model.denoiser()(x, torch.tensor([900.0, 900.0]))
    assert torch.isfinite(q).all() and q.shape == fp.shape and not torch.equal(q, fp)


def test_the_sample_command_samples_a_flow_model(tmp_path, model, capsys):
    """``modiff-bench sample`` on a flow model: it took DDPM-family sampler names only."""
    out = tmp_path / "s"
    assert main(["sample", "--model", NAME, "--sampler", "flow-euler", "--steps", "3", "--n", "2", "--batch-size",
                 "2", "--out", str(out), "--no-progress"]) == 0
    images = torch.load(out / "samples.pt", weights_only=True)["images"]
    expected = sample_model(model.denoiser(), model, sampler_from_name("flow-euler", 3), [0, 1], 2,
                            torch.device("cpu"))
    if model.decoder is not None:
        expected = model.decode(expected)
    torch.testing.assert_close(images, expected)
    assert main(["sample", "--model", NAME, "--sampler", "ddim-quad", "--steps", "3", "--n", "2", "--out",
                 str(tmp_path / "t"), "--no-progress"]) == 2
    assert "is a flow-matching model" in capsys.readouterr().err
