"""How good are the recommendations? Leave-one-out retrieval scores on a labelled folder.

For a folder whose subfolders are classes, ``evaluate(labelled_dir)`` compares
the cosine recommender, the K-Means baseline (distance order and the original
file order) and every other feature kind — other CNN backbones, PCA-reduced
CNN features, colour histograms, perceptual hashes, raw pixels — by
leave-one-out precision@k, recall@k and mean average precision, plus the
honesty of the threshold: how often a query whose class is held out of the
library is correctly answered "No similar images found", and how often a query
whose class is present gets an answer at all. ``dims`` and ``query ms`` show
what each costs in size and speed. Command line: ``similar-finder evaluate LABELLED_DIR``.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed

from ._io import DATA_DIR, DEFAULT_K_RANGE, OUTPUT_DIR, atomic_write, read_json, write_csv, write_json
from .adapt.pipeline import compare_adapted, fine_tuning_inputs
from .adapt.training import baseline_projections, class_split, stratified_split
from .backbones import BackboneError, weights_value
from .clustering import ClusterRecommender, KMeansBaseline, clip_k_range
from .features import extract_features
from .kinds import get_kind
from .library import Library
from .metrics import full_rankings, retrieval_scores
from .neighbors import Neighbors, sample_rows
from .recommender import Approach, Recommender
from .thresholds import Calibration, calibrate_threshold

log = logging.getLogger(__name__)
MAX_QUERIES = 2_000  # above this many images, scores average over an even sample of queries
PARALLEL_ROWS_ABOVE = 1_000  # from this many images the nearest-neighbour rows are scored in parallel processes
CALIBRATION_QUERIES = 1_000  # each held-out class recalibrates the threshold: on a sample, to stay fast
COMPARED_KINDS = ("pca", "color", "ahash", "dhash", "phash", "pixels")


@dataclass
class Evaluation:
    """The comparison table (one row per method) and how it was made."""

    table: pd.DataFrame
    queries: int  # images used as queries (all, or an even sample of a large library)
    images: int
    backbone: str | None = None
    adaptation: pd.DataFrame | None = None  # plain against adapted retrieval, when asked for

    def to_markdown(self) -> str:
        return self.table.to_markdown(index=False, floatfmt=".3f")

    def save(self, stem: str | os.PathLike) -> None:
        """Write ``stem.csv`` and ``stem.md`` (GitHub Markdown)."""
        stem = Path(stem)
        write_csv(stem.with_suffix(".csv"), self.table, float_format="%.4f")
        markdown = self.to_markdown() + "\n"
        if self.adaptation is not None:
            write_csv(stem.with_name(stem.name + "-adaptation.csv"), self.adaptation, float_format="%.4f")
            markdown += "\n" + self.adaptation.to_markdown(index=False, floatfmt=".3f") + "\n"
        with atomic_write(stem.with_suffix(".md")) as handle:
            handle.write(markdown)


def _query_ms(approach: Approach, matrix: np.ndarray, k: int, queries: int = 20) -> float:
    """Median time of one query against the library, in milliseconds."""
    times = []
    for row in matrix[:queries]:
        started = time.perf_counter()
        approach.kneighbors(row[None], k)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def threshold_honesty(matrix: np.ndarray, labels: np.ndarray, metric: str = "cosine", *, queries=None,
                      neighbors: Neighbors | None = None) -> dict:
    """Share of held-out-class queries answered "No similar images found", and of present-class ones answered.

    Each class in turn is removed from the library; gate and threshold are
    calibrated (with labels) on what remains and the removed images are queried
    against them. ``neighbors`` is a :class:`Neighbors` already fitted on the
    whole ``matrix``, to reuse.
    """
    no_result = np.concatenate([_held_out_no_result(matrix, labels, metric, held_out)
                                for held_out in np.unique(labels)])
    return {"held-out: no result": float(np.mean(no_result)),
            **_present_honesty(matrix, labels, metric, queries=queries, neighbors=neighbors)}


def _held_out_no_result(matrix: np.ndarray, labels: np.ndarray, metric: str, held_out) -> np.ndarray:
    """Which photos of class ``held_out`` are told "No similar images found" by a library of the other classes,
    calibrated (with labels) without them; empty when fewer than two classes would remain."""
    inside = labels != held_out
    if len(np.unique(labels[inside])) < 2:
        return np.zeros(0, bool)
    remaining = Neighbors(metric, center=True).fit(matrix[inside])
    calibration = Calibration.from_dict(calibrate_threshold(matrix[inside], labels[inside], neighbors=remaining,
                                                            max_queries=CALIBRATION_QUERIES))
    return ~_answered(remaining.search(matrix[~inside], 1), calibration)


def _present_honesty(matrix: np.ndarray, labels: np.ndarray, metric: str, *, queries=None,
                     neighbors: Neighbors | None = None) -> dict:
    """:func:`threshold_honesty`'s share of library photos answered with the labelled calibration, and its threshold."""
    neighbors = neighbors or Neighbors(metric, center=True).fit(matrix)
    calibration = Calibration.from_dict(calibrate_threshold(matrix, labels, neighbors=neighbors))
    queries = np.arange(len(matrix)) if queries is None else np.asarray(queries)
    return {"in library: answered": float(np.mean(_answered(neighbors.search(None, 1, rows=queries), calibration))),
            "threshold": calibration.threshold}


