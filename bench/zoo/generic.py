"""The generic entry ``diffusers:<directory or hub id>``: an unconditional pixel-space ``UNet2DModel`` pipeline, a
latent text-to-image pipeline of Stable Diffusion's kind (SD 1.x, SD 2.x, SDXL), or a latent transformer pipeline
(DiT, PixArt-alpha), read from its own components.

What it reads
    A diffusers pipeline directory as ``save_pretrained`` writes it.

    - Unconditional (``DDPMPipeline``, ``DDIMPipeline``): ``unet/`` (``config.json`` +
      ``diffusion_pytorch_model.safetensors``, or ``.bin``) and ``scheduler/scheduler_config.json``. The older flat
      layout of the first hub conversions (``config.json``, weights and ``scheduler_config.json`` at the root) is
      read too. A ``model_index.json``, when present, names no other component.
    - Text-to-image (``StableDiffusionPipeline``: SD 1.x and 2.x; ``StableDiffusionXLPipeline``: SDXL): what
      ``model_index.json`` names: a ``UNet2DConditionModel``, an ``AutoencoderKL``, a ``CLIPTextModel`` with its
      ``CLIPTokenizer`` and, for SDXL, a ``CLIPTextModelWithProjection`` with the second tokenizer, each in its
      folder, and the scheduler config. ``safety_checker``, ``feature_extractor`` and ``image_encoder`` are not read
      (the benchmark does not filter images nor take image prompts). Any other component (a ``vqvae``, a third text
      encoder, a ``transformer`` beside a UNet) is refused in one line.
    - Latent transformers (``DiTPipeline``: ``transformer``, ``vae``, ``scheduler``; ``PixArtAlphaPipeline``: those
      and a ``T5EncoderModel`` ``text_encoder`` with its ``T5Tokenizer``): a ``DiTTransformer2DModel`` /
      ``PixArtTransformer2DModel`` in ``transformer/`` (the hub's files name the legacy ``Transformer2DModel``,
      accepted), whose ``out_channels`` may be twice ``in_channels``: a learned variance, split off by the denoiser
      as diffusers' pipelines do (``bench.zoo.dit.split_variance``; every sampler here ignores it, see
      ``bench.zoo.dit``). Their weights are read from safetensors only (a ``.bin`` is never read; T5's may be
      sharded, ``model.safetensors.index.json``); a PixArt-alpha pipeline without its T5 encoder is one line saying
      so. DiT: class of seed ``s`` = ``s % num_embeds_ada_norm``, the null class ``num_embeds_ada_norm``, guidance
      4.0 (``DiTPipeline``'s default; the named ``dit-xl-2-256`` entry uses the paper's FID setting 1.5), default
      sampler ``ddpm-ldm-uniform`` with 250 steps. PixArt-alpha: prompts as below, T5 embeddings of 120 tokens with
      their attention masks, guidance 4.5 (``PixArtAlphaPipeline``'s default), ``resolution`` / ``aspect_ratio``
      micro-conditions for ``sample_size`` 128 transformers only (as the pipeline), default sampler ``dpm-solver++``
      with 20 steps.

    ``<directory or hub id>``: an existing directory (absolute, or relative to the working directory), else a Hugging
    Face hub id (``google/ddpm-cifar10-32``, ``stabilityai/stable-diffusion-2-base``) taken from the local Hugging
    Face cache only (``HF_HUB_CACHE`` / ``HF_HOME``); nothing is downloaded.

What it takes from the configs (no weights are read for this: matrix files check ``steps <= T`` at ``--dry-run``)
    - the noise schedule: ``num_train_timesteps``, ``beta_schedule`` (``linear``, ``scaled_linear`` or
      ``squaredcos_cap_v2``), ``beta_start``, ``beta_end``, or ``trained_betas`` when given; keys the file leaves out
      take the scheduler class's defaults, as ``from_pretrained`` does. Betas are computed in float64 as diffusers
      defines them. The scheduler is one of :data:`SCHEDULER_CLASSES` (those whose noise schedule is given by these
      keys); ``prediction_type`` ``epsilon`` or ``v_prediction`` (SD 2.x at 768: the denoiser turns v into eps,
      ``modiff.samplers.epsilon_denoiser``); ``rescale_betas_zero_snr`` and Euler's continuous timesteps are refused.
    - the sample shape: the UNet's ``in_channels`` and ``sample_size``; ``out_channels`` must equal ``in_channels``
      (a learned-variance output is refused for UNets; DiT and PixArt-alpha transformers may have twice as many)
      and the UNet takes no class labels. A text-to-image UNet's inputs must
      match the other components: latent channels of the autoencoder; ``cross_attention_dim`` = the text encoder's
      width (SD) or the sum of both (SDXL); SDXL's ``text_time`` addition embedding of the second encoder's
      ``projection_dim`` + 6 time ids x ``addition_time_embed_dim``. UNets that need inputs this entry does not give
      (``time_cond_proj_dim``, ``encoder_hid_dim``, other addition embeddings) are refused.
    - a text-to-image pipeline's images: the autoencoder's output channels at the latent size times its downsampling
      ``2 ** (len(block_out_channels) - 1)``; latents are divided by its ``scaling_factor`` before decoding
      (``bench.zoo.sd.decode_latents``, in float32).
    The scheduler's sampling settings (``clip_sample``, ``timestep_spacing``, ``steps_offset``, ...) are not used:
    the matrix's ``sampler`` axis chooses the sampler. They are recorded in ``info["scheduler"]``.

Conditioning of a text-to-image pipeline (``bench.zoo.sd.PromptConditioning``, ``bench.zoo.sdxl.SDXLConditioning``)
    The prompt of seed ``s`` is ``prompts[s % len(prompts)]`` (``<directory>/prompts.txt``, else the packaged list);
    classifier-free guidance is one UNet call on the doubled batch, at the scale of diffusers' pipeline: 7.5 for SD
    1.x / 2.x (unconditional half: the empty prompt), 5.0 for SDXL (unconditional half: zeros when the pipeline's
    ``force_zeros_for_empty_prompt`` is true, its default, else the empty prompt; time ids ``(H, W, 0, 0, H, W)`` at
    the pipeline's image size). Default sampler: PLMS with 50 steps for SD (the sd-v1-4 entry's), ``ddim-ldm`` with 50
    for SDXL (the sdxl-base-1.0 entry's).

Loading is safe and strict (``checkpoints.load_diffusers_model``, ``bench.zoo.sd.load_parts``): the safetensors file
when there is one, a ``.bin`` only after ``torch.load(weights_only=True)`` accepted it, and a missing, unexpected or
misshapen tensor is an error. A ``manifest.json`` in the directory (``checkpoints.write_manifest``) is verified first.
``info["files"]`` records the SHA-256 of every file read.

Reference data: none by default (the entry cannot know what the model was trained on): FID, sFID and precision /
recall are missing with a reason unless ``[inception] reference_images`` or ``reference_stats`` is given;
``psnr_to_fp`` / ``mse_to_fp`` need none.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modiff.samplers import epsilon_denoiser
from modiff.schedules import NoiseSchedule

from ..errors import BenchError
from ..provenance import sha256_file
from . import dit, pixart, sd, sdxl
from .checkpoints import (
    MANIFEST,
    constructor_defaults,
    load_diffusers_model,
    read_config,
    read_manifest,
    verify_files,
)
from .model import ZooModel, unet_denoiser
from .registry import ReferenceData, ZooEntry, register_scheme

SCHEME = "diffusers"
USAGE = "diffusers:<directory or hub id>"
# schedulers whose noise schedule is given by num_train_timesteps, beta_schedule, beta_start, beta_end, trained_betas
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                     "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
UNCONDITIONAL, SD, SDXL, DIT, PIXART = "unconditional", "sd", "sdxl", "dit", "pixart"
TRANSFORMER_KINDS = (DIT, PIXART)  # a transformer denoiser (in transformer/) with a learned variance, split off
# the components of each kind of pipeline: name -> (library, class, what messages call it)
KIND_PARTS: dict[str, dict[str, tuple[str, str, str]]] = {
    UNCONDITIONAL: {"unet": ("diffusers", "UNet2DModel", "UNet")},
    SD: sd.TEXT_PARTS,
    SDXL: sdxl.PARTS,
    DIT: dit.PARTS,
    PIXART: pixart.PARTS,
}
KIND_TITLES = {UNCONDITIONAL: "an unconditional pipeline", SD: "a Stable Diffusion 1.x / 2.x pipeline",
               SDXL: "an SDXL pipeline", DIT: "a DiT pipeline", PIXART: "a PixArt-alpha pipeline"}
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")  # either reads the same files
# a component class -> the classes model_index.json may name for it (the hub's DiT and PixArt-alpha files name the
# legacy Transformer2DModel; either T5 tokenizer class reads the same files)
ACCEPTED_CLASSES: dict[str, tuple[str, ...]] = {
    **{name: TOKENIZER_CLASSES for name in TOKENIZER_CLASSES},
    "DiTTransformer2DModel": dit.TRANSFORMER_CLASSES,
    "PixArtTransformer2DModel": pixart.TRANSFORMER_CLASSES,
    "T5Tokenizer": ("T5Tokenizer", "T5TokenizerFast"),
}
IGNORED_PARTS = ("safety_checker", "feature_extractor", "image_encoder")  # named by SD pipelines, not used here
LAYOUT_HINT = ("expected a diffusers pipeline directory with unet/ (config.json and diffusion_pytorch_model."
               "safetensors) and scheduler/scheduler_config.json, as DDPMPipeline.save_pretrained writes, or a "
               "Stable Diffusion / SDXL pipeline with its model_index.json")
# a hub id: "name" or "owner/name" (huggingface_hub's own check follows)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class Pipeline:
    """What the configs of a pipeline directory say, checked; no weights read."""

    name: str  # "diffusers:<spec>"
    directory: Path
    source: dict  # {"source": "diffusers" | "hub", "checkpoint": spec[, "revision"]}
    unet_dir: Path
    scheduler_path: Path
    scheduler: dict  # the scheduler config over its class's defaults
    betas: torch.Tensor  # (T,) float64
    image_shape: tuple[int, int, int]  # what the sampler draws: latents for a text-to-image pipeline
    kind: str = UNCONDITIONAL  # UNCONDITIONAL | SD | SDXL
    output_shape: tuple[int, int, int] | None = None  # decoded images (text-to-image pipelines)
    settings: dict = field(default_factory=dict)  # model_index.json's pipeline settings (force_zeros_for_empty_prompt)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.numel())

    @property
    def prediction_type(self) -> str:
        return self.scheduler.get("prediction_type", "epsilon")

    @property
    def image_output_shape(self) -> tuple[int, int, int]:
        return self.output_shape or self.image_shape

    @property
    def files(self) -> list[Path]:
        """The files that make up an unconditional model, beside the weights (which ``load`` adds)."""
        found = [self.unet_dir / "config.json", self.scheduler_path]
        return found + [p for p in (self.directory / "model_index.json",) if p.is_file()]


# ---------------------------------------------------------------------------------------------------- locating it


def resolve(spec: str) -> tuple[Path, dict]:
    """``(directory, source)`` of ``spec``: an existing directory, else a hub id in the local Hugging Face cache."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path, {"source": "diffusers", "checkpoint": spec}
    if path.exists():
        raise BenchError(f"{SCHEME}:{spec} is a file; give the pipeline directory ({LAYOUT_HINT})")
    if not _HUB_ID.match(spec) or spec.startswith((".", "~")):
        raise BenchError(f"{SCHEME}:{spec}: no such directory ({LAYOUT_HINT}, or a hub id such as "
                         "google/ddpm-cifar10-32 that is in the local Hugging Face cache)")
    return _hub_snapshot(spec)


