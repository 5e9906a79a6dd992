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
  a whole, the score that decides whether anything is similar at all.

Everything above it (the recommender, threshold calibration, evaluation,
duplicates) uses this class rather than writing its own loop.
"""
from __future__ import annotations

import numpy as np

from .errors import UsageError, check_choice

METRICS = ("cosine", "euclidean", "manhattan", "chi2", "hamming")
BLOCK_ELEMENTS = 2 ** 25  # a query x library block of at most ~128 MB of float32
GATE_NEIGHBOURS = 3  # the domain gate looks at a query's 3 nearest photos, not just one (robust to a lone copy)
GATE_CANDIDATES = 32  # with centring, uncentred distances are measured on the 32 best-ranked candidates
FAISS_EXACT_BELOW = 10_000  # below this, an exact flat index is as fast as an inverted one


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
        from sklearn.metrics.pairwise import additive_chi2_kernel

        return (-0.5 * additive_chi2_kernel(q, library)).astype(np.float32)
    from sklearn.metrics import pairwise_distances as sk_pairwise

    return sk_pairwise(q, library, metric=check_choice("metric", metric, METRICS)).astype(np.float32)


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
    """Nearest neighbours over a fixed library of vectors (brute force, or FAISS for very large ones).

    ``center=True`` (cosine only) subtracts the library's mean vector before
    normalising (off by default here; the :class:`Recommender` turns it on for
    cosine); ``index="faiss"`` answers ``kneighbors`` from a FAISS index
    (exact below 10k vectors, an inverted-file index probing ``nprobe`` lists above).
    """

    def __init__(self, metric: str = "cosine", *, center: bool = False, index: str = "brute", nprobe: int = 16):
        self.metric = check_choice("metric", metric, METRICS)
        self.center = bool(center)
        self.index = check_choice("index", index, ("brute", "faiss"))
        self.nprobe = nprobe

    def fit(self, features: np.ndarray) -> "Neighbors":
        features = as_matrix(features)
        self.raw_ = features  # the caller's array (no copy): queries by row read it
        self.mean_ = features.mean(0) if self.center and self.metric == "cosine" else None
        # Uncentred cosine for the gate needs each row's length; only kept when centring.
        self.norms_ = None if self.mean_ is None else np.sqrt(np.einsum("ij,ij->i", features, features))
        if self.index == "faiss":
            # FAISS holds its own copy of the library; a second one in NumPy would double the memory.
            self.library_, self.faiss_index_ = None, self._build_faiss(features)
        else:
            self.library_, self.faiss_index_ = self.transform(features), None
        return self

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
        library = self.library_ if self.library_ is not None else self.transform(self.raw_)
        return pairwise_distances(self.transform(self._check_queries(queries)), library, self.metric,
                                  library_normalized=True)

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
        if self.faiss_index_ is not None:
            return self._faiss_kneighbors(queries, rows, k)
        out_d = np.empty((count, k), np.float32)
        out_i = np.empty((count, k), np.int64)
        for positions, block in self.blocks(queries, rows=rows):
            out_d[positions], out_i[positions] = _sorted_head(block, k)
        return out_d, out_i

    def search(self, queries: np.ndarray | None = None, n_neighbors: int = 5, *, rows=None):
        """``(distances, indices, gate_scores)``: :meth:`kneighbors` plus each query's gate score.

        The gate score is the mean distance to the query's ``GATE_NEIGHBOURS``
        nearest library photos, measured *without* centring. Centring spreads
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

    def _build_faiss(self, features: np.ndarray):
        if self.metric not in ("cosine", "euclidean"):
            raise UsageError("the FAISS index supports the cosine and euclidean metrics; use index='brute'")
        try:
            import faiss
        except ImportError as exc:
            raise UsageError("index='faiss' needs FAISS: pip install faiss-cpu") from exc
        n, dim = features.shape
        inner = self.metric == "cosine"
        metric = faiss.METRIC_INNER_PRODUCT if inner else faiss.METRIC_L2
        if n < FAISS_EXACT_BELOW:
            index = faiss.IndexFlatIP(dim) if inner else faiss.IndexFlatL2(dim)
        else:
            # sqrt(n) lists trained on 39 points each (FAISS's minimum) keeps training to
            # seconds at 100k and about a minute at 1M on two cores.
            nlist = int(np.sqrt(n))
            quantizer = faiss.IndexFlatIP(dim) if inner else faiss.IndexFlatL2(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
            index.train(self.transform(features[sample_rows(n, nlist * 39)]))
            index.nprobe = self.nprobe
        for start in range(0, n, 65_536):  # add in blocks: no full transformed copy at once
            index.add(self.transform(features[start:start + 65_536]))
        return index

    def _faiss_kneighbors(self, queries, rows, k):
        if queries is None:
            rows = own_rows(self.n, rows)
            queries, exclude = self.raw_[rows], rows
        else:
            queries = self._check_queries(queries)
            exclude = np.full(len(queries), -1)
        scores, indices = self.faiss_index_.search(np.ascontiguousarray(self.transform(queries)), k + 1)
        distances = 1.0 - scores if self.metric == "cosine" else np.sqrt(np.maximum(scores, 0))
        distances[(indices == exclude[:, None]) | (indices < 0)] = np.inf
        order = np.argsort(distances, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(distances, order, 1), np.take_along_axis(indices, order, 1)
