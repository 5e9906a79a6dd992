"""Retrieval metrics, the one home of "how good is a ranking": precision@k, recall@k and mAP.

Evaluation and the adapters' training and reports score with these, on top of
:class:`~similar_finder.neighbors.Neighbors` (cosine, mean-centred as the
recommender ranks).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .neighbors import Neighbors

SCORE_K = 5
RANKING_BLOCK = 256  # queries ranked at once: bounds the memory of full rankings


def retrieval_scores(rankings, labels: np.ndarray, k: int = 5, queries=None) -> dict:
    """Mean precision@k, recall@k and average precision of ranked result lists.

    ``rankings[i]`` lists the library rows returned for query row
    ``queries[i]`` (default: row ``i``), itself excluded, best first; rows never
    returned (or ``-1`` padding) count as misses.
    """
    counts = pd.Series(labels).value_counts()
    precision, recall, average_precision = [], [], []
    queries = range(len(rankings)) if queries is None else queries
    for query, ranked in zip(queries, rankings):
        ranked = np.asarray(ranked, dtype=int)
        ranked = ranked[ranked >= 0]
        relevant_total = counts[labels[query]] - 1
        hits = labels[ranked] == labels[query]
        precision.append(hits[:k].sum() / k)
        if relevant_total == 0:
            continue
        recall.append(hits[:k].sum() / relevant_total)
        ranks = np.flatnonzero(hits) + 1
        average_precision.append((np.arange(1, len(ranks) + 1) / ranks).sum() / relevant_total)
    return {f"precision@{k}": float(np.mean(precision)), f"recall@{k}": float(np.mean(recall)),
            "mAP": float(np.mean(average_precision))}


def full_rankings(approach, queries: np.ndarray, n: int) -> list[np.ndarray]:
    """Every library row each query row gets from ``approach`` (anything with ``kneighbors``), best first
    (itself excluded)."""
    rankings = []
    for start in range(0, len(queries), RANKING_BLOCK):
        rankings.extend(approach.kneighbors(None, n - 1, rows=queries[start:start + RANKING_BLOCK])[1])
    return rankings


def retrieval_against(queries: np.ndarray, query_labels, library: np.ndarray, library_labels, *,
                      center: bool = True, k: int = SCORE_K) -> dict:
    """precision@k and mAP of new photos (``queries``) searched in a ``library`` of other photos."""
    query_labels, library_labels = np.asarray(query_labels), np.asarray(library_labels)
    _, ranked = Neighbors("cosine", center=center).fit(library).kneighbors(queries, len(library))
    hits = library_labels[ranked] == query_labels[:, None]
    totals = np.maximum(hits.sum(1), 1)
    precision_at = np.cumsum(hits, 1) / np.arange(1, hits.shape[1] + 1)
    return {f"precision@{k}": float(hits[:, :k].mean()),
            "mAP": float(((precision_at * hits).sum(1) / totals).mean())}


def retrieval_among(vectors: np.ndarray, labels: np.ndarray, *, center: bool = True, k: int = SCORE_K) -> dict:
    """Leave-one-out precision@k, recall@k and mAP of cosine retrieval among ``vectors`` alone."""
    neighbors = Neighbors("cosine", center=center).fit(vectors)
    rows = np.arange(len(vectors))
    return retrieval_scores(full_rankings(neighbors, rows, len(vectors)), np.asarray(labels), k, rows)
