"""Recommendation grids per second, both approaches, as run_all draws them (Pillow, every core).

    python bench/grid_bench.py --features-file data/eval/clothing.csv [--photos 1000]

Needs a feature store (e.g. from `similar-finder extract ../shared/data/clothing --features-file ...`).
Prints photos/s of grids (two grids a photo: cosine and K-Means) against the issue's target of 40, the CPU
seconds the drawing took in all processes (what other work on the machine does not change much), and the
load average before and after, since the cores are shared.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from joblib.externals.loky import get_reusable_executor

from similar_finder.clustering import ClusterRecommender, KMeansBaseline
from similar_finder.library import Library
from similar_finder.neighbors import sample_rows
from similar_finder.pipeline import draw_grids
from similar_finder.recommender import Recommender

TARGET = 40.0


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended (the grid workers, once shut down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features-file", required=True)
    parser.add_argument("--photos", type=int, default=1000, help="grids for an even sample of N photos")
    args = parser.parse_args()
    library = Library(args.features_file)
    approaches = {"cosine": Recommender().fit(library),
                  "kmeans": ClusterRecommender(KMeansBaseline(k=10).fit(library)).fit(library)}
    rows = sample_rows(len(library), args.photos, even=True)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        cpu, started = _cpu_seconds(), time.perf_counter()
        draw_grids(library, approaches, rows, Path(folder), labels=library.labels(), progress=False)
        seconds = time.perf_counter() - started
        get_reusable_executor().shutdown(wait=True)  # so that the workers' CPU time is counted
        cpu = _cpu_seconds() - cpu
        written = sum(1 for _ in Path(folder).rglob("*.jpg"))
    rate = len(rows) / seconds
    print(f"{len(rows)} photos, {written} grids in {seconds:.1f} s: {rate:.1f} photos/s (target {TARGET:.0f}) "
          f"on {len(library)} library photos, {os.cpu_count()} cores; {cpu:.1f} CPU s in all processes "
          f"({len(rows) / cpu:.0f} photos per CPU second); load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    return 0 if rate >= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
