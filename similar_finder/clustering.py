"""The baseline: K-Means over the features, k chosen by silhouette score.

``tune_k`` scores every k of a range; ``KMeansBaseline`` (``fit`` / ``predict`` /
``save`` / ``load``) fits the chosen k; ``fit_baseline(library)`` runs the whole
step and saves ``models/kmeans.joblib`` and ``data/clusters.csv``.
``ClusterRecommender`` answers queries with images of their predicted cluster,
with the same verbs and the same answer shape as the cosine
:class:`~similar_finder.recommender.Recommender`; ``recommend_by_cluster(file,
n_sample)`` is the one-call version.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from ._io import DEFAULT_CLUSTERS, DEFAULT_FEATURES, DEFAULT_K_RANGE, DEFAULT_MODEL, atomic_write, write_csv
from .errors import SimilarFinderError, UsageError, check_choice, check_positive
from .library import Library, as_library
from .neighbors import BLOCK_ELEMENTS, l2_normalize, own_rows
from .recommender import Approach
from .thresholds import Calibration

log = logging.getLogger(__name__)
SILHOUETTE_SAMPLE = 5_000  # above this many vectors the silhouette is estimated on a sample
MINIBATCH_ABOVE = 20_000  # above this many vectors MiniBatchKMeans replaces KMeans
PARALLEL_TUNE_ABOVE = 1_000  # from this many vectors the k of a range are fitted in parallel processes
CHUNK_ROWS = 65_536  # rows normalised at a time by MiniBatchKMeans' feeding
MINIBATCH_ROWS = 4_096
MAX_PASSES = 10
ORDERS = ("distance", "file")


class ClusteringError(SimilarFinderError):
    """A saved model or a features file does not fit the request."""


def clip_k_range(k_range, n: int) -> range:
    """``k_range`` without the values a library of ``n`` images cannot have (k must be below n)."""
    ks = [k for k in k_range if k < n]
    if not ks or min(ks) < 2:
        raise UsageError(f"k_range must hold values from 2 up to {n - 1} for {n} images, got {list(k_range)}")
    return range(min(ks), max(ks) + 1)


def fit_kmeans(k: int, features: np.ndarray, *, normalize: bool = True, random_state: int = 0):
    """``(model, labels, inertia)`` of K-Means with ``k`` clusters.

    Up to :data:`MINIBATCH_ABOVE` vectors: scikit-learn's KMeans on the (unit)
    vectors. Above: MiniBatchKMeans fed chunk by chunk, each chunk normalised
    as it is read, so no normalised copy of a large library is ever made; passes
    over the chunks stop when the inertia no longer improves.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    prepare = l2_normalize if normalize else (lambda chunk: np.asarray(chunk, np.float32))
    n = len(features)
    if n <= MINIBATCH_ABOVE:
        model = KMeans(k, random_state=random_state, n_init=10).fit(prepare(features))
        return model, model.labels_, float(model.inertia_)
    rng = np.random.default_rng(random_state)
    model = MiniBatchKMeans(k, random_state=random_state, batch_size=MINIBATCH_ROWS, n_init=3)
    model.partial_fit(prepare(features[np.sort(rng.choice(n, min(n, 20 * MINIBATCH_ROWS), replace=False))]))
    previous = np.inf
    for _ in range(MAX_PASSES):
        for start in rng.permutation(np.arange(0, n, CHUNK_ROWS)):
            chunk = prepare(features[start:start + CHUNK_ROWS])
            for batch in range(0, len(chunk), MINIBATCH_ROWS):
                model.partial_fit(chunk[batch:batch + MINIBATCH_ROWS])
        inertia = -sum(model.score(prepare(features[s:s + CHUNK_ROWS])) for s in range(0, n, CHUNK_ROWS))
        if previous - inertia < 1e-3 * previous:
            break
        previous = inertia
    labels = np.concatenate([model.predict(prepare(features[s:s + CHUNK_ROWS])) for s in range(0, n, CHUNK_ROWS)])
    return model, labels, float(inertia)


