"""Hand-made descriptors beside the CNN: colour histograms and perceptual hashes.

``describe(file, kind)`` describes one image; ``library_descriptors(library, kind)``
describes every image of a feature library in parallel (joblib), cached in
``features.<kind>.csv`` and recomputed only for new or changed photos
(``library_descriptor_sets`` does several kinds from one decode of each photo);
``find_duplicates(images_dir)`` groups near-identical images by perceptual hash
(command line: ``python -m similar_finder.duplicates IMAGES_DIR``).

* ``color``: a normalised 3-D RGB histogram (8 x 8 x 8 bins by default), compared
  with the chi-square distance; finds photos with the same palette.
* ``ahash``, ``dhash``, ``phash``: average, difference and perceptual (DCT)
  hashes from the ``imagehash`` library, 64 bits each, compared with the Hamming
  distance; finds resized, recompressed or lightly edited copies.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import DEFAULT_FEATURES, atomic_write
from .images import ImageError, load_image

KINDS = ("color", "ahash", "dhash", "phash")
METRIC_OF = {"color": "chi2", "ahash": "hamming", "dhash": "hamming", "phash": "hamming"}
COLOR_BINS = 8
HASH_SIZE = 8
_DECODE_SIZE = 128  # neither a histogram nor a 64-bit hash needs more pixels


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown descriptor {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def color_histogram(pixels: np.ndarray, bins: int = COLOR_BINS) -> np.ndarray:
    """Share of the pixels in each of ``bins**3`` RGB cells (sums to 1)."""
    cells = (np.asarray(pixels, np.uint16) * bins) >> 8
    index = (cells[..., 0] * bins + cells[..., 1]) * bins + cells[..., 2]
    counts = np.bincount(index.ravel(), minlength=bins ** 3).astype(np.float32)
    return counts / counts.sum()


def perceptual_hash(pixels: np.ndarray, kind: str = "phash", hash_size: int = HASH_SIZE) -> np.ndarray:
    """The hash's bits as a 0/1 float vector (Hamming distance = differing bits)."""
    import imagehash
    from PIL import Image

    function = {"ahash": imagehash.average_hash, "dhash": imagehash.dhash, "phash": imagehash.phash}[kind]
    return function(Image.fromarray(pixels), hash_size=hash_size).hash.ravel().astype(np.float32)


def _describe_pixels(pixels: np.ndarray, kind: str) -> np.ndarray:
    return color_histogram(pixels) if kind == "color" else perceptual_hash(pixels, kind)


def describe(file: str | os.PathLike, kind: str) -> np.ndarray:
    """The ``kind`` descriptor of one image file; raises ImageError for a bad file."""
    _check_kind(kind)
    pixels, _ = load_image(Path(file), _DECODE_SIZE)
    return _describe_pixels(pixels, kind)


def _describe_or_none(file, kinds):
    try:
        pixels, _ = load_image(Path(file), _DECODE_SIZE)
    except ImageError:
        return None
    return [_describe_pixels(pixels, kind) for kind in kinds]


def describe_many(root: Path, paths: list[str], kinds, n_jobs: int = -1) -> list[list[np.ndarray] | None]:
    """For each file, its descriptors of every kind in ``kinds`` from one decode; None if it cannot be decoded.

    Runs in parallel processes.
    """
    from joblib import Parallel, delayed

    kinds = [_check_kind(k) for k in kinds]
    if len(paths) < 64:  # starting worker processes costs more than a few dozen images
        return [_describe_or_none(root / p, kinds) for p in paths]
    return Parallel(n_jobs=n_jobs, batch_size=32)(delayed(_describe_or_none)(root / p, kinds) for p in paths)


def library_descriptors(library: str | os.PathLike = DEFAULT_FEATURES, kind: str = "color", *,
                        n_jobs: int = -1) -> tuple[list[str], np.ndarray, dict]:
    """``(paths, matrix, meta)`` of the ``kind`` descriptor for every image of a feature library.

    Rows follow the library's CSV. Results are cached beside it in
    ``<stem>.<kind>.csv`` (path, sha256, d0...) and reused while a photo's
    content hash is unchanged.
    """
    paths, matrices, meta = library_descriptor_sets(library, (kind,), n_jobs=n_jobs)
    return paths, matrices[kind], meta