def _answered(search_result, calibration: Calibration) -> np.ndarray:
    """Which queries of ``Neighbors.search(...)`` get any answer: the calibration decides (:meth:`Calibration.keep`)."""
    return calibration.keep(*search_result).any(axis=1)


def default_rule_honesty(matrix: np.ndarray, metric: str, queries, other_domain: np.ndarray | None,
                         neighbors: Neighbors) -> dict:
    """With the default (unlabelled) calibration: the share of library photos answered (leave-one-out)
    and, given photos of other domains, the share of those told "No similar images found"."""
    calibration = Calibration.from_dict(calibrate_threshold(matrix, neighbors=neighbors))
    scores = {"library: answered": float(np.mean(_answered(neighbors.search(None, 1, rows=queries), calibration)))}
    if other_domain is not None:
        scores["other-domain: no result"] = float(np.mean(~_answered(neighbors.search(other_domain, 1),
                                                                     calibration)))
    return scores


def _nearest_neighbour_row(name: str, matrix: np.ndarray, metric: str, labels, k: int, queries,
                           other_domain: np.ndarray | None = None, held_out=None) -> dict:
    """A nearest-neighbour row of the table; ``held_out``: its :func:`_held_out_no_result` arrays, when they were
    computed elsewhere (in parallel)."""
    model = Recommender(metric, threshold=np.inf, gate=np.inf).fit(matrix)  # one library copy for every measure
    if held_out is None:
        held_out = [_held_out_no_result(matrix, labels, metric, c) for c in np.unique(labels)]
    return {"method": name, **retrieval_scores(full_rankings(model, queries, len(matrix)), labels, k, queries),
            "held-out: no result": float(np.mean(np.concatenate(held_out))),
            **_present_honesty(matrix, labels, metric, queries=queries, neighbors=model.neighbors_),
            **default_rule_honesty(matrix, metric, queries, other_domain, model.neighbors_),
            "dims": matrix.shape[1], "query ms": _query_ms(model, matrix, k)}


def _on_one_thread(function, *args):
    # Each piece in a process on one thread: two processes keep both cores busy with the single-threaded parts
    # (rankings, chi2), and on shared cores BLAS's and OpenMP's waiting threads spin (see clustering).
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return function(*args)


def comparison_sets(library: Library, kinds=COMPARED_KINDS, other_domain: list[Library] = ()) -> dict:
    """The library's other feature kinds, as ``{row name: (matrix, metric, other-domain matrix or None)}``."""
    library.prepare(kinds)  # every per-photo kind from one decode of each photo
    sets = {}
    for kind in kinds:
        spec = get_kind(kind)
        name = spec.label
        if kind == "pca":
            pca = library.pca()
            name = f"CNN PCA-{pca.n_components_} ({pca.variance_kept_:.0%} variance), cosine"
        sets[name] = (library.vectors(kind), spec.metric, _other_domain_vectors(library, other_domain, kind))
    return sets


def _other_domain_vectors(library: Library, others: list[Library], kind: str) -> np.ndarray | None:
    if not others:
        return None
    return np.vstack([library.vectors_of(other, kind) for other in others])


