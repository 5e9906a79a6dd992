"""Near-duplicates of a folder: copies that were resized, recompressed, cropped, mirrored, tilted or retouched.

``find_duplicates(images_dir)`` groups near-identical photos in two steps, the field's usual shape:

1. **candidates**, a bounded few per photo: its nearest neighbours by the library's CNN vectors (which ImageNet
   training made nearly blind to mirroring), and by perceptual hash of the photo and of its mirror image;
2. **verification** of each candidate pair by local features: ORB keypoints matched with Lowe's ratio test, then a
   RANSAC similarity fit (rotation, scale, shift); a pair is a copy when enough matches agree on one fit, tried
   on the photo and on its mirror. The fit also says how a copy differs from the member to keep.

Each group lists the member to keep first (most pixels, least compressed, older, larger file) and how every
other member differs from it (:data:`RELATIONS`). ``max_distance`` or ``kind`` asks for the pure perceptual-hash
answer instead (64 bits within ``max_distance``). ``write_duplicates`` also writes ``duplicates.csv`` and one
picture per group (command line: ``similar-finder duplicates IMAGES_DIR``).
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ._io import write_csv
from .descriptors import DUPLICATE_BITS, HASH_KINDS, duplicate_groups, perceptual_hash, phash_and_mirror
from .errors import MissingError, check_choice
from .features import extract_features
from .images import ImageError, load_image, scan_images
from .kinds import describe_many, get_kind
from .library import Library, as_library
from .neighbors import Neighbors

FIT_SIDE = 256          # px of the longer side keypoints are found at: copies of any size meet at one scale
ORB_FEATURES = 300      # keypoints a photo (and as many for its mirror): ~24 kB a photo, 2.4 GB at 100k
FAST_THRESHOLD = 10     # corner contrast of a keypoint (OpenCV: 20): lower, so blurred or low-contrast copies keep some
CNN_CANDIDATES = 4      # nearest neighbours by CNN vector verified per photo (caps the verification work)
HASH_CANDIDATES = 2     # and by perceptual hash, of the photo and of its mirror
# Pairs verified a photo at most: its CNN neighbours, hash neighbours, and hash neighbours of its mirror (one more:
# a photo may find itself there, which is no pair). Verifying n photos is at most n x MAX_CANDIDATES fits.
MAX_CANDIDATES = CNN_CANDIDATES + 2 * HASH_CANDIDATES + 1
QUERY_CNN_CANDIDATES = 8   # a single query (the app's per-photo near-duplicates): CNN neighbours verified
QUERY_HASH_CANDIDATES = 4  # and hash neighbours of the query and of its mirror: at most 16 verified a request
RATIO = 0.8             # Lowe's ratio test: a match counts when clearly better than the second best
RANSAC_PX = 5.0         # reprojection error (px at FIT_SIDE) of a match that agrees with the fit
MIN_INLIERS = 12        # agreeing matches that make a copy (tuned on clothing seed 0, see bench/duplicates_bench.py)
MIN_SPREAD = 0.12       # share of each side the agreeing keypoints must span: a shared caption or logo is no copy
SCALE_RANGE = (0.4, 2.5)  # a fit outside it is a coincidence, not a copy (a crop to 40% is another photo)
CROPPED_BELOW = 0.9     # share of the kept photo a copy still covers below which it is called cropped
ROTATED_ABOVE = 1.5     # degrees of tilt from which a copy is called rotated
SAME_LOOK_BELOW = 3.5   # mean difference (of 255, both blurred) of an aligned copy still only resized/recompressed
GREY_BELOW = 3.0        # mean spread of R, G and B (of 255) under which a picture is greyscale
BLURRED_BELOW = 0.5     # share of the kept photo's fine detail (Laplacian variance) under which a copy was blurred
RESIZED_ABOVE = 1.05     # ratio of the files' scales from which a copy is called resized
RECOMPRESSED_ABOVE = 0.1  # relative change of the mean JPEG quantisation step that makes a copy recompressed
SAME_SIZE = 0.97        # share of the largest member's pixels at which a member still ties with it for keeping
KEEPER_TRIES = 4        # tied members tried as the keeper (each is verified against every other member)
# Each copy is labelled with every one of these it shows against the keeper, in this order ("cropped, mirrored").
NO_DUPLICATES = ("No near-duplicates found",  # the per-photo answer with none, and why
                 "none of the photos closest to it by CNN vector or by hash is a copy of it (keypoints and a "
                 "geometric fit checked, the mirror image too)")
RELATIONS = ("same file", "same pixels", "cropped", "mirrored", "rotated", "recompressed", "resized", "edited")


class DuplicateGroup(list):
    """The paths of one group, the member to keep first; ``relation[path]`` says how each differs from it."""

    def __init__(self, paths, relation: dict[str, str]):
        super().__init__(paths)
        self.relation = relation

    @property
    def keeper(self) -> str:
        return self[0]


@dataclass
class _Photo:
    path: str
    width: int                     # the file's own pixels, upright
    height: int
    size: int                      # bytes on disk
    modified: float                # mtime
    quantization: float            # mean JPEG quantisation step (0 for lossless): lower is less compressed
    sha256: str
    colour: float                  # mean spread of R, G and B (under 3: a greyscale picture)
    shape: tuple                   # (height, width) at FIT_SIDE, where keypoints and fits are
    bits: np.ndarray               # pHash of the photo and of its mirror image
    views: tuple = field(repr=False)   # (points, descriptors) of the photo and of its mirror
    # RGB, longer side FIT_SIDE: held only while its group is labelled (100k photos would not fit in memory)
    pixels: np.ndarray | None = field(default=None, repr=False)
    blurred: dict = field(default_factory=dict, repr=False)  # pixels blurred by sigma, while labelled

    @property
    def rank(self) -> tuple:
        """Which of two members alike in pixels to keep, lowest first: least compressed, then the older file (the
        one the others were made from), then the larger file, then the name."""
        return (self.quantization, self.modified, -self.size, self.path)


@dataclass
class _Match:
    inliers: int
    mirrored: bool
    transform: np.ndarray          # 2x3: points of the first photo (mirrored when ``mirrored``) into the second


def _pixels(data: bytes) -> np.ndarray:
    """RGB pixels at FIT_SIDE on the longer side (a JPEG decoded at a reduced size straight from its DCT)."""
    return load_image(data, FIT_SIDE, keep_aspect=True)[0]


def _views(grey: np.ndarray, mirror: bool = True) -> tuple:
    """ORB keypoints (positions, descriptors) of a grey picture and (``mirror``) of its mirror image."""
    import cv2  # opencv: only when duplicates are verified

    orb = cv2.ORB_create(nfeatures=ORB_FEATURES, fastThreshold=FAST_THRESHOLD)
    points, descriptors = orb.detectAndCompute(grey, None)
    if not mirror:
        return ((np.float32([p.pt for p in points]).reshape(-1, 2), descriptors),)
    # The mirror image's corners are these corners mirrored (corner scores are symmetric), so only their
    # descriptors are computed there (a quarter less time than finding them again; the fits come out the same
    # within a few matches). The orientation mirrors too, which ORB takes from the keypoint as given.
    w = grey.shape[1]
    mirrored = [cv2.KeyPoint(w - 1 - p.pt[0], p.pt[1], p.size, (180.0 - p.angle) % 360, p.response, p.octave,
                             p.class_id) for p in points]
    mirrored, mirrored_descriptors = orb.compute(np.ascontiguousarray(grey[:, ::-1]), mirrored)
    return tuple((np.float32([p.pt for p in kps]).reshape(-1, 2), d)
                 for kps, d in ((points, descriptors), (mirrored, mirrored_descriptors)))


def _read(root: Path, path: str) -> _Photo:
    """One photo, described once: its keypoints and hashes (the pixels are read again only to label a group)."""
    file = root / path
    data = file.read_bytes()
    return _describe(data, path, file.stat().st_mtime)


def _describe(data: bytes, path: str, modified: float, keep_pixels: bool = False, mirror: bool = True) -> _Photo:
    import cv2

    pixels = _pixels(data)
    with Image.open(io.BytesIO(data)) as img:  # header only: the true size and how hard a JPEG was compressed
        width, height = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # turned upright by a quarter turn, as the pixels are
            width, height = height, width
        tables = getattr(img, "quantization", None) or {}
    quantization = float(np.mean([np.mean(t) for t in tables.values()])) if tables else 0.0
    grey = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    colour = float(np.ptp(pixels[::4, ::4].astype(np.int16), axis=2).mean())  # every 4th pixel tells grey enough
    return _Photo(path, width, height, len(data), modified, quantization, hashlib.sha256(data).hexdigest(), colour,
                  grey.shape, phash_and_mirror(grey), _views(grey, mirror), pixels if keep_pixels else None)


def _fit(a: tuple, b: tuple) -> tuple[int, np.ndarray | None]:
    import cv2

    (pa, da), (pb, db) = a, b
    if da is None or db is None or len(da) < 2 or len(db) < 2:
        return 0, None
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(da, db, k=2)
    good = [m for m, *rest in (p for p in pairs if p) if not rest or m.distance < RATIO * rest[0].distance]
    if len(good) < MIN_INLIERS:
        return 0, None
    src = pa[[m.queryIdx for m in good]]
    dst = pb[[m.trainIdx for m in good]]
    transform, inliers = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX)
    if transform is None:
        return 0, None
    agreeing = inliers.ravel().astype(bool)
    for points in (src[agreeing], dst[agreeing]):  # both photos: spread over the picture, not one strip of it
        if len(points) == 0 or (np.ptp(points, axis=0) < MIN_SPREAD * FIT_SIDE).any():
            return 0, None
    scale = math.hypot(transform[0, 0], transform[1, 0])
    if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        return 0, None
    return int(inliers.sum()), transform


def _verify(a: _Photo, b: _Photo, both: bool = False) -> _Match | None:
    """Whether ``a`` (as it is, or mirrored) is a copy of ``b``, by agreeing keypoint matches.

    ``both``: the mirror is tried even when the photo as it is matched, and the better fit wins (to label a
    copy: a symmetric subject also fits its mirror image, turned).
    """
    best = None
    for mirrored in (False, True):
        inliers, transform = _fit(a.views[int(mirrored)], b.views[0])
        if inliers >= MIN_INLIERS and (best is None or inliers > best.inliers):
            best = _Match(inliers, mirrored, transform)
        if best is not None and not mirrored and not both:
            break  # the photo as it is matched: its mirror need not be tried
    return best


def _edits(copy: _Photo, keep: _Photo, match: _Match | None, look: bool = True) -> tuple[str, ...]:
    """Every way ``copy`` differs from ``keep`` that the fit can tell, in :data:`RELATIONS` order.

    ``look=False``: only what the fit and the files tell (no pixels compared: a changed look or a blur is not
    seen), a few times faster, enough to choose the keeper.
    """
    import cv2

    if copy.sha256 == keep.sha256:
        return ("same file",)
    if match is None:
        return ("edited",)  # linked through another member only
    if look and (copy.width, copy.height) == (keep.width, keep.height) and np.array_equal(copy.pixels, keep.pixels):
        return ("same pixels",)
    edits = set()
    t = match.transform
    if match.mirrored:
        edits.add("mirrored")
    angle = math.degrees(math.atan2(t[1, 0], t[0, 0]))
    scale = math.hypot(t[0, 0], t[1, 0])
    if abs(angle) > ROTATED_ABOVE:
        edits.add("rotated")
    (h, w), (kh, kw) = copy.shape, keep.shape
    if abs(angle) > ROTATED_ABOVE:  # a straightened copy loses its corners to the tilt, not to a crop: by area
        shown = w * h * scale ** 2 / (kw * kh)
    else:  # by the part of the kept picture the copy's frame covers (a crop off centre too)
        corners = cv2.transform(np.float32([[0, 0], [w, 0], [w, h], [0, h]]).reshape(-1, 1, 2), t).reshape(-1, 2)
        shown, _ = cv2.intersectConvexConvex(corners, np.float32([[0, 0], [kw, 0], [kw, kh], [0, kh]]))
        shown /= kw * kh
    if shown < CROPPED_BELOW:
        edits.add("cropped")
    # The fit is in FIT_SIDE pixels: in the files' own pixels its scale is the resize.
    resized = abs(math.log(scale * (keep.width / kw) / (copy.width / w))) > math.log(RESIZED_ABOVE)
    if resized:
        edits.add("resized")
    if copy.colour < GREY_BELOW <= keep.colour:
        edits.add("edited")  # made greyscale
    if look and _looks_edited(copy, keep, match, resized):
        edits.add("edited")
    lossy = copy.quantization > 0, keep.quantization > 0
    if (lossy != (False, False) and (lossy[0] != lossy[1] or abs(copy.quantization - keep.quantization)
                                     > RECOMPRESSED_ABOVE * keep.quantization)) or not edits:
        edits.add("recompressed")  # saved at another quality (or nothing else tells the pixels apart)
    return tuple(r for r in RELATIONS if r in edits)


def _looks_edited(copy: _Photo, keep: _Photo, match: _Match, resized: bool) -> bool:
    """Whether ``copy`` brought onto ``keep`` by the fit looks changed, or was blurred (both hold their pixels)."""
    import cv2

    t = match.transform
    pixels = np.ascontiguousarray(copy.pixels[:, ::-1]) if match.mirrored else copy.pixels  # as the fit saw it
    (h, w), (kh, kw) = copy.shape, keep.shape
    aligned = cv2.warpAffine(pixels, t, (kw, kh)).astype(np.float32)
    covered = cv2.warpAffine(np.ones((h, w), np.float32), t, (kw, kh))
    # Keeper pixels the copy covers, less a border where the warp blends in its black edge; a tilted copy's fill
    # lies outside the kept frame, so it is never compared.
    inside = cv2.erode(covered, np.ones((5, 5), np.uint8)) > 0.99
    if inside.any():
        # Compared blurred by ~2 px of the smaller photo: JPEG blocks and resampling vanish, a new brightness,
        # contrast or caption stays. The copy's blur is over the pixels it covers only (divided by the blurred
        # coverage), or its edge would bring in the black around it.
        sigma = 2.0 * FIT_SIDE / min(max(copy.width, copy.height), max(keep.width, keep.height), FIT_SIDE)
        if sigma not in keep.blurred:  # the keeper is compared with each copy
            keep.blurred[sigma] = cv2.GaussianBlur(keep.pixels.astype(np.float32), (0, 0), sigma)
        weight = np.maximum(cv2.GaussianBlur(covered, (0, 0), sigma), 1e-3)[..., None]
        smooth = cv2.GaussianBlur(aligned * covered[..., None], (0, 0), sigma) / weight
        difference = np.abs(smooth - keep.blurred[sigma])[inside].mean()
        # Compared pixel for pixel at FIT_SIDE (not resized, not cropped: the fit's scale is 1), a copy that lost
        # most of its fine detail was blurred, not only recompressed; a smaller copy or a crop brought to FIT_SIDE
        # is soft anyway.
        blurred = not resized and abs(math.log(math.hypot(t[0, 0], t[1, 0]))) < math.log(RESIZED_ABOVE) and (
            cv2.Laplacian(cv2.cvtColor(aligned.clip(0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY), cv2.CV_32F)[inside].var()
            < BLURRED_BELOW * cv2.Laplacian(cv2.cvtColor(keep.pixels, cv2.COLOR_RGB2GRAY), cv2.CV_32F)[inside].var())
        return blurred or difference > SAME_LOOK_BELOW
    return False


def _relation(copy: _Photo, keep: _Photo, match: _Match | None) -> str:
    """How ``copy`` differs from ``keep``: its :func:`_edits`, as one label ("cropped, mirrored")."""
    return ", ".join(_edits(copy, keep, match))


def _reverse(match: _Match | None, a: _Photo, b: _Photo) -> _Match | None:
    """``b`` onto ``a`` from the fit of ``a`` onto ``b`` (the mirror image's fit goes both ways mirrored)."""
    if match is None:
        return None
    forward = np.vstack([match.transform, [0, 0, 1]])
    back = np.linalg.inv(forward)
    if match.mirrored:  # T maps mirrored a onto b: b mirrored onto a is mirror_a . T^-1 . mirror_b
        mirror = [np.array([[-1, 0, p.shape[1] - 1], [0, 1, 0], [0, 0, 1]], float) for p in (a, b)]
        back = mirror[0] @ back @ mirror[1]
    return _Match(match.inliers, match.mirrored, back[:2])


def _keeper(members: list[int], full: dict[int, _Photo], known: dict | None = None) -> tuple[int, dict[int, str]]:
    """The member to keep among ``members`` (all read with pixels), and how each other member differs from it.

    The most pixels first (copies within :data:`SAME_SIZE` of the largest tie); among those, the one the others
    differ from in the fewest ways: the photo a crop, a caption or a recompressed copy was made from, which a
    copy saved at a higher quality would otherwise beat. Still tied (a photo and its mirror image differ
    alike both ways): the least compressed, then the older file, then the larger file, then the name. Each pair
    is fitted once (the other way round is its inverse), at most :data:`KEEPER_TRIES` keepers tried; ``known``:
    fits ``{(i, j): match}`` already made (the verification's), reused to choose the keeper.
    """
    largest = max(full[i].width * full[i].height for i in members)
    tied = sorted((i for i in members if full[i].width * full[i].height >= SAME_SIZE * largest),
                  key=lambda i: full[i].rank)[:KEEPER_TRIES]
    fitted: dict[tuple[int, int], _Match | None] = dict(known or {})
    labelled: dict[tuple[int, int], _Match | None] = {}

    def fit(i, keep, both=False):  # i onto keep; ``both``: the better of the photo and its mirror (to label)
        cache = labelled if both else fitted
        if (i, keep) not in cache:
            if (keep, i) in cache:
                cache[i, keep] = _reverse(cache[keep, i], full[keep], full[i])
            else:
                cache[i, keep] = _verify(full[i], full[keep], both=both)
        return cache[i, keep]

    ways = {}
    if len(tied) > 1:
        for keep in tied:
            ways[keep] = sum(len(_edits(full[i], full[keep], fit(i, keep), look=False)) for i in members
                             if i != keep and full[i].sha256 != full[keep].sha256)
    keep = min(tied, key=lambda k: (ways.get(k, 0), tied.index(k)))  # in rank order on a tie
    return keep, {i: _relation(full[i], full[keep], fit(i, keep, both=True)) for i in members if i != keep}


def _candidates(photos: list[_Photo], vectors: np.ndarray | None) -> set[tuple[int, int]]:
    """Pairs worth verifying, a bounded few per photo: CNN neighbours and hash neighbours (of the mirror too)."""
    n = len(photos)
    pairs: set[tuple[int, int]] = set()

    def add(rows, neighbours):
        for i, row in zip(rows, neighbours):
            pairs.update((min(i, j), max(i, j)) for j in row if j != i)

    if vectors is not None:
        known = np.flatnonzero(np.isfinite(vectors).all(axis=1))
        if len(known) > 1:
            _, found = Neighbors("cosine").fit(vectors[known]).kneighbors(n_neighbors=CNN_CANDIDATES)
            add(known, known[found])
    bits = np.stack([p.bits[0] for p in photos])
    mirror = np.stack([p.bits[1] for p in photos])
    index = Neighbors("hamming").fit(bits)
    add(range(n), index.kneighbors(n_neighbors=HASH_CANDIDATES)[1])
    add(range(n), index.kneighbors(mirror, n_neighbors=HASH_CANDIDATES + 1)[1])
    return pairs


def _components(n: int, links) -> list[list[int]]:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    links = list(links)
    if not links:
        return []
    rows, cols = np.array(links).T
    _, labels = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)
    groups = [np.flatnonzero(labels == label).tolist() for label in np.unique(labels)]
    return [g for g in groups if len(g) > 1]


