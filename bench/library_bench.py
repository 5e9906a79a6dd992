"""The library database at scale, beside Lance on the same work: open, add 1 and 1,000, remove 1, memory.

    python bench/library_bench.py [--sizes 100000,1000000] [--work DIR] [--no-lance] [--no-service]

For each size, ``n`` generated 1280-d vectors (EfficientNet-Lite0's width; no photo files: see app_bench) are
committed to a library database (``similar_finder.store``), then timed, each in this process, the page cache warm
(written just before):

* open: ``Library(csv)`` (``read_store``: the photos' rows, every segment read and checked block by block; then
  the library's maps by path and by id) and the resident memory it added, against the vectors' own bytes
  (target: ≤ 1.3×); targets 1 s at 100k, 5 s at 1M;
* add 1 real photo with ``add_photos`` (the app's path: hash, embed, commit, read the new state), and the model's
  own time for that photo measured apart (target: the add ≤ 1 s beyond it at 100k);
* add 1,000 photos' vectors (the commit alone: their model time is the model's), remove 1;
* at the smallest size, the app's similar-by-id latency (``LibraryService.similar``, median and p95, in-process)
  while another thread adds photos through ``LibraryService.add_photo``, and how many answers came from the
  library as it was before an add (its index is updated with each add: none should).

The same vectors in Lance (``pylance``, when installed): write, open and read to numpy, append 1 and 1,000,
delete 1. Prints one table per size.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from app_bench import CONFIG, QUERY_PHOTO, synthetic_vectors  # noqa: E402
from similar_finder import store  # noqa: E402
from similar_finder.store import Changes, FeatureFiles, commit  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def timed(function):
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def bench_store(folder: Path, n: int, with_service: bool) -> dict:
    from similar_finder import Library, add_photos, remove_photos
    from similar_finder.embedding import embed_file

    files = FeatureFiles(folder / "features.csv")
    (folder / "photos" / "uploads").mkdir(parents=True)
    audit, matrix = synthetic_vectors(n)
    store.photo_facts = lambda path: dict.fromkeys(("width", "height", "taken", "camera"))  # no photo files
    seconds, _ = timed(lambda: commit(files, Changes(audit, matrix, {}, []), root=folder / "photos", config=CONFIG,
                                      create=True))
    vector_mb = matrix.nbytes / 2**20
    del matrix, audit
    row = {"photos": n, "write s": seconds, "vectors MB": vector_mb}
    before = rss_mb()
    row["open s"], library = timed(lambda: Library(files.csv))  # read, checked, and indexed by path and id
    row["open memory / vectors"] = (rss_mb() - before) / vector_mb
    del store.photo_facts  # real photos from here on
    from similar_finder.images import photo_facts

    store.photo_facts = photo_facts
    target = folder / "photos" / "uploads" / "one.jpg"
    shutil.copy(QUERY_PHOTO, target)
    embed_file(target, library.meta)  # builds the model once: the add below pays only the photo's own time
    row["model s (1 photo)"] = min(timed(lambda: embed_file(target, library.meta))[0] for _ in range(3))
    row["add 1 photo s"], library = timed(lambda: add_photos(library, ["uploads/one.jpg"]))
    extra, more = synthetic_vectors(1000, seed=1)
    row["add 1,000 vectors s"], _ = timed(lambda: commit(files, Changes(extra, more, {}, []), root=library.root,
                                                         config=CONFIG))
    library = Library(files.csv)
    row["remove 1 s"], library = timed(lambda: remove_photos(library, [int(library.ids[0])]))
    if with_service:
        row.update(similar_during_adds(library))
    return row


def similar_during_adds(library) -> dict:
    from similar_finder.service import LibraryService

    service = LibraryService(library)
    service.similar(int(library.ids[1]))  # fits the approach once
    data = QUERY_PHOTO.read_bytes()
    done = threading.Event()

    def adder():
        for i in range(5):
            service.add_photo(data[:-2] + bytes([i, 0xd9]), f"load{i}.jpg")  # a new photo each time (new hash)
        done.set()

    thread = threading.Thread(target=adder)
    latencies, errors, stale = [], 0, 0
    rng = np.random.default_rng(0)
    thread.start()
    while not done.is_set() and len(latencies) < 2000:
        ids = service.library.ids
        started = time.perf_counter()
        try:
            answer = service.similar(int(ids[rng.integers(len(ids))]))
            stale += bool(answer.note and "before its last change" in answer.note)
        except Exception:  # noqa: BLE001 - counted: none is expected
            errors += 1
        latencies.append(time.perf_counter() - started)
    thread.join()
    latencies.sort()
    return {"similar during adds: median ms": 1000 * statistics.median(latencies),
            "p95 ms": 1000 * latencies[int(0.95 * len(latencies))], "requests": len(latencies), "errors": errors,
            "stale answers": stale, "approach refitted": int(service._approaches["cosine"].model_changes() == 0)}


def bench_lance(folder: Path, n: int) -> dict | None:
    try:
        import lance
        import pyarrow as pa
    except ImportError:
        return None
    audit, matrix = synthetic_vectors(n)
    vector_mb = matrix.nbytes / 2**20

    def table(paths, vectors, first_id):
        flat = pa.array(np.ascontiguousarray(vectors).reshape(-1))
        return pa.table({"image_id": pa.array(np.arange(first_id, first_id + len(paths)), pa.int64()),
                         "path": paths, "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})

    uri = str(folder / "vectors.lance")
    row = {"photos": n, "vectors MB": vector_mb}
    row["write s"], _ = timed(lambda: lance.write_dataset(table(audit["path"].tolist(), matrix, 0), uri))
    del matrix

    def open_all():
        data = lance.dataset(uri).to_table(columns=["image_id", "path", "vector"])
        return np.asarray(data.column("vector").combine_chunks().flatten().to_numpy(), np.float32).reshape(-1, 1280)

    before = rss_mb()
    row["open s"], held = timed(open_all)
    row["open memory / vectors"] = (rss_mb() - before) / vector_mb
    del held
    one, one_vector = synthetic_vectors(1, seed=2)
    row["add 1 s"], _ = timed(lambda: lance.write_dataset(table(one["path"].tolist(), one_vector, n), uri,
                                                          mode="append"))
    extra, more = synthetic_vectors(1000, seed=1)
    row["add 1,000 s"], _ = timed(lambda: lance.write_dataset(table(extra["path"].tolist(), more, n + 1), uri,
                                                              mode="append"))
    row["remove 1 s"], _ = timed(lambda: lance.dataset(uri).delete("image_id = 5"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--work", default=None, help="folder for the generated libraries (default: a temporary one)")
    parser.add_argument("--no-lance", action="store_true")
    parser.add_argument("--no-service", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="library-bench-"))
    for n in sizes:
        folder = work / f"n{n}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        rows = {"similar_finder (SQLite + segments)": bench_store(folder / "sqlite", n,
                                                                  not args.no_service and n == sizes[0])}
        if not args.no_lance:
            lance_row = bench_lance(folder, n)
            if lance_row is not None:
                rows["Lance"] = lance_row
        print(f"\n{n:,} photos x 1280-d")
        print(pd.DataFrame(rows).to_markdown(floatfmt=".3f"))
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
