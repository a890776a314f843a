"""Stable Diffusion v1.4 (``CompVis/stable-diffusion-v1-4``): the text-to-image rows of the MoDiff paper.

Setting (the paper's, see ``shared/spec/modiff.md``): PLMS, 50 steps, classifier-free guidance 7.5, 512x512 images
(64x64x4 latents), per-sample dynamic activation scales. Only the UNet is quantized; the autoencoder and the CLIP text
encoder stay in full precision (``ZooModel.parts``).

What ``load(checkpoint)`` accepts
    - ``None`` or ``"CompVis/stable-diffusion-v1-4"``: that repository in the Hugging Face cache (only the cache when
      ``HF_HUB_OFFLINE=1``; otherwise missing files are fetched), restricted to :data:`HUB_PATTERNS`;
    - a directory in the diffusers layout of that repository: ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``
      and ``scheduler/``, e.g. from ``hf download CompVis/stable-diffusion-v1-4 --local-dir DIR``.
    The UNet config must be SD v1's architecture (:data:`UNET_ARCH`, checked before any weight is read), the scheduler
    config SD's training schedule; of the autoencoder and the text encoder only what the UNet and the decoder rely on
    is checked (4 latent channels, downsampling 8, latent scale 0.18215; 768-wide embeddings of 77 tokens). Configs
    cannot tell v1.4 from v1.5 or a fine-tune (same architecture): ``info["files"]`` records the SHA-256 of every file
    read, which can.

Classifier-free guidance
    ``make_denoiser(unet)`` returns ``eps = eps_u + 7.5 (eps_c - eps_u)`` from ONE call of the UNet on the doubled
    batch ``cat([x, x])`` with ``cat([uncond, cond])`` text embeddings, as CompVis' ``scripts/txt2img.py`` samplers do
    (unconditional half first). The quantized layers therefore see the doubled batch, as in the paper's setup: with
    ``granularity="tensor"`` one scale spans both halves; with ``"sample"`` every half-sample has its own; MoDiff's
    per-layer state holds ``2 * batch`` trajectories. The unconditional prompt is the empty string.

Prompts
    ``start_batch(seeds)`` picks the prompt of seed ``s`` as ``prompts[s % len(prompts)]``: it depends on the seed
    only, so an image does not depend on its batch or on the world size. The list is ``<checkpoint>/prompts.txt`` when
    that file exists, else the packaged ``bench/zoo/prompts.txt`` (a short list written for this suite; for a
    paper-style evaluation put a caption list, e.g. MS-COCO captions, in ``<checkpoint>/prompts.txt``). One prompt per
    line; blank lines and lines starting with ``#`` are skipped; prompts longer than 77 CLIP tokens are truncated, as
    in SD. Each distinct prompt is encoded once, alone (so its embedding does not depend on which batch asked for it
    first), and cached on the CPU in the model's :class:`PromptConditioning`. ``info["prompts"]`` records the file's
    path, SHA-256 and length.

Shared with the other text-to-image models
    SDXL (``bench.zoo.sdxl``) and the generic ``diffusers:`` entry's SD 1.x / 2.x / SDXL pipelines
    (``bench.zoo.generic``) use this module's machinery: :class:`PromptConditioning` (subclassed for SDXL's second
    text encoder and ``added_cond_kwargs``), :func:`decode_latents`, and the safe, strict loading of a pipeline's
    parts (:class:`Release`, :func:`find_files`, :func:`check_keys`, :func:`load_parts`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modiff.samplers import Denoiser
from modiff.schedules import NoiseSchedule

from ..errors import BenchError
from ..provenance import sha256_file
from .checkpoints import (
    PICKLE_SUFFIXES,
    check_loading_info,
    check_weights_only,
    constructor_defaults,
    first_line,
    read_config,
    same_json,
)
from .model import ZooModel
from .registry import ReferenceData, ZooEntry, register_model

NAME = "sd-v1-4"
TITLE = "Stable Diffusion v1.4"
HUB_ID = "CompVis/stable-diffusion-v1-4"
GUIDANCE_SCALE = 7.5
NEGATIVE_PROMPT = ""  # the unconditional half of classifier-free guidance
LATENT_SCALE = 0.18215  # SD v1's scale_factor (v1-inference.yaml; AutoencoderKL's scaling_factor)
TEXT_TOKENS = 77  # CLIP's context length, SD's max_length
TEXT_WIDTH = 768  # CLIP ViT-L/14 text width = the UNet's cross_attention_dim
IMAGE_SHAPE = (4, 64, 64)  # latents
OUTPUT_SHAPE = (3, 512, 512)  # decoded images
BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS = 0.00085, 0.012, 1000
# MoDiff keeps â and ô for every wrapped layer and every (doubled) sample: measured 43 MB per UNet sample at 8x8
# latents, about 64x that at 64x64, i.e. ~5.5 GB per image with guidance in fp32; 4 images fit a 40 GB budget.
DEFAULT_BATCH_SIZE = 4

PROMPTS_FILE = "prompts.txt"
DEFAULT_PROMPTS = Path(__file__).resolve().with_name(PROMPTS_FILE)

# what is fetched from the hub (and what the hint asks for): configs, tokenizer files and fp32 safetensors weights
HUB_PATTERNS = ("*.json", "*.txt", "*/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")

OPTIONAL_FILES = ("tokenizer/special_tokens_map.json", "tokenizer/added_tokens.json")  # hashed when present

# Source: unet/config.json of CompVis/stable-diffusion-v1-4 on the Hugging Face Hub (diffusers layout, written by
# diffusers 0.2.2; checked against a re-saved copy of that file and against runwayml/stable-diffusion-v1-5's
# unet/config.json, the same architecture), which is CompVis' v1-inference.yaml UNet: model_channels 320,
# channel_mult (1, 2, 4, 4), num_res_blocks 2, attention at the first three levels, num_heads 8, context_dim 768.
# 859,520,964 parameters. "attention_head_dim": 8 is diffusers' historical name for 8 HEADS (of 40-160 channels).
UNET_ARCH: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": 8,
}
# Constructor arguments later diffusers releases added, at the values that keep SD v1's architecture (the values of
# runwayml/stable-diffusion-v1-5's unet/config.json, re-saved by diffusers 0.17, and diffusers' defaults). A config
# without the key gets the installed diffusers' default; a key the installed diffusers does not know is not checked.
UNET_LATER_KEYS: dict = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "transformer_layers_per_block": 1,
    "num_attention_heads": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
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
}
# numerically irrelevant in fp32 and spelled both ways by SD v1 configs (v1-5 writes null, diffusers' default False)
UNET_EITHER: dict = {"upcast_attention": (None, False)}

# Source: scheduler/scheduler_config.json of CompVis/stable-diffusion-v1-4 (PNDMScheduler): SD's training schedule.
SCHEDULER_CONFIG: dict = {
    "beta_start": BETA_START,
    "beta_end": BETA_END,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "trained_betas": None,
}
# What the decoder relies on (vae/config.json of CompVis/stable-diffusion-v1-4 holds these values): 4 latent
# channels, three downsamplings (64 -> 512) and RGB out; the scaling factor, where written, must be SD v1's.
VAE_INTERFACE: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": LATENT_SCALE,
}


def schedule() -> NoiseSchedule:
    """SD's ``scaled_linear`` betas: ``linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2`` in float64."""
    betas = np.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=np.float64) ** 2
    return NoiseSchedule(torch.from_numpy(betas))


