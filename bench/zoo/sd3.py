"""Stable Diffusion 3 Medium (``stabilityai/stable-diffusion-3-medium-diffusers``), a flow-matching model, and what
the flow-matching entries share (``bench.zoo.flux`` builds on this module).

Setting: 1024x1024 images (16x128x128 latents), classifier-free guidance 7.0 and 28 steps of ``flow-euler`` (the
defaults of diffusers' ``StableDiffusion3Pipeline``), the scheduler's flow-matching schedule (``scheduler_config.json``,
``FlowMatchEulerDiscreteScheduler`` with static shift 3.0; ``modiff.flow.FlowSchedule``) on the scheduler's own grid
(spacing ``"scheduler"``: what ``set_timesteps`` gives). The model is ``SD3Transformer2DModel`` (MMDiT, 2 B
parameters), the network quantization applies to (``ZooModel.unet``); the autoencoder and the three text encoders
stay in full precision (``ZooModel.parts``). Its ``denoiser`` is the velocity ``(x_t, t) -> v`` at the float time
``t = sigma * 1000``, so the matrix samples it with ``flow-euler`` or ``flow-heun`` only.

What the transformer gets (diffusers' ``encode_prompt``, read and written again here)
    - ``encoder_hidden_states`` ``(77 + 256, 4096)`` per row: the penultimate hidden states of CLIP ViT-L
      (``text_encoder``, 768 wide) and OpenCLIP bigG (``text_encoder_2``, 1280 wide), concatenated along the width
      and zero-padded to T5's 4096, then, along the tokens, T5 v1.1 XXL's last hidden state (``text_encoder_3``) on
      its ids padded to 256 tokens (the pipeline's ``max_sequence_length``);
    - ``pooled_projections`` ``(2048,)``: both CLIP towers' projected pooled outputs (``text_embeds``), concatenated.
    The unconditional half encodes the empty negative prompt the same way (SD3 has no zeroed negative). Guidance is
    one transformer call on ``cat([x, x])``, the unconditional rows first, as the pipeline does; the prompt of seed
    ``s`` is ``prompts[s % len(prompts)]`` (``<checkpoint>/prompts.txt``, else the packaged list).

Autoencoder: SD3's 16-channel ``AutoencoderKL``; latents become ``latents / scaling_factor + shift_factor`` (1.5305,
0.0609) before decoding, in float32.

What ``load(checkpoint)`` accepts
    - ``None`` or the hub id: that repository in the local Hugging Face cache, read only (nothing is downloaded);
    - a directory in its diffusers layout (``hf download ... --local-dir DIR``).
    Every part must be there, the three text encoders too (a missing one is a one-line error). The configs must be
    SD3 Medium's architecture (checked before any weight is read); weights load from safetensors only (single files
    or ``*.safetensors.index.json`` with their shards; a ``.bin`` is never read), strictly (a missing, unexpected or
    misshapen tensor is an error); ``info["files"]`` records the SHA-256 of every file read.

``sd3-medium-random``: the same transformer architecture with seeded random weights, a random autoencoder of SD3's
shape and random text embeddings of the right shapes, built without any download: for ``--estimate`` (speed and
memory only).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from modiff.flow import FlowGrid, FlowSchedule

from ..errors import BenchError
from ..provenance import sha256_file
from .checkpoints import first_line, read_config
from .model import ZooModel, mark_flow_model
from .registry import ReferenceData, ZooEntry, register_model
from .sd import (
    Release,
    check_keys,
    check_tokenizer,
    from_pretrained,
    locate,
    prompt_file,
    prompts_info,
    read_prompts,
    require_transformers,
    to_device,
)

NAME = "sd3-medium"
RANDOM_NAME = "sd3-medium-random"
TITLE = "Stable Diffusion 3 Medium"
HUB_ID = "stabilityai/stable-diffusion-3-medium-diffusers"
GUIDANCE_SCALE = 7.0  # diffusers' StableDiffusion3Pipeline default
DEFAULT_STEPS = 28  # its num_inference_steps default
NUM_TRAIN_TIMESTEPS = 1000
CLIP_TOKENS = 77
T5_TOKENS = 256  # the pipeline's max_sequence_length default
SIZE = 1024
VAE_SCALE = 8
LATENT_CHANNELS = 16
IMAGE_SHAPE = (LATENT_CHANNELS, SIZE // VAE_SCALE, SIZE // VAE_SCALE)
OUTPUT_SHAPE = (3, SIZE, SIZE)
DEFAULT_BATCH_SIZE = 1
RANDOM_SEED = 0

# part -> (library, class, what messages call it); tokenizers are the parts without weights
PARTS: dict[str, tuple[str, str, str]] = {
    "transformer": ("diffusers", "SD3Transformer2DModel", "transformer"),
    "vae": ("diffusers", "AutoencoderKL", "autoencoder"),
    "text_encoder": ("transformers", "CLIPTextModelWithProjection", "CLIP-L text encoder"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", "CLIP-G text encoder"),
    "text_encoder_3": ("transformers", "T5EncoderModel", "T5 text encoder"),
    "tokenizer": ("transformers", "CLIPTokenizer", "CLIP-L tokenizer"),
    "tokenizer_2": ("transformers", "CLIPTokenizer", "CLIP-G tokenizer"),
    "tokenizer_3": ("transformers", "T5TokenizerFast", "T5 tokenizer"),
}
HUB_PATTERNS = ("model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*",
                "tokenizer_3/*", "*/*.safetensors", "*/*.safetensors.index.json")


def flow_layout(parts: dict[str, tuple[str, str, str]]) -> dict[str, tuple[tuple[str, ...], ...]]:
    """The files a flow pipeline directory needs for ``parts`` and its scheduler: each requirement -> alternatives
    (files that together satisfy it). Weights are safetensors only: one file, or an index whose shards
    (``find_flow_files``) must be there too."""
    layout: dict[str, tuple[tuple[str, ...], ...]] = {}
    for part, (library, class_name, _) in parts.items():
        if class_name.startswith("CLIPTokenizer"):
            layout[f"{part} config"] = ((f"{part}/tokenizer_config.json",),)
            layout[f"{part} vocabulary"] = ((f"{part}/vocab.json", f"{part}/merges.txt"), (f"{part}/tokenizer.json",))
            continue
        if class_name.startswith("T5Tokenizer"):
            layout[f"{part} config"] = ((f"{part}/tokenizer_config.json",),)
            layout[f"{part} vocabulary"] = ((f"{part}/tokenizer.json",), (f"{part}/spiece.model",))
            continue
        stem = "diffusion_pytorch_model" if library == "diffusers" else "model"
        layout[f"{part} config"] = ((f"{part}/config.json",),)
        layout[f"{part} weights"] = ((f"{part}/{stem}.safetensors",), (f"{part}/{stem}.safetensors.index.json",))
    layout["scheduler config"] = (("scheduler/scheduler_config.json",),)
    return layout


RELEASE = Release(TITLE, HUB_ID, HUB_PATTERNS, flow_layout(PARTS), download=False,
                  optional_files=("model_index.json",))


def find_flow_files(directory: Path, release: Release) -> list[str]:
    """The files of ``release.layout`` found in ``directory`` (first complete alternative of each requirement), with
    the shards every ``*.safetensors.index.json`` names, plus the optional files there; whatever is missing is one
    BenchError."""
    found, missing = [], []
    for what, alternatives in release.layout.items():
        chosen = next((alt for alt in alternatives if all((directory / f).is_file() for f in alt)), None)
        if chosen is None:
            missing.append(f"{what} ({' or '.join(' + '.join(alt) for alt in alternatives)})")
        else:
            found.extend(chosen)
    for index in [f for f in found if f.endswith(".safetensors.index.json")]:
        try:
            shards = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BenchError(f"cannot read the weight index {directory / index}: {first_line(exc)}") from None
        part = index.rsplit("/", 1)[0]
        for shard in shards:
            if not isinstance(shard, str) or "/" in shard or not shard.endswith(".safetensors"):
                raise BenchError(f"{directory / index} names a shard {shard!r} that is not a .safetensors file of "
                                 f"{part}/")
            if not (directory / part / shard).is_file():
                missing.append(f"{part} weights shard {part}/{shard}")
            found.append(f"{part}/{shard}")
    if missing:
        raise BenchError(f"{directory} is not a complete {release.title} checkpoint: missing {'; '.join(missing)}; "
                         f"{release.hint}")
    return found + [f for f in release.optional_files if (directory / f).is_file()]


def load_flow_parts(directory: Path, files: Sequence[str], title: str, parts: dict[str, tuple[str, str, str]]) -> dict:
    """Each of ``parts`` from ``directory/<part>``, offline, from safetensors only (``use_safetensors=True``) and
    strictly (``bench.zoo.sd.from_pretrained`` checks the loading report): models in float32, eval mode, without
    gradients; tokenizers as they are."""
    import importlib.util

    import diffusers
    import transformers

    libraries = {"diffusers": diffusers, "transformers": transformers}
    low_mem = importlib.util.find_spec("accelerate") is not None
    loaded = {}
    for part, (library, class_name, what) in parts.items():
        cls = getattr(libraries[library], class_name)
        weights = next((f for f in files if f.startswith(f"{part}/") and
                        f.endswith((".safetensors", ".safetensors.index.json"))), None)
        if weights is None:  # a tokenizer
            loaded[part] = from_pretrained(title, what, cls.from_pretrained, directory / part)
            continue
        kwargs = {"use_safetensors": True}
        if library == "diffusers":
            kwargs["low_cpu_mem_usage"] = low_mem
        model = from_pretrained(title, what, cls.from_pretrained, directory / part, weights, **kwargs)
        loaded[part] = model.float().eval().requires_grad_(False)
    return loaded


def flow_grid(directory: Path, release: Release, expected: dict, spacing: str,
              image_seq_len: int | None = None) -> FlowGrid:
    """The scheduler config as a ``FlowGrid``: checked against ``expected`` (the release's values), then read by
    ``FlowSchedule.from_config``; ``mu`` from ``image_seq_len`` when the schedule shifts dynamically."""
    path = directory / "scheduler" / "scheduler_config.json"
    config = read_config(path, "scheduler")
    check_keys(path, config, expected, "scheduler", release)
    try:
        schedule = FlowSchedule.from_config(config)
    except ValueError as exc:
        raise BenchError(f"{path}: {exc}") from None
    mu = schedule.mu(image_seq_len) if schedule.use_dynamic_shifting else None
    return FlowGrid(schedule, spacing, mu)


@torch.no_grad()
def decode_flow_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """``vae.decode(latents / scaling_factor + shift_factor)`` clamped to [-1, 1], one sample at a time, in the
    autoencoder's dtype (float32), on the latents' device (SD3's and FLUX's pipelines)."""
    param = next(vae.parameters())
    scale, shift = float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)
    images = [vae.decode(z[None].to(param.device, param.dtype) / scale + shift).sample for z in latents]
    if not images:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        shape = (vae.config.out_channels, latents.shape[-2] * factor, latents.shape[-1] * factor)
        return latents.new_empty((0, *shape))
    return torch.cat(images).to(latents.device, torch.float32).clamp(-1.0, 1.0)


Encode = Callable[[str], dict]  # prompt -> the transformer's per-row keyword tensors for it, on the CPU


class FlowConditioning:
    """Seeds -> prompts -> the transformer's keyword tensors, and the velocity model that uses them.

    ``encode(prompt)`` gives a prompt's tensors (``encoder_hidden_states``, ``pooled_projections``), computed once per
    distinct prompt and kept on the CPU. ``start_batch(seeds)`` sets a batch's rows: with ``guidance`` (classifier-free
    guidance, SD3) the negative prompt's rows first, then the prompts' (the doubled batch); without (FLUX) one row per
    sample. Every tensor of ``unet_kwargs`` has one row per row of the transformer's batch, so calibration code can
    keep it row by row. A subclass adapts the call (``velocity``)."""

    def __init__(self, encode: Encode, prompts: Sequence[str], guidance_scale: float | None,
                 negative_prompt: str = "", device: Callable[[], torch.device] | None = None):
        self.encode = encode
        self.prompts = list(prompts)
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.embeddings: dict[str, dict] = {}
        self.batch_prompts: list[str] = []
        self._device = device
        self._kwargs: dict | None = None

    @property
    def doubles(self) -> bool:
        return self.guidance_scale is not None

    def prompt(self, seed: int) -> str:
        return self.prompts[int(seed) % len(self.prompts)]

    def embed(self, prompt: str) -> dict:
        if prompt not in self.embeddings:
            self.embeddings[prompt] = {k: v.float().cpu() for k, v in self.encode(prompt).items()}
        return self.embeddings[prompt]

    def batch_kwargs(self, prompts: Sequence[str]) -> dict:
        rows = ([self.embed(self.negative_prompt)] * len(prompts) if self.doubles else []) \
            + [self.embed(p) for p in prompts]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]} if rows else {}

    def start_batch(self, seeds: Sequence[int]) -> None:
        self.batch_prompts = [self.prompt(s) for s in seeds]
        device = self._device() if self._device is not None else torch.device("cpu")
        self._kwargs = to_device(self.batch_kwargs(self.batch_prompts), device)

    def unet_kwargs(self, batch: int) -> dict:
        """The transformer's keyword tensors for a batch of ``batch`` samples (set by ``start_batch``)."""
        want = 2 * batch if self.doubles else batch
        rows = None if not self._kwargs else next(iter(self._kwargs.values())).shape[0]
        if rows != want:
            have = "none" if rows is None else f"one for {rows // (2 if self.doubles else 1)} samples"
            raise RuntimeError(f"no prompt conditioning for a batch of {batch} (have {have}): call "
                               "model.start_batch(seeds) before the batch's first step")
        return self._kwargs

    def velocity(self, transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """One transformer call on ``x`` (the rows of the call) at the float times ``t``: SD3's."""
        return transformer(hidden_states=x, timestep=t, return_dict=False, **kwargs)[0]

    def denoiser(self, transformer: nn.Module):
        """``transformer`` as the flow samplers' ``(x_t, t) -> v``; with guidance one call on the doubled batch."""

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            kwargs = to_device(self.unet_kwargs(x.shape[0]), x.device, x.dtype)
            t = torch.as_tensor(t, device=x.device).to(torch.float32).expand(x.shape[0])
            if not self.doubles:
                return self.velocity(transformer, x, t, kwargs)
            v_uncond, v_cond = self.velocity(transformer, torch.cat([x, x]), torch.cat([t, t]), kwargs).chunk(2)
            return v_uncond + self.guidance_scale * (v_cond - v_uncond)

        return velocity


def token_ids(tokenizer, prompt: str, length: int) -> torch.Tensor:
    """``(1, length)`` ids of ``prompt``, padded and truncated as SD3's and FLUX's pipelines do."""
    return tokenizer([prompt], padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                     return_tensors="pt").input_ids


def sd3_encoder(tokenizers: Sequence, text_encoders: Sequence[nn.Module], t5_tokens: int = T5_TOKENS) -> Encode:
    """SD3's ``encode_prompt`` for one prompt (module docstring): ``encoder_hidden_states`` and
    ``pooled_projections``."""
    (tok_l, tok_g, tok_t5), (clip_l, clip_g, t5) = tokenizers, text_encoders

    @torch.no_grad()
    def encode(prompt: str) -> dict:
        hidden, pooled = [], []
        for tokenizer, encoder in ((tok_l, clip_l), (tok_g, clip_g)):
            ids = token_ids(tokenizer, prompt, CLIP_TOKENS).to(next(encoder.parameters()).device)
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0][0].float())  # text_embeds: the projected pooled output
            hidden.append(out.hidden_states[-2][0].float())
        ids = token_ids(tok_t5, prompt, t5_tokens).to(next(t5.parameters()).device)
        t5_hidden = t5(ids)[0][0].float()
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5_hidden.to(clip.device)], dim=-2).cpu(),
                "pooled_projections": torch.cat(pooled, dim=-1).cpu()}

    return encode


