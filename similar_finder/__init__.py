"""similar_finder: find visually similar images with pretrained CNN features.

images → features (CSV) → K-Means baseline / cosine recommender → plots and reports.
Heavy modules (Keras, TensorFlow) load only when a function that needs them is called.
"""
from __future__ import annotations

import importlib
import os

# TensorFlow's C++ start-up chatter hides the messages that matter to a user.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

_EXPORTS = {
    "extract_features": "features",
    "load_features": "features",
    "build_backbone": "backbones",
    "ensure_demo_library": "demo",
    "tune_k": "clustering",
    "KMeansBaseline": "clustering",
    "fit_baseline": "clustering",
    "recommend_by_cluster": "clustering",
    "Recommender": "recommend",
    "calibrate_threshold": "recommend",
    "PROJECT_ROOT": "_io",
    "DATA_DIR": "_io",
    "OUTPUT_DIR": "_io",
}


# `recommend` shares its module's name, and importing a submodule binds that name on the package;
# binding the function here, eagerly, keeps `similar_finder.recommend` the function whatever was
# imported first. It does not import Keras. (`evaluate` and `run_all` are command-line modules
# too, so they are imported from their modules: `from similar_finder.run_all import run_all`.)
from .recommend import recommend  # noqa: E402


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'similar_finder' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted([*_EXPORTS, "recommend"])
