"""The embedded transformer: a tiny class-conditional diffusers ``DiTTransformer2DModel`` trained by ``bench.train``
on the same 16x16 digits as ``digits``, sampled with classifier-free guidance.

Network
    DiT (Peebles & Xie) at toy size (:data:`DIT_ARCH`): 2x2 patches of the 16x16 image (64 tokens), 6 blocks of
    width 64 (4 heads of 16), adaLN-Zero conditioning on the timestep and the digit class. Epsilon prediction, no
    learned variance (one output channel). The class embedding has 11 rows: the ten digits and the null class
    (:data:`NULL_CLASS` = 10) that diffusers' ``LabelEmbedding`` adds when the model is built with class dropout,
    which training uses for 10% of the examples (``bench.train.train_dit``). ~0.6M parameters.

Classifier-free guidance
    ``denoiser(net)`` returns ``eps = eps_u + s (eps_c - eps_u)`` with ``s`` = :data:`GUIDANCE_SCALE` from ONE call
    of the network on the doubled batch ``cat([x, x])`` with class labels ``cat([null, classes])`` (unconditional
    half first), as ``bench.zoo.sd`` does for Stable Diffusion: every quantization method sees the doubled batch.
    With ``s == 1`` the guided output is the conditional one, and the denoiser calls the network once on the batch
    itself with the classes. The zoo has no per-run model options, so the scale is this module's constant;
    :class:`ClassConditioning` takes another for code that builds its own denoiser.

Classes
    ``start_batch(seeds)`` conditions the sample of seed ``s`` on digit ``s % 10`` (:func:`class_of`): it depends on
    the seed only, so an image does not depend on its batch, its position in it or the world size, and 10
    consecutive seeds cover the ten digits.

Loading
    ``bench/assets/digits-dit`` (or a directory written by ``modiff-bench train-dit``): ``manifest.json`` with the
    SHA-256 of every file (checked first), ``transformer/config.json`` (checked against :data:`DIT_ARCH` before the
    weights are read) and ``transformer/diffusion_pytorch_model.safetensors`` (safetensors only, strict). The domain
    metrics use the ``digits`` model's classifier (``bench/assets/digits/classifier``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from modiff.samplers import Denoiser

from ..errors import BenchError
from .checkpoints import check_config, check_loading_info, first_line, read_manifest, verify_files
from .digits import BETA_END, BETA_START, IMAGE_SHAPE, NUM_TRAIN_TIMESTEPS, schedule
from .model import ZooModel
from .registry import ReferenceData, ZooEntry, register_model

NAME = "digits-dit"
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits-dit"
HINT = "retrain with 'nox -s train-dit' or restore the packaged files (git checkout bench/assets)"

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # LabelEmbedding's extra row, the unconditional class of classifier-free guidance
# measured on 360 samples (DDIM quad, 100 steps, seeds 0-359; the manifest's quality and guidance_sweep): FD ratio
# 1.37 / 2.20 / 5.30 / 11.5 and class accuracy 95.3% / 99.2% / 99.7% / 99.7% at 1.0 / 1.5 / 2.0 / 3.0. 1.5 is the
# largest scale that keeps the quality bar (ratio <= 3): stronger guidance buys no accuracy and costs diversity
GUIDANCE_SCALE = 1.5

# 16x16 -> 8x8 tokens of 2x2 patches, 6 adaLN-Zero blocks of width 4 x 16 = 64; ~0.6M parameters
DIT_ARCH = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_type": "ada_norm_zero",
    "activation_fn": "gelu-approximate",
    "dropout": 0.0,
    "attention_bias": True,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
    "upcast_attention": False,
}

DIT_FILES = ["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"]

__all__ = [
    "ASSET_DIR", "BETA_END", "BETA_START", "DIT_ARCH", "ENTRY", "GUIDANCE_SCALE", "NULL_CLASS", "NUM_CLASSES",
    "NUM_TRAIN_TIMESTEPS", "ClassConditioning", "class_of", "load", "load_transformer", "schedule",
]


def class_of(seed: int) -> int:
    """The digit the sample of ``seed`` is conditioned on."""
    return int(seed) % NUM_CLASSES


class ClassConditioning:
    """Seeds -> digit classes, and the guided denoiser that uses them (module docstring).

    ``start_batch(seeds)`` sets the batch's classes; the denoiser refuses a batch it was not set for. The network
    call's keyword inputs are :meth:`unet_kwargs`: ``class_labels`` with one row per row of the doubled batch, the
    unconditional half first (as ``bench.zoo.sd.PromptConditioning``)."""

    def __init__(self, guidance_scale: float = GUIDANCE_SCALE):
        self.guidance_scale = float(guidance_scale)
        self.classes: torch.Tensor | None = None  # (batch,) int64, on the CPU

    def start_batch(self, seeds: Sequence[int]) -> None:
        self.classes = torch.tensor([class_of(s) for s in seeds], dtype=torch.long)

    def batch_classes(self, batch: int) -> torch.Tensor:
        have = None if self.classes is None else len(self.classes)
        if have != batch:
            have = "none" if have is None else f"one for {have} samples"
            raise RuntimeError(f"no class conditioning for a batch of {batch} (have {have}): call "
                               "model.start_batch(seeds) before the batch's first step")
        return self.classes

    def unet_kwargs(self, batch: int) -> dict:
        """The keyword inputs of the network call on the doubled batch of ``batch`` samples."""
        classes = self.batch_classes(batch)
        return {"class_labels": torch.cat([torch.full_like(classes, NULL_CLASS), classes])}

    def denoiser(self, net: nn.Module) -> Denoiser:
        """``net`` with classifier-free guidance: one call on the doubled batch (module docstring)."""

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = t.to(x.device).reshape(-1).expand(x.shape[0]) if t.dim() == 0 or t.numel() == 1 else t
            if self.guidance_scale == 1.0:  # the conditional prediction alone
                return net(x, t, class_labels=self.batch_classes(x.shape[0]).to(x.device)).sample
            labels = self.unet_kwargs(x.shape[0])["class_labels"].to(x.device)
            eps_uncond, eps_cond = net(torch.cat([x, x]), torch.cat([t, t]), class_labels=labels).sample.chunk(2)
            return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

        return denoise


def load_transformer(checkpoint: Path | None = None):
    """The DiT of ``checkpoint`` (default: the packaged one), verified and loaded strictly; and its manifest."""
    from diffusers import DiTTransformer2DModel

    directory = Path(checkpoint) if checkpoint else ASSET_DIR
    manifest = read_manifest(directory, HINT)
    verify_files(directory, manifest, DIT_FILES, HINT)
    check_config(directory / DIT_FILES[0], DIT_ARCH, "digits DiT", defaults_from=DiTTransformer2DModel)
    # safetensors only (a .bin beside it is never read); the loading report: diffusers would leave a
    # missing tensor at its random initialisation
    try:
        net, loading = DiTTransformer2DModel.from_pretrained(
            directory / "transformer", local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False,
            output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BenchError(f"cannot load the digits DiT from {directory / 'transformer'}: {first_line(exc)}") from None
    check_loading_info(loading, f"digits DiT weights {directory / DIT_FILES[1]}")
    return net.eval().requires_grad_(False), manifest


def load(checkpoint: Path | None = None) -> ZooModel:
    """The zoo entry: the packaged model, or a retrained one in ``checkpoint`` (``modiff-bench train-dit``)."""
    net, manifest = load_transformer(checkpoint)
    conditioning = ClassConditioning()
    info = {
        "checkpoint": str(checkpoint or ASSET_DIR), "files": manifest["files"],
        "guidance_scale": conditioning.guidance_scale, "null_class": NULL_CLASS,
        "guidance": "one network call on cat([x, x]) with cat([null, classes]) labels",
        "classes": "class of seed s = s % 10",
    }
    return ZooModel(
        name=NAME, unet=net, schedule=schedule(), image_shape=IMAGE_SHAPE,
        default_sampler="ddim-quad", default_steps=100, info=info,
        make_denoiser=conditioning.denoiser, start_batch=conditioning.start_batch,
    )


ENTRY = register_model(ZooEntry(
    name=NAME, load=load, train_timesteps=NUM_TRAIN_TIMESTEPS, output_size=IMAGE_SHAPE[1:],
    description=f"embedded transformer: 16x16 class-conditional digits DiT trained by this project, guidance "
                f"{GUIDANCE_SCALE} (committed, no download)",
    reference=ReferenceData("digits-train", "the training digits shipped with the package"),
    family="transformer",
))
