"""The sd-v1-4 zoo entry: loading, classifier-free guidance, prompts by seed and quantized sampling.

The UNet is Stable Diffusion v1.4's real architecture (``bench.zoo.sd.UNET_ARCH``, 859,520,964 parameters) at seeded
random weights, built once for the module. Sampling runs on 8x8 latents instead of 64x64: the spatial size is a
runtime input, the layers and weights are those of 512x512 sampling, and the module stays near two minutes on one CPU
thread. The text encoder and the autoencoder are tiny stand-ins with SD's interfaces, not SD's: a one-layer
CLIPTextModel of width 768 (the UNet's cross_attention_dim) over a small BPE vocabulary written here, and a four-level
AutoencoderKL with 8 channels (4 latent channels, 8x upsampling). They stay in full precision and the loader checks
only their interfaces. Every part is written with ``save_pretrained`` in the diffusers layout of
CompVis/stable-diffusion-v1-4 (the tokenizer as the hub holds it: vocab.json, merges.txt, tokenizer_config.json).
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

import modiff
from bench.errors import BenchError
from bench.provenance import sha256_file
from bench.zoo import load_model, sd
from modiff.samplers import SamplerConfig, sample

pytest.importorskip("transformers")  # the 'sd' extra


def _room() -> tuple[float, float]:
    """Free GiB in the temporary directory and total GiB of memory."""
    import os
    import shutil
    import tempfile

    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return free, memory


# the real SD v1.4 UNet at random weights: ~3.4 GB written to disk, ~8 GB of memory at peak
_FREE_GIB, _MEMORY_GIB = _room()
if _FREE_GIB < 8 or _MEMORY_GIB < 14:
    pytest.skip(f"the SD v1.4 UNet test needs 8 GiB of free temporary disk and 14 GiB of memory; this machine has "
                f"{_FREE_GIB:.1f} GiB free and {_MEMORY_GIB:.1f} GiB", allow_module_level=True)

LATENT = (4, 8, 8)  # 64x64 images; 8 = the UNet's total downsampling
SAMPLER = "plms"  # SD's sampler (2 steps: 3 network evaluations)
PROMPTS = ["a red cube", "a blue sphere", "the green cone"]
SD_UNET_PARAMETERS = 859_520_964  # SD v1's UNet (860M)


# --------------------------------------------------------------------------------------------- a checkpoint on disk


def _write_tokenizer(directory):
    """A CLIP BPE tokenizer over single letters (+ "th", "the</w>"), in the hub's file layout and formats."""
    directory.mkdir()
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters), "th", "the</w>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")

    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": added("<|startoftext|>"), "do_lower_case": True,
        "eos_token": added("<|endoftext|>"), "errors": "replace", "model_max_length": 77,
        "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer", "unk_token": added("<|endoftext|>"),
    }))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}))
    return len(tokens)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd-v1-4")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd.UNET_ARCH)
    assert sum(p.numel() for p in unet.parameters()) == SD_UNET_PARAMETERS
    unet.save_pretrained(root / "unet")
    del unet
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64,
    ).save_pretrained(root / "vae")
    vocab = _write_tokenizer(root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=768, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).save_pretrained(root / "text_encoder")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1).save_pretrained(root / "scheduler")
    (root / "prompts.txt").write_text("# three prompts\n" + "\n\n".join(PROMPTS) + "\n")
    return root


@pytest.fixture(scope="module")
def sd_model(sd_dir):
    return load_model("sd-v1-4", sd_dir)


def _mirror(src, dst, edit: dict[str, dict] | None = None, drop: str | None = None):
    """``dst``: ``src`` by symlinks, without the part ``drop``, with ``edit[part]`` merged into that part's config."""
    dst.mkdir()
    for part in src.iterdir():
        if part.name == drop:
            continue
        if edit and part.name in edit:
            (dst / part.name).mkdir()
            for f in part.iterdir():
                if f.name.endswith("config.json"):
                    (dst / part.name / f.name).write_text(json.dumps({**json.loads(f.read_text()), **edit[part.name]}))
                else:
                    (dst / part.name / f.name).symlink_to(f)
        else:
            (dst / part.name).symlink_to(part)
    return dst


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------------- loading


