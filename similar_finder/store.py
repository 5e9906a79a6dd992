"""The feature store: where vectors live on disk, and the only code that reads or writes them.

A store is named by its CSV (``features.csv``, one row per photo:
``path,f0,...,f{D-1}``); beside it, all named by :class:`FeatureFiles`:

* ``features.json`` – the sidecar: backbone, weights, input size, pooling,
  dimension, images root, library versions, counts and the **fingerprint**;
* ``features.npy`` – the same matrix in binary, so large libraries load in
  well under a second (the CSV stays the format people open and share);
* ``features.files.csv`` – the audit: every file found, ``ok``, ``fixed`` or
  ``skipped``, with the reason and its content hash (SHA-256);
* ``features.skipped.csv`` – the skipped files alone, with the reason;
* ``features.parquet/`` – with ``store_format="parquet"`` (for libraries where
  a CSV is absurd), the vectors as Parquet parts *instead of* the CSV and
  ``.npy``: ``path, sha256, vector`` rows, read memory-mapped;
* ``features.shards/`` – only while a Ray extraction runs: its workers'
  results, so a run that was killed resumes from them;
* ``features.thresholds.json`` – thresholds calibrated for this library;
* ``features.sqlite`` – the catalog: per-photo facts for browsing (:mod:`.catalog`);
* ``features.thumbs/`` – thumbnails for the app, by content hash;
* ``features.cache/`` – values derived from the features (PCA, colour
  histograms, hashes, ...).

One freshness rule holds for everything derived: it is keyed by content hashes,
never by dates. A photo is known by its SHA-256; the whole library by its
fingerprint, the hash of its configuration and of its photos' hashes in order.
:func:`write_store` writes every file atomically; :func:`read_store` reads them.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import atomic_write, read_json, write_csv, write_json
from .errors import MissingError, SimilarFinderError, check_choice

FORMAT_VERSION = 1
STORE_FORMATS = ("csv", "parquet")
PARQUET_PART_ROWS = 100_000  # rows per Parquet part: a part is written and read whole
FLOAT_FORMAT = "%.9g"  # 9 significant digits round-trip float32 exactly
AUDIT_COLUMNS = ["path", "status", "detail", "size", "mtime_ns", "sha256"]
CONFIG_KEYS = ("backbone", "weights", "input_size", "pooling", "dim", "adapter")


class FeaturesError(SimilarFinderError):
    """A features file is missing, unreadable or does not fit the request."""


@dataclass(frozen=True)
class FeatureFiles:
    """The files that make up one feature store, all derived from the CSV's path."""

    csv: Path

    def _beside(self, suffix: str) -> Path:
        return self.csv.with_suffix(suffix)

    @property
    def meta(self) -> Path:
        return self._beside(".json")

    @property
    def npy(self) -> Path:
        return self._beside(".npy")

    @property
    def audit(self) -> Path:
        return self._beside(".files.csv")

    @property
    def skipped(self) -> Path:
        return self._beside(".skipped.csv")

    @property
    def partial(self) -> Path:
        return self._beside(".partial")

    @property
    def parquet(self) -> Path:
        return self._beside(".parquet")

    @property
    def shards(self) -> Path:
        return self._beside(".shards")

    def exists(self) -> bool:
        """Whether a store was written here (in either format)."""
        return self.csv.is_file() or (self.meta.is_file() and self.parquet.is_dir())

    @property
    def thresholds(self) -> Path:
        return self._beside(".thresholds.json")

    @property
    def catalog(self) -> Path:
        return self._beside(".sqlite")

    @property
    def thumbnails(self) -> Path:
        return self._beside(".thumbs")

    def cache(self, name: str) -> Path:
        """The file of a derived value called ``name`` (see :meth:`Library.cached`)."""
        return self._beside(".cache") / f"{name}.joblib"

    def index(self, name: str | None = None) -> Path:
        """A trained FAISS index: ``<stem>.faiss`` for the default search, else ``<stem>.cache/<name>.faiss``."""
        return self._beside(".faiss") if name is None else self._beside(".cache") / f"{name}.faiss"


@dataclass
class StoredFeatures:
    """What a store holds: paths (relative to ``meta["images_root"]``), the matrix, the sidecar, the audit."""

    paths: list[str]
    matrix: np.ndarray
    meta: dict
    audit: pd.DataFrame | None


def config_of(spec: dict) -> dict:
    """The settings that must match for two feature sets to be comparable (an adapter, when one is used)."""
    return {k: spec[k] for k in CONFIG_KEYS if k in spec or k != "adapter"}


