"""Train the embedded models from scratch: the digits UNet (DDPM, linear betas 1e-4..0.02,
T = 1000, EMA weights) and the domain classifier used for FD / IS on digits (``train_tiny``), and the
class-conditional digits DiT on the same schedule with class dropout for classifier-free guidance
(``train_dit``; its domain metrics reuse the packaged classifier).

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
from .zoo import digits_dit as dit_zoo
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


# ---------------------------------------------------------------------------------------------------- the digits DiT


@dataclass
class DiTTrainConfig:
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    class_dropout: float = 0.1  # fraction of examples trained on the null class (classifier-free guidance)
    seed: int = 0
    log_every: int = 100  # steps per point of the recorded loss curve


@dataclass(frozen=True)
class DiTEvalConfig:
    n_samples: int = 360  # as many as held-out digits; 36 of each class (class of seed s = s % 10)
    sampler: str = "ddim-quad"
    steps: int = 100
    first_seed: int = 0
    batch_size: int = 120
    guidance_scale: float = dit_zoo.GUIDANCE_SCALE  # the packaged model's: the quality the manifest records
    sweep: tuple[float, ...] = (1.0, 2.0, 3.0)  # other scales measured for the record (the documented choice)


DEFAULT_DIT_EVAL = DiTEvalConfig()


def train_dit(cfg: DiTTrainConfig, progress: bool = True):
    """DDPM epsilon-prediction training of the class-conditional DiT (``dit_zoo.DIT_ARCH``), with a fraction
    ``cfg.class_dropout`` of the labels replaced by the null class; returns the EMA model and the loss curve.

    The label dropout is drawn here from the seeded generator: the network stays in eval mode (it has no dropout
    and no batch statistics, so eval and train mode compute the same), which keeps diffusers' ``LabelEmbedding``
    from dropping labels a second time with the global RNG."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train = load_digits_split("train")
    data, labels = train.images, train.labels
    net = DiTTransformer2DModel(**dit_zoo.DIT_ARCH).eval()
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=dit_zoo.NUM_TRAIN_TIMESTEPS, beta_start=dit_zoo.BETA_START,
        beta_end=dit_zoo.BETA_END, beta_schedule="linear",
    )
    ema = EMAModel(net.parameters(), decay=cfg.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    curve, running = [], []
    bar = tqdm(range(cfg.steps), desc="dit", unit="step", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, dit_zoo.NUM_TRAIN_TIMESTEPS, (cfg.batch_size,), generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.class_dropout
        y = torch.where(drop, dit_zoo.NULL_CLASS, labels[idx])
        loss = F.mse_loss(net(noise_scheduler.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema.step(net.parameters())
        running.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            curve.append({"step": step + 1, "loss": sum(running) / len(running)})
            bar.set_postfix(loss=f"{curve[-1]['loss']:.4f}")
            running = []
    ema.copy_to(net.parameters())
    return net.eval().requires_grad_(False), curve


def class_accuracy(classifier: DigitClassifier, samples: torch.Tensor, classes: torch.Tensor) -> dict:
    """How often the classifier assigns a sample the class it was conditioned on: overall and per class."""
    _, logits = features_and_logits(classifier, samples)
    hit = logits.argmax(1).cpu() == classes.cpu()
    per_class = [float(hit[classes == c].double().mean()) if bool((classes == c).any()) else None
                 for c in range(dit_zoo.NUM_CLASSES)]
    return {"accuracy": float(hit.double().mean()), "per_class": per_class}


def guided_samples(model, seeds: range, cfg: DiTEvalConfig, guidance_scale: float, progress: bool = True):
    """Samples of the DiT zoo model with ``guidance_scale``, and their seconds."""
    from modiff.samplers import SamplerConfig, sample

    conditioning = dit_zoo.ClassConditioning(guidance_scale)
    start = time.perf_counter()
    samples = sample(
        conditioning.denoiser(model.unet), model.schedule, SamplerConfig.from_name(cfg.sampler, cfg.steps), seeds,
        model.image_shape, batch_size=cfg.batch_size, progress=progress, on_batch=conditioning.start_batch,
    )
    return samples, time.perf_counter() - start


def evaluate_dit(checkpoint: Path, cfg: DiTEvalConfig, progress: bool = True) -> dict:
    """Guided samples of a DiT checkpoint against the quality bar (the packaged digits classifier), with the
    class accuracy; the same for the scales of ``cfg.sweep`` under ``"guidance_sweep"``."""
    from .zoo import load_model

    model = load_model(dit_zoo.NAME, checkpoint)
    classifier = digits_zoo.load_classifier()
    seeds = range(cfg.first_seed, cfg.first_seed + cfg.n_samples)
    classes = torch.tensor([dit_zoo.class_of(s) for s in seeds])
    results = {}
    for scale in (cfg.guidance_scale, *[s for s in cfg.sweep if s != cfg.guidance_scale]):
        samples, seconds = guided_samples(model, seeds, cfg, scale, progress)
        report = quality_report(classifier, samples).to_dict()
        report["class_accuracy"] = class_accuracy(classifier, samples, classes)
        report["sampling"] = {**asdict(cfg), "guidance_scale": scale, "seconds": seconds}
        del report["sampling"]["sweep"]
        results[scale] = report
    quality = results.pop(cfg.guidance_scale)
    quality["guidance_sweep"] = [
        {"guidance_scale": scale, "passes": r["passes"], "fd_ratio": r["fd_ratio"],
         "confident_rate": r["samples"]["confident_rate"], "class_accuracy": r["class_accuracy"]["accuracy"],
         "is_samples": r["is_samples"]}
        for scale, r in sorted(results.items())
    ]
    return quality


def train_dit_checkpoint(out_dir: Path, cfg: DiTTrainConfig, eval_cfg: DiTEvalConfig | None = DEFAULT_DIT_EVAL,
                         progress: bool = True) -> dict:
    """Train the DiT into ``out_dir`` (diffusers / safetensors layout plus manifest) and measure it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    net, curve = train_dit(cfg, progress)
    net.save_pretrained(out_dir / "transformer", safe_serialization=True)
    seconds = time.perf_counter() - started
    info = {
        "model": dit_zoo.NAME,
        "data": "scikit-learn load_digits, 8x8 -> 16x16 bilinear, [-1, 1]; held-out = every 5th image; "
                "class labels (null class 10 for classifier-free guidance)",
        "schedule": {"betas": "linear", "beta_start": dit_zoo.BETA_START, "beta_end": dit_zoo.BETA_END,
                     "num_train_timesteps": dit_zoo.NUM_TRAIN_TIMESTEPS},
        "transformer": {"parameters": sum(p.numel() for p in net.parameters()), "architecture": dit_zoo.DIT_ARCH,
                        "train": asdict(cfg), "train_seconds": seconds, "loss_curve": curve},
        "classifier": "bench/assets/digits/classifier (the digits model's, reused)",
        "provenance": provenance("cpu"),
    }
    manifest = write_manifest(out_dir, dit_zoo.DIT_FILES, info)
    if eval_cfg is not None:
        manifest["quality"] = evaluate_dit(out_dir, eval_cfg, progress)
        manifest = write_manifest(out_dir, dit_zoo.DIT_FILES, {k: v for k, v in manifest.items() if k != "files"})
    return manifest
