"""PixArt-alpha XL/2 at 512x512 (``PixArt-alpha/PixArt-XL-2-512x512``): a text-to-image latent transformer.

Setting: 512x512 images (64x64x4 latents of SD's autoencoder, scaled by 0.18215), DDPM's linear schedule (beta
0.0001 to 0.02, T = 1000, from the scheduler config), T5 v1.1 XXL text embeddings (4096 wide, 120 tokens),
classifier-free guidance 4.5 (the default of diffusers' ``PixArtAlphaPipeline`` and the PixArt-alpha paper's
sampling setting, with DPM-Solver in 20 steps: the default sampler here is ``dpm-solver++`` with 20 steps). Only the
transformer (``ZooModel.unet``) is quantized; the autoencoder and the T5 encoder stay in full precision
(``ZooModel.parts``).

What the transformer gets (diffusers' ``PixArtAlphaPipeline.encode_prompt`` and ``__call__``, followed)
    - ``encoder_hidden_states`` ``(120, 4096)`` per row: the T5 encoder's last hidden state on the prompt's ids
      padded to 120 tokens (``max_sequence_length``), with its attention mask (``encoder_attention_mask``, one row
      per row: the padding is masked out in cross-attention);
    - the prompt is lower-cased and stripped: the pipeline's ``clean_caption=True`` falls back to exactly that
      without ``bs4`` and ``ftfy``; where they are installed diffusers also removes URLs, HTML and some punctuation
      (the prompts of ``prompts.txt`` are plain sentences, which that leaves nearly unchanged);
    - ``added_cond_kwargs`` ``{"resolution": None, "aspect_ratio": None}``: the 512 model takes no micro-conditions
      (the pipeline gives them to ``sample_size == 128`` transformers only, the 1024 model).
    Guidance: ONE call on the doubled batch, the unconditional half (the empty prompt ``""`` with its mask) first,
    ``eps_u + 4.5 (eps_c - eps_u)``, then the learned variance split off.

Learned variance
    As DiT (``bench.zoo.dit``): ``out_channels`` 8 = ``[eps, variance]``; the denoiser returns eps only
    (``bench.zoo.dit.split_variance``, the pipeline's ``noise_pred.chunk(2, dim=1)[0]``); every sampler of the
    benchmark ignores the variance (DDIM, PLMS, DPM-Solver++ use eps only, DDPM a fixed variance). PixArt samples with
    DPM-Solver, which does not use it either: the default setting is the paper's.

Prompts: the prompt of seed ``s`` is ``prompts[s % len(prompts)]`` (``<checkpoint>/prompts.txt``, else the packaged
``bench/zoo/prompts.txt``), as for Stable Diffusion (``bench.zoo.sd``); each distinct prompt is encoded once, alone.

What ``load(checkpoint)`` accepts
    - ``None`` or ``"PixArt-alpha/PixArt-XL-2-512x512"``: that repository in the local Hugging Face cache, read only
      (nothing is downloaded: the T5 XXL encoder alone is ~19 GB), restricted to :data:`HUB_PATTERNS`;
    - a directory in that repository's diffusers layout.
    The T5 encoder is part of the checkpoint: a download without ``text_encoder/`` is one line saying so. Weights are
    read from safetensors only (``model.safetensors`` or a sharded ``model.safetensors.index.json``), strictly; the
    configs are checked first (:data:`TRANSFORMER_ARCH`, the schedule, the autoencoder interface, T5's width);
    ``info["files"]`` records the SHA-256 of every file read.

``pixart-alpha-512-random``: the exact transformer and autoencoder with seeded random weights and no text encoder:
each prompt's "embedding" is a seeded Gaussian ``(120, 4096)`` with a full mask. Nothing is read: speed and memory
only (``--estimate``).
"""

from __future__ import annotations

import copy
import functools
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from modiff.samplers import Denoiser
from modiff.schedules import NoiseSchedule

