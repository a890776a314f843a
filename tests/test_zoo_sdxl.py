"""SDXL in the zoo (``bench.zoo.sdxl``) and the generic entry's text-to-image pipelines (``bench.zoo.generic``).

The pipelines are SDXL's and SD 2.x's kinds at toy size, built from configs with seeded random weights and written
with ``save_pretrained`` in the diffusers layout (``StableDiffusionXLPipeline`` / ``StableDiffusionPipeline``): a
``UNet2DConditionModel`` with SDXL's block types (no attention at the first level, ``text_time`` addition embedding),
two CLIP text towers (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, 8 wide, two layers so that the
penultimate hidden states differ from the last) over a small BPE vocabulary written here, a four-level
``AutoencoderKL`` at SDXL's scaling factor, an ``EulerDiscreteScheduler``. 8x8 latents, 64x64 images. The real SDXL
architecture is checked on its configs alone (2.6 B parameters are built on the meta device only)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys

import pandas as pd
import pytest
import torch

import modiff
from bench.errors import BenchError
from bench.matrix import build_matrix
from bench.provenance import sha256_file
from bench.runner import Runner
from bench.zoo import load_model, model_entry, sd, sdxl
from modiff.samplers import SamplerConfig, sample

pytest.importorskip("transformers")  # the 'sd' extra

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT = (4, 8, 8)
PROMPTS = ["a red cube", "a blue sphere", "the green cone"]
TINY_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": [8, 16, 16],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": [2, 4, 4], "cross_attention_dim": 16,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 8 + 6 * 4, "norm_num_groups": 4,
}


# --------------------------------------------------------------------------------------------- pipelines on disk


def _write_tokenizer(directory, pad: str = "<|endoftext|>"):
    """A CLIP BPE tokenizer over single letters (+ "th", "the</w>"), in the hub's file layout and formats."""
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


def _text_config(vocab: int, width: int, **kwargs):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=16, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **kwargs)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                         sample_size=64, scaling_factor=sdxl.LATENT_SCALE, force_upcast=True)


def save_sdxl(root, unet: dict | None = None):
    """A tiny SDXL pipeline in the diffusers layout (``StableDiffusionXLPipeline.save_pretrained``)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = _write_tokenizer(root / "src" / "tokenizer")
    _write_tokenizer(root / "src" / "tokenizer_2", pad="a")  # OpenCLIP's tokenizer pads with another token
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(vocab, 8)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(vocab, 8, projection_dim=8)),
        tokenizer=CLIPTokenizer.from_pretrained(root / "src" / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "src" / "tokenizer_2"),
        unet=UNet2DConditionModel(**{**TINY_UNET, **(unet or {})}),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
    )
    directory = root / "sdxl"
    pipe.save_pretrained(directory, safe_serialization=True)
    shutil.rmtree(root / "src")
    (directory / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return directory


def save_sd2(root, prediction_type: str = "epsilon"):
    """A tiny SD 2.x-style pipeline (linear projections, one 16-wide text tower) in the diffusers layout."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vocab = _write_tokenizer(root / "src" / "tokenizer")
    torch.manual_seed(0)
    vae = _vae()
    vae.register_to_config(scaling_factor=sd.LATENT_SCALE)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(_text_config(vocab, 16)),
        tokenizer=CLIPTokenizer.from_pretrained(root / "src" / "tokenizer"),
        unet=UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=4),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    directory = root / f"sd2-{prediction_type}"
    pipe.save_pretrained(directory, safe_serialization=True)
    shutil.rmtree(root / "src")
    return directory


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_sdxl(tmp_path_factory.mktemp("sdxl"))


def tiny_architecture(directory) -> sdxl.Architecture:
    """The tiny pipeline's configs in the shape of ``sdxl.ARCHITECTURE`` (what the entry checks)."""
    unet = json.loads((directory / "unet" / "config.json").read_text())
    text = {part: json.loads((directory / part / "config.json").read_text()) for part in ("text_encoder",
                                                                                         "text_encoder_2")}
    return sdxl.Architecture(
        unet={k: unet[k] for k in sdxl.UNET_ARCH}, unet_later=sdxl.UNET_LATER_KEYS,
        text_encoder={k: text["text_encoder"][k] for k in sdxl.ARCHITECTURE.text_encoder},
        text_encoder_2={k: text["text_encoder_2"][k] for k in sdxl.ARCHITECTURE.text_encoder_2})


