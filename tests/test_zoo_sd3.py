"""Stable Diffusion 3 Medium in the zoo (``bench.zoo.sd3``), on a tiny random pipeline of SD3's kind written in the
diffusers layout (``StableDiffusion3Pipeline.save_pretrained``): an ``SD3Transformer2DModel`` (2x2 patches of 4x8x8
latents), two CLIP text towers with projections and a T5 encoder (8, 8 and 32 wide, two layers each) over small
vocabularies written here, a two-level 4-channel ``AutoencoderKL`` with SD3's scale and shift, and SD3's
``FlowMatchEulerDiscreteScheduler`` (shift 3.0). The real architecture is checked on the meta device only."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bench.errors import BenchError
from bench.generate import sample_model
from bench.matrix import sampler_from_name
from bench.zoo import load_model, model_entry, sd3
from bench.zoo.model import is_flow_model

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cube", "a blue sphere", "the green cone"]
TINY = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8,
        "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 16,
        "pooled_projection_dim": 16, "out_channels": 4, "pos_embed_max_size": 8}


def write_clip_tokenizer(directory, pad: str = "<|endoftext|>") -> int:
    """A CLIP BPE tokenizer over single letters, in the hub's file layout."""
    directory.mkdir(parents=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters), "th", "the</w>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": "<|startoftext|>", "do_lower_case": True, "eos_token": "<|endoftext|>",
        "errors": "replace", "model_max_length": 77, "pad_token": pad, "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>"}))
    return len(tokens)


