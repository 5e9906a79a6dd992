"""The library as the app serves it: one object that answers every question the page asks.

``LibraryService(library)`` holds a :class:`~similar_finder.library.Library`
and builds, once and only when first asked, what each view needs: the
approaches (cosine recommender, K-Means baseline, colour histogram,
near-duplicates), the 2-D map, the duplicate groups and the thumbnails.
Everything derived is cached beside the store by content hash (thumbnails by
SHA-256 in ``<stem>.thumbs/``, the map and the K-Means model by fingerprint),
so a restarted server recomputes nothing.

Files are found only through the library's own index: an ``image_id`` is a row
of the library, and a file is served only if it resolves inside the images
folder (or ``originals``). Queries never change the library; a photo is added
only by :meth:`add_photo`, on request.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ._io import DEFAULT_K_RANGE, atomic_write
from .errors import MissingError, SimilarFinderError, UsageError, check_choice
from .images import IMAGE_EXTENSIONS, ImageError, load_image
from .clustering import ClusterRecommender, KMeansBaseline, clip_k_range
from .descriptors import DUPLICATE_BITS, duplicate_groups
from .features import extract_features
from .library import Library
from .neighbors import sample_rows
from .recommender import Recommender, _recommender_for
from .reduce import tsne_embedding, umap_embedding
from .recommender import NO_RESULTS

log = logging.getLogger(__name__)

APPROACHES = {
    "cosine": "cosine recommender (thresholded)",
    "kmeans": "K-Means cluster (baseline)",
    "color": "colour histogram",
    "duplicates": "near-duplicates (perceptual hash)",
}
APP_IVF_ABOVE = 50_000  # the app's cosine search uses an IVF index from this many photos
THUMB_SIZE = 256
DISPLAY_SIZE = 1600  # large view of formats a browser cannot show (TIFF)
MAP_MAX = 3_000  # t-SNE of more photos takes over a minute on two cores: an even sample then
BROWSER_FORMATS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"}
DEFAULT_MAX_UPLOAD = 25 * 1024 * 1024


class NotFound(SimilarFinderError, LookupError):
    """No such photo in the library (or its file is gone or lies outside it)."""


class UploadError(SimilarFinderError, ValueError):
    """An uploaded file that cannot be used as a query."""


class UploadTooLarge(UploadError):
    """An upload over the size cap."""


@dataclass
class Answer:
    """One query's results, in the shape the API returns."""

    approach: str
    results: list[dict]
    refused: bool = False  # the gate said the query is unlike the whole library
    query: dict | None = None  # the library photo asked about

    @property
    def message(self) -> str | None:
        return NO_RESULTS if not self.results else None

    @property
    def reason(self) -> str | None:
        if self.results:
            return None
        if self.refused:
            return "the photo is farther from every library photo than the library's photos are from each other"
        return "no library photo is within the distance threshold"