def evaluate_features(library, labels=None, *, k: int = 5, others: dict | None = None,
                      kinds=COMPARED_KINDS, k_range=DEFAULT_K_RANGE, kmeans: KMeansBaseline | None = None,
                      max_queries: int = MAX_QUERIES, other_domain: list[Library] = ()) -> Evaluation:
    """The comparison table for a :class:`Library` (or a bare matrix with ``labels``).

    Rows: the cosine recommender and the K-Means baseline (``kmeans`` if it is
    already fitted on these features) on the CNN features, then a
    nearest-neighbour row for each of the library's other ``kinds`` and each of
    ``others`` (``{name: (matrix, metric)}``, e.g. another backbone, or
    ``(matrix, metric, {column: value})`` with columns of its own). Every
    image is a query against all the others, or an even sample of
    ``max_queries`` of them in a larger library. ``other_domain``: libraries of
    photos from elsewhere (same backbone), which the default rule should refuse.
    """
    sets = {name: (value[0], value[1], None, *value[2:]) for name, value in (others or {}).items()}
    cnn_other = None
    if isinstance(library, Library):
        labels = library.labels(required=True) if labels is None else labels
        sets = {**comparison_sets(library, kinds, other_domain), **sets}
        matrix, backbone = library.matrix, library.meta.get("backbone")
        cnn_other = _other_domain_vectors(library, other_domain, "cnn")
    else:
        matrix, backbone = np.asarray(library, np.float32), None
    labels = np.asarray(labels)
    queries = sample_rows(len(matrix), max_queries, even=True)
    kmeans = kmeans or KMeansBaseline(k_range=clip_k_range(k_range, len(matrix))).fit(matrix)
    kmeans_rows = []
    for order in ("distance", "file"):
        approach = ClusterRecommender(kmeans, order=order).fit(matrix)
        kmeans_rows.append({"method": f"K-Means baseline ({order} order, k={kmeans.k_})",
                            **retrieval_scores(full_rankings(approach, queries, len(matrix)), labels, k, queries),
                            # K-Means answers every query with its cluster: it never says "none".
                            "held-out: no result": 0.0, "in library: answered": 1.0, "library: answered": 1.0,
                            **({"other-domain: no result": 0.0} if cnn_other is not None else {}),
                            "dims": matrix.shape[1]})
    jobs = [(f"cosine recommender (CNN {backbone})" if backbone else "cosine recommender", matrix, "cosine",
             cnn_other, {})]
    jobs += [(name, other, metric, other_domain_vectors, extra[0] if extra else {})
             for name, (other, metric, other_domain_vectors, *extra) in sets.items()]
    # Each row's held-out classes (one recalibration each, most of a row's time) are pieces of their own,
    # scored in parallel with the rest of the rows; the costliest rows first (chi2 has no matrix product,
    # then by dimensions), so that no process is left with a long piece at the end.
    order = sorted(range(len(jobs)), key=lambda j: (jobs[j][2] != "chi2", -jobs[j][1].shape[1]))
    classes = np.unique(labels)
    pieces = [(j, c) for j in order for c in classes]
    workers = min(len(pieces), os.cpu_count() or 1) if len(matrix) >= PARALLEL_ROWS_ABOVE else 1
    held = Parallel(n_jobs=workers)(delayed(_on_one_thread)(_held_out_no_result, jobs[j][1], labels, jobs[j][2], c)
                                    for j, c in pieces)
    held_of = {j: [h for (row, _), h in zip(pieces, held) if row == j] for j in order}
    scored = Parallel(n_jobs=workers)(delayed(_on_one_thread)(_nearest_neighbour_row, name, vectors, metric, labels,
                                                              k, queries, odv, held_of[j])
                                      for j, (name, vectors, metric, odv, _) in ((j, jobs[j]) for j in order))
    nearest = [None] * len(jobs)
    for j, row in zip(order, scored):
        nearest[j] = {**row, **jobs[j][4]}
    rows = [nearest[0], *kmeans_rows, *nearest[1:]]
    return Evaluation(pd.DataFrame(rows), queries=len(queries), images=len(matrix), backbone=backbone)


def split_backbone_option(entry: str) -> tuple[str, str | None]:
    """``"efficientnet_lite0:gem"`` -> ``("efficientnet_lite0", "gem")``; without ``:POOLING``, its default."""
    name, _, pooling = entry.strip().partition(":")
    return name, (pooling or None)


def _other_backbone_sets(labelled_dir: Path, library: Library, names, progress: bool) -> dict:
    """``{row name: (matrix, "cosine", {"photos/s": ...})}`` for each of ``names`` (``NAME`` or ``NAME:POOLING``)."""
    sets = {}
    for entry in names:
        name, pooling = split_backbone_option(entry)
        suffix = f"{name}-{pooling}" if pooling else name
        csv = library.files.csv.with_name(f"{library.files.csv.stem}-{suffix}.csv")
        try:
            other = extract_features(labelled_dir, csv, name, pooling=pooling, progress=progress)
        except BackboneError as exc:
            log.warning("left out %s: %s", entry, exc)
            continue
        if other.paths == library.paths:
            sets[f"CNN {entry}, cosine"] = (other.matrix, "cosine", {"photos/s": extraction_throughput(other)})
    return sets