# ------------------------------------------------------------------------------------------------------------ prompts


def prompt_file(directory: Path | None) -> Path:
    """``<directory>/prompts.txt`` when it exists, else the packaged default list."""
    if directory is not None and (Path(directory) / PROMPTS_FILE).is_file():
        return Path(directory) / PROMPTS_FILE
    return DEFAULT_PROMPTS


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchError(f"cannot read the prompt file {path} ({exc})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise BenchError(f"prompt file {path} holds no prompt (one per line; lines starting with '#' are comments)")
    return prompts


def to_device(value, device: torch.device, dtype: torch.dtype | None = None):
    """``value`` (a tensor, or a dict of them, as the UNet's ``added_cond_kwargs``) on ``device``, floating-point
    tensors in ``dtype`` when given."""
    if isinstance(value, dict):
        return {k: to_device(v, device, dtype) for k, v in value.items()}
    if dtype is not None and value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device)


class PromptConditioning:
    """Seeds -> prompts -> CLIP text embeddings, and the guided denoiser that uses them.

    ``start_batch(seeds)`` sets the batch's conditioning; the denoiser refuses a batch it was not set for. Embeddings
    are ``last_hidden_state`` of the text encoder on the prompt padded to 77 tokens (SD's FrozenCLIPEmbedder, and
    diffusers' ``StableDiffusionPipeline`` for SD 1.x and 2.x), one ``(77, width)`` tensor per distinct prompt,
    computed once and kept on the CPU.

    What the UNet gets besides the latents is :meth:`unet_kwargs`: here ``encoder_hidden_states``; a subclass adds
    its own (``bench.zoo.sdxl.SDXLConditioning``: SDXL's ``added_cond_kwargs``). Every tensor in it has one row per
    row of the doubled batch, the unconditional half first, so that calibration code can keep it row by row."""

    def __init__(self, tokenizer, text_encoder: nn.Module, prompts: Sequence[str],
                 guidance_scale: float = GUIDANCE_SCALE, negative_prompt: str = NEGATIVE_PROMPT):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.prompts = list(prompts)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.embeddings: dict[str, torch.Tensor] = {}
        self.batch_prompts: list[str] = []
        self._kwargs: dict | None = None  # the UNet's keyword inputs for the doubled batch (unet_kwargs)

    def prompt(self, seed: int) -> str:
        return self.prompts[int(seed) % len(self.prompts)]

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @staticmethod
    def token_ids(tokenizer, prompt: str) -> torch.Tensor:
        """``(1, model_max_length)`` ids of ``prompt``, padded and truncated as SD's pipelines do."""
        return tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    @torch.no_grad()
    def embed(self, prompt: str) -> torch.Tensor:
        if prompt not in self.embeddings:
            ids = self.token_ids(self.tokenizer, prompt).to(self.device)
            hidden = self.text_encoder(input_ids=ids).last_hidden_state
            self.embeddings[prompt] = hidden[0].float().cpu()
        return self.embeddings[prompt]

    def batch_kwargs(self, prompts: Sequence[str]) -> dict:
        """The UNet's keyword inputs for ``prompts`` with guidance: ``len(prompts)`` unconditional rows, then the
        prompts' rows, on the CPU."""
        uncond = self.embed(self.negative_prompt)
        rows = [uncond] * len(prompts) + [self.embed(p) for p in prompts]
        return {"encoder_hidden_states": torch.stack(rows) if rows else uncond.new_empty((0, *uncond.shape))}

    def start_batch(self, seeds: Sequence[int]) -> None:
        self.batch_prompts = [self.prompt(s) for s in seeds]
        self._kwargs = to_device(self.batch_kwargs(self.batch_prompts), self.device)

    def unet_kwargs(self, batch: int) -> dict:
        """The keyword inputs of the UNet call on the doubled batch of ``batch`` samples (set by ``start_batch``)."""
        rows = None if self._kwargs is None else self._kwargs["encoder_hidden_states"].shape[0]
        if rows != 2 * batch:
            have = "none" if rows is None else f"one for {rows // 2} samples"
            raise RuntimeError(f"no prompt conditioning for a batch of {batch} (have {have}): call "
                               "model.start_batch(seeds) before the batch's first step")
        return self._kwargs

    def context(self, batch: int) -> torch.Tensor:
        """The text embeddings of the doubled batch: ``(2 * batch, tokens, width)``."""
        return self.unet_kwargs(batch)["encoder_hidden_states"]

    def denoiser(self, unet: nn.Module) -> Denoiser:
        """``unet`` with classifier-free guidance: one UNet call on the doubled batch (module docstring)."""

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            kwargs = to_device(self.unet_kwargs(x.shape[0]), x.device, x.dtype)
            t2 = torch.cat([t, t]) if t.dim() else t
            eps_uncond, eps_cond = unet(torch.cat([x, x]), t2, **kwargs).sample.chunk(2)
            return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

        return denoise


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """``vae.decode(latents / scaling_factor)`` clamped to [-1, 1], one sample at a time (a 512x512 decode of a whole
    batch needs tens of GB; one at a time also keeps an image independent of its batch); on the latents' device.
    ``scaling_factor`` is the autoencoder config's (0.18215 for SD 1.x / 2.x, 0.13025 for SDXL). The latents are
    cast to the autoencoder's dtype, which the zoo keeps in float32 (SDXL's overflows in float16: diffusers'
    ``force_upcast``)."""
    param = next(vae.parameters())
    scale = float(vae.config.scaling_factor)
    images = [vae.decode(z[None].to(param.device, param.dtype) / scale).sample for z in latents]
    if not images:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        shape = (vae.config.out_channels, latents.shape[-2] * factor, latents.shape[-1] * factor)
        return latents.new_empty((0, *shape))
    return torch.cat(images).to(latents.device, torch.float32).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Release:
    """A published checkpoint the zoo loads by name: where it lives on the hub, the files it needs, what its
    messages call it. The loading helpers below take one, so that SD v1.4 and SDXL share them."""

    title: str  # in messages: "Stable Diffusion v1.4"
    hub_id: str
    hub_patterns: tuple[str, ...]  # what is fetched from the hub, and what the hint asks to download
    layout: dict[str, tuple[tuple[str, ...], ...]]  # requirement -> alternatives (files that together satisfy it)
    optional_files: tuple[str, ...] = ()  # hashed when present
    download: bool = True  # False: the Hugging Face cache only, whatever HF_HUB_OFFLINE says
    how_to: str = ""  # what messages say to do instead of the download hint

    @property
    def hint(self) -> str:
        if self.how_to:
            return self.how_to
        return (f"download it with 'hf download {self.hub_id} --include {' '.join(repr(p) for p in self.hub_patterns)} "
                "--local-dir DIR' and pass DIR as the checkpoint (--checkpoint DIR or run.checkpoint = DIR)")


