"""The library's catalog: per-photo facts in SQLite, for browsing, sorting and filtering.

``update_catalog(library)`` writes ``<stem>.sqlite`` beside the feature store
(``data/features.sqlite`` for ``data/features.csv``): one row per usable photo
with its relative path, folder, SHA-256, bytes, width, height, EXIF date taken
and camera where present, status (``ok`` / ``fixed``), and K-Means cluster once
one is fitted; the skipped files in a table of their own. ``image_id`` is the
photo's row in the library's matrix, so the catalog and the vectors agree.

The CSV stays the feature store; the catalog only describes the photos. It is
kept in step by ``extract`` (and rebuilt by the app when missing or stale),
incrementally: facts are reused by content hash, so only new photos are opened,
and only their headers are read. The file is written to a temporary name and
renamed, like every other file of the store. :class:`Catalog` reads it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from PIL import ExifTags, Image

from ._io import atomic_path
from .errors import check_choice

log = logging.getLogger(__name__)

SORTS = {  # sort key -> SQL order; photos without the fact go last either way
    "path": "path",
    "taken": "taken IS NULL, taken",
    "bytes": "bytes",
    "pixels": "width * height",
    "cluster": "cluster IS NULL, cluster",
}
_FACTS = ("width", "height", "taken", "camera")
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE photos (
    image_id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, folder TEXT NOT NULL, sha256 TEXT NOT NULL,
    bytes INTEGER, width INTEGER, height INTEGER, taken TEXT, camera TEXT, status TEXT NOT NULL,
    detail TEXT, cluster INTEGER);
CREATE INDEX photos_folder ON photos (folder);
CREATE INDEX photos_taken ON photos (taken);
CREATE TABLE skipped (path TEXT PRIMARY KEY, sha256 TEXT, bytes INTEGER, reason TEXT);
"""


def folder_of(path: str) -> str:
    """The folder of a relative path ("" for a photo at the top of the library)."""
    parent = Path(path).parent.as_posix()
    return "" if parent == "." else parent


def photo_facts(file: str | os.PathLike) -> dict:
    """Width and height (upright), EXIF date taken (ISO 8601) and camera, from the file's header only."""
    facts = dict.fromkeys(_FACTS)
    try:
        with Image.open(file) as img:
            width, height = img.size
            exif = img.getexif()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return facts  # extraction already said why such a file is unusable
    if exif.get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # turned a quarter: shown the other way up
        width, height = height, width
    facts.update(width=width, height=height)
    taken = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.DateTimeOriginal) or exif.get(ExifTags.Base.DateTime)
    facts["taken"] = _iso_date(taken)
    camera = " ".join(str(exif.get(tag, "")).strip("\x00 ") for tag in (ExifTags.Base.Make, ExifTags.Base.Model))
    facts["camera"] = camera.strip() or None
    return facts


def _iso_date(value) -> str | None:
    try:
        return datetime.strptime(str(value).strip("\x00 "), "%Y:%m:%d %H:%M:%S").isoformat()
    except (TypeError, ValueError):
        return None  # absent, or a camera's "0000:00:00 00:00:00"


