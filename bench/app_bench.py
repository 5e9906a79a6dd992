"""The web app under load: a bounded number of concurrent clients on loopback against a real server.

    python bench/app_bench.py [--size 100000] [--clients 1,8] [--requests 400] [--searches 40]

Builds a library of ``--size`` random vectors (1280-d, non-negative like ReLU
features, drawn around 1,000 centres; EfficientNet-Lite0's settings, so an
upload is embedded for real), starts ``similar-finder app`` on it in its own
process on 127.0.0.1, and prints the median and 95th-percentile latency of
``/api/similar`` (target p95 < 50 ms at 100k), ``/api/images`` and
``/api/search`` with a real JPEG (the CNN dominates; uploads queue for the one
model), and the server's memory, for each number of concurrent clients (queries that
arrive together are answered by one search, so throughput should grow with the
clients). Every request loop is bounded in count.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from similar_finder.store import AUDIT_COLUMNS, FeatureFiles, write_store  # noqa: E402

QUERY_PHOTO = ROOT.parent / "shared" / "data" / "food" / "queries" / "burger_test.jpeg"


CONFIG = {"backbone": "efficientnet_lite0", "weights": "imagenet", "input_size": 224, "pooling": "avg", "dim": 1280}


def synthetic_vectors(n: int, dim: int = 1280, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """``(audit, matrix)`` of ``n`` photos that do not exist: non-negative vectors around 1,000 centres."""
    rng = np.random.default_rng(seed)
    centres = rng.random((1000, dim), dtype=np.float32)
    matrix = np.empty((n, dim), np.float32)
    for start in range(0, n, 20_000):
        block = matrix[start:start + 20_000]
        block[:] = centres[rng.integers(0, 1000, len(block))] + 0.5 * rng.random(block.shape, dtype=np.float32)
    paths = [f"c{i % 100:02d}/{seed}-{i:07d}.jpg" for i in range(n)]  # no files: the API part needs none
    audit = pd.DataFrame({"path": paths, "status": "ok", "detail": "", "size": 0, "mtime_ns": 0,
                          "sha256": [hashlib.sha256(p.encode()).hexdigest() for p in paths]})[AUDIT_COLUMNS]
    return audit, matrix


def synthetic_library(folder: Path, n: int, dim: int = 1280) -> Path:
    audit, matrix = synthetic_vectors(n, dim)
    files = FeatureFiles(folder / "features.csv")
    (folder / "photos").mkdir(exist_ok=True)
    write_store(files, folder / "photos", audit, matrix, {**CONFIG, "dim": dim})
    return files.csv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def timed(client, method: str, url: str, **kwargs) -> float:
    started = time.perf_counter()
    response = client.request(method, url, **kwargs)
    elapsed = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    return elapsed


def load(base: str, clients: int, count: int, make_request) -> np.ndarray:
    """``count`` requests spread over ``clients`` concurrent connections; their latencies in ms."""
    import httpx

    def worker(share: int, seed: int) -> list[float]:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=base, timeout=120) as client:
            return [make_request(client, rng) for _ in range(share)]

    shares = [count // clients + (i < count % clients) for i in range(clients)]
    with ThreadPoolExecutor(clients) as pool:
        return np.concatenate([np.array(f.result()) for f in [pool.submit(worker, s, i) for i, s in enumerate(shares)]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--clients", default="1,8", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--searches", type=int, default=40)
    args = parser.parse_args()
    photo = QUERY_PHOTO.read_bytes()
    with tempfile.TemporaryDirectory(prefix="app-bench-") as folder:
        started = time.perf_counter()
        csv = synthetic_library(Path(folder), args.size)
        print(f"library: {args.size:,} random 1280-d vectors, written in {time.perf_counter() - started:.1f} s")
        port = free_port()
        started = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "similar_finder", "app", "--features-file", str(csv),
                                   "--port", str(port), "--quiet"], cwd=folder, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            base = f"http://127.0.0.1:{port}"
            for line in server.stdout:  # the server prints its URL once it is ready
                if line.startswith("open "):
                    break
            else:
                raise SystemExit(f"the server stopped: exit status {server.wait()}")
            import httpx

            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(f"{base}/api/info", timeout=5).raise_for_status()
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            print(f"server ready in {time.perf_counter() - started:.1f} s (catalog, backbone, calibration); "
                  f"memory {rss_mb(server.pid)[0]:.0f} MiB")
            n = args.size
            rows = [("GET /api/similar (n=10)", args.requests,
                     lambda c, rng: timed(c, "GET", f"/api/similar/{rng.integers(n)}", params={"n": 10})),
                    ("GET /api/images (200 a page)", args.requests // 4,
                     lambda c, rng: timed(c, "GET", "/api/images", params={"offset": int(rng.integers(n - 200)),
                                                                           "limit": 200, "sort": "path"})),
                    ("POST /api/search (JPEG)", args.searches,
                     lambda c, rng: timed(c, "POST", "/api/search", files={"file": ("q.jpg", photo)}))]
            print(f"\n{'request':<30}{'clients':>8}{'count':>7}{'median ms':>11}{'p95 ms':>9}{'req/s':>8}")
            for name, count, request in rows:
                load(base, 2, 4, request)  # warm-up, not counted
                for clients in map(int, args.clients.split(",")):
                    started = time.perf_counter()
                    latencies = load(base, clients, count, request)
                    rate = count / (time.perf_counter() - started)
                    print(f"{name:<30}{clients:>8}{count:>7}{np.median(latencies):>11.1f}"
                          f"{np.percentile(latencies, 95):>9.1f}{rate:>8.1f}")
            now, peak = rss_mb(server.pid)
            matrix_mb = n * 1280 * 4 / 2**20
            print(f"\nserver memory: {now:.0f} MiB resident, {peak:.0f} MiB peak "
                  f"(the feature matrix alone is {matrix_mb:.0f} MiB; {peak / matrix_mb:.1f}x)")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
