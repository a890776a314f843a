"""DiT-XL/2 at 256x256 (``facebook/DiT-XL-2-256``): a class-conditional latent transformer on ImageNet.

Setting: 256x256 images (32x32x4 latents of the ``sd-vae-ft-ema`` autoencoder, scaled by 0.18215), DDPM's linear
schedule (beta 0.0001 to 0.02, T = 1000, from the scheduler config), ImageNet class labels with classifier-free
guidance. Only the transformer (``ZooModel.unet``) is quantized; the autoencoder stays in full precision
(``ZooModel.parts``).

Classifier-free guidance (diffusers' ``DiTPipeline.__call__``, followed exactly)
    ``make_denoiser(transformer)`` is ONE call of the transformer on the doubled batch ``cat([x, x])`` with class
    labels ``cat([labels, null])``: the CONDITIONAL half first, then the null class 1000 (the pipeline's, and the DiT
    repository's ``sample.py``; the reverse of Stable Diffusion's order). On the first ``in_channels`` (4) output
    channels, ``eps = eps_u + s (eps_c - eps_u)``; the other 4 channels are the learned variance (below), split off.
    DiT's own ``forward_with_cfg`` guides only the first 3 channels "for exact reproducibility"; diffusers guides all
    4 latent channels, and so does this entry. Scale ``s`` = :data:`GUIDANCE_SCALE` = 1.5, the setting of the DiT
    paper's headline FID-50K (2.27, 250 DDPM steps, cfg 1.5) -- the benchmark measures FID; diffusers' pipeline
    defaults to 4.0, the paper's scale for its sample figures (:data:`PIPELINE_GUIDANCE_SCALE`).

Class labels
    ``start_batch(seeds)`` gives seed ``s`` the class ``s % 1000``: the seed alone decides it, so an image does not
    depend on its batch or the world size, and 1000 consecutive seeds cover every class once (the class-balanced
    draws of FID-50K evaluations).

Learned variance
    DiT-XL/2 predicts ``[eps, variance]`` (``out_channels`` 8 = 2 x 4). The denoiser returns eps only, as the
    pipeline does before its scheduler step (``torch.split(noise_pred, latent_channels, dim=1)``). Every sampler of
    the benchmark ignores the learned variance: DDIM, PLMS and DPM-Solver++ are deterministic in eps, and DDPM
    (``ddpm-*``, ``ddpm-ldm-uniform``) uses a fixed variance (beta_t or the posterior's). DiT's published samples
    (250 DDPM steps, variance interpolated between beta_t and the posterior variance by the network's output, the
    ``learned_range`` of improved DDPM) are therefore NOT reproduced by any of them; the default sampler,
    ``ddpm-ldm-uniform`` with 250 steps, is the paper's sampler and step count with the posterior variance in place
    of the learned one. :mod:`bench.zoo.learned_variance` holds DiT's learned-variance DDPM sampler (checked against
    diffusers' ``DDPMScheduler(variance_type="learned_range")``), outside the matrix.

What ``load(checkpoint)`` accepts
    - ``None`` or ``"facebook/DiT-XL-2-256"``: that repository in the local Hugging Face cache, read only (nothing is
      downloaded), restricted to :data:`HUB_PATTERNS`;
    - a directory in that repository's diffusers layout (``hf download facebook/DiT-XL-2-256 --local-dir DIR``).
    Weights are read from safetensors files only (``use_safetensors=True``, ``local_files_only=True``): a ``.bin``
    beside them, or instead of them, is never read. The configs must be DiT-XL/2's architecture
    (:data:`TRANSFORMER_ARCH`), the schedule DDPM's linear one, the autoencoder SD's interface, all checked before any
    weight is read; a missing, unexpected or misshapen tensor is an error; ``info["files"]`` records the SHA-256 of
    every file read. The hub's ``transformer/config.json`` names the legacy class ``Transformer2DModel``; it is read
    as ``DiTTransformer2DModel``, as ``DiTPipeline`` does.

``dit-xl-2-256-random``: the exact architecture (transformer and autoencoder) with seeded random weights, no file read:
speed and memory only (``--estimate``); its images are not images of anything.

Shared with ``bench.zoo.pixart`` and the generic ``diffusers:`` entry: :func:`split_variance`, :func:`layout`,
:func:`find_shards` and :func:`load_safe_parts` (safetensors-only, strict loading of a pipeline's parts).
"""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modiff.samplers import Denoiser
from modiff.schedules import NoiseSchedule