def update_catalog(library, *, workers: int = 8) -> Path:
    """Write the catalog of ``library`` (a :class:`~similar_finder.library.Library`) beside its store.

    Facts of photos already catalogued (by SHA-256) are reused; K-Means clusters
    are kept while the library is unchanged. Returns the catalog's path.
    """
    path = library.files.catalog
    old_facts, old_clusters = _previous(path, library.fingerprint)
    audit = library.audit
    if audit is None:  # a bare CSV: nothing but paths is known of the photos
        import pandas as pd

        audit = pd.DataFrame({"path": library.paths, "status": "ok", "detail": "", "size": None, "sha256": ""})
    by_path = {r.path: r for r in audit.itertuples(index=False)}
    def key(rel: str) -> str:  # facts are known by content; a bare CSV's photos, with no hash, by path
        return by_path[rel].sha256 or f"path:{rel}"

    todo = sorted({key(p): p for p in library.paths if key(p) not in old_facts}.items())
    with ThreadPoolExecutor(workers) as pool:  # header reads are I/O: threads overlap them
        new_facts = dict(zip((k for k, _ in todo), pool.map(photo_facts, (library.root / p for _, p in todo))))
    facts = {**old_facts, **new_facts}
    rows = []
    for image_id, rel in enumerate(library.paths):
        rec = by_path[rel]
        known = facts[key(rel)]
        rows.append((image_id, rel, folder_of(rel), rec.sha256, _int(rec.size), *(known[k] for k in _FACTS),
                     rec.status, rec.detail, old_clusters.get(rel)))
    skipped = [(r.path, r.sha256, _int(r.size), r.detail) for r in audit.itertuples(index=False)
               if r.status == "skipped"]
    with atomic_path(path) as tmp, contextlib.closing(sqlite3.connect(tmp)) as db:
        db.executescript(_SCHEMA)
        db.executemany("INSERT INTO photos VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        db.executemany("INSERT INTO skipped VALUES (?,?,?,?)", skipped)
        db.execute("INSERT INTO meta VALUES ('fingerprint', ?)", (library.fingerprint,))
        db.commit()
    log.info("catalog %s: %d photos (%d read now), %d skipped", path.name, len(rows), len(todo), len(skipped))
    return path


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _previous(path: Path, fingerprint: str) -> tuple[dict, dict]:
    """Facts by SHA-256 from an existing catalog, and its clusters if it describes this very library."""
    if not path.is_file():
        return {}, {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            facts = {row[0] or f"path:{row[1]}": dict(zip(_FACTS, row[2:]))
                     for row in db.execute("SELECT sha256, path, width, height, taken, camera FROM photos")}
            held = db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
            clusters = {}
            if held and held[0] == fingerprint:
                clusters = dict(db.execute("SELECT path, cluster FROM photos WHERE cluster IS NOT NULL"))
            return facts, clusters
    except sqlite3.DatabaseError as exc:
        log.warning("rebuilding the catalog %s, which cannot be read: %s", path, exc)
        return {}, {}


class Catalog:
    """Read access to a catalog written by :func:`update_catalog`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        # One read-only connection per thread (the app answers from several); a rewritten catalog
        # is a new file, read through a new Catalog.
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            db.row_factory = sqlite3.Row
        return db

    @property
    def fingerprint(self) -> str | None:
        db = self._connect()
        row = db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
        return row[0] if row else None

    def images(self, *, offset: int = 0, limit: int = 100, folder: str | None = None, sort: str = "path",
               descending: bool = False) -> tuple[int, list[dict]]:
        """``(total matching, one page of photos)``; ``folder`` includes its subfolders."""
        order = SORTS[check_choice("sort", sort, SORTS)]
        where, params = "", []
        if folder:
            where, params = "WHERE folder = ? OR folder LIKE ? ESCAPE '\\'", [folder, _like_prefix(folder)]
        direction = " DESC" if descending else ""
        order_sql = ", ".join(f"{part}{direction}" if "IS NULL" not in part else part for part in order.split(", "))
        db = self._connect()
        total = db.execute(f"SELECT COUNT(*) FROM photos {where}", params).fetchone()[0]
        ties = "" if sort == "path" else ", path"  # "path, path" would keep SQLite off the index
        rows = db.execute(f"SELECT * FROM photos {where} ORDER BY {order_sql}{ties} LIMIT ? OFFSET ?",
                          [*params, int(limit), int(offset)]).fetchall()
        return total, [dict(r) for r in rows]

    def get(self, image_id: int) -> dict | None:
        db = self._connect()
        row = db.execute("SELECT * FROM photos WHERE image_id = ?", (int(image_id),)).fetchone()
        return dict(row) if row else None

    def folders(self) -> list[dict]:
        """Every folder with its number of photos (its own, not its subfolders')."""
        db = self._connect()
        rows = db.execute("SELECT folder, COUNT(*) AS photos FROM photos GROUP BY folder ORDER BY folder")
        return [dict(r) for r in rows]

    def skipped(self) -> list[dict]:
        db = self._connect()
        return [dict(r) for r in db.execute("SELECT * FROM skipped ORDER BY path")]

    def set_clusters(self, clusters, fingerprint: str) -> None:
        """Record each photo's K-Means cluster (``clusters[image_id]``) if the catalog is of that library."""
        with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as db:
            # The check and the write in one transaction, on the file as it is now (it may have been replaced).
            db.execute("BEGIN IMMEDIATE")
            held = db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
            if held and held[0] == fingerprint:
                db.executemany("UPDATE photos SET cluster = ? WHERE image_id = ?",
                               [(int(c), i) for i, c in enumerate(clusters)])
            db.execute("COMMIT")


def _like_prefix(folder: str) -> str:
    escaped = folder.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"{escaped}/%"
