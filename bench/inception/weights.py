"""The Inception weights files: finding them, reading and checking them safely, and building each
library's network from the checked tensors.

Weights are never fetched unless ``InceptionSettings.download`` is set: the files are looked up
before any model is built (both libraries download from their constructors when a file is missing).
A weights file (given, in the torch hub cache, or just downloaded) is user data, and both libraries
would unpickle it with code execution allowed (torch-fidelity calls ``torch.load(weights_only=False)``).
So this module reads every file itself, with ``torch.load(weights_only=True)`` on the bytes it hashed,
checks it holds exactly the network's tensors (a missing, unexpected or misshapen one is a one-line
``BenchError`` naming the file), and builds each library's network from that state dict without
touching the library's loaders (nothing of either library is replaced, not even for a moment):
torch-fidelity's ``FeatureExtractorInceptionV3`` reads a re-serialised copy of the checked tensors from
memory; pytorch-fid's ``InceptionV3`` (whose constructor can only download) is assembled from
pytorch-fid's own blocks (``FIDInceptionA`` ...) exactly as its constructor does. The SHA-256 of every
weights file loaded is recorded (:func:`weights_used`; no full hash of these files is published, so
this is what identifies them) and written into each cached statistics file.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import BenchError
from ..zoo.checkpoints import few as _few
from ..zoo.checkpoints import first_line as _first_line
from ..zoo.checkpoints import state_dict_problems
from .features import POOL_DIMS

# the extractors, by the names their cached statistics carry
TORCH_FIDELITY = "torch-fidelity-inception-v3-compat"
PYTORCH_FID = "pytorch-fid-inception-v3"

_WEIGHTS_LOCK = threading.Lock()
_WEIGHTS_USED: dict[str, dict[str, str]] = {}  # library -> path and sha256 of the weights file it last loaded


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


# --- finding the files ---------------------------------------------------------------------------


def _torch_fidelity_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def _pytorch_fid_url() -> str:
    from pytorch_fid.inception import FID_WEIGHTS_URL

    return FID_WEIGHTS_URL


def _hub_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (what both libraries call) keeps ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _weights_file(explicit: str | None, url: str, library: str, option: str,
                  download: bool) -> tuple[Path | None, str | None]:
    """The weights file to use, or why there is none; downloads only when allowed."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path, None
        return None, (f"{library} Inception weights not found: {explicit} is not a file "
                      f"([inception] {option} / InceptionSettings.{option})")
    path = _hub_file(url)
    if path.is_file():
        return path, None
    if not download:
        return None, (f"{library} Inception weights not found: looked in {path} (torch hub cache, $TORCH_HOME); "
                      f"set [inception] {option} = '/path/to/{path.name}' in the matrix "
                      f"(InceptionSettings.{option}) or allow download")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as exc:  # any network or disk failure is a reason, not a crash
        return None, f"{library} Inception weights: download of {url} to {path} failed: {_one_line(exc)}"
    return path, None


# --- reading and checking them -------------------------------------------------------------------


