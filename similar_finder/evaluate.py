"""How good are the recommendations? Leave-one-out retrieval scores on a labelled folder.

For a folder whose subfolders are classes, ``evaluate(labelled_dir)`` compares
the cosine recommender, the K-Means baseline (distance order and the original
file order) and every other feature kind — other CNN backbones, PCA-reduced
CNN features, colour histograms, perceptual hashes, raw pixels — by
leave-one-out precision@k, recall@k and mean average precision, plus the
honesty of the threshold: how often a query whose class is held out of the
library is correctly answered "No similar images found", and how often a query
whose class is present gets an answer at all. ``dims`` and ``query ms`` show
what each costs in size and speed.
Command line: ``python -m similar_finder.evaluate LABELLED_DIR``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from . import _cli
from ._io import DATA_DIR, OUTPUT_DIR, atomic_write
from .clustering import KMeansBaseline, l2_normalize, rank_cluster_members
from .descriptors import METRIC_OF
from .features import load_features
from .recommend import Recommender, calibrate_threshold

log = logging.getLogger("similar_finder")
PIXEL_SIZE = 32  # raw-pixel baseline: 32 x 32 RGB thumbnails, 3072 values
MAX_QUERIES = 2_000  # above this many images, scores average over an even sample of queries
CALIBRATION_QUERIES = 1_000  # each held-out class recalibrates the threshold: on a sample, to stay fast


def labels_from_paths(paths) -> np.ndarray:
    """The class of each image: its first folder under the images root."""
    labels = np.array([Path(p).parts[0] if len(Path(p).parts) > 1 else "" for p in paths])
    if (labels == "").any() or len(set(labels)) < 2:
        raise ValueError("evaluation needs a folder with one subfolder per class (at least two classes)")
    return labels


def query_rows(n: int, max_queries: int = MAX_QUERIES) -> np.ndarray:
    """Rows that serve as queries: all of them, or an even sample of a large library."""
    return np.arange(n) if n <= max_queries else np.linspace(0, n - 1, max_queries).astype(int)


def retrieval_scores(rankings, labels: np.ndarray, k: int = 5, queries=None) -> dict:
    """Mean precision@k, recall@k and average precision of ranked result lists.

    ``rankings[i]`` lists the library rows returned for query row
    ``queries[i]`` (default: row ``i``), itself excluded, best first; rows never
    returned count as misses.
    """
    counts = pd.Series(labels).value_counts()
    precision, recall, average_precision = [], [], []
    queries = range(len(rankings)) if queries is None else queries
    for query, ranked in zip(queries, rankings):
        relevant_total = counts[labels[query]] - 1
        hits = labels[np.asarray(ranked, dtype=int)] == labels[query]
        precision.append(hits[:k].sum() / k)
        if relevant_total == 0:
            continue
        recall.append(hits[:k].sum() / relevant_total)
        ranks = np.flatnonzero(hits) + 1
        average_precision.append((np.arange(1, len(ranks) + 1) / ranks).sum() / relevant_total)
    return {f"precision@{k}": float(np.mean(precision)), f"recall@{k}": float(np.mean(recall)),
            "mAP": float(np.mean(average_precision))}


def _full_rankings(model: Recommender, matrix: np.ndarray, queries: np.ndarray) -> list[np.ndarray]:
    rankings = []
    for start in range(0, len(queries), 256):  # blocks of queries bound the memory
        rows = queries[start:start + 256]
        distances = model.distances(matrix[rows])
        distances[np.arange(len(rows)), rows] = np.inf
        rankings.extend(np.argsort(distances, axis=1, kind="stable")[:, :-1])  # the query itself sorts last
    return rankings


def _query_ms(model: Recommender, matrix: np.ndarray, k: int, queries: int = 20) -> float:
    """Median time of one query against the library, in milliseconds."""
    times = []
    for row in matrix[:queries]:
        started = time.perf_counter()
        model.kneighbors(row, k)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def _nearest_neighbour_row(name: str, matrix: np.ndarray, metric: str, labels, k: int, queries) -> dict:
    model = Recommender(metric, threshold=np.inf).fit(matrix)  # one library copy for all three measures
    return {"method": name, **retrieval_scores(_full_rankings(model, matrix, queries), labels, k, queries),
            **threshold_honesty(matrix, labels, metric, queries=queries, model=model), "dims": matrix.shape[1],
            "query ms": _query_ms(model, matrix, k)}


def _cluster_rankings(matrix: np.ndarray, k_range, queries) -> tuple[dict[str, list[np.ndarray]], int]:
    """K-Means fitted once; each query's cluster members in distance order and in file order."""
    model = KMeansBaseline(k_range=k_range, verbose=False).fit(matrix)
    labels = model.labels_
    unit = l2_normalize(matrix)
    rankings = {order: [rank_cluster_members(unit, labels, unit[q], labels[q], exclude=q, order=order)[0]
                        for q in queries]
                for order in ("distance", "file")}
    return rankings, model.k_


