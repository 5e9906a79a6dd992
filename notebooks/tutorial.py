"""What every tutorial notebook shares: which photos, where their features go, which backbone.

▶ YOUR PHOTOS: set IMAGES to your own folder (one subfolder per class also lets you score results);
every notebook then uses it.
"""
from pathlib import Path

from similar_finder.demo import ensure_demo_library

CHECKOUT = Path(__file__).resolve().parent.parent
IMAGES = CHECKOUT.parent / "shared" / "data" / "food" / "db"
if not IMAGES.is_dir():  # not in a checkout with the shared photos: use the embedded demo library
    IMAGES = ensure_demo_library(CHECKOUT / "data" / "demo")
WORK = CHECKOUT / "data" / "notebooks"  # features, models and scratch files of the notebooks
FEATURES = WORK / f"{IMAGES.name}.csv"
# Notebook 6 adapts the embedding to labelled photos: many photos per class show it best.
ADAPT_IMAGES = CHECKOUT.parent / "shared" / "data" / "clothing"
if not ADAPT_IMAGES.is_dir():
    ADAPT_IMAGES = IMAGES
BACKBONE = "efficientnet_lite0"  # works offline; "resnet50" or "vgg19" with internet or a weights file
