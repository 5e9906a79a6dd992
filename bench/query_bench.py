"""Query latency of the recommender, the CNN forward pass excluded.

    python bench/query_bench.py [--sizes 10000,100000,1000000] [--dim 2048] [--queries 20]

For libraries of random vectors (non-negative like ReLU features, drawn around
1,000 centres so that neighbours mean something and recall can be measured) it prints, per size and index (brute force
NumPy, FAISS), the time to fit, the median and 95th-percentile latency of one
query for 5 neighbours, and the FAISS recall of brute force's neighbours.
Target: under 50 ms per query at 100k vectors on a 2-core machine.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from similar_finder.recommender import Recommender  # noqa: E402


def _latencies(model, queries, k=5):
    times = []
    answers = []
    for q in queries:
        t0 = time.perf_counter()
        answers.append(model.search(q, k)[1][0])
        times.append((time.perf_counter() - t0) * 1000)
    return np.median(times), np.percentile(times, 95), answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--indexes", default="brute,brute+qe,faiss")
    args = parser.parse_args()
    print(f"{'library':>9} {'index':<7}{'fit s':>8}{'median ms':>11}{'p95 ms':>9}{'recall@5':>10}")
    rng = np.random.default_rng(0)
    centres = rng.random((1000, args.dim), dtype=np.float32)
    for n in map(int, args.sizes.split(",")):
        library = np.empty((n, args.dim), np.float32)
        for start in range(0, n, 50_000):  # in blocks: no float64 or temporary copy of 1M x 2048
            block = library[start:start + 50_000]
            block[:] = rng.random(block.shape, dtype=np.float32)
            block *= 0.5
            block += centres[rng.integers(0, len(centres), len(block))]
        queries = centres[rng.integers(0, len(centres), args.queries)] + 0.5 * rng.random(
            (args.queries, args.dim), dtype=np.float32)
        reference = None
        for index in args.indexes.split(","):
            expansion = 5 if index.endswith("+qe") else 0  # "brute+qe": alpha query expansion on top
            t0 = time.perf_counter()
            model = Recommender("cosine", threshold=np.inf, gate=np.inf, index=index.removesuffix("+qe"),
                                query_expansion=expansion).fit(library)
            fit = time.perf_counter() - t0
            _latencies(model, queries[:2])  # warm caches
            median, p95, answers = _latencies(model, queries)
            if reference is None:
                reference, recall = answers, 1.0
            else:
                recall = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(answers, reference)])
            print(f"{n:>9} {index:<7}{fit:>8.1f}{median:>11.1f}{p95:>9.1f}{recall:>10.2f}", flush=True)
            del model
            gc.collect()
        del library
        gc.collect()


if __name__ == "__main__":
    main()
