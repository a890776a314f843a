"""Inception-based metrics of generated images: FID, Inception score, sFID, precision / recall.

Everything runs through the libraries made for it; this package only feeds them images, caches
the reference side and turns "no weights" into a reason instead of a download or a made-up number.

Columns (what each is exactly: :mod:`bench.inception.formulas`): ``fid`` (torch-fidelity),
``fid_pytorch_fid`` (pytorch-fid, the cross-check), ``is_mean`` / ``is_std``, ``sfid`` (guided-diffusion's
spatial features), ``precision`` / ``recall`` (on the Inception pool features).

One module per job:

:mod:`~bench.inception.settings`
    :class:`InceptionSettings`, the ``[inception]`` table of a matrix file.
:mod:`~bench.inception.weights`
    finding the weights files (downloading only when allowed), reading them with
    ``torch.load(weights_only=True)``, checking them key by key, building torch-fidelity's and
    pytorch-fid's networks from the checked tensors without touching either library's loaders, and
    recording each file's SHA-256 (:func:`weights_used`).
:mod:`~bench.inception.features`
    images to features: uint8 conversion and the NaN / inf check batch by batch, one streamed pass
    through both networks, the sFID hook.
:mod:`~bench.inception.stats_cache`
    the on-disk cache of the reference side's statistics and features.
:mod:`~bench.inception.reference`
    :class:`ReferenceSet`, :class:`ReferenceUnavailable`, the reference side of a computation and
    :func:`reference_statistics`.
:mod:`~bench.inception.formulas`
    the metric formulas on features (FID, sFID, IS, precision / recall), each the library's own.
:mod:`~bench.inception.metrics`
    :func:`inception_metrics`: the columns of a cell, with a reason for each one left empty.

A name is looked up in the module that owns it (``bench.inception.features._run``, not
``bench.inception._run``): a test replacing a function replaces it there.
"""

from .features import POOL_DIMS, SFID_CHANNELS, SFID_MODULE, SPATIAL_DIMS, Images
from .features import _to_uint8 as _to_uint8
from .formulas import IS_SPLITS, PRC_NEIGHBOURS, STATS_KEYS
from .metrics import COLUMNS, METRIC_COLUMNS, inception_metrics
from .reference import ReferenceSet, ReferenceUnavailable, reference_statistics
from .settings import InceptionSettings
from .stats_cache import read_cache as read_cache
from .stats_cache import sha16 as sha16
from .weights import PYTORCH_FID, TORCH_FIDELITY, weights_used
from .weights import _hub_file as _hub_file
from .weights import _load_pytorch_fid as _load_pytorch_fid
from .weights import _load_torch_fidelity as _load_torch_fidelity
from .weights import _one_line as _one_line
from .weights import _pytorch_fid_url as _pytorch_fid_url
from .weights import _torch_fidelity_url as _torch_fidelity_url

__all__ = [
    "COLUMNS", "IS_SPLITS", "METRIC_COLUMNS", "POOL_DIMS", "PRC_NEIGHBOURS", "PYTORCH_FID", "SFID_CHANNELS",
    "SFID_MODULE", "SPATIAL_DIMS", "STATS_KEYS", "TORCH_FIDELITY", "Images", "InceptionSettings", "ReferenceSet",
    "ReferenceUnavailable", "inception_metrics", "reference_statistics", "weights_used",
]
