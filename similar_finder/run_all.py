"""One command from a folder of photos to pictures a person can look at.

    python -m similar_finder.run_all [IMAGES_DIR] [--out output/<folder>] [--n-sample 5] [--limit N]

extract features (incremental) → tune and fit the K-Means baseline → calibrate
the cosine threshold → a recommendation grid per image for both approaches
(``rec/cosine/`` and ``rec/kmeans/``) → t-SNE map, silhouette curve, distance
histogram → evaluation table (when the folder has class subfolders) →
``report.md`` and ``report.html``. With no folder it runs on the embedded demo
library. ``run_all(...)`` does the same from Python and returns a summary dict.
"""
from __future__ import annotations

import argparse
import base64
import html
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed

from . import _cli
from ._io import OUTPUT_DIR, atomic_write
from .clustering import fit_baseline, l2_normalize, rank_cluster_members
from .demo import ensure_demo_library
from .evaluate import comparison_sets, evaluate_features, labels_from_paths, write_table
from .features import FeatureFiles, extract_features
from .plots import (distance_histogram, recommendation_grid, save_figure, silhouette_curve, tsne_embedding,
                    tsne_map, umap_embedding)
from .recommend import (DEFAULT_METRIC, FEATURE_KINDS, Recommender, calibrate_threshold, check_features,
                        load_library,
                        nearest_neighbour_distances, save_threshold)

log = logging.getLogger("similar_finder")
TSNE_MAX = 5_000  # t-SNE above this many images runs on an even sample of them
REPORT_INLINE_GRIDS = 12  # grids embedded in report.html; the rest are linked


def _grid_name(path: str) -> str:
    return path.replace("/", "__").rsplit(".", 1)[0] + ".png"


def _results(paths, labels, rows, distances) -> pd.DataFrame:
    frame = pd.DataFrame({"path": [paths[i] for i in rows], "distance": np.asarray(distances, float)})
    if labels is not None:
        frame["label"] = labels[rows]
    return frame


def _draw_grids(query, results, titles, root, query_label, folder, name) -> None:
    for approach, frame in results.items():
        fig = recommendation_grid(query, frame, root, title=titles[approach], query_label=query_label)
        save_figure(fig, folder / approach / name, dpi=72)


def _labels(paths) -> np.ndarray | None:
    try:
        return labels_from_paths(paths)
    except ValueError:
        return None


