"""Checkpoint directories with a ``manifest.json`` recording the SHA-256 of every file, and the
readers every zoo entry shares for weight files.

A directory is verified before anything in it is loaded: a missing file, a hash mismatch or a
config that does not match the expected architecture is a one-line :class:`BenchError`.

Weight files are user files, so reading one never runs code from it: safetensors, or
``torch.load(weights_only=True)`` (torch's restricted unpickler), also for files handed to
diffusers / transformers (:func:`check_weights_only` first, whatever those libraries' versions do).
Weights are loaded strictly: a missing, unexpected or misshapen tensor is a one-line BenchError
naming the file and the first keys, never a randomly initialised layer.
"""

from __future__ import annotations

import inspect
import json
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import BenchError
from ..provenance import sha256_file, write_json_atomic

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # weight files in torch.save's format

MANIFEST = "manifest.json"


def write_manifest(directory: Path, files: list[str], info: dict) -> dict:
    directory = Path(directory)
    manifest = {"files": {f: sha256_file(directory / f) for f in sorted(files)}, **info}
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path, hint: str) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise BenchError(f"checkpoint directory {directory} does not exist; {hint}")
    if not path.is_file():
        raise BenchError(f"checkpoint directory {directory} has no {MANIFEST}; {hint}")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{path} is not a valid checkpoint manifest ({exc})") from None
    if not isinstance(files, dict):
        raise BenchError(f"{path} is not a valid checkpoint manifest ('files' is not a mapping)")
    return manifest


def verify_files(directory: Path, manifest: dict, required: list[str], hint: str) -> None:
    directory = Path(directory)
    for name in required:
        if name not in manifest["files"]:
            raise BenchError(f"{directory / MANIFEST} records no hash for {name}; {hint}")
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise BenchError(f"checkpoint file {path} is missing; {hint}")
        actual = sha256_file(path)
        if actual != expected:
            raise BenchError(
                f"checkpoint file {path} is corrupt or was changed: sha256 {actual[:12]}... "
                f"differs from the recorded {expected[:12]}...; {hint}"
            )


def read_config(config_path: Path, what: str) -> dict:
    """A JSON config file as a dict; anything else is a one-line BenchError."""
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {what} config {config_path} ({exc})") from None
    if not isinstance(config, dict):
        raise BenchError(f"{what} config {config_path} is not a JSON object")
    return config


def constructor_defaults(cls) -> dict:
    """The keyword defaults of ``cls.__init__``: what ``from_pretrained`` uses for keys a config leaves out."""
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def same_json(a, b) -> bool:
    """Equal as JSON values: tuples equal lists, 1 equals 1.0."""
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def check_config(config_path: Path, expected: dict, what: str, defaults_from=None) -> dict:
    """The config must hold ``expected``. With ``defaults_from`` (a class), keys the file leaves out take
    that class's constructor defaults first, as ``from_pretrained`` does; returns that effective config."""
    config = read_config(config_path, what)
    if defaults_from is not None:
        config = {**constructor_defaults(defaults_from), **config}
    for key, want in expected.items():
        have = config.get(key)
        if not same_json(have, want):
            raise BenchError(f"{what} config {config_path} does not match: {key} is {have!r}, expected {want!r}")
    return config


# ---- weight files ----


def first_line(exc: BaseException) -> str:
    """The exception's first informative line, or its type when it has no message. For a refused
    ``weights_only`` load that is the restricted unpickler's reason, not torch's general advice."""
    text = str(exc)
    _, marker, reason = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (reason if marker else text).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def few(keys: Iterable, n: int = 3) -> str:
    keys = [str(k) for k in keys]
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors on the CPU; anything unreadable is a one-line BenchError."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as exc:  # SafetensorError, OSError, ...: the file is not what it claims to be
        raise BenchError(f"cannot read {what} {path}: {first_line(exc)}") from None


