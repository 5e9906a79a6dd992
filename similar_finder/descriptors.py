"""Hand-made descriptors beside the CNN, as pure functions of pixels: colour histograms, perceptual hashes,
and the grouping of near-identical hashes.

The kind registry (:mod:`.kinds`) names them and describes files with them;
a library's descriptors are computed and cached by :meth:`Library.vectors`.

* ``color``: a normalised 3-D RGB histogram (8 x 8 x 8 bins by default), compared
  with the chi-square distance; finds photos with the same palette.
* ``ahash``, ``dhash``, ``phash``: average, difference and perceptual (DCT)
  hashes from the ``imagehash`` library, 64 bits each, compared with the Hamming
  distance; finds resized, recompressed or lightly edited copies.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import check_choice
from .neighbors import Neighbors

COLOR_BINS = 8
HASH_SIZE = 8
HASH_KINDS = ("ahash", "dhash", "phash")
DUPLICATE_BITS = 6  # differing bits of 64 still called a copy (resized, recompressed, lightly edited)


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

    functions = {"ahash": imagehash.average_hash, "dhash": imagehash.dhash, "phash": imagehash.phash}
    function = functions[check_choice("hash", kind, HASH_KINDS)]
    return function(Image.fromarray(pixels), hash_size=hash_size).hash.ravel().astype(np.float32)


def duplicate_groups(bits: np.ndarray, max_distance: int = DUPLICATE_BITS, names=None) -> list[list[int]]:
    """Rows of ``bits`` (one hash per photo) in groups of near-copies, largest first.

    Two rows are linked when they differ in at most ``max_distance`` bits; groups
    are the connected components of those links, so a chain of near-copies forms
    one group. Rows in a group, and ties between groups, follow ``names``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

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
