"""Reference data of the Inception metrics: the real images FID, sFID and precision / recall compare against.

Per zoo model, the data its entry declares (``bench.zoo.registry.ReferenceData``: a dataset of
:data:`DATASETS`, or none), unless ``[inception] reference_images`` or ``reference_stats`` names
other data (either one replaces the default of every model in the matrix, so a matrix using one
holds one model); see :func:`reference_for`. The datasets:

``digits-train`` (model ``digits``)
    the training digits shipped with the package.
``cifar10-train`` (model ``ddpm-cifar10``)
    CIFAR-10 train, 50,000 images: the images of torch-fidelity's registered input ``cifar10-train``
    (torchvision's ``CIFAR10(train=True)``, 32 x 32 uint8, no resize), in its order. Read from
    ``[inception] cifar10_root`` (the folder holding torchvision's ``cifar-10-batches-py``, or that
    folder itself), else from torch-fidelity's own default, ``$TORCH_HOME/fidelity_datasets``.
    Downloaded (by torchvision's download helper, into that folder) only when ``[inception] download
    = true``; with neither a copy nor the permission, the columns are missing with a reason saying
    what to get and where to put it. Every file's md5 is checked against torchvision's list first.
    The batches are pickles, and torchvision would ``pickle.load`` them (code execution from a user
    folder), so they are read here by an unpickler that accepts only what a genuine batch holds: a
    dict of strings, lists and one uint8 numpy array (numpy's array reconstruction and nothing else).

Models without a dataset: ``ldm-church`` and ``ldm-bedroom`` (LSUN Churches, ``church_outdoor``
train, and LSUN Bedrooms are not redistributable: give a folder of their images or a reference
batch; guided-diffusion publishes ``VIRTUAL_lsun_bedroom256.npz``, it has no church batch),
``sd-v1-4`` and every ``diffusers:<directory or hub id>`` model: the Inception metrics that need a
reference are missing with a reason naming what to give.

Sources:

``reference_images``: a folder of PNG / JPEG files (``.png``, ``.jpg``, ``.jpeg``, any case; other
files are ignored), searched recursively and read in sorted order of their relative paths. Each is
converted to RGB and brought to the model's output size (the generated images' height and width)
by latent-diffusion's LSUN rule (``ldm/data/lsun.py``, ``LSUNBase``: crop the centred square of the
shorter side, ``[(h - c) // 2 : (h + c) // 2]``, then a PIL bicubic resize), without its random
flip, a training augmentation. For a non-square output size the crop is the largest centred box of
that aspect ratio. guided-diffusion's ``center_crop_arr`` differs (halving with a box filter while
the short side is at least twice the size, a bicubic resize of the short side, then the centre
crop): the two agree on square images already at the output size and differ by resampling detail
otherwise.

``reference_stats``: a ``.npz`` in guided-diffusion's reference-batch format. ``mu`` / ``sigma``
(2048-d pool features) and, optionally, ``mu_s`` / ``sigma_s`` (2023-d spatial features) give
``fid`` and ``sfid`` directly, as guided-diffusion's evaluator uses them; ``arr_0``, an
(N, H, W, 3) uint8 array, is used as images (streamed from the file, ``batch_size`` at a time,
never loaded whole): with statistics, for precision / recall only (guided-diffusion's batches hold
whole-dataset statistics next to 10,000 images for precision / recall); without, for everything.
Statistics-only references give no precision / recall and no ``fid_pytorch_fid`` (pytorch-fid
cannot use another extractor's statistics): those columns are missing with a reason. Caveat:
guided-diffusion's statistics come from the TF Inception graph, ours from torch-fidelity's port of
it (``bench.inception``), so ``fid`` / ``sfid`` against them mix the two implementations (close,
not bit-identical; our own reference statistics never mix).

Identity and caching: every reference carries an identity that, with its name, the extractor and
the weights file, keys its cached statistics (``bench.inception``): for a folder, its resolved
path, the output size, the resize rule and a sha256 of the listing (each file's relative path,
size and mtime; so an added, removed, renamed or rewritten file gives a new key); for an ``.npz``,
its sha256 (computed once per process per path, size and mtime); for ``cifar10-train`` the name
(every file's md5 is checked against torchvision's list, so the data behind the name is fixed).
Statistics are computed once per key and reused by every cell and run; precomputed statistics are
read from their file each time.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .errors import BenchError
from .inception import (
    POOL_DIMS,
    SPATIAL_DIMS,
    InceptionSettings,
    ReferenceSet,
    ReferenceUnavailable,
    _one_line,
    sha16,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RESIZE_RULE = "ldm-lsun-centre-crop-pil-bicubic"
CIFAR10_INPUT = "cifar10-train"  # torch-fidelity's registered input
CIFAR10_FOLDER = "cifar-10-batches-py"  # what torchvision's CIFAR10 reads under its root
PATH_KEYS = {"weights": "file", "pytorch_fid_weights": "file", "reference_stats": "file",
             "reference_images": "folder", "cifar10_root": "folder"}
_NPZ_STATS = {"mu": (POOL_DIMS,), "sigma": (POOL_DIMS, POOL_DIMS), "mu_s": (SPATIAL_DIMS,),
              "sigma_s": (SPATIAL_DIMS, SPATIAL_DIMS)}
_GIVE = ("set [inception] reference_images = '/path/to/images' (a folder of PNG / JPEG files) or "
         "reference_stats = '/path/to/batch.npz' (guided-diffusion's reference-batch format)")


def _digits_train(settings: InceptionSettings) -> ReferenceSet:
    from .data import load_digits_split

    return ReferenceSet("digits-train", lambda: load_digits_split("train").images)


# the reference datasets a zoo entry can declare (ReferenceData.dataset) -> its set under the settings
DATASETS: dict[str, Callable[[InceptionSettings], ReferenceSet]] = {
    "digits-train": _digits_train,
    CIFAR10_INPUT: lambda settings: cifar10_reference(settings),  # (defined below)
}


def _entry(model: str):
    """The model's zoo entry (a ``diffusers:...`` entry reads its configs), or None when it has none."""
    from .zoo import model_entry

    try:
        return model_entry(model)
    except BenchError:
        return None