def t5_tokenizer():
    """A T5 (Unigram) tokenizer over a few words and single letters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = "a red cube blue sphere the green cone".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *(("\u2581" + w, -1.0) for w in words),
              *((c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"), ("\u2581", -3.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def clip_config(vocab: int, width: int, **kwargs):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=16, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **kwargs)


def t5_encoder(width: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=48, d_model=width, d_kv=8, d_ff=32, num_layers=2, num_heads=2))


def tiny_vae(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                         sample_size=16, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=False, use_post_quant_conv=False)


def save_sd3(root):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    vocab = write_clip_tokenizer(root / "src" / "tokenizer")
    write_clip_tokenizer(root / "src" / "tokenizer_2", pad="a")
    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**TINY), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(1.5305, 0.0609),
        text_encoder=CLIPTextModelWithProjection(clip_config(vocab, 8, projection_dim=8)),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(vocab, 8, projection_dim=8)),
        text_encoder_3=t5_encoder(),
        tokenizer=CLIPTokenizer.from_pretrained(root / "src" / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "src" / "tokenizer_2"),
        tokenizer_3=t5_tokenizer(),
    )
    for part in pipe.components.values():  # as loaded (T5's dropout is off)
        if isinstance(part, torch.nn.Module):
            part.eval()
    directory = root / "sd3"
    pipe.save_pretrained(directory, safe_serialization=True)
    shutil.rmtree(root / "src")
    (directory / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return directory, pipe


TINY_ARCH = sd3.Architecture(
    transformer=TINY, text_encoder={"hidden_size": 8, "projection_dim": 8}, text_encoder_2={"hidden_size": 8},
    text_encoder_3={"d_model": 32}, scheduler={"num_train_timesteps": 1000, "shift": 3.0},
    vae={"latent_channels": 4, "scaling_factor": 1.5305, "shift_factor": 0.0609})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_sd3(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def model(saved):
    return sd3.load(saved[0], architecture=TINY_ARCH)


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


def test_the_entry_loads_sd3_strictly(model, saved):
    directory, _ = saved
    assert is_flow_model("sd3-medium") and is_flow_model("sd3-medium-random")
    assert model.flow is not None and model.flow.schedule.shift == 3.0 and model.flow.spacing == "scheduler"
    assert model.flow.mu is None and model.default_sampler == "flow-euler" and model.default_steps == 28
    assert model.image_shape == (4, 8, 8) and model.image_output_shape == (3, 16, 16)
    assert set(model.parts) == {"vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    files = model.info["files"]
    assert "transformer/diffusion_pytorch_model.safetensors" in files and "text_encoder_3/model.safetensors" in files
    assert not any(name.endswith(".bin") for name in files)
    assert model_entry("sd3-medium").output_size == (1024, 1024)


def test_the_denoiser_and_sampling_are_the_pipelines(model, saved):
    _, pipe = saved
    seeds = [4]
    prompt = PROMPTS[4 % 3]
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompt, None, None, device="cpu",
                                                                    do_classifier_free_guidance=True,
                                                                    negative_prompt="")
    model.start_batch(seeds)
    kwargs = model.start_batch.__self__.unet_kwargs(1)
    torch.testing.assert_close(kwargs["encoder_hidden_states"], torch.cat([negative, embeds]))
    torch.testing.assert_close(kwargs["pooled_projections"], torch.cat([negative_pooled, pooled]))
    x = torch.randn((1, *model.image_shape), generator=torch.Generator().manual_seed(4))
    t = torch.tensor([750.0])
    with torch.no_grad():
        out = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(2),
                               encoder_hidden_states=torch.cat([negative, embeds]),
                               pooled_projections=torch.cat([negative_pooled, pooled]), return_dict=False)[0]
    uncond, cond = out.chunk(2)
    torch.testing.assert_close(model.denoiser()(x, t), uncond + 7.0 * (cond - uncond))
    # the whole loop: the pipeline from the same noise, three steps, latents out
    with torch.no_grad():
        latents = pipe(prompt, num_inference_steps=3, guidance_scale=7.0, latents=x.clone(), output_type="latent",
                       height=16, width=16).images
    ours = sample_model(model.denoiser(), model, sampler_from_name("flow-euler", 3), seeds, 1, torch.device("cpu"))
    torch.testing.assert_close(ours, latents, rtol=1e-4, atol=1e-4)
    images = model.decode(ours)
    with torch.no_grad():
        expected = pipe.vae.decode(ours / 1.5305 + 0.0609).sample.clamp(-1, 1)
    torch.testing.assert_close(images, expected)


def test_loading_problems_are_one_line_errors(saved, tmp_path, monkeypatch):
    directory, _ = saved
    partial = shutil.copytree(directory, tmp_path / "partial")
    shutil.rmtree(partial / "text_encoder_3")
    with pytest.raises(BenchError) as exc:
        sd3.load(partial, architecture=TINY_ARCH)
    assert "missing text_encoder_3 config" in _one_line(exc)
    with pytest.raises(BenchError) as exc:
        sd3.load(directory)  # the tiny configs are not SD3 Medium's
    assert "is not Stable Diffusion 3 Medium's transformer" in _one_line(exc)
    with pytest.raises(BenchError) as exc:
        sd3.load(tmp_path / "nowhere")
    assert "does not exist" in _one_line(exc)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(BenchError) as exc:
        load_model("sd3-medium")
    assert "not in the Hugging Face cache" in _one_line(exc)


def test_a_bin_is_never_read(saved, tmp_path, monkeypatch):
    directory, _ = saved
    copy = shutil.copytree(directory, tmp_path / "bin")
    torch.save({"x": torch.zeros(1)}, copy / "transformer" / "diffusion_pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    assert sd3.load(copy, architecture=TINY_ARCH).info["files"].keys() == \
        sd3.load(directory, architecture=TINY_ARCH).info["files"].keys()
    (copy / "transformer" / "diffusion_pytorch_model.safetensors").unlink()  # only the .bin left: not loaded
    with pytest.raises(BenchError) as exc:
        sd3.load(copy, architecture=TINY_ARCH)
    assert "missing transformer weights" in _one_line(exc)


def test_sharded_weights_load_and_a_missing_shard_is_one_line(saved, tmp_path):
    directory, pipe = saved
    copy = shutil.copytree(directory, tmp_path / "sharded")
    shutil.rmtree(copy / "text_encoder_3")
    pipe.text_encoder_3.save_pretrained(copy / "text_encoder_3", max_shard_size="20KB")
    assert len(list((copy / "text_encoder_3").glob("model-*.safetensors"))) > 1
    loaded = sd3.load(copy, architecture=TINY_ARCH)
    assert "text_encoder_3/model.safetensors.index.json" in loaded.info["files"]
    next((copy / "text_encoder_3").glob("model-*.safetensors")).unlink()
    with pytest.raises(BenchError) as exc:
        sd3.load(copy, architecture=TINY_ARCH)
    assert "missing text_encoder_3 weights shard" in _one_line(exc)


def test_the_random_variant(monkeypatch):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):  # the real architecture: SD3 Medium's 2 B parameters, never materialised here
        real = SD3Transformer2DModel(**sd3.TRANSFORMER_ARCH)
    assert 2.0e9 < sum(p.numel() for p in real.parameters()) < 2.1e9
    monkeypatch.setattr(sd3, "TRANSFORMER_ARCH", {**TINY, "joint_attention_dim": 16})
    monkeypatch.setattr(sd3, "VAE_CONFIG", {**sd3.VAE_CONFIG, "block_out_channels": [8, 8, 8, 8],
                                            "norm_num_groups": 4, "latent_channels": 4})
    monkeypatch.setattr(sd3, "IMAGE_SHAPE", (4, 8, 8))
    model = sd3.load_random()
    assert model.flow is not None and model.info["source"] == "random"
    model.start_batch([0, 1])
    v = model.denoiser()(torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]))
    assert v.shape == (2, 4, 8, 8) and v.isfinite().all()
    with pytest.raises(BenchError, match="takes no checkpoint"):
        sd3.load_random("somewhere")
