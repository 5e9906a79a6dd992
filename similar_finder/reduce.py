"""PCA reduction of a feature set: smaller vectors and faster search for a little precision.

``fit_pca(matrix, n_components)`` fits scikit-learn's PCA and reports the
variance kept; a library's own PCA is :meth:`Library.pca` (cached beside it).
"""
from __future__ import annotations

import numpy as np

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