def test_load_model_gives_sd_v14(sd_model, sd_dir):
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    m = sd_model
    assert isinstance(m.unet, UNet2DConditionModel)
    assert sum(p.numel() for p in m.unet.parameters()) == SD_UNET_PARAMETERS
    assert not any(p.requires_grad for p in m.unet.parameters()) and not m.unet.training
    assert isinstance(m.parts["vae"], AutoencoderKL) and isinstance(m.parts["text_encoder"], CLIPTextModel)
    assert (m.image_shape, m.image_output_shape) == ((4, 64, 64), (3, 512, 512))
    assert (m.default_sampler, m.default_steps, m.default_eta) == ("plms", 50, 0.0)
    # scaled_linear betas in float64, equal to diffusers' SD scheduler
    reference = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert m.schedule.betas.dtype == torch.float64 and m.schedule.num_train_timesteps == 1000
    torch.testing.assert_close(m.schedule.betas.float(), reference.betas, rtol=1e-6, atol=0)
    assert m.schedule.alpha_bar(999) == pytest.approx(float(reference.alphas_cumprod[999]), rel=1e-5)
    info = m.info
    assert info["guidance_scale"] == 7.5 and info["negative_prompt"] == "" and info["source"] == "diffusers"
    assert info["prompts"] == {"file": str(sd_dir / "prompts.txt"), "sha256": sha256_file(sd_dir / "prompts.txt"),
                               "count": 3, "rule": "prompt of seed s = prompts[s % count]"}
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert info["files"][weights] == sha256_file(sd_dir / weights)
    assert {"tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"} <= set(info["files"])
    json.dumps(info)  # goes into the run's JSON


def test_load_directly_matches_registry(sd_model, sd_dir):
    """``sd.load(dir)`` and ``load_model("sd-v1-4", dir)`` (the registry's lazy loader) give the same model, and it
    is the one on disk: every tensor of the UNet, the autoencoder and the text encoder equals the one in its
    safetensors file (a tensor left at its random initialisation, renamed or cast would differ), the rest (buffers
    the files do not hold) agree between the two loads, and so do the configs, the schedule, the prompts and the
    sampling settings."""
    from safetensors import safe_open

    m = sd.load(str(sd_dir))
    parts = {"unet": (m.unet, sd_model.unet, "unet/diffusion_pytorch_model.safetensors"),
             "vae": (m.parts["vae"], sd_model.parts["vae"], "vae/diffusion_pytorch_model.safetensors"),
             "text_encoder": (m.parts["text_encoder"], sd_model.parts["text_encoder"],
                              "text_encoder/model.safetensors")}
    assert set(m.parts) == set(sd_model.parts) == {"vae", "text_encoder"}
    for part, (direct, registry, weights) in parts.items():
        assert type(direct) is type(registry) and direct.config == registry.config, part
        ours, theirs = direct.state_dict(), registry.state_dict()
        assert list(ours) == list(theirs), part
        with safe_open(sd_dir / weights, framework="pt") as saved:
            on_disk = set(saved.keys())
            assert {name for name, _ in direct.named_parameters()} <= on_disk <= set(ours), part
            for key in on_disk:
                want = saved.get_tensor(key)
                assert ours[key].dtype == want.dtype == torch.float32 and torch.equal(ours[key], want), key
                assert torch.equal(theirs[key], want), key
        for key in set(ours) - on_disk:
            assert torch.equal(ours[key], theirs[key]), key
    assert torch.equal(m.schedule.betas, sd_model.schedule.betas)
    settings = ("name", "image_shape", "output_shape", "default_sampler", "default_steps", "default_eta",
                "default_batch_size", "info")
    assert {k: getattr(m, k) for k in settings} == {k: getattr(sd_model, k) for k in settings}
    direct_prompts, registry_prompts = m.start_batch.__self__, sd_model.start_batch.__self__
    assert direct_prompts.prompts == registry_prompts.prompts == PROMPTS
    assert direct_prompts.guidance_scale == registry_prompts.guidance_scale == 7.5


