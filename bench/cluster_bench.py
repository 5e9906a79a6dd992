"""How long K-Means tuning (k = 2..10 by silhouette) takes on large libraries.

    python bench/cluster_bench.py [--sizes 10000,100000] [--dim 2048]

Random vectors drawn around 8 centres. Above 5,000 vectors the silhouette is
estimated on a 5,000-vector sample; above 20,000 MiniBatchKMeans replaces KMeans.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from similar_finder.clustering import tune_k  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--dim", type=int, default=2048)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.random((8, args.dim), dtype=np.float32)
    print(f"{'vectors':>9}{'dim':>6}{'tune k=2..10 s':>16}{'best k':>8}")
    for n in map(int, args.sizes.split(",")):
        data = centres[rng.integers(0, 8, n)] + 0.5 * rng.random((n, args.dim), dtype=np.float32)
        t0 = time.perf_counter()
        _, best = tune_k(data, range(2, 11))
        print(f"{n:>9}{args.dim:>6}{time.perf_counter() - t0:>16.1f}{best:>8}", flush=True)


if __name__ == "__main__":
    main()
