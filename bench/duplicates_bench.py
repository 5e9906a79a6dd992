"""Near-duplicate finding against a generated truth: precision, recall, per-edit recall and wall time.

    python bench/duplicates_bench.py [--set clothing] [--photos 450] [--edited 120] [--seed 0]

Draws ``--photos`` photos of one shared set (same-domain distractors), gives ``--edited`` of them 3 edits each
(drawn from :data:`EDITS`, the ones people make) and writes the folder under ``data/bench/duplicates/`` (never
committed; rebuilt only when missing), with its EfficientNet-Lite0 library beside it (extracted once). Then scores
pairs within a group against the truth (a photo and its copies) for ``similar_finder``'s verified finder, its pure
hash answer (``--max-distance``), the command as a person runs it (``similar-finder duplicates DIR
--features-file``: start-up, imports and one picture per group included) and, when installed, Debian's
``findimagedupes`` (``apt-get install findimagedupes``; skipped otherwise), all in one run, so their ratio holds
whatever the machine's load (printed with the figures). Wall times exclude the library's extraction (the command
reuses a library).

It also prints where the finder's time goes, an estimate for 100,000 photos from those steps (reading, verifying
and labelling grow as n: the candidates per photo are capped; the neighbour search for candidates is taken as n²,
an upper bound), how often each copy's label names its edit, and the app's per-photo near-duplicates: the time of
a request (a library photo's verified copies) and how many of the copies it finds, asked from the original.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import shutil
import subprocess
import sys
import time
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

HERE = Path(__file__).resolve().parent.parent
DATA = HERE.parent / "shared" / "data"
EDITS = {
    "resize 60%": lambda im: im.resize((max(1, round(im.width * 0.6)), max(1, round(im.height * 0.6))),
                                       Image.Resampling.LANCZOS),
    "jpeg q25": None,  # saved at quality 25 below
    "crop 85%": lambda im: im.crop((round(im.width * 0.075), round(im.height * 0.075),
                                    round(im.width * 0.925), round(im.height * 0.925))),
    "brightness 1.3": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
    "contrast 0.7": lambda im: ImageEnhance.Contrast(im).enhance(0.7),
    "blur 1.5px": lambda im: im.filter(ImageFilter.GaussianBlur(1.5)),
    "mirror": ImageOps.mirror,
    "rotate 5": lambda im: im.rotate(5, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=(255, 255, 255)),
    "caption": lambda im: _caption(im),
    "greyscale": lambda im: ImageOps.grayscale(im).convert("RGB"),
}


def _caption(im: Image.Image) -> Image.Image:
    im = im.copy()
    draw = ImageDraw.Draw(im)
    bar = max(12, im.height // 8)
    draw.rectangle((0, im.height - bar, im.width, im.height), fill=(20, 20, 20))
    draw.text((4, im.height - bar + 2), "holiday 2024 - do not share", fill=(255, 255, 255))
    return im


def build(set_name: str, photos: int, edited: int, seed: int) -> tuple[Path, dict[str, str], dict[str, str]]:
    """The folder, each copy's original, each copy's edit."""
    root = HERE / "data" / "bench" / "duplicates" / f"{set_name}-{photos}-{edited}-seed{seed}" / "photos"
    files = sorted(p for p in (DATA / set_name).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    rng = np.random.default_rng(seed)
    chosen = [files[i] for i in rng.choice(len(files), photos, replace=False)]
    original_of, edit_of = {}, {}
    names = list(EDITS)
    for k, source in enumerate(chosen):
        rel = f"{source.parent.name}/{source.name}"
        if not (root / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, root / rel)
        if k >= edited:
            continue
        for name in rng.choice(names, 3, replace=False):
            copy = f"copies/{source.stem}__{name.replace(' ', '_').replace('%', '')}.jpg"
            original_of[copy], edit_of[copy] = rel, name
            if not (root / copy).is_file():
                (root / copy).parent.mkdir(parents=True, exist_ok=True)
                with Image.open(source) as im:
                    im = im.convert("RGB")
                    edit = EDITS[name]
                    (edit(im) if edit else im).save(root / copy, quality=25 if name == "jpeg q25" else 85)
    return root, original_of, edit_of


def score(groups, original_of: dict, edit_of: dict, seconds: float, cpu: float) -> dict:
    truth = {frozenset((copy, original)) for copy, original in original_of.items()}
    truth |= {frozenset(pair) for original in set(original_of.values())
              for pair in combinations([c for c, o in original_of.items() if o == original], 2)}
    found = {frozenset(pair) for g in groups for pair in combinations(sorted(g), 2)}
    hits = found & truth
    per_edit = Counter()
    for copy, original in original_of.items():
        per_edit[edit_of[copy]] += frozenset((copy, original)) in found
    totals = Counter(edit_of.values())
    return {"precision": len(hits) / max(len(found), 1), "recall": len(hits) / len(truth), "pairs": len(found),
            "false pairs": len(found - truth), "seconds": seconds, "cpu": cpu,
            "per edit": {e: f"{per_edit[e]}/{totals[e]}" for e in EDITS if totals[e]}}


def findimagedupes(root: Path, threads: int | None = None) -> tuple[list[list[str]], float] | None:
    """Its groups, wall and CPU seconds; ``threads``: GraphicsMagick's OpenMP threads (default: one a core,
    which spin-wait for a busy core and so slow it several times over on a loaded machine)."""
    if shutil.which("findimagedupes") is None:
        return None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    run = subprocess.run(["findimagedupes", "-R", "--", str(root)], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    groups = [[str(Path(p).relative_to(root)) for p in line.split()] for line in run.stdout.splitlines() if line]
    return groups, seconds, cpu


# The label part each edit should bring (what a person would call it).
NAMED = {"resize 60%": "resized", "jpeg q25": "recompressed", "crop 85%": "cropped", "brightness 1.3": "edited",
         "contrast 0.7": "edited", "blur 1.5px": "edited", "mirror": "mirrored", "rotate 5": "rotated",
         "caption": "edited", "greyscale": "edited"}
AT = 100_000  # photos the time is estimated for


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def command(root: Path, library: Path) -> float:
    """Wall seconds of ``similar-finder duplicates`` in a fresh process, as a person runs it."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "similar_finder", "duplicates", str(root), "--features-file",
                        str(library), "--out", out], check=True, capture_output=True, cwd=HERE)
        return time.perf_counter() - start


