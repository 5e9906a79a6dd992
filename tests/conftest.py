"""Shared fixtures: generated images for mechanics, real photos for quality.

Real features are extracted once per session and shared (:func:`features_of`); the two large shared sets are
used as stratified samples linked in place (``CLOTHING_PER_CLASS``, ``CIFAR_PER_CLASS``). The same checks on
the whole sets are in ``bench/quality_bench.py`` (see the README's *Tests*).
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
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


def as_exports_only(files) -> None:
    """Leave only the exports of a store (CSV, .npy, audit, sidecar): a store as versions before 0.3 wrote it."""
    import shutil

    for suffix in ("", "-wal", "-shm"):
        Path(f"{files.database}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(files.vectors, ignore_errors=True)


def labels_of(paths) -> np.ndarray:
    """The class of a shared photo: its folder, by the project's one rule."""
    from similar_finder.library import labels_from_paths

    return labels_from_paths(paths, required=True)


@pytest.fixture(scope="session")
def food_db() -> Path:
    assert FOOD_DB.is_dir(), f"the shared photos are missing: expected {FOOD_DB} (see shared/data/README.md)"
    return FOOD_DB


@pytest.fixture(scope="session")
def features_of(tmp_path_factory):
    """``features_of(folder)``: the CSV of real EfficientNet-Lite0 features (ImageNet weights, 224 px) of
    ``folder``, extracted once per session and shared by every test that asks. Read them; to change them,
    copy the folder they are in first."""
    from similar_finder import extract_features

    made: dict[Path, Path] = {}

    def features(folder: Path) -> Path:
        folder = Path(folder).resolve()
        if folder not in made:
            out = tmp_path_factory.mktemp(f"features-{folder.name}") / "features.csv"
            extract_features(folder, out, "efficientnet_lite0", progress=False)
            made[folder] = out
        return made[folder]

    return features


@pytest.fixture(scope="session")
def food_features(food_db, features_of) -> Path:
    """Real ImageNet EfficientNet-Lite0 features of the food photos, computed once per session."""
    return features_of(food_db)


CLOTHING = SHARED_DATA / "clothing"
CIFAR = SHARED_DATA / "cifar10-test"
CLOTHING_PER_CLASS = 50  # 500 of the 3,781 clothing photos: extracted in about 25 s instead of 3 minutes
CIFAR_PER_CLASS = 50  # 500 of the 10,000 CIFAR-10 test photos


def stratified_sample(source: Path, folder: Path, per_class: int, seed: int = 0) -> Path:
    """``per_class`` photos drawn from each class subfolder of ``source`` (all of a smaller class), linked in
    place into ``folder``, not copied."""
    rng = np.random.default_rng(seed)
    for label in sorted(p for p in source.iterdir() if p.is_dir()):
        photos = sorted(label.iterdir())
        (folder / label.name).mkdir(parents=True)
        for photo in rng.choice(photos, min(per_class, len(photos)), replace=False):
            (folder / label.name / photo.name).symlink_to(photo)
    return folder


@pytest.fixture(scope="session")
def clothing_sample(tmp_path_factory) -> Path:
    """A stratified sample of the shared clothing photos, ``CLOTHING_PER_CLASS`` of each of the 10 classes."""
    assert CLOTHING.is_dir(), f"the shared photos are missing: expected {CLOTHING}"
    return stratified_sample(CLOTHING, tmp_path_factory.mktemp("clothing-sample"), CLOTHING_PER_CLASS)


@pytest.fixture(scope="session")
def clothing_features(clothing_sample, features_of) -> Path:
    """Real EfficientNet-Lite0 features of the clothing sample (the whole set: ``bench/quality_bench.py``)."""
    return features_of(clothing_sample)


@pytest.fixture(scope="session")
def cifar_sample(tmp_path_factory) -> Path:
    """A stratified sample of the shared CIFAR-10 test photos, ``CIFAR_PER_CLASS`` a class, linked in place."""
    assert CIFAR.is_dir(), f"the shared photos are missing: expected {CIFAR}"
    return stratified_sample(CIFAR, tmp_path_factory.mktemp("cifar-sample"), CIFAR_PER_CLASS)


def write_non_photos(folder: Path) -> Path:
    """60 generated pictures that are not photos: noise, flat colours, text rendered as an image."""
    from PIL import ImageDraw, ImageFont

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(20):
        Image.fromarray((rng.random((224, 224, 3)) * 255).astype(np.uint8)).save(folder / f"noise{i}.png")
        Image.new("RGB", (224, 224), tuple(int(c) for c in rng.integers(0, 256, 3))).save(folder / f"flat{i}.png")
        page = Image.new("RGB", (224, 224), "white")
        ImageDraw.Draw(page).text((10, 60), f"Invoice no. {rng.integers(1000, 9999)}\nTotal: {rng.integers(1, 999)} EUR",
                                  fill="black", font=ImageFont.load_default(size=18 + i))
        page.save(folder / f"text{i}.png")
    return folder


@pytest.fixture(scope="session")
def non_photos(tmp_path_factory) -> Path:
    """Generated pictures that are not photos (:func:`write_non_photos`)."""
    return write_non_photos(tmp_path_factory.mktemp("nonphotos"))


@contextlib.contextmanager
def serving(app):
    """A real uvicorn server for ``app`` on a free loopback port, in a thread: yields its base URL."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(10)