def _library_vectors(root: Path, paths: list[str], library) -> np.ndarray:
    """The CNN vectors of ``paths`` from a library of this folder: ``library`` (a Library or its features file, or a
    list of them, the first that exists and is of this folder wins).

    Photos the library lacks get NaN rows (found by hash candidates only). No library of this folder: the photos
    are embedded once with EfficientNet-Lite0 in a temporary library (the slow part on a folder seen first).
    """
    found = None
    for candidate in library if isinstance(library, (list, tuple)) else [library]:
        if candidate is None or (isinstance(candidate, (str, os.PathLike)) and not Path(candidate).is_file()):
            continue
        candidate = as_library(candidate)
        if candidate.root.resolve() == root.resolve():
            found = candidate
            break
    if found is None:
        with tempfile.TemporaryDirectory() as tmp:
            extract_features(root, Path(tmp) / "features.csv", "efficientnet_lite0", progress=False)
            found = Library(Path(tmp) / "features.csv")
            matrix = np.array(found.vectors("cnn"))  # a copy: the temporary files go
    else:
        matrix = found.vectors("cnn")
    out = np.full((len(paths), matrix.shape[1]), np.nan, np.float32)
    for i, path in enumerate(paths):
        row = found.row_of.get(path)
        if row is not None:
            out[i] = matrix[row]
    return out