@pytest.fixture(scope="module")
def sdxl_model(sdxl_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sdxl, "ARCHITECTURE", tiny_architecture(sdxl_dir))
        return sdxl.load(sdxl_dir)


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def _edit(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ------------------------------------------------------------------------------------------------ the real SDXL


@pytest.fixture(scope="module")
def real_configs(tmp_path_factory):
    """SDXL base's config files (no weights): the UNet of ``sdxl.UNET_ARCH`` built on the meta device, its text
    towers' and autoencoder's configs, EulerDiscreteScheduler's."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    root = tmp_path_factory.mktemp("sdxl-configs")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl.UNET_ARCH)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base's UNet
    assert unet.add_embedding.linear_1.in_features == 1280 + 6 * 256
    assert [len(getattr(b, "attentions", [])) for b in unet.down_blocks] == [0, 2, 2]  # no attention at 128x128
    unet.save_config(root / "unet")
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=1024,
                  scaling_factor=0.13025, force_upcast=True).save_config(root / "vae")
    for part, config in (("text_encoder", CLIPTextConfig(hidden_size=768, num_hidden_layers=12)),
                         ("text_encoder_2", CLIPTextConfig(hidden_size=1280, num_hidden_layers=32,
                                                           projection_dim=1280))):
        config.save_pretrained(root / part)
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           timestep_spacing="leading").save_config(root / "scheduler")
    return root


def test_the_real_sdxl_configs_pass_the_architecture_check(real_configs):
    sdxl.check_configs(real_configs)  # no error: the constants are SDXL base's


@pytest.mark.parametrize("part, edit, key", [
    ("unet", {"cross_attention_dim": 1024}, "cross_attention_dim"),
    ("unet", {"transformer_layers_per_block": [1, 2, 2]}, "transformer_layers_per_block"),
    ("unet", {"addition_embed_type": None}, "addition_embed_type"),
    ("unet", {"time_cond_proj_dim": 256}, "time_cond_proj_dim"),  # a key later diffusers added (LCM)
    ("text_encoder_2", {"projection_dim": 1024}, "projection_dim"),
    ("vae", {"scaling_factor": 0.18215}, "scaling_factor"),  # SD's autoencoder
    ("scheduler", {"prediction_type": "v_prediction"}, "prediction_type"),
])
def test_another_architecture_is_one_line_error(real_configs, tmp_path, part, edit, key):
    bad = tmp_path / "bad"
    shutil.copytree(real_configs, bad)
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    _edit(bad / part / name, **edit)
    with pytest.raises(BenchError) as exc:
        sdxl.check_configs(bad)
    assert key in _one_line(exc) and "Stable Diffusion XL base 1.0" in str(exc.value)


# ------------------------------------------------------------------------------------------------------- loading


def test_the_entry_loads_sdxl_strictly(sdxl_model, sdxl_dir):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    m = sdxl_model
    assert isinstance(m.unet, UNet2DConditionModel) and m.unet.config.addition_embed_type == "text_time"
    assert not m.unet.training and not any(p.requires_grad for p in m.unet.parameters())
    assert isinstance(m.parts["vae"], AutoencoderKL) and isinstance(m.parts["text_encoder"], CLIPTextModel)
    assert isinstance(m.parts["text_encoder_2"], CLIPTextModelWithProjection)
    assert all(p.dtype == torch.float32 for part in m.parts.values() for p in part.parameters())  # VAE too
    assert (m.image_shape, m.image_output_shape) == ((4, 128, 128), (3, 1024, 1024))
    assert (m.default_sampler, m.default_steps, m.default_batch_size) == ("ddim-ldm", 50, 1)
    torch.testing.assert_close(m.schedule.betas, sd.schedule().betas, rtol=0, atol=0)
    info = m.info
    assert info["guidance_scale"] == 5.0 and info["time_ids"] == [1024, 1024, 0, 0, 1024, 1024]
    assert info["negative_prompt"] == "zeros (force_zeros_for_empty_prompt)" and info["latent_scale"] == 0.13025
    assert info["prompts"]["count"] == 3 and info["source"] == "diffusers"
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors", "model_index.json"):
        assert info["files"][name] == sha256_file(sdxl_dir / name)
    json.dumps(info)
    with safe_open(sdxl_dir / "text_encoder_2" / "model.safetensors", framework="pt") as saved:
        state = m.parts["text_encoder_2"].state_dict()
        assert "text_projection.weight" in saved.keys()
        assert all(torch.equal(state[k], saved.get_tensor(k)) for k in saved.keys())


def test_loading_problems_are_one_line_errors(sdxl_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sdxl, "ARCHITECTURE", tiny_architecture(sdxl_dir))
    partial = tmp_path / "partial"
    shutil.copytree(sdxl_dir, partial)
    (partial / "text_encoder_2" / "model.safetensors").unlink()
    with pytest.raises(BenchError) as exc:
        sdxl.load(partial)
    assert "text_encoder_2/model.safetensors" in _one_line(exc) and "vae" not in str(exc.value).split("; download")[0]

    # a tensor missing from the file is an error, never a randomly initialised layer
    from safetensors.torch import load_file, save_file

    shutil.copytree(sdxl_dir, tmp_path / "cut")
    weights = tmp_path / "cut" / "text_encoder_2" / "model.safetensors"
    state = load_file(weights)
    del state["text_projection.weight"]
    save_file(state, weights)
    with pytest.raises(BenchError) as exc:
        sdxl.load(tmp_path / "cut")
    assert "missing keys: text_projection.weight" in _one_line(exc)

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(BenchError) as exc:
        sdxl.load(sdxl_dir)
    assert "pip install 'modiff-bench[sd]'" in _one_line(exc)


class _Payload:
    """Unpickling this object runs a shell command that creates ``marker`` (if anything runs its reduction)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("entry", ["sdxl-base-1.0", "diffusers"])
@pytest.mark.parametrize("part", ["text_encoder_2", "unet"])
def test_a_pickled_bin_component_never_runs_code(sdxl_dir, tmp_path, monkeypatch, entry, part):
    """SDXL's second text encoder (a class SD v1.4 does not have) and its UNet as .bin files holding a payload:
    loading refuses them in one line, through the named entry and the generic one, and nothing runs."""
    monkeypatch.setattr(sdxl, "ARCHITECTURE", tiny_architecture(sdxl_dir))
    directory = shutil.copytree(sdxl_dir, tmp_path / "bin")
    for weights in (directory / part).glob("*.safetensors"):
        weights.unlink()
    bin_name = "pytorch_model.bin" if part.startswith("text") else "diffusion_pytorch_model.bin"
    marker = tmp_path / "marker"
    torch.save({"text_projection.weight": torch.zeros(2), "x": _Payload(marker)}, directory / part / bin_name)
    with pytest.raises(BenchError) as exc:
        sdxl.load(directory) if entry == "sdxl-base-1.0" else load_model(f"diffusers:{directory}")
    message = _one_line(exc)
    assert f"{part}/{bin_name}" in message and "Weights only load failed" in message  # torch.load(weights_only=True)
    assert not marker.exists()


def test_the_hub_id_is_read_from_the_local_cache_only(sdxl_dir, tmp_path, monkeypatch):
    """Nothing is downloaded, HF_HUB_OFFLINE or not: a missing snapshot is one line saying what to fetch."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    for checkpoint in (None, sdxl.HUB_ID):
        with pytest.raises(BenchError) as exc:
            sdxl.load(checkpoint)
        assert "only the local cache is read" in _one_line(exc) and f"hf download {sdxl.HUB_ID}" in str(exc.value)
    with pytest.raises(BenchError, match="not in the Hugging Face cache"):
        load_model(sdxl.NAME)

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--stabilityai--stable-diffusion-xl-base-1.0"
    shutil.copytree(sdxl_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(sdxl, "ARCHITECTURE", tiny_architecture(sdxl_dir))
    model = sdxl.load(None)
    assert (model.info["source"], model.info["revision"]) == ("hub", revision)
    assert model.info["prompts"]["file"] == str(sd.DEFAULT_PROMPTS)  # a hub snapshot's prompts.txt is not used


# -------------------------------------------------------------------------------------- conditioning and guidance


def test_the_conditioning_is_diffusers_sdxl_pipelines(sdxl_model):
    """Context, pooled embedding, zeroed unconditional half and time ids equal what ``StableDiffusionXLPipeline``
    computes (``encode_prompt``, ``_get_add_time_ids``) for the same prompt."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    cond = sdxl_model.start_batch.__self__
    p = sdxl_model.parts
    pipe = StableDiffusionXLPipeline(vae=p["vae"], text_encoder=p["text_encoder"], text_encoder_2=p["text_encoder_2"],
                                     tokenizer=cond.tokenizer, tokenizer_2=cond.tokenizer_2, unet=sdxl_model.unet,
                                     scheduler=EulerDiscreteScheduler())
    with torch.no_grad():
        context, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS[1], device="cpu",
                                                                        do_classifier_free_guidance=True)
    assert context.shape == (1, 77, 16) and pooled.shape == (1, 8)
    torch.testing.assert_close(cond.embed(PROMPTS[1]), context[0], rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled(PROMPTS[1]), pooled[0], rtol=0, atol=0)
    assert not negative.any() and not negative_pooled.any()  # force_zeros_for_empty_prompt
    ids = pipe._get_add_time_ids((1024, 1024), (0, 0), (1024, 1024), torch.float32, text_encoder_projection_dim=8)
    cond.start_batch([0, 1])
    kwargs = cond.unet_kwargs(2)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["time_ids"], ids.repeat(4, 1))
    torch.testing.assert_close(kwargs["encoder_hidden_states"][3], context[0])
    assert not kwargs["encoder_hidden_states"][:2].any() and not kwargs["added_cond_kwargs"]["text_embeds"][:2].any()
    # the penultimate layer, not the last (the tiny towers have two layers)
    assert not torch.allclose(cond.embed(PROMPTS[1])[:, :8], p["text_encoder"](
        cond.token_ids(cond.tokenizer, PROMPTS[1])).last_hidden_state[0])


