"""Stable Diffusion XL base 1.0 (``stabilityai/stable-diffusion-xl-base-1.0``), and SDXL's conditioning.

Setting: 1024x1024 images (128x128x4 latents), classifier-free guidance 5.0 (the default of diffusers'
``StableDiffusionXLPipeline``; SDXL has no paper setting for this suite to follow), the scaled-linear schedule of SD
(beta 0.00085 to 0.012, T = 1000). Only the UNet is quantized; the autoencoder and both text encoders stay in full
precision (``ZooModel.parts``).

Sampler: the matrix chooses; the default is ``ddim-ldm`` with 50 steps. diffusers samples SDXL with
``EulerDiscreteScheduler`` (``timestep_spacing="leading"``, ``steps_offset=1``): Euler's method on the probability-flow
ODE in diffusers' sigma parametrisation is DDIM at eta = 0, and that grid (``range(0, T, T // steps) + 1``) is
``ddim-ldm``'s. The two differ in the last step only: Euler goes to sigma = 0, ``ddim-ldm`` to ``alphas_cumprod[0]``.
PTQD's correction is defined for DDIM updates, so the default runs it too.

What the UNet gets (diffusers' ``encode_prompt`` and ``_get_add_time_ids``, read and written again here)
    - ``encoder_hidden_states`` ``(77, 2048)`` per row: the penultimate hidden states (``hidden_states[-2]``, before
      the final layer norm) of CLIP ViT-L (``text_encoder``, 768 wide) and of OpenCLIP bigG (``text_encoder_2``,
      1280 wide), concatenated along the width, each on its own tokenizer's ids padded to 77 tokens;
    - ``added_cond_kwargs["text_embeds"]`` ``(1280,)``: ``text_encoder_2``'s projected pooled output
      (``CLIPTextModelWithProjection.text_embeds``);
    - ``added_cond_kwargs["time_ids"]``: ``(original_size, crop_coords_top_left, target_size)`` =
      ``(1024, 1024, 0, 0, 1024, 1024)``, the same for both halves of guidance.
    The unconditional half is all zeros (context and pooled embedding): SDXL base's ``force_zeros_for_empty_prompt``
    is true, so diffusers zeroes it when no negative prompt is given, its default. As for SD v1.4
    (``bench.zoo.sd``), guidance is one UNet call on ``cat([x, x])`` with the unconditional rows first, and the prompt
    of seed ``s`` is ``prompts[s % len(prompts)]`` (``<checkpoint>/prompts.txt``, else the packaged list).

Autoencoder: SDXL's, latents divided by its ``scaling_factor`` 0.13025 before decoding, in float32: it overflows in
float16 (diffusers' ``force_upcast``), and the zoo never casts it (a matrix's ``dtype`` axis casts the UNet only).

What ``load(checkpoint)`` accepts
    - ``None`` or ``"stabilityai/stable-diffusion-xl-base-1.0"``: that repository in the local Hugging Face cache,
      read only (nothing is downloaded: the fp32 UNet alone is 10 GB), restricted to :data:`HUB_PATTERNS`;
    - a directory in that repository's diffusers layout (``hf download ... --local-dir DIR``).
    The configs must be SDXL base's architecture (:data:`ARCHITECTURE`, checked before any weight is read: UNet, both
    text encoders, the autoencoder's interface and the noise schedule); weights load safely and strictly as for the
    other entries (safetensors, or a ``.bin`` that ``torch.load(weights_only=True)`` accepts; a missing, unexpected
    or misshapen tensor is an error); ``info["files"]`` records the SHA-256 of every file read.

The generic entry ``diffusers:<directory>`` (``bench.zoo.generic``) reads other SDXL-architecture pipelines with this
module's :class:`SDXLConditioning`, at their own sizes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..provenance import sha256_file
from .checkpoints import constructor_defaults, read_config
from .model import ZooModel
from .registry import ReferenceData, ZooEntry, register_model
from .sd import (
    NUM_TRAIN_TIMESTEPS,
    SCHEDULER_CONFIG,
    TEXT_PARTS,
    TEXT_TOKENS,
    PromptConditioning,
    Release,
    check_keys,
    check_tokenizer,
    check_unet_class,
    decode_latents,
    find_files,
    layout_of,
    load_parts,
    locate,
    prompt_file,
    prompts_info,
    read_prompts,
    require_transformers,
    schedule,
    text_config,
)

NAME = "sdxl-base-1.0"
TITLE = "Stable Diffusion XL base 1.0"
HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
GUIDANCE_SCALE = 5.0  # diffusers' StableDiffusionXLPipeline default
LATENT_SCALE = 0.13025  # SDXL's AutoencoderKL scaling_factor
SIZE = 1024
TIME_IDS = (SIZE, SIZE, 0, 0, SIZE, SIZE)  # original_size, crop_coords_top_left, target_size
IMAGE_SHAPE = (4, SIZE // 8, SIZE // 8)  # latents
OUTPUT_SHAPE = (3, SIZE, SIZE)
# MoDiff keeps â and ô per wrapped layer and (doubled) sample: SD v1.4 measured ~5.5 GB per image at 64x64 latents;
# SDXL's 128x128 latents hold about 4x the activations per level (an estimate, not measured): ~20 GB per image.
DEFAULT_BATCH_SIZE = 1

HUB_PATTERNS = ("model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*",
                "tokenizer_2/*", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors", "text_encoder_2/model.safetensors")


# The parts loaded, beside SD's: OpenCLIP bigG with its text projection, and its tokenizer
PARTS: dict[str, tuple[str, str, str]] = {
    **TEXT_PARTS,
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", "second text encoder"),
    "tokenizer_2": ("transformers", "CLIPTokenizer", "second tokenizer"),
}
RELEASE = Release(TITLE, HUB_ID, HUB_PATTERNS, layout_of(PARTS), download=False, optional_files=(
    "model_index.json", "tokenizer/special_tokens_map.json", "tokenizer_2/special_tokens_map.json"))


@dataclass(frozen=True)
class Architecture:
    """What the configs of an SDXL base checkpoint must say (checked before any weight is read). ``unet``: keys
    every SDXL ``unet/config.json`` holds; ``unet_later``: keys later diffusers releases added, checked over the
    installed class's defaults; ``text_encoder`` / ``text_encoder_2``: keys of the text towers' configs."""

    unet: dict
    unet_later: dict
    text_encoder: dict
    text_encoder_2: dict


# Source: unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 (written by diffusers 0.19.0.dev0): three
# levels (no attention at the first, 2 and 10 transformer layers at the others), 2048-wide cross-attention (768 +
# 1280), the text_time addition embedding of 1280 (pooled) + 6 x 256 (time ids) = 2816 inputs. 2,567,463,684
# parameters. "attention_head_dim" [5, 10, 20] is diffusers' historical name for the number of HEADS (of 64 channels).
UNET_ARCH: dict = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# The other keys of that file, at its values (a key the installed diffusers does not know is not checked)
UNET_LATER_KEYS: dict = {
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "num_attention_heads": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "mid_block_only_cross_attention": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
    "upcast_attention": (None, False),  # null in the hub's file, False in diffusers' default
}
# Source: text_encoder/config.json (CLIP ViT-L/14's text tower, CLIPTextModel) and text_encoder_2/config.json
# (OpenCLIP ViT-bigG/14's, CLIPTextModelWithProjection) of the same repository
ARCHITECTURE = Architecture(
    unet=UNET_ARCH, unet_later=UNET_LATER_KEYS,
    text_encoder={"hidden_size": 768, "num_hidden_layers": 12, "max_position_embeddings": TEXT_TOKENS},
    text_encoder_2={"hidden_size": 1280, "num_hidden_layers": 32, "projection_dim": 1280,
                    "max_position_embeddings": TEXT_TOKENS},
)
# Source: vae/config.json of that repository: SD's autoencoder interface at SDXL's scale factor
VAE_INTERFACE: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": LATENT_SCALE,
}


def time_ids(height: int, width: int) -> tuple[int, ...]:
    """SDXL's micro-conditioning for an uncropped ``height x width`` image: ``(original_size, crop_coords_top_left,
    target_size)`` as diffusers' pipeline gives them by default."""
    return (height, width, 0, 0, height, width)


