"""Files for TensorBoard's embedding projector: an interactive 3-D view of the feature space.

    similar-finder projector [--features-file data/features.csv] [--out output/projector]

Writes ``tensors.tsv`` (one vector per image), ``metadata.tsv`` (path, K-Means
cluster, class when the photos sit in class subfolders), ``sprite.png`` (all
thumbnails in one grid) and ``projector_config.pbtxt``, then prints the
``tensorboard --logdir`` command that opens them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ._io import DEFAULT_FEATURES, OUTPUT_DIR, atomic_write, write_csv
from .clustering import KMeansBaseline
from .library import as_library
from .images import ImageError, load_image

SPRITE_MAX = 8192  # TensorBoard's largest sprite side


def sprite_image(root: Path, paths: list[str]) -> tuple[Image.Image, int]:
    """All thumbnails in a square grid, row-major in the order of ``paths``; returns (sprite, thumb size)."""
    per_side = math.ceil(math.sqrt(len(paths)))
    thumb = max(8, min(64, SPRITE_MAX // per_side))
    sprite = Image.new("RGB", (per_side * thumb, per_side * thumb), "white")
    for i, path in enumerate(paths):
        try:
            pixels = load_image(root / path, thumb)[0]
        except (ImageError, OSError):
            continue  # left white: the file went missing or bad since extraction
        sprite.paste(Image.fromarray(pixels), ((i % per_side) * thumb, (i // per_side) * thumb))
    return sprite, thumb


def write_projector(library=DEFAULT_FEATURES, out: str | Path | None = None) -> Path:
    """Write the projector files for a feature library (a Library or its CSV); returns the folder."""
    library = as_library(library)
    out = Path(out) if out else OUTPUT_DIR / "projector"
    metadata = pd.DataFrame({"path": library.paths, "cluster": KMeansBaseline().fit(library).labels_})
    labels = library.labels()
    if labels is not None:
        metadata["class"] = labels
    with atomic_write(out / "tensors.tsv", newline="") as handle:
        np.savetxt(handle, library.matrix, delimiter="\t", fmt="%.6g")
    write_csv(out / "metadata.tsv", metadata, sep="\t")
    sprite, thumb = sprite_image(library.root, library.paths)
    with atomic_write(out / "sprite.png", "wb") as handle:
        sprite.save(handle, "PNG")
    config = ("embeddings {\n  tensor_name: \"similar_finder\"\n  tensor_path: \"tensors.tsv\"\n"
              "  metadata_path: \"metadata.tsv\"\n"
              f"  sprite {{\n    image_path: \"sprite.png\"\n    single_image_dim: {thumb}\n"
              f"    single_image_dim: {thumb}\n  }}\n}}\n")
    with atomic_write(out / "projector_config.pbtxt") as handle:
        handle.write(config)
    return out