def near_duplicates(root: str | os.PathLike, paths: list[str], vectors: np.ndarray | None = None, *,
                    n_jobs: int = -1, timings: dict | None = None) -> tuple[list[DuplicateGroup], dict[str, str]]:
    """Verified groups among ``paths`` (relative to ``root``), largest first, and the unreadable paths with why.

    ``vectors``: CNN vectors row for row with ``paths`` (NaN rows for photos without one), or None for hash
    candidates only (which miss most crops and tilts). The work is bounded: each photo is read once, and at most
    :data:`MAX_CANDIDATES` pairs a photo are verified, so the verification grows as n, not n²; a group is labelled
    with at most :data:`KEEPER_TRIES` fits a member. ``timings``, when given, is filled with the seconds of each
    step (read, candidates, verify, label) and the number of pairs verified.
    """
    root = Path(root)
    clock = time.perf_counter()

    def lap(step):
        nonlocal clock
        if timings is not None:
            timings[step] = timings.get(step, 0.0) + time.perf_counter() - clock
        clock = time.perf_counter()

    workers = os.cpu_count() if n_jobs in (-1, None) else max(1, int(n_jobs))

    def read(path):
        try:
            return _read(root, path)
        except (ImageError, OSError) as exc:
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    with _one_thread_each(), ThreadPoolExecutor(workers) as pool:  # OpenCV and the decoders release the GIL
        read_all = list(pool.map(read, paths))
        lap("read")
        left_out = {p: r for p, r in zip(paths, read_all) if isinstance(r, str)}
        keep = [i for i, r in enumerate(read_all) if not isinstance(r, str)]
        photos = [read_all[i] for i in keep]
        if len(photos) < 2:
            return [], left_out
        vectors = None if vectors is None else np.asarray(vectors, np.float32)[keep]
        pairs = sorted(_candidates(photos, vectors))
        lap("candidates")
        verified = list(pool.map(lambda p: _verify(photos[p[0]], photos[p[1]]), pairs))
        linked = [pair for pair, match in zip(pairs, verified) if match is not None]
        lap("verify")
        tried: dict[int, list] = {}  # each photo's fits, found or not: reused to choose a group's keeper
        for (a, b), match in zip(pairs, verified):
            tried.setdefault(a, []).append((a, b, match))

        def group(members):
            inside = set(members)
            known = {(photos[a].path, photos[b].path): m for i in members for a, b, m in tried.get(i, ())
                     if b in inside}
            return _group(root, [photos[i] for i in members], known)

        groups = list(pool.map(group, _components(len(photos), linked)))
        lap("label")
    if timings is not None:
        timings.update(photos=len(photos), pairs=len(pairs), groups=len(groups))
    groups.sort(key=lambda g: (-len(g), g[0]))
    return groups, left_out


