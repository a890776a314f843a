"""LDM-8 on LSUN-Churches and LDM-4 on LSUN-Bedrooms (Rombach et al., CVPR 2022) as diffusers models.

The denoisers are the published ``openaimodel.UNetModel`` networks expressed as diffusers ``UNet2DModel``;
the first stages are ``AutoencoderKL`` (f8, churches) and ``VQModel`` (f4, bedrooms). Only the UNet is
quantized; the autoencoder is a full-precision part that turns the sampler's latents into images.

Architectures come from the CompVis configs ``configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml`` and
``lsun_bedrooms-ldm-vq-4.yaml`` (copied below as ``*_YAML``) and the code they name:
``ldm/modules/diffusionmodules/openaimodel.py`` (UNet), ``ldm/modules/diffusionmodules/model.py`` (encoder and
decoder), ``ldm/models/autoencoder.py`` and ``ldm/models/diffusion/ddpm.py`` (schedule, ``scale_factor``,
``decode_first_stage``). How openaimodel maps onto ``UNet2DModel``, and the conversion of a CompVis ``model.ckpt``,
are in the converter, :mod:`bench.zoo.convert.compvis`; this module declares the two networks and loads them.

What ``UNet2DModel`` cannot express exactly: the churches UNet uses a fixed ``num_heads=8`` at every width
(head widths 24, 48 and 96), while ``UNet2DModel`` has one ``attention_head_dim`` for all blocks. Its config
here says ``attention_head_dim=24`` (valid shapes at every width; weights do not depend on the head count) and
the loaders then set each attention module's head count to 8 (and its scale to ``head_dim ** -0.5``). A
churches UNet loaded with plain ``UNet2DModel.from_pretrained`` would attend with 16 or 32 heads in the deeper
levels: load it through this module. The bedrooms UNet (``num_head_channels=32``) is expressed exactly.

Latent scaling: churches use ``scale_by_std``, so their ``scale_factor`` is a buffer of the checkpoint (``1/std``
of the first training batch's latents); in the diffusers layout it is ``vae/config.json``'s ``scaling_factor``.
Bedrooms use ``scale_factor = 1.0`` (the config's default); a ``VQModel`` config's ``scaling_factor`` is ignored,
as diffusers' own ``LDMPipeline`` ignores it. Decoding follows ``decode_first_stage`` with its default
``force_not_quantize=False``: the VQ latents are snapped to the codebook before ``post_quant_conv``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from modiff.schedules import NoiseSchedule

from ..errors import BenchError
from ..provenance import sha256_file
from .checkpoints import MANIFEST, check_config, load_diffusers_model, read_manifest, verify_files
from .convert import compvis
from .convert.compvis import (
    AUTOENCODER_PREFIX,
    SCHEDULE_BUFFERS,
    UNET_PREFIX,
    AutoencoderLayout,
    UNetLayout,
    read_lightning_state_dict,
    set_openaimodel_heads,
    split_compvis_state_dict,
)
from .model import ZooModel
from .registry import ReferenceData, ZooEntry, register_model

DECODE_CHUNK = 8  # images per autoencoder call, so decoding a whole cell at once stays within memory
OUTPUT_SHAPE = (3, 256, 256)  # decoded images
# re-exported from the converter (their historical home): callers and tests use ldm.UNET_PREFIX, ...
__all__ = ["AUTOENCODER_PREFIX", "BEDROOM", "CHURCH", "PARTS", "SPECS", "UNET_PREFIX", "LDMSpec",
           "diffusers_to_original", "load", "load_bedroom", "load_church", "original_to_diffusers",
           "read_lightning_state_dict", "schedule", "split_compvis_state_dict"]


# ---- published hyper-parameters (CompVis/latent-diffusion configs, copied verbatim) ----

# configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml, model.params.unet_config.params (openaimodel.UNetModel);
# defaults that matter: num_head_channels=-1, use_new_attention_order=False, conv_resample=True, dropout=0.
CHURCH_UNET_YAML = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 192,
    "attention_resolutions": [1, 2, 4, 8], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4, 4],
    "num_heads": 8, "use_scale_shift_norm": True, "resblock_updown": True,
}
# same file, first_stage_config (ldm.models.autoencoder.AutoencoderKL, the kl-f8 first stage)
CHURCH_AUTOENCODER_YAML = {
    "embed_dim": 4,
    "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
}
# configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml; num_heads defaults to -1 (heads = channels // 32),
# use_scale_shift_norm and resblock_updown default to False.
BEDROOM_UNET_YAML = {
    "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 224,
    "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 4],
    "num_head_channels": 32,
}
# same file, first_stage_config (ldm.models.autoencoder.VQModelInterface, the vq-f4 first stage)
BEDROOM_AUTOENCODER_YAML = {
    "embed_dim": 3, "n_embed": 8192,
    "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
}

# ---- the same networks as diffusers constructor arguments ----

# 32 -> 16 -> 8 -> 4 -> 2 latents; attention at downsampling factors 1, 2, 4, 8 (every level but the 2x2 one)
# and in the mid block; 8 heads everywhere (see the module docstring: attention_head_dim is fixed up on load).
CHURCH_UNET = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["ResnetUpsampleBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"],
    "block_out_channels": [192, 384, 384, 768, 768],  # model_channels * channel_mult
    "layers_per_block": 2, "mid_block_scale_factor": 1, "downsample_padding": 1,
    "downsample_type": "resnet", "upsample_type": "resnet",  # resblock_updown
    "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 24,  # 192 / 8; deeper levels are set to 8 heads on load
    "norm_num_groups": 32, "attn_norm_num_groups": 32, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "scale_shift",  # use_scale_shift_norm
    "add_attention": True, "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}
# ddconfig ch * ch_mult, two ResnetBlocks per level (three in the decoder), attention only in the mid blocks
CHURCH_AUTOENCODER = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 256,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
# 64 -> 32 -> 16 -> 8 latents; attention at downsampling factors 2, 4, 8 and in the mid block, 32 channels
# per head (14, 21 and 28 heads); conv resampling; time embedding added before the second norm.
BEDROOM_UNET = {
    "sample_size": 64, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2, "mid_block_scale_factor": 1, "downsample_padding": 1,
    "downsample_type": "conv", "upsample_type": "conv",
    "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 32,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,  # None: the mid attention uses 32 groups
    "resnet_time_scale_shift": "default",
    "add_attention": True, "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}
BEDROOM_AUTOENCODER = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [128, 256, 512], "layers_per_block": 2, "act_fn": "silu",
    "latent_channels": 3, "sample_size": 256, "num_vq_embeddings": 8192, "norm_num_groups": 32,
    "vq_embed_dim": 3, "norm_type": "group", "mid_block_add_attention": True, "lookup_from_codebook": False,
}


@dataclass(frozen=True)
class LDMSpec:
    key: str  # "church" | "bedroom"
    name: str  # zoo name
    title: str
    url: str  # the CompVis zip holding model.ckpt (latent-diffusion README, "Pretrained LDMs")
    unet_yaml: dict
    autoencoder_yaml: dict
    unet: dict
    autoencoder_class: str  # "AutoencoderKL" | "VQModel"
    autoencoder: dict
    autoencoder_dirs: tuple[str, ...]  # diffusers subfolders accepted for the autoencoder, preferred first
    linear_start: float
    linear_end: float
    num_train_timesteps: int
    scale_factor: float | None  # None: learned (scale_by_std), read from the checkpoint
    default_steps: int
    default_batch_size: int

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet_yaml["image_size"]
        return (self.unet_yaml["in_channels"], size, size)

    @property
    def unet_layout(self) -> UNetLayout:  # what the converter needs (heads per width, qkv order)
        return LAYOUTS[f"{self.key}-unet"]

    @property
    def autoencoder_layout(self) -> AutoencoderLayout:
        return LAYOUTS[f"{self.key}-autoencoder"]

    def missing_message(self) -> str:
        return (f"{self.name} needs the CompVis {self.title} weights, which are not bundled: download {self.url} "
                f"(latent-diffusion README, 'Pretrained LDMs'), unzip it and point run.checkpoint (or --checkpoint) "
                f"at the extracted model.ckpt or its folder")


CHURCH = LDMSpec(
    key="church", name="ldm-church", title="LDM-KL-8 LSUN-Churches",
    url="https://ommer-lab.com/files/latent-diffusion/lsun_churches.zip",
    unet_yaml=CHURCH_UNET_YAML, autoencoder_yaml=CHURCH_AUTOENCODER_YAML,
    unet=CHURCH_UNET, autoencoder_class="AutoencoderKL", autoencoder=CHURCH_AUTOENCODER,
    autoencoder_dirs=("vae", "vqvae"),
    linear_start=0.0015, linear_end=0.0155, num_train_timesteps=1000,  # lsun_churches-ldm-kl-8.yaml
    scale_factor=None,  # scale_by_std: True
    # paper setting (as given for this benchmark's MoDiff runs): 200 DDIM steps, eta 0. The latent-diffusion
    # README's FID row and Q-Diffusion's README sample churches with 400 DDIM steps, eta 0.
    default_steps=200,
    default_batch_size=32,
)
BEDROOM = LDMSpec(
    key="bedroom", name="ldm-bedroom", title="LDM-VQ-4 LSUN-Bedrooms",
    url="https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip",
    unet_yaml=BEDROOM_UNET_YAML, autoencoder_yaml=BEDROOM_AUTOENCODER_YAML,
    unet=BEDROOM_UNET, autoencoder_class="VQModel", autoencoder=BEDROOM_AUTOENCODER,
    autoencoder_dirs=("vqvae", "vae"),
    linear_start=0.0015, linear_end=0.0195, num_train_timesteps=1000,  # lsun_bedrooms-ldm-vq-4.yaml
    scale_factor=1.0,  # scale_by_std not set: LatentDiffusion's default scale_factor
    # paper setting (as given for this benchmark's MoDiff runs): 500 DDIM steps, eta 0. The latent-diffusion
    # README's FID row and Q-Diffusion's README sample bedrooms with 200 DDIM steps, eta 1.
    default_steps=500,
    default_batch_size=16,
)
SPECS = {spec.key: spec for spec in (CHURCH, BEDROOM)}
PARTS = tuple(f"{key}-{part}" for key in SPECS for part in ("unet", "autoencoder"))


def schedule(spec: LDMSpec) -> NoiseSchedule:
    """LDM's ``make_beta_schedule("linear")``: linear in sqrt(beta), squared (diffusers' "scaled_linear")."""
    root = torch.linspace(spec.linear_start ** 0.5, spec.linear_end ** 0.5, spec.num_train_timesteps,
                          dtype=torch.float64)
    return NoiseSchedule(root ** 2)


# the converter's description of each part (identity-hashed: its conversion rules are built once)
LAYOUTS: dict[str, UNetLayout | AutoencoderLayout] = {
    **{f"{key}-unet": UNetLayout(f"{key}-unet", spec.unet_yaml, spec.unet) for key, spec in SPECS.items()},
    **{f"{key}-autoencoder": AutoencoderLayout(f"{key}-autoencoder", spec.autoencoder_class, spec.autoencoder)
       for key, spec in SPECS.items()},
}


def _layout(which: str) -> UNetLayout | AutoencoderLayout:
    if which not in LAYOUTS:
        raise BenchError(f"unknown LDM part {which!r}; choose one of {', '.join(PARTS)}")
    return LAYOUTS[which]


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor], which: str) -> dict[str, torch.Tensor]:
    """A CompVis part's state dict (prefix removed) -> the diffusers one; ``which``: one of :data:`PARTS`."""
    return compvis.original_to_diffusers(state_dict, _layout(which))


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor], which: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`original_to_diffusers`."""
    return compvis.diffusers_to_original(state_dict, _layout(which))


# ---- building the models ----

def _finish(model: nn.Module) -> nn.Module:
    """Inference mode, float32 weights (the full-precision reference the papers quantize from)."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.to(torch.float32)
    return model.eval().requires_grad_(False)


