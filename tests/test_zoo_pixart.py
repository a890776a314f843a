"""PixArt-alpha 512 in the zoo (``bench.zoo.pixart``) and the generic entry's PixArt-alpha pipelines.

The pipeline is PixArt-alpha's kind at toy size: a ``PixArtTransformer2DModel`` of one block (2 heads x 4 channels,
patch 2 on 8x8x4 latents, 16-wide captions, 8 output channels: eps and the learned variance), a one-layer
``T5EncoderModel`` 16 wide over a letter-level Unigram vocabulary (``T5Tokenizer``, written as ``tokenizer.json``), a
four-level ``AutoencoderKL`` at SD's scale and a ``DPMSolverMultistepScheduler`` with DDPM's linear betas, written by
``PixArtAlphaPipeline.save_pretrained`` with the legacy ``Transformer2DModel`` class name of the hub's files and the
T5 weights sharded as the hub's are. The real architecture is checked on its configs and the meta device only."""

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
from bench.zoo import dit, model_entry, model_names, pixart

pytest.importorskip("transformers")  # the 'sd' extra

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT = (4, 8, 8)
PROMPTS = ["A Red CUBE", "a blue sphere", "the green cone"]
TINY = {"sample_size": 8, "in_channels": 4, "out_channels": 8, "patch_size": 2, "num_layers": 1,
        "num_attention_heads": 2, "attention_head_dim": 4, "cross_attention_dim": 8, "caption_channels": 16,
        "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single"}
TINY_VAE = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
            "sample_size": 64, "scaling_factor": 0.18215}


