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


CLOTHING = SHARED_DATA / "clothing"
CIFAR = SHARED_DATA / "cifar10-test"


@pytest.fixture(scope="session")
def clothing_features(tmp_path_factory) -> Path:
    """Real EfficientNet-Lite0 features of the 3,781 shared clothing photos (about half a minute)."""
    from similar_finder import extract_features

    assert CLOTHING.is_dir(), f"the shared photos are missing: expected {CLOTHING}"
    out = tmp_path_factory.mktemp("clothing") / "features.csv"
    extract_features(CLOTHING, out, "efficientnet_lite0", progress=False)
    return out


@pytest.fixture(scope="session")
def cifar_sample(tmp_path_factory) -> Path:
    """A 2,000-photo sample of the shared CIFAR-10 test photos (200 a class), linked in place, not copied."""
    folder = tmp_path_factory.mktemp("cifar2000")
    rng = np.random.default_rng(0)
    for label in sorted(p for p in CIFAR.iterdir() if p.is_dir()):
        (folder / label.name).mkdir()
        for photo in rng.choice(sorted(label.iterdir()), 200, replace=False):
            (folder / label.name / photo.name).symlink_to(photo)
    return folder


@pytest.fixture(scope="session")
def non_photos(tmp_path_factory) -> Path:
    """Generated pictures that are not photos: noise, flat colours, text rendered as an image."""
    from PIL import ImageDraw, ImageFont

    folder = tmp_path_factory.mktemp("nonphotos")
    rng = np.random.default_rng(1)
    for i in range(20):
        Image.fromarray((rng.random((224, 224, 3)) * 255).astype(np.uint8)).save(folder / f"noise{i}.png")
        Image.new("RGB", (224, 224), tuple(int(c) for c in rng.integers(0, 256, 3))).save(folder / f"flat{i}.png")
        page = Image.new("RGB", (224, 224), "white")
        ImageDraw.Draw(page).text((10, 60), f"Invoice no. {rng.integers(1000, 9999)}\nTotal: {rng.integers(1, 999)} EUR",
                                  fill="black", font=ImageFont.load_default(size=18 + i))
        page.save(folder / f"text{i}.png")
    return folder