def random_encoder(shapes: dict[str, tuple[int, ...]], seed: int = RANDOM_SEED) -> Encode:
    """Text embeddings of the given shapes drawn from ``seed`` and the prompt (random variants: no text encoders)."""

    def encode(prompt: str) -> dict:
        generator = torch.Generator().manual_seed(seed + sum(prompt.encode()))
        return {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}

    return encode


def random_module(cls, config: dict, seed: int = RANDOM_SEED) -> nn.Module:
    """``cls(**config)`` with seeded random weights: built without initialising (on the meta device), then every
    tensor drawn from N(0, 0.02) (norm weights 1), in float32 on the CPU, eval mode, no gradients. A model of several
    billion parameters builds in seconds; the weights are for speed and memory only."""
    with torch.device("meta"):
        module = cls(**config)
    module = module.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            if "norm" in name and name.endswith("weight"):
                tensor.fill_(1.0)
            elif name.endswith("bias"):
                tensor.zero_()
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
    return module.float().eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class Architecture:
    """What the configs must say (checked before any weight is read): the transformer's, the text encoders' (keys of
    their configs) and the scheduler's."""

    transformer: dict
    text_encoder: dict
    text_encoder_2: dict
    text_encoder_3: dict
    scheduler: dict
    vae: dict


# Source: transformer/config.json of stabilityai/stable-diffusion-3-medium-diffusers: 24 MMDiT blocks, 24 heads of 64
# (1536 wide), 2x2 patches of 16-channel latents, 4096-wide joint (T5) context, 2048-wide pooled CLIP projection.
TRANSFORMER_ARCH: dict = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": LATENT_CHANNELS,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": LATENT_CHANNELS,
    "pos_embed_max_size": 192,
}
# Source: text_encoder*/config.json (CLIP ViT-L/14 and OpenCLIP bigG/14 with projections, T5 v1.1 XXL's encoder),
# scheduler/scheduler_config.json and vae/config.json of that repository
ARCHITECTURE = Architecture(
    transformer=TRANSFORMER_ARCH,
    text_encoder={"hidden_size": 768, "num_hidden_layers": 12, "projection_dim": 768,
                  "max_position_embeddings": CLIP_TOKENS},
    text_encoder_2={"hidden_size": 1280, "num_hidden_layers": 32, "projection_dim": 1280,
                    "max_position_embeddings": CLIP_TOKENS},
    text_encoder_3={"d_model": 4096, "num_layers": 24},
    scheduler={"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "shift": 3.0},
    vae={"latent_channels": LATENT_CHANNELS, "scaling_factor": 1.5305, "shift_factor": 0.0609},
)
# SD3's autoencoder (vae/config.json), for the random variant
VAE_CONFIG: dict = {
    "in_channels": 3, "out_channels": 3, "latent_channels": LATENT_CHANNELS,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False,
}


def check_architecture(directory: Path, architecture, release: Release, transformer_class: str,
                       text_parts: Sequence[str]) -> None:
    """The transformer's class and architecture, the text encoders' and the autoencoder's keys, on the config files
    alone (BenchError, one line)."""
    path = directory / "transformer" / "config.json"
    raw = read_config(path, f"{release.title} transformer")
    if raw.get("_class_name", transformer_class) != transformer_class:
        raise BenchError(f"{path} is not {release.title}'s transformer: _class_name is {raw['_class_name']!r}, "
                         f"expected {transformer_class!r}")
    check_keys(path, raw, architecture.transformer, "transformer", release)
    path = directory / "vae" / "config.json"
    check_keys(path, read_config(path, "autoencoder"), architecture.vae, "autoencoder", release)
    for part in text_parts:
        path = directory / part / "config.json"
        config = read_config(path, part.replace("_", " "))
        check_keys(path, config.get("text_config", config), getattr(architecture, part), part.replace("_", " "),
                   release)


def image_seq_len(transformer: nn.Module, image_shape: Sequence[int]) -> int:
    """SD3's image sequence length: (latent height // patch) * (latent width // patch)."""
    patch = int(transformer.config.patch_size)
    return (image_shape[-2] // patch) * (image_shape[-1] // patch)


def load(checkpoint: str | Path | None = None, architecture: Architecture | None = None) -> ZooModel:
    """The zoo entry (module docstring): transformer, autoencoder and the three text encoders in fp32, eval mode,
    no gradients, on the CPU. ``architecture``: what the configs must say (default: SD3 Medium's)."""
    arch = ARCHITECTURE if architecture is None else architecture
    require_transformers(NAME)
    directory, source = locate(RELEASE, checkpoint)
    files = find_flow_files(directory, RELEASE)
    check_architecture(directory, arch, RELEASE, "SD3Transformer2DModel",
                       ("text_encoder", "text_encoder_2", "text_encoder_3"))
    grid = flow_grid(directory, RELEASE, arch.scheduler, "scheduler")
    parts = load_flow_parts(directory, files, TITLE, PARTS)
    for name in ("tokenizer", "tokenizer_2"):
        check_tokenizer(parts[name], directory / name, CLIP_TOKENS)
    transformer = parts["transformer"]
    factor = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    size = int(transformer.config.sample_size)
    image_shape = (int(transformer.config.in_channels), size, size)
    if grid.schedule.use_dynamic_shifting:  # SD3.5-style configs: mu from the image sequence length
        grid = FlowGrid(grid.schedule, grid.spacing, grid.schedule.mu(image_seq_len(transformer, image_shape)))
    prompts_path = prompt_file(None if source["source"] == "hub" else directory)
    prompts = read_prompts(prompts_path)
    encoders = tuple(parts[k] for k in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    encode = sd3_encoder(tuple(parts[k] for k in ("tokenizer", "tokenizer_2", "tokenizer_3")), encoders)
    conditioning = FlowConditioning(encode, prompts, GUIDANCE_SCALE,
                                    device=lambda: next(encoders[0].parameters()).device)
    info = {
        **source,
        "directory": str(directory),
        "files": {name: sha256_file(directory / name) for name in files},
        **conditioning_info(conditioning),
        "flow": {"shift": grid.schedule.shift, "spacing": grid.spacing, "mu": grid.mu},
        "prompts": prompts_info(prompts_path, prompts),
    }
    return ZooModel(
        name=NAME, unet=transformer, schedule=grid, image_shape=image_shape, default_sampler="flow-euler",
        default_steps=DEFAULT_STEPS, info=info, make_denoiser=conditioning.denoiser,
        decoder=functools.partial(decode_flow_latents, parts["vae"]), start_batch=conditioning.start_batch,
        output_shape=(3, size * factor, size * factor), default_eta=0.0, default_batch_size=DEFAULT_BATCH_SIZE,
        parts={k: parts[k] for k in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")},
    )


def conditioning_info(conditioning: FlowConditioning) -> dict:
    return {
        "guidance_scale": conditioning.guidance_scale,
        "negative_prompt": conditioning.negative_prompt,
        "guidance": "one transformer call on cat([x, x]) with cat([uncond, cond]) embeddings",
        "text_embeddings": "cat(pad(cat(clip_l.hidden_states[-2], clip_g.hidden_states[-2]), 4096), t5 last hidden "
                           f"state at {T5_TOKENS} tokens); pooled: cat(clip_l.text_embeds, clip_g.text_embeds)",
    }


def load_random(checkpoint: str | Path | None = None) -> ZooModel:
    """SD3 Medium's transformer architecture with seeded random weights, a random SD3-shaped autoencoder and random
    text embeddings (module docstring); nothing is read or downloaded."""
    if checkpoint is not None:
        raise BenchError(f"{RANDOM_NAME} takes no checkpoint (its weights are random, seed {RANDOM_SEED}); "
                         f"use {NAME} for the real weights")
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    transformer = random_module(SD3Transformer2DModel, TRANSFORMER_ARCH)
    vae = random_module(AutoencoderKL, VAE_CONFIG, RANDOM_SEED + 1)
    tokens = CLIP_TOKENS + T5_TOKENS
    encode = random_encoder({"encoder_hidden_states": (tokens, TRANSFORMER_ARCH["joint_attention_dim"]),
                             "pooled_projections": (TRANSFORMER_ARCH["pooled_projection_dim"],)})
    conditioning = FlowConditioning(encode, ["a random prompt"], GUIDANCE_SCALE,
                                    device=lambda: next(transformer.parameters()).device)
    grid = FlowGrid(FlowSchedule(NUM_TRAIN_TIMESTEPS, shift=3.0), "scheduler")
    return ZooModel(
        name=RANDOM_NAME, unet=transformer, schedule=grid, image_shape=IMAGE_SHAPE, default_sampler="flow-euler",
        default_steps=DEFAULT_STEPS, info={"source": "random", "seed": RANDOM_SEED, "architecture": NAME},
        make_denoiser=conditioning.denoiser, decoder=functools.partial(decode_flow_latents, vae),
        start_batch=conditioning.start_batch, output_shape=OUTPUT_SHAPE, default_eta=0.0,
        default_batch_size=DEFAULT_BATCH_SIZE, parts={"vae": vae},
    )


ENTRY = register_model(ZooEntry(
    name=NAME, load=load, train_timesteps=NUM_TRAIN_TIMESTEPS, output_size=OUTPUT_SHAPE[1:],
    description=f"Stable Diffusion 3 Medium 1024x1024 (flow matching: flow-euler / flow-heun), guidance "
                f"{GUIDANCE_SCALE}, {DEFAULT_STEPS} steps (optional extra: pip install 'modiff-bench[sd]'): {HUB_ID} "
                "from the local Hugging Face cache or a diffusers directory",
    reference=ReferenceData(),
    family="transformer",
))
RANDOM_ENTRY = register_model(ZooEntry(
    name=RANDOM_NAME, load=load_random, train_timesteps=NUM_TRAIN_TIMESTEPS, output_size=OUTPUT_SHAPE[1:],
    description=f"the {NAME} architecture with seeded random weights and text embeddings (no download): speed and "
                "memory only",
    reference=ReferenceData(None, "none: random weights"),
    family="transformer",
))
mark_flow_model(NAME)
mark_flow_model(RANDOM_NAME)