def _hub_snapshot(repo_id: str) -> tuple[Path, dict]:
    from huggingface_hub import snapshot_download

    try:  # the cache only: snapshot_download with local_files_only never touches the network
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError, HFValidationError, ...
        raise BenchError(
            f"{SCHEME}:{repo_id}: no such directory, and {repo_id} is not in the local Hugging Face cache (nothing is "
            f"downloaded); fetch it with 'hf download {repo_id} --local-dir DIR' and use model = \"{SCHEME}:DIR\" "
            f"(or 'hf download {repo_id}' to fill the cache)") from None
    return snapshot, {"source": "hub", "checkpoint": repo_id, "revision": snapshot.name}


def _first_file(directory: Path, *candidates: str) -> Path | None:
    return next((directory / c for c in candidates if (directory / c).is_file()), None)


# ------------------------------------------------------------------------------------------------- reading configs


def _read_model_index(directory: Path) -> tuple[str, dict]:
    """``(kind, pipeline settings)`` from ``model_index.json``; no file: an unconditional pipeline. The kind comes
    from the components it names (a list ``[library, class]`` each; other keys are the pipeline's settings)."""
    path = directory / "model_index.json"
    if not path.is_file():
        return UNCONDITIONAL, {}
    index = read_config(path, "pipeline")
    pipeline = index.get("_class_name", "diffusers")
    components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)
                  and len(v) == 2 and v[1] is not None}
    settings = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    named = set(components) - set(IGNORED_PARTS)
    kind = next((k for k in (SDXL, SD, PIXART, DIT, UNCONDITIONAL) if named == set(KIND_PARTS[k]) | {"scheduler"}),
                None)
    if kind is None:
        closest = (SDXL if "text_encoder_2" in named else PIXART if "transformer" in named and "text_encoder" in named
                   else DIT if "transformer" in named else SD if "text_encoder" in named or "vae" in named
                   else UNCONDITIONAL)
        expected = set(KIND_PARTS[closest]) | {"scheduler"}
        extra, missing = sorted(named - expected), sorted(expected - named)
        what = "; ".join(part for part in (
            f"with {', '.join(extra)}" if extra else "", f"without {', '.join(missing)}" if missing else "") if part)
        raise BenchError(f"{directory} is a {pipeline} pipeline {what}: the {SCHEME}: entry takes unconditional "
                         "pixel-space UNet2DModel pipelines (unet and scheduler), Stable Diffusion 1.x / 2.x "
                         "(unet, vae, text_encoder, tokenizer, scheduler), SDXL (those and text_encoder_2, "
                         "tokenizer_2), DiT (transformer, vae, scheduler) and PixArt-alpha (transformer, vae, "
                         "text_encoder, tokenizer, scheduler)")
    for part, (_, class_name, _) in KIND_PARTS[kind].items():
        have = components[part][1]
        accepted = ACCEPTED_CLASSES.get(class_name, (class_name,))
        if have not in accepted:
            raise BenchError(f"{path}: the pipeline's {part} is a {have}; the {SCHEME}: entry takes a "
                             f"{' or a '.join(accepted)} there")
    return kind, settings


