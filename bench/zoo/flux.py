"""FLUX.1 [schnell] and FLUX.1 [dev] (``black-forest-labs/FLUX.1-schnell``, ``black-forest-labs/FLUX.1-dev``),
flow-matching models, as diffusers' ``FluxPipeline`` samples them.

Setting: 1024x1024 images; the sampler works on the 16x128x128 latents (what the pipeline draws its noise as) and the
denoiser packs them into 2x2 patches for the transformer (``FluxPipeline._pack_latents``: 4096 tokens of 64 channels)
and unpacks its output (``_unpack_latents``); packing is a permutation, so Euler steps on either layout agree. The
transformer (``FluxTransformer2DModel``, 12 B parameters) is what quantization applies to (``ZooModel.unet``); the
autoencoder and both text encoders stay in full precision.
    - ``flux-1-schnell``: 4 steps of ``flow-euler``, no guidance (no classifier-free guidance, ``guidance_embeds``
      false), static shift 1.0;
    - ``flux-1-dev``: 28 steps, guidance distilled into the model: the guidance embedding gets 3.5 (the pipeline's
      ``guidance_scale`` default) and the batch is not doubled; dynamic shifting with ``mu`` from the packed sequence
      length (``FlowSchedule.mu(4096)`` = 1.15 at 1024x1024, the pipeline's ``calculate_shift``).
    Both sample on FLUX's sigmas, ``linspace(1, 1/steps, steps)`` shifted (spacing ``"flux"``). The transformer is
    called as the pipeline calls it: ``timestep = t / 1000`` (the float time ``sigma * 1000`` the samplers give),
    ``img_ids`` (row and column of each 2x2 patch, ``_prepare_latent_image_ids``) and ``txt_ids`` (zeros).

What the transformer gets from a prompt (``FluxPipeline.encode_prompt``): ``pooled_projections`` ``(768,)``, CLIP
ViT-L's pooled output (``pooler_output``, ids padded to 77 tokens), and ``encoder_hidden_states`` ``(512, 4096)``,
T5 v1.1 XXL's last hidden state on ids padded to 512 tokens (the pipeline's ``max_sequence_length``). The prompt of
seed ``s`` is ``prompts[s % len(prompts)]``. Decoding: ``latents / 0.3611 + 0.1159`` through FLUX's autoencoder.

Loading is SD3's (``bench.zoo.sd3``): the local Hugging Face cache or a diffusers directory, every part required,
configs checked before any weight is read, safetensors only (sharded or not), strict. ``*-random``: the transformer
architecture with seeded random weights, a random autoencoder and random text embeddings, for ``--estimate``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from modiff.flow import FlowGrid, FlowSchedule

from ..errors import BenchError
from ..provenance import sha256_file
from .model import ZooModel, mark_flow_model
from .registry import ReferenceData, ZooEntry, register_model
from .sd import Release, check_tokenizer, locate, prompt_file, prompts_info, read_prompts, require_transformers
from .sd3 import (
    CLIP_TOKENS,
    HUB_PATTERNS,
    LATENT_CHANNELS,
    NUM_TRAIN_TIMESTEPS,
    RANDOM_SEED,
    VAE_CONFIG,
    Architecture,
    Encode,
    FlowConditioning,
    check_architecture,
    decode_flow_latents,
    find_flow_files,
    flow_grid,
    flow_layout,
    load_flow_parts,
    random_encoder,
    random_module,
    token_ids,
)

T5_TOKENS = 512  # FluxPipeline's max_sequence_length default
SIZE = 1024
IMAGE_SHAPE = (LATENT_CHANNELS, SIZE // 8, SIZE // 8)  # the unpacked latents the sampler works on
OUTPUT_SHAPE = (3, SIZE, SIZE)
DEFAULT_BATCH_SIZE = 1
PARTS: dict[str, tuple[str, str, str]] = {
    "transformer": ("diffusers", "FluxTransformer2DModel", "transformer"),
    "vae": ("diffusers", "AutoencoderKL", "autoencoder"),
    "text_encoder": ("transformers", "CLIPTextModel", "CLIP-L text encoder"),
    "text_encoder_2": ("transformers", "T5EncoderModel", "T5 text encoder"),
    "tokenizer": ("transformers", "CLIPTokenizer", "CLIP-L tokenizer"),
    "tokenizer_2": ("transformers", "T5TokenizerFast", "T5 tokenizer"),
}
# Source: transformer/config.json of black-forest-labs/FLUX.1-schnell and FLUX.1-dev: 19 double-stream and 38
# single-stream blocks, 24 heads of 128 (3072 wide), 64-channel tokens (2x2 patches of 16 latent channels), 4096-wide
# T5 context, 768-wide pooled CLIP; dev adds the guidance embedding.
TRANSFORMER_ARCH: dict = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
TEXT_ENCODERS = {"text_encoder": {"hidden_size": 768, "num_hidden_layers": 12, "max_position_embeddings": CLIP_TOKENS},
                 "text_encoder_2": {"d_model": 4096, "num_layers": 24}}
VAE_ARCH = {"latent_channels": LATENT_CHANNELS, "scaling_factor": 0.3611, "shift_factor": 0.1159}
FLUX_VAE_CONFIG = {**VAE_CONFIG, **VAE_ARCH}
# Source: scheduler/scheduler_config.json of each repository
SCHNELL_SCHEDULER = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "shift": 1.0, "use_dynamic_shifting": False}
DEV_SCHEDULER = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "shift": 3.0, "use_dynamic_shifting": True,
                 "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def _architecture(guidance_embeds: bool, scheduler: dict) -> Architecture:
    return Architecture(transformer={**TRANSFORMER_ARCH, "guidance_embeds": guidance_embeds},
                        text_encoder=TEXT_ENCODERS["text_encoder"], text_encoder_2=TEXT_ENCODERS["text_encoder_2"],
                        text_encoder_3={}, scheduler=scheduler, vae=VAE_ARCH)


class Variant:
    """One FLUX.1 release: its name, hub id, steps, guidance (None: no guidance embedding) and architecture."""

    def __init__(self, name: str, title: str, hub_id: str, steps: int, guidance: float | None,
                 architecture: Architecture):
        self.name, self.title, self.hub_id, self.steps, self.guidance = name, title, hub_id, steps, guidance
        self.architecture = architecture
        self.release = Release(title, hub_id, HUB_PATTERNS, flow_layout(PARTS), download=False,
                               optional_files=("model_index.json",))


SCHNELL = Variant("flux-1-schnell", "FLUX.1 [schnell]", "black-forest-labs/FLUX.1-schnell", 4, None,
                  _architecture(False, SCHNELL_SCHEDULER))
DEV = Variant("flux-1-dev", "FLUX.1 [dev]", "black-forest-labs/FLUX.1-dev", 28, 3.5, _architecture(True, DEV_SCHEDULER))


def pack(x: torch.Tensor) -> torch.Tensor:
    """``FluxPipeline._pack_latents``: (B, C, H, W) -> (B, H/2 * W/2, 4C)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``FluxPipeline._unpack_latents`` for latents of ``height x width``: (B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    b, _, channels = x.shape
    return x.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5) \
        .reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int) -> torch.Tensor:
    """``FluxPipeline._prepare_latent_image_ids`` of ``height x width`` latents: (H/2 * W/2, 3), (0, row, col)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


class FluxConditioning(FlowConditioning):
    """FLUX's conditioning: no doubled batch; ``guidance`` (dev) goes to the guidance embedding. ``velocity`` packs
    the latents, calls the transformer as ``FluxPipeline`` does and unpacks its output."""

    def __init__(self, encode: Encode, prompts: Sequence[str], guidance: float | None, device=None):
        super().__init__(encode, prompts, None, device=device)
        self.guidance = None if guidance is None else float(guidance)

    def velocity(self, transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> torch.Tensor:
        _, _, height, width = x.shape
        context = kwargs["encoder_hidden_states"]
        guidance = None if self.guidance is None else torch.full((x.shape[0],), self.guidance, device=x.device,
                                                                 dtype=torch.float32)
        out = transformer(hidden_states=pack(x), timestep=t / 1000, guidance=guidance,
                          pooled_projections=kwargs["pooled_projections"], encoder_hidden_states=context,
                          txt_ids=torch.zeros(context.shape[1], 3, device=x.device, dtype=x.dtype),
                          img_ids=latent_image_ids(height, width).to(x.device, x.dtype), return_dict=False)[0]
        return unpack(out, height, width)


def flux_encoder(tokenizers: Sequence, text_encoders: Sequence[nn.Module], t5_tokens: int = T5_TOKENS) -> Encode:
    """``FluxPipeline.encode_prompt`` for one prompt (module docstring)."""
    (tok_clip, tok_t5), (clip, t5) = tokenizers, text_encoders

    @torch.no_grad()
    def encode(prompt: str) -> dict:
        ids = token_ids(tok_clip, prompt, CLIP_TOKENS).to(next(clip.parameters()).device)
        pooled = clip(ids, output_hidden_states=False).pooler_output[0].float().cpu()
        ids = token_ids(tok_t5, prompt, t5_tokens).to(next(t5.parameters()).device)
        return {"encoder_hidden_states": t5(ids, output_hidden_states=False)[0][0].float().cpu(),
                "pooled_projections": pooled}

    return encode


def load_variant(variant: Variant, checkpoint: str | Path | None = None, architecture: Architecture | None = None,
                 size: int = SIZE) -> ZooModel:
    """A FLUX.1 entry (module docstring) from the local cache or a directory; ``architecture``: what the configs must
    say (default: the release's); ``size``: the images' height and width in pixels (the pipeline's default, 1024)."""
    arch = variant.architecture if architecture is None else architecture
    require_transformers(variant.name)
    directory, source = locate(variant.release, checkpoint)
    files = find_flow_files(directory, variant.release)
    check_architecture(directory, arch, variant.release, "FluxTransformer2DModel", ("text_encoder", "text_encoder_2"))
    parts = load_flow_parts(directory, files, variant.title, PARTS)
    check_tokenizer(parts["tokenizer"], directory / "tokenizer", CLIP_TOKENS)
    vae, transformer = parts["vae"], parts["transformer"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    height = width = 2 * (size // (factor * 2))  # as _unpack_latents rounds
    grid = flow_grid(directory, variant.release, arch.scheduler, "flux", (height // 2) * (width // 2))
    prompts_path = prompt_file(None if source["source"] == "hub" else directory)
    prompts = read_prompts(prompts_path)
    encoders = (parts["text_encoder"], parts["text_encoder_2"])
    encode = flux_encoder((parts["tokenizer"], parts["tokenizer_2"]), encoders)
    guidance = variant.guidance if transformer.config.guidance_embeds else None
    conditioning = FluxConditioning(encode, prompts, guidance, device=lambda: next(encoders[0].parameters()).device)
    info = {
        **source,
        "directory": str(directory),
        "files": {name: sha256_file(directory / name) for name in files},
        "guidance": "none (no guidance embedding)" if guidance is None
        else f"guidance embedding {guidance} (guidance-distilled; the batch is not doubled)",
        "text_embeddings": f"clip.pooler_output; t5 last hidden state at {T5_TOKENS} tokens",
        "flow": {"shift": grid.schedule.shift, "spacing": grid.spacing, "mu": grid.mu,
                 "image_seq_len": (height // 2) * (width // 2)},
        "prompts": prompts_info(prompts_path, prompts),
    }
    return ZooModel(
        name=variant.name, unet=transformer, schedule=grid,
        image_shape=(int(vae.config.latent_channels), height, width),
        default_sampler="flow-euler", default_steps=variant.steps, info=info, make_denoiser=conditioning.denoiser,
        decoder=functools.partial(decode_flow_latents, vae), start_batch=conditioning.start_batch,
        output_shape=(3, size, size), default_eta=0.0, default_batch_size=DEFAULT_BATCH_SIZE,
        parts={k: parts[k] for k in ("vae", "text_encoder", "text_encoder_2")},
    )


def load_random_variant(variant: Variant, checkpoint: str | Path | None = None) -> ZooModel:
    """``variant``'s transformer architecture with seeded random weights, a random FLUX autoencoder and random text
    embeddings; nothing is read or downloaded."""
    name = f"{variant.name}-random"
    if checkpoint is not None:
        raise BenchError(f"{name} takes no checkpoint (its weights are random, seed {RANDOM_SEED}); use "
                         f"{variant.name} for the real weights")
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    arch = variant.architecture
    config = {**arch.transformer, "axes_dims_rope": tuple(arch.transformer["axes_dims_rope"])}
    transformer = random_module(FluxTransformer2DModel, config)
    vae = random_module(AutoencoderKL, FLUX_VAE_CONFIG, RANDOM_SEED + 1)
    encode = random_encoder({"encoder_hidden_states": (T5_TOKENS, config["joint_attention_dim"]),
                             "pooled_projections": (config["pooled_projection_dim"],)})
    conditioning = FluxConditioning(encode, ["a random prompt"], variant.guidance,
                                    device=lambda: next(transformer.parameters()).device)
    schedule = FlowSchedule(**arch.scheduler)
    height, width = IMAGE_SHAPE[1:]
    grid = FlowGrid(schedule, "flux", schedule.mu((height // 2) * (width // 2)) if schedule.use_dynamic_shifting
                    else None)
    return ZooModel(
        name=name, unet=transformer, schedule=grid, image_shape=IMAGE_SHAPE, default_sampler="flow-euler",
        default_steps=variant.steps, info={"source": "random", "seed": RANDOM_SEED, "architecture": variant.name},
        make_denoiser=conditioning.denoiser, decoder=functools.partial(decode_flow_latents, vae),
        start_batch=conditioning.start_batch, output_shape=OUTPUT_SHAPE, default_eta=0.0,
        default_batch_size=DEFAULT_BATCH_SIZE, parts={"vae": vae},
    )


def load_schnell(checkpoint: str | Path | None = None) -> ZooModel:
    return load_variant(SCHNELL, checkpoint)


def load_dev(checkpoint: str | Path | None = None) -> ZooModel:
    return load_variant(DEV, checkpoint)


def load_schnell_random(checkpoint: str | Path | None = None) -> ZooModel:
    return load_random_variant(SCHNELL, checkpoint)


def load_dev_random(checkpoint: str | Path | None = None) -> ZooModel:
    return load_random_variant(DEV, checkpoint)


for _variant, _load, _load_random in ((SCHNELL, load_schnell, load_schnell_random), (DEV, load_dev, load_dev_random)):
    _how = "no guidance" if _variant.guidance is None else f"guidance embedding {_variant.guidance}"
    register_model(ZooEntry(
        name=_variant.name, load=_load, train_timesteps=NUM_TRAIN_TIMESTEPS, output_size=OUTPUT_SHAPE[1:],
        description=f"{_variant.title} 1024x1024 (flow matching: flow-euler / flow-heun), {_how}, {_variant.steps} "
                    f"steps (optional extra: pip install 'modiff-bench[sd]'): {_variant.hub_id} from the local Hugging "
                    "Face cache or a diffusers directory",
        reference=ReferenceData(),
        family="transformer",
    ))
    register_model(ZooEntry(
        name=f"{_variant.name}-random", load=_load_random, train_timesteps=NUM_TRAIN_TIMESTEPS,
        output_size=OUTPUT_SHAPE[1:],
        description=f"the {_variant.name} architecture with seeded random weights and text embeddings (no download): "
                    "speed and memory only",
        reference=ReferenceData(None, "none: random weights"),
        family="transformer",
    ))
    mark_flow_model(_variant.name)
    mark_flow_model(f"{_variant.name}-random")
