"""The library as the app serves it: one object that answers every question the page asks.

``LibraryService(library)`` holds a :class:`~similar_finder.library.Library`
and builds, once and only when first asked, what each view needs: the
approaches (cosine recommender, K-Means baseline, colour histogram,
near-duplicates), the 2-D map, the duplicate groups and the thumbnails.
Everything derived is cached beside the store by content hash (thumbnails by
SHA-256 in ``<stem>.thumbs/``, the map and the K-Means model by fingerprint),
so a restarted server recomputes nothing.

Files are found only through the library's own index: an ``image_id`` is the
photo's stable id in the library's database, and a file is served only if it
resolves inside the images folder (or ``originals``). Queries never change the library; a photo is added
only by :meth:`add_photo`, on request.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
from PIL import Image, ImageOps

from ._io import DEFAULT_K_RANGE, atomic_write
from .errors import MissingError, SimilarFinderError, UsageError, check_choice
from .images import IMAGE_EXTENSIONS, MAX_PIXELS, ImageError, load_image, scan_images
from .kinds import describe_many
from .clustering import ClusterRecommender, KMeansBaseline, clip_k_range
from .descriptors import duplicate_groups
from .features import add_photos, update_photos
from .library import Library
from .near_duplicates import NO_DUPLICATES, NearDuplicateSearch, near_duplicates
from .neighbors import sample_rows
from .recommender import Recommender, _recommender_for
from .store import joining
from .reduce import tsne_embedding, umap_embedding
from .recommender import NO_RESULTS

log = logging.getLogger(__name__)

APPROACHES = {
    "cosine": "cosine recommender (thresholded)",
    "kmeans": "K-Means cluster (baseline)",
    "color": "colour histogram",
    "duplicates": "near-duplicates (verified by local features)",
}
# Approaches updated with each change to the library (their index takes the photos added and drops the ones
# removed: the change's cost) until the changes since their fit reach refit_after(photos); then, and for the
# others after every change, they are refitted in the background, answering meanwhile.
FOLLOW_CHANGES = ("cosine",)


def _behind(held: Library, current: Library) -> bool:
    """Whether ``held`` is an earlier committed state than ``current`` (a swap installs an approach updated to
    the new state a moment before the new state itself: that one is not behind)."""
    return held is not current and held.meta.get("generation", 0) < current.meta.get("generation", 0)


def refit_after(photos: int) -> int:
    """Changes an updated approach takes before it is refitted (its calibration and centring renewed)."""
    return max(1, photos // 20)  # a small library is refitted in a moment, and its calibration moves most


PER_PHOTO = {"color": "color", "duplicates": "phash"}  # approaches described from each photo's pixels, by kind
APP_IVF_ABOVE = 50_000  # the app's cosine search uses an IVF index from this many photos
THUMB_SIZE = 256
DISPLAY_SIZE = 1600  # large view of formats a browser cannot show (TIFF)
MAP_MAX = 3_000  # t-SNE of more photos takes over a minute on two cores: an even sample then
BROWSER_FORMATS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"}
BROWSER_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp", "image/bmp"}  # served as they are
DEFAULT_MAX_UPLOAD = 25 * 1024 * 1024
# An upload's pixels, well below PIL's bomb cap (MAX_PIXELS, ~89 MP): a 50 MP photo decodes in about a second and
# 150 MB; the bytes cap alone lets a 280 kB PNG of 88 MP through (3 s, 300 MB).
DEFAULT_MAX_UPLOAD_MP = 50.0
# Uploads decoded at once: one per core (decoding is CPU-bound), at most 4 (each may hold ~300 MB at the budget).
DECODE_SLOTS = max(1, min(os.cpu_count() or 1, 4))
DECODE_WAIT_S = 15.0  # how long an upload waits for a slot before it is told to come back (503)
MAX_NAME = 200  # characters of an uploaded file's name: the stored name adds 9, and a file system allows 255 bytes
MAX_FOLDER = 240  # characters of the folder an upload is added to (each part at most MAX_NAME)
MAX_ID_DIGITS = 12  # an image_id longer than this names no photo (and is never turned into a huge int)


class NotFound(SimilarFinderError, LookupError):
    """No such photo in the library (or its file is gone or lies outside it)."""


class UploadError(SimilarFinderError, ValueError):
    """An uploaded file that cannot be used as a query."""


class UploadTooLarge(UploadError):
    """An upload over the size cap or the pixel budget."""


class Busy(SimilarFinderError):
    """Every decoding slot is taken: the request should come back in ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Computing(SimilarFinderError):
    """A value being computed in the background; ask again in ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 2):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Answer:
    """One query's results, in the shape the API returns."""

    approach: str
    results: list[dict]
    refused: bool = False  # the gate said the query is unlike the whole library
    query: dict | None = None  # the library photo asked about
    note: str | None = None  # photos left out of this answer (files gone or damaged since the extraction)
    empty: tuple[str, str] | None = None  # (message, reason) of an approach that says "none" its own way

    @property
    def message(self) -> str | None:
        return None if self.results else self.empty[0] if self.empty else NO_RESULTS

    @property
    def reason(self) -> str | None:
        if self.results:
            return None
        if self.empty:
            return self.empty[1]
        if self.refused:
            return ("the photo is farther from every library photo than the library's photos are from each other, "
                    "even allowing for another camera")
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

    def __init__(self, model, library, *, left_out: dict[str, str] | None = None,
                 model_row: dict[int, int] | None = None):
        self.model = model
        self.library = library  # the snapshot the model was fitted on: its rows are the model's
        # Photos (path: why) the model was fitted without, their files gone or damaged; the model then numbers
        # the other photos in their own order: model_row maps a library row to its row in the model.
        self.left_out = left_out or {}
        self.model_row = model_row
        self._lock = threading.Lock()
        self._pending: list[dict] = []
        self._leading = False

    def model_changes(self) -> int:
        """Photos added or removed since the model was fitted (it was updated since: see FOLLOW_CHANGES)."""
        neighbors = getattr(self.model, "neighbors_", None)
        return 0 if neighbors is None else neighbors.changes

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
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD, max_upload_mp: float = DEFAULT_MAX_UPLOAD_MP,
                 decode_slots: int = DECODE_SLOTS, decode_wait_s: float = DECODE_WAIT_S):
        self.library = library
        self.originals = Path(originals).expanduser().resolve() if originals else None
        if self.originals is not None and not self.originals.is_dir():
            raise MissingError(f"originals folder {originals} does not exist or is not a folder")
        self.max_upload_bytes = int(max_upload_bytes)
        if not 0 < max_upload_mp <= MAX_PIXELS / 1e6:
            raise UsageError(f"the upload pixel budget must be above 0 and at most PIL's cap of "
                             f"{MAX_PIXELS / 1e6:.0f} MP, not {max_upload_mp}")
        self.max_upload_pixels = int(max_upload_mp * 1e6)
        # Decoding holds about 4 bytes a pixel (the RGB image and its reductions: 190 MB at 50 MP), so it is
        # admitted by slots and by pixels: the photos decoding at once add up to at most one at the budget.
        self._decoding = _Admission(max(1, int(decode_slots)), self.max_upload_pixels)
        self.decode_wait_s = float(decode_wait_s)
        self.catalog = library.catalog()
        self._approaches: dict[str, _Batcher] = {}
        self._refitting: set[str] = set()
        self._refit_lock = threading.Lock()
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
            "max_upload_mp": self.max_upload_pixels / 1e6,
        }

    def images(self, **query) -> dict:
        total, rows = self.catalog.images(**query)
        return {"total": total, "offset": query.get("offset", 0), "images": rows}

    def photo(self, image_id, library: Library | None = None) -> dict:
        """The catalog row of ``image_id``; :class:`NotFound` for anything that is not a library photo's id."""
        text = str(image_id)
        # Only the plain spelling names a photo: int() would also take "+1", " 1", "1_0", "٣" (aliases of others).
        canonical = text.isascii() and text.isdigit() and len(text) <= MAX_ID_DIGITS and (text == "0" or text[0] != "0")
        if isinstance(image_id, bool) or not canonical:
            raise NotFound(f"no photo {image_id!r} in this library (an image_id is a whole number: 0, 1, 2, ...)")
        library = library or self.library  # one snapshot for the whole answer, whatever an add swaps in meanwhile
        row = library.row_of_id.get(int(text))
        if row is None:
            raise NotFound(f"no photo {image_id!r} in this library")
        photo = self.catalog.get(int(text))
        if photo is None or photo["path"] != library.paths[row]:  # removed or moved by a commit after this snapshot
            raise NotFound(f"no photo {image_id!r} in this library (it was changed a moment ago; reload)")
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
        """The approach fitted on the current library; after a change, the one fitted before it while the new one
        is fitted in the background (an add never waits for an index to be rebuilt, nor do the queries after it)."""
        check_choice("approach", name, APPROACHES)
        held, library = self._approaches.get(name), self.library
        if held is None:
            return self._once(self._approaches, name, lambda: self._fitted(name, library))
        if _behind(held.library, library) or held.model_changes() >= refit_after(len(library)):
            with self._refit_lock:
                if name not in self._refitting:
                    self._refitting.add(name)
                    threading.Thread(target=self._refit, args=(name, library), daemon=True,
                                     name=f"similar-finder-refit-{name}").start()
        return held

    def _refit(self, name: str, library: Library) -> None:
        try:
            batcher = self._fitted(name, library)
            if self.library is library:
                self._approaches[name] = batcher
        except Exception as exc:  # noqa: BLE001 - the stale approach goes on answering; said in one line
            log.warning("could not refit the %s approach after the library changed: %s", name, exc)
        finally:
            with self._refit_lock:
                self._refitting.discard(name)

    def _fitted(self, name: str, library: Library) -> _Batcher:
        try:
            return _Batcher(self._fit(name, library), library)
        except ImageError:
            if name not in PER_PHOTO:
                raise
        # A photo deleted or damaged since the extraction has no colour or hash: the approach is fitted on the
        # others, and says which it left out, instead of failing for the whole library.
        rows, vectors, left_out = self._readable(PER_PHOTO[name], library)
        if len(rows) < 2:
            raise UsageError(f"only {len(rows)} of the library's photos can still be read; run the extraction again")
        paths = [library.paths[r] for r in rows]
        if name == "duplicates":  # candidates by hash among the readable photos only; answers by library row
            return _Batcher(NearDuplicateSearch(library, hashes=(rows, vectors)), library, left_out=left_out)
        model = Recommender(kind="color").fit(vectors, paths)
        return _Batcher(model, library, left_out=left_out, model_row={r: i for i, r in enumerate(rows)})

    def _readable(self, kind: str, library: Library) -> tuple[list[int], np.ndarray, dict[str, str]]:
        """The rows whose photo can still be described as ``kind``, their vectors, and the others with why."""
        cache_file = library.files.cache(f"photos-{kind}")
        cached = joblib.load(cache_file) if cache_file.is_file() else {}
        shas = library.shas()
        rows, vectors, left_out, todo = [], {}, {}, []
        for row, (path, sha) in enumerate(zip(library.paths, shas)):
            if not (library.root / path).is_file():
                left_out[path] = "its file is gone"
            elif sha in cached:
                vectors[row] = cached[sha]
            else:
                todo.append(row)
        for row, described in zip(todo, describe_many(library.root, [library.paths[r] for r in todo], [kind])):
            if described is None:
                left_out[library.paths[row]] = "it can no longer be decoded"
            else:
                vectors[row] = described[0]
        rows = sorted(vectors)
        matrix = np.stack([vectors[r] for r in rows]).astype(np.float32) if rows else np.zeros((0, 1), np.float32)
        if left_out:
            log.warning("%d photos left out of %s (gone or damaged since the extraction): %s", len(left_out), kind,
                        ", ".join(list(left_out)[:5]))
        return rows, matrix, left_out

    def _fit(self, name: str, library: Library):
        if name == "cosine":
            # An app answers several people at once: from APP_IVF_ABOVE photos an IVF index answers in a few
            # milliseconds what brute force takes tens for (measured at 100k: 2.8 against 17 ms, recall@5 1.0).
            return Recommender(kind="cnn", ivf_above=APP_IVF_ABOVE).fit(library)
        if name == "color":
            return _recommender_for(library, "color", None, 0)
        if name == "duplicates":
            return NearDuplicateSearch(library)
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
            catalog.set_clusters(dict(zip(library.ids.tolist(), model.labels_.tolist())), library.fingerprint)
            return model

        # A sort by cluster and the K-Means approach, asked at once, tune it once.
        return self._once(self._derived, "kmeans", fit)

    def similar(self, image_id, n: int = 5, approach: str = "cosine") -> Answer:
        """The photos most similar to a library photo (never itself)."""
        current = self.library  # the state this answer is about: an add committed meanwhile comes after it
        photo = self.photo(image_id, current)
        batcher = self._batcher(approach)
        row = batcher.library.row_of_id.get(photo["image_id"])
        if approach == "duplicates":
            answer = self._near_duplicates(batcher, n, current, photo=photo)
        elif row is None:  # added after the approach was fitted: asked by its vector, as a new photo would be
            vector = current.vectors(batcher.model.kind)[current.row_of_id[photo["image_id"]]]
            answer = self._answer(approach, batcher, current, *batcher(n, vector=vector))
        else:
            row = row if batcher.model_row is None else batcher.model_row.get(row)
            if row is None:
                raise NotFound(f"photo {image_id} ({photo['path']}) has no {APPROACHES[approach]}: "
                               f"{batcher.left_out.get(photo['path'], 'it cannot be read')}; run the extraction again")
            answer = self._answer(approach, batcher, current, *batcher(n, row=row))
        answer.query = {k: photo[k] for k in ("image_id", "path", "folder", "width", "height")}
        return answer

    def search(self, data: bytes, n: int = 5, approach: str = "cosine", *, filename: str = "upload") -> Answer:
        """The library photos most similar to an uploaded photo, which is not kept."""
        data, pixels = self.check_upload(data, filename)
        current = self.library
        batcher = self._batcher(approach)  # fitting an approach is no decoding: it holds no slot
        with self.decoding(filename, pixels):
            vector = self._describe(data, batcher.model.kind, filename)
            if approach == "duplicates":  # the upload's pixels are verified against its candidates' too
                return self._near_duplicates(batcher, n, current, data=data, vector=vector)
        return self._answer(approach, batcher, current, *batcher(n, vector=vector))

    def _near_duplicates(self, batcher: _Batcher, n: int, current: Library, *, photo: dict | None = None,
                         data: bytes | None = None, vector: np.ndarray | None = None) -> Answer:
        """The per-photo near-duplicates answer (:class:`NearDuplicateSearch`): a library ``photo``, or an upload's
        ``data`` and ``vector``; each result says how it differs from the query."""
        finder = batcher.model
        try:
            if photo is None:
                found, gone = finder.of_data(data, vector, n)
            else:
                file = current.root / photo["path"]
                found, gone = finder.of_data(file.read_bytes(), current.vectors("cnn")[current.row_of[photo["path"]]],
                                             n, path=photo["path"], modified=file.stat().st_mtime)
        except (OSError, ImageError) as exc:
            raise NotFound(f"photo {photo['image_id']} ({photo['path']}) cannot be read for near-duplicates: "
                           f"{exc}; run the extraction again") from None
        gone = {**batcher.left_out, **gone}
        results = [{"image_id": batcher.library.image_id(r["path"]), "path": r["path"],
                    "distance": round(r["distance"], 6), "relation": r["relation"]}
                   for r in found if r["path"] in current.row_of]
        return Answer("duplicates", results, note=_left_out_note(gone), empty=NO_DUPLICATES)

    def _answer(self, name, batcher: _Batcher, current: Library, distances, indices, gates) -> Answer:
        model = batcher.model
        frame = model.answer(distances[0], indices[0], None if gates is None else gates[0])
        root = current.root
        results, gone = [], dict(batcher.left_out)
        for rec in frame.to_dict("records"):
            if not (root / rec["path"]).is_file():  # deleted since the extraction: it drops out, said in the note
                gone[rec["path"]] = "its file is gone"
                continue
            if rec["path"] not in current.row_of:  # removed by a change the approach has not caught up with
                continue
            results.append({"image_id": batcher.library.image_id(rec["path"]), "path": rec["path"],
                            "distance": round(float(rec["distance"]), 6),
                            **({"cluster": int(rec["cluster"])} if "cluster" in rec else {})})
        refused = bool(gates is not None and not model.calibration_.admits(gates[0]))  # why it is empty
        note = _left_out_note(gone)
        if _behind(batcher.library, current):  # said, not waited for: the add that changed it returned at once
            behind = abs(len(current) - len(batcher.library))
            stale = (f"answered from the library as it was before its last change ({behind} photos apart); the "
                     f"change joins the answers in a few seconds")
            note = f"{note}; {stale}" if note else stale
        return Answer(name, results, refused, note=note)

    def decoding(self, filename: str = "upload", pixels: int | None = None):
        """Admission for decoding ``pixels`` of one upload (a context manager; default: a whole budget's worth).

        Decoding is CPU-bound and memory-bound, so at most ``decode_slots`` uploads decode at once, and together
        at most the pixel budget (small photos side by side, a photo at the budget alone), whatever the number of
        server threads. One that is not admitted within ``decode_wait_s`` gets :class:`Busy` (503, Retry-After).
        """
        admission, wait = self._decoding, self.decode_wait_s
        pixels = self.max_upload_pixels if pixels is None else pixels

        class _Admitted:
            def __enter__(slot):
                if not admission.acquire(pixels, wait):
                    raise Busy(f"{filename} was not decoded: the server is decoding other uploads; "
                               f"try again in a few seconds", retry_after=max(1, round(wait / 3)))

            def __exit__(slot, *exc):
                admission.release(pixels)

        return _Admitted()

    def check_upload(self, data: bytes, filename: str = "upload") -> tuple[bytes, int]:
        """``(bytes to use, pixels)`` of an upload (its first frame, if animated), or an :class:`UploadError`
        saying why ``data`` cannot be a query (too large, too many pixels, empty, not an image). The header is read
        first; the decode waits for admission (:meth:`decoding`).
        """
        if len(data) > self.max_upload_bytes:
            raise UploadTooLarge(f"{filename} is {len(data) / 2**20:.1f} MB, over the limit of "
                                 f"{self.max_upload_bytes / 2**20:.0f} MB")
        if not data:
            raise UploadError(f"{filename} cannot be used: empty file (0 bytes)")
        pixels, animated = 1, False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the budget below is lower
                with Image.open(io.BytesIO(data)) as img:  # reads the header only: size and format
                    width, height = img.size
                    pixels, animated = width * height, getattr(img, "is_animated", False)
        except Image.DecompressionBombError:
            raise UploadTooLarge(f"{filename} is a decompression bomb: over PIL's cap of {MAX_PIXELS} pixels, "
                                 f"and the upload limit of {self.max_upload_pixels / 1e6:g} MP") from None
        except Exception:  # noqa: BLE001 - not an image PIL knows, or a broken header: load_image says which
            pass
        if pixels > self.max_upload_pixels:
            raise UploadTooLarge(f"{filename} is {width}x{height} = {pixels / 1e6:.1f} megapixels, over the upload "
                                 f"limit of {self.max_upload_pixels / 1e6:g} MP (--max-upload-mp)")
        with self.decoding(filename, pixels):
            try:
                if animated:
                    # Only the first frame is used: counting or decoding 200,000 frames costs seconds.
                    with Image.open(io.BytesIO(data)) as img:
                        img.seek(0)
                        out = io.BytesIO()
                        img.save(out, "PNG")  # lossless, palette and transparency kept: decoded as the frame
                        data = out.getvalue()
                load_image(data, 32)  # cheap: JPEGs decode in draft mode; bombs and bad files say why
            except ImageError as exc:
                raise UploadError(f"{filename} cannot be used: {exc}") from None
            except (OSError, ValueError, EOFError) as exc:  # a first frame that cannot be read
                raise UploadError(f"{filename} cannot be used: corrupt or truncated image: {exc}") from None
        return data, pixels

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
        if len(filename) > MAX_NAME:
            raise UploadError(f"the file name is {len(filename)} characters long; rename the photo to at most "
                              f"{MAX_NAME} characters")
        parts = Path(folder).parts
        if len(folder) > MAX_FOLDER or any(len(p) > MAX_NAME for p in parts):
            raise UploadError(f"the folder name is {len(folder)} characters long; give at most {MAX_FOLDER} "
                              f"characters, at most {MAX_NAME} for each part")
        name = Path(filename).name
        stem, suffix = Path(name).stem, Path(name).suffix.lower()
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
        for above in (root / folder, *(root / folder).parents):
            if above == root:
                break
            if above.exists() and not above.is_dir():
                raise UploadError(f"{above.relative_to(root).as_posix()} is a file in the library, not a folder; "
                                  f"choose another folder name")
        self.check_upload(data, filename)  # the file kept is the one sent, animated or not
        relative = target.relative_to(root).as_posix()
        with self._build, self._model:
            created = not target.is_file()
            # Under a journal: a kill before the commit leaves no photo in the folder that the library lacks.
            with joining(self.library.files, target, relative, sha) if created else contextlib.nullcontext():
                try:
                    if created:
                        try:
                            with atomic_write(target, "wb") as handle:
                                handle.write(data)
                        except OSError as exc:  # a name the file system refuses, a full disk, no permission
                            raise UploadError(f"{filename} cannot be saved in {folder}: {exc.strerror or exc}; "
                                              f"choose a shorter or plainer name") from None
                    if relative in self.library.row_of:  # the same photo sent again: already in the library
                        return self.photo(self.library.image_id(relative))
                    library = add_photos(self.library, [relative])
                    if relative not in library.row_of:
                        raise UploadError(f"{filename} was not taken into the library: "
                                          f"{library.skipped_now.get(relative, 'it cannot be read')}")
                except BaseException:
                    if created:
                        target.unlink(missing_ok=True)
                    raise
            self._swap(library)
        return self.photo(library.image_id(relative))

    def _swap(self, library: Library) -> None:
        """Answer from ``library`` (just committed) from now on; called holding ``_build``.

        The approaches that follow changes (:data:`FOLLOW_CHANGES`) are updated at the cost of the change, so
        their answers know the new photos at once; the others answer from the old library, saying so, until
        theirs are refitted in the background (see :meth:`_batcher`).
        """
        for name in FOLLOW_CHANGES:
            held = self._approaches.get(name)
            if held is not None and held.model_row is None:
                try:
                    self._approaches[name] = _Batcher(held.model.updated(library), library)
                except Exception as exc:  # noqa: BLE001 - it goes on answering, stale, and is refitted
                    log.warning("could not update the %s approach after the library changed: %s", name, exc)
        self._derived = {}
        self.library, self.catalog = library, library.catalog()

    def update_from_folder(self, paths) -> None:
        """Take changes seen in the folder (photos added, changed, moved or removed: relative paths) into the
        library, in one commit, then answer from it."""
        with self._build, self._model:
            library = update_photos(self.library, paths)
            if library is not self.library:
                self._swap(library)
                stats = library.stats
                log.info("folder changes: %d embedded, %d known, %d removed, %d unusable (%d photos now)",
                         stats.embedded, stats.reused, stats.removed, stats.skipped, len(library))

    def watch(self, stop: threading.Event, *, debounce_ms: int = 400) -> threading.Thread:
        """Follow the images folder in a background thread until ``stop`` is set (the ``watchfiles`` package)."""
        import watchfiles

        root = self.library.root.resolve()
        store = self.library.files.csv.parent.resolve()
        stem = self.library.files.csv.stem

        def relevant(change, path: str) -> bool:  # photos, and folders (a folder moved in brings its photos)
            file = Path(path)
            try:
                relative = file.resolve().relative_to(root)
            except ValueError:
                return False
            inside_store = file.parent.resolve() == store or any(p.startswith(f"{stem}.") for p in relative.parts)
            hidden = any(p.startswith(".") for p in relative.parts)
            return not hidden and not inside_store and (file.suffix.lower() in IMAGE_EXTENSIONS or not file.suffix)

        def photos_of(changes) -> list[str]:
            paths = set()
            for _, path in changes:
                relative = Path(path).resolve().relative_to(root).as_posix()
                if Path(path).is_dir():  # its files may have arrived before the folder was watched
                    paths.update(scan_images(Path(path))["path"].map(lambda p: f"{relative}/{p}"))
                elif Path(path).suffix.lower() in IMAGE_EXTENSIONS:
                    paths.add(relative)
                else:  # a folder gone: its photos with it
                    paths.update(p for p in self.library.paths if p.startswith(f"{relative}/"))
            return sorted(paths)

        def follow():
            for changes in watchfiles.watch(root, watch_filter=relevant, stop_event=stop, debounce=debounce_ms,
                                            raise_interrupt=False):
                paths = photos_of(changes)
                try:
                    if paths:
                        self.update_from_folder(paths)
                except SimilarFinderError as exc:  # said in one line; the watch goes on
                    log.warning("could not take %d changed photos into the library: %s", len(paths), exc)

        thread = threading.Thread(target=follow, name="similar-finder-watch", daemon=True)
        thread.start()
        return thread

    # --- map and duplicates -------------------------------------------------------------

    def map(self, method: str = "tsne", *, wait: bool = False) -> dict:
        """The library's 2-D map (t-SNE or UMAP) in [0, 1]², of an even sample above :data:`MAP_MAX` photos.

        A map not yet computed is computed in a background thread (t-SNE or UMAP take 20-30 s on two cores, which
        no request should wait for): until it is ready this raises :class:`Computing`, unless ``wait``.
        """
        check_choice("map method", method, ("tsne", "umap"))
        key = f"map-{method}"
        library, derived = self.library, self._derived
        with self._build:
            job = derived.get(key)
            if job is None:
                job = derived[key] = _Job(lambda: library.cached(f"{key}-{MAP_MAX}",
                                                                 lambda: self._compute_map(library, method)))
        rows, points = job.result(wait)
        paths, ids = library.paths, library.ids
        return {"method": {"tsne": "t-SNE", "umap": "UMAP"}[method], "total": len(paths), "shown": len(rows),
                "sampled": len(rows) < len(paths),
                "points": [{"image_id": int(ids[r]), "path": paths[r], "x": round(float(x), 5), "y": round(float(y), 5)}
                           for r, (x, y) in zip(rows, points)]}

    @staticmethod
    def _compute_map(library: Library, method: str):
        rows = sample_rows(len(library), MAP_MAX, even=True)
        if len(rows) < 5:
            raise UsageError(f"a map needs at least 5 photos, the library has {len(rows)}")
        points = (tsne_embedding if method == "tsne" else umap_embedding)(library.matrix[rows])
        low, high = points.min(axis=0), points.max(axis=0)
        return rows, (points - low) / np.maximum(high - low, 1e-12)

    def duplicates(self, max_distance: int | None = None) -> dict:
        """Groups of near-identical photos, largest first, the one to keep first, and which photos are left out.

        Verified by local features with the library's CNN vectors as candidates
        (:func:`~similar_finder.near_duplicates.near_duplicates`); ``max_distance``: the pure perceptual-hash answer.
        """
        groups, left_out = self._once(self._derived, f"duplicates-{max_distance}",
                                      lambda: self._duplicate_groups(max_distance))
        paths, ids, root, gone = self.library.paths, self.library.ids, self.library.root, dict(left_out)
        kept = []
        for group, relation in groups:  # a photo deleted since leaves its group (and a group of one is no group)
            present = [r for r in group if (root / paths[r]).is_file()]
            gone.update({paths[r]: "its file is gone" for r in group if r not in present})
            if len(present) > 1:
                kept.append([{"image_id": int(ids[r]), "path": paths[r], "keep": r == group[0],
                              "relation": relation.get(paths[r], "kept" if r == group[0] else None)}
                             for r in present])
        return {"groups": kept, "message": None if kept else "No near-duplicates found", "note": _left_out_note(gone)}

    def _duplicate_groups(self, max_distance: int | None) -> tuple[list, dict[str, str]]:
        library = self.library
        if max_distance is None:
            found, left_out = near_duplicates(library.root, library.paths, library.vectors("cnn"))
            return [([library.row_of[p] for p in g], g.relation) for g in found], left_out
        relation = {p: f"phash within {max_distance} bits" for p in library.paths}
        try:
            return [(g, relation) for g in duplicate_groups(library.vectors("phash"), max_distance,
                                                            library.paths)], {}
        except ImageError:  # a photo gone or damaged since the extraction: grouped without it, and said so
            rows, vectors, left_out = self._readable("phash", library)
            groups = duplicate_groups(vectors, max_distance, [library.paths[r] for r in rows])
            return [([rows[i] for i in group], relation) for group in groups], left_out

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
        if path.suffix.lower() in BROWSER_FORMATS and self.media_type(path) in BROWSER_TYPES:
            return path
        return self._derivative(path, photo["sha256"], DISPLAY_SIZE, "display")

    @staticmethod
    def media_type(path: Path) -> str | None:
        """The type of an image file by its content (not its name), as PIL reads it from the header."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    return Image.MIME.get(img.format)
        except Exception:  # noqa: BLE001 - not an image (or no longer one): no type to serve it as
            return None

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


def _left_out_note(left_out: dict[str, str]) -> str | None:
    """One line naming the photos an answer had to leave out, and why."""
    if not left_out:
        return None
    named = "; ".join(f"{path} ({why})" for path, why in list(left_out.items())[:5])
    more = f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""
    return (f"{len(left_out)} photo{'s' * (len(left_out) > 1)} left out, changed since the extraction: {named}{more}; "
            f"run the extraction again to refresh the library")


class _Admission:
    """At most ``slots`` holders at once, holding at most ``capacity`` pixels together (one larger is let in alone)."""

    def __init__(self, slots: int, capacity: int):
        self.slots, self.capacity = slots, capacity
        self._changed = threading.Condition()
        self._holders = self._held = 0

    def acquire(self, pixels: int, timeout: float) -> bool:
        pixels = min(pixels, self.capacity)
        with self._changed:
            if not self._changed.wait_for(
                    lambda: self._holders < self.slots and self._held + pixels <= self.capacity, timeout):
                return False
            self._holders += 1
            self._held += pixels
            return True

    def release(self, pixels: int) -> None:
        with self._changed:
            self._holders -= 1
            self._held -= min(pixels, self.capacity)
            self._changed.notify_all()


class _Job:
    """A value computed once in a background thread; :meth:`result` answers it, or :class:`Computing` until then."""

    def __init__(self, compute):
        self._done = threading.Event()
        self._value = self._error = None
        self._started = threading.Lock()
        self._compute = compute
        self._thread: threading.Thread | None = None

    def _run(self):
        try:
            self._value = self._compute()
        except BaseException as exc:  # noqa: BLE001 - kept and raised to every later caller
            self._error = exc
        finally:
            self._done.set()

    def result(self, wait: bool = False):
        with self._started:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="similar-finder-map", daemon=True)
                self._thread.start()
        if wait:
            self._done.wait()
        elif not self._done.wait(0.25):  # a cached map is ready at once: answered without a second round trip
            raise Computing("the map is being computed; ask again in a few seconds")
        if self._error is not None:
            raise self._error
        return self._value
