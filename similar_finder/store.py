"""The feature store: one SQLite database that is the library's single commit point, and the only code that reads
or writes vectors.

A store is named by its CSV (``features.csv``); the truth is the database beside it, ``features.sqlite``
(WAL mode, so readers go on while a writer commits). It holds every photo with its **image_id** (given once, never
moved or reused: a photo keeps it across adds, removals, restarts, re-extraction and renames of the same content),
path, SHA-256, status, the facts the app browses by, and where its vector lies; the skipped files; the settings;
the calibrated thresholds; and the list of vector segments, each with its length and its blocks' digests. The vectors
themselves are append-only segment files (``features.vectors/00000001.f32``, raw float32 rows): a change writes a
new segment and then commits it, with the photos that point into it, in one SQLite transaction. A kill at any
instant therefore leaves the previous state or the new one; a segment or temporary file no transaction names is
a leftover, discarded at the next open with one line. Adding k photos to a library of n writes k vectors and k
rows, never the other n.

Beside it, written by ``extract`` as the **export** of the committed state (the design card's CSV), and never
read while the database is intact:

* ``features.csv`` – one row per photo, ``path,f0,...,f{D-1}`` (``features.parquet/`` parts instead, with
  ``store_format="parquet"``), and ``features.npy``, the same matrix in binary;
* ``features.files.csv`` – the audit: every file found, ``ok``, ``fixed`` or ``skipped``, with its reason and
  content hash; ``features.skipped.csv`` – the skipped files alone;
* ``features.json`` – the sidecar: backbone, weights, input size, pooling, dimension, images root, versions,
  counts and the fingerprint.

A CSV with no database (shared on its own, or written by an earlier version with its ``.npy``, audit and sidecar)
is imported into one when first opened; a damaged database is rebuilt from the exports, and a damaged segment
is named, with what to do, never served. Derived values live in ``features.cache/``, ``features.thumbs/`` and
``features.faiss``, keyed by the library's **fingerprint**, which changes with every committed change.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import platform
import shutil
import sqlite3
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xxhash

from ._io import atomic_write, fault_point, file_sha256, read_json, write_csv, write_json
from .errors import MissingError, SimilarFinderError, check_choice
from .images import PHOTO_FACTS, folder_of, photo_facts

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # the sidecar's format
SCHEMA_VERSION = 2  # the database's; 1 was the catalog alone
STORE_FORMATS = ("csv", "parquet")
PARQUET_PART_ROWS = 100_000  # rows per Parquet part: a part is written and read whole
FLOAT_FORMAT = "%.9g"  # 9 significant digits round-trip float32 exactly
AUDIT_COLUMNS = ["path", "status", "detail", "size", "mtime_ns", "sha256"]
CATALOG_COLUMNS = ("image_id", "path", "folder", "sha256", "bytes", "width", "height", "taken", "camera", "status",
                   "detail", "cluster")
CONFIG_KEYS = ("backbone", "weights", "input_size", "pooling", "dim", "adapter")
# Each 64 MB block of a segment has its own digest, so blocks are read and checked at once and a segment read
# out of order is checked piece by piece (memory stays the matrix). XXH3 runs at memory speed (24 GB/s on this
# machine, against 2.6 for zlib's CRC-32): opening a library costs its reads, not its checks.
CHECK_BLOCK_BYTES = 64 * 2**20
DIGEST, DIGEST_NAME = xxhash.xxh3_64_intdigest, "xxh3_64"
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE segments (segment INTEGER PRIMARY KEY, file TEXT UNIQUE NOT NULL, rows INTEGER NOT NULL,
                       bytes INTEGER NOT NULL, crc32 INTEGER NOT NULL, blocks TEXT NOT NULL);
CREATE TABLE photos (
    image_id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, folder TEXT NOT NULL, sha256 TEXT NOT NULL,
    bytes INTEGER, mtime_ns INTEGER, width INTEGER, height INTEGER, taken TEXT, camera TEXT, status TEXT NOT NULL,
    detail TEXT, cluster INTEGER, segment INTEGER NOT NULL REFERENCES segments, slot INTEGER NOT NULL);
CREATE INDEX photos_folder ON photos (folder);
CREATE INDEX photos_taken ON photos (taken);
CREATE INDEX photos_sha ON photos (sha256);
CREATE TABLE skipped (path TEXT PRIMARY KEY, sha256 TEXT, bytes INTEGER, mtime_ns INTEGER, reason TEXT);
CREATE TABLE thresholds (key TEXT PRIMARY KEY, record TEXT NOT NULL);
"""


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

    @property
    def vectors(self) -> Path:
        """The folder of vector segments."""
        return self._beside(".vectors")

    @property
    def database(self) -> Path:
        return self._beside(".sqlite")

    catalog = database  # the app browses the same database

    def exists(self) -> bool:
        """Whether a store was written here (a database, a CSV, or Parquet parts with their sidecar)."""
        return self.database.is_file() or self.csv.is_file() or (self.meta.is_file() and self.parquet.is_dir())

    @property
    def thresholds(self) -> Path:
        """Where version 0.2 kept calibrations (imported into the database)."""
        return self._beside(".thresholds.json")

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
    """What a store holds, in image_id order: ids, paths (relative to ``meta["images_root"]``), the matrix, the
    sidecar, the audit (every file found, skipped ones too)."""

    paths: list[str]
    matrix: np.ndarray
    meta: dict
    audit: pd.DataFrame | None
    ids: np.ndarray | None = None

    def __post_init__(self):
        if self.ids is None:
            self.ids = np.arange(len(self.paths), dtype=np.int64)


def config_of(spec: dict) -> dict:
    """The settings that must match for two feature sets to be comparable (an adapter, when one is used)."""
    return {k: spec[k] for k in CONFIG_KEYS if k in spec or k != "adapter"}