from ..errors import BenchError
from ..provenance import sha256_file
from .checkpoints import constructor_defaults, first_line, read_config
from .model import ZooModel
from .registry import ReferenceData, ZooEntry, register_model
from .sd import VAE_INTERFACE, Release, check_keys, decode_latents, find_files, from_pretrained, locate

NAME = "dit-xl-2-256"
RANDOM_NAME = "dit-xl-2-256-random"
RANDOM_SEED = 0
TITLE = "DiT-XL/2 256x256"
HUB_ID = "facebook/DiT-XL-2-256"
GUIDANCE_SCALE = 1.5  # the DiT paper's FID-50K setting (Peebles & Xie 2023, table 4: FID 2.27 at cfg 1.5)
PIPELINE_GUIDANCE_SCALE = 4.0  # diffusers' DiTPipeline default, the paper's scale for its figures
NUM_CLASSES = 1000  # ImageNet
NULL_CLASS = 1000  # the unconditional label of guidance (DiTPipeline's class_null; DiT's y_null)
LATENT_SCALE = 0.18215  # sd-vae-ft-ema's scaling factor (the autoencoder config's default)
IMAGE_SHAPE = (4, 32, 32)  # latents
OUTPUT_SHAPE = (3, 256, 256)
BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS = 0.0001, 0.02, 1000
DEFAULT_SAMPLER, DEFAULT_STEPS = "ddpm-ldm-uniform", 250  # the paper's DDPM 250 steps (fixed posterior variance)
# MoDiff keeps â and ô for every wrapped layer and (doubled) sample: DiT-XL/2 has 256 tokens of 1152 channels through
# 28 blocks (q/k/v, out, two MLP layers of 4608): about 2 x 58 M floats, ~0.5 GB per guided half-sample in fp32
# (an estimate from the shapes, not measured), ~1 GB per image: 16 images fit a 40 GB budget with the activations.
DEFAULT_BATCH_SIZE = 16

HUB_PATTERNS = ("model_index.json", "*/config.json", "scheduler/scheduler_config.json",
                "transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors")

# part -> (library, class, what messages call it)
PARTS: dict[str, tuple[str, str, str]] = {
    "transformer": ("diffusers", "DiTTransformer2DModel", "transformer"),
    "vae": ("diffusers", "AutoencoderKL", "autoencoder"),
}
# the class names a DiT transformer config may carry: the hub's file predates DiTTransformer2DModel
TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")

# Source: transformer/config.json of facebook/DiT-XL-2-256 (diffusers 0.12 conversion of DiT's DiT-XL/2 checkpoint,
# "_class_name": "Transformer2DModel"): depth 28, hidden 1152 = 16 heads x 72, patch 2 on 32x32x4 latents, class
# embedding of 1000 labels (+1 null), adaLN-Zero, learn_sigma (8 output channels). 749,826,464 parameters in diffusers'
# layout, which copies the timestep and class embedders into every block; counted once, plus the frozen positional
# embedding (a buffer here), DiT's 675,129,632 (both counted on the meta device in tests/test_zoo_dit.py).
TRANSFORMER_ARCH: dict = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 8,
    "patch_size": 2,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero",
}
# Keys the file may leave to the class's defaults, at DiT's values (checked over DiTTransformer2DModel's defaults)
TRANSFORMER_LATER_KEYS: dict = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
    "dropout": 0.0,
}
# Source: scheduler/scheduler_config.json of facebook/DiT-XL-2-256: DDPM's linear schedule (DiT's
# gaussian_diffusion, "linear", 1000 steps), epsilon prediction
SCHEDULER_CONFIG: dict = {
    "beta_start": BETA_START,
    "beta_end": BETA_END,
    "beta_schedule": "linear",
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "trained_betas": None,
    "prediction_type": "epsilon",
}
# What the decoder relies on: SD's autoencoder interface (sd-vae-ft-ema) at SD's scale: bench.zoo.sd's VAE_INTERFACE
# The architecture of stabilityai/sd-vae-ft-ema (vae/config.json): AutoencoderKL's defaults at SD's sizes; for the
# random variant only
VAE_ARCH: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": LATENT_SCALE,
}

def schedule() -> NoiseSchedule:
    """DDPM's linear betas, ``linspace(0.0001, 0.02, 1000)`` in float64."""
    return NoiseSchedule(torch.from_numpy(np.linspace(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS, dtype=np.float64)))


# ------------------------------------------------------------------------------------------------ learned variance