def _build(cls_name: str, kwargs: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A diffusers model holding exactly ``state_dict`` (strict; tensors assigned, not copied)."""
    with torch.device("meta"):
        model = compvis.diffusers_class(cls_name)(**copy.deepcopy(kwargs))
    model.load_state_dict(state_dict, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise AssertionError(f"{cls_name}: tensors left uninitialised after loading")
    return _finish(model)


def build_unet(spec: LDMSpec, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    unet = _build("UNet2DModel", spec.unet, state_dict)
    set_openaimodel_heads(unet, spec.unet_layout)
    return unet


def build_autoencoder(spec: LDMSpec, state_dict: dict[str, torch.Tensor], scale_factor: float) -> nn.Module:
    return _build(spec.autoencoder_class, {**spec.autoencoder, "scaling_factor": scale_factor}, state_dict)


def make_decoder(spec: LDMSpec, autoencoder: nn.Module, scale_factor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents -> images in [-1, 1], as ``LatentDiffusion.decode_first_stage`` then the sampling script's clamp."""
    inverse = 1.0 / scale_factor
    quantize = spec.autoencoder_class == "VQModel"

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        weight = next(autoencoder.parameters())
        images = []
        for chunk in latents.split(DECODE_CHUNK):
            z = chunk.to(device=weight.device, dtype=weight.dtype) * inverse
            if quantize:  # VQModelInterface.decode(h, force_not_quantize=False): nearest codebook entries first
                out = autoencoder.decode(z, force_not_quantize=False).sample
            else:
                out = autoencoder.decode(z).sample
            images.append(out.clamp(-1.0, 1.0).to(device=latents.device, dtype=latents.dtype))
        return torch.cat(images) if images else latents.new_empty((0, *OUTPUT_SHAPE))

    return decode


def _zoo_model(spec: LDMSpec, unet: nn.Module, autoencoder: nn.Module, scale_factor: float, info: dict) -> ZooModel:
    return ZooModel(
        name=spec.name, unet=unet, schedule=schedule(spec), image_shape=spec.latent_shape,
        default_sampler="ddim-ldm", default_steps=spec.default_steps, info=info,
        decoder=make_decoder(spec, autoencoder, scale_factor), output_shape=OUTPUT_SHAPE,
        default_batch_size=spec.default_batch_size, parts={"autoencoder": autoencoder},
    )


def _base_info(spec: LDMSpec, path: Path, layout: str, scale_factor: float) -> dict:
    return {
        "checkpoint": str(path), "layout": layout, "source": spec.url, "architecture": spec.title,
        "scale_factor": scale_factor,
        "schedule": {"betas": "linear in sqrt(beta) (LDM 'linear')", "linear_start": spec.linear_start,
                     "linear_end": spec.linear_end, "num_train_timesteps": spec.num_train_timesteps},
    }


def _check_schedule_buffers(spec: LDMSpec, other: dict, path: Path) -> None:
    if "betas" not in other:
        return
    ours = schedule(spec).betas
    theirs = other["betas"].double()
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-6, atol=1e-10):
        raise BenchError(f"{path}: the checkpoint's betas are not {spec.name}'s schedule (linear_start "
                         f"{spec.linear_start}, linear_end {spec.linear_end}, T {spec.num_train_timesteps})")


