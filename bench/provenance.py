"""What every recorded number carries: versions, git revision, machine, time."""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

_PACKAGES = ("torch", "torchvision", "diffusers", "numpy", "scikit-learn", "torch-fidelity", "pytorch-fid")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["modiff-bench"] = _own_version()
    return versions


def _own_version() -> str | None:
    try:
        return metadata.version("modiff-bench")
    except metadata.PackageNotFoundError:
        return None


def git_revision(repo: str | os.PathLike | None = None) -> str | None:
    """The checkout's commit, suffixed '-dirty' when tracked files differ; None outside git."""
    repo = Path(repo) if repo else Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def device_description(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, " \
           f"{torch.get_num_threads()} torch threads)"


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> str:
    """The instruction-set flags that decide int8 / BF16 speed (VNNI, AVX512-BF16, AMX), as /proc/cpuinfo
    lists them; "unknown" where it cannot be read."""
    text = _cpuinfo()
    if "flags" not in text:
        return "unknown"
    flags = set(text.split("flags")[1].split("\n")[0].split())
    return " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + ", ".join(ISA_FLAGS)


ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")  # environment variables that hide instructions


def timing_environment(device: str = "cpu", memory_format: str = "contiguous", compiled: bool = False) -> dict:
    """What a timing depends on beyond the cell's settings: the CPU model and ISA flags, torch's CPU
    capability and oneDNN version, the thread count, the memory format, torch.compile on/off, the memory
    allocator (a third of int8 MoDiff's time on a CPU: modiff/allocator.py), and the GPU with its CUDA and
    driver versions where there is one."""
    import re

    import torch

    from modiff.allocator import allocator_settings

    model = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    onednn = re.search(r"(?:oneDNN|MKL-DNN) v([0-9.]+)", torch.__config__.show())
    env = {"cpu_model": model.group(1).strip() if model else platform.processor() or platform.machine(),
           "cpu_flags": cpu_flags(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "onednn": onednn.group(1) if onednn else None, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "memory_format": memory_format, "compile": compiled,
           **allocator_settings()}
    limits = {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k)}
    if limits:  # an emulated older CPU (oneDNN / ATen told to use fewer instructions than the CPU has)
        env["isa_limits"] = limits
    if device.startswith("cuda") and torch.cuda.is_available():
        try:
            driver = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        except (OSError, IndexError):
            driver = None
        env.update(gpu=torch.cuda.get_device_name(torch.device(device)), cuda=torch.version.cuda, driver=driver,
                   capability=".".join(map(str, torch.cuda.get_device_capability(torch.device(device)))))
    return env


def provenance(device: str = "cpu") -> dict:
    return {
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "versions": package_versions(),
        "device": device_description(device),
        "platform": platform.platform(),
    }


# errno values that mean "the disk (or the user's quota) is full": not a failure of what was being written
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NEARLY_FULL_BYTES = 1 << 20


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError saying the disk or the quota is full (ENOSPC, EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def _disk_full_behind(exc: BaseException) -> OSError | None:
    """The disk-full OSError that ``exc`` is, or that it was raised from (``torch.save`` turns the
    OSError of a Python file's ``write`` into a RuntimeError whose context is that OSError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if is_disk_full(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _nearly_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename tmp to ``path``: an interrupted or failed write never leaves a
    half-written file under the final name, nor the temporary file.

    An OSError raised by the write carries ``path`` as its ``filename`` (not the temporary name), so a
    full disk reads "no space left on device while writing <path>". Writers that hide the errno of a
    failed write (``torch.save`` to a path raises a RuntimeError) are reported as ENOSPC when the
    file system has less than 1 MiB left at that moment."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        behind = _disk_full_behind(exc) if isinstance(exc, Exception) else None
        full = behind is None and isinstance(exc, Exception) and _nearly_full(path.parent)
        _remove(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:
            exc.filename, exc.filename2 = str(path), None
            raise
        if behind is not None:  # a library wrapped it: raise an OSError of the same errno
            raise OSError(behind.errno, behind.strerror or os.strerror(behind.errno), str(path)) from exc
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # never hide the error being raised
        pass


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))


class _HashingWriter(io.RawIOBase):
    """A write-only file that passes everything on to ``sink`` and counts and hashes it."""

    def __init__(self, sink):
        super().__init__()
        self._sink = sink
        self.size = 0
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._sink.write(view)
        self.digest.update(view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self._sink.flush()


def save_torch_atomic(path: str | os.PathLike, obj) -> tuple[int, str]:
    """``torch.save(obj)`` to ``path`` through :func:`write_atomic`; returns the file's size in bytes
    and its SHA-256, computed while writing (no second read). The bytes go through a Python file, so a
    full disk raises OSError(ENOSPC) with ``filename`` = ``path``."""
    import torch

    written: dict[str, object] = {}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            sink = _HashingWriter(f)
            torch.save(obj, sink)
        written["size"], written["sha256"] = sink.size, sink.digest.hexdigest()

    write_atomic(path, write)
    return int(written["size"]), str(written["sha256"])
