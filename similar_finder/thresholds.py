"""Calibrating when to answer: is anything similar at all, and which neighbours count as similar.

Two numbers decide, both calibrated on the library itself:

* the **gate** – a query is answered only if its mean *uncentred* distance to
  its 3 nearest photos (its gate score, see :meth:`Neighbors.search`) is under
  Tukey's fence of the library's own gate scores: a photo farther from the
  library than its photos are from each other is "No similar images found";
* the **threshold** – among the neighbours of an answered query, only those
  closer than it (in the ranking distance) are returned.

The statistics are pure functions of distances (:func:`tukey_fence`,
:func:`youden_threshold`, :func:`answered_floor`, :func:`tradeoff_curve`);
:func:`calibrate_threshold` gathers those distances from a
:class:`~similar_finder.neighbors.Neighbors` and applies them.
"""
from __future__ import annotations

import numpy as np

from .errors import UsageError
from .neighbors import Neighbors, sample_rows

CALIBRATION_QUERIES = 5_000  # above this many images, calibrate on a random sample of queries
# A labelled threshold leaves at most 1 library photo in 10 unanswered: calibrated for 92%, a margin
# for the sampling of large libraries (scores are measured on other samples than the calibration's).
MIN_ANSWERED = 0.92


def tukey_fence(nearest: np.ndarray) -> float:
    """Q3 + 1.5 IQR of nearest-neighbour distances: beyond it, a distance is unusual for this library."""
    q1, q3 = np.percentile(np.asarray(nearest).ravel(), [25, 75])
    return float(q3 + 1.5 * (q3 - q1))


def youden_threshold(positives: np.ndarray, negatives: np.ndarray) -> dict:
    """The distance that best separates positives (should be answered) from negatives (should not).

    Maximises TPR - FPR (Youden's J) and sits midway in the gap where J is
    best, for a margin on both sides. Returns ``{"value", "tpr", "fpr"}``.
    """
    from sklearn.metrics import roc_curve

    truth = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    fpr, tpr, thresholds = roc_curve(truth, -np.r_[positives, negatives], drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    low = -thresholds[best]
    high = -thresholds[best + 1] if best + 1 < len(thresholds) else low
    # best == 0 accepts nothing (no distance separates the classes): a threshold at the smallest
    # distance says so, since only distances strictly below it count.
    value = (low + high) / 2 if np.isfinite(low) else high
    return {"value": float(value), "tpr": float(tpr[best]), "fpr": float(fpr[best])}


def answered_floor(nearest: np.ndarray, gate_ok: np.ndarray, share: float = MIN_ANSWERED) -> float:
    """The smallest threshold under which ``share`` of the photos get an answer (their nearest neighbour
    under it, and the gate passed); if the gate alone refuses more than that, the one that answers
    every photo the gate lets through."""
    answerable = np.sort(np.asarray(nearest)[np.asarray(gate_ok)])
    needed = min(int(np.ceil(share * len(nearest))), len(answerable))
    if needed == 0:
        return float("-inf")
    return float(np.nextafter(answerable[needed - 1], np.float32(np.inf)))  # "under": strictly below


def tradeoff_curve(nearest, gate_ok, positives, negatives, points: int = 50) -> dict:
    """For thresholds across the observed distances: the share of library photos answered, of photos
    whose nearest same-class photo is under the threshold, and of photos whose nearest photo of
    another class is kept out. Lists of floats, ready for JSON and :func:`plots.threshold_tradeoff`."""
    finite = np.concatenate([np.asarray(a)[np.isfinite(a)] for a in (nearest, positives, negatives)])
    grid = np.linspace(finite.min(), finite.max(), points) if len(finite) else np.zeros(0)
    nearest, gate_ok = np.asarray(nearest), np.asarray(gate_ok)
    return {
        "threshold": grid.tolist(),
        "library answered": [float(np.mean(gate_ok & (nearest < t))) for t in grid],
        "same class found": [float(np.mean(np.asarray(positives) < t)) for t in grid],
        "other classes kept out": [float(np.mean(np.asarray(negatives) >= t)) for t in grid],
    }


def class_margins(neighbors: Neighbors, labels: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row: distance to its nearest same-class image and to its nearest other-class one."""
    same_d, other_d = [], []
    for positions, block in neighbors.blocks(rows=rows):
        same = labels[rows[positions]][:, None] == labels[None, :]
        same_d.append(np.where(same, block, np.inf).min(1))
        other_d.append(np.where(same, np.inf, block).min(1))
    return np.concatenate(same_d), np.concatenate(other_d)


def calibrate_threshold(features: np.ndarray, labels=None, metric: str = "cosine", *, center: bool = True,
                        max_queries: int = CALIBRATION_QUERIES, neighbors: Neighbors | None = None,
                        min_answered: float = MIN_ANSWERED) -> dict:
    """Calibrate the gate and the threshold of a library (see the module's docstring).

    The gate is always Tukey's fence of the library's gate scores: it needs no labels.

    The threshold, without ``labels``: Tukey's fence of the nearest-neighbour
    distances. Nearly every library photo then has a neighbour within it.

    With ``labels`` (one class per image) the question is the one a user asks:
    is the nearest image of the same class (answer it) or of another class (it
    should not be offered)? The distance to each photo's nearest same-class
    photo is a positive, to its nearest other-class photo a negative, and
    :func:`youden_threshold` separates them, raised where needed so that at
    least ``min_answered`` of the library photos still get an answer
    (:func:`answered_floor`); ``curve`` shows the trade-off.

    Distances are those of ``Neighbors(metric, center=center)`` (pass
    ``neighbors``, fitted on ``features``, to reuse one). Returns ``{"value",
    "gate", "method", "metric", ...}``, ready for :meth:`Library.save_threshold`.
    """
    features = np.asarray(features, np.float32)
    if len(features) < 3:
        raise UsageError("at least 3 images are needed to calibrate a threshold")
    neighbors = neighbors or Neighbors(metric, center=center).fit(features)
    rows = sample_rows(len(features), max_queries)
    nearest, _, gate_scores = neighbors.search(None, 1, rows=rows)
    nearest = nearest[:, 0]
    gate = tukey_fence(gate_scores)
    described = {"gate": gate, "metric": neighbors.metric, "center": neighbors.center, "images": len(features)}
    if labels is None:
        return {"value": tukey_fence(nearest), "method": "nn-tukey-fence", **described}
    labels = np.asarray(labels)
    if len(labels) != len(features):
        raise UsageError(f"{len(labels)} labels for {len(features)} images")
    positives, negatives = class_margins(neighbors, labels, rows)
    if not np.isfinite(positives).any() or not np.isfinite(negatives).any():
        raise UsageError("calibration needs classes with at least two images and at least two classes")
    best = youden_threshold(positives[np.isfinite(positives)], negatives[np.isfinite(negatives)])
    gate_ok = gate_scores < gate
    floor = answered_floor(nearest, gate_ok, min_answered)
    return {**best, "value": max(best["value"], floor), "youden": best["value"], "floor": floor,
            "method": "labelled-youden", "raised": bool(floor > best["value"]),
            "curve": tradeoff_curve(nearest, gate_ok, positives, negatives), **described}
