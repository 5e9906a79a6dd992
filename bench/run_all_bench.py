"""Each stage of run_all, in seconds and photos/s, for a folder (default: the embedded demo, a first run).

    python bench/run_all_bench.py                                   # the demo, as a new user's first run
    python bench/run_all_bench.py ../shared/data/clothing           # clothing, features extracted in the run
    python bench/run_all_bench.py ../shared/data/clothing --features-from data/eval/clothing.csv

run_all runs in a fresh Python process in an empty folder (so the demo library, the features and every
picture are made from nothing, as on a first run), and its whole wall time is measured from outside: the
interpreter's start and the imports count. ``--features-from STORE`` copies a feature store made by
``similar-finder extract`` (same folder, same backbone) into the run's output first, so the minutes of
extraction are not paid again; then give ``--extraction-seconds`` (what that extraction took) for the
comparison. Prints every stage, what came after extraction against extraction itself (issue 23: at most
1x on clothing), the whole run against 45 s for the demo, and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRACT = "extract features"
GRIDS = "recommendation grids"
DEMO_TARGET_S = 45.0
AFTER_TARGET = 1.0  # everything after extraction, as a multiple of extraction

_CHILD = """
import json, sys
from similar_finder.run_all import run_all
folder, out, maps, limit = sys.argv[1] or None, sys.argv[2], sys.argv[3].split(","), sys.argv[4]
summary = run_all(folder, out=out, maps=maps, limit=int(limit) if limit else None, progress=False)
library = summary.library
print("RESULT " + json.dumps({"timings": summary.timings, "photos": len(library), "grids": summary.grids,
                              "backbone": library.meta["backbone"], "embedded": library.stats.embedded}))
"""


DERIVED = (".cache", ".thumbs", ".throughput.json")  # made from a store by later runs: a first run makes them


def _seed(store: Path, out: Path) -> None:
    """Copy the files of the feature store ``store`` (``x.csv``, ``x.npy``, ``x.sqlite``, ...) to ``out/features.*``,
    without what later runs derive from it (histograms, hashes, thumbnails), which the run makes again."""
    out.mkdir(parents=True, exist_ok=True)
    for part in store.parent.glob(store.stem + ".*"):
        if part.name[len(store.stem):] in DERIVED:
            continue
        target = out / ("features" + part.name[len(store.stem):])
        (shutil.copytree if part.is_dir() else shutil.copy2)(part, target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=None, help="photos (default: the embedded demo library)")
    parser.add_argument("--features-from", type=Path, help="a feature store of the same folder to start from")
    parser.add_argument("--extraction-seconds", type=float,
                        help="with --features-from: what extracting that store took, to compare with")
    parser.add_argument("--maps", default="tsne")
    parser.add_argument("--limit", type=int, default=None, help="run_all --limit")
    args = parser.parse_args()
    folder = str(Path(args.folder).resolve()) if args.folder else ""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="run_all_bench.") as work:
        out = Path(work) / "output"
        if args.features_from:
            _seed(args.features_from.resolve(), out)
        load_before = os.getloadavg()
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _CHILD, folder, str(out), args.maps, str(args.limit or "")],
                              cwd=work, env=env, capture_output=True, text=True)
        whole = time.perf_counter() - started
        load_after = os.getloadavg()
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
        return 2
    result = json.loads(lines[-1][len("RESULT "):])
    timings, photos = result["timings"], result["photos"]
    print(f"{args.folder or 'demo'}: {photos} photos ({result['embedded']} embedded in this run), "
          f"{result['backbone']}, {result['grids']} photos with grids, {os.cpu_count()} cores")
    print(f"{'stage':<26}{'seconds':>9}{'photos/s':>10}")
    for stage, seconds in timings.items():
        count = result["grids"] if stage == GRIDS else (result["embedded"] if stage == EXTRACT else photos)
        rate = f"{count / seconds:10.1f}" if seconds >= 0.1 and count else f"{'':>10}"
        print(f"{stage:<26}{seconds:>9.1f}{rate}")
    after = sum(seconds for stage, seconds in timings.items() if stage != EXTRACT)
    extraction = timings.get(EXTRACT, 0.0) if result["embedded"] else args.extraction_seconds
    print(f"{'after extraction':<26}{after:>9.1f}")
    print(f"{'whole run (wall, process)':<26}{whole:>9.1f}")
    missed = False
    if extraction:
        ratio = after / extraction
        missed |= ratio > AFTER_TARGET
        print(f"after extraction / extraction ({extraction:.1f} s): {ratio:.2f}x (target <= {AFTER_TARGET:.0f}x)")
    if not args.folder:
        missed |= whole > DEMO_TARGET_S
        print(f"demo whole run {whole:.1f} s (target < {DEMO_TARGET_S:.0f} s)")
    print(f"load average before {load_before[0]:.1f} / {load_before[1]:.1f}, after {load_after[0]:.1f} / "
          f"{load_after[1]:.1f} (1 / 5 min)")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
