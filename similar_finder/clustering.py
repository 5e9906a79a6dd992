"""The baseline: K-Means over the features, k chosen by silhouette score.

``tune_k`` scores every k of a range; ``KMeansBaseline`` (``fit`` / ``predict`` /
``save`` / ``load``) fits the chosen k; ``fit_baseline`` runs the whole step on a
features file and saves ``models/kmeans.joblib`` and ``data/clusters.csv``;
``recommend_by_cluster(file, n_sample)`` answers a query with images of its
predicted cluster. Command line: ``python -m similar_finder.cluster``.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import joblib
import numpy as np
import pandas as pd

from ._io import DATA_DIR, DEFAULT_FEATURES, MODELS_DIR, atomic_write
from .features import load_features, query_vector

DEFAULT_MODEL = MODELS_DIR / "kmeans.joblib"
DEFAULT_CLUSTERS = DATA_DIR / "clusters.csv"
DEFAULT_K_RANGE = range(2, 11)
SILHOUETTE_SAMPLE = 5_000  # above this many vectors the silhouette is estimated on a sample
MINIBATCH_ABOVE = 20_000  # above this many vectors MiniBatchKMeans replaces KMeans


class ClusteringError(RuntimeError):
    """A saved model or a features file does not fit the request."""


def l2_normalize(x: np.ndarray, *, copy: bool = True) -> np.ndarray:
    """Unit-length rows; ``copy=False`` divides in place (a library can be gigabytes)."""
    x = np.asarray(x, dtype=np.float32)
    # einsum sums the squares without np.linalg.norm's temporary copy of the whole array.
    norms = np.maximum(np.sqrt(np.einsum("...i,...i->...", x, x))[..., None], 1e-12)
    if copy:
        return x / norms
    x /= norms
    return x


def rank_cluster_members(unit: np.ndarray, labels: np.ndarray, query: np.ndarray, cluster: int,
                         *, exclude: int | None = None, order: str = "distance"):
    """Rows of ``cluster`` (own row excluded) and their cosine distances to the unit ``query``.

    ``order="distance"``: closest first. ``order="file"``: in file (row) order.
    """
    members = np.flatnonzero(labels == cluster)
    if exclude is not None:
        members = members[members != exclude]
    distance = 1.0 - unit[members] @ query
    if order == "distance":
        ranked = np.argsort(distance, kind="stable")
        members, distance = members[ranked], distance[ranked]
    return members, distance


def _kmeans(k: int, n: int, random_state: int):
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if n > MINIBATCH_ABOVE:
        return MiniBatchKMeans(k, random_state=random_state, n_init=3, batch_size=4096)
    return KMeans(k, random_state=random_state, n_init=10)


def tune_k(
    features: np.ndarray,
    k_range=DEFAULT_K_RANGE,
    *,
    normalize: bool = True,
    random_state: int = 0,
    verbose: bool = True,
) -> tuple[pd.DataFrame, int]:
    """Fit K-Means for every k in ``k_range``; return ``(table of k, silhouette, inertia; best k)``.

    With ``normalize=True`` (default) vectors are L2-normalised first: CNN
    features differ in length with image contrast and content size, which says
    little about what the picture shows, while their direction does. On unit
    vectors Euclidean K-Means groups by cosine similarity, the same geometry
    the cosine recommender uses.
    """
    from sklearn.metrics import silhouette_score

    x = l2_normalize(features) if normalize else np.asarray(features, np.float32)
    n = len(x)
    ks = list(k_range)
    if not ks or min(ks) < 2:
        raise ValueError(f"k_range must hold values of 2 or more, got {ks}")
    if max(ks) >= n:
        raise ValueError(f"k_range goes up to {max(ks)} but there are only {n} images: k must be below {n}")
    rows = []
    sample = SILHOUETTE_SAMPLE if n > SILHOUETTE_SAMPLE else None
    for k in ks:
        model = _kmeans(k, n, random_state).fit(x)
        score = silhouette_score(x, model.labels_, sample_size=sample, random_state=random_state)
        rows.append((k, float(score), float(model.inertia_)))
        if verbose:
            print(f"For n_clusters = {k}, the average silhouette score is {score:.4f}")
    table = pd.DataFrame(rows, columns=["k", "silhouette", "inertia"])
    best = int(table.loc[table["silhouette"].idxmax(), "k"])
    return table, best


class KMeansBaseline:
    """K-Means with k chosen by silhouette; scikit-learn shape, saved with joblib."""

    def __init__(self, k: int | None = None, k_range=DEFAULT_K_RANGE, *, normalize: bool = True,
                 random_state: int = 0, verbose: bool = True):
        self.k, self.k_range, self.normalize = k, k_range, normalize
        self.random_state, self.verbose = random_state, verbose

    def _prepare(self, x):
        return l2_normalize(x) if self.normalize else np.asarray(x, np.float32)

    def fit(self, features: np.ndarray, meta: dict | None = None) -> "KMeansBaseline":
        features = np.asarray(features, np.float32)
        started = time.perf_counter()
        if self.k is None:
            self.tuning_, self.k_ = tune_k(features, self.k_range, normalize=self.normalize,
                                           random_state=self.random_state, verbose=self.verbose)
        else:
            if not 2 <= self.k < len(features):
                raise ValueError(f"k must be between 2 and {len(features) - 1} for {len(features)} images")
            self.tuning_, self.k_ = None, int(self.k)
        x = self._prepare(features)
        self.model_ = _kmeans(self.k_, len(x), self.random_state).fit(x)
        self.labels_ = self.model_.labels_
        self.dim_ = features.shape[1]
        self.metadata_ = self._metadata(meta or {}, time.perf_counter() - started)
        return self

    def _metadata(self, meta: dict, seconds: float) -> dict:
        import sklearn

        return {
            "backbone": meta.get("backbone"), "pooling": meta.get("pooling"),
            "input_size": meta.get("input_size"), "dim": self.dim_, "k": self.k_,
            "normalize": self.normalize, "features_file": meta.get("features_file"),
            "fit_seconds": round(seconds, 3), "estimator": type(self.model_).__name__,
            "versions": {"scikit-learn": sklearn.__version__, "numpy": np.__version__,
                         "joblib": joblib.__version__, "python": platform.python_version()},
        }

    def _check(self, features):
        features = np.atleast_2d(np.asarray(features, np.float32))
        if features.shape[1] != self.dim_:
            raise ClusteringError(f"the model was fitted on {self.dim_}-d features, got {features.shape[1]}-d; "
                                  f"refit it with `python -m similar_finder.cluster`")
        return self._prepare(features)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.model_.predict(self._check(features))

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Distance of each vector to every centroid."""
        return self.model_.transform(self._check(features))

    def save(self, path: str | os.PathLike = DEFAULT_MODEL) -> Path:
        path = Path(path)
        with atomic_write(path, "wb") as handle:
            joblib.dump(self, handle)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike = DEFAULT_MODEL) -> "KMeansBaseline":
        path = Path(path)
        if not path.is_file():
            raise ClusteringError(f"no K-Means model at {path}; fit one with `python -m similar_finder.cluster`")
        model = joblib.load(path)
        if not isinstance(model, cls):
            raise ClusteringError(f"{path} does not hold a KMeansBaseline")
        return model


