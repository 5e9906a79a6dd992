"""The library's catalog: per-photo facts for browsing, sorting and filtering, read from its database.

The library's database (``<stem>.sqlite``, written by :mod:`.store` in the same transaction as the vectors, so
the two agree by construction) holds one row per usable photo: its **image_id** (stable: never moved or
reused), relative path, folder, SHA-256, bytes, width, height, EXIF date taken and camera where present, status
(``ok`` / ``fixed``), and K-Means cluster once one is fitted; the skipped files in a table of their own.
:class:`Catalog` reads them, one read-only connection per thread, while a writer may be committing (WAL).
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path

from .errors import check_choice
from .store import CATALOG_COLUMNS, FeatureFiles, set_clusters

SORTS = {  # sort key -> SQL order; photos without the fact go last either way
    "path": "path",
    "taken": "taken IS NULL, taken",
    "bytes": "bytes",
    "pixels": "width * height",
    "cluster": "cluster IS NULL, cluster",
}
_COLUMNS = ", ".join(CATALOG_COLUMNS)


class Catalog:
    """Read access to the catalog of a library database (written by :mod:`.store`, in its commits)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)  # the library's database
        self._local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        # One read-only connection per thread (the app answers from several); each statement sees the last commit.
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            db.row_factory = sqlite3.Row
        return db

    @property
    def fingerprint(self) -> str | None:
        db = self._connect()
        row = db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
        return json.loads(row[0]) if row else None

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
        rows = db.execute(f"SELECT {_COLUMNS} FROM photos {where} ORDER BY {order_sql}{ties} LIMIT ? OFFSET ?",
                          [*params, int(limit), int(offset)]).fetchall()
        return total, [dict(r) for r in rows]

    def get(self, image_id: int) -> dict | None:
        db = self._connect()
        row = db.execute(f"SELECT {_COLUMNS} FROM photos WHERE image_id = ?", (int(image_id),)).fetchone()
        return dict(row) if row else None

    def folders(self) -> list[dict]:
        """Every folder with its number of photos (its own, not its subfolders')."""
        db = self._connect()
        rows = db.execute("SELECT folder, COUNT(*) AS photos FROM photos GROUP BY folder ORDER BY folder")
        return [dict(r) for r in rows]

    def skipped(self) -> list[dict]:
        db = self._connect()
        return [dict(r) for r in db.execute("SELECT path, sha256, bytes, reason FROM skipped ORDER BY path")]

    def set_clusters(self, clusters: dict[int, int], fingerprint: str) -> None:
        """Record each photo's K-Means cluster (``{image_id: cluster}``) if the library is still the one fitted."""
        set_clusters(FeatureFiles(self.path.with_suffix(".csv")), clusters, fingerprint)


def _like_prefix(folder: str) -> str:
    escaped = folder.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"{escaped}/%"
