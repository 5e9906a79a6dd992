"""The improved approach: thresholded nearest neighbours (cosine on CNN features, or any feature kind).

``recommend(file, n_sample)`` returns the library images most similar to
``file`` (a new photo, or one of the library's), closest first, as a DataFrame
with the columns ``path`` (relative to the images folder) and ``distance``.
Only neighbours closer than the threshold are returned, so fewer than
``n_sample``, or none ("No similar images found"), is a normal and honest answer.

:class:`Recommender` is the object behind it. It shares its verbs with the
K-Means baseline (:class:`~similar_finder.clustering.ClusterRecommender`), so
grids, evaluation and the app treat both approaches alike:

* ``fit(library)`` – a :class:`~similar_finder.library.Library` (or a matrix);
* ``kneighbors(queries=None, n, rows=None)`` – ``(distances, indices)``,
  ``queries=None`` meaning the library's own rows, each without itself;
* ``search(...)`` – the same plus each query's gate score (None where there is no gate);
* ``answer(distances, indices, gate_score)`` – one query's neighbours under
  the threshold, or none if the gate refuses it, as a DataFrame;
* ``recommend(file, n_sample)`` – all of it for an image file.

Whether anything is similar at all is decided by the *gate* (the uncentred
distance to the library's nearest photos, see :mod:`.thresholds`); which
neighbours count, by the *threshold* on the ranking distance.

Besides CNN features (``kind="cnn"``, cosine), the same recommender works on
any kind of :mod:`.kinds`: PCA-reduced CNN features, colour histograms
(chi-square), perceptual hashes (Hamming) and raw pixels.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ._io import DEFAULT_FEATURES
from .errors import UsageError, check_choice, check_positive
from .kinds import get_kind
from .library import Library, as_library
from .neighbors import IVF_ABOVE, METRICS, PQ_ABOVE, PQ_BYTES, Neighbors, as_matrix, own_rows
from .thresholds import calibrate_threshold

log = logging.getLogger(__name__)
NO_RESULTS = "No similar images found"


class Approach:
    """What both approaches share: a fitted library, a threshold, and one answer shape."""

    approach = "approach"
    threshold_: float = np.inf
    gate_: float = np.inf

    def _fit_library(self, features, paths, kind):
        """The matrix to search and, when known, the library it came from."""
        if isinstance(features, Library):
            self.library_ = features
            self.paths_ = features.paths
            return features.vectors(kind)
        features = as_matrix(features)
        self.library_ = None
        self.paths_ = list(paths) if paths is not None else [str(i) for i in range(len(features))]
        return features

    def search(self, queries=None, n_neighbors: int = 5, *, rows=None):
        """``(distances, indices, gate_scores)``; ``gate_scores`` is None for an approach without a gate."""
        return (*self.kneighbors(queries, n_neighbors, rows=rows), None)

    def answer(self, distances: np.ndarray, indices: np.ndarray, gate_score: float | None = None, *,
               threshold: float | None = None) -> pd.DataFrame:
        """One query's results under the threshold, closest first: ``path``, ``distance``.

        Empty when the query's ``gate_score`` is not under the gate. An explicit
        ``threshold`` replaces both: only that distance limit applies.
        """
        limit = self.threshold_ if threshold is None else float(threshold)
        distances, indices = np.asarray(distances).ravel(), np.asarray(indices).ravel()
        refused = threshold is None and gate_score is not None and not gate_score < self.gate_
        keep = (distances < limit) & (indices >= 0) & (not refused)
        return self._frame(distances[keep], indices[keep])

    def _frame(self, distances: np.ndarray, rows: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({"path": [self.paths_[i] for i in rows], "distance": distances.astype(float)})

    def recommend(self, file, n_sample: int = 4, threshold: float | None = None) -> pd.DataFrame:
        """The library images closest to ``file`` and under the threshold."""
        check_positive("n_sample", n_sample)
        if self.library_ is None:
            raise UsageError("this recommender was fitted on a bare matrix; fit it on a Library to query files")
        vector, own_row = self.library_.query(file, self.kind)
        if own_row is None:
            distances, indices, gates = self.search(vector, n_sample)
        else:
            distances, indices, gates = self.search(None, n_sample, rows=[own_row])
        result = self.answer(distances[0], indices[0], None if gates is None else gates[0], threshold=threshold)
        if result.empty:
            log.info("%s: %s", file, NO_RESULTS)
        return result


class Recommender(Approach):
    """Nearest neighbours of one feature kind, with a distance threshold.

    With ``center=True`` (default, cosine only) the library's mean vector is
    subtracted before normalising. CNN features after ReLU all point into one
    corner of the space, so plain cosine similarities crowd together; centring
    spreads them (on the shared photos: precision@5 0.87 → 0.91 on food, mAP
    0.46 → 0.49 on clothing). Distances stay ``1 - cos`` of the centred vectors.

    ``threshold=None`` and ``gate=None`` use the values calibrated for the
    library (:meth:`calibrate`, stored with :meth:`Library.save_threshold`),
    else the unlabelled rule of :func:`~similar_finder.thresholds.calibrate_threshold`;
    ``gate=np.inf`` turns the gate off.
    ``index="auto"`` (default) searches by brute force up to ``ivf_above``
    images (200k), with a FAISS IVF-Flat index up to ``pq_above`` (2M) and an
    IVF-PQ index beyond (see :class:`~similar_finder.neighbors.Neighbors`;
    also ``"brute"``, ``"ivf"``, ``"ivfpq"``, and ``"faiss"``: exact below 10k
    images, IVF-Flat above). Fitted on a :class:`Library`, a trained index is
    saved beside the features (``<stem>.faiss`` for CNN features, cosine,
    centred; others in ``<stem>.cache/``) and memory-mapped by the next fit
    while the library's fingerprint is unchanged.

    ``query_expansion=n`` (cosine only; off by default) re-ranks by alpha query
    expansion: the query plus its ``n`` nearest photos, weighted by similarity
    to the power ``alpha``, searched again. Distances are then those of the
    expanded query; the gate still judges the original one. Measured on the
    shared sets (n=5): precision@5 +0.000 to +0.003, mAP +0.001 to +0.020,
    for a second search per query.
    """

    approach = "cosine"

    def __init__(self, metric: str | None = None, threshold: float | None = None, *, gate: float | None = None,
                 kind: str = "cnn", center: bool = True, index: str = "auto", nprobe: int = 16,
                 query_expansion: int = 0, alpha: float = 3.0, ivf_above: int = IVF_ABOVE,
                 pq_above: int = PQ_ABOVE, pq_bytes: int = PQ_BYTES):
        self.kind = get_kind(kind).name
        self.metric = check_choice("metric", metric or get_kind(kind).metric, METRICS)
        self.threshold, self.gate, self.center, self.index, self.nprobe = threshold, gate, center, index, nprobe
        if query_expansion and self.metric != "cosine":
            raise UsageError("query expansion averages directions: it needs the cosine metric")
        self.query_expansion, self.alpha = int(query_expansion), float(alpha)
        self.ivf_above, self.pq_above, self.pq_bytes = ivf_above, pq_above, pq_bytes
        self.neighbors = Neighbors(self.metric, center=center, index=index, nprobe=nprobe, ivf_above=ivf_above,
                                   pq_above=pq_above, pq_bytes=pq_bytes)

    @classmethod
    def from_library(cls, library=DEFAULT_FEATURES, kind: str = "cnn", metric: str | None = None,
                     **kwargs) -> "Recommender":
        """A recommender over a feature library (a Library or its CSV), on any feature kind."""
        return cls(metric, kind=kind, **kwargs).fit(as_library(library))

    def fit(self, features, paths=None) -> "Recommender":
        """Hold the library: a :class:`Library`, or a matrix (images x dimensions) with optional paths."""
        matrix = self._fit_library(features, paths, self.kind)
        self.neighbors.fit(matrix, index_file=self.index_file(len(matrix)),
                           fingerprint=None if self.library_ is None else self.library_.fingerprint)
        self.raw_ = matrix
        self.threshold_, self.gate_ = self._resolve_threshold()
        return self

    def index_file(self, n: int | None = None):
        """Where the trained index of this recommender's library is kept (None: a bare matrix, or brute force)."""
        if self.library_ is None:
            return None
        kind = self.neighbors.index_for(len(self.library_) if n is None else n)
        if kind in ("brute", "flat"):
            return None
        if self.kind == "cnn" and self.metric == "cosine" and self.center:
            return self.library_.files.index()
        centring = "centred" if self.center and self.metric == "cosine" else "plain"
        return self.library_.files.index(f"{self.kind}-{self.metric}-{centring}-{kind}")

    def _resolve_threshold(self) -> tuple[float, float]:
        if self.threshold is not None and self.gate is not None:
            return float(self.threshold), float(self.gate)
        calibration = None
        if self.library_ is not None:
            calibration = self.library_.threshold_for(self.kind, self.metric, self.center)
        if (calibration is None or "gate" not in calibration) and len(self.raw_) >= 3:
            calibration = {**calibrate_threshold(self.raw_, neighbors=self.neighbors), **(calibration or {})}
        calibration = calibration or {"value": np.inf, "gate": np.inf}
        return (float(calibration["value"] if self.threshold is None else self.threshold),
                float(calibration.get("gate", np.inf) if self.gate is None else self.gate))

    def calibrate(self, labels=None, *, save: bool = True) -> dict:
        """Calibrate the threshold on this recommender's library (see :func:`calibrate_threshold`).

        The result becomes ``threshold_`` and, with ``save``, the library's stored default.
        """
        calibration = calibrate_threshold(self.raw_, labels, neighbors=self.neighbors)
        self.threshold_, self.gate_ = calibration["value"], calibration["gate"]
        if save and self.library_ is not None:
            self.library_.save_threshold(calibration, self.kind)
        return calibration

    def distances(self, queries: np.ndarray) -> np.ndarray:
        """Distance of each raw query vector to every library vector."""
        return self.neighbors.distances(queries)

    def kneighbors(self, queries: np.ndarray | None = None, n_neighbors: int = 5, *, rows=None):
        """``(distances, indices)``, closest first; ``queries=None``: the library's ``rows``, without themselves.

        No threshold is applied here (see :meth:`answer`).
        """
        return self.neighbors.kneighbors(queries, n_neighbors, rows=rows)

    def search(self, queries: np.ndarray | None = None, n_neighbors: int = 5, *, rows=None):
        """``(distances, indices, gate_scores)``: :meth:`kneighbors` and how far each query is from the library."""
        distances, indices, gates = self.neighbors.search(queries, max(n_neighbors, self.query_expansion), rows=rows)
        if self.query_expansion:
            first = distances[:, :self.query_expansion], indices[:, :self.query_expansion]
            return (*self._expanded(queries, first, n_neighbors, rows), gates)
        return distances[:, :n_neighbors], indices[:, :n_neighbors], gates

    def _expanded(self, queries, first, n_neighbors: int, rows):
        """Alpha query expansion: search again with the query averaged with its nearest photos (``first``)."""
        first_d, first_i = first
        own = queries is None
        start = self.neighbors.transform(self.raw_[own_rows(len(self.raw_), rows)] if own else queries)
        if self.neighbors.library_ is not None:
            found = self.neighbors.library_[first_i]
        else:  # behind a FAISS index: transform only the rows used (-1 pads weigh 0: infinite distance)
            found = self.neighbors.transform(self.raw_[first_i.ravel()]).reshape(*first_i.shape, -1)
        weights = np.clip(1.0 - first_d, 0.0, None) ** self.alpha
        expanded = start + np.einsum("qn,qnd->qd", weights, found)
        # A raw vector whose transform is the expanded direction: the library mean plus that direction.
        mean = self.neighbors.mean_ if self.neighbors.mean_ is not None else 0.0
        raw = mean + expanded / np.linalg.norm(expanded, axis=1, keepdims=True)
        distances, indices = self.neighbors.kneighbors(raw, n_neighbors + int(own))
        if own:  # the library photo itself is not its own answer
            rows = own_rows(len(self.raw_), rows)
            keep = indices != rows[:, None]
            order = np.argsort(~keep, axis=1, kind="stable")[:, :n_neighbors]
            distances, indices = np.take_along_axis(distances, order, 1), np.take_along_axis(indices, order, 1)
            own_left = ~np.take_along_axis(keep, order, 1)  # a library smaller than asked for: drop itself
            distances, indices = np.where(own_left, np.inf, distances), np.where(own_left, -1, indices)
        return distances, indices