class _one_thread_each:
    """OpenCV's own threads off while a pool runs one call per core (they would only fight over the cores).

    OpenCV's setting is global: the first of overlapping users (the app's duplicates view and a query at once)
    turns it down, the last one out restores it.
    """

    _lock = threading.Lock()
    _users = 0
    _before = None

    def __enter__(self):
        import cv2

        with self._lock:
            if type(self)._users == 0:
                type(self)._before = cv2.getNumThreads()
                cv2.setNumThreads(1)
            type(self)._users += 1

    def __exit__(self, *exc):
        import cv2

        with self._lock:
            type(self)._users -= 1
            if type(self)._users == 0:
                cv2.setNumThreads(type(self)._before)


def _group(root: Path, members: list[_Photo], known: dict | None = None) -> DuplicateGroup:
    """A verified group: its keeper first, the others by path, and how each differs from the keeper.

    ``known``: fits already made, ``{(path, path): match or None}``."""
    readable = []
    for photo in members:  # the pixels again, held only while the group is labelled
        try:
            photo.pixels = _pixels((root / photo.path).read_bytes())
            readable.append(photo)
        except (ImageError, OSError):  # changed since it was read a moment ago: grouped, not told apart
            pass
    try:
        if readable:
            at = {p.path: i for i, p in enumerate(readable)}
            fits = {(at[a], at[b]): m for (a, b), m in (known or {}).items() if a in at and b in at}
            best, labels = _keeper(list(range(len(readable))), dict(enumerate(readable)), fits)
            keeper = readable[best]
            labels = {readable[i].path: label for i, label in labels.items()}
        else:
            keeper, labels = min(members, key=lambda p: p.rank), {}
    finally:
        for photo in members:
            photo.pixels, photo.blurred = None, {}
    others = sorted(p.path for p in members if p is not keeper)
    return DuplicateGroup([keeper.path, *others], {path: labels.get(path, "edited") for path in others})


