"""Command line: ``python -m similar_finder.duplicates IMAGES_DIR [--max-distance 6] [--hash phash]``.

Lists groups of near-identical images (resized, recompressed or lightly edited
copies) found by perceptual hash, writes them to ``duplicates.csv`` and draws
one picture per group.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from . import _cli
from ._io import OUTPUT_DIR, atomic_write
from .descriptors import find_duplicates


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m similar_finder.duplicates", description=__doc__.splitlines()[0])
    parser.add_argument("images_dir")
    parser.add_argument("--max-distance", type=int, default=6, help="differing bits of 64 still called a copy")
    parser.add_argument("--hash", choices=("ahash", "dhash", "phash"), default="phash")
    parser.add_argument("--out", default=None, help="folder for duplicates.csv and the pictures "
                                                    "(default: output/<folder>/duplicates)")
    args = parser.parse_args(argv)
    root = Path(args.images_dir)
    out = Path(args.out) if args.out else OUTPUT_DIR / root.resolve().name / "duplicates"
    groups = find_duplicates(root, args.max_distance, args.hash)
    rows = [(i, path) for i, group in enumerate(groups) for path in group]
    with atomic_write(out / "duplicates.csv", newline="") as handle:
        pd.DataFrame(rows, columns=["group", "path"]).to_csv(handle, index=False)
    if not groups:
        print(f"no near-duplicates found under {root} (max distance {args.max_distance} bits)")
        return
    from .plots import image_rows, save_figure

    for i, group in enumerate(groups):
        print(f"group {i}: " + ", ".join(group))
        save_figure(image_rows({f"group {i}": group}, root, per_row=max(2, len(group))), out / f"group_{i:04d}.png")
    print(f"{len(groups)} groups, {len(rows)} images; listed in {out / 'duplicates.csv'}, pictures beside it")


if __name__ == "__main__":
    sys.exit(_cli.run(main))
