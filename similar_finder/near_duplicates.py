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
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ._io import write_csv
from .descriptors import DUPLICATE_BITS, HASH_KINDS, duplicate_groups, perceptual_hash
from .errors import MissingError, check_choice
from .features import extract_features
from .images import ImageError, load_image, scan_images
from .kinds import describe_many
from .library import Library, as_library
from .neighbors import Neighbors

FIT_SIDE = 256          # px of the longer side keypoints are found at: copies of any size meet at one scale
ORB_FEATURES = 300      # keypoints a photo (and as many for its mirror): ~24 kB a photo, 2.4 GB at 100k
FAST_THRESHOLD = 10     # corner contrast of a keypoint (OpenCV: 20): lower, so blurred or low-contrast copies keep some
CNN_CANDIDATES = 4      # nearest neighbours by CNN vector verified per photo (caps the verification work)
HASH_CANDIDATES = 2     # and by perceptual hash, of the photo and of its mirror
RATIO = 0.8             # Lowe's ratio test: a match counts when clearly better than the second best
RANSAC_PX = 5.0         # reprojection error (px at FIT_SIDE) of a match that agrees with the fit
MIN_INLIERS = 12        # agreeing matches that make a copy (tuned on clothing seed 0, see bench/duplicates_bench.py)
MIN_SPREAD = 0.12       # share of each side the agreeing keypoints must span: a shared caption or logo is no copy
SCALE_RANGE = (0.4, 2.5)  # a fit outside it is a coincidence, not a copy (a crop to 40% is another photo)
CROPPED_BELOW = 0.9     # share of the kept photo a copy still covers below which it is called cropped
ROTATED_ABOVE = 1.5     # degrees of tilt from which a copy is called rotated
SAME_LOOK_BELOW = 3.5   # mean difference (of 255, both blurred) of an aligned copy still only resized/recompressed
BLURRED_BELOW = 0.5     # share of the kept photo's fine detail (Laplacian variance) under which a copy was blurred
RELATIONS = ("same file", "same pixels", "mirrored", "rotated", "cropped", "resized", "recompressed", "edited")


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
    width: int
    height: int
    size: int                      # bytes on disk
    modified: float                # mtime
    quantization: float            # mean JPEG quantisation step (0 for lossless): lower is less compressed
    sha256: str
    bits: np.ndarray               # pHash of the photo and of its mirror image
    pixels: np.ndarray | None = field(repr=False)  # RGB, longer side FIT_SIDE: kept only to label a group
    views: tuple = field(repr=False)   # (points, descriptors) of the photo and of its mirror

    @property
    def rank(self) -> tuple:
        """Which member to keep: most pixels, then least compressed, then (a tie, as a mirrored or retouched copy
        saved alike is) the older file, the one the others were made from, then the largest."""
        return (self.width * self.height, -self.quantization, -self.modified, self.size)


@dataclass
class _Match:
    inliers: int
    mirrored: bool
    transform: np.ndarray          # 2x3: points of the first photo (mirrored when ``mirrored``) into the second


def _read(root: Path, path: str, keep_pixels: bool = False) -> _Photo:
    import cv2  # opencv: only when duplicates are verified

    file = root / path
    data = file.read_bytes()
    pixels, _ = load_image(data, FIT_SIDE, keep_aspect=True)
    with Image.open(file) as img:  # header only: the true size and how hard a JPEG was compressed
        width, height = img.size
        tables = getattr(img, "quantization", None) or {}
    quantization = float(np.mean([np.mean(t) for t in tables.values()])) if tables else 0.0
    grey = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    orb = cv2.ORB_create(nfeatures=ORB_FEATURES, fastThreshold=FAST_THRESHOLD)
    views = []
    for view in (grey, np.ascontiguousarray(grey[:, ::-1])):
        points, descriptors = orb.detectAndCompute(view, None)
        views.append((np.float32([p.pt for p in points]).reshape(-1, 2), descriptors))
    bits = np.stack([perceptual_hash(pixels), perceptual_hash(np.ascontiguousarray(pixels[:, ::-1]))])
    return _Photo(path, width, height, len(data), file.stat().st_mtime, quantization, hashlib.sha256(data).hexdigest(),
                  bits, pixels if keep_pixels else None,
                  tuple(views))


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