# part -> (library, class, what messages call it); tokenizers are the parts without weights
TEXT_PARTS: dict[str, tuple[str, str, str]] = {
    "unet": ("diffusers", "UNet2DConditionModel", "UNet"),
    "vae": ("diffusers", "AutoencoderKL", "autoencoder"),
    "text_encoder": ("transformers", "CLIPTextModel", "text encoder"),
    "tokenizer": ("transformers", "CLIPTokenizer", "tokenizer"),
}


def layout_of(parts: dict[str, tuple[str, str, str]]) -> dict[str, tuple[tuple[str, ...], ...]]:
    """The files a pipeline directory needs for ``parts`` (as ``TEXT_PARTS``) and its scheduler, in the diffusers
    layout: each requirement -> alternatives (files that together satisfy it), the hub's layout first."""
    layout: dict[str, tuple[tuple[str, ...], ...]] = {}
    for part, (library, class_name, _) in parts.items():
        if class_name.startswith("CLIPTokenizer"):
            layout[f"{part} config"] = ((f"{part}/tokenizer_config.json",),)
            # the hub holds vocab.json + merges.txt; transformers >= 5 saves a tokenizer as tokenizer.json
            layout[f"{part} vocabulary"] = ((f"{part}/vocab.json", f"{part}/merges.txt"), (f"{part}/tokenizer.json",))
            continue
        layout[f"{part} config"] = ((f"{part}/config.json",),)
        stem = "diffusion_pytorch_model" if library == "diffusers" else "model"
        legacy = "diffusion_pytorch_model" if library == "diffusers" else "pytorch_model"
        layout[f"{part} weights"] = ((f"{part}/{stem}.safetensors",), (f"{part}/{legacy}.bin",))
    layout["scheduler config"] = (("scheduler/scheduler_config.json",),)
    return layout


