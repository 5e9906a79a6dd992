"""Calibrating the distance under which a neighbour counts as similar.

The statistics are pure functions of distances (:func:`tukey_fence`,
:func:`youden_threshold`); :func:`calibrate_threshold` gathers those distances
from a :class:`~similar_finder.neighbors.Neighbors` and applies them.
"""
from __future__ import annotations

import numpy as np

from .errors import UsageError
from .neighbors import Neighbors, sample_rows

CALIBRATION_QUERIES = 5_000  # above this many images, calibrate on a random sample of queries


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


def class_margins(neighbors: Neighbors, labels: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row: distance to its nearest same-class image and to its nearest other-class one."""
    same_d, other_d = [], []
    for positions, block in neighbors.blocks(rows=rows):
        same = labels[rows[positions]][:, None] == labels[None, :]
        same_d.append(np.where(same, block, np.inf).min(1))
        other_d.append(np.where(same, np.inf, block).min(1))
    return np.concatenate(same_d), np.concatenate(other_d)


def calibrate_threshold(features: np.ndarray, labels=None, metric: str = "cosine", *, center: bool = True,
                        max_queries: int = CALIBRATION_QUERIES, neighbors: Neighbors | None = None) -> dict:
    """Choose the distance under which a neighbour counts as similar.

    With ``labels`` (one class per image) the question is the one a user asks:
    is the nearest image of the same class (answer it) or is there none in the
    library (say "No similar images found")? For every image, the distance to
    its nearest same-class image is a positive and the distance to its nearest
    other-class image a negative; :func:`youden_threshold` separates them.

    Without labels: :func:`tukey_fence` of the nearest-neighbour distances.
    Nearly every library image then has a neighbour within it, while a photo
    farther from the library than its images usually are from each other gets
    no answer.

    Distances are those of ``Neighbors(metric, center=center)`` (pass
    ``neighbors``, fitted on ``features``, to reuse one). Returns ``{"value",
    "method", "metric", ...}``, ready for :meth:`Library.save_threshold`.
    """
    features = np.asarray(features, np.float32)
    if len(features) < 3:
        raise UsageError("at least 3 images are needed to calibrate a threshold")
    neighbors = neighbors or Neighbors(metric, center=center).fit(features)
    rows = sample_rows(len(features), max_queries)
    described = {"metric": neighbors.metric, "center": neighbors.center, "images": len(features)}
    if labels is None:
        nearest, _ = neighbors.kneighbors(None, 1, rows=rows)
        return {"value": tukey_fence(nearest[:, 0]), "method": "nn-tukey-fence", **described}
    labels = np.asarray(labels)
    if len(labels) != len(features):
        raise UsageError(f"{len(labels)} labels for {len(features)} images")
    positives, negatives = class_margins(neighbors, labels, rows)
    positives, negatives = positives[np.isfinite(positives)], negatives[np.isfinite(negatives)]
    if not len(positives) or not len(negatives):
        raise UsageError("calibration needs classes with at least two images and at least two classes")
    return {**youden_threshold(positives, negatives), "method": "labelled-youden", **described}