def extraction_throughput(library: Library) -> float:
    """Photos embedded per second by the extraction that made ``library`` (reading, decoding, model, writing).

    A run that embedded photos measures it and keeps it beside the features
    (``.throughput.json``); a later run that embeds nothing (all reused)
    reports the kept value. NaN when it was never measured with these settings.
    """
    path = library.files.csv.with_suffix(".throughput.json")
    stats, config = getattr(library, "stats", None), library.config
    if stats is not None and stats.embedded and stats.seconds > 0:
        value = stats.embedded / stats.seconds
        write_json(path, {"photos/s": value, "photos": stats.embedded, "seconds": stats.seconds, "config": config})
        return float(value)
    try:
        kept = read_json(path)
    except (OSError, ValueError):
        return float("nan")
    return float(kept["photos/s"]) if kept.get("config") == config else float("nan")


def other_domain_libraries(library: Library, folders, progress: bool = True) -> list[Library]:
    """Photos of other domains, embedded exactly as ``library`` was, each into a features file beside it."""
    cfg = library.config
    libraries = []
    for folder in map(Path, folders):
        csv = library.files.csv.with_name(f"{library.files.csv.stem}.other-{folder.resolve().name}.csv")
        libraries.append(extract_features(folder, csv, cfg["backbone"], pooling=cfg["pooling"],
                                          input_size=cfg["input_size"], weights=weights_value(cfg["weights"]),
                                          adapter=(cfg.get("adapter") or {}).get("path"), progress=progress))
    return libraries


def adaptation_table(library: Library, *, split: float | None = 0.5, unseen_classes: bool = False,
                     k: int = 5, fine_tune_blocks: int = 0) -> pd.DataFrame:
    """Plain against adapted retrieval on photos the adapter never saw: a stratified ``split`` of the
    photos held out, and/or half of the classes held out (``unseen_classes``). ``fine_tune_blocks``:
    the adapters also fine-tune the backbone's last blocks. Beside them, the simple baselines fitted on the
    same training photos (shrinkage LDA, a linear probe: :func:`baseline_projections`), so that the table
    shows what adapting bought over what a closed-form projection gets."""
    labels = library.labels(required=True)
    tuning = fine_tuning_inputs(library, fine_tune_blocks)[0] if fine_tune_blocks else None
    rows = []
    setups = ([(f"held-out {split:.0%} of each class", stratified_split(labels, split))] if split else []) + \
        ([("held-out half of the classes", class_split(labels, 0.5))] if unseen_classes else [])
    for name, (train, test) in setups:
        plain, adapted = compare_adapted(library.matrix, labels, train, test, k=k, tuning=tuning)
        baselines = baseline_projections(library.matrix, labels, train, test, k=k) if len(set(labels[train])) > 1 \
            else {}
        for method, scores in (("plain", plain), *baselines.items(), ("adapted", adapted)):
            rows.append({"test photos": name, "features": method, "train": len(train), "test": len(test), **scores})
    return pd.DataFrame(rows)


def evaluate(labelled_dir: str | os.PathLike, *, features_csv: str | os.PathLike | None = None,
             backbone: str | None = None, other_backbones=(), other_domains=(), adapt_split: float | None = None,
             adapt_unseen_classes: bool = False, fine_tune_blocks: int = 0, k: int = 5,
             out_dir: str | os.PathLike = OUTPUT_DIR, progress: bool = True, **extract_kwargs) -> Evaluation:
    """Score every approach and feature kind on a labelled folder; write CSV and Markdown.

    Features are extracted (incrementally) with ``backbone``; each of
    ``other_backbones`` (``NAME`` or ``NAME:POOLING``, e.g. ``efficientnet_lite2``,
    ``efficientnet_lite0:gem``, ``efficientnet_lite0+efficientnet_lite2``) adds a
    cosine row of its own (one that cannot be loaded, e.g. offline, is reported
    and left out). Backbone rows carry ``photos/s``, the extraction's throughput
    (see :func:`extraction_throughput`). ``other_domains`` are folders of
    photos unlike the library's (other subjects, non-photos), which the default
    rule should answer with "No similar images found". ``adapt_split`` and
    ``adapt_unseen_classes`` add :func:`adaptation_table`.
    """
    labelled_dir = Path(labelled_dir)
    if features_csv is None:
        features_csv = DATA_DIR / "eval" / f"{labelled_dir.resolve().name}.csv"
    library = extract_features(labelled_dir, features_csv, backbone, progress=progress, **extract_kwargs)
    others = _other_backbone_sets(labelled_dir, library, other_backbones, progress)
    evaluation = evaluate_features(library, k=k, others=others,
                                   other_domain=other_domain_libraries(library, other_domains, progress))
    evaluation.table.loc[0, "photos/s"] = extraction_throughput(library)  # the cosine row of the main backbone
    if adapt_split or adapt_unseen_classes:
        evaluation.adaptation = adaptation_table(library, split=adapt_split, unseen_classes=adapt_unseen_classes,
                                                 k=k, fine_tune_blocks=fine_tune_blocks)
    evaluation.save(Path(out_dir) / "evaluation")
    return evaluation

