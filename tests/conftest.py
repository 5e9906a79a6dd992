"""Shared fixtures: generated images for mechanics, real photos for quality."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The checkout's parent holds shared/ (see shared/data/README.md), here and in CI.
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
FOOD_DB = SHARED_DATA / "food" / "db"
FOOD_QUERIES = SHARED_DATA / "food" / "queries"
FAST = {"backbone": "efficientnet_lite0", "weights": None, "input_size": 64, "progress": False}


def make_images(folder: Path, count: int, size: int = 48, seed: int = 0, prefix: str = "img") -> list[Path]:
    """Write ``count`` distinct random-blob JPEGs (a stand-in for photos in mechanics tests)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        path = folder / f"{prefix}{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def labels_of(paths) -> np.ndarray:
    """The class of a shared photo: its folder, by the project's one rule."""
    from similar_finder.library import labels_from_paths

    return labels_from_paths(paths, required=True)


@pytest.fixture(scope="session")
def food_db() -> Path:
    assert FOOD_DB.is_dir(), f"the shared photos are missing: expected {FOOD_DB} (see shared/data/README.md)"
    return FOOD_DB


@pytest.fixture(scope="session")
def food_features(food_db, tmp_path_factory) -> Path:
    """Real ImageNet EfficientNet-Lite0 features of the food photos, computed once per session."""
    from similar_finder import extract_features

    out = tmp_path_factory.mktemp("food") / "features.csv"
    extract_features(food_db, out, "efficientnet_lite0", progress=False)
    return out
