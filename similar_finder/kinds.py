"""The one registry of feature kinds: what can be compared, with which metric, under which name.

``cnn`` is the backbone's vector; ``pca`` its PCA reduction; ``color``,
``ahash``, ``dhash``, ``phash`` and ``pixels`` are computed from each photo's
pixels (``from_pixels``): :func:`describe` one file, :func:`describe_many` many.
:meth:`Library.vectors` computes and caches any of them; :meth:`Library.describer`
describes a new photo the same way.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .descriptors import HASH_KINDS, color_histogram, perceptual_hash
from .errors import check_choice
from .images import ImageError, load_image


def _raw_pixels(pixels: np.ndarray) -> np.ndarray:
    return pixels.reshape(-1).astype(np.float32)


def _hash(kind):
    return functools.partial(perceptual_hash, kind=kind)


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
    FeatureKind("color", "chi2", "colour histogram, chi2", color_histogram),
    FeatureKind("ahash", "hamming", "average hash, hamming", _hash("ahash")),
    FeatureKind("dhash", "hamming", "difference hash, hamming", _hash("dhash")),
    FeatureKind("phash", "hamming", "perceptual hash, hamming", _hash("phash")),
    # The baseline any learnt feature must beat: 32 x 32 RGB thumbnails, 3072 values.
    FeatureKind("pixels", "cosine", "raw pixels, cosine", _raw_pixels, decode_size=32),
)}


def get_kind(name: str) -> FeatureKind:
    """The registered kind called ``name``; a clear error listing the kinds otherwise."""
    return KINDS[check_choice("feature kind", name, KINDS)]


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
    from joblib import Parallel, delayed  # starts worker processes: only when there are many photos

    specs = [_pixel_kind(k) for k in kinds]
    if len(paths) < 64:  # starting worker processes costs more than a few dozen images
        return [_describe_or_none(root / p, specs) for p in paths]
    return Parallel(n_jobs=n_jobs, batch_size=32)(delayed(_describe_or_none)(root / p, specs) for p in paths)