@pytest.mark.parametrize("part, edit, key", [
    ("unet", {"cross_attention_dim": 1024}, "cross_attention_dim"),
    ("unet", {"attention_head_dim": [5, 10, 20, 20]}, "attention_head_dim"),
    ("unet", {"use_linear_projection": True}, "use_linear_projection"),  # a key later diffusers added (SD 2.x)
    ("scheduler", {"beta_schedule": "linear"}, "beta_schedule"),
    ("vae", {"latent_channels": 16}, "latent_channels"),
    ("text_encoder", {"hidden_size": 1024}, "hidden_size"),
])
def test_wrong_config_is_one_line_error(sd_dir, tmp_path, part, edit, key):
    bad = _mirror(sd_dir, tmp_path / "bad", edit={part: edit})
    with pytest.raises(BenchError) as exc:
        sd.load(bad)
    assert key in _one_line(exc) and "Stable Diffusion v1.4" in str(exc.value)


def test_missing_checkpoint_is_one_line_error(sd_dir, tmp_path, monkeypatch):
    with pytest.raises(BenchError) as exc:
        load_model("sd-v1-4", tmp_path / "nowhere")
    assert "does not exist" in _one_line(exc) and sd.HUB_ID in str(exc.value) and "run.checkpoint" in str(exc.value)

    partial = _mirror(sd_dir, tmp_path / "partial", drop="vae")
    with pytest.raises(BenchError) as exc:
        sd.load(partial)
    assert "vae/config.json" in _one_line(exc) and "vae/diffusion_pytorch_model.safetensors" in str(exc.value)
    assert "text_encoder" not in str(exc.value).split("; download")[0]  # only what is missing is named

    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for checkpoint in (None, sd.HUB_ID):
        with pytest.raises(BenchError) as exc:
            sd.load(checkpoint)
        assert "HF_HUB_OFFLINE" in _one_line(exc) and "hf download" in str(exc.value)


def test_missing_transformers_names_the_extra(sd_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(BenchError) as exc:
        sd.load(sd_dir)
    assert "pip install 'modiff-bench[sd]'" in _one_line(exc)


# ------------------------------------------------------------------------------------------- guidance and prompts


def test_guidance_is_one_call_on_the_doubled_batch(sd_model):
    unet, cond = sd_model.unet, sd_model.start_batch.__self__
    x = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([501, 501])
    sd_model.start_batch([0, 4])
    assert cond.batch_prompts == [PROMPTS[0], PROMPTS[1]]
    calls = []
    hook = unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0].shape[0], kwargs["encoder_hidden_states"].clone())),
        with_kwargs=True)
    try:
        eps = sd_model.denoiser()(x, t)
    finally:
        hook.remove()
    assert len(calls) == 1 and calls[0][0] == 4  # one UNet call, cat([x, x])
    uncond, c0, c1 = cond.embed(""), cond.embed(PROMPTS[0]), cond.embed(PROMPTS[1])
    torch.testing.assert_close(calls[0][1], torch.stack([uncond, uncond, c0, c1]))  # cat([uncond, cond])
    with torch.no_grad():  # the formula, from two separate UNet calls
        eps_u = unet(x, t, encoder_hidden_states=torch.stack([uncond, uncond])).sample
        eps_c = unet(x, t, encoder_hidden_states=torch.stack([c0, c1])).sample
    torch.testing.assert_close(eps, eps_u + 7.5 * (eps_c - eps_u), rtol=1e-4, atol=1e-4)
    assert eps.shape == x.shape and not torch.allclose(eps_u, eps_c)

    sd_model.start_batch([0])  # conditioning for another batch size is refused, not broadcast
    with pytest.raises(RuntimeError, match="start_batch"):
        sd_model.denoiser()(x, t)


