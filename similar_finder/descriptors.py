"""Hand-made descriptors beside the CNN: colour histograms, perceptual hashes, near-duplicates.

``describe(file, kind)`` describes one image; ``describe_many`` many, in
parallel (joblib), from one decode of each photo; ``find_duplicates(images_dir)``
groups near-identical images by perceptual hash (command line:
``similar-finder duplicates IMAGES_DIR``). A library's descriptors are computed
and cached by :meth:`Library.vectors`.

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

from .errors import MissingError, check_choice
from .images import ImageError, load_image
from .kinds import HASH_KINDS, get_kind

COLOR_BINS = 8
HASH_SIZE = 8


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


def _pixel_kind(kind: str):
    return get_kind(check_choice("per-photo descriptor", kind, ("color", *HASH_KINDS, "pixels")))


def describe(file: str | os.PathLike, kind: str) -> np.ndarray:
    """The ``kind`` descriptor of one image file; raises ImageError for a bad file."""
    spec = _pixel_kind(kind)
    return spec.from_pixels(load_image(Path(file), spec.decode_size)[0])


def _describe_or_none(file, kinds):
    try:
        decoded = {}
        for spec in kinds:
            if spec.decode_size not in decoded:
                decoded[spec.decode_size] = load_image(Path(file), spec.decode_size)[0]
    except (ImageError, OSError):  # gone or damaged since extraction: the caller says what to do
        return None
    return [spec.from_pixels(decoded[spec.decode_size]) for spec in kinds]


def describe_many(root: Path, paths: list[str], kinds, n_jobs: int = -1) -> list[list[np.ndarray] | None]:
    """For each file, its descriptors of every kind in ``kinds``; None if it cannot be decoded.

    Each photo is decoded once per decode size; runs in parallel processes.
    """
    from joblib import Parallel, delayed

    specs = [_pixel_kind(k) for k in kinds]
    if len(paths) < 64:  # starting worker processes costs more than a few dozen images
        return [_describe_or_none(root / p, specs) for p in paths]
    return Parallel(n_jobs=n_jobs, batch_size=32)(delayed(_describe_or_none)(root / p, specs) for p in paths)


def find_duplicates(images_dir: str | os.PathLike, max_distance: int = 6, kind: str = "phash", *,
                    n_jobs: int = -1) -> list[list[str]]:
    """Groups of near-identical images under ``images_dir`` (paths relative to it), largest first.

    Two images are linked when their hashes differ in at most ``max_distance``
    of 64 bits; groups are the connected components of those links, so a chain
    of near-copies forms one group.
    """
    from .features import scan_images

    check_choice("hash for duplicates", kind, HASH_KINDS)
    root = Path(images_dir)
    if not root.is_dir():
        raise MissingError(f"images folder {images_dir} does not exist or is not a folder")
    paths = scan_images(root)["path"].tolist()
    described = describe_many(root, paths, (kind,), n_jobs)
    keep = [i for i, v in enumerate(described) if v is not None]
    if len(keep) < 2:
        return []
    bits = np.stack([described[i][0] for i in keep])
    return [[paths[keep[i]] for i in group] for group in duplicate_groups(bits, max_distance, [paths[i] for i in keep])]


def duplicate_groups(bits: np.ndarray, max_distance: int = 6, names=None) -> list[list[int]]:
    """Rows of ``bits`` (one hash per photo) in groups of near-copies, largest first.

    Two rows are linked when they differ in at most ``max_distance`` bits; groups
    are the connected components of those links, so a chain of near-copies forms
    one group. Rows in a group, and ties between groups, follow ``names``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from .neighbors import Neighbors

    n = len(bits)
    if n < 2:
        return []
    names = list(range(n)) if names is None else list(names)
    rows, cols, _ = Neighbors("hamming").fit(bits).pairs_within(max_distance)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    groups = [sorted(g, key=names.__getitem__) for g in pd.Series(range(n)).groupby(component).agg(list)
              if len(g) > 1]
    return sorted(groups, key=lambda g: (-len(g), names[g[0]]))


def write_duplicates(images_dir: str | os.PathLike, out: str | os.PathLike, max_distance: int = 6,
                     kind: str = "phash") -> list[list[str]]:
    """:func:`find_duplicates`, written to ``out/duplicates.csv`` (group, path) with one picture per group."""
    from ._io import write_csv
    from .plots import image_rows, save_figure

    groups = find_duplicates(images_dir, max_distance, kind)
    out = Path(out)
    rows = [(i, path) for i, group in enumerate(groups) for path in group]
    write_csv(out / "duplicates.csv", pd.DataFrame(rows, columns=["group", "path"]))
    for i, group in enumerate(groups):
        save_figure(image_rows({f"group {i}": group}, images_dir, per_row=max(2, len(group))),
                    out / f"group_{i:04d}.png")
    return groups