def estimate(timings: dict) -> str:
    """Hours for AT photos, scaling each measured step by how it grows."""
    n = timings["photos"]
    linear = (timings["vectors"] + timings["read"] + timings["verify"] + timings["label"]) * AT / n
    square = timings["candidates"] * (AT / n) ** 2
    steps = ", ".join(f"{k} {timings[k]:.1f} s" for k in ("vectors", "read", "candidates", "verify", "label"))
    return (f"steps on {n} photos: {steps}; {timings['pairs']} pairs verified ({timings['pairs'] / n:.1f} a photo)\n"
            f"estimate for {AT:,} photos: {(linear + square) / 3600:.1f} h ({linear / 3600:.1f} h reading, verifying "
            f"and labelling, linear; {square / 3600:.1f} h candidate search, taken as n²)")


def per_photo(library_file: Path, original_of: dict, queries: int = 40) -> str:
    """The app's per-photo answer: milliseconds a request, and the copies found asked from their original."""
    from similar_finder.library import Library
    from similar_finder.near_duplicates import NearDuplicateSearch

    library = Library(library_file)
    finder = NearDuplicateSearch(library)
    originals = sorted(set(original_of.values()))[:queries]
    seconds, found, total = [], 0, 0
    for original in originals:
        start = time.perf_counter()
        answers, _ = finder.of_photo(library.row_of[original], n=10)
        seconds.append(time.perf_counter() - start)
        copies = {c for c, o in original_of.items() if o == original}
        found += len(copies & {a["path"] for a in answers})
        total += len(copies)
    ms = sorted(1000 * s for s in seconds)
    return (f"app per-photo near-duplicates: {statistics.median(ms):.0f} ms median, {ms[int(0.9 * len(ms))]:.0f} ms "
            f"p90, {ms[-1]:.0f} ms worst over {len(ms)} requests; copies found from their original {found}/{total}")


