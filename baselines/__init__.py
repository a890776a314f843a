"""Faithful reimplementations of the baselines, one subpackage each: DeepCache
(``baselines.deepcache``), Q-Diffusion (``baselines.qdiffusion``) and PTQD (``baselines.ptqd``); beside them,
``baselines.modiff_authors_act``, not a baseline: the MoDiff authors' own activation settings (``paper-lcq``,
``paper-ltq``), glue only.

Each subpackage is a library that needs ``torch`` and ``modiff`` only; its ``method`` module is the
glue that registers it with the ``bench`` harness (the ``deepcache`` cache scheme, the ``qdiff``,
``ptqd``, ``paper-lcq`` and ``paper-ltq`` base quantizers) and the only place that knows the harness.
The harness's registry loads those modules (``BUILTIN_MODULES``); importing ``baselines`` or a
library module does not.
"""
