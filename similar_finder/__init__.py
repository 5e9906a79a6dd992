"""similar_finder: find visually similar images with pretrained CNN features.

images → features (store) → Library → K-Means baseline / cosine recommender → plots, reports.
Heavy modules (Keras, TensorFlow) load only when a function that needs them is called, and
importing the package changes nothing in the process (no environment variable, no import hook,
no umask): a command sets what it needs where it starts (:func:`similar_finder.cli.main`).
"""
from __future__ import annotations

import importlib.metadata

from ._lazy import lazy_exports

try:  # the one home of the version is pyproject.toml
    __version__ = importlib.metadata.version(__name__)
except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"

# Public name -> the module that defines it, imported on first use. No name here is also a
# module's name: importing that submodule would rebind it on the package.
_EXPORTS = {
    "extract_features": "features",
    "add_photos": "features",
    "remove_photos": "features",
    "load_features": "features",
    "Library": "library",
    "open_library": "library",
    "build_backbone": "backbones",
    "ensure_demo_library": "demo",
    "tune_k": "clustering",
    "KMeansBaseline": "clustering",
    "ClusterRecommender": "clustering",
    "fit_baseline": "clustering",
    "recommend_by_cluster": "clustering",
    "Recommender": "recommender",
    "recommend": "recommender",
    "NO_RESULTS": "thresholds",
    "calibrate_threshold": "thresholds",
    "SimilarFinderError": "errors",
    "DATA_DIR": "_io",
    "OUTPUT_DIR": "_io",
}


__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