def threshold_honesty(matrix: np.ndarray, labels: np.ndarray, metric: str = "cosine", *, queries=None,
                      model: Recommender | None = None) -> dict:
    """Share of held-out-class queries answered "No similar images found", and of present-class ones answered.

    Each class in turn is removed from the library; the threshold is calibrated
    on what remains and the removed images are queried against it. ``model`` is
    a Recommender already fitted on the whole ``matrix``, to reuse.
    """
    no_result = []
    for held_out in np.unique(labels):
        inside = labels != held_out
        if len(np.unique(labels[inside])) < 2:
            continue
        threshold = calibrate_threshold(matrix[inside], labels[inside], metric,
                                        max_queries=CALIBRATION_QUERIES)["value"]
        rec = Recommender(metric, threshold).fit(matrix[inside])
        distances, _ = rec.kneighbors(matrix[~inside], 1)
        no_result.extend(distances[:, 0] >= threshold)
    threshold = calibrate_threshold(matrix, labels, metric)["value"]
    model = model or Recommender(metric, threshold).fit(matrix)
    queries = np.arange(len(matrix)) if queries is None else np.asarray(queries)
    distances, _ = model.kneighbors(matrix[queries], 1, exclude=queries)
    return {"held-out: no result": float(np.mean(no_result)),
            "in library: answered": float(np.mean(distances[:, 0] < threshold)),
            "threshold": float(threshold)}


def pixel_features(root: str | os.PathLike, paths, size: int = PIXEL_SIZE) -> np.ndarray:
    """Raw pixels of each image as a vector: the baseline any learnt feature must beat."""
    from .features import _default_workers
    from .images import load_image

    root = Path(root)
    with ThreadPoolExecutor(_default_workers()) as pool:
        pixels = list(pool.map(lambda p: load_image(root / p, size)[0], paths))
    return np.stack(pixels).reshape(len(paths), -1).astype(np.float32)


def evaluate_features(matrix: np.ndarray, labels, *, k: int = 5,
                      others: dict[str, tuple[np.ndarray, str]] | None = None,
                      k_range=range(2, 11), max_queries: int = MAX_QUERIES) -> pd.DataFrame:
    """The comparison table: the cosine recommender and the K-Means baseline on ``matrix``
    (CNN features), then a nearest-neighbour row for each of ``others``
    (``{name: (matrix, metric)}``, e.g. colour histograms or raw pixels).

    Every image is a query against all the others, or an even sample of
    ``max_queries`` of them in a larger library (``table.attrs["queries"]``).
    """
    labels = np.asarray(labels)
    k_range = range(k_range.start, min(k_range.stop, len(matrix)))
    queries = query_rows(len(matrix), max_queries)
    rows = [_nearest_neighbour_row("cosine recommender", matrix, "cosine", labels, k, queries)]
    rankings, chosen_k = _cluster_rankings(matrix, k_range, queries)
    for order, ranked in rankings.items():
        rows.append({"method": f"K-Means baseline ({order} order, k={chosen_k})",
                     **retrieval_scores(ranked, labels, k, queries),
                     # K-Means answers every query with its cluster: it never says "none".
                     "held-out: no result": 0.0, "in library: answered": 1.0, "dims": matrix.shape[1]})
    for name, (other, metric) in (others or {}).items():
        rows.append(_nearest_neighbour_row(name, other, metric, labels, k, queries))
    table = pd.DataFrame(rows)
    table.attrs["queries"] = len(queries)
    return table


