"""Near-duplicates of a folder: groups of resized, recompressed or lightly edited copies, by perceptual hash.

``find_duplicates(images_dir)`` groups near-identical images; ``write_duplicates``
also writes them as ``duplicates.csv`` and one picture per group (command line:
``similar-finder duplicates IMAGES_DIR``). The app finds the same groups in a
library's cached hashes (:func:`~similar_finder.descriptors.duplicate_groups`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import write_csv
from .descriptors import DUPLICATE_BITS, HASH_KINDS, duplicate_groups
from .errors import MissingError, check_choice
from .images import scan_images
from .kinds import describe_many


def find_duplicates(images_dir: str | os.PathLike, max_distance: int = DUPLICATE_BITS, kind: str = "phash", *,
                    n_jobs: int = -1) -> list[list[str]]:
    """Groups of near-identical images under ``images_dir`` (paths relative to it), largest first.

    Two images are linked when their hashes differ in at most ``max_distance``
    of 64 bits; groups are the connected components of those links, so a chain
    of near-copies forms one group.
    """
    check_choice("hash for duplicates", kind, HASH_KINDS)
    root = Path(images_dir)
    if not root.is_dir():
        raise MissingError(f"images folder {images_dir} does not exist or is not a folder")
    paths = scan_images(root)["path"].tolist()
    described = describe_many(root, paths, (kind,), n_jobs)
    keep = [i for i, v in enumerate(described) if v is not None]
    if len(keep) < 2:
        return []
    bits = np.stack([described[i][0] for i in keep])
    return [[paths[keep[i]] for i in group] for group in duplicate_groups(bits, max_distance, [paths[i] for i in keep])]


def write_duplicates(images_dir: str | os.PathLike, out: str | os.PathLike, max_distance: int = DUPLICATE_BITS,
                     kind: str = "phash") -> list[list[str]]:
    """:func:`find_duplicates`, written to ``out/duplicates.csv`` (group, path) with one picture per group."""
    from .plots import image_rows, save_figure  # matplotlib: only when pictures are drawn

    groups = find_duplicates(images_dir, max_distance, kind)
    out = Path(out)
    rows = [(i, path) for i, group in enumerate(groups) for path in group]
    write_csv(out / "duplicates.csv", pd.DataFrame(rows, columns=["group", "path"]))
    for i, group in enumerate(groups):
        save_figure(image_rows({f"group {i}": group}, images_dir, per_row=max(2, len(group))),
                    out / f"group_{i:04d}.png")
    return groups
