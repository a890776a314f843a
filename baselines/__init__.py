"""Faithful reimplementations of the baselines, one subpackage each: DeepCache
(``baselines.deepcache``), Q-Diffusion (``baselines.qdiffusion``) and PTQD (``baselines.ptqd``).

Each subpackage is a library that needs ``torch`` and ``modiff`` only; its ``method`` module is the
glue that registers it with the ``bench`` harness (the ``deepcache`` cache scheme, the ``qdiff``
and ``ptqd`` base quantizers) and the only place that knows the harness. ``bench.methods`` imports
those modules (``BUILTIN_MODULES``); importing ``baselines`` or a library module does not.
"""
