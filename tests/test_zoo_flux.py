"""FLUX.1 [schnell] and [dev] in the zoo (``bench.zoo.flux``), on tiny random pipelines of FLUX's kind written in the
diffusers layout (``FluxPipeline.save_pretrained``): a ``FluxTransformer2DModel`` (one double- and one single-stream
block; with the guidance embedding for dev) on 2x2-packed 4x8x8 latents, a CLIP text tower and a T5 encoder over
small vocabularies, a two-level autoencoder with FLUX's scale and shift, and each release's scheduler (schnell: static
shift 1.0; dev: dynamic shifting). The real architectures are checked on the meta device only."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_zoo_sd3 import PROMPTS, clip_config, t5_encoder, t5_tokenizer, tiny_vae, write_clip_tokenizer

from bench.errors import BenchError
from bench.generate import sample_model
from bench.matrix import sampler_from_name
from bench.zoo import flux, model_entry, sd3
from bench.zoo.model import is_flow_model

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16  # pixels: 8x8 latents, 16 packed tokens


def tiny_transformer(guidance: bool) -> dict:
    return {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
            "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 8,
            "guidance_embeds": guidance, "axes_dims_rope": [4, 6, 6]}


def tiny_architecture(variant: flux.Variant) -> sd3.Architecture:
    return sd3.Architecture(transformer=tiny_transformer(variant.guidance is not None),
                            text_encoder={"hidden_size": 8}, text_encoder_2={"d_model": 32}, text_encoder_3={},
                            scheduler=variant.architecture.scheduler, vae={**flux.VAE_ARCH, "latent_channels": 4})


def save_flux(root, variant: flux.Variant):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vocab = write_clip_tokenizer(root / "src" / "tokenizer")
    torch.manual_seed(0)
    config = tiny_transformer(variant.guidance is not None)
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(**{**config, "axes_dims_rope": tuple(config["axes_dims_rope"])}),
        scheduler=FlowMatchEulerDiscreteScheduler(**variant.architecture.scheduler),
        vae=tiny_vae(0.3611, 0.1159), text_encoder=CLIPTextModel(clip_config(vocab, 8)),
        tokenizer=CLIPTokenizer.from_pretrained(root / "src" / "tokenizer"), text_encoder_2=t5_encoder(),
        tokenizer_2=t5_tokenizer(),
    )
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval()
    directory = root / variant.name
    pipe.save_pretrained(directory, safe_serialization=True)
    shutil.rmtree(root / "src")
    (directory / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return directory, pipe


@pytest.fixture(scope="module", params=["schnell", "dev"])
def saved(request, tmp_path_factory):
    variant = flux.SCHNELL if request.param == "schnell" else flux.DEV
    directory, pipe = save_flux(tmp_path_factory.mktemp("flux"), variant)
    model = flux.load_variant(variant, directory, tiny_architecture(variant), size=SIZE)
    return variant, directory, pipe, model


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


def test_the_entries_load_flux_strictly(saved):
    variant, _, _, model = saved
    assert is_flow_model(variant.name) and is_flow_model(f"{variant.name}-random")
    assert model_entry(variant.name).output_size == (1024, 1024)
    assert model.image_shape == (4, 8, 8) and model.image_output_shape == (3, SIZE, SIZE)
    assert model.default_steps == (4 if variant is flux.SCHNELL else 28) and model.default_sampler == "flow-euler"
    grid = model.flow
    assert grid.spacing == "flux"
    if variant is flux.SCHNELL:
        assert grid.mu is None and grid.schedule.shift == 1.0 and not grid.schedule.use_dynamic_shifting
    else:  # mu from the packed sequence length, as FluxPipeline's calculate_shift
        assert grid.schedule.use_dynamic_shifting and grid.mu == pytest.approx(0.5 + (1.15 - 0.5) / 3840 * (16 - 256))
    assert not any(name.endswith(".bin") for name in model.info["files"])
    assert set(model.parts) == {"vae", "text_encoder", "text_encoder_2"}


def test_the_denoiser_and_sampling_are_the_pipelines(saved):
    variant, _, pipe, model = saved
    seeds = [2]
    prompt = PROMPTS[2]
    embeds, pooled, text_ids = pipe.encode_prompt(prompt, None, device="cpu", max_sequence_length=512)
    model.start_batch(seeds)
    kwargs = model.start_batch.__self__.unet_kwargs(1)  # not doubled: no classifier-free guidance
    torch.testing.assert_close(kwargs["encoder_hidden_states"], embeds, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kwargs["pooled_projections"], pooled, rtol=1e-4, atol=1e-4)
    x = torch.randn((1, *model.image_shape), generator=torch.Generator().manual_seed(2))
    packed = flux.pack(x)
    assert torch.equal(flux.unpack(packed, 8, 8), x)
    ids = pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
    assert torch.equal(flux.latent_image_ids(8, 8), ids)
    guidance = torch.full((1,), 3.5) if variant.guidance is not None else None
    t = torch.tensor([640.0])
    with torch.no_grad():
        out = pipe.transformer(hidden_states=packed, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                               encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
    torch.testing.assert_close(model.denoiser()(x, t), pipe._unpack_latents(out, SIZE, SIZE, 2), rtol=1e-4, atol=1e-4)
    steps = 3
    with torch.no_grad():
        latents = pipe(prompt, num_inference_steps=steps, guidance_scale=3.5, latents=packed.clone(),
                       output_type="latent", height=SIZE, width=SIZE, max_sequence_length=512).images
    ours = sample_model(model.denoiser(), model, sampler_from_name("flow-euler", steps), seeds, 1,
                        torch.device("cpu"))
    torch.testing.assert_close(flux.pack(ours), latents, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        expected = pipe.vae.decode(ours / 0.3611 + 0.1159).sample.clamp(-1, 1)
    torch.testing.assert_close(model.decode(ours), expected)


def test_loading_problems_are_one_line_errors(saved, tmp_path):
    variant, directory, _, _ = saved
    partial = shutil.copytree(directory, tmp_path / "partial")
    shutil.rmtree(partial / "text_encoder_2")
    with pytest.raises(BenchError) as exc:
        flux.load_variant(variant, partial, tiny_architecture(variant), size=SIZE)
    assert "missing text_encoder_2 config" in _one_line(exc)
    with pytest.raises(BenchError) as exc:
        flux.load_variant(variant, directory)
    assert f"is not {variant.title}'s transformer" in _one_line(exc)
    copy = shutil.copytree(directory, tmp_path / "bin")
    (copy / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, copy / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(BenchError) as exc:  # a .bin is never read
        flux.load_variant(variant, copy, tiny_architecture(variant), size=SIZE)
    assert "missing transformer weights" in _one_line(exc)


def test_the_random_variants(monkeypatch):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):  # the real architecture: 11.9 B parameters, never materialised here
        real = FluxTransformer2DModel(**{**flux.TRANSFORMER_ARCH, "axes_dims_rope": (16, 56, 56)})
    assert 11.8e9 < sum(p.numel() for p in real.parameters()) < 12.0e9
    for variant in (flux.SCHNELL, flux.DEV):
        tiny = sd3.Architecture(transformer=tiny_transformer(variant.guidance is not None), text_encoder={},
                                text_encoder_2={}, text_encoder_3={}, scheduler=variant.architecture.scheduler,
                                vae=flux.VAE_ARCH)
        monkeypatch.setattr(variant, "architecture", tiny)
        monkeypatch.setattr(flux, "FLUX_VAE_CONFIG", {**flux.FLUX_VAE_CONFIG, "block_out_channels": [8, 8, 8, 8],
                                                      "norm_num_groups": 4, "latent_channels": 4})
        monkeypatch.setattr(flux, "IMAGE_SHAPE", (4, 8, 8))
        monkeypatch.setattr(flux, "T5_TOKENS", 6)
        model = flux.load_random_variant(variant)
        assert model.name == f"{variant.name}-random" and model.flow.spacing == "flux"
        model.start_batch([0])
        v = model.denoiser()(torch.randn(1, 4, 8, 8), torch.tensor([900.0]))
        assert v.shape == (1, 4, 8, 8) and v.isfinite().all()
    with pytest.raises(BenchError, match="takes no checkpoint"):
        flux.load_random_variant(flux.DEV, "somewhere")