def _scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def _tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0),
             *((c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz")]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def save_pixart(root):
    """A tiny PixArt-alpha pipeline in the hub's layout, the T5 weights in two shards."""
    from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=16, num_layers=1,
                                      num_heads=2, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=AutoencoderKL(**TINY_VAE),
                               transformer=PixArtTransformer2DModel(**TINY), scheduler=_scheduler())
    directory = root / "pixart"
    pipe.save_pretrained(directory, safe_serialization=True)
    encoder.save_pretrained(directory / "text_encoder", max_shard_size="3KB")  # sharded, with its index
    assert (directory / "text_encoder" / "model.safetensors.index.json").is_file()
    (directory / "text_encoder" / "model.safetensors").unlink(missing_ok=True)
    for path, key in ((directory / "transformer" / "config.json", "_class_name"),
                      (directory / "model_index.json", "transformer")):  # the hub's files name the legacy class
        config = json.loads(path.read_text())
        config[key] = "Transformer2DModel" if key == "_class_name" else ["diffusers", "Transformer2DModel"]
        path.write_text(json.dumps(config))
    (directory / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return directory


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    return save_pixart(tmp_path_factory.mktemp("pixart"))


@pytest.fixture(scope="module")
def pixart_model(pixart_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pixart, "TRANSFORMER_ARCH", TINY)
        return pixart.load(pixart_dir)


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def _edit(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ------------------------------------------------------------------------------------------ the real PixArt-alpha


def test_the_real_architecture_is_pixart_xl_2_512(tmp_path):
    """``TRANSFORMER_ARCH`` over the class's defaults: 1152 wide, 28 blocks, 4096-wide captions, no micro-conditions
    at 64x64 latents (built on the meta device); configs as the hub's pass the checks, another's do not."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5Config

    arch = {k: v for k, v in pixart.TRANSFORMER_LATER_KEYS.items() if not isinstance(v, tuple)}
    with torch.device("meta"):
        model = PixArtTransformer2DModel(**{**arch, **pixart.TRANSFORMER_ARCH})
    assert model.inner_dim == 1152 and len(model.transformer_blocks) == 28 and not model.use_additional_conditions
    assert model.caption_projection.linear_1.in_features == 4096
    assert sum(p.numel() for p in model.parameters()) == 610_856_096  # PixArt-alpha's 0.6 B
    model.save_config(tmp_path / "transformer")
    _edit(tmp_path / "transformer" / "config.json", _class_name="Transformer2DModel")
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2).save_config(tmp_path / "vae")
    _scheduler().save_config(tmp_path / "scheduler")
    T5Config(d_model=4096, num_layers=24, num_heads=64, d_ff=10240).save_pretrained(tmp_path / "text_encoder")
    pixart.check_configs(tmp_path)  # no error
    _edit(tmp_path / "transformer" / "config.json", sample_size=128)  # the 1024 model
    with pytest.raises(BenchError) as exc:
        pixart.check_configs(tmp_path)
    assert "sample_size is 128" in _one_line(exc) and pixart.HUB_ID in str(exc.value)
    _edit(tmp_path / "transformer" / "config.json", sample_size=64)
    _edit(tmp_path / "text_encoder" / "config.json", d_model=1024)  # T5 large
    with pytest.raises(BenchError, match="d_model is 1024"):
        pixart.check_configs(tmp_path)


def test_the_entries_are_listed(capsys):
    from bench.cli import main

    assert {pixart.NAME, pixart.RANDOM_NAME} <= set(model_names())
    entry = model_entry(pixart.NAME)
    assert entry.output_size == (512, 512) and entry.train_timesteps == 1000 and "4.5" in entry.description
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert pixart.NAME in listing and pixart.RANDOM_NAME in listing


# ------------------------------------------------------------------------------------------------------- loading


def test_the_entry_loads_pixart_strictly(pixart_model, pixart_dir):
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5EncoderModel

    m = pixart_model
    assert isinstance(m.unet, PixArtTransformer2DModel) and isinstance(m.parts["vae"], AutoencoderKL)
    assert isinstance(m.parts["text_encoder"], T5EncoderModel)
    assert not any(p.requires_grad for part in (m.unet, *m.parts.values()) for p in part.parameters())
    assert (m.image_shape, m.image_output_shape) == (LATENT, (3, 64, 64))
    assert (m.default_sampler, m.default_steps) == ("dpm-solver++", 20)
    info = m.info
    assert info["guidance_scale"] == 4.5 and info["text_tokens"] == 120 and info["micro_conditions"] is None
    shards = json.loads((pixart_dir / "text_encoder" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) > 1
    for name in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors.index.json",
                 *(f"text_encoder/{s}" for s in shards.values())):
        assert info["files"][name] == sha256_file(pixart_dir / name)
    json.dumps(info)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("part, bin_name", [("text_encoder", "pytorch_model.bin"),
                                             ("transformer", "diffusion_pytorch_model.bin")])
def test_a_bin_beside_is_never_read(pixart_dir, tmp_path, monkeypatch, part, bin_name):
    monkeypatch.setattr(pixart, "TRANSFORMER_ARCH", TINY)
    directory = shutil.copytree(pixart_dir, tmp_path / "bin")
    marker = tmp_path / "marker"
    torch.save({"x": _Payload(marker)}, directory / part / bin_name)
    loads = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args))  # not even weights_only
    model = pixart.load(directory)
    assert f"{part}/{bin_name}" not in model.info["files"] and not marker.exists() and loads == []
    for weights in (directory / part).glob("*.safetensors*"):
        weights.unlink()
    with pytest.raises(BenchError) as exc:
        pixart.load(directory)
    assert part in _one_line(exc) and not marker.exists() and loads == []


def test_a_missing_text_encoder_is_one_line(pixart_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(pixart, "TRANSFORMER_ARCH", TINY)
    directory = shutil.copytree(pixart_dir, tmp_path / "no-t5")
    shutil.rmtree(directory / "text_encoder")
    with pytest.raises(BenchError) as exc:
        pixart.load(directory)
    assert "the T5 text encoder of PixArt-alpha XL/2 512x512 is not in" in _one_line(exc)
    assert f"hf download {pixart.HUB_ID}" in str(exc.value)

    directory = shutil.copytree(pixart_dir, tmp_path / "no-shard")
    next((directory / "text_encoder").glob("model-*.safetensors")).unlink()
    with pytest.raises(BenchError) as exc:
        pixart.load(directory)
    assert "missing text_encoder/model-" in _one_line(exc)


def test_a_missing_tensor_is_an_error(pixart_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(pixart, "TRANSFORMER_ARCH", TINY)
    directory = shutil.copytree(pixart_dir, tmp_path / "cut")
    weights = directory / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["caption_projection.linear_1.weight"]
    save_file(state, weights)
    with pytest.raises(BenchError) as exc:
        pixart.load(directory)
    assert "missing keys: caption_projection.linear_1.weight" in _one_line(exc)


def test_the_hub_id_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from bench.zoo import load_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BenchError) as exc:
        load_model(pixart.NAME)
    assert "not in the Hugging Face cache" in _one_line(exc) and f"hf download {pixart.HUB_ID}" in str(exc.value)


# -------------------------------------------------------------------------------------- conditioning and guidance


def test_the_denoiser_is_pixart_pipelines_guided_noise_prediction(pixart_model):
    """Prompt embeddings, masks, guidance and the variance split equal ``PixArtAlphaPipeline``'s: what it hands its
    scheduler for the same latents, timestep and prompts (captured at its first step), in one transformer call."""
    from diffusers import PixArtAlphaPipeline

    p = pixart_model.parts
    cond = pixart_model.start_batch.__self__
    pipe = PixArtAlphaPipeline(tokenizer=cond.tokenizer, text_encoder=p["text_encoder"], vae=p["vae"],
                               transformer=pixart_model.unet, scheduler=_scheduler())
    seen = {}
    step = pipe.scheduler.step

    def capture(model_output, t, sample, *args, **kwargs):
        seen.setdefault("step", (model_output.clone(), int(t), sample.clone()))
        return step(model_output, t, sample, *args, **kwargs)

    pipe.scheduler.step = capture
    calls = []
    hook = pixart_model.unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            pipe([PROMPTS[0], PROMPTS[2]], num_inference_steps=2, guidance_scale=pixart.GUIDANCE_SCALE,
                 output_type="latent", use_resolution_binning=False, clean_caption=False,
                 generator=torch.Generator().manual_seed(0))
        model_output, t, latents = seen["step"]
        pipe_kwargs = calls[0]
        calls.clear()
        pixart_model.start_batch([3, 5])  # prompts 0 and 2
        eps = pixart_model.denoiser()(latents, torch.tensor([t, t]))
    finally:
        hook.remove()
    assert len(calls) == 1
    for key in ("encoder_hidden_states", "encoder_attention_mask"):
        torch.testing.assert_close(calls[0][key], pipe_kwargs[key].to(calls[0][key].dtype), rtol=0, atol=0)
    assert calls[0]["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    assert cond.batch_prompts == [PROMPTS[0], PROMPTS[2]]
    assert model_output.shape == (2, *LATENT)
    torch.testing.assert_close(eps, model_output, rtol=1e-5, atol=1e-6)
    mask = calls[0]["encoder_attention_mask"]
    assert mask.shape == (4, 120) and 0 < int(mask[2].sum()) < 120  # padding masked out


def test_prompts_come_from_the_seeds_alone(pixart_model):
    cond = pixart_model.start_batch.__self__
    x = torch.randn((3, *LATENT), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([400, 400, 400])
    seeds = [1, 5, 9]
    pixart_model.start_batch(seeds)
    assert cond.batch_prompts == [PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    together = pixart_model.denoiser()(x, t)
    for row, seed in enumerate(seeds):  # batch-size invariance
        pixart_model.start_batch([seed])
        torch.testing.assert_close(pixart_model.denoiser()(x[row:row + 1], t[:1]), together[row:row + 1],
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="start_batch"):
        pixart_model.denoiser()(x, t)


# ----------------------------------------------------------------------------------------------------- quantized


def test_w8a8_runs_on_the_transformer(pixart_model):
    config = modiff.ModiffConfig(w_bits=8, a_bits=8, modulation="ec", granularity="sample")
    transformer = modiff.quantize(copy.deepcopy(pixart_model.unet), config)
    names = {layer.name for layer in modiff.quant_layers(transformer)}
    assert {"proj_out", "caption_projection.linear_1", "transformer_blocks.0.attn2.to_k"} <= names
    x = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(3))
    pixart_model.start_batch([0, 1])
    with torch.no_grad():
        fp = pixart_model.denoiser()(x, torch.tensor([900, 900]))
        q = pixart_model.denoiser(transformer)(x, torch.tensor([900, 900]))
    assert torch.isfinite(q).all() and q.shape == (2, *LATENT) and not torch.equal(q, fp)


@pytest.mark.parametrize("modulation", ["off", "ec"])
def test_qdiffusion_calibrates_pixart_whose_timestep_is_a_keyword(pixart_model, modulation):
    """PixArt's ``forward(hidden_states, encoder_hidden_states, timestep, ...)``: Q-Diffusion's calibration took the
    second positional parameter for the timestep and replayed ``net(x, t, **cond)``, which failed
    (``expand(...)``); it now finds the timestep by name and replays it by keyword."""
    from bench.build import build, resolve_cell
    from bench.methods import CellSpec

    params = {"qdiff": {"cali_st": 2, "cali_n": 2, "weight_iters": 2, "act_iters": 2, "batch_size": 2}}
    cell = CellSpec(model="pixart-alpha-512", checkpoint=None, sampler="ddim-uniform", steps=3, eta=0.0, n_samples=2,
                    seed=0, batch_size=2, base="qdiff", modulation=modulation, cache="none", w_bits=8, a_bits=8,
                    a_granularity="auto", params=params)
    resolved = resolve_cell(cell, params)
    assert resolved.skip is None
    prepared = build(resolved, pixart_model, torch.device("cpu"))
    x = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(3))
    pixart_model.start_batch([0, 1])
    prepared.start_trajectory()
    with torch.no_grad():
        q = prepared.denoiser()(x, torch.tensor([900, 900]))
        fp = pixart_model.denoiser()(x, torch.tensor([900, 900]))
    assert torch.isfinite(q).all() and q.shape == fp.shape and not torch.equal(q, fp)


# -------------------------------------------------------------------------------------------- the random variant


def test_the_random_variant_reads_no_file(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pixart, "TRANSFORMER_ARCH", TINY)
    monkeypatch.setattr(dit, "VAE_ARCH", TINY_VAE)  # the autoencoder of both random variants
    model = model_entry(pixart.RANDOM_NAME).load(None)
    assert model.info["source"] == "random" and "text_encoder" not in model.parts
    cond = model.start_batch.__self__
    model.start_batch([0, 1])
    kwargs = cond.unet_kwargs(2)
    assert kwargs["encoder_hidden_states"].shape == (4, 120, 16) and kwargs["encoder_attention_mask"].all()
    assert not torch.equal(kwargs["encoder_hidden_states"][2], kwargs["encoder_hidden_states"][3])
    eps = model.denoiser()(torch.zeros((2, *LATENT)), torch.tensor([10, 10]))
    assert eps.shape == (2, *LATENT) and torch.isfinite(eps).all()
    with pytest.raises(BenchError, match="takes no checkpoint"):
        pixart.load_random(tmp_path)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------- the generic entry on PixArt-alpha


def test_the_generic_entry_reads_a_pixart_pipeline(pixart_dir):
    """``diffusers:<dir>`` of a PixArt-alpha pipeline: the same conditioning and variance split as the named entry,
    at the pipeline's guidance 4.5, its prompts.txt."""
    from bench.zoo import load_model

    name = f"diffusers:{pixart_dir}"
    entry = model_entry(name)
    assert entry.output_size == (64, 64) and "PixArt-alpha text-to-image 64x64" in entry.description
    model = load_model(name)
    assert model.info["pipeline"] == "pixart" and model.info["guidance_scale"] == 4.5
    assert (model.default_sampler, model.default_steps) == ("dpm-solver++", 20)
    assert model.start_batch.__self__.prompts == PROMPTS
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pixart, "TRANSFORMER_ARCH", TINY)
        named = pixart.load(pixart_dir)
    x = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([321, 321])
    for m in (model, named):
        m.start_batch([4, 8])
    torch.testing.assert_close(model.denoiser()(x, t), named.denoiser()(x, t), rtol=0, atol=0)


def test_the_generic_entry_says_when_t5_is_missing(pixart_dir, tmp_path):
    directory = shutil.copytree(pixart_dir, tmp_path / "no-t5")
    shutil.rmtree(directory / "text_encoder")
    with pytest.raises(BenchError) as exc:
        model_entry(f"diffusers:{directory}")
    assert "the T5 text encoder of the PixArt-alpha pipeline is not in" in _one_line(exc)
    directory = shutil.copytree(pixart_dir, tmp_path / "wide")
    _edit(directory / "text_encoder" / "config.json", d_model=32)
    with pytest.raises(BenchError) as exc:
        model_entry(f"diffusers:{directory}")
    assert "caption_channels is 16, but the T5 text encoder" in _one_line(exc)