def reference_for(model: str, settings: InceptionSettings | None = None,
                  size: tuple[int, int] | None = None) -> ReferenceSet | str:
    """The reference set of ``model`` under ``settings``, or a one-line reason why there is none.
    ``size``: the generated images' (height, width), the size folder images are brought to (default:
    the output size the model's zoo entry declares)."""
    settings = settings or InceptionSettings()
    if settings.reference_stats:
        return npz_reference(settings.reference_stats, settings.batch_size)
    if settings.reference_images:
        entry = _entry(model) if size is None else None
        size = size or (entry.output_size if entry is not None else None)
        if size is None:
            raise BenchError(f"the output size of model {model!r} is unknown: cannot resize the reference images")
        return folder_reference(settings.reference_images, size, settings.batch_size)
    entry = _entry(model)
    if entry is None:
        return f"no reference image set for model {model!r}; {_GIVE}"
    reference = entry.reference
    if reference.dataset is not None:
        if reference.dataset not in DATASETS:
            raise BenchError(f"model {model!r} declares reference dataset {reference.dataset!r}, which "
                             f"bench.references does not provide (it has {', '.join(DATASETS)})")
        return DATASETS[reference.dataset](settings)
    if reference.about:
        return f"no reference images for {model} ({reference.about}); {_GIVE}"
    return f"{model} has no default reference set; {_GIVE}"


# --- load-time checks ----------------------------------------------------------------------------


def check_settings(inception: Mapping, models: Sequence[str]) -> None:
    """``[inception]`` values a matrix may not carry into a run: missing paths, folders without
    images, files that are not reference batches, contradictions. Types are checked by the caller."""
    for key, kind in PATH_KEYS.items():
        if key in inception:
            path = Path(inception[key]).expanduser()
            if not (path.is_file() if kind == "file" else path.is_dir()):
                raise BenchError(f"inception.{key}: {inception[key]} is not a {kind}")
    if "batch_size" in inception and inception["batch_size"] < 1:
        raise BenchError(f"inception.batch_size must be >= 1, got {inception['batch_size']}")
    given = [key for key in ("reference_images", "reference_stats") if key in inception]
    if len(given) > 1:
        raise BenchError("inception.reference_images and inception.reference_stats both given; keep one")
    if given and len(set(models)) > 1:
        raise BenchError(f"inception.{given[0]} is one model's reference data, and this matrix has models "
                         f"{', '.join(sorted(set(models)))}: give each model its own matrix")
    if "reference_images" in inception and next(_image_files(Path(inception["reference_images"]).expanduser()),
                                                 None) is None:
        raise BenchError(f"inception.reference_images: no {'/'.join(IMAGE_SUFFIXES)} files in "
                         f"{inception['reference_images']}")
    if "reference_stats" in inception:
        _npz_members(Path(inception["reference_stats"]).expanduser(), "inception.reference_stats")
    if "cifar10_root" in inception and not inception.get("download", False):
        folder = _cifar10_folder(Path(inception["cifar10_root"]).expanduser())
        bad = _cifar10_problem(folder)
        if bad:
            raise BenchError(f"inception.cifar10_root: {bad} (or set inception.download = true)")