def content_fingerprint(paths, matrix: np.ndarray) -> str:
    """The identity of a CSV known only by its contents (edited by hand, or without its sidecar)."""
    return hashlib.sha256(np.ascontiguousarray(matrix).tobytes() + "\n".join(paths).encode()).hexdigest()[:32]


# --- the database -----------------------------------------------------------------------

def _connect(files: FeatureFiles, *, write: bool = False) -> sqlite3.Connection:
    db = sqlite3.connect(files.database, isolation_level=None, timeout=30, check_same_thread=False)
    if write:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a committed change survives a power cut, not only a kill
        db.set_trace_callback(lambda _statement: fault_point())
    return db


def _meta(db: sqlite3.Connection) -> dict:
    return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}


def _set_meta(db: sqlite3.Connection, **values) -> None:
    db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                   [(k, json.dumps(v, default=str)) for k, v in values.items()])


def _is_ours(db: sqlite3.Connection) -> bool:
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "segments" not in tables:
        return False
    row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    return row is not None and json.loads(row[0]) == SCHEMA_VERSION


@contextlib.contextmanager
def _writer(files: FeatureFiles, *, create: bool = False, timeout: float = 30):
    """A write transaction: the one writer at a time, leftovers of killed writers discarded first."""
    if create:
        _remove_database(files)
    files.database.parent.mkdir(parents=True, exist_ok=True)
    db = _connect(files, write=True)
    db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    try:
        db.execute("BEGIN IMMEDIATE")  # the writers' lock, taken before anything is written
        if create:
            for statement in filter(str.strip, _SCHEMA.split(";")):  # inside the transaction: all or nothing
                db.execute(statement)
            _set_meta(db, schema=SCHEMA_VERSION, uuid=uuid.uuid4().hex, generation=0, next_id=0, next_segment=1)
        elif not _is_ours(db):
            raise FeaturesError(f"{files.database} is not a similar_finder library database")
        _discard_leftovers(files, db)
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        db.close()


def _remove_database(files: FeatureFiles) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{files.database}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(files.vectors, ignore_errors=True)


def _leftovers(files: FeatureFiles, named: set[str]) -> list[Path]:
    """Segments no transaction committed, and temporary files of the store whose writer is dead."""
    found = [p for p in files.vectors.iterdir() if p.name not in named and not _being_written(p)] \
        if files.vectors.is_dir() else []
    return found + [p for p in files.csv.parent.glob(f".{files.csv.stem}.*.tmp") if not _being_written(p)]


def _being_written(path: Path) -> bool:
    """Whether a temporary file's writer is alive (its name carries the writer's process id: see ``atomic_path``)."""
    parts = path.name.split(".")  # .<name>.<pid>.<random>.tmp
    if len(parts) < 4 or parts[-1] != "tmp" or not parts[-3].isdigit():
        return False
    pid = int(parts[-3])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _discard_leftovers(files: FeatureFiles, db: sqlite3.Connection) -> None:
    leftovers = _leftovers(files, {r[0] for r in db.execute("SELECT file FROM segments")})
    if leftovers:
        log.warning("discarded %d leftovers of an interrupted change to %s: %s", len(leftovers), files.csv.name,
                    ", ".join(p.name for p in leftovers[:3]) + (" ..." if len(leftovers) > 3 else ""))
        for path in leftovers:
            if path.name.startswith(f".{files.csv.stem}.{JOINING}."):
                _undo_joining(path, db)
            fault_point()
            path.unlink(missing_ok=True)


JOINING = "joining"  # the journal of a file saved into the photos' folder for a change not yet committed