def _verify(a: _Photo, b: _Photo) -> _Match | None:
    """Whether ``a`` (as it is, or mirrored) is a copy of ``b``, by agreeing keypoint matches."""
    best = None
    for mirrored in (False, True):
        inliers, transform = _fit(a.views[int(mirrored)], b.views[0])
        if inliers >= MIN_INLIERS and (best is None or inliers > best.inliers):
            best = _Match(inliers, mirrored, transform)
        if best is not None and not mirrored:
            break  # the photo as it is matched: its mirror need not be tried
    return best


def _relation(copy: _Photo, keep: _Photo, match: _Match | None) -> str:
    """How ``copy`` differs from ``keep`` (one of :data:`RELATIONS`)."""
    import cv2

    if copy.sha256 == keep.sha256:
        return "same file"
    if match is None:
        return "edited"  # linked through another member only
    if (copy.width, copy.height) == (keep.width, keep.height) and np.array_equal(copy.pixels, keep.pixels):
        return "same pixels"
    if match.mirrored:
        return "mirrored"
    t = match.transform
    if abs(math.degrees(math.atan2(t[1, 0], t[0, 0]))) > ROTATED_ABOVE:
        return "rotated"
    h, w = copy.pixels.shape[:2]
    corners = cv2.transform(np.float32([[0, 0], [w, 0], [w, h], [0, h]]).reshape(-1, 1, 2), t).reshape(-1, 2)
    kh, kw = keep.pixels.shape[:2]
    frame = np.float32([[0, 0], [kw, 0], [kw, kh], [0, kh]])
    covered, _ = cv2.intersectConvexConvex(corners, frame)
    if covered / (kw * kh) < CROPPED_BELOW:
        return "cropped"
    aligned = cv2.warpAffine(copy.pixels, t, (kw, kh)).astype(np.float32)
    inside = cv2.warpAffine(np.ones((h, w), np.uint8), t, (kw, kh)) > 0
    # Compared blurred by ~2 px of the smaller photo: JPEG blocks and resampling vanish, a new brightness, contrast
    # or caption stays.
    sigma = 2.0 * FIT_SIDE / min(max(copy.width, copy.height), max(keep.width, keep.height), FIT_SIDE)
    difference = np.abs(cv2.GaussianBlur(aligned, (0, 0), sigma)
                        - cv2.GaussianBlur(keep.pixels.astype(np.float32), (0, 0), sigma))[inside].mean()
    grey_copy = np.ptp(copy.pixels.astype(np.int16), axis=2).mean() < 3 <= np.ptp(keep.pixels.astype(np.int16),
                                                                                    axis=2).mean()
    if grey_copy or difference > SAME_LOOK_BELOW:
        return "edited"
    if (copy.width, copy.height) != (keep.width, keep.height):
        return "resized"
    # At the same size, a copy that lost most of its fine detail was blurred, not only recompressed.
    sharpness = [cv2.Laplacian(cv2.cvtColor(p, cv2.COLOR_RGB2GRAY), cv2.CV_32F)[inside].var()
                 for p in (aligned.clip(0, 255).astype(np.uint8), keep.pixels)]
    return "edited" if sharpness[0] < BLURRED_BELOW * sharpness[1] else "recompressed"


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
                    n_jobs: int = -1) -> tuple[list[DuplicateGroup], dict[str, str]]:
    """Verified groups among ``paths`` (relative to ``root``), largest first, and the unreadable paths with why.

    ``vectors``: CNN vectors row for row with ``paths`` (NaN rows for photos without one), or None for hash
    candidates only (which miss most crops and tilts).
    """
    root = Path(root)
    workers = os.cpu_count() if n_jobs in (-1, None) else max(1, int(n_jobs))

    def read(path, keep_pixels=False):
        try:
            return _read(root, path, keep_pixels)
        except (ImageError, OSError) as exc:
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    with ThreadPoolExecutor(workers) as pool:  # ORB and the decoders release the GIL
        read_all = list(pool.map(read, paths))
    left_out = {p: r for p, r in zip(paths, read_all) if isinstance(r, str)}
    keep = [i for i, r in enumerate(read_all) if not isinstance(r, str)]
    photos = [read_all[i] for i in keep]
    if len(photos) < 2:
        return [], left_out
    vectors = None if vectors is None else np.asarray(vectors, np.float32)[keep]
    pairs = sorted(_candidates(photos, vectors))
    with ThreadPoolExecutor(workers) as pool:
        matches = dict(zip(pairs, pool.map(lambda p: _verify(photos[p[0]], photos[p[1]]), pairs)))
    linked = [pair for pair, match in matches.items() if match is not None]
    groups = []
    for members in _components(len(photos), linked):
        best = max(members, key=lambda i: photos[i].rank)
        # Read again with their pixels (which 100k photos would not hold in memory) to be told apart.
        full = {i: read(photos[i].path, keep_pixels=True) for i in members}
        relation = {}
        for i in members:
            if i == best:
                continue
            if isinstance(full[i], str) or isinstance(full[best], str):  # changed since it was read a moment ago
                relation[photos[i].path] = "edited"
            else:  # verified again in the direction copy -> kept, which the labels read
                relation[photos[i].path] = _relation(full[i], full[best], _verify(full[i], full[best]))
        order = [best] + sorted((i for i in members if i != best), key=lambda i: photos[i].path)
        groups.append(DuplicateGroup([photos[i].path for i in order], relation))
    groups.sort(key=lambda g: (-len(g), g[0]))
    return groups, left_out


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
                    library=None, cnn: bool = True, n_jobs: int = -1, left_out: dict | None = None
                    ) -> list[DuplicateGroup]:
    """Groups of near-duplicate images under ``images_dir`` (paths relative to it), largest first.

    Verified by local features (see the module's docstring) unless ``max_distance`` or ``kind`` asks for the pure
    perceptual-hash answer. ``library``: a Library (or its features file) of this folder whose CNN vectors give
    the candidates; None embeds the folder first, ``cnn=False`` uses hash candidates only. ``left_out``, when
    given, is filled with the unreadable paths and why.
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise MissingError(f"images folder {images_dir} does not exist or is not a folder")
    paths = scan_images(root)["path"].tolist()
    if max_distance is not None or kind is not None:
        kind = check_choice("hash for duplicates", kind or "phash", HASH_KINDS)
        groups, gone = _hash_groups(root, paths, DUPLICATE_BITS if max_distance is None else max_distance, kind,
                                    n_jobs)
    else:
        vectors = _library_vectors(root, paths, library) if cnn and len(paths) > 1 else None
        groups, gone = near_duplicates(root, paths, vectors, n_jobs=n_jobs)
    if left_out is not None:
        left_out.update(gone)
    return groups


def write_duplicates(images_dir: str | os.PathLike, out: str | os.PathLike, max_distance: int | None = None,
                     kind: str | None = None, *, library=None, left_out: dict | None = None
                     ) -> list[DuplicateGroup]:
    """:func:`find_duplicates`, written to ``out/duplicates.csv`` (group, path, keep, relation) with one picture
    per group."""
    from .plots import image_rows, save_figure  # matplotlib: only when pictures are drawn

    groups = find_duplicates(images_dir, max_distance, kind, library=library, left_out=left_out)
    out = Path(out)
    rows = [(i, path, path == group.keeper, group.relation.get(path, "kept"))
            for i, group in enumerate(groups) for path in group]
    write_csv(out / "duplicates.csv", pd.DataFrame(rows, columns=["group", "path", "keep", "relation"]))
    for i, group in enumerate(groups):
        save_figure(image_rows({f"group {i}": list(group)}, images_dir, per_row=max(2, len(group))),
                    out / f"group_{i:04d}.png")
    return groups
