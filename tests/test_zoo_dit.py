"""DiT-XL/2 in the zoo (``bench.zoo.dit``) and the generic entry's DiT pipelines (``bench.zoo.generic``).

The pipeline is DiT's kind at toy size: a ``DiTTransformer2DModel`` of one block (2 heads x 4 channels, patch 2 on
8x8x4 latents, 1000 classes + the null one, 8 output channels: eps and the learned variance), a four-level
``AutoencoderKL`` at SD's scale, a ``DDIMScheduler`` with DDPM's linear betas, written by
``DiTPipeline.save_pretrained`` and edited to name the legacy ``Transformer2DModel`` class as the hub's files do.
The real architecture is checked on its configs and built on the meta device only."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch

import modiff
from bench.errors import BenchError
from bench.provenance import sha256_file
from bench.zoo import dit, load_model, model_entry, model_names

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT = (4, 8, 8)
TINY = {"sample_size": 8, "in_channels": 4, "out_channels": 8, "patch_size": 2, "num_layers": 1,
        "num_attention_heads": 2, "attention_head_dim": 4, "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero"}
TINY_VAE = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
            "sample_size": 64, "scaling_factor": 0.18215}


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)


def save_dit(root):
    """A tiny DiT pipeline in the hub's layout (``transformer/``, ``vae/``, ``scheduler/``, ``model_index.json``)."""
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    pipe = DiTPipeline(transformer=DiTTransformer2DModel(**TINY), vae=AutoencoderKL(**TINY_VAE),
                       scheduler=_scheduler(), id2label={0: "tench, Tinca tinca", 1: "goldfish"})
    directory = root / "dit"
    pipe.save_pretrained(directory, safe_serialization=True)
    for path, key in ((directory / "transformer" / "config.json", "_class_name"),
                      (directory / "model_index.json", "transformer")):  # the hub's files name the legacy class
        config = json.loads(path.read_text())
        config[key] = "Transformer2DModel" if key == "_class_name" else ["diffusers", "Transformer2DModel"]
        path.write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return save_dit(tmp_path_factory.mktemp("dit"))