# --- CIFAR-10 ------------------------------------------------------------------------------------


def _torch_home() -> Path:
    try:
        return Path(torch.hub._get_torch_home())  # what torch-fidelity's datasets_root default uses
    except AttributeError:  # pragma: no cover - a torch without the private helper
        return Path(torch.hub.get_dir()).parent


def _cifar10_folder(root: Path) -> Path:
    """torchvision's ``cifar-10-batches-py``, given it or the folder holding it."""
    return root if root.name == CIFAR10_FOLDER else root / CIFAR10_FOLDER


def _cifar10_files() -> list[tuple[str, str]]:
    from torchvision.datasets import CIFAR10

    return [tuple(entry) for entry in CIFAR10.train_list + CIFAR10.test_list] + [
        (CIFAR10.meta["filename"], CIFAR10.meta["md5"])]


def _cifar10_problem(folder: Path) -> str | None:
    """Why ``folder`` is not torchvision's CIFAR-10 (a missing file, a failed md5 check), or None."""
    from torchvision.datasets.utils import check_integrity

    if not folder.is_dir():
        return f"{folder} does not exist"
    for name, md5 in _cifar10_files():
        if not (folder / name).is_file():
            return f"{folder} lacks {name}"
        if not check_integrity(str(folder / name), md5):
            return f"{folder / name} fails torchvision's md5 check (corrupt or not CIFAR-10)"
    return None


def cifar10_reference(settings: InceptionSettings) -> ReferenceSet:
    """CIFAR-10 train, the images of torch-fidelity's ``cifar10-train`` input; see the module docstring."""
    explicit = settings.cifar10_root is not None
    root_given = Path(settings.cifar10_root).expanduser() if explicit else _torch_home() / "fidelity_datasets"
    folder = _cifar10_folder(root_given)
    root = folder.parent  # what torchvision wants: the folder holding cifar-10-batches-py

    def load():
        import torchvision.datasets.cifar
        from torchvision.datasets import CIFAR10

        if not settings.download and not folder.is_dir():
            where = "[inception] cifar10_root" if explicit else "torch-fidelity's default root ($TORCH_HOME)"
            raise ReferenceUnavailable(
                f"CIFAR-10 train images (the reference of ddpm-cifar10) not found: looked for {folder} ({where}); "
                f"get {CIFAR10.url}, extract it into a folder DIR (giving DIR/{CIFAR10_FOLDER}) and set "
                f"[inception] cifar10_root = 'DIR', or set [inception] download = true")
        bad = _cifar10_problem(folder)
        if bad and settings.download:
            try:  # what CIFAR10(download=True) does: fetch the archive, check its md5, extract it
                root.mkdir(parents=True, exist_ok=True)
                torchvision.datasets.cifar.download_and_extract_archive(
                    CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
            except Exception as exc:  # a failed download: a reason, not a crash
                raise ReferenceUnavailable(
                    f"CIFAR-10 train images: torchvision could not download them into {root}: {_one_line(exc)}; "
                    f"get {CIFAR10.url} and extract it into {root}") from exc
            bad = _cifar10_problem(folder)
        if bad:
            raise ReferenceUnavailable(
                f"CIFAR-10 train images: {bad}; replace {folder} from {CIFAR10.url} or set [inception] download = true")
        return _cifar10_batches(folder, settings.batch_size)

    return ReferenceSet(CIFAR10_INPUT, load, identity="torch-fidelity registered input cifar10-train "
                        "(torchvision CIFAR10 train, md5-verified)")


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3's protocol-2 pickles use it for bytes; latin-1 only."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591") or errors != "strict":
        raise pickle.UnpicklingError(f"encoding {encoding!r} / {errors!r} is not used by a CIFAR-10 batch")
    return text.encode("latin1")


# The globals a CIFAR-10 python batch may name: numpy's array reconstruction (``_reconstruct``, ``ndarray``,
# ``dtype``, under numpy 1's and numpy 2's module names) for its data, and ``_codecs.encode`` (bytes in a
# Python 3 protocol-2 pickle). The release files (Python 2 cPickle) name only the first three.
_CIFAR10_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray((0,), np.uint8).__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray((0,), np.uint8).__reduce__()[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _Cifar10Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`_CIFAR10_GLOBALS`: nothing in the file can name
    (let alone call) any other function or class."""

    def find_class(self, module: str, name: str):
        try:
            return _CIFAR10_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch") from None


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """One CIFAR-10 python batch: its (N, 3, 32, 32) uint8 images and labels, read without running
    anything from the file (:class:`_Cifar10Unpickler`, latin-1 strings as torchvision reads them)."""
    try:
        with open(path, "rb") as f:
            entry = _Cifar10Unpickler(f, encoding="latin1").load()
    except Exception as exc:  # UnpicklingError (a refused global), EOFError, ValueError, MemoryError, ...
        raise BenchError(f"{path} is not a CIFAR-10 python batch: {_one_line(exc)}") from None
    if isinstance(entry, dict):
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data = entry.get("data") if isinstance(entry, dict) else None
    labels = entry.get("labels", entry.get("fine_labels")) if isinstance(entry, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and isinstance(labels, list) and len(labels) == len(data)):
        raise BenchError(f"{path} is not a CIFAR-10 python batch: expected 'data', (N, 3072) uint8, and N 'labels'")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar10_batches(folder: Path, batch_size: int) -> Iterator[torch.Tensor]:
    """The training images, file after file in torchvision's order, as uint8 (n, 3, 32, 32) batches."""
    from torchvision.datasets import CIFAR10

    for name, _md5 in CIFAR10.train_list:
        images, _labels = read_cifar10_batch(folder / name)
        for start in range(0, len(images), batch_size):
            yield torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))


