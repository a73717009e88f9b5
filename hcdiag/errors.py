"""One small hierarchy of errors. Only the CLI maps them to exit codes.

Exit codes (documented in the README):
    0  success
    1  a check failed (``--fail-above`` exceeded)
    2  usage error (bad option value, impossible combination)
    3  unreadable or unsupported input (not a checkpoint, no HC tensors, NaN logits, ...): an InputError that a
       reader raised where it recognised the problem, saying what, where and how to fix it
    4  internal error: any other exception, i.e. a bug in hcdiag (``HCDIAG_DEBUG=1`` prints its traceback), or
       running out of memory (:func:`is_out_of_memory`), which the CLI says as such
"""

from __future__ import annotations


class HcdiagError(Exception):
    """Base class. ``str(err)`` is one line: what, where, how to fix."""

    exit_code = 1


class UsageError(HcdiagError, ValueError):
    """An option value that cannot work (``--n 0``, ``--kron-factors 3,3`` for n = 8)."""

    exit_code = 2

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class InputError(HcdiagError):
    """A file that cannot be read, or holds nothing hcdiag can analyse."""

    exit_code = 3

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class CheckFailed(HcdiagError):
    """A threshold the user asked for was exceeded (``--fail-above``)."""

    exit_code = 1


def is_out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, or torch's CPU allocator failing (a RuntimeError "... can't allocate memory ...")."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))