SD_V14 = Release(TITLE, HUB_ID, HUB_PATTERNS, layout_of(TEXT_PARTS), OPTIONAL_FILES)


def locate(release: Release, checkpoint: str | Path | None) -> tuple[Path, dict]:
    """``(directory, source)`` of ``checkpoint``: None or the hub id -> the hub snapshot, else a directory."""
    path = None if checkpoint is None else Path(checkpoint)
    if path is None or (str(checkpoint) == release.hub_id and not path.exists()):
        directory = _hub_snapshot(release)
        return directory, {"source": "hub", "checkpoint": release.hub_id, "revision": directory.name}
    if path.is_dir():
        return path, {"source": "diffusers", "checkpoint": str(path)}
    raise BenchError(f"{release.title} checkpoint directory {path} does not exist; {release.hint}")


def require_transformers(name: str) -> None:
    """One line when the 'transformers' package (the text encoders and tokenizers: CLIP, T5) is missing."""
    if importlib.util.find_spec("transformers") is None:
        raise BenchError(f"the {name} model needs the 'transformers' package (its text encoders and tokenizers): "
                         "pip install 'modiff-bench[sd]'")


def load(checkpoint: str | Path | None = None) -> ZooModel:
    """The zoo entry (module docstring): UNet, VAE and text encoder in fp32, eval mode, no gradients, on the CPU."""
    require_transformers(NAME)
    directory, source = locate(SD_V14, checkpoint)
    files = find_files(directory, SD_V14)
    _check_configs(directory)
    parts = load_parts(directory, files, SD_V14.title, TEXT_PARTS)
    unet, vae, text_encoder, tokenizer = (parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer"))
    check_tokenizer(tokenizer, directory / "tokenizer")
    prompts_path = prompt_file(None if source["source"] == "hub" else directory)
    prompts = read_prompts(prompts_path)
    conditioning = PromptConditioning(tokenizer, text_encoder, prompts)
    info = {
        **source,
        "directory": str(directory),
        "files": {name: sha256_file(directory / name) for name in files},
        "guidance_scale": GUIDANCE_SCALE,
        "negative_prompt": NEGATIVE_PROMPT,
        "guidance": "one UNet call on cat([x, x]) with cat([uncond, cond]) embeddings",
        "latent_scale": LATENT_SCALE,
        "prompts": prompts_info(prompts_path, prompts),
    }
    return ZooModel(
        name=NAME, unet=unet, schedule=schedule(), image_shape=IMAGE_SHAPE, default_sampler="plms", default_steps=50,
        info=info, make_denoiser=conditioning.denoiser, decoder=functools.partial(decode_latents, vae),
        start_batch=conditioning.start_batch, output_shape=OUTPUT_SHAPE, default_eta=0.0,
        default_batch_size=DEFAULT_BATCH_SIZE, parts={"vae": vae, "text_encoder": text_encoder},
    )


def prompts_info(path: Path, prompts: Sequence[str]) -> dict:
    """What ``info["prompts"]`` records of the prompt list."""
    return {"file": str(path), "sha256": sha256_file(path), "count": len(prompts),
            "rule": "prompt of seed s = prompts[s % count]"}


ENTRY = register_model(ZooEntry(
    name=NAME, load=load, train_timesteps=NUM_TRAIN_TIMESTEPS, output_size=OUTPUT_SHAPE[1:],
    description=f"Stable Diffusion v1.4 512x512, guidance {GUIDANCE_SCALE} (optional extra: pip install "
                f"'modiff-bench[sd]'): {HUB_ID} in diffusers layout",
    reference=ReferenceData(),  # no default: an image folder or a reference batch when given
))


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_snapshot(release: Release) -> Path:
    from huggingface_hub import snapshot_download

    offline = _hub_offline() or not release.download
    try:
        snapshot = snapshot_download(release.hub_id, local_files_only=offline,
                                     allow_patterns=list(release.hub_patterns))
    except (OSError, ValueError) as exc:
        why = ("HF_HUB_OFFLINE is set" if _hub_offline() else "only the local cache is read" if offline
               else str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise BenchError(f"{release.hub_id} is not in the Hugging Face cache ({why}); {release.hint}") from None
    return Path(snapshot)


def find_files(directory: Path, release: Release) -> list[str]:
    """The files each ``release.layout`` requirement resolves to (first complete alternative), plus optional ones."""
    found, missing = [], []
    for what, alternatives in release.layout.items():
        chosen = next((alt for alt in alternatives if all((directory / f).is_file() for f in alt)), None)
        if chosen is None:
            missing.append(f"{what} ({' or '.join(' + '.join(alt) for alt in alternatives)})")
        else:
            found.extend(chosen)
    if missing:
        raise BenchError(f"{directory} is not a complete {release.title} checkpoint: missing "
                         f"{'; '.join(missing)}; {release.hint}")
    return found + [f for f in release.optional_files if (directory / f).is_file()]


def check_keys(path: Path, config: dict, expected: dict, what: str, release: Release = SD_V14,
               optional: bool = False) -> None:
    """``config`` against ``expected`` (a tuple value lists the accepted values). ``optional``: ``config`` is the
    file over the installed class's constructor defaults, and a key neither sets (one the installed library does
    not know) is skipped; otherwise every key must be in ``config``."""
    for key, want in expected.items():
        if optional and key not in config:
            continue
        have = config.get(key)
        accepted = want if isinstance(want, tuple) else (want,)
        if not any(same_json(have, w) for w in accepted):
            wanted = " or ".join(repr(w) for w in accepted)
            raise BenchError(f"{path} is not {release.title}'s {what}: {key} is {have!r}, expected {wanted}; "
                             f"point the checkpoint at a {release.hub_id} download")


def check_unet_class(path: Path, raw: dict, what: str) -> None:
    if raw.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise BenchError(f"{path} is not {what}'s UNet: _class_name is {raw['_class_name']!r}, "
                         "expected 'UNet2DConditionModel'")


def _check_configs(directory: Path) -> None:
    """Architecture checks on the config files alone, before any weight is read."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = directory / "unet" / "config.json"
    raw = read_config(path, "Stable Diffusion v1.4 UNet")
    check_unet_class(path, raw, SD_V14.title)
    effective = {**constructor_defaults(UNet2DConditionModel), **raw}
    check_keys(path, raw, UNET_ARCH, "UNet")  # the original file has every one of these keys
    check_keys(path, effective, {**UNET_LATER_KEYS, **UNET_EITHER}, "UNet", optional=True)

    path = directory / "scheduler" / "scheduler_config.json"
    check_keys(path, {"trained_betas": None, **read_config(path, "scheduler")}, SCHEDULER_CONFIG, "noise schedule")

    path = directory / "vae" / "config.json"
    defaults = constructor_defaults(AutoencoderKL)
    check_keys(path, {**defaults, **read_config(path, "autoencoder")}, VAE_INTERFACE, "autoencoder", optional=True)

    path = directory / "text_encoder" / "config.json"
    check_keys(path, text_config(path), {"hidden_size": TEXT_WIDTH, "max_position_embeddings": TEXT_TOKENS},
               "text encoder")


def text_config(path: Path) -> dict:
    """A text encoder's config (the text tower's, when the file is a full CLIPConfig)."""
    text = read_config(path, "text encoder")
    return text.get("text_config", text)


def from_pretrained(title: str, what: str, load, path: Path, weights: str | None = None, **kwargs):
    """``load(path)`` offline; with ``weights`` (the file it reads) the loading report is checked too: the
    libraries leave a missing tensor randomly initialised, and a pickled file must hold no code."""
    if weights is not None and Path(weights).suffix in PICKLE_SUFFIXES:
        check_weights_only(path.parent / weights, f"{title} {what} weights")
    if weights is not None:
        kwargs["output_loading_info"] = True
    try:
        loaded = load(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise BenchError(f"cannot load the {title} {what} from {path}: {first_line(exc)}") from None
    if weights is None:
        return loaded
    model, loading = loaded
    check_loading_info(loading, f"{title} {what} weights {path.parent / weights}")
    return model


def weights_file(files: Sequence[str], part: str) -> str | None:
    """The weights file of ``part`` among ``files`` (the first listed: safetensors before .bin), or None."""
    return next((f for f in files if f.startswith(f"{part}/") and f.endswith((".safetensors", ".bin"))), None)


def load_parts(directory: Path, files: Sequence[str], title: str, parts: dict[str, tuple[str, str, str]]) -> dict:
    """Each of ``parts`` from ``directory/<part>``, safely and strictly (``from_pretrained``), offline: models in
    float32, eval mode, without gradients; tokenizers as they are. ``files``: the files found, whose safetensors
    (else ``.bin``) weights each model reads."""
    import diffusers
    import transformers

    libraries = {"diffusers": diffusers, "transformers": transformers}
    # without accelerate, diffusers cannot skip the random initialisation and warns when asked to
    low_mem = importlib.util.find_spec("accelerate") is not None
    loaded = {}
    for part, (library, class_name, what) in parts.items():
        cls = getattr(libraries[library], class_name)
        weights = weights_file(files, part)
        if weights is None:  # a tokenizer
            loaded[part] = from_pretrained(title, what, cls.from_pretrained, directory / part)
            continue
        kwargs = {"use_safetensors": weights.endswith(".safetensors")}
        if library == "diffusers":
            kwargs["low_cpu_mem_usage"] = low_mem
        model = from_pretrained(title, what, cls.from_pretrained, directory / part, weights, **kwargs)
        loaded[part] = model.float().eval().requires_grad_(False)
    return loaded


def check_tokenizer(tokenizer, path: Path, tokens: int = TEXT_TOKENS) -> None:
    if tokenizer.model_max_length != tokens:
        raise BenchError(f"the tokenizer in {path} pads to {tokenizer.model_max_length} tokens, "
                         f"expected {tokens} (model_max_length in tokenizer_config.json)")