# --- image folders -------------------------------------------------------------------------------


def _image_files(folder: Path) -> Iterator[Path]:
    """PNG / JPEG files under ``folder``, recursively, in no particular order."""
    for directory, _subdirs, names in os.walk(folder):
        for name in names:
            if name.lower().endswith(IMAGE_SUFFIXES):
                yield Path(directory) / name


def _sorted_images(folder: Path) -> list[Path]:
    return sorted(_image_files(folder), key=lambda p: p.relative_to(folder).as_posix())


def _folder_identity(folder: Path, files: list[Path], size: tuple[int, int]) -> str:
    listing = hashlib.sha256()
    for path in files:
        st = path.stat()
        listing.update(f"{path.relative_to(folder).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return (f"folder {folder}; {len(files)} files; listing sha256 {listing.hexdigest()}; "
            f"size {size[0]}x{size[1]}; {RESIZE_RULE}")


def _stem(text: str) -> str:
    """A plain file-name stem for the readable part of cache names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip("._-") or "reference"


def folder_reference(path: str | os.PathLike, size: tuple[int, int], batch_size: int = 64) -> ReferenceSet:
    """The PNG / JPEG files under ``path``, brought to ``size`` = (height, width); streamed."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise BenchError(f"reference images: {path} is not a folder")
    files = _sorted_images(folder)
    if not files:
        raise BenchError(f"reference images: no {'/'.join(IMAGE_SUFFIXES)} files in {path}")
    size = (int(size[0]), int(size[1]))
    identity = _folder_identity(folder, files, size)
    return ReferenceSet(f"{_stem(folder.name)}-{size[0]}x{size[1]}", lambda: _folder_batches(files, size, batch_size),
                        identity=identity)