def split_variance(output: torch.Tensor, channels: int) -> torch.Tensor:
    """The noise prediction of a network ``output`` over ``channels`` latent channels: its first ``channels``
    channels when it has twice as many (``[eps, variance]``, a learned variance, split off as diffusers' DiT and
    PixArt pipelines do: ``out_channels // 2 == latent_channels``), else the output itself."""
    return output[:, :channels] if output.shape[1] == 2 * channels else output


# ---------------------------------------------------------------------------------------------------- conditioning


class ClassConditioning:
    """Seeds -> ImageNet classes, and the guided denoiser of a class-conditional DiT (module docstring).

    ``start_batch(seeds)`` sets the batch's labels; the denoiser refuses a batch it was not set for.
    ``class_labels(batch)`` are the labels of the doubled batch: the batch's classes, then ``null_class`` for each."""

    def __init__(self, guidance_scale: float = GUIDANCE_SCALE, num_classes: int = NUM_CLASSES,
                 null_class: int = NULL_CLASS):
        self.guidance_scale = float(guidance_scale)
        self.num_classes = int(num_classes)
        self.null_class = int(null_class)
        self.batch_classes: list[int] = []
        self._labels: torch.Tensor | None = None

    def label(self, seed: int) -> int:
        return int(seed) % self.num_classes

    def start_batch(self, seeds: Sequence[int]) -> None:
        self.batch_classes = [self.label(s) for s in seeds]
        n = len(self.batch_classes)
        self._labels = torch.tensor(self.batch_classes + [self.null_class] * n, dtype=torch.long)

    def class_labels(self, batch: int) -> torch.Tensor:
        rows = None if self._labels is None else self._labels.shape[0]
        if rows != 2 * batch:
            have = "none" if rows is None else f"one for {rows // 2} samples"
            raise RuntimeError(f"no class labels for a batch of {batch} (have {have}): call "
                               "model.start_batch(seeds) before the batch's first step")
        return self._labels

    def denoiser(self, transformer: nn.Module) -> Denoiser:
        """``transformer`` with classifier-free guidance on its eps channels, the variance split off: one call on
        the doubled batch, the conditional half first (``DiTPipeline``)."""

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            batch, channels = x.shape[0], x.shape[1]
            labels = self.class_labels(batch).to(x.device)
            t2 = torch.cat([t, t]) if t.dim() else t.expand(2 * batch)
            out = transformer(torch.cat([x, x]), timestep=t2, class_labels=labels).sample
            eps = out[:, :channels]
            eps_cond, eps_uncond = eps.chunk(2)
            return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

        return denoise


def conditioning_info(conditioning: ClassConditioning) -> dict:
    return {
        "guidance_scale": conditioning.guidance_scale,
        "guidance": "one transformer call on cat([x, x]) with class labels cat([labels, null]) (conditional half "
                    "first, DiTPipeline); guidance on the in_channels eps channels, the learned variance split off",
        "null_class": conditioning.null_class,
        "classes": f"class of seed s = s % {conditioning.num_classes}",
        "learned_variance": "split off; ignored by every sampler (DDIM, PLMS, DPM-Solver++ use eps only, DDPM a "
                            "fixed variance)",
    }


# ----------------------------------------------------------------------------------------------- safe loading


def layout(parts: dict[str, tuple[str, str, str]]) -> dict[str, tuple[tuple[str, ...], ...]]:
    """The files a pipeline directory needs for ``parts`` and its scheduler, safetensors weights only: a diffusers
    model's ``diffusion_pytorch_model.safetensors``, a transformers model's ``model.safetensors`` or sharded
    ``model.safetensors.index.json`` (its shards: :func:`find_shards`), a T5 tokenizer's ``spiece.model`` or
    ``tokenizer.json``."""
    found: dict[str, tuple[tuple[str, ...], ...]] = {}
    for part, (library, class_name, _) in parts.items():
        if class_name.endswith(("Tokenizer", "TokenizerFast")):
            found[f"{part} config"] = ((f"{part}/tokenizer_config.json",),)
            found[f"{part} vocabulary"] = ((f"{part}/spiece.model",), (f"{part}/tokenizer.json",))
            continue
        found[f"{part} config"] = ((f"{part}/config.json",),)
        if library == "diffusers":
            found[f"{part} weights"] = ((f"{part}/diffusion_pytorch_model.safetensors",),)
        else:
            found[f"{part} weights"] = ((f"{part}/model.safetensors",), (f"{part}/model.safetensors.index.json",))
    found["scheduler config"] = (("scheduler/scheduler_config.json",),)
    return found