@contextlib.contextmanager
def joining(files: FeatureFiles, file: Path, relative: str, sha256: str):
    """Save ``file`` (a photo this process puts into the library's folder, such as an upload) under a journal:
    if the process dies before a commit takes it in, the next change or open of the library removes it again,
    so a photo its sender was never told was added does not join the library at the next extraction.
    """
    journal = files.csv.parent / f".{files.csv.stem}.{JOINING}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    # Written in place, not atomically: a journal is a leftover by its name alone, and one cut while written
    # was cut before its file existed.
    with open(journal, "w") as handle:
        json.dump({"file": str(file), "path": relative, "sha256": sha256}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        yield
    finally:
        journal.unlink(missing_ok=True)


def _undo_joining(journal: Path, db: sqlite3.Connection) -> None:
    """The file of a dead writer's journal out of the folder again, unless its commit took it in."""
    try:
        record = read_json(journal)
        file, path, sha = Path(record["file"]), record["path"], record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # cut while it was written, which was before its file existed: there is no file to undo
    taken = db.execute("SELECT 1 FROM photos WHERE path = ? AND sha256 = ?", (path, sha)).fetchone()
    if taken is None and file.is_file() and file_sha256(file) == sha:  # never a file someone put there since
        log.warning("removed %s: it was being added when its process stopped, and the add was not committed", path)
        fault_point()
        file.unlink()
    for partial in file.parent.glob(f".{file.name}.*.tmp") if file.parent.is_dir() else []:
        if not _being_written(partial):  # the file itself, cut while it was written
            partial.unlink(missing_ok=True)


def _write_segment(files: FeatureFiles, db: sqlite3.Connection, vectors: np.ndarray) -> int:
    meta = _meta(db)
    segment = int(meta["next_segment"])
    data = np.ascontiguousarray(vectors, np.float32)
    name = f"{segment:08d}.f32"
    files.vectors.mkdir(parents=True, exist_ok=True)
    with atomic_write(files.vectors / name, "wb") as handle:
        handle.write(memoryview(data).cast("B"))
    raw = memoryview(data).cast("B")
    digests = [DIGEST(raw[i:i + CHECK_BLOCK_BYTES]) for i in range(0, data.nbytes, CHECK_BLOCK_BYTES)]
    db.execute("INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?)",  # crc32: 0, the blocks' digests say it all
               (segment, name, len(data), data.nbytes, 0, json.dumps({DIGEST_NAME: digests})))
    _set_meta(db, next_segment=segment + 1)
    return segment


@dataclass
class Changes:
    """One change to a library, committed whole: photos put (new or with new content) with their vectors,
    photos moved (same content, new path), photos removed, and the skipped list (replaced when given)."""

    put: pd.DataFrame  # AUDIT_COLUMNS, one row per vector
    vectors: np.ndarray
    moved: dict[str, str]
    removed: list[str]
    skipped: pd.DataFrame | None = None  # AUDIT_COLUMNS of every skipped file, or None to keep the list

    @property
    def empty(self) -> bool:
        return self.put.empty and not self.moved and not self.removed and self.skipped is None


def commit(files: FeatureFiles, changes: Changes, *, root: Path, config: dict | None, sidecar: dict | None = None,
           create: bool = False, fingerprint_as: str | None = None, thresholds: dict | None = None,
           workers: int = 8) -> dict:
    """Apply ``changes`` in one transaction: after a crash, the library is as it was before or after, never between.

    ``create`` starts a new database (the previous one, if any, is removed first: an import). Ids are kept by
    path (and by content across a move); new photos get new ids. Returns ``{"ids": {path: image_id} of the
    photos put, "fingerprint", "generation"}``.
    """
    put = changes.put.reset_index(drop=True)
    paths = put["path"].tolist()
    with ThreadPoolExecutor(workers) as pool:  # header reads are I/O: threads overlap them
        facts = list(pool.map(photo_facts, (root / p for p in paths)))
    with _writer(files, create=create) as db:
        meta = _meta(db)
        content = _content_sum(db, meta)
        # (sha256, image_id) of every photo the change touches, as committed before it.
        before = {p: (sha, i) for p, sha, i in _select_in(db, "SELECT path, sha256, image_id FROM photos WHERE path IN",
                                                         [*paths, *changes.moved, *changes.removed])}
        sha_before = {p: sha for p, (sha, _) in before.items()}
        for path in changes.removed:
            content -= _photo_hash(path, sha_before.get(path, ""))
        for old, new in changes.moved.items():
            content += _photo_hash(new, sha_before.get(old, "")) - _photo_hash(old, sha_before.get(old, ""))
        for path, sha in zip(paths, put["sha256"].fillna("")):
            content += _photo_hash(path, sha) - (_photo_hash(path, sha_before[path]) if path in before else 0)
        content %= 2 ** 256
        segment = _write_segment(files, db, changes.vectors) if len(put) else None
        for old, new in changes.moved.items():
            db.execute("UPDATE photos SET path = ?, folder = ? WHERE path = ?", (new, folder_of(new), old))
        db.executemany("DELETE FROM photos WHERE path = ?", [(p,) for p in changes.removed])
        next_id = int(meta["next_id"])
        rows = []
        for slot, (rec, fact) in enumerate(zip(put.itertuples(index=False), facts)):
            image_id = before[rec.path][1] if rec.path in before else None  # a photo put again keeps its id
            if image_id is None:
                image_id, next_id = next_id, next_id + 1
            rows.append((image_id, rec.path, folder_of(rec.path), rec.sha256 or "", _int(rec.size), _int(rec.mtime_ns),
                         *(fact[k] for k in PHOTO_FACTS), rec.status, rec.detail, None, segment, slot))
        db.executemany(f"INSERT OR REPLACE INTO photos VALUES ({','.join('?' * 15)})", rows)
        if changes.skipped is not None:
            db.execute("DELETE FROM skipped")
            db.executemany("INSERT OR REPLACE INTO skipped VALUES (?, ?, ?, ?, ?)",
                           [(r.path, r.sha256, _int(r.size), _int(r.mtime_ns), r.detail)
                            for r in changes.skipped.itertuples(index=False)])
        unused = [r[0] for r in db.execute("SELECT file FROM segments WHERE segment NOT IN "
                                           "(SELECT DISTINCT segment FROM photos)")]
        db.execute("DELETE FROM segments WHERE segment NOT IN (SELECT DISTINCT segment FROM photos)")
        db.execute("UPDATE photos SET cluster = NULL WHERE cluster IS NOT NULL")  # clusters of the old library
        generation = int(meta["generation"]) + 1
        # The fingerprint is a function of the content (the settings, and the set of photos' paths and hashes): the
        # same photos give the same fingerprint, so values derived from them are found again. The set's hash is a
        # sum kept up to date change by change, so a commit costs what it changes.
        stamp = fingerprint_as or hashlib.sha256(
            json.dumps(config, sort_keys=True, default=str).encode() + f"{content:064x}".encode()).hexdigest()[:32]
        values = {"generation": generation, "next_id": next_id, "fingerprint": stamp, "config": config,
                  "content_sum": f"{content:064x}",
                  "images_root": os.path.relpath(root, files.csv.parent), "images_root_absolute": str(root),
                  "sidecar": {**meta.get("sidecar", {}), **(sidecar or {})}, "exported": None,
                  "dim": int(changes.vectors.shape[1]) if len(put) else meta.get("dim")}
        _set_meta(db, **values)
        for key, record in (thresholds or {}).items():
            record = {**record, "fingerprint": record.get("fingerprint") or stamp}
            db.execute("INSERT OR REPLACE INTO thresholds VALUES (?, ?)", (key, json.dumps(record, default=str)))
    for name in unused:  # no longer named by the committed state; a crash here leaves a leftover, discarded later
        fault_point()
        (files.vectors / name).unlink(missing_ok=True)
    return {"ids": {r[1]: r[0] for r in rows}, "fingerprint": stamp, "generation": generation}


def _select_in(db: sqlite3.Connection, query: str, values: list, chunk: int = 500):
    """Rows of ``query`` (ending in ``IN``) for ``values``, asked in chunks (SQLite bounds a statement's values)."""
    for start in range(0, len(values), chunk):
        part = values[start:start + chunk]
        yield from db.execute(f"{query} ({','.join('?' * len(part))})", part)


def _photo_hash(path: str, sha: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{path}\t{sha}".encode()).digest(), "big")


def _content_sum(db: sqlite3.Connection, meta: dict) -> int:
    """The sum of every photo's hash (mod 2^256), as recorded, or computed once from the photos."""
    if meta.get("content_sum") is not None:
        return int(meta["content_sum"], 16)
    return sum(_photo_hash(p, s) for p, s in db.execute("SELECT path, sha256 FROM photos")) % 2 ** 256


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# --- reading ---------------------------------------------------------------------------

def read_store(csv: str | os.PathLike, *, damaged: str = "refuse") -> StoredFeatures:
    """The committed state of the store at ``csv``, checked; a CSV without a database is imported first.

    A damaged database is rebuilt from the exports (saying so); a damaged vector segment is refused with one
    line naming it, or, with ``damaged="drop"`` (what ``extract`` asks, to embed them again), its photos are
    left out of the answer.
    """
    files = FeatureFiles(Path(csv))
    check_choice("damaged", damaged, ("refuse", "drop"))
    for attempt in range(2):
        try:
            stored = _read_database(files, damaged)
        except sqlite3.DatabaseError as exc:
            if not _exports_exist(files):
                raise FeaturesError(f"{files.database} is damaged ({exc}) and there is no {files.csv.name} to "
                                    f"rebuild it from; run `similar-finder extract IMAGES_DIR --features-file "
                                    f"{files.csv}` again") from None
            log.warning("%s is damaged (%s); rebuilding it from %s", files.database.name, exc, files.csv.name)
            _remove_database(files)
            stored = None
        if stored is not None:
            if attempt == 0 and _export_edited(files, stored):
                continue
            return stored
        if attempt == 0:
            imported = _import_exports(files)
            if imported is not None:
                return imported  # a folder that cannot be written: served from the CSV as it is
    raise FeaturesError(f"no features file at {files.csv}. Create it with "
                        f"`similar-finder extract IMAGES_DIR --features-file {files.csv}`.")


def _exports_exist(files: FeatureFiles) -> bool:
    return files.csv.is_file() or (files.meta.is_file() and files.parquet.is_dir())


def _read_database(files: FeatureFiles, damaged: str) -> StoredFeatures | None:
    if not files.database.is_file():
        return None
    with contextlib.closing(_connect(files)) as db:
        if not _is_ours(db):
            log.info("replacing the catalog %s of an earlier version by the library database", files.database.name)
            return None
        db.execute("BEGIN")  # one snapshot for every table, whatever a writer commits meanwhile
        meta = _meta(db)
        segments = _frame(db, "SELECT * FROM segments", ints=("segment", "rows", "bytes", "crc32"))
        placed = _frame(db, "SELECT segment, slot FROM photos ORDER BY image_id", ints=("segment", "slot"))
        dim = int(meta.get("dim") or (meta.get("config") or {}).get("dim") or 0)
        # The vectors are read (by threads that wait on the disk and the page faults) while this thread reads
        # the rest of the photos' rows: a million photos open in the time of the longer of the two, not both.
        with ThreadPoolExecutor(1) as pool:
            reading = pool.submit(_read_vectors, files, placed, segments, dim, meta)
            photos = _frame(db, "SELECT image_id, path, sha256, bytes, mtime_ns, status, detail FROM photos "
                                "ORDER BY image_id", ints=("image_id",), numbers=("bytes", "mtime_ns"))
            skipped = _frame(db, "SELECT path, sha256, bytes, mtime_ns, reason FROM skipped ORDER BY path",
                             numbers=("bytes", "mtime_ns"))
            db.execute("COMMIT")
            matrix, lost = reading.result()
    with contextlib.suppress(sqlite3.OperationalError, FeaturesError, OSError):  # a reader that cannot write, or
        if _leftovers(files, set(segments["file"])):                            # a writer at work, leaves them
            with _writer(files, timeout=0.5):
                pass
    if lost:
        if damaged == "refuse":
            raise FeaturesError(lost[0])
        log.warning("%s", lost[0].split("; run")[0] + "; embedding them again")
        keep = ~placed["segment"].isin([int(s) for s in lost[1]]).to_numpy()
        photos, matrix = photos[keep], matrix[keep]
    return _stored(files, meta, photos, skipped, matrix)


def _frame(db: sqlite3.Connection, query: str, *, ints=(), numbers=()) -> pd.DataFrame:
    """A query's rows as a DataFrame: ``ints`` as int64, ``numbers`` as float64 (NULL: NaN), the rest as text.

    Rows go straight into typed columns: pandas' ``read_sql_query`` infers each column's type from the Python
    objects, which doubled the time of reading a million photos.
    """
    cursor = db.execute(query)
    names = [d[0] for d in cursor.description]
    columns = list(zip(*cursor.fetchall())) or [()] * len(names)
    data = {}
    for name, values in zip(names, columns):
        if name in ints:
            data[name] = np.fromiter(values, np.int64, len(values))
        elif name in numbers:
            data[name] = np.array([np.nan if v is None else v for v in values], np.float64)
        else:
            # Kept as Python strings: pandas 3 would convert them to Arrow and back for every list made of them.
            data[name] = pd.Series(values, dtype=object)
    return pd.DataFrame(data)


def _read_vectors(files, photos: pd.DataFrame, segments: pd.DataFrame, dim: int, meta: dict):
    """The matrix in the order of ``photos``, each segment checked by length and block digests as it is read."""
    # Room for a few adds after the last row: a photo added later is written there, not into a copy of all.
    buffer = empty_matrix(len(photos) + spare_rows(len(photos)), dim)
    matrix = buffer[:len(photos)]
    lost_segments, reasons = [], []
    position = pd.Series(np.arange(len(photos)), index=photos.index)
    for seg in segments.itertuples(index=False):
        members = photos["segment"].to_numpy() == seg.segment
        if not members.any():
            continue
        path = files.vectors / seg.file
        why = _check_segment(path, seg, dim, matrix, photos["slot"].to_numpy()[members], position[members].to_numpy())
        if why:
            lost_segments.append(seg.segment)
            reasons.append(f"{path.relative_to(files.csv.parent)} is {why}: the vectors of {int(members.sum())} "
                           f"photos are lost")
    if not reasons:
        return matrix, None
    root = meta.get("images_root_absolute") or "IMAGES_DIR"
    message = (f"{reasons[0]}{f' (and {len(reasons) - 1} more segments)' if len(reasons) > 1 else ''}; run "
               f"`similar-finder extract {root} --features-file {files.csv}` to embed them again")
    return matrix, (message, lost_segments)


def empty_matrix(rows: int, dim: int) -> np.ndarray:
    """An uninitialised float32 matrix whose pages come from the OS as they are first written, in plain pages.

    numpy advises transparent huge pages for large arrays; where the kernel compacts memory to find them (this
    machine: ``defrag=madvise``) every fault stalls: reading 2 GB into such an array ran at 0.30-0.85 GB/s,
    into an anonymous mapping without the advice at 1.8-2.0 GB/s. Opening a library is that read.
    """
    if rows * dim * 4 < 2**26 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.empty((rows, dim), np.float32)
    memory = mmap.mmap(-1, rows * dim * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(memory, np.float32).reshape(rows, dim)


def spare_rows(n: int) -> int:
    """Rows kept free after a library's matrix for photos added later (3%: memory stays near the vectors)."""
    return max(256, n // 32)


def _block_digests(seg) -> tuple:
    """How a segment's blocks are checked: (digest function, one digest per CHECK_BLOCK_BYTES block)."""
    blocks = json.loads(seg.blocks)
    if isinstance(blocks, dict):
        return DIGEST, blocks[DIGEST_NAME]
    return zlib.crc32, blocks  # a segment committed before block digests were XXH3 (CRC-32 then)


def _check_segment(path: Path, seg, dim: int, matrix: np.ndarray, slots: np.ndarray, rows: np.ndarray) -> str | None:
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    if size != seg.bytes or seg.bytes != seg.rows * dim * 4:
        return f"damaged ({size} bytes, {seg.bytes} committed)"
    digest, expected = _block_digests(seg)
    if len(expected) != -(-seg.bytes // CHECK_BLOCK_BYTES):
        return "damaged (its committed checksums do not cover it)"
    in_order = len(slots) == seg.rows and np.array_equal(slots, np.arange(seg.rows)) and \
        np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows)))
    fd = os.open(path, os.O_RDONLY)
    try:
        if in_order:  # the usual case: read straight into the matrix, no copy
            view = memoryview(matrix[rows[0]:rows[0] + seg.rows]).cast("B")

            def check(i: int) -> bool:
                piece = view[i * CHECK_BLOCK_BYTES:(i + 1) * CHECK_BLOCK_BYTES]
                return os.preadv(fd, [piece], i * CHECK_BLOCK_BYTES) == len(piece) and digest(piece) == expected[i]

            # Blocks are read at once: the time goes in faulting in the matrix's fresh pages, which threads
            # share out over the cores (os.preadv releases the GIL); the digest itself runs at memory speed.
            with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
                good = all(pool.map(check, range(len(expected))))
            return None if good else "damaged (its checksum differs from the committed one)"
        # Photos removed from it, or ids out of slot order: read block by block, each block checked, then each
        # whole row in it copied to its place (a row may straddle two blocks: its head waits in ``carry``).
        destination = np.full(seg.rows, -1, np.int64)
        destination[slots] = rows
        row_bytes, carry, first_row = dim * 4, b"", 0
        for i, want in enumerate(expected):
            block = os.pread(fd, CHECK_BLOCK_BYTES, i * CHECK_BLOCK_BYTES)
            if digest(block) != want:
                return "damaged (its checksum differs from the committed one)"
            data = carry + block
            whole = len(data) // row_bytes
            chunk = np.frombuffer(data, np.float32, whole * dim).reshape(whole, dim)
            where = destination[first_row:first_row + whole]
            wanted = where >= 0
            matrix[where[wanted]] = chunk[wanted]
            carry, first_row = data[whole * row_bytes:], first_row + whole
        return None
    finally:
        os.close(fd)


def _stored(files: FeatureFiles, meta: dict, photos: pd.DataFrame, skipped: pd.DataFrame,
            matrix: np.ndarray) -> StoredFeatures:
    audit = pd.concat([
        pd.DataFrame({"path": photos["path"], "status": photos["status"], "detail": photos["detail"].fillna(""),
                      "size": photos["bytes"], "mtime_ns": photos["mtime_ns"], "sha256": photos["sha256"]}),
        pd.DataFrame({"path": skipped["path"], "status": "skipped", "detail": skipped["reason"].fillna(""),
                      "size": skipped["bytes"], "mtime_ns": skipped["mtime_ns"],
                      "sha256": skipped["sha256"].fillna("")}),
    ], ignore_index=True)  # in image_id order, then the skipped files: exports sort it by path
    config = meta.get("config")
    sidecar = {**meta.get("sidecar", {}), **(config or {})}
    sidecar.update(format=FORMAT_VERSION, fingerprint=meta["fingerprint"], rows=len(photos),
                   generation=meta["generation"], counts=audit["status"].value_counts().to_dict(),
                   images_root=meta["images_root"], images_root_absolute=meta["images_root_absolute"])
    if config is not None:
        sidecar["config"] = config
    sidecar["images_root"] = _images_root(files, sidecar)
    has_shas = bool(len(photos)) and bool(photos["sha256"].astype(bool).all())
    return StoredFeatures(photos["path"].tolist(), matrix, sidecar, audit if has_shas or config else None,
                          photos["image_id"].to_numpy(np.int64))


def _images_root(files: FeatureFiles, meta: dict) -> str:
    root = Path(meta.get("images_root", "."))
    root = root if root.is_absolute() else (files.csv.parent / root).resolve()
    absolute = meta.get("images_root_absolute")
    if not root.is_dir() and absolute and Path(absolute).is_dir():
        root = Path(absolute)  # the features folder was moved, the photos were not
    return str(root)


def thresholds_of(files: FeatureFiles) -> dict:
    """Calibrations stored in the library, by ``"<kind>/<metric>"``."""
    with contextlib.closing(_connect(files)) as db:
        return {k: json.loads(v) for k, v in db.execute("SELECT key, record FROM thresholds")}


def save_thresholds(files: FeatureFiles, records: dict) -> None:
    """Store calibrations (not a change of the library: its fingerprint stays)."""
    with _writer(files) as db:
        db.executemany("INSERT OR REPLACE INTO thresholds VALUES (?, ?)",
                       [(k, json.dumps(v, default=str)) for k, v in records.items()])


def set_clusters(files: FeatureFiles, clusters: dict[int, int], fingerprint_of: str) -> None:
    """Record K-Means clusters by image_id, if the library is still the one they were fitted on."""
    with _writer(files) as db:
        if _meta(db).get("fingerprint") == fingerprint_of:
            db.executemany("UPDATE photos SET cluster = ? WHERE image_id = ?",
                           [(int(c), int(i)) for i, c in clusters.items()])


# --- importing a CSV, and the exports ---------------------------------------------------

def _import_exports(files: FeatureFiles) -> StoredFeatures | None:
    """Make the database from a CSV (bare, or an earlier version's store with its companions)."""
    if not _exports_exist(files):
        return None
    legacy = _read_exports(files)
    meta, audit = legacy.meta, legacy.audit
    root = Path(meta["images_root"])
    if audit is not None:
        kept = audit[audit["status"] != "skipped"].set_index("path").loc[legacy.paths].reset_index()
        skipped = audit[audit["status"] == "skipped"]
    else:
        kept = pd.DataFrame({"path": legacy.paths, "status": "ok", "detail": "", "size": None, "mtime_ns": None,
                             "sha256": ""})
        skipped = kept.iloc[:0]
    thresholds = {}
    if files.thresholds.is_file():
        with contextlib.suppress(OSError, ValueError):
            thresholds = read_json(files.thresholds)
    # Version 0.1 kept calibrations in the sidecar, without a fingerprint: they are of this very library.
    thresholds = thresholds or {k: {"fingerprint": meta.get("fingerprint"), **v}
                                for k, v in meta.get("thresholds", {}).items()}
    sidecar = {k: v for k, v in meta.items() if k not in ("fingerprint", "images_root", "thresholds", "config")}
    try:
        commit(files, Changes(kept[AUDIT_COLUMNS], legacy.matrix, {}, [], skipped[AUDIT_COLUMNS]), root=root,
               config=meta.get("config"), sidecar=sidecar, create=True, fingerprint_as=meta.get("fingerprint"),
               thresholds=thresholds)
    except sqlite3.OperationalError as exc:  # a read-only folder: the CSV is served as it is, ids its rows
        log.warning("cannot write %s (%s); reading %s as it is", files.database.name, exc, files.csv.name)
        return legacy
    log.info("imported %s (%d photos) into %s", files.csv.name, len(legacy.paths), files.database.name)
    _record_exports(files)
    return None


def _read_exports(files: FeatureFiles) -> StoredFeatures:
    """A CSV written by an earlier version (with its ``.npy``, audit and sidecar) or by anyone (alone)."""
    meta = read_meta(files)
    audit = None
    if files.audit.is_file():
        try:
            audit = read_audit(files.audit)
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            log.warning("ignoring the audit %s, which cannot be read: %s", files.audit.name, exc)
    if meta.get("store_format") == "parquet":
        return _read_parquet_store(files, meta, audit)
    stat = files.csv.stat()
    if meta.get("csv_stat") == [stat.st_size, stat.st_mtime_ns] and files.npy.is_file() and audit is not None:
        with contextlib.suppress(OSError, ValueError):
            matrix = np.load(files.npy)
            kept = audit[audit["status"] != "skipped"]
            if matrix.shape[0] == len(kept) and np.isfinite(matrix).all():
                return StoredFeatures(kept["path"].tolist(), matrix, meta, audit)
    paths, matrix = parse_feature_csv(files.csv)
    if audit is not None:
        kept = audit[audit["status"] != "skipped"]
        if set(kept["path"]) != set(paths):
            audit = None  # the audit describes other photos than the CSV holds: only the CSV is trusted
    if audit is None:  # known only by what it holds: its photos have no content hashes to name it by
        meta["fingerprint"] = content_fingerprint(paths, matrix)
    return StoredFeatures(paths, matrix, meta, audit)


def parse_feature_csv(csv: Path) -> tuple[list[str], np.ndarray]:
    """``path,f0,...`` rows, refused with one line when the file is cut short, damaged or not a features file."""
    try:
        frame = pd.read_csv(csv, dtype={"path": str})
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise FeaturesError(f"cannot read {csv}: {exc}") from None
    if not len(frame.columns) or frame.columns[0] != "path":
        raise FeaturesError(f"{csv} does not start with a 'path' column; is it a features file?")
    try:
        matrix = frame.iloc[:, 1:].to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise FeaturesError(f"{csv} holds values that are not numbers ({exc}); is it damaged?") from None
    bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1) | frame["path"].isna().to_numpy())
    if len(bad):
        raise FeaturesError(f"{csv} is incomplete from row {bad[0] + 2} ({len(bad)} rows without every value): cut "
                            f"short or damaged; extract again, or restore it")
    if not len(frame):
        raise FeaturesError(f"{csv} holds no photos")
    return frame["path"].tolist(), matrix


