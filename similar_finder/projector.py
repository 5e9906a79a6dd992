"""Files for TensorBoard's embedding projector: an interactive 3-D view of the feature space.

    python -m similar_finder.projector [--features data/features.csv] [--out output/projector]

Writes ``tensors.tsv`` (one vector per image), ``metadata.tsv`` (path, K-Means
cluster, class when the photos sit in class subfolders), ``sprite.png`` (all
thumbnails in one grid) and ``projector_config.pbtxt``, then prints the
``tensorboard --logdir`` command that opens them.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from . import _cli
from ._io import DEFAULT_FEATURES, OUTPUT_DIR, atomic_write
from .clustering import KMeansBaseline
from .features import load_features
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


def write_projector(features: str | Path = DEFAULT_FEATURES, out: str | Path | None = None) -> Path:
    """Write the projector files for a feature library; returns the folder."""
    from .evaluate import labels_from_paths

    paths, matrix, meta = load_features(features)
    out = Path(out) if out else OUTPUT_DIR / "projector"
    clusters = KMeansBaseline(k_range=range(2, min(11, len(paths))), verbose=False).fit(matrix).labels_
    metadata = pd.DataFrame({"path": paths, "cluster": clusters})
    try:
        metadata["class"] = labels_from_paths(paths)
    except ValueError:
        pass
    with atomic_write(out / "tensors.tsv", newline="") as handle:
        np.savetxt(handle, matrix, delimiter="\t", fmt="%.6g")
    with atomic_write(out / "metadata.tsv", newline="") as handle:
        metadata.to_csv(handle, sep="\t", index=False)
    sprite, thumb = sprite_image(Path(meta["images_root"]), paths)
    with atomic_write(out / "sprite.png", "wb") as handle:
        sprite.save(handle, "PNG")
    config = ("embeddings {\n  tensor_name: \"similar_finder\"\n  tensor_path: \"tensors.tsv\"\n"
              "  metadata_path: \"metadata.tsv\"\n"
              f"  sprite {{\n    image_path: \"sprite.png\"\n    single_image_dim: {thumb}\n"
              f"    single_image_dim: {thumb}\n  }}\n}}\n")
    with atomic_write(out / "projector_config.pbtxt") as handle:
        handle.write(config)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m similar_finder.projector", description=__doc__.splitlines()[0])
    parser.add_argument("--features", default=str(DEFAULT_FEATURES))
    parser.add_argument("--out", default=None, help="folder for the files (default: output/projector)")
    args = parser.parse_args(argv)
    out = write_projector(args.features, args.out)
    print(f"projector files in {out}\nopen them with:  tensorboard --logdir {out}   (then the PROJECTOR tab)")


if __name__ == "__main__":
    sys.exit(_cli.run(main))
