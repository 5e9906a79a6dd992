"""The one neighbours mechanism: distances from queries to a library of vectors, in bounded blocks.

:class:`Neighbors` holds a library in the space its metric measures (unit
vectors for cosine, optionally mean-centred) and answers, scikit-learn style:

* ``kneighbors(queries, k)`` for new vectors, and ``kneighbors(None, k, rows=...)``
  for the library's own rows, each excluding itself (scikit-learn's
  ``kneighbors(X=None)``);
* ``blocks(...)`` the raw distance blocks behind both, for reductions that need
  more than the k nearest (calibration, full rankings for evaluation);
* ``pairs_within(radius)`` every pair of library rows closer than ``radius``
  (near-duplicates);
* ``search(...)`` ``kneighbors`` plus each query's *gate score*, its mean
  uncentred distance to its nearest photos: how far it is from the library as
  a whole. This module only measures; whether a score and a distance get an
  answer is decided in one place, :meth:`~similar_finder.thresholds.Calibration.keep`.

Everything above it (the recommender, threshold calibration, evaluation,
duplicates) uses this class rather than writing its own loop.

**Search at scale.** ``index="auto"`` (the default) picks by library size:
brute force up to ``IVF_ABOVE`` vectors (one query reads the whole matrix:
about 50 ms at 200k x 1280 on two cores), a FAISS inverted-file index of
exact vectors (IVF-Flat) up to ``PQ_ABOVE``, and above that an inverted file
of product-quantised codes (IVF-PQ, ``pq_bytes`` a vector), whose candidates
are re-ranked by exact distance from the raw rows. Indexes are trained on a
sample and added in blocks; given an ``index_file`` (the recommender passes
one for a library) the trained index is saved there atomically, keyed by the
library's fingerprint and the index settings, and memory-mapped on the next
fit instead of being trained again.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from ._io import atomic_write, read_json, write_json
from .errors import UsageError, check_choice

log = logging.getLogger(__name__)

METRICS = ("cosine", "euclidean", "manhattan", "chi2", "hamming")
BLOCK_ELEMENTS = 2 ** 25  # a query x library block of at most ~128 MB of float32
GATE_NEIGHBOURS = 3  # the domain gate looks at a query's 3 nearest photos, not just one (robust to a lone copy)
GATE_CANDIDATES = 32  # with centring, uncentred distances are measured on the 32 best-ranked candidates
FAISS_EXACT_BELOW = 10_000  # index="faiss": below this, an exact flat index is as fast as an inverted one
INDEXES = ("auto", "brute", "faiss", "ivf", "ivfpq")
FAISS_METRICS = ("cosine", "euclidean")
# index="auto": brute force up to IVF_ABOVE vectors, IVF-Flat up to PQ_ABOVE, IVF-PQ beyond. Brute force
# reads the whole matrix per query (memory-bound): on the 2-core machine, 1280-d, it passes ~50 ms a query
# at about 200k vectors. IVF-Flat holds a second full-precision copy of the library (2M x 1280 floats:
# 10 GB beside the 10 GB of the library itself); IVF-PQ holds pq_bytes a vector.
IVF_ABOVE = 200_000
PQ_ABOVE = 2_000_000
# Lists: sqrt(n), at most NLIST_MAX. Adding a vector costs nlist x dim multiply-adds (its nearest list):
# 10M x 1280-d with 4,096 lists would be ~100 TFLOP, half an hour on two cores; 1,024 lists take minutes,
# and their longer lists cost little at query time when they hold 64-byte codes.
NLIST_MAX = 1024
PQ_BYTES = 64  # IVF-PQ: bytes per vector (subquantizers of 8 bits); 1280-d -> 64 codes of 20 dimensions
PQ_TRAIN = 65_536  # IVF-PQ trains on at least this many vectors (sampled): 256 centroids per subquantizer
# IVF-PQ: this many candidates (or k + 1 if more) are fetched from the codes and re-ranked by exact distance
# from the raw rows. 64-byte codes of 1280-d vectors tell clusters apart, but not always the order inside
# one: on the benchmark's 1M random vectors (clusters of 1,000 nearly equidistant ones, the worst case for
# PQ), recall@5 was 0.13 re-ranking 24 candidates, 0.50 with 256, 0.996 with 1,024, at ~1 ms a query;
# at 10M (clusters of 10,000) 1,024 gave only 0.36: the depth needed grows with the number of near-ties.
RERANK = 1024
ADD_BLOCK = 65_536  # vectors transformed and added to an index at a time
INDEX_FORMAT = 1  # bump when what is saved in an index file changes


def l2_normalize(x: np.ndarray, *, copy: bool = True) -> np.ndarray:
    """Unit-length rows; ``copy=False`` divides in place (a library can be gigabytes)."""
    x = np.asarray(x, dtype=np.float32)
    # einsum sums the squares without np.linalg.norm's temporary copy of the whole array.
    norms = np.maximum(np.sqrt(np.einsum("...i,...i->...", x, x))[..., None], 1e-12)
    if copy:
        return x / norms
    x /= norms
    return x


def hamming_distances(bits_a: np.ndarray, bits_b: np.ndarray) -> np.ndarray:
    """Differing bits between 0/1 vectors, as matrix products (exact in float32)."""
    a = np.atleast_2d(np.asarray(bits_a, np.float32))
    b = np.atleast_2d(np.asarray(bits_b, np.float32))
    return a @ (1.0 - b).T + (1.0 - a) @ b.T


def pairwise_distances(queries: np.ndarray, library: np.ndarray, metric: str = "cosine",
                       *, library_normalized: bool = False) -> np.ndarray:
    """Distances between every query and every library vector, as one matrix product.

    cosine is ``1 - cos`` (0 identical direction, 1 orthogonal, 2 opposite);
    chi2 is ``0.5 * sum((q - x)^2 / (q + x))`` for histograms; hamming counts
    differing bits of 0/1 vectors.
    """
    q = np.atleast_2d(np.asarray(queries, np.float32))
    if metric == "cosine":
        x = library if library_normalized else l2_normalize(library)
        return 1.0 - l2_normalize(q) @ x.T
    if metric == "euclidean":
        squared = (q * q).sum(1)[:, None] + (library * library).sum(1)[None, :] - 2.0 * (q @ library.T)
        return np.sqrt(np.maximum(squared, 0.0))
    if metric == "hamming":
        return hamming_distances(q, library)
    if metric == "chi2":
        return chi2_distances(q, library)
    from sklearn.metrics import pairwise_distances as sk_pairwise

    return sk_pairwise(q, library, metric=check_choice("metric", metric, METRICS)).astype(np.float32)


CHI2_CHUNK = 2048  # library columns a query's bins are compared with at a time


def chi2_distances(queries: np.ndarray, library: np.ndarray) -> np.ndarray:
    """``0.5 * sum((q - x)^2 / (q + x))`` over the bins either histogram fills, query by query on its own bins.

    A colour histogram fills few of its bins (a median of 58 of 512 on the clothing photos), and the
    sum splits: a bin the query leaves empty adds ``x`` alone, and over the query's bins ``(q - x)^2 / (q + x)``
    is ``q + x - 4qx / (q + x)``; so the distance is ``(sum(q) + sum(x)) / 2 - 2 * sum(qx / (q + x))`` over the
    query's bins only. Exact (to float32 rounding, as sklearn's ``additive_chi2_kernel``) and 6-8 times faster
    than that dense loop over all 512 bins, which made most of an evaluation's time.
    """
    q = np.atleast_2d(np.asarray(queries, np.float32))
    bins_first = np.ascontiguousarray(np.asarray(library, np.float32).T)  # a query's bins are whole rows
    if (q < 0).any() or (bins_first < 0).any():
        raise UsageError("chi2 distances are for histograms: every value must be 0 or more")
    half_totals = 0.5 * bins_first.sum(0)
    n = bins_first.shape[1]
    out = np.empty((len(q), n), np.float32)
    share = np.empty((bins_first.shape[0], min(CHI2_CHUNK, n)), np.float32)  # one buffer, small enough for L2
    for i, row in enumerate(q):
        bins = np.flatnonzero(row)
        values, half = row[bins], 0.5 * float(row.sum())
        for start in range(0, n, CHI2_CHUNK):
            filled = bins_first[bins, start:start + CHI2_CHUNK]
            part = share[:len(bins), :filled.shape[1]]
            np.add(filled, values[:, None], out=part)
            np.divide(filled, part, out=part)
            out[i, start:start + CHI2_CHUNK] = half_totals[start:start + CHI2_CHUNK] + half - 2.0 * (values @ part)
    return np.maximum(out, 0.0, out=out)  # rounding may take an identical pair a hair below 0


def sample_rows(n: int, max_rows: int | None, *, even: bool = False, random_state: int = 0) -> np.ndarray:
    """All ``n`` rows, or ``max_rows`` of them in order: evenly spaced, or a random sample."""
    if max_rows is None or n <= max_rows:
        return np.arange(n)
    if even:
        return np.linspace(0, n - 1, max_rows).astype(int)
    return np.sort(np.random.default_rng(random_state).choice(n, max_rows, replace=False))


def as_matrix(features) -> np.ndarray:
    """``features`` as a float32 matrix (images x dimensions), or a clear error."""
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or len(features) == 0:
        raise UsageError("features must be a non-empty 2-D array (images x dimensions)")
    return features


def own_rows(n: int, rows=None) -> np.ndarray:
    """The library rows a ``queries=None`` call asks about: ``rows``, or all ``n``."""
    return np.arange(n) if rows is None else np.asarray(rows, int).reshape(-1)


def _sorted_head(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest entries of each row of ``block``, ascending: (values, columns)."""
    if k >= block.shape[1]:
        part = np.broadcast_to(np.arange(block.shape[1]), block.shape).copy()
    else:
        part = np.argpartition(block, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(block, part, 1)
    order = np.argsort(values, axis=1, kind="stable")
    return np.take_along_axis(values, order, 1), np.take_along_axis(part, order, 1)


class Neighbors:
    """Nearest neighbours over a fixed library of vectors (brute force, or a FAISS index for large ones).

    ``center=True`` (cosine only) subtracts the library's mean vector before
    normalising (off by default here; the :class:`Recommender` turns it on for
    cosine). ``index`` answers ``kneighbors``:

    * ``"auto"`` (default): ``"brute"`` up to ``ivf_above`` vectors (and for
      metrics FAISS lacks, or without FAISS installed), ``"ivf"`` up to
      ``pq_above``, ``"ivfpq"`` beyond;
    * ``"brute"``: exact, NumPy matrix products in bounded blocks;
    * ``"faiss"``: an exact FAISS index below 10k vectors, IVF-Flat with
      sqrt(n) lists above;
    * ``"ivf"``: IVF-Flat, sqrt(n) lists (at most ``NLIST_MAX``), probing ``nprobe``;
    * ``"ivfpq"``: IVF-PQ, ``pq_bytes`` a vector; the ``rerank`` best codes
      (at least k + 1) are re-ranked by exact distance from the raw rows
      (``rerank=0``: distances of the codes, approximate).

    The chosen one is ``index_type_`` after :meth:`fit` (``"flat"`` for the exact FAISS index).
    """

    def __init__(self, metric: str = "cosine", *, center: bool = False, index: str = "auto", nprobe: int = 16,
                 ivf_above: int = IVF_ABOVE, pq_above: int = PQ_ABOVE, pq_bytes: int = PQ_BYTES,
                 rerank: int = RERANK):
        self.metric = check_choice("metric", metric, METRICS)
        self.center = bool(center)
        self.index = check_choice("index", index, INDEXES)
        self.nprobe = nprobe
        self.ivf_above, self.pq_above = int(ivf_above), int(pq_above)
        self.pq_bytes, self.rerank = int(pq_bytes), int(rerank)

    def fit(self, features: np.ndarray, *, index_file=None, fingerprint: str | None = None) -> "Neighbors":
        """Hold ``features``; with ``index_file`` and ``fingerprint`` (the library's), a trained FAISS
        index is saved there and reused while the fingerprint and the index settings are unchanged."""
        features = as_matrix(features)
        self.raw_ = features  # the caller's array (no copy): queries by row read it
        self.base_ = None  # set on the copies updated() makes
        self.mean_ = features.mean(0) if self.center and self.metric == "cosine" else None
        # Uncentred cosine for the gate needs each row's length; only kept when centring.
        self.norms_ = None if self.mean_ is None else np.sqrt(np.einsum("ij,ij->i", features, features))
        self.index_type_ = self.index_for(len(features))
        self.index_loaded_ = False  # True when the index was read from index_file instead of trained
        if self.index_type_ == "brute":
            self.library_, self.faiss_index_ = self.transform(features), None
        else:
            # FAISS holds its own copy of the library; a second one in NumPy would double the memory.
            self.library_ = None
            self.faiss_index_ = self._load_or_build(features, index_file, fingerprint)
        return self

    def updated(self, features: np.ndarray, base_rows: np.ndarray) -> "Neighbors":
        """These neighbours over ``features``, a later state of the fitted library, without refitting.

        ``base_rows[r]`` is the fitted row that row ``r`` of ``features`` was (-1: a vector added since). The
        fitted search, index and all, answers for the rows kept; the added ones are searched exactly beside it
        and merged in; removed rows are left out. It is what ``add_with_ids``/``remove_ids`` do to a FAISS
        index, without touching the fitted one, which other snapshots may be searching at the same time: an
        update costs the change, not the library. The centring mean stays the fitted one (refit to renew it).
        """
        base = self if getattr(self, "base_", None) is None else self.base_
        features, base_rows = as_matrix(features), np.asarray(base_rows, np.int64)
        if len(base_rows) != len(features) or base_rows.max(initial=-1) >= base.n:
            raise UsageError(f"{len(base_rows)} base rows (below {base.n}) for {len(features)} vectors")
        new = object.__new__(type(self))
        new.__dict__.update(base.__dict__)
        kept = base_rows >= 0
        new.raw_, new.base_, new.library_, new.faiss_index_ = features, base, None, None
        new.new_row_of_base_ = np.full(base.n, -1, np.int64)
        new.new_row_of_base_[base_rows[kept]] = np.flatnonzero(kept)
        new.added_rows_ = np.flatnonzero(~kept)
        new.added_ = base.transform(features[new.added_rows_])
        new.removed_ = base.n - int(kept.sum())
        if base.norms_ is not None:
            new.norms_ = np.empty(len(features), np.float32)
            new.norms_[kept] = base.norms_[base_rows[kept]]
            added = features[new.added_rows_]
            new.norms_[~kept] = np.sqrt(np.einsum("ij,ij->i", added, added))
        return new

    @property
    def changes(self) -> int:
        """Vectors added and removed since the fitted search (0 for a fitted one): see :meth:`updated`."""
        return 0 if getattr(self, "base_", None) is None else len(self.added_rows_) + self.removed_

    def index_for(self, n: int) -> str:
        """The index :meth:`fit` builds for ``n`` vectors: brute, flat, ivf or ivfpq."""
        if self.index == "brute":
            return "brute"
        if self.index == "auto":
            if self.metric not in FAISS_METRICS or n <= self.ivf_above:
                return "brute"
            if not _faiss_available():
                log.warning("%d vectors: brute force is slow at this size; pip install faiss-cpu for an index", n)
                return "brute"
            return "ivf" if n <= self.pq_above else "ivfpq"
        if self.metric not in FAISS_METRICS:
            raise UsageError("the FAISS index supports the cosine and euclidean metrics; use index='brute'")
        if self.index == "faiss":
            return "flat" if n < FAISS_EXACT_BELOW else "ivf"
        return self.index

    def index_settings(self, n: int, dim: int) -> dict:
        """What the trained index depends on, besides the vectors: its type, size and parameters."""
        kind = self.index_for(n)
        nlist = int(np.sqrt(n)) if self.index == "faiss" else int(np.clip(np.sqrt(n), 1, NLIST_MAX))
        settings = {"format": INDEX_FORMAT, "type": kind, "metric": self.metric,
                    "center": self.center and self.metric == "cosine", "n": int(n), "dim": int(dim)}
        if kind in ("ivf", "ivfpq"):
            settings["nlist"] = max(1, nlist)
            settings["train"] = int(min(n, max(39 * nlist, PQ_TRAIN if kind == "ivfpq" else 0)))
        if kind == "ivfpq":
            settings["m"] = max(m for m in range(1, min(self.pq_bytes, dim) + 1) if dim % m == 0)
            # 256 centroids per subquantizer want 39 x 256 training vectors; fewer, fewer bits.
            settings["nbits"] = int(np.clip(np.floor(np.log2(max(settings["train"] / 39, 2))), 1, 8))
        return settings

    @property
    def n(self) -> int:
        return len(self.raw_)

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Raw feature vectors into the space distances are measured in."""
        vectors = np.atleast_2d(np.asarray(vectors, np.float32))
        if self.metric != "cosine":
            return vectors
        if getattr(self, "mean_", None) is None:
            return l2_normalize(vectors)
        return l2_normalize(vectors - self.mean_, copy=False)  # normalise the fresh centred copy in place

    def _check_queries(self, queries) -> np.ndarray:
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if queries.shape[1] != self.raw_.shape[1]:
            raise UsageError(f"queries are {queries.shape[1]}-d but the library is {self.raw_.shape[1]}-d")
        return queries

    def distances(self, queries: np.ndarray) -> np.ndarray:
        """Distance of each raw query vector to every library vector (one block: keep queries few)."""
        queries = self.transform(self._check_queries(queries))
        if self.library_ is not None:
            return pairwise_distances(queries, self.library_, self.metric, library_normalized=True)
        # Behind a FAISS index there is no transformed copy: transform the library a bounded chunk at a time.
        out = np.empty((len(queries), self.n), np.float32)
        step = max(1, BLOCK_ELEMENTS // (4 * self.raw_.shape[1]))
        for start in range(0, self.n, step):
            out[:, start:start + step] = pairwise_distances(queries, self.transform(self.raw_[start:start + step]),
                                                            self.metric, library_normalized=True)
        return out

    def blocks(self, queries: np.ndarray | None = None, *, rows=None):
        """Yield ``(positions, distances)`` over the queries in blocks of bounded size.

        ``queries=None`` queries the library's own ``rows`` (default: all), each
        with its own distance set to infinity. ``positions`` index the queries.
        """
        own = queries is None
        if own:
            rows = own_rows(self.n, rows)
            total = len(rows)
        else:
            queries = self._check_queries(queries)
            total = len(queries)
        step = max(1, BLOCK_ELEMENTS // self.n)
        for start in range(0, total, step):
            positions = np.arange(start, min(start + step, total))
            if own:
                block = self.distances(self.raw_[rows[positions]])
                block[np.arange(len(positions)), rows[positions]] = np.inf
            else:
                block = self.distances(queries[positions])
            yield positions, block

    def kneighbors(self, queries: np.ndarray | None = None, n_neighbors: int = 5, *, rows=None):
        """``(distances, indices)`` of each query's ``n_neighbors`` nearest library vectors, closest first.

        ``queries=None`` asks for the neighbours of the library's own ``rows``
        (default: all of them), never returning a row as its own neighbour.
        """
        own = queries is None
        count = len(own_rows(self.n, rows)) if own else len(self._check_queries(queries))
        k = min(int(n_neighbors), self.n - int(own))
        if k < 1:
            return np.empty((count, 0), np.float32), np.empty((count, 0), np.int64)
        if getattr(self, "base_", None) is not None:  # (searches saved before updates existed have none)
            return self._merged_kneighbors(queries, rows, k)
        if self.faiss_index_ is not None:
            return self._faiss_kneighbors(queries, rows, k)
        out_d = np.empty((count, k), np.float32)
        out_i = np.empty((count, k), np.int64)
        for positions, block in self.blocks(queries, rows=rows):
            out_d[positions], out_i[positions] = _sorted_head(block, k)
        return out_d, out_i

    def _merged_kneighbors(self, queries, rows, k):
        """kneighbors of an :meth:`updated` search: the fitted one's, renumbered, merged with the added rows'."""
        if queries is None:
            exclude = own_rows(self.n, rows)
            queries = self.raw_[exclude]
        else:
            queries = self._check_queries(queries)
            exclude = np.full(len(queries), -1)
        base = self.base_
        # Enough from the fitted search that k survive the removed rows and the query's own row.
        base_d, base_i = base.kneighbors(queries, min(base.n, k + 1 + self.removed_))
        base_i = np.where(base_i >= 0, self.new_row_of_base_[np.maximum(base_i, 0)], -1)
        distances, indices = [base_d], [base_i]
        if len(self.added_rows_):
            distances.append(pairwise_distances(self.transform(queries), self.added_, self.metric,
                                                library_normalized=True))
            indices.append(np.broadcast_to(self.added_rows_, distances[-1].shape))
        distances, indices = np.concatenate(distances, axis=1), np.concatenate(indices, axis=1)
        missing = (indices < 0) | (indices == exclude[:, None])
        distances = np.where(missing, np.inf, distances)
        order = np.argsort(distances, axis=1, kind="stable")[:, :k]
        distances, indices = np.take_along_axis(distances, order, 1), np.take_along_axis(indices, order, 1)
        out_i = np.where(np.isinf(distances), -1, indices)
        if out_i.shape[1] < k:  # fewer photos left than asked for: padded, as a short library is
            pad = k - out_i.shape[1]
            distances = np.pad(distances, ((0, 0), (0, pad)), constant_values=np.inf)
            out_i = np.pad(out_i, ((0, 0), (0, pad)), constant_values=-1)
        return distances.astype(np.float32), out_i.astype(np.int64)

    def search(self, queries: np.ndarray | None = None, n_neighbors: int = 5, *, rows=None):
        """``(distances, indices, gate_scores)``: :meth:`kneighbors` plus each query's gate score.

        The gate score is the mean distance to the query's ``GATE_NEIGHBOURS``
        nearest library photos, measured *without* centring (compared with the
        gate by :meth:`~similar_finder.thresholds.Calibration.keep`). Centring spreads
        out similarities inside one domain, which is good for ranking, but it
        also makes a photo from another domain look no farther than a photo of
        another class; the uncentred distance keeps that difference.
        """
        centred = self.mean_ is not None
        wanted = max(int(n_neighbors), GATE_CANDIDATES if centred else GATE_NEIGHBOURS)
        distances, indices = self.kneighbors(queries, wanted, rows=rows)
        if centred:
            if queries is None:
                raw = self.raw_[own_rows(self.n, rows)]
            else:
                raw = self._check_queries(queries)
            plain = np.sort(self._uncentred(raw, indices), axis=1)
        else:
            plain = distances
        gate = plain[:, :GATE_NEIGHBOURS].mean(1) if plain.shape[1] else np.full(len(plain), np.inf)
        return distances[:, :n_neighbors], indices[:, :n_neighbors], gate

    def _uncentred(self, queries: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Plain cosine distance from each query to the library rows ``indices`` (inf where -1)."""
        unit = l2_normalize(queries)
        out = np.full(indices.shape, np.inf, np.float32)
        step = max(1, BLOCK_ELEMENTS // max(1, indices.shape[1] * self.raw_.shape[1]))
        for start in range(0, len(indices), step):
            chunk = indices[start:start + step]
            valid = chunk >= 0
            safe = np.where(valid, chunk, 0)
            dots = np.einsum("bd,bmd->bm", unit[start:start + step], self.raw_[safe])
            out[start:start + step] = np.where(valid, 1.0 - dots / np.maximum(self.norms_[safe], 1e-12), np.inf)
        return out

    def pairs_within(self, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair ``i < j`` of library rows at distance ``<= radius``: (i, j, distance)."""
        found_i, found_j, found_d = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.float32)]
        for positions, block in self.blocks():
            r, c = np.nonzero(block <= radius)
            keep = positions[r] < c
            found_i.append(positions[r][keep])
            found_j.append(c[keep])
            found_d.append(block[r[keep], c[keep]])
        return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)

    def _load_or_build(self, features: np.ndarray, index_file, fingerprint):
        settings = self.index_settings(*features.shape)
        persist = index_file is not None and fingerprint is not None and settings["type"] != "flat"
        key = {**settings, "fingerprint": fingerprint}
        if persist:
            index = load_index(Path(index_file), key)
            if index is not None:
                self.index_loaded_ = True
                return self._tuned(index)
        if settings["n"] >= 100_000:
            log.info("building a FAISS %s index of %d vectors (%s lists)", settings["type"], settings["n"],
                     settings.get("nlist", "no"))
        train = features[sample_rows(len(features), settings["train"])] if "train" in settings else features[:0]
        index = build_index(settings, self.transform(train),
                            (self.transform(features[s:s + ADD_BLOCK]) for s in range(0, len(features), ADD_BLOCK)))
        if persist:
            save_index(index, Path(index_file), key)
        return self._tuned(index)

    def _tuned(self, index):
        if hasattr(index, "nprobe"):
            index.nprobe = self.nprobe
        return index

    def _faiss_kneighbors(self, queries, rows, k):
        if queries is None:
            exclude = own_rows(self.n, rows)
        else:
            queries = self._check_queries(queries)
            exclude = np.full(len(queries), -1)
        reranked = self.index_type_ == "ivfpq" and self.rerank > 0
        fetch = min(self.n, max(k + 1, self.rerank if reranked else 0))
        out_d = np.empty((len(exclude), k), np.float32)
        out_i = np.empty((len(exclude), k), np.int64)
        for start in range(0, len(exclude), ADD_BLOCK):  # bounded: no copy of every query at once
            block = slice(start, start + ADD_BLOCK)
            raw = self.raw_[exclude[block]] if queries is None else queries[block]
            unit = np.ascontiguousarray(self.transform(raw))
            scores, indices = self.faiss_index_.search(unit, fetch)
            if reranked:
                distances = self._exact(unit, indices)
            else:
                distances = 1.0 - scores if self.metric == "cosine" else np.sqrt(np.maximum(scores, 0))
            missing = (indices == exclude[block, None]) | (indices < 0)
            distances[missing] = np.inf
            indices[missing] = -1  # never the row itself, not even as padding
            order = np.argsort(distances, axis=1, kind="stable")[:, :k]
            out_d[block], out_i[block] = np.take_along_axis(distances, order, 1), np.take_along_axis(indices, order, 1)
        return out_d, out_i

    def _exact(self, unit: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Exact ranking distances from transformed queries to the library rows ``indices`` (inf where -1)."""
        out = np.full(indices.shape, np.inf, np.float32)
        dim = self.raw_.shape[1]
        step = max(1, BLOCK_ELEMENTS // max(1, indices.shape[1] * dim))
        for start in range(0, len(indices), step):
            chunk = indices[start:start + step]
            valid = chunk >= 0
            rows = self.transform(self.raw_[np.where(valid, chunk, 0).ravel()]).reshape(*chunk.shape, dim)
            if self.metric == "cosine":
                found = 1.0 - np.einsum("bd,bmd->bm", unit[start:start + step], rows)
            else:
                found = np.sqrt(np.maximum(((rows - unit[start:start + step, None]) ** 2).sum(-1), 0.0))
            out[start:start + step] = np.where(valid, found, np.inf)
        return out


# --- FAISS indexes: building, saving, loading ------------------------------------------

def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise UsageError("a FAISS index needs FAISS: pip install faiss-cpu") from exc
    return faiss


def new_index(settings: dict):
    """An empty FAISS index for :meth:`Neighbors.index_settings` (inner product for cosine, else L2)."""
    faiss = _faiss()
    dim, inner = settings["dim"], settings["metric"] == "cosine"
    quantizer = faiss.IndexFlatIP(dim) if inner else faiss.IndexFlatL2(dim)
    if settings["type"] == "flat":
        return quantizer
    metric = faiss.METRIC_INNER_PRODUCT if inner else faiss.METRIC_L2
    if settings["type"] == "ivf":
        return faiss.IndexIVFFlat(quantizer, dim, settings["nlist"], metric)
    return faiss.IndexIVFPQ(quantizer, dim, settings["nlist"], settings["m"], settings["nbits"], metric)


def build_index(settings: dict, train: np.ndarray, blocks):
    """A FAISS index trained on ``train`` and filled from ``blocks`` (arrays of vectors, in row order),
    all already in the space distances are measured in (unit vectors for cosine)."""
    index = new_index(settings)
    if not index.is_trained:
        index.train(np.ascontiguousarray(train, np.float32))
    for block in blocks:
        index.add(np.ascontiguousarray(block, np.float32))
    return index


def _key_file(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _file_check(path: Path) -> str:
    """A cheap identity of a large file: its size and the hash of its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(2 ** 20))
        handle.seek(max(0, size - 2 ** 20))
        digest.update(handle.read(2 ** 20))
    return digest.hexdigest()[:32]


def save_index(index, path: Path, key: dict) -> None:
    """Write ``index`` to ``path`` atomically and its ``key`` beside it (``<path>.json``)."""
    faiss = _faiss()
    _key_file(path).unlink(missing_ok=True)  # an index is only ever trusted with its own key
    try:
        with atomic_write(path, "wb") as handle:  # a temporary file in the same folder, renamed when complete
            faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write))
        write_json(_key_file(path), {**key, "check": _file_check(path)})
    except OSError as exc:  # a read-only library still answers, from an index in memory
        log.warning("cannot save the index %s: %s", path, exc)


def load_index(path: Path, key: dict):
    """The index saved at ``path`` for ``key``, memory-mapped; None (rebuild) if missing, stale or damaged."""
    if not path.is_file():
        return None
    try:
        held = read_json(_key_file(path))
    except (OSError, ValueError):
        log.warning("the index %s has no readable key beside it; rebuilding it", path)
        return None
    if {k: held.get(k) for k in key} != key:
        log.info("the index %s was built for other features or settings; rebuilding it", path)
        return None
    faiss = _faiss()
    try:
        if held.get("check") != _file_check(path):
            raise ValueError("it is not the file that was written")
        # IO_FLAG_MMAP maps the inverted lists of IVF-Flat and IVF-PQ files (as OnDiskInvertedLists,
        # read-only) instead of reading them: checked with faiss-cpu 1.15 for both.
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        if index.ntotal != key["n"] or index.d != key["dim"]:
            raise ValueError(f"it holds {index.ntotal} vectors of {index.d} dimensions")
    except (OSError, RuntimeError, ValueError) as exc:
        log.warning("the index %s is damaged (%s); rebuilding it", path, str(exc).splitlines()[0][:200])
        return None
    return index
