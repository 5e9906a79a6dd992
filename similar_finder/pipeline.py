"""The whole pipeline: one call from a folder of photos to pictures a person can look at.

    similar-finder run-all [IMAGES_DIR] [--out output/<folder>] [-n 5] [--limit N] [--only PART,...] [--kind cnn]

extract features (incremental) → tune and fit the K-Means baseline → calibrate
the threshold → a recommendation grid per image for both approaches
(``rec/<approach>/`` and ``rec/kmeans/``) → t-SNE (and on request UMAP) map,
silhouette curve, distance histogram → evaluation table (when the folder has
class subfolders) → ``report.md`` and ``report.html``. ``only`` makes some of
the parts after the threshold (:data:`PARTS`) and not the others; ``limit``
draws grids for an even sample of the photos. With no folder it runs on the
embedded demo library. ``run_all(...)`` does the same from Python and returns a
:class:`RunSummary`.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from tqdm import tqdm

from ._io import DEFAULT_K_RANGE, OUTPUT_DIR
from .clustering import ClusterRecommender, KMeansBaseline, clip_k_range, fit_baseline
from .demo import ensure_demo_library
from .errors import MissingError, UsageError, check_choice, check_positive
from .evaluate import Evaluation, evaluate_features
from .features import extract_features
from .kinds import get_kind
from .library import Library
from .neighbors import sample_rows
from .plots import (distance_histogram, draw_grid_chunk, save_figure, silhouette_curve, threshold_tradeoff,
                    tsne_map)
from .recommender import Recommender
from .reduce import MAP_MAX, tsne_embedding, umap_embedding
from .report import Report

log = logging.getLogger(__name__)
REPORT_INLINE_GRIDS = 12  # grids shown in the report; the rest are in rec/
GRID_CHUNK = 64  # photos whose grids one worker draws at a time
MAPS = ("tsne", "umap")
# What a run can make after the features, both approaches and the threshold, which every part needs.
PARTS = ("grids", "maps", "evaluation", "report")
DEFAULT_MAPS = ("tsne",)
GRID_SUFFIX = ".jpg"  # grids are photos: JPEG writes them in 2 ms, PNG in 50-90 ms


@dataclass
class RunSummary:
    """What a run did and where it put things."""

    images_dir: Path
    out: Path
    library: Library
    kmeans: KMeansBaseline
    threshold: dict
    kind: str
    approach: str
    grids: int  # photos with a grid per approach, drawn in this run
    no_result_queries: int
    tsne_images: int
    evaluation: Evaluation | None
    skipped: pd.DataFrame
    timings: dict[str, float] = field(default_factory=dict)
    parts: tuple[str, ...] = PARTS  # what this run made (``only``)
    grid_files: list[str] = field(default_factory=list)  # the grids' file names in rec/<approach>/, this run's

    @property
    def report(self) -> Path:
        return self.out / "report.html"


def _grid_name(path: str) -> str:
    return path.replace("/", "__").rsplit(".", 1)[0] + GRID_SUFFIX


def draw_grids(library: Library, approaches: dict, rows, folder: Path, *, n_sample: int = 5, labels=None,
               progress: bool = True) -> int:
    """A grid per photo of ``rows`` and approach (``{name: fitted approach}``, one of them ``"kmeans"``), into
    ``folder/<name>/``; returns how many photos the first approach answered "No similar images found"."""
    rows = np.asarray(rows, int)
    titles = {name: f"{approach.kind_.upper()} nearest neighbours, {approach.metric_} (thresholded)"
              for name, approach in approaches.items() if name != "kmeans"}
    clusters = approaches["kmeans"].labels_
    root, paths = library.root, library.paths
    answers = {}
    for name, approach in approaches.items():
        distances, indices, gates = approach.search(None, n_sample, rows=rows)
        # All queries' answers in one call of the rule that decides them (a DataFrame per answer cost more
        # than drawing it).
        answers[name] = distances, indices, approach.calibration_.keep(distances, indices, gates)
    first = next(iter(approaches))
    empty = int((~answers[first][2].any(axis=1)).sum())
    tasks = []
    for position, row in enumerate(rows):
        grids = []
        for name, (distances, indices, kept) in answers.items():
            results = [(root / paths[i], float(d), None if labels is None else labels[i])
                       for d, i in zip(distances[position][kept[position]], indices[position][kept[position]])]
            title = titles[name] if name != "kmeans" else f"K-Means baseline, cluster {clusters[row]}"
            grids.append((title, results, folder / name / _grid_name(paths[row])))
        tasks.append((root / paths[row], None if labels is None else labels[row], grids))
    # Photos of one cluster share most of their results: drawn together, their thumbnails are decoded once
    # per worker. One process per core, each drawing chunks of photos (fewer hand-overs).
    tasks = [tasks[i] for i in np.argsort(clusters[rows], kind="stable")]
    chunks = [tasks[i:i + GRID_CHUNK] for i in range(0, len(tasks), GRID_CHUNK)]
    drawn = Parallel(n_jobs=-1 if len(tasks) > GRID_CHUNK else 1,
                     return_as="generator_unordered")(delayed(draw_grid_chunk)(chunk) for chunk in chunks)
    with tqdm(total=len(tasks), desc="grids", unit="img", disable=not progress) as bar:
        for count in drawn:
            bar.update(count)
    return empty


def run_all(images_dir=None, *, out=None, backbone: str | None = None, n_sample: int = 5,
            limit: int | None = None, kind: str = "cnn", maps=DEFAULT_MAPS, only=None, progress: bool = True,
            **extract_kwargs) -> RunSummary:
    """Run the whole pipeline on ``images_dir`` and write everything under ``out``.

    ``kind`` is what the nearest-neighbour recommender compares: CNN features
    (``"cnn"``, cosine, the default) or another kind (``"color"``, ``"phash"``,
    ``"pca"``, ...); the K-Means baseline always uses CNN features. ``maps``:
    which 2-D maps to draw, ``"tsne"`` (default) and/or ``"umap"`` (its numba
    code compiles for 25-45 s in every new process, most of it uncacheable:
    so only when asked for). ``only``: some of :data:`PARTS` (a name or
    several), e.g. ``("maps", "report")`` for a library too large for a grid
    per photo; default all. ``limit``: grids for an even sample of that many photos.
    """
    check_positive("n_sample", n_sample)
    if limit is not None:
        check_positive("limit", limit)
    maps = [check_choice("map", m, MAPS) for m in ([maps] if isinstance(maps, str) else maps)]
    parts = PARTS if only is None else tuple(check_choice("part", p, PARTS)
                                             for p in ([only] if isinstance(only, str) else only))
    if not parts:
        raise UsageError(f"only must name at least one of {', '.join(PARTS)}")
    get_kind(kind)  # a clear error before any work
    images_dir = Path(images_dir) if images_dir is not None else ensure_demo_library()
    if not images_dir.is_dir():
        raise MissingError(f"images folder {images_dir} does not exist or is not a folder")
    out = Path(out) if out is not None else OUTPUT_DIR / images_dir.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    @contextmanager
    def step(name: str):
        log.info("• %s", name)
        started = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - started, 2)

    with step("extract features"):
        library = extract_features(images_dir, out / "features.csv", backbone, progress=progress, **extract_kwargs)
    if len(library) < 5:
        raise UsageError(f"only {len(library)} usable images in {images_dir}; at least 5 are needed")
    labels = library.labels()

    with step("tune and fit K-Means"):
        k_range = clip_k_range(DEFAULT_K_RANGE, len(library))
        kmeans = fit_baseline(library, k_range=k_range, model_path=out / "kmeans.joblib",
                              clusters_csv=out / "clusters.csv")
        save_figure(silhouette_curve(kmeans.tuning_, kmeans.k_), out / "silhouette.png")

    with step("calibrate the threshold"):
        recommender = Recommender(kind=kind, threshold=np.inf, gate=np.inf).fit(library)
        calibration = recommender.calibrate(labels)
        nearest, _ = recommender.kneighbors(None, 1)
        save_figure(distance_histogram(nearest[:, 0], calibration["value"], label=f"({calibration['method']})"),
                    out / "distances.png")
        if "curve" in calibration:
            save_figure(threshold_tradeoff(calibration["curve"], calibration["value"], youden=calibration["youden"]),
                        out / "threshold.png")

    approaches = {"cosine" if kind == "cnn" else kind: recommender, "kmeans": ClusterRecommender(kmeans).fit(library)}
    chosen, empty = np.arange(0), 0
    if "grids" in parts:
        with step("recommendation grids"):
            chosen = sample_rows(len(library), limit, even=True)
            empty = draw_grids(library, approaches, chosen, out / "rec", n_sample=n_sample, labels=labels,
                               progress=progress)

    sample = np.arange(0)
    if "maps" in parts:
        with step("maps"):
            sample = sample_rows(len(library), MAP_MAX, even=True)
            matrix = library.matrix[sample]
            colours = {"K-Means cluster": kmeans.labels_[sample]}
            if labels is not None:
                colours["class"] = labels[sample]
            if "tsne" in maps:
                save_figure(tsne_map(tsne_embedding(matrix), colours, paths=[library.paths[i] for i in sample],
                                     images_root=library.root, thumbnails=min(40, len(sample))), out / "tsne.png")
            if "umap" in maps:
                save_figure(tsne_map(umap_embedding(matrix), colours, method="UMAP"), out / "umap.png")

    evaluation = None
    if labels is not None and "evaluation" in parts:
        with step("evaluate"):
            evaluation = evaluate_features(library, k=n_sample, kmeans=kmeans)
            evaluation.save(out / "evaluation")

    skipped = pd.read_csv(library.files.skipped)
    summary = RunSummary(images_dir=images_dir, out=out, library=library, kmeans=kmeans, threshold=calibration,
                         kind=kind, approach=next(iter(approaches)), grids=len(chosen), no_result_queries=int(empty),
                         tsne_images=len(sample), evaluation=evaluation, skipped=skipped, timings=timings,
                         parts=parts, grid_files=[_grid_name(library.paths[row]) for row in chosen])
    if "report" in parts:
        with step("report"):
            build_report(summary).save(out)
    log.info("done: %s in %s", ", ".join(parts), out)
    return summary


def build_report(s: RunSummary) -> Report:
    """The run's report, from its summary."""
    library, t, stats = s.library, s.threshold, s.library.stats
    report = Report("similar_finder report").bullets([
        f"images folder: {s.images_dir}",
        f"images: {stats.images} found, {len(library)} usable, {len(s.skipped)} skipped; "
        f"this run embedded {stats.embedded} and reused {stats.reused} from the features file",
        f"backbone: {library.meta['backbone']} (weights: {library.meta['weights']}, "
        f"{library.meta['dim']}-d features)",
        f"K-Means baseline: chosen k = {s.kmeans.k_} by silhouette score",
        f"nearest-neighbour recommender: {s.kind} features, {t['metric']} distance, threshold "
        f"{t['value']:.3f} ({t['method']}), gate {t['gate']:.3f}" +
        (f"; {s.no_result_queries} of {s.grids} queries got \"No similar images found\"" if s.grids else ""),
        _grids_line(s),
        (f"t-SNE: {s.tsne_images} images" + (f" (an even sample of {len(library)})"
                                             if s.tsne_images < len(library) else ""))
        if "maps" in s.parts else "maps: not drawn in this run (--only without maps)",
    ])
    report.heading("Timings (seconds)").table(pd.Series(s.timings, name="seconds").to_frame(), index=True)
    report.heading("Silhouette score by k").table(s.kmeans.tuning_, floatfmt=(".0f", ".4f", ".2f"))
    for name in ("silhouette", "tsne", "umap", "distances", "threshold"):
        if (s.out / f"{name}.png").is_file() and (name != "threshold" or "curve" in t):
            report.image(f"{name}.png", name)
    if s.evaluation is not None:
        sample = f", on an even sample of {s.evaluation.queries} query images" \
            if s.evaluation.queries < len(library) else ""
        report.heading(f"Evaluation (leave-one-out, classes from subfolders{sample})").table(s.evaluation.table)
    elif "evaluation" not in s.parts and library.labels() is not None:
        report.heading("Evaluation").text("Not run in this run (--only without evaluation).")
    report.heading("Skipped files")
    if len(s.skipped):
        report.table(s.skipped)
    else:
        report.text("None.")
    if s.grid_files:
        shown = s.grid_files[:REPORT_INLINE_GRIDS]
        report.heading(f"Recommendation grids (the first {len(shown)} of the {len(s.grid_files)} this run drew)")
        for name in shown:
            stem = Path(name).stem
            report.image(f"rec/{s.approach}/{name}", stem).image(f"rec/kmeans/{name}", stem)
    return report


def _grids_line(s: RunSummary) -> str:
    """How many grids this run drew and where (grids of earlier runs may lie beside them)."""
    if "grids" not in s.parts:
        return "recommendation grids: none drawn in this run (--only without grids)"
    of = f" (an even sample of the {len(s.library)} photos, --limit)" if s.grids < len(s.library) else ""
    return (f"recommendation grids: {s.grids} photos{of}, one grid per approach each, in "
            f"{s.out / 'rec' / s.approach}/ and {s.out / 'rec' / 'kmeans'}/")