def run_all(images_dir=None, *, out=None, backbone: str | None = None, n_sample: int = 5,
            limit: int | None = None, features: str = "cnn", progress: bool = True, **extract_kwargs) -> dict:
    """Run the whole pipeline on ``images_dir`` and write everything under ``out``.

    ``features`` is what the nearest-neighbour recommender compares: CNN
    features (``"cnn"``, cosine, the default) or another kind (``"color"``,
    ``"phash"``, ``"pca"``, ...); the K-Means baseline always uses CNN features.
    """
    from tqdm import tqdm

    if n_sample < 1:
        raise ValueError(f"n_sample must be at least 1, got {n_sample}")
    check_features(features)
    images_dir = Path(images_dir) if images_dir is not None else ensure_demo_library()
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder {images_dir} does not exist or is not a folder")
    out = Path(out) if out is not None else OUTPUT_DIR / images_dir.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    @contextmanager
    def step(name: str):
        log.info("• %s", name)
        started = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - started, 2)

    features_csv = out / "features.csv"
    with step("extract features"):
        frame = extract_features(images_dir, features_csv, backbone, progress=progress, **extract_kwargs)
    meta, stats = frame.attrs["meta"], frame.attrs["stats"]
    paths = frame["path"].tolist()
    matrix = frame.iloc[:, 1:].to_numpy(np.float32)
    if len(paths) < 5:
        raise ValueError(f"only {len(paths)} usable images in {images_dir}; at least 5 are needed")
    labels = _labels(paths)
    root = Path(meta["images_root"])

    with step("tune and fit K-Means"):
        k_range = range(2, min(11, len(paths)))
        kmeans = fit_baseline(features_csv, k_range=k_range, model_path=out / "kmeans.joblib",
                              clusters_csv=out / "clusters.csv", verbose=False)
        clusters = kmeans.labels_
        save_figure(silhouette_curve(kmeans.tuning_, kmeans.k_), out / "silhouette.png")

    with step("calibrate the threshold"):
        metric = DEFAULT_METRIC[features]
        nn_matrix = matrix if features == "cnn" else load_library(features_csv, features)[1]
        calibration = calibrate_threshold(nn_matrix, labels, metric)
        save_threshold(calibration, features_csv, features=features)
        recommender = Recommender(metric, calibration["value"], features=features).fit(nn_matrix, paths, meta)
        nn, _, _ = nearest_neighbour_distances(nn_matrix, metric)
        save_figure(distance_histogram(nn[:, 0], calibration["value"], label=f"({calibration['method']})"),
                    out / "distances.png")

    with step("recommendation grids"):
        chosen = np.arange(len(paths))
        if limit is not None and limit < len(paths):
            chosen = np.linspace(0, len(paths) - 1, limit).astype(int)
        distances, neighbours = recommender.kneighbors(nn_matrix[chosen], n_sample, exclude=chosen)
        approach = "cosine" if features == "cnn" else features
        unit = l2_normalize(matrix)
        tasks, empty = [], 0
        for row, query in enumerate(chosen):
            keep = distances[row] < calibration["value"]
            cosine_rows = neighbours[row][keep]
            empty += not keep.any()
            members, member_distance = rank_cluster_members(unit, clusters, unit[query], clusters[query],
                                                            exclude=query)
            results = {
                approach: _results(paths, labels, cosine_rows, distances[row][keep]),
                "kmeans": _results(paths, labels, members[:n_sample], member_distance[:n_sample]),
            }
            titles = {approach: f"{features.upper()} nearest neighbours, {metric} (thresholded)",
                      "kmeans": f"K-Means baseline, cluster {clusters[query]}"}
            tasks.append((root / paths[query], results, titles, root,
                          None if labels is None else labels[query], out / "rec", _grid_name(paths[query])))
        # Drawing is the slow part (a few figures per second): one process per core.
        drawn = Parallel(n_jobs=-1, return_as="generator_unordered")(delayed(_draw_grids)(*t) for t in tasks)
        for _ in tqdm(drawn, total=len(tasks), desc="grids", unit="img", disable=not progress):
            pass

    with step("t-SNE and UMAP maps"):
        sample = np.arange(len(paths))
        if len(paths) > TSNE_MAX:
            sample = np.linspace(0, len(paths) - 1, TSNE_MAX).astype(int)
        points = tsne_embedding(matrix[sample])
        colours = {"K-Means cluster": clusters[sample]}
        if labels is not None:
            colours["class"] = labels[sample]
        save_figure(tsne_map(points, colours, paths=[paths[i] for i in sample], images_root=root,
                             thumbnails=min(40, len(sample))), out / "tsne.png")
        save_figure(tsne_map(umap_embedding(matrix[sample]), colours, method="UMAP"), out / "umap.png")

    evaluation = None
    if labels is not None:
        with step("evaluate"):
            evaluation = evaluate_features(matrix, labels, k=n_sample, k_range=k_range,
                                           others=comparison_sets(features_csv, paths, matrix))
            write_table(evaluation, out / "evaluation")

    skipped = pd.read_csv(FeatureFiles(features_csv).skipped)
    summary = {
        "images_dir": str(images_dir), "out": str(out), "backbone": meta["backbone"],
        "weights": meta["weights"], "dim": meta["dim"], "images": stats["images"], "usable": len(paths),
        "embedded": stats["embedded"], "reused": stats["reused"], "skipped": skipped,
        "k": kmeans.k_, "silhouette": kmeans.tuning_, "threshold": calibration,
        "grids": len(chosen), "no_result_queries": int(empty), "tsne_images": len(sample),
        "features": features, "approach": approach, "metric": metric,
        "evaluation": evaluation, "timings": timings,
    }
    write_report(summary, out)
    log.info("done: report at %s, grids in %s, plots in %s", out / "report.md", out / "rec", out)
    return summary