def fit_baseline(
    features_csv: str | os.PathLike = DEFAULT_FEATURES,
    *,
    k: int | None = None,
    k_range=DEFAULT_K_RANGE,
    model_path: str | os.PathLike = DEFAULT_MODEL,
    clusters_csv: str | os.PathLike = DEFAULT_CLUSTERS,
    normalize: bool = True,
    verbose: bool = True,
) -> KMeansBaseline:
    """Tune k, fit K-Means on a features file, save the model and ``clusters.csv``."""
    paths, matrix, meta = load_features(features_csv)
    meta = {**meta, "features_file": str(Path(features_csv).resolve())}
    model = KMeansBaseline(k, k_range, normalize=normalize, verbose=verbose).fit(matrix, meta)
    model.save(model_path)
    distances = model.transform(matrix)[np.arange(len(matrix)), model.labels_]
    clusters = pd.DataFrame({"path": paths, "cluster": model.labels_, "distance": distances})
    with atomic_write(clusters_csv, newline="") as handle:
        clusters.to_csv(handle, index=False)
    return model


def recommend_by_cluster(
    file: str | os.PathLike,
    n_sample: int = 4,
    order: str = "distance",
    *,
    library: str | os.PathLike = DEFAULT_FEATURES,
    model: KMeansBaseline | str | os.PathLike = DEFAULT_MODEL,
) -> pd.DataFrame:
    """Images of the query's predicted cluster: ``(path, cluster, distance)``.

    ``order="distance"`` ranks them by cosine distance to the query;
    ``order="file"`` takes the first ones in file order, as the original
    notebook did (kept for comparison: every query of a cluster then gets the
    same images). ``library`` is the feature CSV. A library image is looked up,
    not re-embedded, and never recommends itself.
    """
    if n_sample < 1:
        raise ValueError(f"n_sample must be at least 1, got {n_sample}")
    if order not in ("distance", "file"):
        raise ValueError(f"order must be 'distance' or 'file', got {order!r}")
    paths, matrix, meta = load_features(library)
    kmeans = model if isinstance(model, KMeansBaseline) else KMeansBaseline.load(model)
    _check_compatible(kmeans, meta, matrix)
    vector, own_row = query_vector(file, {p: i for i, p in enumerate(paths)}, matrix, meta)
    cluster = int(kmeans.predict(vector)[0])
    members, distance = rank_cluster_members(l2_normalize(matrix), kmeans.predict(matrix), l2_normalize(vector),
                                             cluster, exclude=own_row, order=order)
    return pd.DataFrame({
        "path": [paths[i] for i in members[:n_sample]],
        "cluster": cluster,
        "distance": distance[:n_sample].astype(float),
    })


def _check_compatible(kmeans: KMeansBaseline, meta: dict, matrix: np.ndarray) -> None:
    held = kmeans.metadata_
    if held.get("dim") != matrix.shape[1] or (
        meta.get("backbone") and held.get("backbone") and held["backbone"] != meta["backbone"]
    ):
        raise ClusteringError(
            f"the saved K-Means model was fitted on {held.get('backbone')} features ({held.get('dim')}-d), "
            f"but the features file holds {meta.get('backbone')} features ({matrix.shape[1]}-d); "
            f"refit it with `python -m similar_finder.cluster`"
        )