def tune_k(features: np.ndarray, k_range=DEFAULT_K_RANGE, *, normalize: bool = True,
           random_state: int = 0) -> tuple[pd.DataFrame, int]:
    """Fit K-Means for every k in ``k_range``; return ``(table of k, silhouette, inertia; best k)``.

    With ``normalize=True`` (default) vectors are L2-normalised first: CNN
    features differ in length with image contrast and content size, which says
    little about what the picture shows, while their direction does. On unit
    vectors Euclidean K-Means groups by cosine similarity, the same geometry
    the cosine recommender uses. Each k's score is logged (INFO).
    """
    features = np.asarray(features, np.float32)
    n = len(features)
    ks = list(k_range)
    if not ks or min(ks) < 2:
        raise UsageError(f"k_range must hold values of 2 or more, got {ks}")
    if max(ks) >= n:
        raise UsageError(f"k_range goes up to {max(ks)} but there are only {n} images: k must be below {n}")
    table, best, _ = _tune(features, ks, normalize, random_state)
    return table, best


def _tune(features: np.ndarray, ks, normalize: bool, random_state: int):
    """:func:`tune_k`'s table and best k, and the best k's ``fit_kmeans`` result (so it is not fitted twice)."""
    from joblib import Parallel, delayed
    from sklearn.metrics import pairwise_distances, silhouette_score

    n = len(features)
    # The silhouette is quadratic in the photos: above SILHOUETTE_SAMPLE it is estimated on a sample. Its
    # distances are the same for every k: computed once.
    sample = np.sort(np.random.default_rng(random_state).choice(n, min(n, SILHOUETTE_SAMPLE), replace=False))
    distances = pairwise_distances(l2_normalize(features[sample]) if normalize else features[sample])
    jobs = min(len(ks), os.cpu_count() or 1) if n >= PARALLEL_TUNE_ABOVE else 1
    fits = Parallel(n_jobs=jobs, return_as="generator")(
        delayed(_fit_on_one_thread)(k, features, normalize, random_state) for k in ks)
    rows, fitted = [], {}
    for k, result in zip(ks, fits):
        labels, inertia = result[1], result[2]
        score = silhouette_score(distances, labels[sample], metric="precomputed") \
            if len(set(labels[sample])) > 1 else -1.0
        rows.append((k, float(score), inertia))
        log.info("For n_clusters = %d, the average silhouette score is %.4f", k, score)
        fitted[k] = result
        fitted = {best: fitted[best] for best in [max(rows, key=lambda row: row[1])[0]]}  # 100k labels: keep one
    table = pd.DataFrame(rows, columns=["k", "silhouette", "inertia"])
    best = int(table.loc[table["silhouette"].idxmax(), "k"])
    return table, best, fitted[best]


def _fit_on_one_thread(k: int, features: np.ndarray, normalize: bool, random_state: int):
    # One k per process, each fit on one thread: OpenMP's threads spin while they wait for each other, and
    # on two cores that other work shares (load 5), one fit on two threads took 21 s against 3.7 s on one.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return fit_kmeans(k, features, normalize=normalize, random_state=random_state)