def _read_parquet_store(files: FeatureFiles, meta: dict, audit) -> StoredFeatures:
    held, matrix = read_vectors(sorted(files.parquet.glob("part-*.parquet")), int(meta["dim"]), ("path", "sha256"))
    paths, shas = held["path"], held["sha256"]
    kept = audit[audit["status"] != "skipped"] if audit is not None else None
    # The parts must hold the very photos the audit lists, by content: not the same paths with other vectors.
    if kept is None or paths != kept["path"].tolist() or shas != kept["sha256"].tolist():
        raise FeaturesError(f"{files.parquet} does not match its audit {files.audit} (an interrupted write?); "
                            f"run the same extraction again, or with --overwrite")
    return StoredFeatures(paths, matrix, meta, audit)


def _export_edited(files: FeatureFiles, stored: StoredFeatures) -> bool:
    """Whether ``features.csv`` was changed since it was exported; an edit that reads whole is taken in."""
    with contextlib.closing(_connect(files)) as db:
        exported = _meta(db).get("exported")
    if exported is None or stored.meta.get("store_format") == "parquet" or not files.csv.is_file():
        return False
    stat = files.csv.stat()
    if exported.get("csv") == [stat.st_size, stat.st_mtime_ns]:
        return False
    try:
        paths, matrix = parse_feature_csv(files.csv)
    except FeaturesError as exc:
        log.warning("%s; the library is read from %s, and the next extract writes the CSV again", exc,
                    files.database.name)
        with contextlib.suppress(sqlite3.Error, FeaturesError), _writer(files) as db:
            _set_meta(db, exported=None)
        return False
    order = path_order(stored.paths)  # the export lists photos by path; the library holds them by id
    if paths == [stored.paths[i] for i in order] and matrix.shape == stored.matrix.shape and \
            np.array_equal(matrix, stored.matrix[order]):
        _record_exports(files)  # touched, not changed
        return False
    log.info("%s was edited since it was exported; taking the edit into the library", files.csv.name)
    audit = stored.audit
    shas = dict(zip(audit["path"], audit["sha256"])) if audit is not None else {}
    put = pd.DataFrame({"path": paths, "status": "ok", "detail": "", "size": None, "mtime_ns": None,
                        "sha256": [shas.get(p, "") for p in paths]})
    removed = sorted(set(stored.paths) - set(paths))
    config = stored.meta.get("config") if matrix.shape[1] == stored.matrix.shape[1] else None
    commit(files, Changes(put, matrix, {}, removed), root=Path(stored.meta["images_root"]), config=config,
           fingerprint_as=None if config and put["sha256"].astype(bool).all() else content_fingerprint(paths, matrix))
    _record_exports(files)
    return True


