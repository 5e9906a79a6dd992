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

from ._io import atomic_write
from .errors import MissingError, SimilarFinderError, UsageError, check_choice
from .images import IMAGE_EXTENSIONS, ImageError, load_image
from .library import Library
from .recommender import NO_RESULTS

log = logging.getLogger(__name__)

APPROACHES = {
    "cosine": "cosine recommender (thresholded)",
    "kmeans": "K-Means cluster (baseline)",
    "color": "colour histogram",
    "duplicates": "near-duplicates (perceptual hash)",
}
DUPLICATE_BITS = 6  # differing bits of 64 still called a copy, as `similar-finder duplicates`
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
    search running leads: it searches for everything pending, hands each caller
    its rows, and goes on while more arrived meanwhile; the others wait.
    """

    def __init__(self, model):
        self.model = model
        self._lock = threading.Lock()
        self._pending: list[dict] = []
        self._leading = False

    def __call__(self, n: int, *, row: int | None = None, vector: np.ndarray | None = None):
        """``(distances, indices, gates)`` of one query: a library ``row`` or a raw ``vector``."""
        request = {"n": n, "row": row, "vector": vector, "done": threading.Event()}
        with self._lock:
            self._pending.append(request)
            lead, self._leading = not self._leading, True
        if lead:
            self._lead()
        request["done"].wait()
        if "error" in request:
            raise request["error"]
        return request["result"]

    def _lead(self) -> None:
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._leading = False
                    return
            for group in ([r for r in batch if r["row"] is not None], [r for r in batch if r["row"] is None]):
                if group:
                    self._search(group)

    def _search(self, group: list[dict]) -> None:
        n = max(r["n"] for r in group)
        try:
            if group[0]["row"] is not None:
                distances, indices, gates = self.model.search(None, n, rows=[r["row"] for r in group])
            else:
                distances, indices, gates = self.model.search(np.stack([r["vector"] for r in group]), n)
            for i, r in enumerate(group):
                r["result"] = (distances[i:i + 1, :r["n"]], indices[i:i + 1, :r["n"]],
                               None if gates is None else gates[i:i + 1])
        except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch, raised there
            for r in group:
                r["error"] = exc
        for r in group:
            r["done"].set()


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
        self._build = threading.Lock()  # one fit at a time: two first requests never fit twice
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

    def _batcher(self, name: str) -> _Batcher:
        check_choice("approach", name, APPROACHES)
        if name not in self._approaches:
            with self._build:
                if name not in self._approaches:
                    self._approaches[name] = _Batcher(self._fit(name))
        return self._approaches[name]

    def _fit(self, name: str):
        from .clustering import ClusterRecommender
        from .recommender import Recommender, _recommender_for

        library = self.library
        if name == "cosine":
            return _recommender_for(library, "cnn", None, 0)
        if name == "color":
            return _recommender_for(library, "color", None, 0)
        if name == "duplicates":
            return Recommender(kind="phash", threshold=DUPLICATE_BITS + 0.5, gate=np.inf).fit(library)
        kmeans = self.kmeans()
        return ClusterRecommender(kmeans).fit(library)

    def kmeans(self):
        """The K-Means baseline of this library: tuned once, cached by fingerprint, clusters in the catalog."""
        if "kmeans" not in self._derived:
            from .clustering import KMeansBaseline, clip_k_range

            if len(self.library) < 3:
                raise UsageError("K-Means needs at least 3 photos")
            model = self.library.cached("kmeans-app", lambda: KMeansBaseline(
                k_range=clip_k_range(range(2, 11), len(self.library))).fit(self.library))
            self.catalog.set_clusters(model.labels_, self.library.fingerprint)
            self._derived["kmeans"] = model
        return self._derived["kmeans"]

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
        refused = bool(gates is not None and not gates[0] < model.gate_)
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
        """Save an uploaded photo under ``<images>/<folder>/`` and embed it into the library (incrementally)."""
        from .features import extract_features

        self.check_upload(data, filename)
        name = Path(filename).name
        stem, suffix = Path(name).stem or "photo", Path(name).suffix.lower()
        if suffix not in IMAGE_EXTENSIONS or any(c in folder for c in "\\:") or ".." in Path(folder).parts \
                or Path(folder).is_absolute():
            raise UploadError(f"{filename} cannot be added: give a photo file ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                              f" and a plain folder name")
        sha = hashlib.sha256(data).hexdigest()
        target = self.library.root / folder / f"{stem}-{sha[:8]}{suffix}"
        with self._build, self._model:
            if not target.is_file():
                with atomic_write(target, "wb") as handle:
                    handle.write(data)
            cfg = self.library.config or {}
            library = extract_features(self.library.root, self.library.files.csv, None, progress=False,
                                       weights=cfg.get("weights", "imagenet") if cfg.get("weights") != "random" else None,
                                       adapter=(cfg.get("adapter") or {}).get("path"), **self.extract_kwargs)
            self.library, self.catalog = library, library.catalog()
            self._approaches.clear()
            self._derived.clear()
        return self.photo(library.row_of[target.relative_to(library.root).as_posix()])

    # --- map and duplicates -------------------------------------------------------------

    def map(self, method: str = "tsne") -> dict:
        """The library's 2-D map (t-SNE or UMAP) in [0, 1]², of an even sample above :data:`MAP_MAX` photos."""
        check_choice("map method", method, ("tsne", "umap"))
        key = f"map-{method}"
        if key not in self._derived:
            with self._build:
                if key not in self._derived:
                    self._derived[key] = self.library.cached(f"{key}-{MAP_MAX}", lambda: self._compute_map(method))
        rows, points = self._derived[key]
        paths = self.library.paths
        return {"method": {"tsne": "t-SNE", "umap": "UMAP"}[method], "total": len(paths), "shown": len(rows),
                "sampled": len(rows) < len(paths),
                "points": [{"image_id": int(r), "path": paths[r], "x": round(float(x), 5), "y": round(float(y), 5)}
                           for r, (x, y) in zip(rows, points)]}

    def _compute_map(self, method: str):
        from .neighbors import sample_rows
        from .plots import tsne_embedding, umap_embedding

        rows = sample_rows(len(self.library), MAP_MAX, even=True)
        if len(rows) < 5:
            raise UsageError(f"a map needs at least 5 photos, the library has {len(rows)}")
        points = (tsne_embedding if method == "tsne" else umap_embedding)(self.library.matrix[rows])
        low, high = points.min(axis=0), points.max(axis=0)
        return rows, (points - low) / np.maximum(high - low, 1e-12)

    def duplicates(self, max_distance: int = DUPLICATE_BITS) -> list[list[dict]]:
        """Groups of near-identical photos (perceptual hash), largest first."""
        from .descriptors import duplicate_groups

        key = f"duplicates-{max_distance}"
        if key not in self._derived:
            with self._build:
                bits = self.library.vectors("phash")
                self._derived[key] = duplicate_groups(bits, max_distance, self.library.paths)
        paths = self.library.paths
        return [[{"image_id": int(r), "path": paths[r]} for r in group] for group in self._derived[key]]

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