from ..errors import BenchError
from ..provenance import sha256_file
from .checkpoints import constructor_defaults, read_config
from .dit import (
    LATENT_SCALE,
    NUM_TRAIN_TIMESTEPS,
    RANDOM_SEED,
    SCHEDULER_CONFIG,
    VAE_INTERFACE,
    check_transformer_class,
    decoded_shape,
    find_shards,
    layout,
    load_safe_parts,
    random_vae,
    schedule,
    split_variance,
)
from .model import ZooModel
from .registry import ReferenceData, ZooEntry, register_model
from .sd import (
    PromptConditioning,
    Release,
    check_keys,
    decode_latents,
    find_files,
    locate,
    prompt_file,
    prompts_info,
    read_prompts,
    require_transformers,
    to_device,
)

NAME = "pixart-alpha-512"
RANDOM_NAME = "pixart-alpha-512-random"
TITLE = "PixArt-alpha XL/2 512x512"
HUB_ID = "PixArt-alpha/PixArt-XL-2-512x512"
GUIDANCE_SCALE = 4.5  # PixArtAlphaPipeline's default; the paper's setting (DPM-Solver, 20 steps, cfg 4.5)
NEGATIVE_PROMPT = ""  # the pipeline's default unconditional prompt
TEXT_TOKENS = 120  # the pipeline's max_sequence_length (paper, section 3.1)
TEXT_WIDTH = 4096  # T5 v1.1 XXL's d_model = the transformer's caption_channels
IMAGE_SHAPE = (4, 64, 64)
OUTPUT_SHAPE = (3, 512, 512)
DEFAULT_SAMPLER, DEFAULT_STEPS = "dpm-solver++", 20
# MoDiff's state per (doubled) sample: 1024 tokens of 1152 channels through 28 blocks with cross-attention, about 4x
# DiT-XL/2's 256 tokens (an estimate from the shapes, not measured): ~4 GB per image with guidance.
DEFAULT_BATCH_SIZE = 4

HUB_PATTERNS = ("model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*",
                "transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model*.safetensors", "text_encoder/model.safetensors.index.json")

PARTS: dict[str, tuple[str, str, str]] = {
    "transformer": ("diffusers", "PixArtTransformer2DModel", "transformer"),
    "vae": ("diffusers", "AutoencoderKL", "autoencoder"),
    "text_encoder": ("transformers", "T5EncoderModel", "T5 text encoder"),
    "tokenizer": ("transformers", "T5Tokenizer", "T5 tokenizer"),
}
TRANSFORMER_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")  # the hub's file names the legacy class

# Source: transformer/config.json of PixArt-alpha/PixArt-XL-2-512x512 ("_class_name": "Transformer2DModel", diffusers
# 0.22): DiT-XL/2's trunk (28 blocks, 16 heads x 72 = 1152, patch 2) on 64x64x4 latents, adaLN-single, cross-attention
# to T5 captions of 4096 channels projected to 1152, learned variance (8 output channels), no micro-conditions.
# 610,856,096 parameters (counted on the meta device in tests/test_zoo_pixart.py).
TRANSFORMER_ARCH: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 8,
    "patch_size": 2,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "cross_attention_dim": 1152,
    "caption_channels": TEXT_WIDTH,
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
}
TRANSFORMER_LATER_KEYS: dict = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
    "use_additional_conditions": (None, False),  # None: sample_size == 128, i.e. False at 64
}
# the key of T5's config the transformer relies on
TEXT_ENCODER_ARCH: dict = {"d_model": TEXT_WIDTH}

