"""Atomic file writing and the defaults a command starts from (folders, files, the K range).

Every file the project writes goes through :func:`atomic_write`: the data lands
in a temporary file beside the target and is renamed over it only once
complete, so a crash or Ctrl-C never leaves a half-written CSV or model.

Default folders are relative to the current working directory (``data/``,
``models/``, ``output/``), like git's or pytest's: where the user runs the
command, never where the package happens to be installed.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import tempfile
import threading
from pathlib import Path

DATA_DIR = Path("data")
MODELS_DIR = Path("models")
OUTPUT_DIR = Path("output")
DEFAULT_FEATURES = DATA_DIR / "features.csv"
DEFAULT_MODEL = MODELS_DIR / "kmeans.joblib"  # the K-Means baseline
DEFAULT_CLUSTERS = DATA_DIR / "clusters.csv"
# The k the K-Means baseline tries by silhouette. Here, not in .clustering, so that `--help` shows it
# without importing scikit-learn.
DEFAULT_K_RANGE = range(2, 11)

_UMASK_LOCK = threading.Lock()
# Fault injection, the way SQLite tests itself: with this variable set to N, the process exits hard at its N-th
# write step (tests/test_library_db.py crashes a change at every step and checks what the next open finds).
CRASH_AT_ENV = "SIMILAR_FINDER_CRASH_AT"
CRASH_EXIT = 86
_STEPS = itertools.count(1)


def fault_point() -> None:
    """Mark one write step (a file renamed or removed, an SQL statement of a change)."""
    at = os.environ.get(CRASH_AT_ENV)
    if at and next(_STEPS) == int(at):
        os._exit(CRASH_EXIT)


@functools.cache
def _umask() -> int:
    """The process's umask, read once, on the first write (never on import)."""
    # mkstemp creates files readable by the owner only; written files should get the usual
    # permissions instead. Linux tells the umask in /proc; elsewhere reading it means setting it.
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """A temporary path beside ``path`` for a writer that wants a file name (Keras, SQLite);
    renamed over ``path`` once the block succeeds, removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's process id in the name tells a leftover of a killed writer from a file being written.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        fault_point()
        os.replace(tmp, path)
        fault_point()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs):
    """Open a temporary file for writing; on success rename it over ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content: how a photo (or an adapter) is known, whatever its name."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")


def read_json(path: str | os.PathLike):
    with open(path) as handle:
        return json.load(handle)


def write_csv(path: str | os.PathLike, frame, **to_csv_kwargs) -> None:
    """A DataFrame to CSV, atomically, without the index."""
    with atomic_write(path, newline="") as handle:
        frame.to_csv(handle, index=False, **to_csv_kwargs)