def _scale_factor_from_checkpoint(spec: LDMSpec, other: dict, path: Path) -> float:
    stored = other.get("scale_factor")
    if spec.scale_factor is None:
        if stored is None or stored.numel() != 1:
            raise BenchError(f"{path} has no scale_factor; {spec.name} needs the one learned in training "
                             f"(scale_by_std), so this is not the {spec.title} checkpoint")
        return float(stored)
    if stored is not None and abs(float(stored) - spec.scale_factor) > 1e-6:
        raise BenchError(f"{path} has scale_factor {float(stored):g}; {spec.name} uses {spec.scale_factor:g}")
    return spec.scale_factor


def _load_compvis(spec: LDMSpec, path: Path) -> ZooModel:
    digest = sha256_file(path)
    state = read_lightning_state_dict(path)
    try:  # strict: a missing, unknown or misshapen tensor is an error naming the file
        unet_state, autoencoder_state, other = split_compvis_state_dict(state)
        del state
        unet_state = compvis.original_to_diffusers(unet_state, spec.unet_layout)
        autoencoder_state = compvis.original_to_diffusers(autoencoder_state, spec.autoencoder_layout)
    except BenchError as exc:
        raise BenchError(f"{path}: {exc}") from None
    _check_schedule_buffers(spec, other, path)
    scale_factor = _scale_factor_from_checkpoint(spec, other, path)
    unet = build_unet(spec, unet_state)
    autoencoder = build_autoencoder(spec, autoencoder_state, scale_factor)
    info = _base_info(spec, path, "compvis", scale_factor)
    info["files"] = {path.name: digest}
    info["ignored"] = {"model_ema": sum(k.startswith("model_ema.") for k in other),
                       "schedule_buffers": sum(k in SCHEDULE_BUFFERS for k in other),
                       "autoencoder_loss": sum(k.startswith(AUTOENCODER_PREFIX + "loss.") for k in other)}
    return _zoo_model(spec, unet, autoencoder, scale_factor, info)