def _unet_config(config_path: Path, kind: str) -> dict:
    """The UNet config over its class's defaults, checked for what every kind needs (module docstring)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    cls = UNet2DModel if kind == UNCONDITIONAL else UNet2DConditionModel
    raw = read_config(config_path, "UNet")
    have = raw.get("_class_name", cls.__name__)
    if have != cls.__name__:
        extra = ("; a text-to-image pipeline is read through its model_index.json" if kind == UNCONDITIONAL
                 else "")
        raise BenchError(f"{config_path} describes a {have}; the {SCHEME}: entry takes a {cls.__name__} in "
                         f"{KIND_TITLES[kind]}{extra}")
    config = {**constructor_defaults(cls), **raw}
    channels, out = config.get("in_channels"), config.get("out_channels")
    if not (_positive_int(channels) and _positive_int(out)):
        raise BenchError(f"{config_path}: in_channels and out_channels must be positive integers, "
                         f"got {channels!r} and {out!r}")
    if out != channels:
        raise BenchError(f"{config_path}: the UNet maps {channels} channels to {out} (a learned variance, or an "
                         "inpainting / depth UNet?); the samplers need a prediction of the input's shape")
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise BenchError(f"{config_path}: the UNet is class-conditional (num_class_embeds / class_embed_type); the "
                         f"{SCHEME}: entry gives it no class labels")
    size = config.get("sample_size")
    size = [size, size] if _positive_int(size) else size
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_positive_int(s) for s in size)):
        raise BenchError(f"{config_path}: sample_size must be a positive integer or [height, width], "
                         f"got {config.get('sample_size')!r}")
    config["sample_size"] = list(size)
    return config


def _check_text_unet(path: Path, unet: dict, kind: str, texts: dict[str, dict]) -> None:
    """A text-to-image UNet's inputs against its text encoders' configs (module docstring)."""
    for key, why in (("time_cond_proj_dim", "a guidance embedding (a distilled LCM UNet)"),
                     ("encoder_hid_dim", "a projection of the text embeddings")):
        if unet.get(key) is not None:
            raise BenchError(f"{path}: {key} is {unet[key]!r}: the UNet expects {why}, which the {SCHEME}: entry "
                             "does not give")
    width = sum(text.get("hidden_size", 0) for name, text in texts.items())
    if unet.get("cross_attention_dim") != width:
        widths = " + ".join(f"{name} {text.get('hidden_size')!r}" for name, text in texts.items())
        raise BenchError(f"{path}: cross_attention_dim is {unet.get('cross_attention_dim')!r}, but the text "
                         f"embeddings are {width} wide ({widths})")
    addition = unet.get("addition_embed_type")
    if kind == SD and addition is not None:
        raise BenchError(f"{path}: addition_embed_type is {addition!r}; a Stable Diffusion 1.x / 2.x pipeline's UNet "
                         "has none (SDXL's text_time needs text_encoder_2 and tokenizer_2 in the pipeline)")
    if kind == SDXL:
        if addition != "text_time":
            raise BenchError(f"{path}: addition_embed_type is {addition!r}; an SDXL pipeline's UNet takes 'text_time' "
                             "(pooled text embeddings and time ids)")
        pooled, step = texts["text_encoder_2"].get("projection_dim"), unet.get("addition_time_embed_dim")
        want = unet.get("projection_class_embeddings_input_dim")
        if not (_positive_int(pooled) and _positive_int(step)) or pooled + 6 * step != want:
            raise BenchError(f"{path}: projection_class_embeddings_input_dim is {want!r}, but text_encoder_2's "
                             f"projection_dim {pooled!r} + 6 time ids x addition_time_embed_dim {step!r} is not")


def _transformer_config(directory: Path, config_path: Path, kind: str) -> dict:
    """A DiT or PixArt-alpha transformer's config over its class's defaults, checked for what the pipeline gives
    it: latents of ``in_channels``, an output of eps (``out_channels == in_channels``) or eps and a learned variance
    (twice as many, split off), class labels of ``num_embeds_ada_norm`` classes (DiT) or T5 captions as wide as the
    text encoder (PixArt-alpha)."""
    import diffusers

    class_name = KIND_PARTS[kind]["transformer"][1]
    cls = getattr(diffusers, class_name)
    raw = read_config(config_path, "transformer")
    have = raw.get("_class_name", class_name)
    if have not in ACCEPTED_CLASSES[class_name]:
        raise BenchError(f"{config_path} describes a {have}; {KIND_TITLES[kind]} takes a {class_name}")
    config = {**constructor_defaults(cls), **raw}
    channels, out = config.get("in_channels"), config.get("out_channels")
    out = channels if out is None else out
    if not (_positive_int(channels) and _positive_int(out)):
        raise BenchError(f"{config_path}: in_channels and out_channels must be positive integers, "
                         f"got {channels!r} and {out!r}")
    if out not in (channels, 2 * channels):
        raise BenchError(f"{config_path}: the transformer maps {channels} channels to {out}; the samplers need a "
                         f"prediction of the input's shape, or that and a learned variance ({2 * channels})")
    norm = "ada_norm_zero" if kind == DIT else "ada_norm_single"
    if config.get("norm_type") != norm:
        raise BenchError(f"{config_path}: norm_type is {config.get('norm_type')!r}; {KIND_TITLES[kind]}'s "
                         f"transformer has {norm!r}")
    size = config.get("sample_size")
    if not _positive_int(size):
        raise BenchError(f"{config_path}: sample_size must be a positive integer, got {size!r}")
    if kind == DIT and not _positive_int(config.get("num_embeds_ada_norm")):
        raise BenchError(f"{config_path}: num_embeds_ada_norm (the number of classes) must be a positive integer, "
                         f"got {config.get('num_embeds_ada_norm')!r}")
    if kind == PIXART:
        pixart.check_text_encoder(directory, sd.Release("the PixArt-alpha pipeline", "", (), {}, how_to=LAYOUT_HINT))
        text_path = directory / "text_encoder" / "config.json"
        width = read_config(text_path, "text encoder").get("d_model")
        if config.get("caption_channels") != width:
            raise BenchError(f"{config_path}: caption_channels is {config.get('caption_channels')!r}, but the T5 "
                             f"text encoder ({text_path}) is {width!r} wide (d_model)")
        if config.get("use_additional_conditions") and size != 128:
            raise BenchError(f"{config_path}: use_additional_conditions is true, but PixArtAlphaPipeline gives "
                             "resolution and aspect ratio to sample_size 128 transformers only")
    return {**config, "out_channels": out, "sample_size": [size, size]}


def _vae_shape(path: Path, latent_channels: int, latent_size: list[int]) -> tuple[int, int, int]:
    """The decoded image shape, from the autoencoder's config (checked against the UNet's latents)."""
    from diffusers import AutoencoderKL

    raw = read_config(path, "autoencoder")
    if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise BenchError(f"{path} describes a {raw['_class_name']}; the {SCHEME}: entry decodes with an AutoencoderKL")
    config = {**constructor_defaults(AutoencoderKL), **raw}
    if config.get("latent_channels") != latent_channels:
        raise BenchError(f"{path}: latent_channels is {config.get('latent_channels')!r}, but the UNet takes "
                         f"{latent_channels}")
    scale = config.get("scaling_factor")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise BenchError(f"{path}: scaling_factor must be a positive number, got {scale!r}")
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise BenchError(f"{path}: {key} is set; Stable Diffusion and SDXL pipelines decode latents / "
                             "scaling_factor only, so this autoencoder belongs to another pipeline")
    blocks, out = config.get("block_out_channels"), config.get("out_channels")
    if not (isinstance(blocks, (list, tuple)) and blocks and _positive_int(out)):
        raise BenchError(f"{path}: block_out_channels and out_channels do not describe an image decoder")
    factor = 2 ** (len(blocks) - 1)
    return (out, latent_size[0] * factor, latent_size[1] * factor)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(path: Path, config: dict, key: str) -> float:
    value = config.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise BenchError(f"{path}: {key} must be a number, got {value!r}")
    return float(value)


def read_scheduler(path: Path) -> tuple[dict, torch.Tensor]:
    """``(the config over its class's defaults, betas in float64)``; anything unusable is a one-line BenchError."""
    import diffusers

    raw = read_config(path, "scheduler")
    kind = raw.get("_class_name", SCHEDULER_CLASSES[0])
    if kind not in SCHEDULER_CLASSES:
        raise BenchError(f"{path}: {kind} is not supported; the {SCHEME}: entry reads the noise schedule of "
                         f"{', '.join(SCHEDULER_CLASSES)} configs")
    config = {**constructor_defaults(getattr(diffusers, kind)), **raw}
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise BenchError(f"{path}: prediction_type is {prediction!r}; the benchmark's samplers take "
                         f"epsilon-predicting models only, or v-prediction turned into epsilon "
                         f"({' or '.join(PREDICTION_TYPES)})")
    if config.get("rescale_betas_zero_snr"):
        raise BenchError(f"{path}: rescale_betas_zero_snr is not supported (the schedule would not be the one given "
                         "by beta_schedule)")
    if config.get("timestep_type", "discrete") != "discrete":
        raise BenchError(f"{path}: timestep_type is {config['timestep_type']!r}; the UNet would be fed other "
                         "timesteps than the schedule's integers, which the samplers give")
    steps = config.get("num_train_timesteps")
    if not _positive_int(steps) or steps < 2:
        raise BenchError(f"{path}: num_train_timesteps must be an integer >= 2, got {steps!r}")
    return config, _betas(path, config, steps)


def _betas(path: Path, config: dict, steps: int) -> torch.Tensor:
    trained = config.get("trained_betas")
    if trained is not None:
        try:
            betas = np.asarray(trained, dtype=np.float64)
        except (TypeError, ValueError):
            raise BenchError(f"{path}: trained_betas must be a list of numbers") from None
        if betas.shape != (steps,):
            raise BenchError(f"{path}: trained_betas holds {betas.size} values, num_train_timesteps is {steps}")
    else:
        schedule = config.get("beta_schedule")
        if schedule not in BETA_SCHEDULES:
            raise BenchError(f"{path}: beta_schedule {schedule!r} is not supported; use one of "
                             f"{', '.join(BETA_SCHEDULES)} (or trained_betas)")
        if schedule == "squaredcos_cap_v2":  # diffusers' betas_for_alpha_bar(T, alpha_transform_type="cosine")
            def alpha_bar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                              for i in range(steps)], dtype=np.float64)
        else:
            start, end = _number(path, config, "beta_start"), _number(path, config, "beta_end")
            if not 0 < start <= end < 1:
                raise BenchError(f"{path}: need 0 < beta_start <= beta_end < 1, got {start} and {end}")
            if schedule == "linear":
                betas = np.linspace(start, end, steps, dtype=np.float64)
            else:  # scaled_linear: linear in sqrt(beta)
                betas = np.linspace(start ** 0.5, end ** 0.5, steps, dtype=np.float64) ** 2
    if not (np.isfinite(betas).all() and (betas > 0).all() and (betas < 1).all()):
        raise BenchError(f"{path}: the betas must lie in (0, 1)")
    return torch.from_numpy(betas)