class _Batcher:
    """Concurrent queries to one approach, answered by one search: the library is read once for all of them.

    Brute-force search is bound by reading the library's matrix, so eight queries
    in one matrix product cost about what one does. The first caller to find no
    search running leads: it searches once for everything pending, hands each
    caller its rows, and passes the lead to a caller that arrived meanwhile, so
    no caller waits for more than the search in progress and its own.
    Queries are batched only with queries of the same kind (library rows or new
    vectors) and the same ``n``: the gate looks at a query's own candidates, so
    an answer never depends on what others asked at the same time.
    """

    def __init__(self, model):
        self.model = model
        self._lock = threading.Lock()
        self._pending: list[dict] = []
        self._leading = False

    def __call__(self, n: int, *, row: int | None = None, vector: np.ndarray | None = None):
        """``(distances, indices, gates)`` of one query: a library ``row`` or a raw ``vector``."""
        request = {"n": n, "row": row, "vector": vector, "wake": threading.Event(), "lead": False}
        with self._lock:
            self._pending.append(request)
            if not self._leading:
                self._leading = request["lead"] = True
        while True:
            if request["lead"]:
                request["lead"] = False
                self._serve()
            request["wake"].wait()
            if "result" in request or "error" in request:
                break
            request["wake"].clear()  # woken to lead the next batch
        if "error" in request:
            raise request["error"]
        return request["result"]

    def _serve(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        try:
            groups: dict[tuple, list[dict]] = {}
            for r in batch:
                groups.setdefault((r["row"] is None, r["n"]), []).append(r)
            for group in groups.values():
                self._search(group)
        finally:  # whatever happened, every caller of this batch is answered and the lead moves on
            for r in batch:
                if "result" not in r and "error" not in r:
                    r["error"] = RuntimeError("the search was interrupted")
                r["wake"].set()
            with self._lock:
                if self._pending:
                    self._pending[0]["lead"] = True
                    self._pending[0]["wake"].set()
                else:
                    self._leading = False

    def _search(self, group: list[dict]) -> None:
        n = group[0]["n"]
        try:
            if group[0]["row"] is not None:
                distances, indices, gates = self.model.search(None, n, rows=[r["row"] for r in group])
            else:
                distances, indices, gates = self.model.search(np.stack([r["vector"] for r in group]), n)
            for i, r in enumerate(group):
                r["result"] = (distances[i:i + 1], indices[i:i + 1], None if gates is None else gates[i:i + 1])
        except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch, raised there
            for r in group:
                r["error"] = exc


class LibraryService:
    """Answers for the app: browsing, similar photos, search by upload, map, duplicates, files."""

    def __init__(self, library: Library, *, originals: str | os.PathLike | None = None,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD, extract_kwargs: dict | None = None):
        self.library = library
        self.originals = Path(originals).expanduser().resolve() if originals else None
        if self.originals is not None and not self.originals.is_dir():
            raise MissingError(f"originals folder {originals} does not exist or is not a folder")
        self.max_upload_bytes = int(max_upload_bytes)
        self.extract_kwargs = extract_kwargs or {}
        self.catalog = library.catalog()
        self._approaches: dict[str, _Batcher] = {}
        self._derived: dict[str, object] = {}
        self._build = threading.RLock()  # one fit at a time (K-Means is fitted inside the fit of its approach)
        self._model = threading.Lock()  # the backbone embeds one batch at a time

    # --- browsing ---------------------------------------------------------------------

    def info(self) -> dict:
        meta = self.library.meta
        return {
            "images": len(self.library), "skipped": len(self.catalog.skipped()),
            "backbone": meta.get("backbone"), "dim": int(self.library.matrix.shape[1]),
            "features_file": str(self.library.files.csv), "images_root": str(self.library.root),
            "folders": self.catalog.folders(), "approaches": APPROACHES,
            "originals": self.originals is not None, "max_upload_mb": self.max_upload_bytes / 2**20,
        }

    def images(self, **query) -> dict:
        total, rows = self.catalog.images(**query)
        return {"total": total, "offset": query.get("offset", 0), "images": rows}

    def photo(self, image_id) -> dict:
        """The catalog row of ``image_id``; :class:`NotFound` for anything that is not a library row."""
        try:
            row = int(str(image_id))
        except ValueError:
            raise NotFound(f"no photo {image_id!r} in this library") from None
        if not 0 <= row < len(self.library):
            raise NotFound(f"no photo {image_id!r} in this library")
        photo = self.catalog.get(row)
        if photo is None or photo["path"] != self.library.paths[row]:
            raise NotFound(f"no photo {image_id!r} in this library (the catalog is out of date)")
        return {**photo, "original": self._original(photo["path"]) is not None}

    # --- similar photos -----------------------------------------------------------------

    def approach(self, name: str):
        """The fitted approach ``name`` (see :data:`APPROACHES`), built on first use."""
        return self._batcher(name).model

    def _once(self, held: dict, key: str, compute):
        """``held[key]``, computed by the first caller only: a second first request waits for it, never refits."""
        value = held.get(key)
        if value is None:
            with self._build:
                value = held.get(key)
                if value is None:
                    value = held[key] = compute()
        return value

    def _batcher(self, name: str) -> _Batcher:
        check_choice("approach", name, APPROACHES)
        return self._once(self._approaches, name, lambda: _Batcher(self._fit(name)))

    def _fit(self, name: str):
        library = self.library
        if name == "cosine":
            # An app answers several people at once: from APP_IVF_ABOVE photos an IVF index answers in a few
            # milliseconds what brute force takes tens for (measured at 100k: 2.8 against 17 ms, recall@5 1.0).
            return Recommender(kind="cnn", ivf_above=APP_IVF_ABOVE).fit(library)
        if name == "color":
            return _recommender_for(library, "color", None, 0)
        if name == "duplicates":
            return Recommender(kind="phash", threshold=DUPLICATE_BITS + 0.5, gate=np.inf).fit(library)
        kmeans = self.kmeans()
        return ClusterRecommender(kmeans).fit(library)

    def kmeans(self):
        """The K-Means baseline of this library: tuned once, cached by fingerprint, clusters in the catalog."""
        def fit():
            library, catalog = self.library, self.catalog
            if len(library) < 3:
                raise UsageError("K-Means needs at least 3 photos")
            model = library.cached("kmeans-app", lambda: KMeansBaseline(
                k_range=clip_k_range(DEFAULT_K_RANGE, len(library))).fit(library))
            catalog.set_clusters(model.labels_, library.fingerprint)
            return model

        # A sort by cluster and the K-Means approach, asked at once, tune it once.
        return self._once(self._derived, "kmeans", fit)

    def similar(self, image_id, n: int = 5, approach: str = "cosine") -> Answer:
        """The photos most similar to a library photo (never itself)."""
        photo = self.photo(image_id)
        batcher = self._batcher(approach)
        answer = self._answer(approach, batcher.model, *batcher(n, row=photo["image_id"]))
        answer.query = {k: photo[k] for k in ("image_id", "path", "folder", "width", "height")}
        return answer

    def search(self, data: bytes, n: int = 5, approach: str = "cosine", *, filename: str = "upload") -> Answer:
        """The library photos most similar to an uploaded photo, which is not kept."""
        self.check_upload(data, filename)
        batcher = self._batcher(approach)
        vector = self._describe(data, batcher.model.kind, filename)
        return self._answer(approach, batcher.model, *batcher(n, vector=vector))

    def _answer(self, name, model, distances, indices, gates) -> Answer:
        frame = model.answer(distances[0], indices[0], None if gates is None else gates[0])
        row_of = self.library.row_of
        results = [{"image_id": row_of[rec["path"]], "path": rec["path"], "distance": round(float(rec["distance"]), 6),
                    **({"cluster": int(rec["cluster"])} if "cluster" in rec else {})}
                   for rec in frame.to_dict("records")]
        refused = bool(gates is not None and not model.calibration_.admits(gates[0]))  # why it is empty
        return Answer(name, results, refused)

    def check_upload(self, data: bytes, filename: str = "upload") -> None:
        """An :class:`UploadError` saying why ``data`` cannot be a query (too large, empty, not an image)."""
        if len(data) > self.max_upload_bytes:
            raise UploadTooLarge(f"{filename} is {len(data) / 2**20:.1f} MB, over the limit of "
                                 f"{self.max_upload_bytes / 2**20:.0f} MB")
        try:
            load_image(data, 32)  # cheap: JPEGs decode in draft mode; bombs and bad files say why
        except ImageError as exc:
            raise UploadError(f"{filename} cannot be used: {exc}") from None

    def _describe(self, data: bytes, kind: str, filename: str) -> np.ndarray:
        # The query goes through the library's own code path for new photos, from a private temp file.
        suffix = Path(filename).suffix.lower() if Path(filename).suffix.lower() in IMAGE_EXTENSIONS else ".img"
        with tempfile.TemporaryDirectory(prefix="similar-finder-query-") as folder:
            path = Path(folder) / f"query{suffix}"
            path.write_bytes(data)
            with self._model:
                vector, _ = self.library.query(path, kind)
        return vector

    # --- adding a photo, on request -------------------------------------------------------

    def add_photo(self, data: bytes, filename: str, folder: str = "uploads") -> dict:
        """Save an uploaded photo under ``<images>/<folder>/`` and embed it into the library (incrementally).

        On any failure the file this call wrote is removed again: a photo is added whole or not at all.
        """
        self.check_upload(data, filename)
        name = Path(filename).name
        stem, suffix = Path(name).stem, Path(name).suffix.lower()
        parts = Path(folder).parts
        hidden = any(p.startswith(".") for p in parts) or stem.startswith(".")  # extraction skips dot-names
        if suffix not in IMAGE_EXTENSIONS or not stem or hidden or "\0" in folder + filename or \
                any(c in folder for c in "\\:") or ".." in parts or Path(folder).is_absolute() or not parts:
            raise UploadError(f"{filename} cannot be added: give a photo file ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                              f" and a plain folder name inside the library")
        sha = hashlib.sha256(data).hexdigest()
        root = self.library.root.resolve()
        target = root / folder / f"{stem}-{sha[:8]}{suffix}"
        # resolve() follows every link in the part of the folder that exists: a link leading out is seen here.
        if not target.parent.resolve().is_relative_to(root):
            raise UploadError(f"{folder} leads outside the library; choose a plain folder name")
        with self._build, self._model:
            created = not target.is_file()
            try:
                if created:
                    with atomic_write(target, "wb") as handle:
                        handle.write(data)
                cfg = self.library.config or {}
                library = extract_features(self.library.root, self.library.files.csv, None, progress=False,
                                           adapter=(cfg.get("adapter") or {}).get("path"), **self.extract_kwargs)
                relative = target.relative_to(root).as_posix()
                if relative not in library.row_of:
                    raise UploadError(f"{filename} was not taken into the library: see {library.files.skipped}")
            except BaseException:
                if created:
                    target.unlink(missing_ok=True)
                raise
            # New answers for the new library; requests already running finish with the old ones.
            self._approaches, self._derived = {}, {}
            self.library, self.catalog = library, library.catalog()
        return self.photo(library.row_of[relative])

    # --- map and duplicates -------------------------------------------------------------

    def map(self, method: str = "tsne") -> dict:
        """The library's 2-D map (t-SNE or UMAP) in [0, 1]², of an even sample above :data:`MAP_MAX` photos."""
        check_choice("map method", method, ("tsne", "umap"))
        key = f"map-{method}"
        rows, points = self._once(self._derived, key,
                                  lambda: self.library.cached(f"{key}-{MAP_MAX}", lambda: self._compute_map(method)))
        paths = self.library.paths
        return {"method": {"tsne": "t-SNE", "umap": "UMAP"}[method], "total": len(paths), "shown": len(rows),
                "sampled": len(rows) < len(paths),
                "points": [{"image_id": int(r), "path": paths[r], "x": round(float(x), 5), "y": round(float(y), 5)}
                           for r, (x, y) in zip(rows, points)]}

    def _compute_map(self, method: str):
        rows = sample_rows(len(self.library), MAP_MAX, even=True)
        if len(rows) < 5:
            raise UsageError(f"a map needs at least 5 photos, the library has {len(rows)}")
        points = (tsne_embedding if method == "tsne" else umap_embedding)(self.library.matrix[rows])
        low, high = points.min(axis=0), points.max(axis=0)
        return rows, (points - low) / np.maximum(high - low, 1e-12)

    def duplicates(self, max_distance: int = DUPLICATE_BITS) -> list[list[dict]]:
        """Groups of near-identical photos (perceptual hash), largest first."""
        groups = self._once(self._derived, f"duplicates-{max_distance}", lambda: duplicate_groups(
            self.library.vectors("phash"), max_distance, self.library.paths))
        paths = self.library.paths
        return [[{"image_id": int(r), "path": paths[r]} for r in group] for group in groups]

    # --- files ----------------------------------------------------------------------------

    def _inside(self, base: Path, relative: str) -> Path | None:
        """``base / relative`` if it is a file that really lies inside ``base`` (no link leads out)."""
        candidate = (base / relative).resolve()
        if candidate.is_file() and candidate.is_relative_to(base.resolve()):
            return candidate
        return None

    def _original(self, relative: str) -> Path | None:
        return self._inside(self.originals, relative) if self.originals is not None else None

    def image_file(self, image_id, *, original: bool = True) -> Path:
        """The file to show large: the original when there is one, else the library's photo, else a display copy."""
        photo = self.photo(image_id)
        path = (self._original(photo["path"]) if original else None) or self._inside(self.library.root, photo["path"])
        if path is None:
            raise NotFound(f"the file of photo {image_id} ({photo['path']}) is gone or lies outside the library")
        if path.suffix.lower() in BROWSER_FORMATS:
            return path
        return self._derivative(path, photo["sha256"], DISPLAY_SIZE, "display")

    def thumbnail(self, image_id) -> Path:
        """A JPEG of at most :data:`THUMB_SIZE` pixels a side, made once per photo content."""
        photo = self.photo(image_id)
        source = self._inside(self.library.root, photo["path"])
        if source is None:
            raise NotFound(f"the file of photo {image_id} ({photo['path']}) is gone or lies outside the library")
        return self._derivative(source, photo["sha256"], THUMB_SIZE, "thumb")

    def _derivative(self, source: Path, sha: str, size: int, kind: str) -> Path:
        key = sha or hashlib.sha256(str(source).encode()).hexdigest()
        target = self.library.files.thumbnails / f"{kind}{size}" / key[:2] / f"{key}.jpg"
        if not target.is_file():
            try:
                with Image.open(source) as img:
                    img.draft("RGB", (size, size))
                    img = ImageOps.exif_transpose(img).convert("RGB")
                    img.thumbnail((size, size), Image.Resampling.LANCZOS)
                    with atomic_write(target, "wb") as handle:
                        img.save(handle, "JPEG", quality=85)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise NotFound(f"photo {source.name} can no longer be decoded: {exc}") from None
        return target
