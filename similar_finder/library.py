"""The library object: one feature store, opened once and passed along.

``Library(csv)`` reads a feature store (see :mod:`.store`) and is then what every
later step takes: the recommender, the K-Means baseline, the evaluation,
``run_all`` and the app. It holds ``paths``, ``matrix`` (CNN features), ``meta``,
``root`` (the images folder), ``ids`` (each photo's image_id) and ``fingerprint``, and it is the only code that
reads and writes what is derived from the features:

* ``vectors(kind)`` – any registered feature kind (:mod:`.kinds`), computed once
  and cached under ``<stem>.cache/``: whole-library values (PCA) keyed by the
  fingerprint, per-photo descriptors by each photo's SHA-256;
* ``query(file, kind)`` – a query's vector, looked up if it is a library photo;
* ``threshold_for`` / ``save_threshold`` – calibrations (:class:`~.thresholds.Calibration`),
  kept in the library's database (``thresholds``: the records as stored);
* ``labels()`` – classes from the first folder of each path, when there are any.
"""
from __future__ import annotations

import functools
import logging
import os
import sqlite3
from pathlib import Path

import joblib
import numpy as np
import pandas as pd

from ._io import DEFAULT_FEATURES, atomic_write, file_sha256
from .catalog import Catalog
from .embedding import embed_file
from .errors import UsageError
from .images import ImageError, labels_from_paths
from .kinds import describe, describe_many, get_kind
from .reduce import DEFAULT_COMPONENTS, fit_pca
from .store import (FeatureFiles, FeaturesError, StoredFeatures, find_in_library, read_store, require_file,
                    save_thresholds, thresholds_of)
from .thresholds import Calibration

log = logging.getLogger(__name__)


def pca_project(pca, vectors: np.ndarray) -> np.ndarray:
    """Vectors projected on the PCA's components *without* subtracting its mean.

    Distances after centring are the same as with ``pca.transform``; keeping the
    mean lets the uncentred distance still tell photos of another domain apart.
    """
    return (np.asarray(vectors, np.float32) @ pca.components_.T).astype(np.float32)


