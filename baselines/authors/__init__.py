"""The MoDiff authors' own settings behind the paper's "(paper)" columns (their dynamic "LCQ"/"LTQ" rows):
:mod:`.method` registers ``paper-lcq`` and ``paper-ltq``."""