def read_torch_file(path: Path, what: str):
    """``torch.load(weights_only=True)`` on the CPU: tensors and plain containers only, no pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, BadZipFile, ...
        raise BenchError(f"cannot read {what} {path}: {first_line(exc)}") from None


def check_weights_only(path: Path, what: str) -> None:
    """Before a library reads ``path``: it must load with ``weights_only=True`` (memory-mapped, so its
    tensors are not read), so that no version of that library can unpickle code from it."""
    if Path(path).suffix.lower() not in PICKLE_SUFFIXES:
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:
        raise BenchError(f"cannot read {what} {path}: {first_line(exc)}") from None


def state_dict_problems(state_dict: Mapping, expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """What keeps ``state_dict`` from loading strictly into a model with the ``expected`` shapes, or None."""
    bad_keys = [k for k in state_dict if not isinstance(k, str)]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if isinstance(k, str) and k not in expected]
    not_tensors = [k for k, v in state_dict.items() if k in expected and not isinstance(v, torch.Tensor)]
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k])})" for k, v in state_dict.items()
             if k in expected and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(expected[k])]
    problems = [f"{len(keys)} {label}: {few(keys)}" for label, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected), ("non-string keys", bad_keys),
        ("entries that are not tensors", not_tensors), ("shape mismatches", wrong)) if keys]
    return "; ".join(problems) or None


def load_strict(model: nn.Module, state_dict: Mapping, where: str) -> nn.Module:
    """``model.load_state_dict(state_dict, strict=True)``, a mismatch being one BenchError line."""
    problems = state_dict_problems(state_dict, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if problems:
        raise BenchError(f"{where} does not match the model: {problems}")
    model.load_state_dict(state_dict, strict=True)
    return model


def check_loading_info(info: Mapping, where: str) -> None:
    """``from_pretrained(..., output_loading_info=True)``'s report: the libraries leave missing tensors at
    their random initialisation and skip unexpected ones; here either is an error."""
    labels = {"missing_keys": "missing keys", "unexpected_keys": "unexpected keys",
              "mismatched_keys": "shape mismatches", "error_msgs": "errors"}
    problems = []
    for key, label in labels.items():
        items = sorted(info.get(key) or [], key=str)
        if key == "mismatched_keys":
            items = [f"{k[0]} {tuple(k[1])} vs {tuple(k[2])}" if isinstance(k, tuple) and len(k) == 3 else k
                     for k in items]
        if items:
            problems.append(f"{len(items)} {label}: {few(' '.join(str(i).split()) for i in items)}")
    if problems:
        raise BenchError(f"{where} does not match the model: {'; '.join(problems)}")


# ---- diffusers model folders ----

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # preferred first


def load_diffusers_model(cls, model_dir: Path, what: str, hint: str = "", weights_what: str | None = None):
    """``cls.from_pretrained(model_dir)`` for a diffusers model folder (``config.json`` + weights), read safely and
    strictly: the safetensors file when there is one, else the ``.bin`` only after ``torch.load(weights_only=True)``
    accepted it (:func:`check_weights_only`, whatever the installed diffusers does), offline, and a missing,
    unexpected or misshapen tensor is a one-line BenchError naming the file (diffusers would leave a missing tensor
    at its random initialisation). ``what`` names the model in messages (``"DDPM CIFAR-10 UNet"``), ``weights_what``
    its weights (default: ``"<what> weights"``); ``hint`` is appended to a missing-file message.
    Returns ``(model in eval mode without gradients, the weights file read)``; the config is the caller's to check."""
    model_dir = Path(model_dir)
    weights_what = weights_what or f"{what} weights"
    weights = next((model_dir / f for f in DIFFUSERS_WEIGHTS if (model_dir / f).is_file()), None)
    if weights is None:
        raise BenchError(f"{model_dir} has a config.json but no {' or '.join(DIFFUSERS_WEIGHTS)}"
                         + (f"; {hint}" if hint else ""))
    check_weights_only(weights, weights_what)  # a .bin: no pickled code, whatever diffusers does with it
    try:
        model, loading = cls.from_pretrained(
            model_dir, local_files_only=True, use_safetensors=weights.suffix == ".safetensors",
            low_cpu_mem_usage=False,  # accelerate is not a dependency; without this diffusers warns every load
            output_loading_info=True,  # diffusers would leave a missing tensor randomly initialised
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise BenchError(f"cannot load the {what} from {model_dir}: {first_line(exc)}") from None
    check_loading_info(loading, f"{weights_what} {weights}")
    return model.eval().requires_grad_(False), weights
