"""The ``[inception]`` settings of a matrix file: where the weights, the reference data and the cache are,
how the images go through the networks, and whether anything may be downloaded (never, by default)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InceptionSettings:
    weights: str | None = None  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth; None: torch hub cache
    pytorch_fid_weights: str | None = None  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth; None: hub cache
    cache_dir: str | None = None  # reference statistics; None: $MODIFF_BENCH_CACHE/inception or ~/.cache/...
    batch_size: int = 64
    device: str = "cpu"
    download: bool = False  # let the libraries fetch missing weights and CIFAR-10 (off for offline clusters)
    cifar10_root: str | None = None  # torchvision's cifar-10-batches-py or its parent; None: torch-fidelity's
    reference_images: str | None = None  # a folder of PNG / JPEG reference images (overrides the model's default)
    reference_stats: str | None = None  # a guided-diffusion reference batch .npz (overrides the model's default)