class KMeansBaseline(BaseEstimator):
    """K-Means with k chosen by silhouette; a scikit-learn estimator, saved with joblib.

    ``k=None`` tunes k over ``k_range``, clipped to what the library's size allows.
    """

    def __init__(self, k: int | None = None, k_range=DEFAULT_K_RANGE, *, normalize: bool = True,
                 random_state: int = 0):
        self.k, self.k_range, self.normalize = k, k_range, normalize
        self.random_state = random_state

    def _prepare(self, x):
        return l2_normalize(x) if self.normalize else np.asarray(x, np.float32)

    def fit(self, X, y=None) -> "KMeansBaseline":
        """Fit on ``X``, a :class:`Library` (its CNN features) or a matrix; ``y`` is ignored (scikit-learn's
        signature for clusterers)."""
        meta = {}
        if isinstance(X, Library):
            meta = {**X.meta, "features_file": str(X.files.csv)}
            X = X.matrix
        features = np.asarray(X, np.float32)
        started = time.perf_counter()
        if self.k is None:
            ks = list(clip_k_range(self.k_range, len(features)))
            self.tuning_, self.k_, fitted = _tune(features, ks, self.normalize, self.random_state)
        else:
            if not 2 <= self.k < len(features):
                raise UsageError(f"k must be between 2 and {len(features) - 1} for {len(features)} images")
            self.tuning_, self.k_ = None, int(self.k)
            fitted = fit_kmeans(self.k_, features, normalize=self.normalize, random_state=self.random_state)
        self.model_, self.labels_, _ = fitted
        self.dim_ = features.shape[1]
        self.metadata_ = self._metadata(meta, time.perf_counter() - started)
        return self

    def _metadata(self, meta: dict, seconds: float) -> dict:
        import sklearn

        return {
            "backbone": meta.get("backbone"), "pooling": meta.get("pooling"),
            "input_size": meta.get("input_size"), "dim": self.dim_, "k": self.k_,
            "normalize": self.normalize, "features_file": meta.get("features_file"),
            "fingerprint": meta.get("fingerprint"),
            "fit_seconds": round(seconds, 3), "estimator": type(self.model_).__name__,
            "versions": {"scikit-learn": sklearn.__version__, "numpy": np.__version__,
                         "joblib": joblib.__version__, "python": platform.python_version()},
        }

    def _check(self, features):
        check_is_fitted(self, "model_")
        features = np.atleast_2d(np.asarray(features, np.float32))
        if features.shape[1] != self.dim_:
            raise ClusteringError(f"the model was fitted on {self.dim_}-d features, got {features.shape[1]}-d; "
                                  f"refit it with `similar-finder cluster`")
        return self._prepare(features)

    def predict(self, features: np.ndarray) -> np.ndarray:
        features = self._check(features)  # first: it says "not fitted" before model_ is needed
        return self.model_.predict(features)

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Distance of each vector to every centroid."""
        features = self._check(features)
        return self.model_.transform(features)

    def save(self, path: str | os.PathLike = DEFAULT_MODEL) -> Path:
        path = Path(path)
        with atomic_write(path, "wb") as handle:
            joblib.dump(self, handle)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike = DEFAULT_MODEL) -> "KMeansBaseline":
        path = Path(path)
        if not path.is_file():
            raise ClusteringError(f"no K-Means model at {path}; fit one with `similar-finder cluster`")
        model = joblib.load(path)
        if not isinstance(model, cls):
            raise ClusteringError(f"{path} does not hold a KMeansBaseline")
        return model


def fit_baseline(library=DEFAULT_FEATURES, *, k: int | None = None, k_range=DEFAULT_K_RANGE,
                 model_path: str | os.PathLike = DEFAULT_MODEL,
                 clusters_csv: str | os.PathLike = DEFAULT_CLUSTERS, normalize: bool = True) -> KMeansBaseline:
    """Tune k, fit K-Means on a library (a Library or its CSV), save the model and ``clusters.csv``."""
    library = as_library(library)
    model = KMeansBaseline(k, k_range, normalize=normalize).fit(library)
    model.save(model_path)
    distances = model.transform(library.matrix)[np.arange(len(library)), model.labels_]
    write_csv(clusters_csv, pd.DataFrame({"path": library.paths, "cluster": model.labels_, "distance": distances}))
    return model


class ClusterRecommender(Approach):
    """The K-Means baseline as a recommender: a query gets images of its predicted cluster.

    ``model`` is a fitted :class:`KMeansBaseline` (used as it is), its joblib
    file, an unfitted one (fitted on the library, as a clone) or None (a new one
    over ``k_range``). ``order="distance"`` ranks the members by cosine
    distance to the query; ``order="file"`` takes them in file order, as the
    original notebook did (kept for comparison: every query of a cluster then
    gets the same images). It has no threshold and no gate: K-Means always
    answers (``calibration_`` is :meth:`Calibration.answer_all`; a threshold
    given to ``recommend`` still applies). ``kneighbors`` pads with distance
    ``inf`` and index ``-1`` when a cluster has fewer members than asked.
    """

    approach = "kmeans"
    kind = "cnn"  # K-Means clusters the CNN features; not a parameter

    def __init__(self, model: KMeansBaseline | str | os.PathLike | None = None, *, order: str = "distance",
                 k_range=DEFAULT_K_RANGE):
        self.model, self.order, self.k_range = model, order, k_range

    def fit(self, X, paths=None) -> "ClusterRecommender":
        """Hold the library ``X`` (a :class:`Library`, or a matrix with optional paths) and its clusters."""
        check_choice("order", self.order, ORDERS)
        self.kind_ = self.kind
        matrix = self._fit_library(X, paths, self.kind_)
        model, fitted_here = self.model, True
        if model is None:
            model = KMeansBaseline(k_range=self.k_range).fit(X)
        elif isinstance(model, KMeansBaseline) and not _is_fitted(model):
            model = clone(model).fit(X)  # e.g. after sklearn.base.clone of this recommender
        else:
            model = model if isinstance(model, KMeansBaseline) else KMeansBaseline.load(model)
            fitted_here = False
        _check_compatible(model, getattr(self.library_, "meta", {}), matrix)
        self.kmeans_ = model
        self.unit_ = l2_normalize(matrix)
        # A model fitted elsewhere may have seen other photos: these photos' clusters are what it predicts.
        self.labels_ = model.labels_ if fitted_here else model.predict(matrix)
        self.calibration_ = Calibration.answer_all(metric="cosine", center=False)
        return self

    def kneighbors(self, queries: np.ndarray | None = None, n_neighbors: int = 5, *, rows=None):
        """Cluster members of each query, ranked by ``order``: ``(distances, indices)`` padded with inf / -1."""
        check_positive("n_neighbors", n_neighbors)
        check_is_fitted(self, "kmeans_")
        if queries is None:
            rows = own_rows(len(self.unit_), rows)
            unit, clusters = self.unit_[rows], self.labels_[rows]
        else:
            unit = l2_normalize(np.atleast_2d(queries))
            clusters, rows = self.kmeans_.predict(queries), np.full(len(unit), -1)
        out_d = np.full((len(unit), n_neighbors), np.inf, np.float32)
        out_i = np.full((len(unit), n_neighbors), -1, np.int64)
        # The queries of one cluster at a time, in bounded blocks: one copy of its members and one matrix
        # product for all of them (copying the members for each query made most of an evaluation's time).
        for cluster in np.unique(clusters):
            asking, everyone = np.flatnonzero(clusters == cluster), np.flatnonzero(self.labels_ == cluster)
            member_unit = self.unit_[everyone]
            step = max(1, BLOCK_ELEMENTS // max(1, len(everyone)))
            for start in range(0, len(asking), step):
                block = asking[start:start + step]
                for q, own_row, distance in zip(block, rows[block], 1.0 - unit[block] @ member_unit.T):
                    members = everyone[everyone != own_row]
                    distance = distance[everyone != own_row]
                    if self.order == "distance":
                        ranked = np.argsort(distance, kind="stable")
                        members, distance = members[ranked], distance[ranked]
                    out_d[q, :len(members[:n_neighbors])] = distance[:n_neighbors]
                    out_i[q, :len(members[:n_neighbors])] = members[:n_neighbors]
        return out_d, out_i

    def _frame(self, distances: np.ndarray, rows: np.ndarray) -> pd.DataFrame:
        """Like the recommender's answer, plus the ``cluster`` the results belong to."""
        return super()._frame(distances, rows).assign(cluster=self.labels_[rows].astype(int))


