"""Faithful reimplementations of the baselines, one subpackage each: DeepCache
(``baselines.deepcache``), Q-Diffusion (``baselines.qdiffusion``) and PTQD (``baselines.ptqd``); beside them,
``baselines.modiff_authors_act``, not a baseline: the MoDiff authors' own activation settings (``paper-lcq``,
``paper-ltq``), glue only; and the peers' methods run through their own libraries: diffusers' caches
(``baselines.diffusers_cache``: First Block Cache, TaylorSeer, PAB, FasterCache, MagCache) and torchao's
quantization (``baselines.torchao``).

Each subpackage is a library that needs ``torch`` and ``modiff`` only (the peers' two also their own library);
its ``method`` module is the glue that registers it with the ``bench`` harness (the ``deepcache``, ``fbcache``,
``taylorseer``, ``pab``, ``fastercache`` and ``magcache`` cache schemes, the ``qdiff``, ``ptqd``, ``paper-lcq``,
``paper-ltq`` and ``torchao-*`` base quantizers) and the only place that knows the harness.
The harness's registry loads those modules (``BUILTIN_MODULES``); importing ``baselines`` or a
library module does not.
"""