def read_pipeline(spec: str) -> Pipeline:
    """Locate ``spec`` and check its configs (no weights read)."""
    directory, source = resolve(spec)
    kind, settings = _read_model_index(directory)
    if kind == UNCONDITIONAL:
        unet_dir = next((d for d in (directory / "unet", directory) if (d / "config.json").is_file()), None)
        scheduler_path = _first_file(directory, "scheduler/scheduler_config.json", "scheduler_config.json")
    else:  # a latent pipeline has the diffusers layout, with every file in its component's folder
        folder = "transformer" if kind in TRANSFORMER_KINDS else "unet"
        unet_dir = directory / folder if (directory / folder / "config.json").is_file() else None
        scheduler_path = _first_file(directory, "scheduler/scheduler_config.json")
    if unet_dir is None:
        folder = "transformer" if kind in TRANSFORMER_KINDS else "unet"
        raise BenchError(f"{directory} holds no {folder}/config.json; {LAYOUT_HINT}")
    if scheduler_path is None:
        raise BenchError(f"{directory} has no scheduler/scheduler_config.json, which gives the noise schedule "
                         "(beta_schedule, beta_start, beta_end, num_train_timesteps); save the pipeline's scheduler "
                         "there (scheduler.save_config(DIR / 'scheduler'))")
    if kind in TRANSFORMER_KINDS:
        unet = _transformer_config(directory, unet_dir / "config.json", kind)
    else:
        unet = _unet_config(unet_dir / "config.json", kind)
    image_shape = (unet["in_channels"], *unet["sample_size"])
    output_shape = None
    if kind in TRANSFORMER_KINDS:
        output_shape = _vae_shape(directory / "vae" / "config.json", unet["in_channels"], unet["sample_size"])
    elif kind != UNCONDITIONAL:
        texts = {part: sd.text_config(directory / part / "config.json")
                 for part in KIND_PARTS[kind] if part.startswith("text_encoder")}
        _check_text_unet(unet_dir / "config.json", unet, kind, texts)
        output_shape = _vae_shape(directory / "vae" / "config.json", unet["in_channels"], unet["sample_size"])
    scheduler, betas = read_scheduler(scheduler_path)
    return Pipeline(name=f"{SCHEME}:{spec}", directory=directory, source=source, unet_dir=unet_dir,
                    scheduler_path=scheduler_path, scheduler=scheduler, betas=betas, image_shape=image_shape,
                    kind=kind, output_shape=output_shape, settings=settings)


