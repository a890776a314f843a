"""Train the embedded default from scratch: the digits UNet (DDPM, linear betas 1e-4..0.02,
T = 1000, EMA weights) and the domain classifier used for FD / IS on digits.

Everything is seeded; the full configuration, the versions, the loss curve and the measured
quality figures go into the checkpoint's ``manifest.json`` next to the SHA-256 of every file.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data import load_digits_split
from .domain import DigitClassifier, features_and_logits, quality_report
from .provenance import provenance
from .zoo import digits as digits_zoo
from .zoo.checkpoints import write_manifest


@dataclass
class UNetTrainConfig:
    steps: int = 8000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 100  # steps per point of the recorded loss curve


@dataclass
class ClassifierTrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    max_shift: int = 1  # random translation (pixels) as augmentation
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    n_samples: int = 360  # as many as held-out digits
    sampler: str = "ddim-quad"
    steps: int = 100
    first_seed: int = 0
    batch_size: int = 120


DEFAULT_EVAL = EvalConfig()


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    if max_shift == 0:
        return x
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    size = x.shape[-1]
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy: dy + size, dx: dx + size]
    return out


def train_classifier(cfg: ClassifierTrainConfig, progress: bool = True) -> tuple[DigitClassifier, dict]:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train, heldout = load_digits_split("train"), load_digits_split("heldout")
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n = len(train.images)
    for _ in tqdm(range(cfg.epochs), desc="classifier", unit="epoch", disable=not progress):
        model.train()
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            x = _random_shift(train.images[idx], cfg.max_shift, gen)
            loss = F.cross_entropy(model(x), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    _, logits = features_and_logits(model, heldout.images)
    accuracy = float((logits.argmax(1) == heldout.labels).double().mean())
    return model.eval(), {"heldout_accuracy": accuracy, "n_train": n, "n_heldout": len(heldout.images)}


def _lr_factor(step: int, cfg: UNetTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine down to 10%


def train_unet(cfg: UNetTrainConfig, progress: bool = True):
    """DDPM epsilon-prediction training; returns the EMA model and the loss curve."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = load_digits_split("train").images
    unet = UNet2DModel(**digits_zoo.UNET_ARCH)
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=digits_zoo.NUM_TRAIN_TIMESTEPS, beta_start=digits_zoo.BETA_START,
        beta_end=digits_zoo.BETA_END, beta_schedule="linear",
    )
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    curve, running = [], []
    unet.train()
    bar = tqdm(range(cfg.steps), desc="unet", unit="step", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, digits_zoo.NUM_TRAIN_TIMESTEPS, (cfg.batch_size,), generator=gen)
        loss = F.mse_loss(unet(noise_scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        running.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            curve.append({"step": step + 1, "loss": sum(running) / len(running)})
            bar.set_postfix(loss=f"{curve[-1]['loss']:.4f}")
            running = []
    ema.copy_to(unet.parameters())
    return unet.eval(), curve


def evaluate_quality(checkpoint: Path, cfg: EvalConfig, progress: bool = True) -> dict:
    """Sample from a checkpoint directory and measure it against the quality bar."""
    from modiff.samplers import SamplerConfig, sample

    from .zoo import load_model

    model = load_model("digits", checkpoint)
    classifier = digits_zoo.load_classifier(checkpoint)
    seeds = range(cfg.first_seed, cfg.first_seed + cfg.n_samples)
    start = time.perf_counter()
    samples = sample(
        model.denoiser(), model.schedule, SamplerConfig.from_name(cfg.sampler, cfg.steps), seeds,
        model.image_shape, batch_size=cfg.batch_size, progress=progress,
    )
    seconds = time.perf_counter() - start
    report = quality_report(classifier, samples).to_dict()
    report["sampling"] = {**asdict(cfg), "seconds": seconds}
    return report


def train_tiny(
    out_dir: Path,
    unet_cfg: UNetTrainConfig,
    clf_cfg: ClassifierTrainConfig,
    eval_cfg: EvalConfig | None = DEFAULT_EVAL,
    progress: bool = True,
) -> dict:
    """Train both networks into ``out_dir`` (diffusers / safetensors layout plus manifest)."""
    out_dir = Path(out_dir)
    (out_dir / "classifier").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    classifier, clf_metrics = train_classifier(clf_cfg, progress)
    (out_dir / "classifier" / "config.json").write_text(json.dumps(classifier.config, indent=2) + "\n")
    save_file(classifier.state_dict(), out_dir / "classifier" / "model.safetensors")
    clf_seconds = time.perf_counter() - started

    started = time.perf_counter()
    unet, curve = train_unet(unet_cfg, progress)
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    unet_seconds = time.perf_counter() - started

    info = {
        "model": "digits",
        "data": "scikit-learn load_digits, 8x8 -> 16x16 bilinear, [-1, 1]; held-out = every 5th image",
        "schedule": {"betas": "linear", "beta_start": digits_zoo.BETA_START, "beta_end": digits_zoo.BETA_END,
                     "num_train_timesteps": digits_zoo.NUM_TRAIN_TIMESTEPS},
        "unet": {"parameters": sum(p.numel() for p in unet.parameters()), "train": asdict(unet_cfg),
                 "train_seconds": unet_seconds, "loss_curve": curve},
        "classifier": {"parameters": sum(p.numel() for p in classifier.parameters()), "train": asdict(clf_cfg),
                       "train_seconds": clf_seconds, **clf_metrics},
        "provenance": provenance("cpu"),
    }
    files = [*digits_zoo.UNET_FILES, *digits_zoo.CLASSIFIER_FILES]
    manifest = write_manifest(out_dir, files, info)
    if eval_cfg is not None:
        manifest["quality"] = evaluate_quality(out_dir, eval_cfg, progress)
        manifest = write_manifest(out_dir, files, {k: v for k, v in manifest.items() if k != "files"})
    return manifest
