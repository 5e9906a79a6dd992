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


def phash_and_mirror(grey: np.ndarray, hash_size: int = HASH_SIZE) -> np.ndarray:
    """The perceptual hash (as :func:`perceptual_hash` computes it: DCT of a 32 x 32 grey thumbnail, low
    frequencies above their median) of a grey picture and of its mirror image, from one thumbnail: 2 rows of bits.

    About 20 times faster than two ``imagehash`` calls (no PIL image, one resize); a thumbnail resized with another
    filter than ``imagehash``'s, so its bits are compared with hashes made by this function only.
    """
    import cv2
    from scipy.fft import dct

    side = hash_size * 4
    small = cv2.resize(np.asarray(grey, np.uint8), (side, side), interpolation=cv2.INTER_AREA).astype(np.float64)
    out = []
    for view in (small, small[:, ::-1]):
        low = dct(dct(view, axis=0), axis=1)[:hash_size, :hash_size]
        out.append((low > np.median(low)).ravel())
    return np.array(out, np.float32)


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