class SDXLConditioning(PromptConditioning):
    """SDXL's prompt conditioning (module docstring): two text encoders, the pooled embedding and the time ids.

    ``embed(prompt)`` is the ``(77, 2048)`` context; ``pooled(prompt)`` the ``(1280,)`` projected pooled output of
    the second encoder; both computed once per distinct prompt and kept on the CPU. ``unet_kwargs(batch)`` adds
    ``added_cond_kwargs`` (``text_embeds`` and ``time_ids``, one row per row of the doubled batch) to the context.
    ``zero_uncond``: the unconditional rows are zeros (``force_zeros_for_empty_prompt``), else the embeddings of
    ``negative_prompt`` (the empty string)."""

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[nn.Module], prompts: Sequence[str],
                 guidance_scale: float = GUIDANCE_SCALE, time_ids: Sequence[int] = TIME_IDS, zero_uncond: bool = True):
        (tokenizer, self.tokenizer_2), (text_encoder, self.text_encoder_2) = tokenizers, text_encoders
        super().__init__(tokenizer, text_encoder, prompts, guidance_scale)
        self.time_ids = tuple(int(v) for v in time_ids)
        self.zero_uncond = bool(zero_uncond)
        self.pooled_embeddings: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, prompt: str) -> torch.Tensor:
        if prompt not in self.embeddings:
            hidden = []
            for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                ids = self.token_ids(tokenizer, prompt).to(next(encoder.parameters()).device)
                out = encoder(input_ids=ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2][0].float().cpu())  # penultimate layer, no final layer norm
            self.pooled_embeddings[prompt] = out.text_embeds[0].float().cpu()  # the second encoder's projection
            self.embeddings[prompt] = torch.cat(hidden, dim=-1)
        return self.embeddings[prompt]

    def pooled(self, prompt: str) -> torch.Tensor:
        self.embed(prompt)
        return self.pooled_embeddings[prompt]

    def batch_kwargs(self, prompts: Sequence[str]) -> dict:
        context, pooled = self.embed(self.negative_prompt), self.pooled(self.negative_prompt)
        if self.zero_uncond:
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        n = len(prompts)
        ids = torch.tensor(self.time_ids, dtype=torch.float32)
        return {
            "encoder_hidden_states": torch.stack([context] * n + [self.embed(p) for p in prompts])
            if n else context.new_empty((0, *context.shape)),
            "added_cond_kwargs": {
                "text_embeds": torch.stack([pooled] * n + [self.pooled(p) for p in prompts])
                if n else pooled.new_empty((0, *pooled.shape)),
                "time_ids": ids.repeat(2 * n, 1),
            },
        }