# ----------------------------------------------------------------------------------------------------------- loading


def _default_batch_size(shape: tuple[int, int, int]) -> int:
    pixels = shape[1] * shape[2]
    return 64 if pixels <= 32 * 32 else 16 if pixels <= 64 * 64 else 4


def _verify_manifest(directory: Path) -> None:
    if (directory / MANIFEST).is_file():
        verify_files(directory, read_manifest(directory, LAYOUT_HINT), [], LAYOUT_HINT)


def _info(pipeline: Pipeline, files: list[Path]) -> dict:
    directory = pipeline.directory
    return {
        **pipeline.source, "directory": str(directory),
        "files": {p.relative_to(directory).as_posix(): sha256_file(p) for p in files},
        "pipeline": pipeline.kind,
        "image_shape": list(pipeline.image_shape),
        "scheduler": {k: v for k, v in pipeline.scheduler.items() if k != "trained_betas"},
        "schedule": {"num_train_timesteps": pipeline.num_train_timesteps,
                     "betas": "trained_betas" if pipeline.scheduler.get("trained_betas") is not None
                     else pipeline.scheduler.get("beta_schedule")},
        "prediction_type": pipeline.prediction_type,
    }


def load(pipeline: Pipeline, checkpoint: Path | None = None) -> ZooModel:
    """The model of ``pipeline``: its UNet (and a text-to-image pipeline's autoencoder and text encoders) in
    float32, eval mode, no gradients, on the CPU."""
    from diffusers import UNet2DModel

    if checkpoint is not None:
        raise BenchError(f"model {pipeline.name!r} names its own weights; leave run.checkpoint (--checkpoint) empty")
    _verify_manifest(pipeline.directory)
    schedule = NoiseSchedule(pipeline.betas.clone())
    if pipeline.kind in TRANSFORMER_KINDS:
        return _load_transformer(pipeline, schedule)
    if pipeline.kind != UNCONDITIONAL:
        return _load_text_to_image(pipeline, schedule)
    unet, weights = load_diffusers_model(UNet2DModel, pipeline.unet_dir, f"UNet of {pipeline.name}", LAYOUT_HINT)
    if any(p.dtype != torch.float32 for p in unet.parameters()):
        unet = unet.float()  # the full-precision reference is float32, whatever the file stores
    prediction = pipeline.prediction_type
    return ZooModel(
        name=pipeline.name, unet=unet, schedule=schedule,
        image_shape=pipeline.image_shape, default_sampler="ddim-uniform",
        default_steps=min(100, pipeline.num_train_timesteps), info=_info(pipeline, [*pipeline.files, weights]),
        make_denoiser=None if prediction == "epsilon"
        else lambda net: epsilon_denoiser(unet_denoiser(net), schedule, prediction),
        default_batch_size=_default_batch_size(pipeline.image_shape),
    )


