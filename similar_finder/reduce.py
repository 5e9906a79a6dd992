"""PCA reduction of a feature set: smaller vectors and faster search for a little precision.

``fit_pca(matrix, n_components)`` fits scikit-learn's PCA and reports the
variance kept; ``library_pca(library, n_components)`` reduces a feature
library, caching the fitted PCA beside the CSV (``<stem>.pca<n>.joblib``) while
the features are unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path

import joblib
import numpy as np

from ._io import DEFAULT_FEATURES, atomic_write

DEFAULT_COMPONENTS = 128


def fit_pca(matrix: np.ndarray, n_components: int | float = DEFAULT_COMPONENTS, *, random_state: int = 0):
    """A fitted ``sklearn.decomposition.PCA``; ``n_components`` is capped by the data's size.

    A float in (0, 1) keeps as many components as that share of the variance needs.
    """
    from sklearn.decomposition import PCA

    matrix = np.asarray(matrix, np.float32)
    if isinstance(n_components, int):
        n_components = min(n_components, *matrix.shape)
    pca = PCA(n_components, random_state=random_state).fit(matrix)
    pca.variance_kept_ = float(pca.explained_variance_ratio_.sum())
    return pca


def library_pca(library: str | os.PathLike = DEFAULT_FEATURES, n_components: int = DEFAULT_COMPONENTS):
    """``(paths, reduced matrix, meta, pca)`` for a feature library."""
    from .features import load_features

    csv = Path(library)
    paths, matrix, meta = load_features(csv)
    cache = csv.with_suffix(f".pca{n_components}.joblib")
    stamp = list(meta.get("csv_stat", []))
    pca = None
    if cache.is_file() and stamp:
        held = joblib.load(cache)
        if held.get("csv_stat") == stamp:
            pca = held["pca"]
    if pca is None:
        pca = fit_pca(matrix, n_components)
        if stamp:
            with atomic_write(cache, "wb") as handle:
                joblib.dump({"csv_stat": stamp, "pca": pca}, handle)
    return paths, pca.transform(matrix).astype(np.float32), meta, pca
