"""The embedded demo library: photos that ship inside installed packages, in groups of variants.

No third-party photos are committed to the project, yet its main command must
run on a fresh machine with no data of the user's. ``ensure_demo_library()``
builds ``data/demo/<photo>/<variant>.jpg`` on first use from scikit-image's and
scikit-learn's bundled sample photos. Each group (crops, flips, small rotations,
colour shifts, JPEG recompression of one photo) is a class, so results can be
scored like any labelled folder.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from ._io import DATA_DIR

DEMO_DIR = DATA_DIR / "demo"
_SKIMAGE_PHOTOS = {
    "astronaut": "astronaut.png",
    "cat": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "galaxies": "hubble_deep_field.jpg",
    "tissue": "ihc.png",
    "motorcycle": "motorcycle_left.png",
    "coins": "coins.png",
}
_SKLEARN_PHOTOS = {"temple": "china.jpg", "flower": "flower.jpg"}
_LONG_SIDE = 320


def _source_photos() -> dict[str, Image.Image]:
    import skimage.data
    import sklearn.datasets

    skimage_dir = Path(skimage.data.__file__).parent
    sklearn_dir = Path(sklearn.datasets.__file__).parent / "images"
    photos = {name: skimage_dir / file for name, file in _SKIMAGE_PHOTOS.items()}
    photos.update({name: sklearn_dir / file for name, file in _SKLEARN_PHOTOS.items()})
    loaded = {}
    for name, path in photos.items():
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((_LONG_SIDE, _LONG_SIDE))
            loaded[name] = img
    return loaded


def _variants(img: Image.Image) -> dict[str, Image.Image]:
    w, h = img.size
    jpeg = io.BytesIO()
    img.save(jpeg, "JPEG", quality=20)
    return {
        "original": img,
        "crop": img.crop((w // 8, h // 8, w - w // 8, h - h // 8)),
        "flip": ImageOps.mirror(img),
        "rotate": img.rotate(8, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=(128, 128, 128)),
        "colour": ImageEnhance.Brightness(ImageEnhance.Color(img).enhance(1.6)).enhance(0.85),
        "jpeg": Image.open(jpeg).resize((w * 2 // 3, h * 2 // 3)),
    }


def ensure_demo_library(root: str | os.PathLike = DEMO_DIR) -> Path:
    """Return the demo library folder, building it first if it is not there yet."""
    root = Path(root)
    if root.is_dir() and any(root.iterdir()):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder and rename it, so an interrupted build never
    # leaves a half-made library that later runs would take as complete.
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    try:
        for name, photo in _source_photos().items():
            (staging / name).mkdir()
            for variant, picture in _variants(photo).items():
                picture.save(staging / name / f"{name}_{variant}.jpg", "JPEG", quality=90)
        if root.exists():
            root.rmdir()
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root