class NearDuplicateSearch:
    """The near-duplicates of one photo among a library's, verified as :func:`near_duplicates` verifies a folder's
    (the app's per-photo approach, for a library photo or an uploaded one).

    Candidates, at most :data:`QUERY_CNN_CANDIDATES` + 2 x :data:`QUERY_HASH_CANDIDATES` a query: its nearest
    library photos by CNN vector, and by the library's stored pHash of the query and of its mirror image. Each is
    read and verified by keypoints and a similarity fit, the mirror tried too; an answer is a verified copy with
    how it differs from the query ("cropped, mirrored"). ``hashes``: ``(rows, bits)`` of the library photos that
    still have a pHash, when some cannot be read any more (default: the library's, every row).
    """

    kind = "cnn"  # what an uploaded query is described by (besides its pixels)

    def __init__(self, library, hashes: tuple | None = None, *, n_jobs: int = -1):
        self.library = library
        self.cnn = Neighbors("cosine").fit(library.vectors("cnn"))
        rows, bits = (np.arange(len(library)), library.vectors("phash")) if hashes is None else hashes
        self.hash_rows = np.asarray(rows, np.int64)
        self.hashes = Neighbors("hamming").fit(np.asarray(bits, np.float32)) if len(self.hash_rows) else None
        self.workers = (os.cpu_count() or 1) if n_jobs in (-1, None) else max(1, int(n_jobs))

    def of_photo(self, row: int, n: int = 5) -> tuple[list[dict], dict[str, str]]:
        """The verified copies of library photo ``row`` (never itself), and the candidates unreadable with why."""
        path = self.library.paths[row]
        file = self.library.root / path
        data = file.read_bytes()
        return self.of_data(data, self.library.vectors("cnn")[row], n, path=path, modified=file.stat().st_mtime)

    def of_data(self, data: bytes, vector: np.ndarray | None, n: int = 5, *, path: str | None = None,
                modified: float | None = None) -> tuple[list[dict], dict[str, str]]:
        """The verified copies of a photo given as its bytes and CNN vector (an upload; ``path``: a library photo
        left out of its own answer): ``[{"row", "path", "distance", "relation"}]`` closest by CNN vector first."""
        query = _describe(data, path or "query", time.time() if modified is None else modified, keep_pixels=True)
        rows = [r for r in self._candidates(data, vector) if self.library.paths[r] != path]
        root, paths = self.library.root, self.library.paths

        def check(row):
            file = root / paths[row]
            try:
                candidate = file.read_bytes()
                # the query is the one mirrored: its candidates' own keypoints are enough
                photo = _describe(candidate, paths[row], file.stat().st_mtime, keep_pixels=True, mirror=False)
            except (ImageError, OSError) as exc:
                return row, None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            match = _verify(query, photo, both=True)
            if match is None:
                return row, None, None
            return row, _relation(photo, query, _reverse(match, query, photo)), None

        with _one_thread_each(), ThreadPoolExecutor(max(1, min(self.workers, len(rows)))) as pool:
            checked = list(pool.map(check, rows))
        left_out = {paths[row]: why for row, _, why in checked if why}
        found = [(row, relation) for row, relation, _ in checked if relation]
        if found and vector is not None and np.isfinite(vector).all():
            unit = np.asarray(vector, np.float32) / max(float(np.linalg.norm(vector)), 1e-12)
            matrix = self.library.vectors("cnn")[[row for row, _ in found]]
            distance = 1 - matrix @ unit / np.maximum(np.linalg.norm(matrix, axis=1), 1e-12)
        else:
            distance = np.zeros(len(found))
        answers = [{"row": int(row), "path": paths[row], "distance": float(d), "relation": relation}
                   for (row, relation), d in zip(found, distance)]
        return sorted(answers, key=lambda a: (a["distance"], a["path"]))[:n], left_out

    def _candidates(self, data: bytes, vector: np.ndarray | None) -> list[int]:
        """Library rows worth verifying for a query, the CNN's nearest first, each once."""
        rows = []
        if vector is not None and np.isfinite(vector).all():
            _, found = self.cnn.kneighbors(np.asarray(vector, np.float32)[None], QUERY_CNN_CANDIDATES + 1)
            rows += found[0].tolist()  # + 1: a library photo finds itself, left out by the caller
        if self.hashes is not None:
            # Described as the library's pHash was (its decode size), and mirrored: a mirror image's own hash is
            # another photo's.
            small = load_image(data, get_kind("phash").decode_size)[0]
            bits = np.stack([perceptual_hash(small), perceptual_hash(np.ascontiguousarray(small[:, ::-1]))])
            _, found = self.hashes.kneighbors(bits, QUERY_HASH_CANDIDATES + 1)
            rows += self.hash_rows[found.ravel()].tolist()
        return list(dict.fromkeys(rows))