RELEASE = Release(TITLE, HUB_ID, HUB_PATTERNS, layout(PARTS), download=False, optional_files=(
    "model_index.json", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer.json"))


class PixArtConditioning(PromptConditioning):
    """Seeds -> prompts -> T5 embeddings with their attention masks, and PixArt's guided denoiser (module
    docstring). ``embed(prompt)`` is the ``(tokens, width)`` last hidden state, ``mask(prompt)`` the ``(tokens,)``
    attention mask; both computed once per distinct prompt and kept on the CPU. ``unet_kwargs(batch)`` holds
    ``encoder_hidden_states`` and ``encoder_attention_mask``, one row per row of the doubled batch, the
    unconditional half first; ``added_cond_kwargs`` (``resolution``, ``aspect_ratio``) only for a ``sample_size``
    128 transformer (``micro_conditions``: ``(height, width)`` of the images)."""

    def __init__(self, tokenizer, text_encoder: nn.Module | None, prompts: Sequence[str],
                 guidance_scale: float = GUIDANCE_SCALE, tokens: int = TEXT_TOKENS,
                 micro_conditions: tuple[int, int] | None = None):
        super().__init__(tokenizer, text_encoder, prompts, guidance_scale, NEGATIVE_PROMPT)
        self.tokens = int(tokens)
        self.micro_conditions = micro_conditions
        self.masks: dict[str, torch.Tensor] = {}

    @staticmethod
    def preprocess(prompt: str) -> str:
        """The pipeline's ``_text_preprocessing`` without caption cleaning: lower-cased and stripped."""
        return prompt.lower().strip()

    @torch.no_grad()
    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.tokenizer([self.preprocess(prompt)], padding="max_length", max_length=self.tokens,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        mask = inputs.attention_mask.to(self.device)
        hidden = self.text_encoder(inputs.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden[0].float().cpu(), mask[0].cpu()

    def embed(self, prompt: str) -> torch.Tensor:
        if prompt not in self.embeddings:
            self.embeddings[prompt], self.masks[prompt] = self.encode(prompt)
        return self.embeddings[prompt]

    def mask(self, prompt: str) -> torch.Tensor:
        self.embed(prompt)
        return self.masks[prompt]

    def batch_kwargs(self, prompts: Sequence[str]) -> dict:
        rows = [self.negative_prompt] * len(prompts) + list(prompts)
        context, mask = self.embed(self.negative_prompt), self.mask(self.negative_prompt)
        kwargs = {
            "encoder_hidden_states": torch.stack([self.embed(p) for p in rows]) if rows
            else context.new_empty((0, *context.shape)),
            "encoder_attention_mask": torch.stack([self.mask(p) for p in rows]) if rows
            else mask.new_empty((0, *mask.shape)),
        }
        if self.micro_conditions is not None:  # the pipeline's resolution and aspect ratio, the same for every row
            height, width = self.micro_conditions
            kwargs["added_cond_kwargs"] = {
                "resolution": torch.tensor([float(height), float(width)]).repeat(len(rows), 1),
                "aspect_ratio": torch.tensor([float(height / width)]).repeat(len(rows), 1)}
        return kwargs

    def denoiser(self, unet: nn.Module) -> Denoiser:
        """``unet`` (the transformer) with classifier-free guidance, one call on the doubled batch, the learned
        variance split off after guidance (``PixArtAlphaPipeline.__call__``)."""

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            kwargs = dict(to_device(self.unet_kwargs(x.shape[0]), x.device, x.dtype))
            added = kwargs.pop("added_cond_kwargs", {"resolution": None, "aspect_ratio": None})
            t2 = torch.cat([t, t]) if t.dim() else t.expand(2 * x.shape[0])
            out = unet(torch.cat([x, x]), timestep=t2, added_cond_kwargs=added, **kwargs).sample
            out_uncond, out_cond = out.chunk(2)
            return split_variance(out_uncond + self.guidance_scale * (out_cond - out_uncond), x.shape[1])

        return denoise


class RandomConditioning(PixArtConditioning):
    """No text encoder: the "embedding" of the prompt with index ``i`` in the list is a Gaussian drawn under seed
    ``RANDOM_SEED + i`` (the empty prompt: under a fixed seed), with a full mask (for ``pixart-alpha-512-random``)."""

    def __init__(self, prompts: Sequence[str], width: int = TEXT_WIDTH, **kwargs):
        super().__init__(None, None, prompts, **kwargs)
        self.width = int(width)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        seed = RANDOM_SEED + (self.prompts.index(prompt) if prompt in self.prompts
                              else zlib.crc32(prompt.encode("utf-8")) + len(self.prompts))
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((self.tokens, self.width), generator=generator), torch.ones(self.tokens, dtype=torch.long)


def micro_conditions(transformer: nn.Module, image_shape: Sequence[int]) -> tuple[int, int] | None:
    """``(height, width)`` of the images when the pipeline gives the transformer resolution and aspect ratio
    (``sample_size == 128``, the 1024 model), else None."""
    return (int(image_shape[-2]), int(image_shape[-1])) if transformer.config.sample_size == 128 else None


def conditioning_info(conditioning: PixArtConditioning) -> dict:
    return {
        "guidance_scale": conditioning.guidance_scale,
        "negative_prompt": conditioning.negative_prompt,
        "guidance": "one transformer call on cat([x, x]) with cat([uncond, cond]) T5 embeddings and attention masks; "
                    "the learned variance split off after guidance (PixArtAlphaPipeline)",
        "text_tokens": conditioning.tokens,
        "prompt_preprocessing": "lower().strip() (clean_caption off)",
        "micro_conditions": None if conditioning.micro_conditions is None else list(conditioning.micro_conditions),
        "learned_variance": "split off; ignored by every sampler (DDIM, PLMS, DPM-Solver++ use eps only, DDPM a "
                            "fixed variance)",
    }


def assemble(name: str, transformer: nn.Module, vae: nn.Module, conditioning: PixArtConditioning,
             noise_schedule: NoiseSchedule, info: dict, text_encoder: nn.Module | None,
             batch_size: int = DEFAULT_BATCH_SIZE) -> ZooModel:
    """The ZooModel of a PixArt-alpha ``transformer`` with its autoencoder and conditioning."""
    size = int(transformer.config.sample_size)
    image_shape = (int(transformer.config.in_channels), size, size)
    parts = {"vae": vae, **({} if text_encoder is None else {"text_encoder": text_encoder})}
    return ZooModel(
        name=name, unet=transformer, schedule=noise_schedule, image_shape=image_shape,
        default_sampler=DEFAULT_SAMPLER, default_steps=min(DEFAULT_STEPS, noise_schedule.num_train_timesteps),
        info={**info, **conditioning_info(conditioning)}, make_denoiser=conditioning.denoiser,
        decoder=functools.partial(decode_latents, vae), start_batch=conditioning.start_batch,
        output_shape=decoded_shape(vae, image_shape), default_eta=0.0, default_batch_size=batch_size, parts=parts,
    )


# ---------------------------------------------------------------------------------------------------------- loading


def check_text_encoder(directory: Path, release: Release = RELEASE) -> None:
    """The T5 encoder must be in the checkpoint: its absence is one line saying so (before the generic list of
    missing files)."""
    config = directory / "text_encoder" / "config.json"
    weights = [directory / "text_encoder" / f for f in ("model.safetensors", "model.safetensors.index.json")]
    if not config.is_file() or not any(w.is_file() for w in weights):
        raise BenchError(f"the T5 text encoder of {release.title} is not in {directory} (text_encoder/config.json "
                         "and text_encoder/model.safetensors or model.safetensors.index.json with its shards); "
                         f"{release.hint}")


def check_configs(directory: Path, arch: dict | None = None) -> None:
    """PixArt-alpha 512's architecture, schedule, autoencoder interface and T5 width on the config files alone."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel

    path = directory / "transformer" / "config.json"
    raw = read_config(path, f"{TITLE} transformer")
    check_transformer_class(path, raw, TRANSFORMER_CLASSES, TITLE)
    arch = TRANSFORMER_ARCH if arch is None else arch
    check_keys(path, raw, arch, "transformer", RELEASE)
    check_keys(path, {**constructor_defaults(PixArtTransformer2DModel), **raw}, TRANSFORMER_LATER_KEYS,
               "transformer", RELEASE, optional=True)
    path = directory / "scheduler" / "scheduler_config.json"
    check_keys(path, {"trained_betas": None, "prediction_type": "epsilon", **read_config(path, "scheduler")},
               SCHEDULER_CONFIG, "noise schedule", RELEASE)
    path = directory / "vae" / "config.json"
    check_keys(path, {**constructor_defaults(AutoencoderKL), **read_config(path, "autoencoder")}, VAE_INTERFACE,
               "autoencoder", RELEASE, optional=True)
    path = directory / "text_encoder" / "config.json"
    check_keys(path, read_config(path, "text encoder"), {"d_model": arch["caption_channels"]}, "T5 text encoder",
               RELEASE)


def load(checkpoint: str | Path | None = None) -> ZooModel:
    """The zoo entry (module docstring): transformer, autoencoder and T5 encoder in fp32, eval mode, no gradients,
    on the CPU."""
    require_transformers(NAME)
    directory, source = locate(RELEASE, checkpoint)
    check_text_encoder(directory)
    files = find_shards(directory, find_files(directory, RELEASE), RELEASE)
    check_configs(directory)
    loaded = load_safe_parts(directory, files, TITLE, PARTS)
    prompts_path = prompt_file(None if source["source"] == "hub" else directory)
    prompts = read_prompts(prompts_path)
    transformer = loaded["transformer"]
    conditioning = PixArtConditioning(loaded["tokenizer"], loaded["text_encoder"], prompts)
    info = {**source, "directory": str(directory),
            "files": {name: sha256_file(directory / name) for name in files},
            "latent_scale": float(loaded["vae"].config.scaling_factor),
            "prompts": prompts_info(prompts_path, prompts)}
    return assemble(NAME, transformer, loaded["vae"], conditioning, schedule(), info, loaded["text_encoder"])


ENTRY = register_model(ZooEntry(
    name=NAME, load=load, train_timesteps=NUM_TRAIN_TIMESTEPS, output_size=OUTPUT_SHAPE[1:],
    description=f"PixArt-alpha XL/2 512x512 text-to-image, T5 XXL text encoder, guidance {GUIDANCE_SCALE} (learned "
                f"variance split off; optional extra: pip install 'modiff-bench[sd]'): {HUB_ID} from the local "
                "Hugging Face cache or a diffusers directory",
    reference=ReferenceData(),  # no default: an image folder or a reference batch when given
    family="transformer",
))


# ------------------------------------------------------------------------------------------ random weights, for speed


def load_random(checkpoint: str | Path | None = None) -> ZooModel:
    """PixArt-alpha 512's exact transformer (:data:`TRANSFORMER_ARCH` over the class's defaults) and autoencoder
    with weights from diffusers' initialisation under seed 0, random prompt embeddings and no text encoder (module
    docstring): nothing is read, for measuring speed and memory."""
    from diffusers import PixArtTransformer2DModel

    if checkpoint is not None:
        raise BenchError(f"{RANDOM_NAME} takes no checkpoint (its weights are random, seed {RANDOM_SEED}); "
                         f"use {NAME} for real weights")
    arch = {k: v for k, v in TRANSFORMER_LATER_KEYS.items() if not isinstance(v, tuple)}
    torch.manual_seed(RANDOM_SEED)
    transformer = PixArtTransformer2DModel(**{**arch, **copy.deepcopy(TRANSFORMER_ARCH)})
    transformer = transformer.eval().requires_grad_(False)
    prompts_path = prompt_file(None)
    prompts = read_prompts(prompts_path)
    conditioning = RandomConditioning(prompts, width=int(transformer.config.caption_channels))
    info = {"source": "random", "seed": RANDOM_SEED, "architecture": NAME, "latent_scale": LATENT_SCALE,
            "prompts": prompts_info(prompts_path, prompts), "text_encoder": "none: seeded random embeddings"}
    return assemble(RANDOM_NAME, transformer, random_vae(), conditioning, schedule(), info, None)


RANDOM_ENTRY = register_model(ZooEntry(
    name=RANDOM_NAME, load=load_random, train_timesteps=NUM_TRAIN_TIMESTEPS, output_size=OUTPUT_SHAPE[1:],
    description=f"the {NAME} architecture (transformer and autoencoder, random prompt embeddings instead of T5) with "
                "seeded random weights (no download): speed and memory only",
    reference=ReferenceData(None, "none: random weights"),
    family="transformer",
))