def _read_weights(path: Path, library: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, by ``torch.load(weights_only=True)`` (no pickled code runs) from the
    very bytes whose SHA-256 is recorded in :func:`weights_used`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BenchError(f"cannot read {library} Inception weights {path}: {_one_line(exc)}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (refused code), RuntimeError, EOFError, BadZipFile, ...
        raise BenchError(f"{path} is not a {library} Inception weights file: {_first_line(exc)}") from None
    if not isinstance(state, dict) or not state:
        raise BenchError(f"{path} is not a {library} Inception weights file: it holds a {type(state).__name__}, "
                         "not a state dict")
    odd = [str(k) for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if odd:
        raise BenchError(f"{path} is not a {library} Inception weights file: {len(odd)} entries are not named "
                         f"tensors: {_few(odd)}")
    with _WEIGHTS_LOCK:
        _WEIGHTS_USED[library] = {"path": str(path.resolve()), "sha256": hashlib.sha256(data).hexdigest()}
    return state


def weights_used() -> dict[str, dict[str, str]]:
    """The Inception weights files this process has loaded, by library (``torch-fidelity``,
    ``pytorch-fid``): ``{"path", "sha256"}`` of the last file each loaded. What a run records as the
    provenance of its Inception columns."""
    with _WEIGHTS_LOCK:
        return {library: dict(entry) for library, entry in _WEIGHTS_USED.items()}


# --- the networks --------------------------------------------------------------------------------


class _Mismatch(Exception):
    """A state dict that would not load strictly; its message lists the offending keys."""


@functools.cache
def _fidelity_class() -> type:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class CheckedInceptionV3(FeatureExtractorInceptionV3):
        """torch-fidelity's extractor, whose constructor's (strict) load names the keys that do not fit."""

        def load_state_dict(self, state_dict, *args, **kwargs):
            expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
            problems = state_dict_problems(state_dict, expected)
            if problems:
                raise _Mismatch(problems)
            return super().load_state_dict(state_dict, *args, **kwargs)

    return CheckedInceptionV3


def _load_torch_fidelity(path: Path, features: list[str], device: str) -> torch.nn.Module:
    checked = io.BytesIO()  # the library torch.loads what it is given, unrestricted: give it only these tensors
    torch.save(_read_weights(path, "torch-fidelity"), checked)
    checked.seek(0)
    try:
        model = _fidelity_class()("inception-v3-compat", features, feature_extractor_weights_path=checked,
                                  verbose=False)
    except _Mismatch as exc:
        raise BenchError(f"{path} is not a torch-fidelity Inception weights file: {exc}") from None
    return model.to(device).eval()


def _load_pytorch_fid(path: Path, device: str) -> torch.nn.Module:
    state = _read_weights(path, "pytorch-fid")
    inception = _pytorch_fid_inception()
    expected = {k: tuple(v.shape) for k, v in inception.state_dict().items()}
    problems = state_dict_problems(state, expected)
    if problems:
        raise BenchError(f"{path} is not a pytorch-fid Inception weights file: {problems}")
    inception.load_state_dict(state, strict=True)
    return _pytorch_fid_class()(inception).to(device).eval()


def _pytorch_fid_inception() -> torch.nn.Module:
    """pytorch-fid's ``fid_inception_v3()`` without its download: torchvision's Inception3 with the FID
    blocks patched in, from pytorch-fid's own classes, left uninitialised for the weights to fill."""
    import pytorch_fid.inception as pfi
    import torchvision

    inception = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                                init_weights=False)
    inception.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = pfi.FIDInceptionE_1(1280)
    inception.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return inception


@functools.cache
def _pytorch_fid_class() -> type:
    import pytorch_fid.inception as pfi

    class LoadedInceptionV3(pfi.InceptionV3):
        """pytorch-fid's ``InceptionV3`` (its ``forward``: resize to 299, ``2 x - 1``, the blocks) for the
        2048-d pool features, over a given network instead of one its constructor would download."""

        def __init__(self, inception: torch.nn.Module):
            torch.nn.Module.__init__(self)  # pfi.InceptionV3.__init__ would build (and fetch) its own
            self.resize_input, self.normalize_input = True, True
            self.output_blocks = [self.BLOCK_INDEX_BY_DIM[POOL_DIMS]]
            self.last_needed_block = self.output_blocks[-1]
            self.blocks = torch.nn.ModuleList([
                torch.nn.Sequential(inception.Conv2d_1a_3x3, inception.Conv2d_2a_3x3, inception.Conv2d_2b_3x3,
                                    torch.nn.MaxPool2d(kernel_size=3, stride=2)),
                torch.nn.Sequential(inception.Conv2d_3b_1x1, inception.Conv2d_4a_3x3,
                                    torch.nn.MaxPool2d(kernel_size=3, stride=2)),
                torch.nn.Sequential(inception.Mixed_5b, inception.Mixed_5c, inception.Mixed_5d, inception.Mixed_6a,
                                    inception.Mixed_6b, inception.Mixed_6c, inception.Mixed_6d, inception.Mixed_6e),
                torch.nn.Sequential(inception.Mixed_7a, inception.Mixed_7b, inception.Mixed_7c,
                                    torch.nn.AdaptiveAvgPool2d(output_size=(1, 1))),
            ])
            self.requires_grad_(False)

    return LoadedInceptionV3