def _markdown_report(s: dict) -> str:
    t = s["threshold"]
    lines = [
        "# similar_finder report", "",
        f"- images folder: `{s['images_dir']}`",
        f"- images: {s['images']} found, {s['usable']} usable, {len(s['skipped'])} skipped; "
        f"this run embedded {s['embedded']} and reused {s['reused']} from the features file",
        f"- backbone: **{s['backbone']}** (weights: {s['weights']}, {s['dim']}-d features)",
        f"- K-Means baseline: chosen **k = {s['k']}** by silhouette score",
        f"- nearest-neighbour recommender: {s['features']} features, {s['metric']} distance, threshold "
        f"**{t['value']:.3f}** ({t['method']}); {s['no_result_queries']} of {s['grids']} queries got "
        f"\"No similar images found\"",
        f"- recommendation grids: {s['grids']} per approach in `rec/{s['approach']}/` and `rec/kmeans/`",
        f"- t-SNE: {s['tsne_images']} images" + (f" (an even sample of {s['usable']})"
                                                   if s["tsne_images"] < s["usable"] else ""),
        "", "## Timings (seconds)", "",
        pd.DataFrame([s["timings"]]).T.rename(columns={0: "seconds"}).to_markdown(),
        "", "## Silhouette score by k", "",
        s["silhouette"].to_markdown(index=False, floatfmt=(".0f", ".4f", ".2f")),
        "", "![silhouette](silhouette.png)", "", "![t-SNE](tsne.png)", "", "![UMAP](umap.png)", "",
        "![distances](distances.png)", "",
    ]
    if s["evaluation"] is not None:
        queries = s["evaluation"].attrs.get("queries", s["usable"])
        sample = f", on an even sample of {queries} query images" if queries < s["usable"] else ""
        lines += [f"## Evaluation (leave-one-out, classes from subfolders{sample})", "",
                  s["evaluation"].to_markdown(index=False, floatfmt=".3f"), ""]
    lines += ["## Skipped files", ""]
    lines += [s["skipped"].to_markdown(index=False) if len(s["skipped"]) else "None.", ""]
    return "\n".join(lines)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def write_report(summary: dict, out: Path) -> None:
    """``report.md`` (images linked) and ``report.html`` (plots and the first grids inline)."""
    markdown = _markdown_report(summary)
    with atomic_write(out / "report.md") as handle:
        handle.write(markdown)
    parts = ["<!doctype html><meta charset='utf-8'><title>similar_finder report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px}</style>"]
    for block in markdown.split("\n\n"):
        if block.startswith("!["):
            name = block[block.index("(") + 1:-1]
            parts.append(_img(out / name))
        elif block.startswith("#"):
            level = len(block) - len(block.lstrip("#"))
            parts.append(f"<h{level}>{html.escape(block.lstrip('# '))}</h{level}>")
        elif block.startswith("|"):
            parts.append(_markdown_table_to_html(block))
        else:
            items = [html.escape(line.lstrip("- ")) for line in block.splitlines() if line.strip()]
            parts.append("<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>")
    grids = sorted((out / "rec" / summary["approach"]).glob("*.png"))
    parts.append(f"<h2>Recommendation grids (first {min(len(grids), REPORT_INLINE_GRIDS)} of {len(grids)})</h2>")
    for grid in grids[:REPORT_INLINE_GRIDS]:
        parts.append(f"<h4>{html.escape(grid.stem)}</h4>{_img(grid)}{_img(out / 'rec' / 'kmeans' / grid.name)}")
    with atomic_write(out / "report.html") as handle:
        handle.write("\n".join(parts))


def _markdown_table_to_html(block: str) -> str:
    rows = [line.strip().strip("|").split("|") for line in block.splitlines() if not set(line) <= set("|:- ")]
    head, body = rows[0], rows[1:]
    cells = "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{cells}</tr>{trs}</table>"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m similar_finder.run_all",
                                     description="Features, both recommenders, grids, plots and a report.")
    parser.add_argument("images_dir", nargs="?", default=None,
                        help="folder of photos (default: the embedded demo library)")
    parser.add_argument("--out", default=None, help="output folder (default: output/<folder name>)")
    _cli.add_backbone_arguments(parser)
    parser.add_argument("--n-sample", type=int, default=5, help="recommendations per image (default: 5)")
    parser.add_argument("--limit", type=int, default=None, help="draw grids for an even sample of N images")
    parser.add_argument("--features", choices=FEATURE_KINDS, default="cnn",
                        help="what the nearest-neighbour recommender compares (default: cnn)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    summary = run_all(args.images_dir, out=args.out, backbone=args.backbone, n_sample=args.n_sample,
                      limit=args.limit, features=args.features, progress=not args.quiet, pooling=args.pooling,
                      input_size=args.input_size, weights=args.weights)
    print(f"\nreport: {Path(summary['out']) / 'report.html'} (and report.md)")
    print(f"grids:  {Path(summary['out']) / 'rec'}/{summary['approach']} and /kmeans ({summary['grids']} each)")
    print(f"plots:  tsne.png, umap.png, silhouette.png, distances.png in {summary['out']}")


if __name__ == "__main__":
    sys.exit(_cli.run(main))
