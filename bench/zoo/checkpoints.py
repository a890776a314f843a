"""Checkpoint directories with a ``manifest.json`` recording the SHA-256 of every file.

A directory is verified before anything in it is loaded: a missing file, a hash mismatch or a
config that does not match the expected architecture is a one-line :class:`BenchError`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from ..errors import BenchError
from ..provenance import sha256_file, write_json_atomic

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