def comparison_sets(library: str | os.PathLike, paths, matrix: np.ndarray, *,
                    kinds=("pca", "color", "ahash", "dhash", "phash", "pixels")) -> dict:
    """The other feature kinds of a library, as ``{row name: (matrix, metric)}`` for the table."""
    from .descriptors import KINDS, library_descriptor_sets
    from .reduce import fit_pca

    sets = {}
    names = {"color": "colour histogram, chi2", "ahash": "average hash, hamming",
             "dhash": "difference hash, hamming", "phash": "perceptual hash, hamming"}
    descriptors = library_descriptor_sets(library, [k for k in kinds if k in KINDS])[1]
    for kind in kinds:
        if kind == "pca":
            pca = fit_pca(matrix)
            name = f"CNN PCA-{pca.n_components_} ({pca.variance_kept_:.0%} variance), cosine"
            sets[name] = (pca.transform(matrix).astype(np.float32), "cosine")
        elif kind == "pixels":
            root = Path(load_features(library)[2]["images_root"])
            sets["raw pixels, cosine"] = (pixel_features(root, paths), "cosine")
        else:
            sets[names[kind]] = (descriptors[kind], METRIC_OF[kind])
    return sets


def evaluate(labelled_dir: str | os.PathLike, *, features_csv: str | os.PathLike | None = None,
             backbone: str | None = None, other_backbones=(), k: int = 5,
             out_dir: str | os.PathLike = OUTPUT_DIR, progress: bool = True, **extract_kwargs) -> pd.DataFrame:
    """Score every approach and feature kind on a labelled folder; write CSV and Markdown.

    Features are extracted (incrementally) with ``backbone``; each of
    ``other_backbones`` adds a cosine row of its own (one that cannot be loaded,
    e.g. offline, is reported and left out).
    """
    from .backbones import BackboneError
    from .features import extract_features

    labelled_dir = Path(labelled_dir)
    if features_csv is None:
        features_csv = DATA_DIR / "eval" / f"{labelled_dir.resolve().name}.csv"
    frame = extract_features(labelled_dir, features_csv, backbone, progress=progress, **extract_kwargs)
    paths = frame["path"].tolist()
    labels = labels_from_paths(paths)
    matrix = frame.iloc[:, 1:].to_numpy(np.float32)
    others = {}
    for name in other_backbones:
        csv = Path(features_csv).with_name(f"{Path(features_csv).stem}-{name}.csv")
        try:
            extra = extract_features(labelled_dir, csv, name, progress=progress)
        except BackboneError as exc:
            log.warning("left out %s: %s", name, exc)
            continue
        if extra["path"].tolist() == paths:
            others[f"CNN {name}, cosine"] = (extra.iloc[:, 1:].to_numpy(np.float32), "cosine")
    others.update(comparison_sets(features_csv, paths, matrix))
    table = evaluate_features(matrix, labels, k=k, others=others)
    table.loc[0, "method"] = f"cosine recommender (CNN {frame.attrs['meta']['backbone']})"
    table.attrs["backbone"] = frame.attrs["meta"]["backbone"]
    write_table(table, Path(out_dir) / "evaluation")
    return table


def write_table(table: pd.DataFrame, stem: Path) -> None:
    """Write ``stem.csv`` and ``stem.md`` (GitHub Markdown)."""
    with atomic_write(stem.with_suffix(".csv"), newline="") as handle:
        table.to_csv(handle, index=False, float_format="%.4f")
    with atomic_write(stem.with_suffix(".md")) as handle:
        handle.write(table.to_markdown(index=False, floatfmt=".3f") + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m similar_finder.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("labelled_dir", help="folder with one subfolder of photos per class")
    parser.add_argument("--features", default=None, help="feature CSV (default: data/eval/<folder>.csv)")
    _cli.add_backbone_arguments(parser)
    parser.add_argument("--other-backbones", default="",
                        help="comma-separated backbones to compare too, e.g. resnet50,vgg19")
    parser.add_argument("-k", type=int, default=5, help="results per query scored (default: 5)")
    parser.add_argument("--out", default=str(OUTPUT_DIR), help="folder for evaluation.csv / .md")
    args = parser.parse_args(argv)
    others = [b for b in args.other_backbones.split(",") if b]
    table = evaluate(args.labelled_dir, features_csv=args.features, backbone=args.backbone,
                     other_backbones=others, k=args.k,
                     out_dir=args.out, pooling=args.pooling, input_size=args.input_size, weights=args.weights)
    print(f"\nbackbone: {table.attrs['backbone']}")
    print(table.to_markdown(index=False, floatfmt=".3f"))
    print(f"\nwritten: {Path(args.out) / 'evaluation.csv'} and evaluation.md")


if __name__ == "__main__":
    sys.exit(_cli.run(main))