def read_meta(files: FeatureFiles) -> dict:
    """The exported sidecar, with ``images_root`` made absolute."""
    if not files.meta.is_file():
        # A bare CSV (shared without its sidecar) still loads; nothing is known of its origin.
        return {"images_root": str(files.csv.parent.resolve())}
    try:
        meta = read_json(files.meta)
    except (OSError, ValueError) as exc:
        log.warning("ignoring the sidecar %s, which cannot be read: %s", files.meta.name, exc)
        return {"images_root": str(files.csv.parent.resolve())}
    meta["images_root"] = _images_root(files, meta)
    return meta


def read_audit(path: Path) -> pd.DataFrame:
    return pd.read_csv(
        path, dtype={"path": str, "status": str, "detail": str, "sha256": str}, keep_default_na=False
    )


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


# --- writing ---------------------------------------------------------------------------

def path_order(paths: list[str]) -> np.ndarray:
    """The rows of ``paths`` sorted by path: the order the exports list photos in."""
    return np.argsort(np.array(paths, dtype=object), kind="stable")


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\r\n') else text


def write_feature_csv(handle, paths: list[str], matrix: np.ndarray) -> None:
    """``path,f0,...`` rows; five times faster than ``DataFrame.to_csv`` for wide float matrices."""
    row_format = ",".join([FLOAT_FORMAT] * matrix.shape[1])
    handle.write(",".join(["path", *(f"f{i}" for i in range(matrix.shape[1]))]) + "\n")
    for path, row in zip(paths, matrix.tolist()):
        handle.write(f"{_csv_field(path)},{row_format % tuple(row)}\n")


