"""What every tutorial notebook shares: which photos, where their features go, which backbone.

▶ YOUR PHOTOS: set IMAGES to your own folder (one subfolder per class also lets you score results);
every notebook then uses it.
"""
import os
from pathlib import Path

from similar_finder.demo import ensure_demo_library

CHECKOUT = Path(__file__).resolve().parent.parent
IMAGES = CHECKOUT.parent / "shared" / "data" / "food" / "db"
if not IMAGES.is_dir():  # not in a checkout with the shared photos: use the embedded demo library
    IMAGES = ensure_demo_library(CHECKOUT / "data" / "demo")
# Features, models and scratch files of the notebooks (the tests point it at a temporary folder).
WORK = Path(os.environ.get("SIMILAR_FINDER_TUTORIAL_WORK", CHECKOUT / "data" / "notebooks"))
FEATURES = WORK / f"{IMAGES.name}.csv"
# Notebook 6 adapts the embedding to labelled photos: many photos per class show it best.
ADAPT_IMAGES = CHECKOUT.parent / "shared" / "data" / "clothing"
if not ADAPT_IMAGES.is_dir():
    ADAPT_IMAGES = IMAGES
BACKBONE = "efficientnet_lite0"  # works offline; "resnet50" or "vgg19" with internet or a weights file

SMALL_PER_CLASS = 30


def small_sample(folder: Path, out: Path, per_class: int = SMALL_PER_CLASS) -> Path:
    """The first ``per_class`` photos of each class subfolder of ``folder``, linked (not copied) into ``out``."""
    for label in sorted(p for p in folder.iterdir() if p.is_dir()):
        (out / label.name).mkdir(parents=True, exist_ok=True)
        for photo in sorted(label.iterdir())[:per_class]:
            link = out / label.name / photo.name
            if not link.is_symlink():
                link.symlink_to(photo.resolve())
    return out


# SIMILAR_FINDER_TUTORIAL_SET=small (what the tests set): notebook 6 on 30 photos of each class instead of all of
# them, the same steps in a minute instead of eight.
if os.environ.get("SIMILAR_FINDER_TUTORIAL_SET") == "small" and ADAPT_IMAGES != IMAGES:
    ADAPT_IMAGES = small_sample(ADAPT_IMAGES, WORK / f"{ADAPT_IMAGES.name}-small")
