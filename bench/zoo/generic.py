"""The generic entry ``diffusers:<directory or hub id>``: any unconditional pixel-space ``UNet2DModel`` pipeline.

What it reads
    A diffusers pipeline directory as ``DDPMPipeline.save_pretrained`` / ``DDIMPipeline.save_pretrained`` write it:
    ``unet/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``, or ``.bin``) and
    ``scheduler/scheduler_config.json`` (a ``DDPMScheduler`` or ``DDIMScheduler`` config). The older flat layout of
    the first hub conversions (``config.json``, weights and ``scheduler_config.json`` at the root) is read too. A
    ``model_index.json``, when present, must name no component besides ``unet`` and ``scheduler`` (a ``vqvae``, ``vae``
    or ``text_encoder`` makes it a latent or conditional pipeline this entry cannot sample).

    ``<directory or hub id>``: an existing directory (absolute, or relative to the working directory), else a Hugging
    Face hub id (``google/ddpm-cifar10-32``) taken from the local Hugging Face cache only (``HF_HUB_CACHE`` /
    ``HF_HOME``); nothing is downloaded.

What it takes from the configs (no weights are read for this: matrix files check ``steps <= T`` at ``--dry-run``)
    - the noise schedule: ``num_train_timesteps``, ``beta_schedule`` (``linear``, ``scaled_linear`` or
      ``squaredcos_cap_v2``), ``beta_start``, ``beta_end``, or ``trained_betas`` when given; keys the file leaves out
      take the scheduler class's defaults, as ``from_pretrained`` does. Betas are computed in float64 as diffusers
      defines them. ``prediction_type`` must be ``epsilon``; ``rescale_betas_zero_snr`` is refused.
    - the image shape: the UNet's ``in_channels`` and ``sample_size``; ``out_channels`` must equal ``in_channels``
      (a learned-variance output is refused) and the UNet must be unconditional (no class embedding).
    The scheduler's sampling settings (``clip_sample``, ``timestep_spacing``, ``steps_offset``, ...) are not used:
    the matrix's ``sampler`` axis chooses the sampler. They are recorded in ``info["scheduler"]``.

Loading is safe and strict (``checkpoints.load_diffusers_model``): the safetensors file when there is one, a ``.bin``
only after ``torch.load(weights_only=True)`` accepted it, and a missing, unexpected or misshapen tensor is an error.
A ``manifest.json`` in the directory (``checkpoints.write_manifest``) is verified first. ``info["files"]`` records
the SHA-256 of every file read.

Reference data: none by default (the entry cannot know what the model was trained on): FID, sFID and precision /
recall are missing with a reason unless ``[inception] reference_images`` or ``reference_stats`` is given;
``psnr_to_fp`` / ``mse_to_fp`` need none.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modiff.schedules import NoiseSchedule

from ..errors import BenchError
from ..provenance import sha256_file
from .checkpoints import (
    MANIFEST,
    constructor_defaults,
    load_diffusers_model,
    read_config,
    read_manifest,
    verify_files,
)
from .model import ZooModel
from .registry import ReferenceData, ZooEntry, register_scheme

SCHEME = "diffusers"
USAGE = "diffusers:<directory or hub id>"
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PIPELINE_PARTS = ("unet", "scheduler")  # the only components model_index.json may name
LAYOUT_HINT = ("expected a diffusers pipeline directory with unet/ (config.json and diffusion_pytorch_model."
               "safetensors) and scheduler/scheduler_config.json, as DDPMPipeline.save_pretrained writes")
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
    image_shape: tuple[int, int, int]

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.numel())

    @property
    def files(self) -> list[Path]:
        """The files that make up the model, beside the weights (which ``load`` adds)."""
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


def _check_model_index(directory: Path) -> None:
    path = directory / "model_index.json"
    if not path.is_file():
        return
    index = read_config(path, "pipeline")
    extra = sorted(k for k, v in index.items() if not k.startswith("_") and k not in PIPELINE_PARTS and v
                   and not (isinstance(v, list) and all(x is None for x in v)))
    kind = index.get("_class_name", "diffusers")
    if extra:
        raise BenchError(f"{directory} is a {kind} pipeline with {', '.join(extra)}: the {SCHEME}: entry takes "
                         "unconditional pixel-space UNet2DModel pipelines (unet and scheduler only)")
    unet = index.get("unet")
    if isinstance(unet, list) and len(unet) == 2 and unet[1] not in (None, "UNet2DModel"):
        raise BenchError(f"{path}: the pipeline's unet is a {unet[1]}; the {SCHEME}: entry takes a UNet2DModel")


def _image_shape(config_path: Path) -> tuple[int, int, int]:
    from diffusers import UNet2DModel

    raw = read_config(config_path, "UNet")
    kind = raw.get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":
        raise BenchError(f"{config_path} describes a {kind}; the {SCHEME}: entry takes an unconditional UNet2DModel")
    config = {**constructor_defaults(UNet2DModel), **raw}
    channels, out = config.get("in_channels"), config.get("out_channels")
    if not (_positive_int(channels) and _positive_int(out)):
        raise BenchError(f"{config_path}: in_channels and out_channels must be positive integers, "
                         f"got {channels!r} and {out!r}")
    if out != channels:
        raise BenchError(f"{config_path}: the UNet maps {channels} channels to {out} (a learned variance?); the "
                         "samplers need an epsilon prediction of the input's shape")
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise BenchError(f"{config_path}: the UNet is class-conditional (num_class_embeds / class_embed_type); the "
                         f"{SCHEME}: entry samples unconditional models")
    size = config.get("sample_size")
    size = [size, size] if _positive_int(size) else size
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_positive_int(s) for s in size)):
        raise BenchError(f"{config_path}: sample_size must be a positive integer or [height, width], "
                         f"got {config.get('sample_size')!r}")
    return (channels, size[0], size[1])


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
        raise BenchError(f"{path}: {kind} is not supported; the {SCHEME}: entry reads "
                         f"{' or '.join(SCHEDULER_CLASSES)} configs")
    config = {**constructor_defaults(getattr(diffusers, kind)), **raw}
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise BenchError(f"{path}: prediction_type is {prediction!r}; the benchmark's samplers take "
                         "epsilon-predicting models only")
    if config.get("rescale_betas_zero_snr"):
        raise BenchError(f"{path}: rescale_betas_zero_snr is not supported (the schedule would not be the one given "
                         "by beta_schedule)")
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
    unet_dir = next((d for d in (directory / "unet", directory) if (d / "config.json").is_file()), None)
    if unet_dir is None:
        raise BenchError(f"{directory} holds no unet/config.json; {LAYOUT_HINT}")
    scheduler_path = _first_file(directory, "scheduler/scheduler_config.json", "scheduler_config.json")
    if scheduler_path is None:
        raise BenchError(f"{directory} has no scheduler/scheduler_config.json, which gives the noise schedule "
                         "(beta_schedule, beta_start, beta_end, num_train_timesteps); save the pipeline's scheduler "
                         "there (scheduler.save_config(DIR / 'scheduler'))")
    _check_model_index(directory)
    image_shape = _image_shape(unet_dir / "config.json")
    scheduler, betas = read_scheduler(scheduler_path)
    return Pipeline(name=f"{SCHEME}:{spec}", directory=directory, source=source, unet_dir=unet_dir,
                    scheduler_path=scheduler_path, scheduler=scheduler, betas=betas, image_shape=image_shape)


# ----------------------------------------------------------------------------------------------------------- loading


def _default_batch_size(shape: tuple[int, int, int]) -> int:
    pixels = shape[1] * shape[2]
    return 64 if pixels <= 32 * 32 else 16 if pixels <= 64 * 64 else 4


def load(pipeline: Pipeline, checkpoint: Path | None = None) -> ZooModel:
    """The model of ``pipeline``: its UNet in float32, eval mode, no gradients, on the CPU."""
    from diffusers import UNet2DModel

    if checkpoint is not None:
        raise BenchError(f"model {pipeline.name!r} names its own weights; leave run.checkpoint (--checkpoint) empty")
    directory = pipeline.directory
    if (directory / MANIFEST).is_file():
        verify_files(directory, read_manifest(directory, LAYOUT_HINT), [], LAYOUT_HINT)
    unet, weights = load_diffusers_model(UNet2DModel, pipeline.unet_dir, f"UNet of {pipeline.name}", LAYOUT_HINT)
    if any(p.dtype != torch.float32 for p in unet.parameters()):
        unet = unet.float()  # the full-precision reference is float32, whatever the file stores
    files = [*pipeline.files, weights]
    info = {
        **pipeline.source, "directory": str(directory),
        "files": {p.relative_to(directory).as_posix(): sha256_file(p) for p in files},
        "image_shape": list(pipeline.image_shape),
        "scheduler": {k: v for k, v in pipeline.scheduler.items() if k != "trained_betas"},
        "schedule": {"num_train_timesteps": pipeline.num_train_timesteps,
                     "betas": "trained_betas" if pipeline.scheduler.get("trained_betas") is not None
                     else pipeline.scheduler.get("beta_schedule")},
    }
    return ZooModel(
        name=pipeline.name, unet=unet, schedule=NoiseSchedule(pipeline.betas.clone()),
        image_shape=pipeline.image_shape, default_sampler="ddim-uniform",
        default_steps=min(100, pipeline.num_train_timesteps), info=info,
        default_batch_size=_default_batch_size(pipeline.image_shape),
    )


def make_entry(spec: str) -> ZooEntry:
    """The zoo entry of ``diffusers:<spec>``, built from the configs (what a matrix needs at --dry-run)."""
    pipeline = read_pipeline(spec)

    def load_entry(checkpoint: Path | None = None) -> ZooModel:
        return load(read_pipeline(spec), checkpoint)  # read again: the files may have changed since

    channels, height, width = pipeline.image_shape
    return ZooEntry(
        name=pipeline.name, load=load_entry, train_timesteps=pipeline.num_train_timesteps,
        output_size=(height, width),
        description=f"diffusers pipeline {spec}: UNet2DModel {channels}x{height}x{width}, "
                    f"{pipeline.scheduler.get('_class_name', SCHEDULER_CLASSES[0])} with T = "
                    f"{pipeline.num_train_timesteps}",
        reference=ReferenceData(),  # unknown training data: reference_images / reference_stats when given
    )


register_scheme(SCHEME, make_entry, USAGE,
                "any unconditional pixel-space UNet2DModel pipeline (unet/ + scheduler/ of a DDPM or DDIM scheduler, "
                "epsilon prediction): a directory, or a hub id from the local Hugging Face cache")