def recommend_by_cluster(file, n_sample: int = 4, order: str = "distance", *, library=DEFAULT_FEATURES,
                         model: KMeansBaseline | str | os.PathLike = DEFAULT_MODEL) -> pd.DataFrame:
    """Images of the query's predicted cluster: ``path``, ``distance`` (cosine), ``cluster``.

    ``library`` is a :class:`Library` or its feature CSV; ``model`` the fitted
    baseline or its joblib file. A library image is looked up, not re-embedded,
    and never recommends itself.
    """
    check_positive("n_sample", n_sample)
    check_choice("order", order, ORDERS)
    library = as_library(library)
    key = ("kmeans", order, model if isinstance(model, KMeansBaseline) else _file_key(model))
    if key not in library.models:
        library.models[key] = ClusterRecommender(model, order=order).fit(library)
    return library.models[key].recommend(file, n_sample)


def _is_fitted(model: KMeansBaseline) -> bool:
    try:
        check_is_fitted(model, "model_")
    except NotFittedError:
        return False
    return True


def _file_key(path) -> tuple:
    path = Path(path)
    return (str(path.resolve()), path.stat().st_mtime_ns if path.is_file() else None)


def _check_compatible(kmeans: KMeansBaseline, meta: dict, matrix: np.ndarray) -> None:
    held = kmeans.metadata_
    if held.get("dim") != matrix.shape[1] or (
        meta.get("backbone") and held.get("backbone") and held["backbone"] != meta["backbone"]
    ):
        raise ClusteringError(
            f"the saved K-Means model was fitted on {held.get('backbone')} features ({held.get('dim')}-d), "
            f"but the features file holds {meta.get('backbone')} features ({matrix.shape[1]}-d); "
            f"refit it with `similar-finder cluster`"
        )
