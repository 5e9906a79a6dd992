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

**Where an answer is refused.** Both numbers travel together in one
:class:`Calibration`, with what they were made for and how they were chosen,
and :meth:`Calibration.keep` is the only code that compares a query's
distances and gate score with them: the recommender, the K-Means baseline,
evaluation, the app and the reports all ask it. :func:`choose_calibration` is
the one rule for *which* calibration an approach answers with (explicit values,
else the library's stored ones, else the unlabelled rule).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import UsageError, check_choice
from .neighbors import Neighbors, sample_rows

# What the user reads when nothing is similar enough: the CLI, the app, the grids and the logs.
NO_RESULTS = "No similar images found"
CHOSEN = ("labelled", "unlabelled", "explicit")

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


@dataclass(frozen=True)
class Calibration:
    """When to answer: the distance ``threshold``, the domain ``gate``, and where they came from.

    ``metric`` and ``center`` say which distances they were made for; ``chosen``
    how the threshold was chosen (``"labelled"``: Youden on classes,
    ``"unlabelled"``: Tukey's fence, ``"explicit"``: given by the caller), and
    ``gate_chosen`` the same for the gate (it is calibrated without labels even
    in a labelled calibration). ``method`` is the stored name of the rule
    (``"labelled-youden"``, ``"nn-tukey-fence"``), ``details`` the rest of the
    calibration's record (its trade-off curve, rates, sizes, fingerprint), kept
    so that :meth:`to_dict` writes back what :meth:`from_dict` read.

    ``gate=np.inf`` is no gate. ``gate=None`` means not calibrated: files of
    version 0.1 stored the threshold alone; :func:`choose_calibration`
    completes such a calibration before anything is answered with it.
    """

    threshold: float
    gate: float | None = math.inf
    metric: str | None = None
    center: bool | None = None
    chosen: str = "explicit"
    gate_chosen: str = "explicit"
    method: str | None = None
    details: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        check_choice("calibration choice", self.chosen, CHOSEN)
        check_choice("gate choice", self.gate_chosen, CHOSEN)
        if self.threshold is None or math.isnan(self.threshold):
            raise UsageError("a calibration needs a threshold: a number (np.inf keeps every neighbour)")
        if self.gate is not None and math.isnan(self.gate):
            raise UsageError("the gate must be a number (np.inf turns the gate off), not NaN")
        # Plain floats: numpy scalars would reach the JSON record and the reports' formatting as they are.
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.gate is not None:
            object.__setattr__(self, "gate", float(self.gate))

    # --- the decision -------------------------------------------------------------------

    def admits(self, gate_score) -> np.ndarray:
        """Whether the gate lets each query through: its ``gate_score`` under the gate (always, with no gate).

        Part of :meth:`keep`; asked on its own only to say *why* an answer is empty.
        """
        if self.gate is None:
            raise UsageError("this calibration has no gate (stored by version 0.1): complete it with "
                             "choose_calibration, or calibrate the library again (run-all does)")
        score = np.asarray(gate_score, np.float64)
        if self.gate == math.inf:  # no gate: even a query with no neighbours at all (score inf) passes it
            return np.ones(score.shape, bool)
        return score < self.gate  # NaN (nothing measured) is not under the gate: refused

    def keep(self, distances, indices, gate_score=None) -> np.ndarray:
        """Which neighbours are answered: the one place that decides "answer or refuse".

        ``distances`` and ``indices`` are one query's neighbours (1-D) or many
        queries' (2-D, a row each), as ``kneighbors`` returns them; ``gate_score``
        the query's gate score (a number, or one per row), or None for an
        approach without a gate. A neighbour is kept when it is a real one
        (index not -1), strictly closer than the threshold, and its query passes
        the gate. Returns a boolean mask shaped like ``distances``: a query is
        answered "No similar images found" when its row keeps nothing.
        """
        distances = np.asarray(distances, np.float64)
        indices = np.asarray(indices)
        if distances.shape != indices.shape or distances.ndim not in (1, 2):
            raise UsageError(f"distances {distances.shape} and indices {indices.shape} must be the same shape, "
                             f"one row of neighbours per query")
        # Distances are never below 0; rounding makes an exact copy's cosine distance about -1e-7, and a
        # threshold of 0 must refuse every neighbour, copies included.
        kept = (np.maximum(distances, 0.0) < self.threshold) & (indices >= 0)
        if gate_score is not None:
            admitted = self.admits(gate_score)
            if admitted.size != int(np.prod(distances.shape[:-1])):
                raise UsageError(f"{admitted.size} gate scores for {int(np.prod(distances.shape[:-1]))} queries")
            kept &= admitted.reshape(*distances.shape[:-1], 1)
        return kept

    # --- variants -----------------------------------------------------------------------

    def overridden(self, *, threshold: float | None = None, gate: float | None = None) -> "Calibration":
        """This calibration with an explicit ``threshold`` and/or ``gate`` (None leaves that one as it is).

        Each changes only itself: an explicit threshold keeps the gate, an
        explicit gate (``np.inf``: off) keeps the threshold.
        """
        changes = {}
        if threshold is not None:
            changes.update(threshold=float(threshold), chosen="explicit")
        if gate is not None:
            changes.update(gate=float(gate), gate_chosen="explicit")
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def answer_all(cls, **described) -> "Calibration":
        """No threshold and no gate: every neighbour is answered (the K-Means baseline always answers)."""
        return cls(math.inf, math.inf, method="answer-all", **described)

    # --- the stored form ----------------------------------------------------------------

    def to_dict(self) -> dict:
        """The JSON record (stored in the library's database): ``value``, ``gate``, ``method``, ``metric``,
        ``center``, ``chosen``, ``gate_chosen`` and the details, as :meth:`from_dict` reads them."""
        record = {**self.details, "value": float(self.threshold), "metric": self.metric, "center": self.center,
                  "method": self.method or "explicit", "chosen": self.chosen, "gate_chosen": self.gate_chosen}
        if self.gate is not None:
            record["gate"] = float(self.gate)
        return record

    @classmethod
    def from_dict(cls, record: dict) -> "Calibration":
        """A calibration from its JSON record, or from :func:`calibrate_threshold`'s result.

        Reads every version: records without ``chosen`` (before 0.2) are known by
        their ``method``, records without ``gate`` (version 0.1) get ``gate=None``,
        records without a method (written by hand) count as explicit.
        """
        if "value" not in record:
            raise UsageError(f"a stored calibration needs a 'value' (its threshold), got the keys {sorted(record)}; "
                             f"delete the thresholds file and calibrate again (run-all does)")
        method = record.get("method")
        by_method = "explicit" if method in (None, "explicit") else (
            "labelled" if str(method).startswith("labelled") else "unlabelled")
        known = {"value", "gate", "metric", "center", "method", "chosen", "gate_chosen"}
        return cls(
            threshold=float(record["value"]),
            gate=None if record.get("gate") is None else float(record["gate"]),
            metric=record.get("metric"), center=record.get("center"),
            chosen=record.get("chosen", by_method),
            gate_chosen=record.get("gate_chosen", "explicit" if by_method == "explicit" else "unlabelled"),
            method=method, details={k: v for k, v in record.items() if k not in known})


def choose_calibration(*, threshold: float | None = None, gate: float | None = None,
                       stored: Calibration | None = None, unlabelled: Callable[[], Calibration | None] | None = None,
                       metric: str | None = None, center: bool | None = None) -> Calibration:
    """The calibration an approach answers with, each number on its own.

    The threshold is ``threshold`` if given, else the ``stored`` one (calibrated
    for this library), else the unlabelled rule's; the gate likewise with
    ``gate``. ``unlabelled()`` calibrates without labels and is called only when
    something is missing (it may return None: too few photos, then nothing is
    refused). ``metric`` and ``center`` describe a calibration made of explicit
    values alone.
    """
    needs_threshold = threshold is None and stored is None
    needs_gate = gate is None and (stored is None or stored.gate is None)
    fresh = unlabelled() if unlabelled is not None and (needs_threshold or needs_gate) else None
    base = stored if stored is not None else fresh
    if base is None:  # explicit values alone, or a library too small to calibrate: nothing else is refused
        base = Calibration(math.inf, math.inf, metric=metric, center=center, chosen="unlabelled",
                           gate_chosen="unlabelled",
                           method="too-few-images" if needs_threshold or needs_gate else "explicit")
    if base.gate is None:  # a version 0.1 record: its threshold, with the gate the unlabelled rule finds now
        base = dataclasses.replace(base, gate=math.inf if fresh is None else fresh.gate, gate_chosen="unlabelled")
    return base.overridden(threshold=threshold, gate=gate)