@pytest.fixture(scope="module")
def dit_model(dit_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dit, "TRANSFORMER_ARCH", TINY)
        return dit.load(dit_dir)


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def _edit(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ----------------------------------------------------------------------------------------------- the real DiT-XL/2


def test_the_real_architecture_is_dit_xl_2(tmp_path):
    """``TRANSFORMER_ARCH`` over the class's defaults is DiT-XL/2: 1152 wide, 28 blocks (built on the meta device);
    675 M parameters once the timestep and class embedders, which diffusers' conversion copies into every block's
    adaLN-Zero, are counted once; its configs, as the hub's files hold them, pass the checks."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    with torch.device("meta"):
        model = DiTTransformer2DModel(**{**dit.TRANSFORMER_LATER_KEYS, **dit.TRANSFORMER_ARCH})
    count = sum(p.numel() for p in model.parameters())
    embedder = sum(p.numel() for p in model.transformer_blocks[0].norm1.emb.parameters())
    assert count == 749_826_464 and model.inner_dim == 1152 and len(model.transformer_blocks) == 28
    # DiT's repository counts 675,129,632 with its frozen sin-cos positional embedding (256 x 1152), a buffer here
    assert count - 27 * embedder + 256 * 1152 == 675_129_632
    assert model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 1001  # + null
    model.save_config(tmp_path / "transformer")
    _edit(tmp_path / "transformer" / "config.json", _class_name="Transformer2DModel")
    AutoencoderKL(**dit.VAE_ARCH).save_config(tmp_path / "vae")
    _scheduler().save_config(tmp_path / "scheduler")
    dit.check_configs(tmp_path)  # no error
    _edit(tmp_path / "transformer" / "config.json", num_layers=24)  # DiT-L/2
    with pytest.raises(BenchError) as exc:
        dit.check_configs(tmp_path)
    assert "num_layers is 24" in _one_line(exc) and dit.HUB_ID in str(exc.value)
    _edit(tmp_path / "transformer" / "config.json", num_layers=28)
    _edit(tmp_path / "scheduler" / "scheduler_config.json", beta_schedule="scaled_linear")
    with pytest.raises(BenchError, match="beta_schedule is 'scaled_linear'"):
        dit.check_configs(tmp_path)


def test_the_entries_are_listed():
    assert {dit.NAME, dit.RANDOM_NAME} <= set(model_names())
    entry = model_entry(dit.NAME)
    assert entry.output_size == (256, 256) and entry.train_timesteps == 1000 and "1.5" in entry.description
    torch.testing.assert_close(dit.schedule().betas[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))


def test_the_cli_lists_them(capsys):
    from bench.cli import main

    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert dit.NAME in listing and dit.RANDOM_NAME in listing


# ------------------------------------------------------------------------------------------------------- loading


def test_the_entry_loads_dit_strictly(dit_model, dit_dir):
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    m = dit_model
    assert isinstance(m.unet, DiTTransformer2DModel) and isinstance(m.parts["vae"], AutoencoderKL)
    assert not m.unet.training and not any(p.requires_grad for p in m.unet.parameters())
    assert (m.image_shape, m.image_output_shape) == (LATENT, (3, 64, 64))
    assert (m.default_sampler, m.default_steps) == ("ddpm-ldm-uniform", 250)
    torch.testing.assert_close(m.schedule.betas, dit.schedule().betas, rtol=0, atol=0)
    info = m.info
    assert info["guidance_scale"] == 1.5 and info["null_class"] == 1000 and info["latent_scale"] == 0.18215
    for name in ("transformer/diffusion_pytorch_model.safetensors", "vae/config.json", "model_index.json"):
        assert info["files"][name] == sha256_file(dit_dir / name)
    json.dumps(info)


class _Payload:
    """Unpickling this object runs a shell command that creates ``marker`` (if anything runs its reduction)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("alone", [False, True])
def test_a_bin_is_never_read(dit_dir, tmp_path, monkeypatch, alone):
    """A pickled ``.bin`` planted beside the safetensors weights is not read; alone, it is a missing file (one
    line), never unpickled."""
    monkeypatch.setattr(dit, "TRANSFORMER_ARCH", TINY)
    directory = shutil.copytree(dit_dir, tmp_path / "bin")
    marker = tmp_path / "marker"
    torch.save({"x": _Payload(marker)}, directory / "transformer" / "diffusion_pytorch_model.bin")
    loads = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args))  # not even weights_only
    if alone:
        (directory / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
        with pytest.raises(BenchError) as exc:
            dit.load(directory)
        assert "transformer/diffusion_pytorch_model.safetensors" in _one_line(exc)
    else:
        model = dit.load(directory)
        assert "transformer/diffusion_pytorch_model.bin" not in model.info["files"]
    assert not marker.exists() and loads == []


def test_loading_problems_are_one_line_errors(dit_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(dit, "TRANSFORMER_ARCH", TINY)
    partial = shutil.copytree(dit_dir, tmp_path / "partial")
    (partial / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(BenchError) as exc:
        dit.load(partial)
    assert "vae/diffusion_pytorch_model.safetensors" in _one_line(exc) and "hf download" in str(exc.value)

    cut = shutil.copytree(dit_dir, tmp_path / "cut")
    weights = cut / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["proj_out_2.weight"]
    save_file(state, weights)
    with pytest.raises(BenchError) as exc:
        dit.load(cut)
    assert "missing keys: proj_out_2.weight" in _one_line(exc)

    with pytest.raises(BenchError) as exc:
        dit.load(tmp_path / "nowhere")
    assert "does not exist" in _one_line(exc)


def test_the_hub_id_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BenchError) as exc:
        load_model(dit.NAME)
    assert "not in the Hugging Face cache" in _one_line(exc) and f"hf download {dit.HUB_ID}" in str(exc.value)


# -------------------------------------------------------------------------------------- conditioning and guidance


def test_classes_come_from_the_seeds_alone(dit_model):
    cond = dit_model.start_batch.__self__
    dit_model.start_batch([7, 1003, 2999])
    assert cond.batch_classes == [7, 3, 999]
    assert cond.class_labels(3).tolist() == [7, 3, 999, 1000, 1000, 1000]  # conditional half first
    x = torch.randn((3, *LATENT), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([600, 600, 600])
    together = dit_model.denoiser()(x, t)
    for row, seed in enumerate([7, 1003, 2999]):  # batch-size invariance
        dit_model.start_batch([seed])
        torch.testing.assert_close(dit_model.denoiser()(x[row:row + 1], t[:1]), together[row:row + 1],
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="start_batch"):
        dit_model.denoiser()(x, t)


def test_the_denoiser_is_dit_pipelines_guided_noise_prediction(dit_model):
    """Our guidance and variance split equal ``DiTPipeline``'s own: what it hands its scheduler for the same latents,
    timestep and classes (captured from its first step), at our scale; one transformer call on the doubled batch."""
    from diffusers import DiTPipeline

    pipe = DiTPipeline(transformer=dit_model.unet, vae=dit_model.parts["vae"], scheduler=_scheduler())
    seen = {}
    step = pipe.scheduler.step

    def capture(model_output, t, sample, *args, **kwargs):
        seen.setdefault("step", (model_output.clone(), int(t), sample.clone()))
        return step(model_output, t, sample, *args, **kwargs)

    pipe.scheduler.step = capture
    with torch.no_grad():
        pipe(class_labels=[7, 3], guidance_scale=dit.GUIDANCE_SCALE, num_inference_steps=2, output_type="pt",
             generator=torch.Generator().manual_seed(0))
    model_output, t, latents = seen["step"]
    assert model_output.shape == (4, *LATENT)  # the pipeline keeps the doubled batch, variance split off
    calls = []
    hook = dit_model.unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        dit_model.start_batch([7, 1003])
        eps = dit_model.denoiser()(latents[:2], torch.tensor([t, t]))
    finally:
        hook.remove()
    assert len(calls) == 1 and calls[0]["class_labels"].tolist() == [7, 3, 1000, 1000]
    torch.testing.assert_close(eps, model_output[:2], rtol=1e-5, atol=1e-6)
    # the guidance is not a no-op and the variance channels are not in the prediction
    with torch.no_grad():
        out = dit_model.unet(torch.cat([latents[:2]] * 2), timestep=torch.tensor([t] * 4),
                             class_labels=torch.tensor([7, 3, 1000, 1000])).sample
    assert out.shape[1] == 8 and not torch.allclose(eps, out[:2, :4])


def test_decoding_divides_by_the_latent_scale(dit_model):
    z = torch.randn((1, *LATENT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = dit_model.parts["vae"].decode(z / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(dit_model.decode(z), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- quantized


def test_w8a8_runs_on_the_transformer(dit_model):
    config = modiff.ModiffConfig(w_bits=8, a_bits=8, modulation="ec", granularity="sample")
    transformer = modiff.quantize(copy.deepcopy(dit_model.unet), config)
    names = {layer.name for layer in modiff.quant_layers(transformer)}
    assert {"proj_out_2", "pos_embed.proj", "transformer_blocks.0.attn1.to_q"} <= names
    x = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(3))
    dit_model.start_batch([1, 2])
    with torch.no_grad():
        fp = dit_model.denoiser()(x, torch.tensor([900, 900]))
        q = dit_model.denoiser(transformer)(x, torch.tensor([900, 900]))
    assert torch.isfinite(q).all() and q.shape == (2, *LATENT) and not torch.equal(q, fp)


# -------------------------------------------------------------------------------------------- the random variant


def test_the_random_variant_reads_no_file(tmp_path, monkeypatch):
    """``dit-xl-2-256-random`` (here at toy size: the constants patched) reads nothing: an empty cache and working
    directory; it takes no checkpoint; its denoiser runs."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dit, "TRANSFORMER_ARCH", TINY)
    monkeypatch.setattr(dit, "VAE_ARCH", TINY_VAE)
    model = model_entry(dit.RANDOM_NAME).load(None)  # (load_model would check the real 256x256 output size)
    assert model.info["source"] == "random" and model.image_shape == LATENT and model.unet.config.num_layers == 1
    model.start_batch([0])
    assert model.denoiser()(torch.zeros((1, *LATENT)), torch.tensor([10])).shape == (1, *LATENT)
    again = dit.load_random()
    assert all(torch.equal(a, b) for a, b in zip(model.unet.state_dict().values(), again.unet.state_dict().values(),
                                                 strict=True))  # seeded
    with pytest.raises(BenchError, match="takes no checkpoint"):
        dit.load_random(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- the generic entry on DiT


def test_the_generic_entry_reads_a_dit_pipeline(dit_dir):
    """``diffusers:<dir>`` of a DiT pipeline: the learned variance split off as the named entry does, guidance at
    ``DiTPipeline``'s default 4.0; its denoiser is the pipeline's guided noise prediction at that scale."""
    from diffusers import DiTPipeline

    name = f"diffusers:{dit_dir}"
    entry = model_entry(name)
    assert entry.output_size == (64, 64) and "DiT class-conditional 64x64" in entry.description
    model = load_model(name)
    assert model.info["pipeline"] == "dit" and model.info["guidance_scale"] == dit.PIPELINE_GUIDANCE_SCALE
    assert (model.image_shape, model.default_sampler) == (LATENT, "ddpm-ldm-uniform")
    assert "transformer/diffusion_pytorch_model.safetensors" in model.info["files"]

    pipe = DiTPipeline(transformer=model.unet, vae=model.parts["vae"], scheduler=_scheduler())
    seen = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda out, t, x, *a, **k: (seen.append((out.clone(), int(t), x.clone())),
                                                      step(out, t, x, *a, **k))[1]
    with torch.no_grad():
        pipe(class_labels=[5], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(4))
    out, t, latents = seen[0]
    model.start_batch([2005])
    torch.testing.assert_close(model.denoiser()(latents[:1], torch.tensor([t])), out[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("edit, needle", [
    ({"out_channels": 12}, "maps 4 channels to 12"),
    ({"norm_type": "ada_norm_single"}, "norm_type is 'ada_norm_single'"),
    ({"_class_name": "UNet2DModel"}, "describes a UNet2DModel"),
])
def test_unusable_dit_pipelines_are_one_line_errors(dit_dir, tmp_path, edit, needle):
    directory = shutil.copytree(dit_dir, tmp_path / "p")
    _edit(directory / "transformer" / "config.json", **edit)
    with pytest.raises(BenchError) as exc:
        model_entry(f"diffusers:{directory}")
    assert needle in _one_line(exc)


def test_the_generic_entry_never_reads_a_dit_bin(dit_dir, tmp_path, monkeypatch):
    directory = shutil.copytree(dit_dir, tmp_path / "bin")
    (directory / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "marker"
    torch.save({"x": _Payload(marker)}, directory / "transformer" / "diffusion_pytorch_model.bin")
    loads = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args))
    with pytest.raises(BenchError) as exc:
        load_model(f"diffusers:{directory}")
    assert "transformer/diffusion_pytorch_model.safetensors" in _one_line(exc)
    assert not marker.exists() and loads == []


# ------------------------------------------------------------------------ DiT's sampler with the learned variance


def test_dits_respaced_grid():
    from bench.zoo.learned_variance import dit_timesteps

    grid = dit_timesteps(1000, 250)  # DiT's sample.py: space_timesteps(1000, "250")
    assert len(grid) == 250 and grid[:5] == [0, 4, 8, 12, 16] and grid[-3:] == [991, 995, 999]
    assert dit_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError):
        dit_timesteps(1000, 1001)


@pytest.mark.parametrize("t", [999, 502, 4, 0])
def test_the_learned_variance_step_is_diffusers_learned_range(t):
    """Our step equals ``DDPMScheduler(variance_type="learned_range", clip_sample=False)`` on DiT's 250-step grid,
    for the same eps, variance output and noise (a draw from the same seeded generator)."""
    from diffusers import DDPMScheduler

    from bench.zoo.learned_variance import dit_timesteps, learned_variance_step

    grid = dit_timesteps(1000, 250)
    scheduler = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                              variance_type="learned_range", clip_sample=False)
    scheduler.set_timesteps(timesteps=grid[::-1])
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn((2, *LATENT), generator=g), torch.randn((2, *LATENT), generator=g)
    v = torch.rand((2, *LATENT), generator=g) * 2 - 1
    expected = scheduler.step(torch.cat([eps, v], dim=1), t, x, generator=torch.Generator().manual_seed(7))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    i = grid.index(t)
    schedule = dit.schedule()
    ours = learned_variance_step(x, eps, v, schedule.alpha_bar(t), schedule.alpha_bar(grid[i - 1] if i else -1), z)
    torch.testing.assert_close(ours, expected.prev_sample, rtol=1e-5, atol=1e-5)
    if t > 0:  # the variance output matters
        other = learned_variance_step(x, eps, -v, schedule.alpha_bar(t), schedule.alpha_bar(grid[i - 1]), z)
        assert not torch.allclose(ours, other)


def test_sampling_a_dit_with_its_learned_variance(dit_model):
    from bench.zoo.learned_variance import dit_variance_denoiser, sample_learned_variance

    cond = dit_model.start_batch.__self__
    denoiser = dit_variance_denoiser(cond, dit_model.unet)
    x = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(6))
    dit_model.start_batch([3, 8])
    eps, v = denoiser(x, torch.tensor([300, 300]))
    torch.testing.assert_close(eps, dit_model.denoiser()(x, torch.tensor([300, 300])), rtol=0, atol=0)
    with torch.no_grad():
        out = dit_model.unet(x, timestep=torch.tensor([300, 300]), class_labels=torch.tensor([3, 8])).sample
    torch.testing.assert_close(v, out[:, 4:], rtol=1e-5, atol=1e-6)  # the conditional half's variance

    def run(seeds):
        return sample_learned_variance(denoiser, dit_model.schedule, seeds, LATENT, 5,
                                       on_batch=dit_model.start_batch)

    both = run([3, 8])
    assert both.shape == (2, *LATENT) and torch.isfinite(both).all()
    torch.testing.assert_close(run([8]), both[1:], rtol=1e-4, atol=1e-5)  # the seed alone decides
