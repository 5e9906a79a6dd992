"""Adapters in the few-shot regime: 5, 10, 20 and 50 training photos a class, against the simple baselines.

    python bench/fewshot_bench.py [--splits 3] [--shots 5,10,20,50] [--sets clothing,cifar10,food] [--old]

For each shared set (all 3,781 clothing photos, the 2,000-photo CIFAR-10 sample of ``bench/quality_bench.py``,
the 36 food photos) and each number of photos a class, ``--splits`` random stratified draws of that many training
photos a class; every other photo of the set is a test photo, never trained on (food has 6 a class: 3 to train,
3 to test, so its precision@5 is at most 0.4). Reported: leave-one-out precision@5 among the test photos, mean
and worst split, for

* plain features;
* shrinkage LDA (``LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto")``) and a linear probe, fitted on
  the training photos, unblended (:func:`similar_finder.adapt.training.baseline_projections`);
* ``adapt``: the default :func:`~similar_finder.adapt.training.fit_adapter` (its choice made on the training
  photos alone), and with ``--old`` the MLP head alone as before issue 21 (ArcFace, blended).

Target: the default at least the best baseline on every cell (within 0.01) and never below plain. Features are
those of ``bench/quality_bench.py`` (``data/bench/quality``). Exit status 1 if a target is missed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from conftest import CIFAR, CLOTHING, FOOD_DB, stratified_sample  # noqa: E402
from quality_bench import CIFAR_BENCH_PER_CLASS, Checks, features  # noqa: E402

TOLERANCE = 0.01  # "at least as good as the best baseline": within the spread of one test photo in a hundred


def draw(labels: np.ndarray, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``shots`` training rows a class at random (at most all but 3 of a class), the rest test rows."""
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.choice(np.flatnonzero(labels == c), min(shots, int((labels == c).sum()) - 3),
                                       replace=False) for c in np.unique(labels)])
    return np.sort(train), np.setdiff1d(np.arange(len(labels)), train)


def cell(matrix, labels, train, test, old: bool) -> dict:
    from similar_finder.adapt.model import embed
    from similar_finder.adapt.training import baseline_projections, fit_adapter
    from similar_finder.metrics import retrieval_among

    scores = {"plain": retrieval_among(matrix[test], labels[test])["precision@5"]}
    scores.update({name: s["precision@5"] for name, s in baseline_projections(matrix, labels, train, test).items()})
    started = time.perf_counter()
    model, report = fit_adapter(matrix[train], labels[train])
    scores["adapt"] = retrieval_among(embed(model, matrix[test]), labels[test])["precision@5"]
    scores["adapt s"] = time.perf_counter() - started
    scores["chosen"] = f"{report['method']} {report['plain_weight']:g}"
    if old:
        model, report = fit_adapter(matrix[train], labels[train], methods=("head",))
        scores["old adapt"] = retrieval_among(embed(model, matrix[test]), labels[test])["precision@5"]
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=3)
    parser.add_argument("--shots", default="5,10,20,50")
    parser.add_argument("--sets", default="clothing,cifar10,food")
    parser.add_argument("--old", action="store_true", help="also the MLP head alone, as adapt was before")
    parser.add_argument("--quality", default=str(ROOT / "data" / "bench" / "quality"))
    args = parser.parse_args()
    quality = Path(args.quality)
    cifar = quality / "cifar2000"
    if not cifar.is_dir():
        stratified_sample(CIFAR, cifar, CIFAR_BENCH_PER_CLASS)
    sources = {"clothing": (CLOTHING, "clothing"), "cifar10": (cifar, "cifar2000"), "food": (FOOD_DB, "food")}
    started, rows = time.perf_counter(), []
    for name in args.sets.split(","):
        library = features(sources[name][0], quality, sources[name][1])
        matrix, labels = library.matrix, library.labels(required=True)
        for shots in [3] if name == "food" else [int(s) for s in args.shots.split(",")]:
            for seed in range(args.splits):
                train, test = draw(labels, shots, seed)
                rows.append({"set": name, "per class": shots, "split": seed, **cell(matrix, labels, train, test,
                                                                                     args.old)})
                r = rows[-1]
                print(f"  {name:<9} {shots:>3}/class #{seed}: " + "  ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                    if k not in ("set", "per class", "split")), flush=True)
    table = pd.DataFrame(rows)
    methods = [m for m in ("plain", "shrinkage LDA", "linear probe", "old adapt", "adapt") if m in table]
    summary = table.groupby(["set", "per class"])[methods].agg(["mean", "min"])
    print(summary.round(3).to_string())
    checks = Checks()
    for (name, shots), group in table.groupby(["set", "per class"]):
        best = group[["plain", "shrinkage LDA", "linear probe"]].mean().max()
        checks.at_least(f"{name} {shots}/class: adapt - best baseline (mean)", group["adapt"].mean() - best,
                        -TOLERANCE)
        checks.at_least(f"{name} {shots}/class: adapt - plain (worst split)",
                        (group["adapt"] - group["plain"]).min(), 0.0)
    print(f"{len(checks.missed)} targets missed in {time.perf_counter() - started:.0f} s"
          + (f": {', '.join(checks.missed)}" if checks.missed else ""))
    return 1 if checks.missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
