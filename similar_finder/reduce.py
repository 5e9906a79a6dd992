"""Reductions of a feature set: PCA (smaller vectors, faster search) and 2-D maps (t-SNE, UMAP).

``fit_pca(matrix, n_components)`` fits scikit-learn's PCA and reports the
variance kept; a library's own PCA is :meth:`Library.pca` (cached beside it).
``tsne_embedding`` and ``umap_embedding`` place each photo on a plane, for the
maps that :mod:`.plots` draws and the app shows.
"""
from __future__ import annotations

import numpy as np

from .errors import UsageError
from .neighbors import l2_normalize

DEFAULT_COMPONENTS = 128
# Above this many photos a map is drawn from an even sample of them: t-SNE of 3,781 clothing photos took
# 15-48 s on two shared cores (scikit-learn's Barnes-Hut; openTSNE took 75 s beside its 48), and a picture
# of 3,000 points shows the same groups.
MAP_MAX = 3_000


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


def tsne_embedding(matrix: np.ndarray, *, random_state: int = 0) -> np.ndarray:
    """2-D t-SNE of the (unit-normalised) features, perplexity adapted to the library's size."""
    from sklearn.manifold import TSNE

    n = len(matrix)
    if n < 5:
        raise UsageError(f"t-SNE needs at least 5 images, got {n}")
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=random_state, metric="cosine")
    return tsne.fit_transform(l2_normalize(matrix))


def umap_embedding(matrix: np.ndarray, *, random_state: int = 0) -> np.ndarray:
    """2-D UMAP of the (unit-normalised) features (``umap-learn``), an alternative view to t-SNE."""
    import umap  # numba: seconds to import, so only when a UMAP map is drawn

    n = len(matrix)
    if n < 5:
        raise UsageError(f"UMAP needs at least 5 images, got {n}")
    reducer = umap.UMAP(n_neighbors=min(15, n - 1), metric="cosine", random_state=random_state, n_jobs=1)
    return reducer.fit_transform(l2_normalize(matrix))