def library_descriptor_sets(library: str | os.PathLike = DEFAULT_FEATURES, kinds=KINDS, *,
                            n_jobs: int = -1) -> tuple[list[str], dict[str, np.ndarray], dict]:
    """Like :func:`library_descriptors` for several kinds, decoding each missing photo once."""
    from .features import FeatureFiles, _read_audit, load_features

    kinds = [_check_kind(k) for k in kinds]
    files = FeatureFiles(Path(library))
    paths, _, meta = load_features(files.csv)
    audit = _read_audit(files.audit).set_index("path")["sha256"] if files.audit.is_file() else pd.Series(dtype=str)
    keys = list(zip(paths, [audit.get(p, "") for p in paths]))
    caches = {kind: _read_cache(files.csv.with_suffix(f".{kind}.csv")) for kind in kinds}
    todo = [i for i, key in enumerate(keys) if not key[1] or any(key not in caches[k] for k in kinds)]
    if todo:
        root = Path(meta["images_root"])
        for i, vectors in zip(todo, describe_many(root, [paths[i] for i in todo], kinds, n_jobs)):
            if vectors is None:
                raise ImageError(f"{paths[i]} can no longer be decoded; run the extraction again to refresh the library")
            for kind, vector in zip(kinds, vectors):
                caches[kind][keys[i]] = vector
    matrices = {}
    for kind in kinds:
        matrices[kind] = np.stack([caches[kind][key] for key in keys])
        if todo or len(caches[kind]) != len(keys):
            _write_cache(files.csv.with_suffix(f".{kind}.csv"), keys, matrices[kind])
    return paths, matrices, meta


def _read_cache(path: Path) -> dict:
    if not path.is_file():
        return {}
    frame = pd.read_csv(path, dtype={"path": str, "sha256": str}, keep_default_na=False)
    return dict(zip(zip(frame["path"], frame["sha256"]), frame.iloc[:, 2:].to_numpy(np.float32)))


def _write_cache(path: Path, keys, matrix: np.ndarray) -> None:
    frame = pd.DataFrame(matrix, columns=[f"d{i}" for i in range(matrix.shape[1])])
    frame.insert(0, "sha256", [sha for _, sha in keys])
    frame.insert(0, "path", [p for p, _ in keys])
    with atomic_write(path, newline="") as handle:
        frame.to_csv(handle, index=False, float_format="%.9g")


def hamming_distances(bits_a: np.ndarray, bits_b: np.ndarray) -> np.ndarray:
    """Differing bits between 0/1 vectors, as matrix products (exact in float32)."""
    a = np.atleast_2d(np.asarray(bits_a, np.float32))
    b = np.atleast_2d(np.asarray(bits_b, np.float32))
    return a @ (1.0 - b).T + (1.0 - a) @ b.T


def find_duplicates(images_dir: str | os.PathLike, max_distance: int = 6, kind: str = "phash", *,
                    n_jobs: int = -1) -> list[list[str]]:
    """Groups of near-identical images under ``images_dir`` (paths relative to it), largest first.

    Two images are linked when their hashes differ in at most ``max_distance``
    of 64 bits; groups are the connected components of those links, so a chain
    of near-copies forms one group.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from .features import scan_images

    if kind not in ("ahash", "dhash", "phash"):
        raise ValueError(f"duplicates are found with a hash: ahash, dhash or phash, not {kind!r}")
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"images folder {images_dir} does not exist or is not a folder")
    paths = scan_images(root)["path"].tolist()
    described = describe_many(root, paths, (kind,), n_jobs)
    keep = [i for i, v in enumerate(described) if v is not None]
    paths = [paths[i] for i in keep]
    if len(paths) < 2:
        return []
    bits = np.stack([described[i][0] for i in keep])
    rows, cols = [], []
    for start in range(0, len(bits), 2048):
        block = hamming_distances(bits[start:start + 2048], bits)
        r, c = np.nonzero(block <= max_distance)
        mask = r + start < c
        rows.append(r[mask] + start)
        cols.append(c[mask])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(paths), len(paths)))
    _, component = connected_components(graph, directed=False)
    groups = pd.Series(paths).groupby(component).agg(list)
    groups = [sorted(g) for g in groups if len(g) > 1]
    return sorted(groups, key=lambda g: (-len(g), g[0]))
