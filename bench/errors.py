"""User-facing errors.

Anything a user can cause (a bad name, a bad number, a missing or corrupt file) raises
:class:`BenchError`; the CLI turns it into one line on stderr and exit status 2. Library code
(``modiff``, the baselines, the samplers) raises ValueError / TypeError naming the setting; where the
harness hands it the user's settings, :func:`user_input` turns those into BenchError. Any other
exception is a bug and keeps its traceback.
"""

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def user_input(where: str = "") -> Iterator[None]:
    """The boundary between library code and the user: a ValueError or TypeError raised inside (a library's
    check of a setting the user gave, whose message names it) becomes a one-line BenchError, prefixed by
    ``where`` when given. Wrap only what checks the user's settings: elsewhere such an error is a bug."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise BenchError(f"{where}: {exc}" if where else str(exc)) from None


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
