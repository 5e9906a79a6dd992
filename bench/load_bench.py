"""Loading a large feature library: the binary copy against parsing the CSV.

    python bench/load_bench.py [--n 100000] [--dim 2048]

Writes a library of random vectors through the project's own writer (CSV,
``.npy``, audit, sidecar), then times ``load_features`` on the binary copy and
on the CSV alone (as when a CSV was shared without its companions), and prints
their ratio. Target: 100k x 2048 in well under a second from the binary copy.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from similar_finder.features import load_features  # noqa: E402
from similar_finder.store import AUDIT_COLUMNS, FeatureFiles, write_store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="load-bench-"))
    try:
        rng = np.random.default_rng(0)
        paths = [f"class{i % 10}/img{i:07d}.jpg" for i in range(args.n)]
        shas = [f"{i:064x}" for i in range(args.n)]
        matrix = rng.random((args.n, args.dim), dtype=np.float32)
        audit = pd.DataFrame({"path": paths, "status": "ok", "detail": "", "size": 1000, "mtime_ns": 0,
                              "sha256": shas})[AUDIT_COLUMNS]
        config = {"backbone": "resnet50", "weights": "imagenet", "input_size": 224, "pooling": "avg",
                  "dim": args.dim}
        files = FeatureFiles(work / "features.csv")
        started = time.perf_counter()
        write_store(files, work / "images", audit, matrix, config)
        written = time.perf_counter() - started

        def timed(label):
            started = time.perf_counter()
            loaded_paths, loaded, _ = load_features(files.csv)
            seconds = time.perf_counter() - started
            assert loaded.shape == (args.n, args.dim) and loaded_paths[:3] == paths[:3]
            return seconds

        load_features(files.csv)  # warm the page cache, as on a second use
        binary = min(timed("npy") for _ in range(3))
        files.npy.unlink()
        parsed = timed("csv")
        size = files.csv.stat().st_size / 2**20
        print(f"{args.n} x {args.dim} features; CSV {size:.0f} MiB written (with .npy, audit, sidecar) in {written:.1f} s")
        print(f"load_features from the binary copy: {binary:.2f} s")
        print(f"load_features parsing the CSV:       {parsed:.2f} s   ({parsed / binary:.0f}x slower)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
