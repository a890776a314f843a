"""User-facing errors.

Anything a user can cause (a bad name, a bad number, a missing or corrupt file) raises
:class:`BenchError`; the CLI turns it into one line on stderr and exit status 2. Any other
exception is a bug and keeps its traceback.
"""


class BenchError(Exception):
    """A problem with the user's input or files, reported as a one-line message."""