def fingerprint(config: dict, paths, shas) -> str:
    """The library's identity: its configuration and its photos' content hashes, in order."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for path, sha in zip(paths, shas):
        digest.update(f"\n{path}\t{sha}".encode())
    return digest.hexdigest()[:32]


def content_fingerprint(paths, matrix: np.ndarray) -> str:
    """The identity of a CSV known only by its contents (edited by hand, or without its sidecar)."""
    return hashlib.sha256(np.ascontiguousarray(matrix).tobytes() + "\n".join(paths).encode()).hexdigest()[:32]


# --- reading ---------------------------------------------------------------------------

def read_store(csv: str | os.PathLike) -> StoredFeatures:
    """Read a store written by :func:`write_store` (or a bare ``path,f0,...`` CSV shared on its own).

    The binary copy is used when it is in step with the CSV; a CSV edited or
    shared on its own is parsed and still works.
    """
    files = FeatureFiles(Path(csv))
    if not files.exists():
        raise FeaturesError(
            f"no features file at {files.csv}. Create it with "
            f"`similar-finder extract IMAGES_DIR --out {files.csv}`."
        )
    meta = read_meta(files)
    audit = read_audit(files.audit) if files.audit.is_file() else None
    if meta.get("store_format") == "parquet":
        return _read_parquet_store(files, meta, audit)
    stat = files.csv.stat()
    if meta.get("csv_stat") == [stat.st_size, stat.st_mtime_ns] and files.npy.is_file() and audit is not None:
        matrix = np.load(files.npy)
        kept = audit[audit["status"] != "skipped"]
        paths = kept["path"].tolist()
        if matrix.shape[0] == len(paths):
            if "fingerprint" not in meta and "config" in meta:  # written by version 0.1
                meta["fingerprint"] = fingerprint(config_of(meta["config"]), paths, kept["sha256"])
            if "fingerprint" in meta:
                return StoredFeatures(paths, matrix, meta, audit)
    try:
        frame = pd.read_csv(files.csv, dtype={"path": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise FeaturesError(f"cannot read {files.csv}: {exc}") from exc
    if frame.columns[0] != "path":
        raise FeaturesError(f"{files.csv} does not start with a 'path' column; is it a features file?")
    paths, matrix = frame["path"].tolist(), frame.iloc[:, 1:].to_numpy(dtype=np.float32)
    # Parsed: edited by hand, or shared without its companions; identified by what it holds.
    meta["fingerprint"] = content_fingerprint(paths, matrix)
    return StoredFeatures(paths, matrix, meta, audit)


def _read_parquet_store(files: FeatureFiles, meta: dict, audit) -> StoredFeatures:
    held, matrix = read_vectors(sorted(files.parquet.glob("part-*.parquet")), int(meta["dim"]), ("path", "sha256"))
    paths, shas = held["path"], held["sha256"]
    kept = audit[audit["status"] != "skipped"] if audit is not None else None
    # The parts must hold the very photos the audit lists, by content: not the same paths with other vectors.
    if kept is None or paths != kept["path"].tolist() or shas != kept["sha256"].tolist():
        raise FeaturesError(f"{files.parquet} does not match its audit {files.audit} (an interrupted write?); "
                            f"run the same extraction again, or with --overwrite")
    return StoredFeatures(paths, matrix, meta, audit)


def read_vectors(parts, dim: int, columns=("path",)) -> tuple[dict[str, list], np.ndarray]:
    """``({column: values}, matrix)`` from Parquet files with those ``columns`` and a ``vector`` column.

    Each file is read once, memory-mapped.
    """
    import pyarrow.parquet as pq

    values: dict[str, list] = {name: [] for name in columns}
    blocks = []
    for part in parts:
        try:
            table = pq.read_table(part, columns=[*columns, "vector"], memory_map=True)
        except (OSError, ValueError) as exc:
            raise FeaturesError(f"cannot read {part}: {exc}") from exc
        for name in columns:
            values[name].extend(table.column(name).to_pylist())
        vectors = table.column("vector").combine_chunks()
        # A fixed-size list column is one flat float32 buffer: reshaped, not copied row by row.
        blocks.append(np.asarray(vectors.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim))
    matrix = np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)
    return values, matrix


def write_vectors(path: Path, columns: dict, vectors: np.ndarray) -> None:
    """One Parquet file, atomically: ``columns`` (name -> list) and a fixed-size ``vector`` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = np.ascontiguousarray(vectors, np.float32)
    table = pa.table({**columns, "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)),
                                                                            vectors.shape[1])})
    with atomic_write(path, "wb") as handle:
        # Uncompressed, plain floats: reading is a memory map, not a decode.
        pq.write_table(table, handle, compression="none", use_dictionary=[c for c in columns])


def read_meta(files: FeatureFiles) -> dict:
    """The sidecar, with ``images_root`` made absolute."""
    if not files.meta.is_file():
        # A bare CSV (shared without its sidecar) still loads; nothing is known of its origin.
        return {"images_root": str(files.csv.parent.resolve())}
    try:
        meta = read_json(files.meta)
    except (OSError, ValueError) as exc:
        raise FeaturesError(f"cannot read the sidecar {files.meta}: {exc}") from exc
    root = Path(meta.get("images_root", "."))
    root = root if root.is_absolute() else (files.csv.parent / root).resolve()
    absolute = meta.get("images_root_absolute")
    if not root.is_dir() and absolute and Path(absolute).is_dir():
        root = Path(absolute)  # the features folder was moved, the photos were not
    meta["images_root"] = str(root)
    return meta