def _hash_groups(root: Path, paths: list[str], max_distance: int, kind: str, n_jobs: int):
    described = describe_many(root, paths, (kind,), n_jobs)
    keep = [i for i, v in enumerate(described) if v is not None]
    left_out = {paths[i]: "unreadable" for i, v in enumerate(described) if v is None}
    if len(keep) < 2:
        return [], left_out
    bits = np.stack([described[i][0] for i in keep])
    groups = duplicate_groups(bits, max_distance, [paths[i] for i in keep])
    relation = f"{kind} within {max_distance} bits"
    return [DuplicateGroup([paths[keep[i]] for i in g], {paths[keep[i]]: relation for i in g[1:]})
            for g in groups], left_out


def find_duplicates(images_dir: str | os.PathLike, max_distance: int | None = None, kind: str | None = None, *,
                    library=None, cnn: bool = True, n_jobs: int = -1, left_out: dict | None = None,
                    timings: dict | None = None) -> list[DuplicateGroup]:
    """Groups of near-duplicate images under ``images_dir`` (paths relative to it), largest first.

    Verified by local features (see the module's docstring) unless ``max_distance`` or ``kind`` asks for the pure
    perceptual-hash answer. ``library``: a Library (or its features file) of this folder whose CNN vectors give
    the candidates; None embeds the folder first, ``cnn=False`` uses hash candidates only. ``left_out``, when
    given, is filled with the unreadable paths and why; ``timings`` with the seconds of each step.
    """
    root = Path(images_dir)
    started = time.perf_counter()
    if not root.is_dir():
        raise MissingError(f"images folder {images_dir} does not exist or is not a folder")
    paths = scan_images(root)["path"].tolist()
    if max_distance is not None or kind is not None:
        kind = check_choice("hash for duplicates", kind or "phash", HASH_KINDS)
        groups, gone = _hash_groups(root, paths, DUPLICATE_BITS if max_distance is None else max_distance, kind,
                                    n_jobs)
    else:
        vectors = _library_vectors(root, paths, library) if cnn and len(paths) > 1 else None
        if timings is not None:
            timings["vectors"] = time.perf_counter() - started  # scanning the folder and reading the library
        groups, gone = near_duplicates(root, paths, vectors, n_jobs=n_jobs, timings=timings)
    if left_out is not None:
        left_out.update(gone)
    return groups


