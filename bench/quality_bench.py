"""Full-size quality checks: what the test suite checks on samples, on the whole shared sets.

    python bench/quality_bench.py [--part trust,adapt,fine-tune | all] [--work data/bench/quality]

The default suite (``python -m pytest``) checks every capability on real features of stratified samples (500
clothing photos, 500 CIFAR-10 photos) with thresholds measured on those samples; the figures the README quotes
are of the whole sets, and are held to their targets here:

``trust``: the default answer rule with each set as the library — the food photos, all 3,781 clothing photos,
a 2,000-photo CIFAR-10 sample (200 a class) — answers at least 0.97 of its own photos (each against all the
others) and refuses at least 0.95 of every other set's photos (the other sets, the food queries, 60 generated
non-photos); a food photo gets no clothing; the labelled calibration on clothing keeps at least 0.90 answered.

``adapt``: an adapter on frozen features, trained on half of each clothing class, lifts P@5 among the other half
by at least 0.08 and mAP by 0.15 over the plain features (plain P@5 under 0.75).

``fine-tune``: the same with the last 2 blocks of EfficientNet-Lite0 fine-tuned: adapted P@5 at least 0.84.

Features (EfficientNet-Lite0, ImageNet weights, 224 px) are extracted incrementally into ``--work``, so a second
run embeds nothing. Each check prints its figure beside its target; the exit status is 1 if any target is missed.
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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The shared sets, the sampling and the generated non-photos of the test suite, so that both check the same photos.
from conftest import CIFAR, CLOTHING, FOOD_DB, FOOD_QUERIES, stratified_sample, write_non_photos  # noqa: E402

PARTS = ("trust", "adapt", "fine-tune")
CIFAR_BENCH_PER_CLASS = 200  # the 2,000-photo CIFAR-10 sample the README's figures are of


class Checks:
    """Figures against targets, printed as they come."""

    def __init__(self):
        self.missed: list[str] = []

    def at_least(self, name: str, value: float, target: float) -> None:
        self._report(name, value, f">= {target:g}", value >= target)

    def below(self, name: str, value: float, target: float) -> None:
        self._report(name, value, f"< {target:g}", value < target)

    def holds(self, name: str, ok: bool) -> None:
        self._report(name, None, "holds", ok)

    def _report(self, name, value, target, ok) -> None:
        figure = "" if value is None else f"{value:.3f}"
        print(f"  {name:<58} {figure:>6}  target {target:<8} {'ok' if ok else 'MISSED'}", flush=True)
        if not ok:
            self.missed.append(name)


def features(folder: Path, work: Path, name: str):
    from similar_finder import extract_features

    started = time.perf_counter()
    library = extract_features(folder, work / f"{name}.csv", "efficientnet_lite0", progress=False)
    print(f"features of {name}: {len(library)} photos ({library.stats.embedded} embedded now, "
          f"{time.perf_counter() - started:.0f} s)", flush=True)
    return library


def _answered(model, vectors=None) -> np.ndarray:
    distances, indices, gates = model.search(vectors, 1)
    return np.array([len(model.answer(d, i, g)) > 0 for d, i, g in zip(distances, indices, gates)])


def bench_folders(work: Path) -> tuple[Path, Path]:
    """The 2,000-photo CIFAR-10 sample and the generated non-photos, made once under ``work``."""
    cifar = work / "cifar2000"
    if not cifar.is_dir():
        stratified_sample(CIFAR, cifar, CIFAR_BENCH_PER_CLASS)
    non_photos = work / "non-photos"
    if not non_photos.is_dir():
        write_non_photos(non_photos)
    return cifar, non_photos


def trust(work: Path, checks: Checks) -> None:
    from similar_finder import Recommender, recommend

    cifar, non_photos = bench_folders(work)
    sets = {"food": features(FOOD_DB, work, "food"), "clothing": features(CLOTHING, work, "clothing"),
            "cifar10 sample": features(cifar, work, "cifar2000"),
            "food queries": features(FOOD_QUERIES, work, "food-queries"),
            "non-photos": features(non_photos, work, "non-photos")}
    print("the default rule, each set as the library:")
    for name in ("food", "clothing", "cifar10 sample"):
        library = sets[name]
        model = Recommender(threshold=None).fit(library.matrix, library.paths)
        checks.at_least(f"{name}: own photos answered", _answered(model).mean(), 0.97)
        same_domain = {name, "food queries"} if name == "food" else {name}
        for other in sorted(set(sets) - same_domain):
            checks.at_least(f"{name}: {other} refused", 1 - _answered(model, sets[other].matrix).mean(), 0.95)
    checks.holds("a food photo gets no clothing",
                 recommend(FOOD_QUERIES / "asparagus_test.jpg", 5, library=sets["clothing"]).empty)
    library = sets["clothing"]
    model = Recommender(threshold=np.inf, gate=np.inf).fit(library.matrix)
    calibration = model.calibrate(library.labels(), save=False)
    curve = pd.DataFrame(calibration["curve"])
    checks.at_least("clothing, labelled threshold: answered", _answered(model).mean(), 0.90)
    checks.holds("clothing, labelled threshold: >= Youden's, monotonic trade-off",
                 calibration["value"] >= calibration["youden"] and len(curve) == 50
                 and curve["library answered"].is_monotonic_increasing
                 and curve["other classes kept out"].is_monotonic_decreasing
                 and curve["library answered"].iloc[0] < 0.1 < 0.9 < curve["library answered"].iloc[-1])


def adaptation(work: Path, checks: Checks, fine_tune_blocks: int) -> None:
    from similar_finder.evaluate import adaptation_table

    library = features(CLOTHING, work, "clothing")
    started = time.perf_counter()
    table = adaptation_table(library, split=0.5, fine_tune_blocks=fine_tune_blocks).set_index("features")
    how = f"last {fine_tune_blocks} blocks fine-tuned" if fine_tune_blocks else "frozen features"
    print(f"adapter on half of each clothing class, {how} ({time.perf_counter() - started:.0f} s):")
    plain, adapted = table.loc["plain"], table.loc["adapted"]
    print(f"  P@5 / mAP among the other half: plain {plain['precision@5']:.3f} / {plain['mAP']:.3f}, "
          f"adapted {adapted['precision@5']:.3f} / {adapted['mAP']:.3f}")
    checks.below("plain P@5", plain["precision@5"], 0.75)
    if fine_tune_blocks:
        checks.at_least("adapted P@5 (fine-tuned)", adapted["precision@5"], 0.84)
    else:
        checks.at_least("adapted P@5 - plain P@5", adapted["precision@5"] - plain["precision@5"], 0.08)
        checks.at_least("adapted mAP - plain mAP", adapted["mAP"] - plain["mAP"], 0.15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", help=f"comma-separated: {', '.join(PARTS)}, or all")
    parser.add_argument("--work", default=str(ROOT / "data" / "bench" / "quality"),
                        help="where the features are kept between runs")
    args = parser.parse_args()
    parts = PARTS if args.part == "all" else tuple(p.strip() for p in args.part.split(","))
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part {sorted(unknown)[0]!r}; choose from {', '.join(PARTS)} or all")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checks, started = Checks(), time.perf_counter()
    for part in parts:
        part_started = time.perf_counter()
        print(f"== {part}", flush=True)
        if part == "trust":
            trust(work, checks)
        else:
            adaptation(work, checks, fine_tune_blocks=2 if part == "fine-tune" else 0)
        print(f"== {part}: {time.perf_counter() - part_started:.0f} s", flush=True)
    print(f"{len(checks.missed)} targets missed in {time.perf_counter() - started:.0f} s"
          + (f": {', '.join(checks.missed)}" if checks.missed else ""))
    return 1 if checks.missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