def held_state(files: FeatureFiles) -> tuple[pd.DataFrame, dict | None, set] | None:
    """``(photos: path, image_id, sha256; config; skipped (path, sha256, reason))`` of the committed state, without
    its vectors; None if there is none."""
    if not files.database.is_file():
        return None
    try:
        with contextlib.closing(_connect(files)) as db:
            if not _is_ours(db):
                return None
            photos = pd.read_sql_query("SELECT path, image_id, sha256 FROM photos", db)
            skipped = set(db.execute("SELECT path, sha256, reason FROM skipped"))
            return photos, _meta(db).get("config"), skipped
    except sqlite3.DatabaseError:
        return None


def plan_changes(held: pd.DataFrame | None, audit: pd.DataFrame, matrix: np.ndarray, *, same_config: bool,
                 intact: set[str] | None = None, held_skipped: set | None = None) -> Changes:
    """What turns the committed photos ``held`` into ``audit`` (whose usable rows ``matrix`` holds, in order).

    ``intact``: the held photos whose vectors could be read (the others are written again)."""
    kept = audit[audit["status"] != "skipped"].reset_index(drop=True)
    skipped = audit[audit["status"] == "skipped"][AUDIT_COLUMNS]
    if held_skipped is not None and set(zip(skipped["path"], skipped["sha256"], skipped["detail"])) == held_skipped:
        skipped = None  # the same files skipped for the same reasons: nothing to write
    if held is None or held.empty or not same_config:
        removed = [] if held is None else sorted(set(held["path"]) - set(kept["path"]))
        return Changes(kept[AUDIT_COLUMNS], matrix, {}, removed, skipped)
    sha_of = dict(zip(held["path"], held["sha256"]))
    if intact is not None:
        sha_of = {p: (s if p in intact else None) for p, s in sha_of.items()}
    wanted = set(kept["path"])
    gone = {p: s for p, s in sha_of.items() if p not in wanted}
    new = [i for i, (p, s) in enumerate(zip(kept["path"], kept["sha256"])) if sha_of.get(p) != s]
    # A photo whose content left one path and arrived at another was moved or renamed: it keeps its id.
    gone_by_sha = {}
    for path, sha in gone.items():
        if sha:
            gone_by_sha.setdefault(sha, []).append(path)
    moved, put = {}, []
    for i in new:
        path, sha = kept["path"][i], kept["sha256"][i]
        if path not in sha_of and gone_by_sha.get(sha):
            moved[gone_by_sha[sha].pop()] = path
        else:
            put.append(i)
    removed = sorted(set(gone) - set(moved))
    return Changes(kept.loc[put, AUDIT_COLUMNS], matrix[put], moved, removed, skipped)