def recommend(file, n_sample: int = 4, threshold: float | None = None, metric: str | None = None, *,
              kind: str = "cnn", library=DEFAULT_FEATURES, expand: bool = False) -> pd.DataFrame:
    """The ``n_sample`` most similar library images to ``file``, closest first, under the threshold.

    Returns a DataFrame with ``path`` (relative to the images folder) and
    ``distance``; an empty one means "No similar images found". ``kind`` picks
    what is compared: ``"cnn"`` (default), ``"pca"``, ``"color"``, ``"ahash"``,
    ``"dhash"``, ``"phash"`` or ``"pixels"``; ``metric=None`` uses that kind's
    metric. ``library`` is a :class:`Library` or the feature CSV of the photos
    to search. ``threshold=None`` uses the threshold calibrated for this
    library, else the unlabelled rule. ``expand=True`` re-ranks by query
    expansion (see :class:`Recommender`).
    """
    library = as_library(library)
    model = _recommender_for(library, kind, metric, QUERY_EXPANSION if expand else 0)
    return model.recommend(file, n_sample, threshold)


QUERY_EXPANSION = 5  # neighbours averaged into the query by recommend(expand=True)


def _recommender_for(library: Library, kind: str, metric: str | None, expansion: int) -> Recommender:
    # One recommender per library version, kind, metric, expansion and stored threshold, reused across calls.
    metric = check_choice("metric", metric or get_kind(kind).metric, METRICS)
    key = (kind, metric, expansion, repr(library.threshold_for(kind, metric, True)))
    if key not in library.models:
        library.models[key] = Recommender(metric, kind=kind, query_expansion=expansion).fit(library)
    return library.models[key]