def read_audit(path: Path) -> pd.DataFrame:
    return pd.read_csv(
        path, dtype={"path": str, "status": str, "detail": str, "sha256": str}, keep_default_na=False
    )


# --- writing ---------------------------------------------------------------------------

def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\r\n') else text


def write_feature_csv(handle, paths: list[str], matrix: np.ndarray) -> None:
    """``path,f0,...`` rows; five times faster than ``DataFrame.to_csv`` for wide float matrices."""
    row_format = ",".join([FLOAT_FORMAT] * matrix.shape[1])
    handle.write(",".join(["path", *(f"f{i}" for i in range(matrix.shape[1]))]) + "\n")
    for path, row in zip(paths, matrix.tolist()):
        handle.write(f"{_csv_field(path)},{row_format % tuple(row)}\n")


def write_store(files: FeatureFiles, root: Path, audit: pd.DataFrame, matrix: np.ndarray, config: dict,
                store_format: str = "csv") -> dict:
    """Write every file of a store atomically; ``matrix`` has one row per non-skipped audit row.

    ``store_format="parquet"`` writes the vectors as Parquet parts instead of
    the CSV and ``.npy`` (and removes those of an earlier CSV store, which would
    otherwise be read). Returns the sidecar as :func:`read_meta` would read it back.
    """
    import keras  # imported here: a run with nothing new needs neither Keras nor TensorFlow
    import sklearn

    check_choice("store format", store_format, STORE_FORMATS)
    kept = audit[audit["status"] != "skipped"]
    paths = kept["path"].tolist()
    # New data first, then the audit and the sidecar that describe it, and the other format's files last:
    # a crash at any point leaves a store that reads (the old one, or the new one).
    if store_format == "parquet":
        _write_parquet_parts(files, paths, kept["sha256"].tolist(), matrix)
        csv_stat = None
    else:
        with atomic_write(files.csv, newline="") as handle:
            write_feature_csv(handle, paths, matrix)
        with atomic_write(files.npy, "wb") as handle:
            np.save(handle, matrix)
        stat = files.csv.stat()
        csv_stat = [stat.st_size, stat.st_mtime_ns]
    write_csv(files.audit, audit[AUDIT_COLUMNS])
    skipped = audit.loc[audit["status"] == "skipped", ["path", "detail"]].rename(columns={"detail": "reason"})
    write_csv(files.skipped, skipped)
    meta = {
        "format": FORMAT_VERSION,
        "store_format": store_format,
        "config": config,
        **config,
        "fingerprint": fingerprint(config, paths, kept["sha256"]),
        # Relative, so a project moved with its photos still works; absolute as a fallback.
        "images_root": os.path.relpath(root, files.csv.parent),
        "images_root_absolute": str(root),
        "rows": int(matrix.shape[0]),
        "counts": audit["status"].value_counts().to_dict(),
        "csv_stat": csv_stat,
        "versions": {
            "python": platform.python_version(), "numpy": np.__version__, "pandas": pd.__version__,
            "keras": keras.__version__, "keras_backend": keras.backend.backend(),
            "scikit-learn": sklearn.__version__,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(files.meta, meta)
    if store_format == "parquet":
        for stale in (files.npy, files.csv if files.csv != files.parquet else None):
            if stale is not None and stale.is_file():
                stale.unlink()
    else:
        shutil.rmtree(files.parquet, ignore_errors=True)
    return read_meta(files)


def _write_parquet_parts(files: FeatureFiles, paths: list[str], shas: list[str], matrix: np.ndarray) -> None:
    # Parts are rewritten whole: a reader never sees a part list that mixes two versions, because the
    # sidecar written last (with the new fingerprint) is what readers check against the audit.
    files.parquet.mkdir(parents=True, exist_ok=True)
    count = 0
    for count, start in enumerate(range(0, len(paths), PARQUET_PART_ROWS), 1):
        end = start + PARQUET_PART_ROWS
        write_vectors(files.parquet / f"part-{count - 1:05d}.parquet",
                      {"path": paths[start:end], "sha256": shas[start:end]}, matrix[start:end])
    for stale in files.parquet.glob("part-*.parquet"):
        if int(stale.stem.split("-")[1]) >= count:
            stale.unlink()


def find_in_library(file: str | os.PathLike, row_of: dict[str, int], images_root: str | os.PathLike) -> int | None:
    """Row index of ``file`` if it is one of the library's images (``row_of``: path -> row), else None."""
    target = Path(file).expanduser().resolve()
    try:
        relative = target.relative_to(Path(images_root).resolve()).as_posix()
    except ValueError:
        relative = Path(file).as_posix()  # a path given relative to the images root
    return row_of.get(relative)


def require_file(file: str | os.PathLike, what: str = "query image") -> Path:
    path = Path(file).expanduser()
    if not path.is_file():
        raise MissingError(f"{what} {file} does not exist")
    return path