def write_store(files: FeatureFiles, root: Path, audit: pd.DataFrame, matrix: np.ndarray, config: dict,
                store_format: str = "csv", *, intact: set[str] | None = None,
                held: StoredFeatures | None = None) -> StoredFeatures:
    """Make the store hold exactly ``audit`` (one vector per non-skipped row, in ``matrix``), committing only what
    changed, then write the exports. ``held``: the committed state as the caller has just read it (not read
    again when nothing changed). Returns the committed state."""
    check_choice("store format", store_format, STORE_FORMATS)
    stored = held
    held = held_state(files)
    same = held is not None and held[1] == config
    changes = plan_changes(held[0] if held else None, audit, matrix, same_config=same, intact=intact,
                           held_skipped=held[2] if held else None)
    if held is None or not same or not changes.empty:
        sidecar = {"store_format": store_format, "versions": _versions(),
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        commit(files, changes, root=root, config=config, sidecar=sidecar, create=held is None)
        stored = None
    return export(files, store_format, stored)


def _versions() -> dict:
    # Read from the installed packages, not by importing them: writing a store needs neither Keras nor TensorFlow.
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        with contextlib.suppress(PackageNotFoundError):
            return version(name)
        return None

    return {"python": platform.python_version(), "numpy": np.__version__, "pandas": pd.__version__,
            "keras": installed("keras"), "keras_backend": _keras_backend(),
            "scikit-learn": installed("scikit-learn")}


def _keras_backend() -> str:
    import sys

    keras = sys.modules.get("keras")  # the backend in use when Keras is loaded (it embedded the vectors)
    return keras.backend.backend() if keras is not None else os.environ.get("KERAS_BACKEND", "tensorflow")


def export(files: FeatureFiles, store_format: str | None = None,
           stored: StoredFeatures | None = None) -> StoredFeatures:
    """Write the exports of the committed state (CSV and ``.npy``, or Parquet parts; audit, skipped list, sidecar),
    unless they are in step with it already. ``stored``: that state, if the caller holds it. Returns it."""
    stored = stored or read_store(files.csv)
    meta = stored.meta
    store_format = store_format or meta.get("store_format", "csv")
    with contextlib.closing(_connect(files)) as db:
        exported = _meta(db).get("exported")
    if exported and exported.get("generation") == meta["generation"] and exported.get("format") == store_format \
            and all(p.is_file() for p in (files.meta, files.audit)):
        return stored
    audit = stored.audit if stored.audit is not None else pd.DataFrame(
        {"path": stored.paths, "status": "ok", "detail": "", "size": None, "mtime_ns": None, "sha256": ""})
    audit = audit.sort_values("path", kind="stable", ignore_index=True)
    order = path_order(stored.paths)  # exports list photos by path
    paths, matrix = [stored.paths[i] for i in order], stored.matrix[order]
    if store_format == "parquet":
        shas = dict(zip(audit["path"], audit["sha256"]))
        _write_parquet_parts(files, paths, [shas.get(p, "") for p in paths], matrix)
        for stale in (files.npy, files.csv if files.csv != files.parquet else None):
            if stale is not None and stale.is_file():
                stale.unlink()
    else:
        with atomic_write(files.csv, newline="") as handle:
            write_feature_csv(handle, paths, matrix)
        with atomic_write(files.npy, "wb") as handle:
            np.save(handle, matrix)
        shutil.rmtree(files.parquet, ignore_errors=True)
    write_csv(files.audit, audit[AUDIT_COLUMNS])
    skipped = audit.loc[audit["status"] == "skipped", ["path", "detail"]].rename(columns={"detail": "reason"})
    write_csv(files.skipped, skipped)
    root = Path(meta["images_root"])
    sidecar = {k: v for k, v in meta.items() if k != "generation"}
    sidecar.update(store_format=store_format, images_root=os.path.relpath(root, files.csv.parent),
                   images_root_absolute=str(root), csv_stat=None)
    if store_format == "csv":
        stat = files.csv.stat()
        sidecar["csv_stat"] = [stat.st_size, stat.st_mtime_ns]
    write_json(files.meta, sidecar)
    _record_exports(files, meta["generation"], store_format)
    stored.meta = {**meta, "store_format": store_format}
    return stored


def _record_exports(files: FeatureFiles, generation: int | None = None, store_format: str | None = None) -> None:
    with contextlib.closing(_connect(files)) as db:
        meta = _meta(db)
    stat = files.csv.stat() if files.csv.is_file() else None
    record = {"generation": meta["generation"] if generation is None else generation,
              "format": store_format or meta.get("sidecar", {}).get("store_format", "csv"),
              "csv": [stat.st_size, stat.st_mtime_ns] if stat else None}
    with _writer(files) as db:
        _set_meta(db, exported=record)


def _write_parquet_parts(files: FeatureFiles, paths: list[str], shas: list[str], matrix: np.ndarray) -> None:
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