def test_guidance_is_one_call_with_the_added_conditioning(sdxl_model):
    unet, cond = sdxl_model.unet, sdxl_model.start_batch.__self__
    x = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([501, 501])
    sdxl_model.start_batch([0, 4])
    calls = []
    hook = unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args[0].shape[0], kwargs)),
                                          with_kwargs=True)
    try:
        eps = sdxl_model.denoiser()(x, t)
    finally:
        hook.remove()
    assert len(calls) == 1 and calls[0][0] == 4 and set(calls[0][1]["added_cond_kwargs"]) == {"text_embeds",
                                                                                                "time_ids"}
    kwargs = cond.unet_kwargs(2)
    with torch.no_grad():  # the formula, from two separate UNet calls
        halves = [unet(x, t, encoder_hidden_states=kwargs["encoder_hidden_states"][rows],
                       added_cond_kwargs={k: v[rows] for k, v in kwargs["added_cond_kwargs"].items()}).sample
                  for rows in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(eps, halves[0] + 5.0 * (halves[1] - halves[0]), rtol=1e-4, atol=1e-4)
    sdxl_model.start_batch([0])
    with pytest.raises(RuntimeError, match="start_batch"):
        sdxl_model.denoiser()(x, t)


def test_decoding_divides_by_sdxls_scale_in_float32(sdxl_model):
    vae = sdxl_model.parts["vae"]
    z = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(2))
    images = sdxl_model.decode(z.half())  # a float16 UNet's latents: the autoencoder stays float32
    assert images.dtype == torch.float32 and images.shape == (2, 3, 64, 64) and next(vae.parameters()).dtype == \
        torch.float32
    with torch.no_grad():
        expected = vae.decode(z.half().float() / 0.13025).sample.clamp(-1, 1)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the generic entry on SDXL and SD 2


