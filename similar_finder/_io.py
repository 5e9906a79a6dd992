"""Atomic file writing and the default locations.

Every file the project writes goes through :func:`atomic_write`: the data lands
in a temporary file beside the target and is renamed over it only once
complete, so a crash or Ctrl-C never leaves a half-written CSV or model.

Default folders are relative to the current working directory (``data/``,
``models/``, ``output/``), like git's or pytest's: where the user runs the
command, never where the package happens to be installed.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

DATA_DIR = Path("data")
MODELS_DIR = Path("models")
OUTPUT_DIR = Path("output")
DEFAULT_FEATURES = DATA_DIR / "features.csv"

# mkstemp creates files readable by the owner only; written files should get the
# usual permissions instead. Reading the umask means setting it, so do it once.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs):
    """Open a temporary file for writing; on success rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
