"""User-facing errors.

Anything a user can cause (a bad name, a bad number, a missing or corrupt file) raises
:class:`BenchError`; the CLI turns it into one line on stderr and exit status 2. Any other
exception is a bug and keeps its traceback.
"""

import os
import re
from pathlib import Path

# ANSI/VT100 escape sequences (CSI ``ESC [ ... final``, OSC ``ESC ] ... BEL|ESC \``, two-byte ``ESC X``) and the
# other C0 control characters but tab and newline: torch's refusal of a pickle, for one, puts bold-on/off codes
# in its message, which would reach the terminal and run.log as they are
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]"
                      r"|[\x00-\x08\x0b-\x1f\x7f]")


def plain(text: str) -> str:
    """``text`` without terminal escape sequences or control characters (tab and newline stay), so
    that a message quoting a library's or a file's text prints and logs as text."""
    return _CONTROL.sub("", str(text))


class BenchError(Exception):
    """A problem with the user's input or files, reported as a one-line message (escape codes removed:
    see :func:`plain`)."""

    def __init__(self, *args):
        super().__init__(*(plain(a) if isinstance(a, str) else a for a in args))


def readable_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is a file this process can read, else BenchError naming ``what``. For files a matrix
    names, checked when it is resolved (``--dry-run`` too): before anything runs, not in a cell after sampling."""
    file = Path(path)
    if not file.is_file():
        where = "" if file.is_absolute() else f" (a relative path is taken from the current directory, {Path.cwd()})"
        raise BenchError(f"{what}: {path} {'is not a file' if file.exists() else 'does not exist'}{where}")
    try:
        with open(file, "rb"):
            pass
    except OSError as exc:
        raise BenchError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    return file