RELEASE = Release(TITLE, HUB_ID, HUB_PATTERNS, layout(PARTS), optional_files=("model_index.json",), download=False)


def find_shards(directory: Path, files: Sequence[str], release: Release) -> list[str]:
    """``files`` with the shards every ``*.safetensors.index.json`` among them names (each must exist)."""
    shards: list[str] = []
    for name in files:
        if not name.endswith(".safetensors.index.json"):
            continue
        index = read_config(directory / name, f"{release.title} weights index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise BenchError(f"{directory / name} has no weight_map; {release.hint}")
        folder = Path(name).parent
        for shard in sorted(set(map(str, weight_map.values()))):
            path = (folder / shard).as_posix()
            if Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise BenchError(f"{directory / name} names {shard!r}; expected safetensors files beside it")
            if not (directory / path).is_file():
                raise BenchError(f"{directory} is not a complete {release.title} checkpoint: missing {path} (named "
                                 f"by {name}); {release.hint}")
            shards.append(path)
    return [*files, *shards]


def _weights_file(files: Sequence[str], part: str) -> str | None:
    """The weights file of ``part`` among ``files`` (a safetensors file or a sharded index), or None."""
    return next((f for f in files if f.startswith(f"{part}/")
                 and (f.endswith(".safetensors.index.json") or f.endswith(".safetensors"))), None)


def load_safe_parts(directory: Path, files: Sequence[str], title: str,
                    parts: dict[str, tuple[str, str, str]]) -> dict:
    """Each of ``parts`` from ``directory/<part>``, offline and from safetensors only (``use_safetensors=True``,
    ``local_files_only=True``: a ``.bin`` is never read), strictly (``bench.zoo.sd.from_pretrained``: a missing,
    unexpected or misshapen tensor is a one-line BenchError): models in float32, eval mode, without gradients;
    tokenizers as they are."""
    loaded = {}
    for part, (library, class_name, what) in parts.items():
        cls = getattr(importlib.import_module(library), class_name)
        weights = _weights_file(files, part)
        try:
            if weights is None:  # a tokenizer
                loaded[part] = from_pretrained(title, what, cls.from_pretrained, directory / part)
                continue
            kwargs = {"use_safetensors": True}
            if library == "diffusers":
                kwargs["low_cpu_mem_usage"] = False  # accelerate is not a dependency
            model = from_pretrained(title, what, cls.from_pretrained, directory / part, weights, **kwargs)
        except ImportError as exc:  # e.g. a tokenizer that needs sentencepiece to convert spiece.model
            raise BenchError(f"cannot load the {title} {what} from {directory / part}: {first_line(exc)}") from None
        loaded[part] = model.float().eval().requires_grad_(False)
    return loaded


def check_transformer_class(path: Path, raw: dict, accepted: Sequence[str], title: str) -> None:
    have = raw.get("_class_name", accepted[0])
    if have not in accepted:
        raise BenchError(f"{path} is not {title}'s transformer: _class_name is {have!r}, expected "
                         f"{' or '.join(repr(a) for a in accepted)}")


def check_configs(directory: Path, arch: dict | None = None) -> None:
    """DiT-XL/2's architecture, schedule and autoencoder interface on the config files alone."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    path = directory / "transformer" / "config.json"
    raw = read_config(path, f"{TITLE} transformer")
    check_transformer_class(path, raw, TRANSFORMER_CLASSES, TITLE)
    check_keys(path, raw, TRANSFORMER_ARCH if arch is None else arch, "transformer", RELEASE)
    check_keys(path, {**constructor_defaults(DiTTransformer2DModel), **raw}, TRANSFORMER_LATER_KEYS, "transformer",
               RELEASE, optional=True)
    path = directory / "scheduler" / "scheduler_config.json"
    check_keys(path, {"trained_betas": None, "prediction_type": "epsilon", **read_config(path, "scheduler")},
               SCHEDULER_CONFIG, "noise schedule", RELEASE)
    path = directory / "vae" / "config.json"
    check_keys(path, {**constructor_defaults(AutoencoderKL), **read_config(path, "autoencoder")}, VAE_INTERFACE,
               "autoencoder", RELEASE, optional=True)


def decoded_shape(vae: nn.Module, latent_shape: Sequence[int]) -> tuple[int, int, int]:
    """The images ``vae`` decodes latents of ``latent_shape`` ``(C, H, W)`` to."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (int(vae.config.out_channels), int(latent_shape[-2]) * factor, int(latent_shape[-1]) * factor)


def assemble(name: str, transformer: nn.Module, vae: nn.Module, noise_schedule: NoiseSchedule, info: dict,
             guidance_scale: float = GUIDANCE_SCALE, batch_size: int = DEFAULT_BATCH_SIZE) -> ZooModel:
    """The ZooModel of a class-conditional DiT ``transformer`` (its config gives the latents and the classes) with
    the autoencoder ``vae``."""
    config = transformer.config
    classes = int(config.num_embeds_ada_norm)
    conditioning = ClassConditioning(guidance_scale, num_classes=classes, null_class=classes)
    image_shape = (int(config.in_channels), int(config.sample_size), int(config.sample_size))
    return ZooModel(
        name=name, unet=transformer, schedule=noise_schedule, image_shape=image_shape,
        default_sampler=DEFAULT_SAMPLER, default_steps=min(DEFAULT_STEPS, noise_schedule.num_train_timesteps),
        info={**info, **conditioning_info(conditioning)}, make_denoiser=conditioning.denoiser,
        decoder=functools.partial(decode_latents, vae), start_batch=conditioning.start_batch,
        output_shape=decoded_shape(vae, image_shape), default_eta=0.0, default_batch_size=batch_size,
        parts={"vae": vae},
    )


def load(checkpoint: str | Path | None = None) -> ZooModel:
    """The zoo entry (module docstring): transformer and autoencoder in fp32, eval mode, no gradients, on the CPU."""
    directory, source = locate(RELEASE, checkpoint)
    files = find_files(directory, RELEASE)
    check_configs(directory)
    loaded = load_safe_parts(directory, files, TITLE, PARTS)
    info = {**source, "directory": str(directory),
            "files": {name: sha256_file(directory / name) for name in files},
            "latent_scale": float(loaded["vae"].config.scaling_factor)}
    return assemble(NAME, loaded["transformer"], loaded["vae"], schedule(), info)


ENTRY = register_model(ZooEntry(
    name=NAME, load=load, train_timesteps=NUM_TRAIN_TIMESTEPS, output_size=OUTPUT_SHAPE[1:],
    description=f"DiT-XL/2 256x256 ImageNet class-conditional, guidance {GUIDANCE_SCALE} (class of seed s = s % 1000; "
                f"learned variance split off): {HUB_ID} from the local Hugging Face cache or a diffusers directory",
    reference=ReferenceData(None, "ImageNet train at 256x256 (not redistributed: give reference_images or "
                                  "reference_stats)"),
    family="transformer",
))


# ------------------------------------------------------------------------------------------ random weights, for speed


def random_vae(seed: int = RANDOM_SEED) -> nn.Module:
    """sd-vae-ft-ema's architecture (:data:`VAE_ARCH`) with seeded random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**copy.deepcopy(VAE_ARCH)).eval().requires_grad_(False)


def load_random(checkpoint: str | Path | None = None) -> ZooModel:
    """DiT-XL/2's exact architecture (:data:`TRANSFORMER_ARCH` over the class's defaults) and its autoencoder with
    weights from diffusers' initialisation under seed 0: nothing is read, for measuring speed and memory. Its samples
    are not images of anything; quality against its own full precision (``psnr_to_fp``) is defined."""
    from diffusers import DiTTransformer2DModel

    if checkpoint is not None:
        raise BenchError(f"{RANDOM_NAME} takes no checkpoint (its weights are random, seed {RANDOM_SEED}); "
                         f"use {NAME} for real weights")
    torch.manual_seed(RANDOM_SEED)
    transformer = DiTTransformer2DModel(**{**TRANSFORMER_LATER_KEYS, **copy.deepcopy(TRANSFORMER_ARCH)})
    transformer = transformer.eval().requires_grad_(False)
    info = {"source": "random", "seed": RANDOM_SEED, "architecture": NAME, "latent_scale": LATENT_SCALE}
    return assemble(RANDOM_NAME, transformer, random_vae(), schedule(), info)


RANDOM_ENTRY = register_model(ZooEntry(
    name=RANDOM_NAME, load=load_random, train_timesteps=NUM_TRAIN_TIMESTEPS, output_size=OUTPUT_SHAPE[1:],
    description=f"the {NAME} architecture (transformer and autoencoder) with seeded random weights (no download): "
                "speed and memory only",
    reference=ReferenceData(None, "none: random weights"),
    family="transformer",
))