# ---------------------------------------------------------------------------------------------------------- loading


def check_configs(directory: Path, architecture: Architecture | None = None) -> None:
    """SDXL base's architecture on the config files alone, before any weight is read."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    arch = ARCHITECTURE if architecture is None else architecture
    path = directory / "unet" / "config.json"
    raw = read_config(path, f"{TITLE} UNet")
    check_unet_class(path, raw, TITLE)
    check_keys(path, raw, arch.unet, "UNet", RELEASE)  # the original file has every one of these keys
    check_keys(path, {**constructor_defaults(UNet2DConditionModel), **raw}, arch.unet_later, "UNet", RELEASE,
               optional=True)

    path = directory / "scheduler" / "scheduler_config.json"
    check_keys(path, {"trained_betas": None, "prediction_type": "epsilon", **read_config(path, "scheduler")},
               {**SCHEDULER_CONFIG, "prediction_type": "epsilon"}, "noise schedule", RELEASE)

    path = directory / "vae" / "config.json"
    check_keys(path, {**constructor_defaults(AutoencoderKL), **read_config(path, "autoencoder")}, VAE_INTERFACE,
               "autoencoder", RELEASE, optional=True)

    for part in ("text_encoder", "text_encoder_2"):
        path = directory / part / "config.json"
        check_keys(path, text_config(path), getattr(arch, part), part.replace("_", " "), RELEASE)


def load(checkpoint: str | Path | None = None) -> ZooModel:
    """The zoo entry (module docstring): UNet, VAE and both text encoders in fp32, eval mode, no gradients, on the
    CPU."""
    require_transformers(NAME)
    directory, source = locate(RELEASE, checkpoint)
    files = find_files(directory, RELEASE)
    check_configs(directory)
    parts = load_parts(directory, files, TITLE, PARTS)
    for name in ("tokenizer", "tokenizer_2"):
        check_tokenizer(parts[name], directory / name)
    prompts_path = prompt_file(None if source["source"] == "hub" else directory)
    prompts = read_prompts(prompts_path)
    conditioning = SDXLConditioning((parts["tokenizer"], parts["tokenizer_2"]),
                                    (parts["text_encoder"], parts["text_encoder_2"]), prompts)
    info = {
        **source,
        "directory": str(directory),
        "files": {name: sha256_file(directory / name) for name in files},
        **conditioning_info(conditioning),
        "latent_scale": LATENT_SCALE,
        "prompts": prompts_info(prompts_path, prompts),
    }
    return ZooModel(
        name=NAME, unet=parts["unet"], schedule=schedule(), image_shape=IMAGE_SHAPE, default_sampler="ddim-ldm",
        default_steps=50, info=info, make_denoiser=conditioning.denoiser,
        decoder=functools.partial(decode_latents, parts["vae"]), start_batch=conditioning.start_batch,
        output_shape=OUTPUT_SHAPE, default_eta=0.0, default_batch_size=DEFAULT_BATCH_SIZE,
        parts={k: parts[k] for k in ("vae", "text_encoder", "text_encoder_2")},
    )


def conditioning_info(conditioning: SDXLConditioning) -> dict:
    """What ``info`` records of SDXL's conditioning."""
    return {
        "guidance_scale": conditioning.guidance_scale,
        "negative_prompt": "zeros (force_zeros_for_empty_prompt)" if conditioning.zero_uncond
        else conditioning.negative_prompt,
        "guidance": "one UNet call on cat([x, x]) with cat([uncond, cond]) embeddings and added_cond_kwargs",
        "text_embeddings": "cat(text_encoder.hidden_states[-2], text_encoder_2.hidden_states[-2]); pooled: "
                           "text_encoder_2.text_embeds",
        "time_ids": list(conditioning.time_ids),
    }


ENTRY = register_model(ZooEntry(
    name=NAME, load=load, train_timesteps=NUM_TRAIN_TIMESTEPS, output_size=OUTPUT_SHAPE[1:],
    description=f"Stable Diffusion XL base 1.0 1024x1024, guidance {GUIDANCE_SCALE} (optional extra: pip install "
                f"'modiff-bench[sd]'): {HUB_ID} from the local Hugging Face cache or a diffusers directory",
    reference=ReferenceData(),  # no default: an image folder or a reference batch when given
))
