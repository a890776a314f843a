"""Not a baseline: the MoDiff authors' own activation settings behind the paper's "(paper)" columns (their dynamic
"LCQ"/"LTQ" rows), as base quantizers: :mod:`.method` registers ``paper-lcq`` and ``paper-ltq``. It has no library
part; the converter of the authors' calibrated checkpoints that it reads is
:mod:`baselines.qdiffusion.authors_checkpoint`."""
