"""The one exception family for bad input: what a user can fix by changing an option, flag or file.

Entry points print an `InputError` as one line naming the option, flag, file, shard or key at fault
and exit with code 2; every other exception is a bug or an environment failure and keeps its
traceback. Library code raises `InputError` (or a subclass) only for input the caller handed it.
"""

from __future__ import annotations

INPUT_ERROR_EXIT_CODE = 2
TERMINATED_EXIT_CODE = 143  # 128 + SIGTERM: what a shell reports for a process SIGTERM ended (`Terminated`)


class InputError(ValueError):
    """A config value, tool argument, file or shard that cannot be used; the message says which and why."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder named by an option or flag does not exist or lacks what it must hold."""


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler, torchrun stopping its workers, `kill`): the work stops where it is
    and leaves through its cleanup, so the run lock is released and files are closed. A BaseException,
    so that no `except Exception` on the way swallows it; code that catches BaseException (DCP wraps
    each rank's failure in a CheckpointException) must re-raise it (`checkpoint.raise_if_interrupted`)."""
