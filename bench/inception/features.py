"""Images in, Inception features out: one streamed pass over a set of images through the networks,
keeping only the features.

Images: greyscale is repeated to RGB; [-1, 1] floats are clamped and rounded to the nearest of the
256 levels, ``round((x + 1) * 127.5)`` (torchvision's ``save_image`` rule up to ties; the
guided-diffusion and latent-diffusion sample scripts truncate instead, half a level darker on
average); uint8 images (0-255) are taken as they are. torch-fidelity gets those uint8 images,
pytorch-fid the same images divided by 255, so both libraries see identical pixels. Each library
resizes to 299 itself. Either side may be one tensor or an iterable of tensors (batches): images go
through the networks ``batch_size`` at a time and only features are kept (2048 + 2023 floats per
image for torch-fidelity, 2048 for pytorch-fid: about 1.2 GB for 50,000 images, against 39 GB for
50,000 256 x 256 images as float32). One pass over each side feeds both libraries. A tensor is only
ever sliced: every conversion (to float, to uint8, the NaN / inf check) is done on one batch at a
time, so a float16 samples file opened with ``torch.load(path, mmap=True, weights_only=True)`` is read
from disk as it goes instead of becoming one float32 copy in memory.

The two extractors are the same network on the same weights file (``bench.inception.weights`` builds
them); the libraries differ in two details: torch-fidelity resizes with TF1's bilinear rule
(corner-aligned, as the original graph did) and maps pixels with ``(x - 128) / 128``; pytorch-fid uses
``F.interpolate(align_corners=False)`` (centre-aligned) and ``2 x / 255 - 1``. At 299 x 299 only the
scaling differs (its effect on FID is of order ``(128 / 127.5) ** 2 - 1``, 0.8 %); upsampling small
images adds the resize difference (a shift of about half a source pixel), which can move the two FIDs
further apart.

sFID's features: guided-diffusion's evaluator (``evaluations/evaluator.py``) takes the TF tensor
``mixed_6/conv:0``, keeps its first 7 channels and flattens the 17 x 17 map: 7 * 17 * 17 = 2023
dims. torch-fidelity's conversion script (``utils/util_convert_inception_weights.py``) maps
TF's ``mixed_6/conv`` to ``Mixed_6d.branch1x1`` (TF's ``mixed, mixed_1, ..., mixed_7`` are
``Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e``; ``Mixed_6e`` would be ``mixed_7``). The graph names
that block's ops ``mixed_6/conv/Conv2D``, ``mixed_6/conv/batchnorm`` and, last, ``mixed_6/conv``
itself, the ReLU; so a forward hook takes the output of torch-fidelity's ``Mixed_6d.branch1x1``
(conv, batch norm, ReLU), channels 0-6, flattened in TF's (H, W, C) order. Exact up to
torch-fidelity's port (its resize is epsilon-exact to TF1's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import numpy as np
import torch

SFID_MODULE = "Mixed_6d.branch1x1"  # TF mixed_6/conv
SFID_CHANNELS = 7
POOL_DIMS = 2048
SPATIAL_DIMS = SFID_CHANNELS * 17 * 17  # 2023

# (N, C, H, W), float (any float dtype; clamped to [-1, 1], since stored samples are unclipped) or uint8,
# C in {1, 3}; or an iterable of such batches
Images = torch.Tensor | Iterable[torch.Tensor]


def _check_images(images: torch.Tensor, what: str) -> None:
    if not (torch.is_tensor(images) and (images.is_floating_point() or images.dtype == torch.uint8)
            and images.dim() == 4 and images.shape[1] in (1, 3)):
        shape = (f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__)
        raise ValueError(f"{what} must be float in [-1, 1] or uint8, (N, C, H, W) with C in {{1, 3}}, got {shape}")


def _non_finite(images: torch.Tensor) -> int:
    """How many of ``images`` (one batch) hold a NaN or an inf."""
    if not images.is_floating_point():
        return 0
    return int((~torch.isfinite(images.detach())).flatten(1).any(1).sum())


def _count_non_finite(images: torch.Tensor, batch_size: int) -> int:
    """:func:`_non_finite` of a whole (N, C, H, W) tensor, ``batch_size`` images at a time: no mask
    (or copy) of the whole set is ever made."""
    if not images.is_floating_point():
        return 0
    return sum(_non_finite(chunk) for chunk in images.split(batch_size))


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB images: floats clamped to [-1, 1] (stored samples are the sampler's unclipped output) and
    rounded to the nearest of 256 levels; uint8 taken as it is; greyscale repeated to three channels."""
    if images.dtype == torch.uint8:
        x = images.detach()
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    x = images.detach().float().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return ((x + 1) * 127.5).round().to(torch.uint8)


class _Stream:
    """uint8 batches of at most ``batch_size`` images from a tensor or an iterable of tensors;
    counts the images and the non-finite ones as they pass. A tensor is sliced, never converted
    whole."""

    def __init__(self, images: Images, batch_size: int, what: str):
        if not torch.is_tensor(images) and not isinstance(images, Iterable):
            raise ValueError(f"{what} must be a tensor or an iterable of tensors, got {type(images).__name__}")
        self.images, self.batch_size, self.what = images, batch_size, what
        self.n = self.bad = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        parts = [self.images] if torch.is_tensor(self.images) else self.images
        for part in parts:
            _check_images(part, self.what)
            for chunk in part.split(self.batch_size):
                self.n += len(chunk)
                self.bad += _non_finite(chunk)
                yield _to_uint8(chunk)


@torch.no_grad()
def _run(stream: _Stream, passes: list, device: str) -> None:
    """One pass over the stream, every batch through every extractor."""
    if not passes:
        return
    with contextlib.ExitStack() as stack:
        for p in passes:
            stack.enter_context(p)
        for batch in stream:
            x = batch.to(device)
            for p in passes:
                p.add(x)


class _FidelityPass:
    """torch-fidelity's requested features of every batch, plus the sFID map when ``spatial``, on CPU."""

    def __init__(self, model, spatial: bool):
        self.model, self.spatial = model, spatial
        self.out: dict[str, list[torch.Tensor]] = {name: [] for name in model.features_list}
        self.maps: list[torch.Tensor] = []
        self._handle = None

    def _grab(self, _module, _inputs, output):
        # (N, 7, 17, 17) -> (N, 17, 17, 7) -> (N, 2023): guided-diffusion's spatial[..., :7] in TF's layout
        self.maps.append(output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1).to("cpu", torch.float32))

    def __enter__(self):
        if self.spatial:
            self._handle = self.model.get_submodule(SFID_MODULE).register_forward_hook(self._grab)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def add(self, x: torch.Tensor) -> None:
        feats = self.model.convert_features_tuple_to_dict(self.model(x))
        for name, value in feats.items():
            self.out[name].append(value.to("cpu", torch.float32))

    def result(self) -> dict[str, torch.Tensor]:
        result = {name: torch.cat(parts) for name, parts in self.out.items()}
        if self.spatial:
            result["spatial"] = torch.cat(self.maps)
        return result


class _PytorchFidPass:
    """pytorch-fid's 2048-d pool features of every batch (pixels divided by 255, as it expects)."""

    def __init__(self, model):
        self.model, self.parts = model, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def add(self, x: torch.Tensor) -> None:
        self.parts.append(self.model(x.float() / 255)[0].flatten(1).cpu())

    def result(self) -> np.ndarray:
        # float64, as pytorch-fid's get_activations stores them
        return torch.cat(self.parts).numpy().astype(np.float64)