def _load_text_to_image(pipeline: Pipeline, schedule: NoiseSchedule) -> ZooModel:
    """A Stable Diffusion 1.x / 2.x or SDXL pipeline, with the zoo's SD machinery (``bench.zoo.sd``, ``.sdxl``)."""
    sd.require_transformers(pipeline.name)
    directory, kind, parts = pipeline.directory, pipeline.kind, KIND_PARTS[pipeline.kind]
    release = sd.Release(pipeline.name, pipeline.source["checkpoint"], (), sd.layout_of(parts),
                         ("model_index.json", *(f"{p}/special_tokens_map.json" for p in parts if "tokenizer" in p)),
                         how_to=LAYOUT_HINT)
    files = sd.find_files(directory, release)
    loaded = sd.load_parts(directory, files, pipeline.name, parts)
    tokenizers = [name for name in parts if name.startswith("tokenizer")]
    encoders = [name for name in parts if name.startswith("text_encoder")]
    for name, encoder in zip(tokenizers, encoders, strict=True):
        sd.check_tokenizer(loaded[name], directory / name, encoder_positions(loaded[encoder]))
    prompts_path = sd.prompt_file(None if pipeline.source["source"] == "hub" else directory)
    prompts = sd.read_prompts(prompts_path)
    _, height, width = pipeline.image_output_shape
    if kind == SDXL:
        conditioning = sdxl.SDXLConditioning(
            [loaded[n] for n in tokenizers], [loaded[n] for n in encoders], prompts,
            time_ids=sdxl.time_ids(height, width),
            zero_uncond=bool(pipeline.settings.get("force_zeros_for_empty_prompt", True)))
        about, sampler, batch_size = sdxl.conditioning_info(conditioning), "ddim-ldm", sdxl.DEFAULT_BATCH_SIZE
    else:
        conditioning = sd.PromptConditioning(loaded["tokenizer"], loaded["text_encoder"], prompts)
        about = {"guidance_scale": conditioning.guidance_scale, "negative_prompt": conditioning.negative_prompt,
                 "guidance": "one UNet call on cat([x, x]) with cat([uncond, cond]) embeddings"}
        sampler, batch_size = "plms", sd.DEFAULT_BATCH_SIZE
    info = {**_info(pipeline, [directory / f for f in files]), **about,
            "latent_scale": float(loaded["vae"].config.scaling_factor),
            "prompts": sd.prompts_info(prompts_path, prompts)}
    prediction = pipeline.prediction_type
    return ZooModel(
        name=pipeline.name, unet=loaded["unet"], schedule=schedule, image_shape=pipeline.image_shape,
        default_sampler=sampler, default_steps=min(50, pipeline.num_train_timesteps), info=info,
        make_denoiser=lambda net: epsilon_denoiser(conditioning.denoiser(net), schedule, prediction),
        decoder=functools.partial(sd.decode_latents, loaded["vae"]), start_batch=conditioning.start_batch,
        output_shape=pipeline.output_shape, default_eta=0.0, default_batch_size=batch_size,
        parts={name: loaded[name] for name in ("vae", *encoders)},
    )