# ---- the diffusers layout ----

def _check_diffusers_config(directory: Path, cls_name: str, expected: dict, what: str) -> dict:
    """``config.json`` with the class's defaults filled in (as from_pretrained does) must equal ``expected``."""
    return check_config(directory / "config.json", expected, what, defaults_from=compvis.diffusers_class(cls_name))


def _from_pretrained(cls_name: str, directory: Path, what: str) -> nn.Module:
    """A diffusers model folder, read safely and strictly (``checkpoints.load_diffusers_model``), in float32."""
    model, _ = load_diffusers_model(compvis.diffusers_class(cls_name), directory, what)
    return _finish(model)


def _check_scheduler(spec: LDMSpec, directory: Path) -> None:
    path = directory / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {path} ({exc})") from None
    want = {"beta_schedule": "scaled_linear", "beta_start": spec.linear_start, "beta_end": spec.linear_end,
            "num_train_timesteps": spec.num_train_timesteps}
    for key, value in want.items():
        have = config.get(key)
        if have != value and not (isinstance(have, float) and abs(have - value) < 1e-12):
            raise BenchError(f"{path} does not describe {spec.name}'s schedule: {key} is {have!r}, expected {value!r}")
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise BenchError(f"{path}: prediction_type is {config['prediction_type']!r}; the LDMs predict epsilon")


