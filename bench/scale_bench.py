"""Search at scale: FAISS indexes over millions of vectors, measured against brute force.

    python bench/scale_bench.py [--part ray|index|all] [--sizes 1000000,10000000] [--dim 1280] [--queries 50]

``--part ray``: the same photos (``--photos``, default the shared clothing set) embedded
in-process and on a local Ray (decode tasks, one model actor): images per second of
each, their ratio (Ray's overhead must stay small: >= 0.8), and whether the vectors agree.

``--part index``: for libraries of random vectors (non-negative like ReLU features,
drawn around 1,000 centres as in ``query_bench.py``), generated in deterministic
chunks so that 10M x 1280 (51 GB of float32) never has to be held, it builds the
indexes ``Neighbors(index="auto")`` builds — IVF-Flat (at sizes up to 2M) and
IVF-PQ, 64 bytes a vector — with the same code (:func:`similar_finder.neighbors.build_index`):
trained on a sample, filled a chunk at a time. Vectors are cosine-ready as the
recommender makes them (centred on the mean of the training sample, unit length).
It prints per size and index: train and add time, the index's bytes (codes, ids,
centroids, codebooks) and the process's peak RSS, the median and 95th-percentile
latency of one query for 5 neighbours (for IVF-PQ: candidates from the codes,
then re-ranked by exact distance from the raw rows, as ``Neighbors`` does; for
``--rerank`` numbers of candidates and the library's default), and recall@5 against brute force, whose ground truth for ``--queries``
new vectors is computed by streaming the chunks again. For IVF-PQ the recall of
the codes alone (no re-ranking) is printed too. At 10M the re-ranking reads the
candidates' rows, gathered during that second pass: a real library of that size
would read them from its memory-mapped ``features.npy``.

FAISS's OpenMP threads wait passively here (``OMP_WAIT_POLICY=PASSIVE``): on a
shared, busy CPU, spinning threads made training 3-5x slower.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before FAISS (and its OpenMP) is loaded

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from similar_finder import neighbors as nb  # noqa: E402

CHUNK = 100_000  # rows generated, transformed and added at a time (512 MB of 1280-d float32)
CENTRES = 1_000
K = 5


def peak_rss_gib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 2 ** 20


class Synthetic:
    """``n`` random vectors of ``dim`` dimensions, chunk ``j`` always the same (seeded by ``j``)."""

    def __init__(self, n: int, dim: int, seed: int = 0):
        self.n, self.dim, self.seed = n, dim, seed
        self.centres = np.random.default_rng(seed).random((CENTRES, dim), dtype=np.float32)

    def chunk(self, j: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, j])
        rows = min(CHUNK, self.n - j * CHUNK)
        block = rng.random((rows, self.dim), dtype=np.float32)
        block *= 0.5
        block += self.centres[rng.integers(0, CENTRES, rows)]
        return block

    def chunks(self):
        for j in range(-(-self.n // CHUNK)):
            yield j * CHUNK, self.chunk(j)

    def queries(self, count: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 2])
        return self.centres[rng.integers(0, CENTRES, count)] + 0.5 * rng.random((count, self.dim), dtype=np.float32)


def index_bytes(index) -> int:
    """What an IVF index holds: codes and ids of every vector, the list centroids, the PQ codebooks."""
    ivf = nb._faiss().extract_index_ivf(index)
    total = ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4
    if hasattr(ivf, "pq"):
        total += ivf.pq.M * ivf.pq.ksub * ivf.pq.dsub * 4
    return int(total)


def part_index(args) -> None:
    """Build time, memory, latency and recall@5 of IVF-Flat and IVF-PQ at each size."""
    faiss = nb._faiss()
    print(f"FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; {args.dim}-d, {args.queries} queries, "
          f"nprobe {args.nprobe}", flush=True)
    header = (f"{'vectors':>10} {'index':<8}{'lists':>5} {'train s':>8} {'add s':>7} {'index MiB':>10} "
              f"{'peak RSS GiB':>12} {'median ms':>10} {'p95 ms':>7} {'recall@5':>9} {'codes only':>10}")
    for n in map(int, args.sizes.split(",")):
        data = Synthetic(n, args.dim)
        types = [t for t in ("ivf", "ivfpq") if t == "ivfpq" or n <= nb.PQ_ABOVE]
        if args.indexes:
            types = [t for t in types if t in args.indexes.split(",")]
        # The training sample: the first rows (chunks are i.i.d., so they are a random sample).
        settings = {t: nb.Neighbors(index=t, nprobe=args.nprobe).index_settings(n, args.dim) for t in types}
        wanted = max(s["train"] for s in settings.values())
        sample = np.concatenate([data.chunk(j) for j in range(-(-wanted // CHUNK))])[:wanted]
        mean = sample.mean(0)

        def transform(x, mean=mean):
            return nb.l2_normalize(x - mean, copy=False)

        indexes, timings = {}, {}
        for t in types:
            index = nb.new_index(settings[t])
            started = time.perf_counter()
            index.train(transform(sample[:settings[t]["train"]]))
            timings[t] = [time.perf_counter() - started, 0.0]
            indexes[t] = index
        del sample
        started = time.perf_counter()
        for start, chunk in data.chunks():  # one pass fills every index
            unit = transform(chunk)
            for t, index in indexes.items():
                t0 = time.perf_counter()
                index.add(unit)
                timings[t][1] += time.perf_counter() - t0
            if start // CHUNK % 10 == 9:
                print(f"  {start + len(chunk):,} of {n:,} added ({time.perf_counter() - started:.0f} s)", flush=True)
        queries = transform(data.queries(args.queries))
        depths = sorted({nb.RERANK, *map(int, args.rerank.split(","))})
        found, latencies = {}, {}
        for t, index in indexes.items():
            index.nprobe = args.nprobe
            for fetch in depths if t == "ivfpq" else [K + 1]:  # IVF-PQ: for each number of candidates re-ranked
                times, answers = [], []
                for q in [*queries[:3], *queries]:  # three to warm up
                    t0 = time.perf_counter()
                    answers.append(index.search(q[None], fetch)[1][0])
                    times.append(time.perf_counter() - t0)
                found[t], latencies[t, fetch] = np.array(answers[3:]), np.array(times[3:]) * 1000
        # Brute force, streaming the chunks again; the IVF-PQ candidates' rows are gathered on the way.
        started = time.perf_counter()
        best_d = np.full((len(queries), K), np.inf, np.float32)
        best_i = np.zeros((len(queries), K), np.int64)
        candidates = {t: f for t, f in found.items() if t == "ivfpq"}
        rows = {t: np.zeros((*f.shape, args.dim), np.float32) for t, f in candidates.items()}
        for start, chunk in data.chunks():
            unit = transform(chunk)
            d = 1.0 - queries @ unit.T
            both_d = np.concatenate([best_d, d], 1)
            both_i = np.concatenate([best_i, start + np.broadcast_to(np.arange(len(chunk)), d.shape)], 1)
            order = np.argsort(both_d, axis=1)[:, :K]
            best_d, best_i = np.take_along_axis(both_d, order, 1), np.take_along_axis(both_i, order, 1)
            for t, f in candidates.items():
                inside = (f >= start) & (f < start + len(chunk))
                rows[t][inside] = unit[f[inside] - start]
        truth_s = time.perf_counter() - started
        for t in types:
            s = settings[t]
            codes = np.mean([len(set(a[:K]) & set(b)) / K for a, b in zip(found[t], best_i)])
            for fetch in depths if t == "ivfpq" else [K + 1]:
                recall, total = codes, latencies[t, fetch]
                if t == "ivfpq":  # re-rank the first ``fetch`` by exact distance, as Neighbors does; time it
                    times, ranked = [], []
                    for q, f, r in zip(queries, found[t][:, :fetch], rows[t][:, :fetch]):
                        t0 = time.perf_counter()
                        ranked.append(f[np.argsort(1.0 - r @ q, kind="stable")[:K]])
                        times.append(time.perf_counter() - t0)
                    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(ranked, best_i)])
                    total = total + np.array(times) * 1000
                name = f"PQ+{fetch}" if t == "ivfpq" else "IVF"
                if header:
                    print(header)
                    header = None
                print(f"{n:>10} {name:<8}{s['nlist']:>5} {timings[t][0]:>8.1f} {timings[t][1]:>7.1f} "
                      f"{index_bytes(indexes[t]) / 2 ** 20:>10.0f} {peak_rss_gib():>12.1f} {np.median(total):>10.2f} "
                      f"{np.percentile(total, 95):>7.2f} {recall:>9.3f} {codes if t == 'ivfpq' else np.nan:>10.3f}",
                      flush=True)
        print(f"  (brute-force ground truth for {len(queries)} queries: {truth_s:.0f} s, streamed)", flush=True)
        del indexes, found


def part_ray(args) -> None:
    """Ray against the in-process engine on the same photos, the same backbone: images per second."""
    import tempfile

    from similar_finder import extract_features
    from similar_finder.ray_engine import start_ray

    photos = Path(args.photos)
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as folder:
        folder = Path(folder)
        started = time.perf_counter()
        local = extract_features(photos, folder / "local.csv", args.backbone, progress=False)
        local_seconds = time.perf_counter() - started
        started = time.perf_counter()
        start_ray()
        ray_start = time.perf_counter() - started
        from similar_finder import ray_engine

        runners = []
        original_run = ray_engine.RayRunner.run
        ray_engine.RayRunner.run = lambda self, *a, **k: runners.append(self) or original_run(self, *a, **k)
        started = time.perf_counter()
        on_ray = extract_features(photos, folder / "ray.csv", args.backbone, progress=False, engine="ray")
        ray_seconds = time.perf_counter() - started
        ray_engine.RayRunner.run = original_run
        warm_up = runners[0].first_results_after
        same = on_ray.paths == local.paths and float(np.abs(on_ray.matrix - local.matrix).max()) < 1e-5
    n = local.stats.embedded
    print(f"\n{n:,} photos of {photos}, {args.backbone}, {os.cpu_count()} CPUs")
    print(f"{'engine':<34}{'seconds':>9}{'images/s':>10}")
    print(f"{'in-process (model built once)':<34}{local_seconds:>9.1f}{n / local_seconds:>10.1f}")
    print(f"{'Ray (actors start, build, embed)':<34}{ray_seconds:>9.1f}{n / ray_seconds:>10.1f}")
    steady = ray_seconds - warm_up
    print(f"{'Ray, once its actors are up':<34}{steady:>9.1f}{n / steady:>10.1f}")
    print(f"Ray / in-process: {local_seconds / ray_seconds:.2f} with the actors' start-up ({warm_up:.1f} s to the first "
          f"results), {local_seconds / steady:.2f} without (target >= 0.8); starting the local Ray took "
          f"{ray_start:.1f} s more; identical vectors: {same}")


PARTS = {"ray": part_ray, "index": part_index}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=[*PARTS, "all"])
    parser.add_argument("--photos", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data" /
                                                "clothing"), help="--part ray: a folder of photos")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="--part ray: the backbone")
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--indexes", default="", help="only these of ivf,ivfpq (default: both where they apply)")
    parser.add_argument("--rerank", default="24,256", help="IVF-PQ: numbers of candidates re-ranked, besides "
                        f"the library's default ({nb.RERANK})")
    args = parser.parse_args(argv)
    for name, part in PARTS.items():
        if args.part in (name, "all"):
            part(args)


if __name__ == "__main__":
    main()