def timed(function):
    """``function()``, its wall seconds and the CPU seconds of this process (all threads): on a shared machine
    the CPU seconds compare tools fairly where the wall time depends on the others' load."""
    cpu, start = time.process_time(), time.perf_counter()
    result = function()
    return result, time.perf_counter() - start, time.process_time() - cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="clothing")
    parser.add_argument("--photos", type=int, default=450)
    parser.add_argument("--edited", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-findimagedupes", action="store_true")
    parser.add_argument("--no-command", action="store_true", help="skip timing the command in a fresh process")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from similar_finder import extract_features
    from similar_finder.near_duplicates import find_duplicates

    root, original_of, edit_of = build(args.set, args.photos, args.edited, args.seed)
    library = root.parent / "features.csv"
    if not library.is_file():
        extract_features(root, library, "efficientnet_lite0", progress=False)
    print(f"{args.set}, seed {args.seed}: {args.photos} photos + {len(original_of)} copies of {args.edited}; "
          f"{load()}")
    results = {}
    timings: dict = {}
    groups, seconds, cpu = timed(lambda: find_duplicates(root, library=library, timings=timings))
    results["similar_finder (verified)"] = score(groups, original_of, edit_of, seconds, cpu)
    labels = Counter((edit_of[p], g.relation.get(p)) for g in groups for p in g if p in edit_of)
    keepers = sum(g.keeper not in edit_of for g in groups if any(p in edit_of for p in g))
    hashed, seconds, cpu = timed(lambda: find_duplicates(root, max_distance=6))
    results["similar_finder --max-distance 6"] = score(hashed, original_of, edit_of, seconds, cpu)
    if not args.no_command:
        results["similar-finder duplicates (command)"] = {**results["similar_finder (verified)"],
                                                         "seconds": command(root, library), "cpu": float("nan")}
    other = None if args.no_findimagedupes else shutil.which("findimagedupes")
    if other is not None:
        findimagedupes(root)  # once unmeasured: its first run compiles its C part (Inline::C)
        other = findimagedupes(root)
        results["findimagedupes (default)"] = score(*other[:1], original_of, edit_of, *other[1:])
        one = findimagedupes(root, threads=1)
        results["findimagedupes (OMP_NUM_THREADS=1)"] = score(*one[:1], original_of, edit_of, *one[1:])
    else:
        print("findimagedupes: not installed (apt-get install findimagedupes), column skipped")
    edits = list(EDITS)
    print("| tool | precision | recall | false pairs | " + " | ".join(edits) + " | wall s | CPU s |")
    print("|---" * (len(edits) + 6) + "|")
    for name, r in results.items():
        print(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['false pairs']} | "
              + " | ".join(r["per edit"].get(e, "-") for e in edits) + f" | {r['seconds']:.1f} | {r['cpu']:.1f} |")
    if other is not None:
        ours = results["similar_finder (verified)"]["seconds"]
        command_s = results.get("similar-finder duplicates (command)", {}).get("seconds")
        for how in ("default", "OMP_NUM_THREADS=1"):
            theirs = results[f"findimagedupes ({how})"]["seconds"]
            print(f"wall time against findimagedupes ({how}): {ours / theirs:.2f}x (finder)"
                  + (f", {command_s / theirs:.2f}x (command)" if command_s else "") + " (target: at most 2x)")
    print(estimate(timings))
    named = sum(NAMED[edit_of[p]] in g.relation.get(p, "").split(", ") for g in groups for p in g if p in edit_of)
    print(f"labels naming the copy's edit: {named}/{len(original_of)}")
    print(f"\nkeeper is the original in {keepers} of {sum(1 for g in groups if any(p in edit_of for p in g))} "
          "groups holding copies")
    print("labels given to each edit (edit: label count):")
    for edit in edits:
        given = {label: n for (e, label), n in labels.items() if e == edit}
        if given:
            print(f"  {edit}: " + ", ".join(f"{label} {n}" for label, n in sorted(given.items(), key=lambda x: -x[1])))
    print(per_photo(library, original_of))
    print(load())


if __name__ == "__main__":
    main()