def load_image(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """One reference image as (height, width, 3) uint8 at ``size`` = (height, width), by
    latent-diffusion's LSUN rule (centred crop, PIL bicubic resize); see the module docstring."""
    from PIL import Image, UnidentifiedImageError

    height, width = size
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise BenchError(f"reference image {path} could not be read: {_one_line(exc)}") from exc
    h, w = arr.shape[:2]
    if h * width > w * height:  # taller than the output: keep the full width
        crop_h, crop_w = w * height // width, w
    else:
        crop_h, crop_w = h, h * width // height
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    arr = arr[top:top + crop_h, left:left + crop_w]
    if arr.shape[:2] != (height, width):
        arr = np.asarray(Image.fromarray(arr).resize((width, height), resample=Image.BICUBIC))
    return arr


def _folder_batches(files: list[Path], size: tuple[int, int], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (n, 3, H, W) batches, decoded by a few threads one batch ahead of the consumer."""
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    try:
        ahead = [pool.submit(load_image, f, size) for f in chunks[0]] if chunks else []
        for k in range(len(chunks)):
            arrays = [future.result() for future in ahead]
            ahead = [pool.submit(load_image, f, size) for f in chunks[k + 1]] if k + 1 < len(chunks) else []
            yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- guided-diffusion reference batches ----------------------------------------------------------


def _read_npy_header(f, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise BenchError(f"{where}: unsupported .npy format version {version}")


def _npz_members(path: Path, where: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array in a reference batch (headers only), checked for the format."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = {}
            for name in zf.namelist():
                if name.endswith(".npy"):
                    with zf.open(name) as f:
                        shape, _fortran, dtype = _read_npy_header(f, where)
                    members[name[:-4]] = (shape, dtype)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise BenchError(f"{where}: {path} is not a readable .npz: {_one_line(exc)}") from exc
    for key, expected in _NPZ_STATS.items():
        if key in members and members[key][0] != expected:
            raise BenchError(f"{where}: {key} in {path} has shape {members[key][0]}, expected {expected} "
                             "(guided-diffusion's Inception statistics)")
        if key in members and members[key][1].kind != "f":  # e.g. an object array: pickled, never loaded
            raise BenchError(f"{where}: {key} in {path} is {members[key][1]}, expected floating point "
                             "(guided-diffusion's Inception statistics)")
    for a, b in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (a in members) != (b in members):
            raise BenchError(f"{where}: {path} has {a if a in members else b} without {b if a in members else a}")
    if "mu_s" in members and "mu" not in members:
        raise BenchError(f"{where}: {path} has spatial statistics (mu_s) but no pool statistics (mu)")
    if "arr_0" in members:
        shape, dtype = members["arr_0"]
        if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8:
            raise BenchError(f"{where}: arr_0 in {path} is {dtype} {shape}; expected (N, H, W, 3) uint8 images")
    elif "mu" not in members:
        raise BenchError(f"{where}: {path} holds neither images (arr_0) nor statistics (mu, sigma); "
                         f"it has {', '.join(sorted(members)) or 'no arrays'}")
    return members


def npz_reference(path: str | os.PathLike, batch_size: int = 64) -> ReferenceSet:
    """A guided-diffusion reference batch: statistics (``mu`` / ``sigma``, ``mu_s`` / ``sigma_s``)
    and / or images (``arr_0``); see the module docstring."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise BenchError(f"reference statistics: {path} is not a file")
    members = _npz_members(file, "reference statistics")

    def statistics() -> dict[str, np.ndarray]:
        try:  # allow_pickle=False: an object array is refused, never unpickled
            with np.load(file, allow_pickle=False) as data:
                out = {"pool_mu": data["mu"], "pool_sigma": data["sigma"]}
                if "mu_s" in members:
                    out.update(spatial_mu=data["mu_s"], spatial_sigma=data["sigma_s"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise BenchError(f"reference statistics: {file} could not be read: {_one_line(exc)}") from None
        return out

    def load() -> Iterator[torch.Tensor]:
        return _npz_image_batches(file, batch_size)

    return ReferenceSet(_stem(file.stem), load if "arr_0" in members else None,
                        identity=lambda: f"npz sha256 {sha16(file)}",
                        statistics=statistics if "mu" in members else None)


def _npz_image_batches(file: Path, batch_size: int) -> Iterator[torch.Tensor]:
    """``arr_0`` as uint8 (n, 3, H, W) batches, read from the archive a batch at a time."""
    with zipfile.ZipFile(file) as zf, zf.open("arr_0.npy") as f:
        shape, fortran, _dtype = _read_npy_header(f, "reference statistics")
        if fortran:
            raise BenchError(f"reference statistics: arr_0 in {file} is stored in Fortran order; save it C-ordered")
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            data = f.read(n * per_image)
            if len(data) != n * per_image:
                raise BenchError(f"reference statistics: arr_0 in {file} is truncated")
            images = np.frombuffer(bytearray(data), np.uint8).reshape(n, *shape[1:])  # writable, for torch
            yield torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