class Library:
    """A feature library: the store's contents plus everything derived from them."""

    def __init__(self, csv: str | os.PathLike = DEFAULT_FEATURES, *, stored: StoredFeatures | None = None):
        self.files = FeatureFiles(Path(csv).expanduser().resolve())
        stored = stored or read_store(self.files.csv)  # ``stored``: what the caller has just read from it
        self.paths: list[str] = stored.paths
        self.matrix: np.ndarray = stored.matrix
        self.meta: dict = stored.meta
        self.audit: pd.DataFrame | None = stored.audit
        self.root = Path(self.meta["images_root"])
        self.fingerprint: str = self.meta["fingerprint"]
        self.ids: np.ndarray = stored.ids  # each photo's image_id: given once, never moved or reused
        self.row_of = dict(zip(self.paths, range(len(self.paths))))  # (zip: a third of a comprehension's time)
        self.row_of_id = dict(zip(self.ids.tolist(), range(len(self.ids))))
        self.stats = None  # set by extract_features: what the run that produced this library did
        self._vectors: dict[str, np.ndarray] = {"cnn": self.matrix}
        self.models: dict = {}  # models fitted on this library, reused by recommend() and the app

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (f"Library({str(self.files.csv)!r}: {len(self)} images, "
                f"{self.meta.get('backbone', 'unknown backbone')}, {self.matrix.shape[1]}-d)")

    @property
    def config(self) -> dict | None:
        """Backbone settings (None for a bare CSV shared without its sidecar)."""
        return self.meta.get("config")

    def labels(self, *, required: bool = False) -> np.ndarray | None:
        return labels_from_paths(self.paths, required=required)

    def frame(self) -> pd.DataFrame:
        """The features as a DataFrame: ``path, f0, ..., f{D-1}``, as in the CSV."""
        frame = pd.DataFrame(self.matrix, columns=[f"f{i}" for i in range(self.matrix.shape[1])])
        frame.insert(0, "path", self.paths)
        return frame

    # --- derived values -----------------------------------------------------------------

    def cached(self, name: str, compute):
        """``compute()``, saved under ``<stem>.cache/name`` and reused while the fingerprint is unchanged."""
        path = self.files.cache(name)
        if path.is_file():
            held = joblib.load(path)
            if held.get("fingerprint") == self.fingerprint:
                return held["value"]
        value = compute()
        with atomic_write(path, "wb") as handle:
            joblib.dump({"fingerprint": self.fingerprint, "value": value}, handle)
        return value

    def pca(self, n_components: int = DEFAULT_COMPONENTS):
        """The PCA fitted on this library's CNN features (``variance_kept_`` says how much is kept)."""
        key = f"pca{n_components}"
        if key not in self.models:
            self.models[key] = self.cached(key, lambda: fit_pca(self.matrix, n_components))
        return self.models[key]

    def vectors(self, kind: str = "cnn") -> np.ndarray:
        """The library's matrix for a feature kind, rows in the order of ``paths``."""
        get_kind(kind)
        if kind not in self._vectors:
            if kind == "pca":
                self._vectors[kind] = pca_project(self.pca(), self.matrix)
            else:
                self._vectors.update(self._per_photo([kind]))
        return self._vectors[kind]

    def vectors_of(self, other: "Library", kind: str = "cnn") -> np.ndarray:
        """Another library's photos as this library's ``kind`` vectors (PCA: this library's projection).

        ``other`` must be embedded with the same backbone and settings.
        """
        if other.config and self.config and other.config != self.config:
            raise FeaturesError(f"{other.files.csv} was embedded with {other.config}, this library with "
                                f"{self.config}; embed both the same way to compare them")
        if kind == "pca":
            return pca_project(self.pca(), other.matrix)
        return other.vectors(kind)

    def prepare(self, kinds) -> None:
        """Compute several per-photo kinds at once, decoding each photo once."""
        missing = [k for k in kinds if k not in self._vectors and get_kind(k).from_pixels is not None]
        if missing:
            self._vectors.update(self._per_photo(missing))

    def catalog(self):
        """The photos' facts for browsing (:class:`~similar_finder.catalog.Catalog`), read from the library's
        database; a database gone or damaged since this library was read is rebuilt first."""
        catalog = Catalog(self.files.database)
        try:
            catalog.fingerprint
        except sqlite3.DatabaseError:
            read_store(self.files.csv)  # rebuilds it from the exports, saying so
            catalog = Catalog(self.files.database)
        return catalog

    def image_id(self, path: str) -> int:
        """The image_id of a library photo (a path relative to ``root``)."""
        return int(self.ids[self.row_of[path]])

    def shas(self) -> list[str]:
        """Each photo's SHA-256 (hashed now for a bare CSV, which has no audit)."""
        if self.audit is not None:
            known = dict(zip(self.audit["path"], self.audit["sha256"]))
            if all(known.get(p) for p in self.paths):
                return [known[p] for p in self.paths]
        return [file_sha256(self.root / p) for p in self.paths]

    def _per_photo(self, kinds) -> dict[str, np.ndarray]:
        shas = self.shas()
        caches = {}
        for kind in kinds:
            path = self.files.cache(f"photos-{kind}")
            caches[kind] = joblib.load(path) if path.is_file() else {}
        todo = [i for i, sha in enumerate(shas) if any(sha not in caches[k] for k in kinds)]
        if todo:
            described = describe_many(self.root, [self.paths[i] for i in todo], kinds)
            for i, vectors in zip(todo, described):
                if vectors is None:
                    raise ImageError(f"{self.paths[i]} can no longer be decoded; "
                                     f"run the extraction again to refresh the library")
                for kind, vector in zip(kinds, vectors):
                    caches[kind][shas[i]] = vector
        result = {}
        for kind in kinds:
            result[kind] = np.stack([caches[kind][sha] for sha in shas]).astype(np.float32)
            if todo or len(caches[kind]) != len(set(shas)):
                kept = {sha: caches[kind][sha] for sha in shas}  # photos gone from the library drop out
                with atomic_write(self.files.cache(f"photos-{kind}"), "wb") as handle:
                    joblib.dump(kept, handle)
        return result

    # --- queries ------------------------------------------------------------------------

    def describer(self, kind: str = "cnn"):
        """``describe(file) -> vector``: a new photo described as the library's ``kind`` vectors are."""
        if get_kind(kind).from_pixels is not None:
            return lambda file: describe(require_file(file), kind)
        if kind == "pca":
            pca = self.pca()
            return lambda file: pca_project(pca, embed_file(file, self.meta)[None])[0]
        return lambda file: embed_file(file, self.meta)

    def find(self, file: str | os.PathLike) -> int | None:
        """Row of ``file`` if it is one of the library's photos (absolute or relative to ``root``)."""
        return find_in_library(file, self.row_of, self.root)

    def query(self, file: str | os.PathLike, kind: str = "cnn", describe=None) -> tuple[np.ndarray, int | None]:
        """The query's ``kind`` vector and, if it is a library photo, its row (to leave out of its results)."""
        row = self.find(file)
        if row is not None:
            return self.vectors(kind)[row], row
        require_file(file)
        try:
            return np.asarray((describe or self.describer(kind))(Path(file).expanduser()), np.float32), None
        except ImageError as exc:
            raise ImageError(f"query {file} cannot be used: {exc}") from None

    # --- thresholds ---------------------------------------------------------------------

    @property
    def thresholds(self) -> dict:
        """Calibrated thresholds by ``"<kind>/<metric>"``."""
        try:
            return thresholds_of(self.files)
        except sqlite3.DatabaseError as exc:
            raise FeaturesError(f"cannot read the thresholds in {self.files.database}: {exc}; run the extraction "
                                f"again") from None

    def threshold_for(self, kind: str, metric: str, center: bool) -> Calibration | None:
        """The :class:`Calibration` stored for this kind, metric and centring, if made on this very library."""
        stored = self.thresholds.get(f"{kind}/{metric}")
        if stored is None or stored.get("center", True) != center:
            return None
        if stored.get("fingerprint", self.fingerprint) != self.fingerprint:
            log.info("the %s threshold was calibrated on an earlier version of %s; using the unlabelled rule "
                     "until it is calibrated again", kind, self.files.csv.name)
            return None
        return Calibration.from_dict(stored)

    def save_threshold(self, calibration: Calibration | dict, kind: str = "cnn") -> None:
        """Store a calibration (or its record); recommenders over this library then use it by default."""
        if not isinstance(calibration, Calibration):
            calibration = Calibration.from_dict(calibration)
        if calibration.metric is None:
            raise UsageError("a calibration to store must say its metric (it is stored by kind and metric)")
        save_thresholds(self.files, {f"{kind}/{calibration.metric}": {
            **calibration.to_dict(), "features": kind, "fingerprint": self.fingerprint}})


def as_library(library) -> Library:
    """A :class:`Library` from a Library or a features CSV path (opened once per process and version)."""
    if isinstance(library, Library):
        return library
    return open_library(library)


def open_library(csv: str | os.PathLike = DEFAULT_FEATURES) -> Library:
    """The library at ``csv``, opened once per process while its files are unchanged."""
    files = FeatureFiles(Path(csv).expanduser().resolve())
    if not files.exists():
        return Library(files.csv)  # says what is missing and how to make it
    # A cheap test for "same files as last time": the store is re-read when any of them changes.
    stamps = tuple((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
                   for p in (files.csv, files.database, Path(f"{files.database}-wal")))
    return _open_cached(str(files.csv), stamps)


@functools.lru_cache(maxsize=4)
def _open_cached(csv: str, stamps: tuple) -> Library:
    return Library(csv)
