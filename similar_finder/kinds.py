"""The one registry of feature kinds: what can be compared, with which metric, under which name.

``cnn`` is the backbone's vector; ``pca`` its PCA reduction; ``color``,
``ahash``, ``dhash``, ``phash`` and ``pixels`` are computed from each photo's
pixels (``from_pixels``). :meth:`Library.vectors` computes and caches any of
them; :meth:`Library.describer` describes a new photo the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import check_choice


def _raw_pixels(pixels: np.ndarray) -> np.ndarray:
    return pixels.reshape(-1).astype(np.float32)


def _color(pixels):
    from .descriptors import color_histogram

    return color_histogram(pixels)


def _hash(kind):
    def describe(pixels):
        from .descriptors import perceptual_hash

        return perceptual_hash(pixels, kind)
    return describe


@dataclass(frozen=True)
class FeatureKind:
    name: str
    metric: str
    label: str  # as it appears in tables, titles and the evaluation
    from_pixels: Callable[[np.ndarray], np.ndarray] | None = None  # per-photo descriptors only
    decode_size: int = 128  # pixels a per-photo descriptor is computed from


KINDS: dict[str, FeatureKind] = {k.name: k for k in (
    FeatureKind("cnn", "cosine", "CNN features, cosine"),
    FeatureKind("pca", "cosine", "CNN PCA, cosine"),
    FeatureKind("color", "chi2", "colour histogram, chi2", _color),
    FeatureKind("ahash", "hamming", "average hash, hamming", _hash("ahash")),
    FeatureKind("dhash", "hamming", "difference hash, hamming", _hash("dhash")),
    FeatureKind("phash", "hamming", "perceptual hash, hamming", _hash("phash")),
    # The baseline any learnt feature must beat: 32 x 32 RGB thumbnails, 3072 values.
    FeatureKind("pixels", "cosine", "raw pixels, cosine", _raw_pixels, decode_size=32),
)}
HASH_KINDS = ("ahash", "dhash", "phash")


def get_kind(name: str) -> FeatureKind:
    """The registered kind called ``name``; a clear error listing the kinds otherwise."""
    return KINDS[check_choice("feature kind", name, KINDS)]
