"""The project's errors: one base class, so callers (and the CLI) can tell ours from a bug.

Every error the project raises on purpose derives from :class:`SimilarFinderError`
and says what went wrong and what to do. The command line turns exactly these
into one line on stderr; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class SimilarFinderError(Exception):
    """Something the user can fix: a bad argument, a missing or mismatched file."""


class UsageError(SimilarFinderError, ValueError):
    """An argument out of range or not among the allowed choices."""


class MissingError(SimilarFinderError, FileNotFoundError):
    """A file or folder the call needs is not there."""


def check_choice(name: str, value, choices):
    """``value`` if it is one of ``choices``, else a :class:`UsageError` that lists them."""
    if value not in choices:
        raise UsageError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")
    return value


def check_positive(name: str, value) -> int:
    """``value`` as an int if it is at least 1."""
    if int(value) < 1:
        raise UsageError(f"{name} must be at least 1, got {value}")
    return int(value)