def test_prompts_depend_on_the_seed_only(sd_model, sd_dir, tmp_path):
    from transformers import CLIPTokenizer

    cond = sd_model.start_batch.__self__
    assert cond.prompts == PROMPTS  # the comment and the blank lines are skipped
    assert [cond.prompt(s) for s in (0, 1, 2, 3, 7, -1)] == [PROMPTS[i] for i in (0, 1, 2, 0, 1, 2)]
    # the embedding is SD's: last hidden state of the prompt padded to 77 tokens
    tokenizer = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
    ids = tokenizer(PROMPTS[2], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = sd_model.parts["text_encoder"](input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(cond.embed(PROMPTS[2]), reference)
    # computed once per distinct prompt
    fresh = sd.PromptConditioning(cond.tokenizer, cond.text_encoder, PROMPTS)
    calls = []
    hook = cond.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        fresh.start_batch([0, 1, 2, 3, 4, 5])
        fresh.start_batch([6, 1])
    finally:
        hook.remove()
    assert len(calls) == 4 and set(fresh.embeddings) == {"", *PROMPTS}
    # the packaged default list, used when the checkpoint has no prompts.txt
    assert sd.prompt_file(sd_dir) == sd_dir / "prompts.txt"
    assert sd.prompt_file(tmp_path) == sd.DEFAULT_PROMPTS and len(sd.read_prompts(sd.DEFAULT_PROMPTS)) >= 8
    (tmp_path / "prompts.txt").write_text("# nothing\n\n")
    with pytest.raises(BenchError, match="holds no prompt"):
        sd.read_prompts(tmp_path / "prompts.txt")


# -------------------------------------------------------------------------------------------------------- sampling


def _sample(model, unet, seeds, batch_size, **kwargs):
    config = SamplerConfig.from_name(SAMPLER, 2)
    return sample(model.denoiser(unet), model.schedule, config, seeds, LATENT, batch_size=batch_size, progress=False,
                  on_batch=model.start_batch, **kwargs)


@pytest.fixture(scope="module")
def fp_pair(sd_model):
    return _sample(sd_model, sd_model.unet, [5, 7], 2)


def test_full_precision_image_is_batch_invariant(sd_model, fp_pair):
    single = _sample(sd_model, sd_model.unet, [7], 1)  # seed 7 alone: other position, other batch prompts
    torch.testing.assert_close(single[0], fp_pair[1], rtol=1e-4, atol=1e-5)
    images = sd_model.decode(torch.cat([fp_pair, single]))
    assert images.shape == (3, 3, 64, 64)
    torch.testing.assert_close(images[2], images[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fp_pair[0], fp_pair[1])


@pytest.mark.parametrize("modulation", ["off", "plain", "ec"])
def test_quantized_sampling_w8a8_per_sample(sd_model, fp_pair, modulation):
    config = modiff.ModiffConfig(w_bits=8, a_bits=8, modulation=modulation, granularity="sample")
    unet = modiff.quantize(copy.deepcopy(sd_model.unet), config)
    wrapped = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in sd_model.unet.modules())
    assert len(modiff.quant_layers(unet)) == wrapped  # every conv/linear of the UNet
    batch_sizes = []

    def on_trajectory_start():
        modiff.reset(unet)

    def record(module, args):
        batch_sizes.append(args[0].shape[0])

    hook = unet.conv_in.register_forward_pre_hook(record)
    pair = _sample(sd_model, unet, [5, 7], 2, on_trajectory_start=on_trajectory_start)
    hook.remove()
    assert batch_sizes == [4, 4, 4]  # PLMS, 2 steps: 3 evaluations, each on the doubled batch
    assert pair.shape == (2, *LATENT) and torch.isfinite(pair).all()
    assert not torch.allclose(pair, fp_pair)  # quantization is in effect
    if modulation != "off":
        assert modiff.state_bytes(unet) > 0 and unet.conv_in.reconstruction.shape[0] == 4
    images = sd_model.decode(pair)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    assert images.min() >= -1.0 and images.max() <= 1.0
    if modulation == "ec":
        # Per-sample scales and per-sample MoDiff state: seed 7's image is bitwise the same with another partner (other
        # prompt, other noise) and at another position. (With tensor-wise scales it is not: 0.17 max difference here.)
        # Batches of the same size only: across batch SIZES the CPU kernels round differently (~1e-7, as the full
        # precision test allows), and 8-bit rounding of a random-weight UNet amplifies such ties to the size of the
        # quantization error itself. The runner keeps chunk k = seeds[kB:(k+1)B] whatever the world size.
        swapped = _sample(sd_model, unet, [7, 3], 2, on_trajectory_start=on_trajectory_start)
        assert torch.equal(swapped[0], pair[1])