def test_the_generic_entry_reads_an_sdxl_pipeline(sdxl_dir):
    """``diffusers:<dir>`` of an SDXL pipeline: its own sizes (time ids of 64x64 images), zeros for the empty prompt
    as its model_index.json says; the UNet gets exactly what diffusers' pipeline gives it for the same prompt."""
    from diffusers import StableDiffusionXLPipeline

    name = f"diffusers:{sdxl_dir}"
    entry = model_entry(name)
    assert entry.output_size == (64, 64) and entry.train_timesteps == 1000 and "SDXL" in entry.description
    model = load_model(name)
    assert (model.image_shape, model.image_output_shape, model.default_sampler) == ((4, 8, 8), (3, 64, 64),
                                                                                     "ddim-ldm")
    assert model.info["time_ids"] == [64, 64, 0, 0, 64, 64] and model.info["pipeline"] == "sdxl"
    assert "model_index.json" in model.info["files"]
    cond = model.start_batch.__self__
    assert cond.zero_uncond and cond.prompts == PROMPTS

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, use_safetensors=True, local_files_only=True)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    with torch.no_grad():
        pipe(PROMPTS[2], num_inference_steps=1, output_type="latent")
    hook.remove()
    model.start_batch([2])
    ours = model.start_batch.__self__.unet_kwargs(1)
    torch.testing.assert_close(ours["encoder_hidden_states"], seen[0]["encoder_hidden_states"], rtol=0, atol=0)
    for key in ("text_embeds", "time_ids"):
        torch.testing.assert_close(ours["added_cond_kwargs"][key], seen[0]["added_cond_kwargs"][key], rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_generic_entry_reads_an_sd2_pipeline(tmp_path, prediction_type):
    """SD 2.x: one text tower, the empty prompt as the unconditional half, guidance 7.5, SD's latent scale; a
    v-prediction scheduler gives a denoiser that turns v into eps."""
    directory = save_sd2(tmp_path, prediction_type)
    model = load_model(f"diffusers:{directory}")
    assert (model.image_output_shape, model.default_sampler, model.info["pipeline"]) == ((3, 64, 64), "plms", "sd")
    assert model.info["guidance_scale"] == 7.5 and model.info["latent_scale"] == sd.LATENT_SCALE
    assert set(model.parts) == {"vae", "text_encoder"} and "safety_checker" not in str(model.info["files"])
    x = torch.randn((1, *LATENT), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([700])
    model.start_batch([0])
    cond = model.start_batch.__self__
    with torch.no_grad():
        eps = model.denoiser()(x, t)
        out = model.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=cond.context(1)).sample
    guided = out[:1] + 7.5 * (out[1:] - out[:1])
    if prediction_type == "v_prediction":
        ab = model.schedule.alpha_bar(700)
        guided = ab ** 0.5 * guided + (1 - ab) ** 0.5 * x
    torch.testing.assert_close(eps, guided, rtol=1e-4, atol=1e-5)
    assert torch.equal(cond.embed(""), cond.context(1)[0])


def _break_text_pipeline(directory, kind):
    index = directory / "model_index.json"
    if kind == "third text encoder":
        _edit(index, text_encoder_3=["transformers", "T5EncoderModel"])
    elif kind == "no tokenizer_2":
        _edit(index, tokenizer_2=[None, None])
    elif kind == "unet class":
        _edit(index, unet=["diffusers", "UNet2DModel"])
    elif kind == "lcm unet":
        _edit(directory / "unet" / "config.json", time_cond_proj_dim=256)
    elif kind == "context width":
        _edit(directory / "text_encoder_2" / "config.json", hidden_size=16)
    elif kind == "time embedding":
        _edit(directory / "unet" / "config.json", addition_time_embed_dim=8)
    elif kind == "latent channels":
        _edit(directory / "vae" / "config.json", latent_channels=16)
    elif kind == "latents mean":
        _edit(directory / "vae" / "config.json", latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    elif kind == "continuous timesteps":
        _edit(directory / "scheduler" / "scheduler_config.json", timestep_type="continuous")
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.mark.parametrize("kind, needle", [
    ("third text encoder", "with text_encoder_3"),
    ("no tokenizer_2", "without tokenizer_2"),
    ("unet class", "the pipeline's unet is a UNet2DModel"),
    ("lcm unet", "time_cond_proj_dim is 256"),
    ("context width", "cross_attention_dim is 16, but the text embeddings are 24 wide"),
    ("time embedding", "projection_class_embeddings_input_dim is 32"),
    ("latent channels", "latent_channels is 16, but the UNet takes 4"),
    ("latents mean", "latents_mean is set"),
    ("continuous timesteps", "timestep_type is 'continuous'"),
])
def test_unusable_text_pipelines_are_one_line_errors(sdxl_dir, tmp_path, kind, needle):
    directory = tmp_path / "p"
    shutil.copytree(sdxl_dir, directory)
    _break_text_pipeline(directory, kind)
    with pytest.raises(BenchError) as exc:
        model_entry(f"diffusers:{directory}")
    assert needle in _one_line(exc)


# -------------------------------------------------------------------------------------- methods on SDXL, sampled


def test_modiff_on_sdxl_samples_per_sample_trajectories(sdxl_model):
    """MoDiff on the SDXL UNet through the zoo's guided denoiser: every conv / linear wrapped (the addition
    embedding's too), the per-layer state holds the doubled batch, the samples are finite and quantized."""
    config = modiff.ModiffConfig(w_bits=8, a_bits=8, modulation="ec", granularity="sample")
    unet = modiff.quantize(copy.deepcopy(sdxl_model.unet), config)
    names = {layer.name for layer in modiff.quant_layers(unet)}
    assert {"add_embedding.linear_1", "add_embedding.linear_2", "conv_in"} <= names
    run = SamplerConfig.from_name("ddim-ldm", 4)

    def go(model_unet, **kwargs):
        return sample(sdxl_model.denoiser(model_unet), sdxl_model.schedule, run, [5, 7], LATENT, batch_size=2,
                      progress=False, on_batch=sdxl_model.start_batch, **kwargs)

    fp = go(sdxl_model.unet)
    q = go(unet, on_trajectory_start=lambda: modiff.reset(unet))
    assert torch.isfinite(q).all() and not torch.equal(q, fp) and unet.conv_in.reconstruction.shape[0] == 4


def test_deepcache_counts_a_bare_sdxl_unet(sdxl_model):
    """DeepCache's MACs of the UNet alone: SDXL's cannot run without ``added_cond_kwargs`` (it raised before issue
    27); with the model, the guided call's count, as the harness's ``macs_g``."""
    from baselines.deepcache.feature_reuse import DeepCache
    from baselines.deepcache.method import macs_full_and_partial
    from bench.generate import count_model_macs

    cache = DeepCache(sdxl_model.unet, branch=0)
    try:
        full, partial = macs_full_and_partial(sdxl_model.unet, cache, LATENT, "cpu")
        assert 0 < partial < full
        full, partial = macs_full_and_partial(sdxl_model.unet, cache, sdxl_model.image_shape, "cpu", sdxl_model)
        assert 0 < partial < full and full == count_model_macs(sdxl_model, torch.device("cpu")).total_macs
    finally:
        cache.remove()


def test_baselines_run_on_sdxl_through_the_harness(sdxl_dir, tmp_path):
    """A cell of each method on the SDXL pipeline (``diffusers:<dir>``): MoDiff on LTQ and per-sample scales,
    Q-Diffusion (calibration on the guided batch with the added conditioning) alone and with MoDiff, PTQD on it, and
    DeepCache on full precision and on MoDiff."""
    model = f"diffusers:{sdxl_dir}"
    matrix = build_matrix({
        "run": {"model": model, "sampler": "ddim-ldm", "steps": 4, "n_samples": 2, "batch_size": 2,
                "metrics": ["psnr_to_fp"]},
        "matrix": [
            {"w_bits": [8], "a_bits": [8], "base": ["fp", "ltq", "psq", "qdiff"], "modulation": ["ec"]},
            {"w_bits": [8], "a_bits": [8], "base": ["qdiff", "ptqd"], "modulation": ["off"]},
            {"w_bits": [8], "a_bits": [8], "base": ["fp", "ltq"], "modulation": ["ec"], "cache": ["deepcache-u2"]},
        ],
        "params": {"qdiff": {"cali_st": 2, "cali_n": 2, "weight_iters": 2, "act_iters": 2, "batch_size": 4},
                   "ptqd": {"calib_samples": 2}},
    })
    wanted = {"fp", "ltq+ec", "psq+ec", "qdiff", "qdiff+ec", "ptqd", "fp+deepcache-u2", "ltq+ec+deepcache-u2"}
    assert sorted(c.method for c in matrix.cells) == sorted(wanted)
    summary = Runner(matrix, tmp_path, device="cpu", progress=False, log=lambda s: None).run()
    table = pd.read_csv(tmp_path / "results.csv").set_index("method")
    assert not summary.failed, table[["status", "error"]]
    assert set(table.loc[sorted(wanted), "status"]) == {"ok"}
    for method in wanted - {"fp"}:
        assert 0 < table.loc[method, "psnr_to_fp"] < float("inf"), method
        images = torch.load(tmp_path / table.loc[method, "samples_file"], weights_only=True)["images"]
        assert images.shape == (2, 3, 64, 64) and images.isfinite().all()
    data = next((tmp_path / "cache" / "qdiff").glob("data-*"))
    cond = torch.load(data, weights_only=True)["cond"]
    assert set(cond) == {"encoder_hidden_states", "added_cond_kwargs"}
    assert cond["added_cond_kwargs"]["time_ids"].shape == (4, 6)  # 2 trajectories x 2 halves