def _load_transformer(pipeline: Pipeline, schedule: NoiseSchedule) -> ZooModel:
    """A DiT or PixArt-alpha pipeline, with the zoo's machinery for them (``bench.zoo.dit``, ``.pixart``):
    safetensors weights only, the learned variance split off, guidance at the scale of diffusers' pipeline."""
    directory, kind, parts = pipeline.directory, pipeline.kind, KIND_PARTS[pipeline.kind]
    if kind == PIXART:
        sd.require_transformers(pipeline.name)
    release = sd.Release(pipeline.name, pipeline.source["checkpoint"], (), dit.layout(parts),
                         ("model_index.json", *(f"{p}/{f}" for p in parts if p.startswith("tokenizer")
                                                for f in ("special_tokens_map.json", "tokenizer.json"))),
                         how_to=LAYOUT_HINT)
    if kind == PIXART:
        pixart.check_text_encoder(directory, release)
    files = dit.find_shards(directory, sd.find_files(directory, release), release)
    loaded = dit.load_safe_parts(directory, files, pipeline.name, parts)
    info = {**_info(pipeline, [directory / f for f in files]),
            "latent_scale": float(loaded["vae"].config.scaling_factor)}
    transformer, vae = loaded["transformer"], loaded["vae"]
    if kind == DIT:
        model = dit.assemble(pipeline.name, transformer, vae, schedule, info,
                             guidance_scale=dit.PIPELINE_GUIDANCE_SCALE)
    else:
        prompts_path = sd.prompt_file(None if pipeline.source["source"] == "hub" else directory)
        prompts = sd.read_prompts(prompts_path)
        conditioning = pixart.PixArtConditioning(
            loaded["tokenizer"], loaded["text_encoder"], prompts,
            micro_conditions=pixart.micro_conditions(transformer, pipeline.image_output_shape))
        info["prompts"] = sd.prompts_info(prompts_path, prompts)
        model = pixart.assemble(pipeline.name, transformer, vae, conditioning, schedule, info,
                                loaded["text_encoder"])
    prediction = pipeline.prediction_type
    if prediction != "epsilon":  # the variance is split off first: what remains is v
        guided = model.make_denoiser
        model.make_denoiser = lambda net: epsilon_denoiser(guided(net), schedule, prediction)
    model.default_steps = min(model.default_steps, pipeline.num_train_timesteps)
    return model