def write_duplicates(images_dir: str | os.PathLike, out: str | os.PathLike, max_distance: int | None = None,
                     kind: str | None = None, *, library=None, left_out: dict | None = None
                     ) -> list[DuplicateGroup]:
    """:func:`find_duplicates`, written to ``out/duplicates.csv`` (group, path, keep, relation) with one picture
    per group (``group_0000.png``: the members side by side, each captioned keep or how it differs)."""
    groups = find_duplicates(images_dir, max_distance, kind, library=library, left_out=left_out)
    out = Path(out)
    rows = [(i, path, path == group.keeper, group.relation.get(path, "kept"))
            for i, group in enumerate(groups) for path in group]
    write_csv(out / "duplicates.csv", pd.DataFrame(rows, columns=["group", "path", "keep", "relation"]))
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        # PNG at zlib level 1: the default level takes 40 ms a picture, longer than drawing it
        list(pool.map(lambda item: _picture(Path(images_dir), item[1]).save(out / f"group_{item[0]:04d}.png",
                                                                             compress_level=1),
                      enumerate(groups)))
    return groups


PICTURE_SIDE = 160  # px of a member's thumbnail in a group's picture


def _picture(root: Path, group: DuplicateGroup) -> Image.Image:
    """The group's members side by side, each with its caption (drawn with Pillow: a few ms, where a plot of
    each group took a quarter of a second, longer than finding it)."""
    from PIL import ImageDraw

    line = 14
    captions = [["keep", path] if i == 0 else [group.relation.get(path, ""), path] for i, path in enumerate(group)]
    sheet = Image.new("RGB", (len(group) * (PICTURE_SIDE + 8) + 8, PICTURE_SIDE + 16 + 2 * line), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (path, caption) in enumerate(zip(group, captions)):
        x = 8 + i * (PICTURE_SIDE + 8)
        try:
            thumb = Image.fromarray(load_image(root / path, PICTURE_SIDE, keep_aspect=True)[0])
            sheet.paste(thumb, (x + (PICTURE_SIDE - thumb.width) // 2, 8 + (PICTURE_SIDE - thumb.height) // 2))
        except (ImageError, OSError):  # gone since it was grouped: its place stays empty, its caption says so
            caption = ["unreadable", path]
        for k, text in enumerate(caption):
            width = draw.textlength(text)
            if width > PICTURE_SIDE:  # cut to the thumbnail's width (characters of about one width)
                text = text[:max(1, int(len(text) * PICTURE_SIDE / width) - 1)] + "…"
            draw.text((x, 12 + PICTURE_SIDE + k * line), text, fill=(0, 0, 0) if k == 0 else (90, 90, 90))
    return sheet