def _load_diffusers(spec: LDMSpec, directory: Path) -> ZooModel:
    hint = f"expected unet/ and {' or '.join(d + '/' for d in spec.autoencoder_dirs)} in diffusers layout"
    if (directory / MANIFEST).is_file():
        verify_files(directory, read_manifest(directory, hint), [], hint)
    autoencoder_dir = next((directory / d for d in spec.autoencoder_dirs if (directory / d).is_dir()), None)
    if autoencoder_dir is None:
        raise BenchError(f"{directory} has unet/ but no autoencoder folder; {hint}")
    _check_diffusers_config(directory / "unet", "UNet2DModel", spec.unet, f"{spec.name} UNet")
    config = _check_diffusers_config(autoencoder_dir, spec.autoencoder_class, spec.autoencoder,
                                     f"{spec.name} autoencoder")
    _check_scheduler(spec, directory)
    scale_factor = float(config["scaling_factor"]) if spec.scale_factor is None else spec.scale_factor
    unet = _from_pretrained("UNet2DModel", directory / "unet", f"{spec.name} UNet")
    set_openaimodel_heads(unet, spec.unet_layout)
    autoencoder = _from_pretrained(spec.autoencoder_class, autoencoder_dir, f"{spec.name} autoencoder")
    info = _base_info(spec, directory, "diffusers", scale_factor)
    info["files"] = {str(p.relative_to(directory)): sha256_file(p)
                     for d in (directory / "unet", autoencoder_dir) for p in sorted(d.rglob("*")) if p.is_file()}
    return _zoo_model(spec, unet, autoencoder, scale_factor, info)


def load(spec: LDMSpec, checkpoint: Path | str | None) -> ZooModel:
    """``checkpoint``: a diffusers-layout folder, a CompVis ``model.ckpt``, or a folder holding one."""
    if checkpoint is None:
        raise BenchError(spec.missing_message())
    path = Path(checkpoint)
    if not path.exists():
        raise BenchError(f"{spec.name} checkpoint {path} does not exist; {spec.missing_message()}")
    if path.is_dir():
        if (path / "unet").is_dir():
            return _load_diffusers(spec, path)
        if not (path / "model.ckpt").is_file():
            raise BenchError(f"{path} holds neither a diffusers layout (unet/ and "
                             f"{' or '.join(d + '/' for d in spec.autoencoder_dirs)}) nor a CompVis model.ckpt")
        path = path / "model.ckpt"
    return _load_compvis(spec, path)


def load_church(checkpoint: Path | str | None) -> ZooModel:
    return load(CHURCH, checkpoint)


def load_bedroom(checkpoint: Path | str | None) -> ZooModel:
    return load(BEDROOM, checkpoint)


def _entry(spec: LDMSpec, load: Callable[[Path | str | None], ZooModel], description: str, about: str) -> ZooEntry:
    return register_model(ZooEntry(
        name=spec.name, load=load, train_timesteps=spec.num_train_timesteps, output_size=OUTPUT_SHAPE[1:],
        description=description,
        reference=ReferenceData(None, about),  # LSUN is not redistributable: no default reference
    ))


ENTRIES = (
    _entry(CHURCH, load_church, "LDM-8 LSUN-Churches 256x256 (CompVis latent-diffusion, KL-f8 autoencoder): "
                                "lsun_churches model.ckpt or a diffusers directory",
           "LSUN Churches, church_outdoor train"),
    _entry(BEDROOM, load_bedroom, "LDM-4 LSUN-Bedrooms 256x256 (CompVis latent-diffusion, VQ-f4 autoencoder): "
                                  "lsun_bedrooms model.ckpt or a diffusers directory",
           "LSUN Bedrooms; guided-diffusion's reference batch is VIRTUAL_lsun_bedroom256.npz"),
)