def encoder_positions(encoder: torch.nn.Module) -> int:
    """The number of token positions a CLIP text encoder embeds (what its tokenizer must pad to)."""
    return int(encoder.config.max_position_embeddings)


def make_entry(spec: str) -> ZooEntry:
    """The zoo entry of ``diffusers:<spec>``, built from the configs (what a matrix needs at --dry-run)."""
    pipeline = read_pipeline(spec)

    def load_entry(checkpoint: Path | None = None) -> ZooModel:
        return load(read_pipeline(spec), checkpoint)  # read again: the files may have changed since

    channels, height, width = pipeline.image_shape
    scheduler = pipeline.scheduler.get("_class_name", SCHEDULER_CLASSES[0])
    if pipeline.kind == UNCONDITIONAL:
        what = f"UNet2DModel {channels}x{height}x{width}"
    else:
        _, out_h, out_w = pipeline.image_output_shape
        title = {SD: "Stable Diffusion 1.x / 2.x text-to-image", SDXL: "SDXL text-to-image",
                 DIT: "DiT class-conditional", PIXART: "PixArt-alpha text-to-image"}[pipeline.kind]
        what = f"{title} {out_w}x{out_h} ({channels}x{height}x{width} latents)"
    return ZooEntry(
        name=pipeline.name, load=load_entry, train_timesteps=pipeline.num_train_timesteps,
        output_size=tuple(pipeline.image_output_shape[1:]),
        description=f"diffusers pipeline {spec}: {what}, {scheduler} with T = {pipeline.num_train_timesteps}"
                    + ("" if pipeline.prediction_type == "epsilon" else f", {pipeline.prediction_type}"),
        reference=ReferenceData(),  # unknown training data: reference_images / reference_stats when given
        family="transformer" if pipeline.kind in (DIT, PIXART) else "unet",
    )


register_scheme(SCHEME, make_entry, USAGE,
                "an unconditional pixel-space UNet2DModel pipeline, a Stable Diffusion 1.x / 2.x, SDXL or "
                "PixArt-alpha text-to-image pipeline, or a DiT class-conditional pipeline (model_index.json and its "
                "components): a directory, or a hub id from the local Hugging Face cache")
