"""The model a library is embedded with, and one new photo embedded exactly as the library was.

The one home of "rebuild the model from recorded settings": extraction, Ray's
actors, the app's warm-up, new queries and fine-tuning all build it here.
"""
from __future__ import annotations

import os

import numpy as np

from .adapt.model import AdaptedBackbone, Adapter, adapter_for, load_adapter
from .backbones import build_backbone, weights_value
from .images import load_image
from .store import FeaturesError, require_file


def build_model(backbone, *, pooling=None, input_size=None, weights="imagenet", adapter=None):
    """A backbone (built once per process), followed by ``adapter`` (an :class:`Adapter` or its file) if given."""
    model = build_backbone(backbone, pooling=pooling, input_size=input_size, weights=weights)
    if adapter is None:
        return model
    return AdaptedBackbone(model, adapter if isinstance(adapter, Adapter) else load_adapter(adapter))


def model_for(meta: dict):
    """The model that embedded a library (backbone, settings and adapter from its sidecar)."""
    cfg = meta.get("config")
    if cfg is None:
        raise FeaturesError("the features file has no sidecar, so new images cannot be embedded the same way; "
                            "re-create it with `similar-finder extract`")
    return build_model(cfg["backbone"], pooling=cfg["pooling"], input_size=int(cfg["input_size"]),
                       weights=weights_value(cfg["weights"]), adapter=adapter_for(cfg.get("adapter")))


def embed_file(file: str | os.PathLike, meta: dict) -> np.ndarray:
    """Embed one image exactly as the library was embedded (backbone and settings from ``meta``)."""
    path = require_file(file)
    model = model_for(meta)
    pixels, _ = load_image(path, int(meta["config"]["input_size"]))
    return model.embed(pixels[None])[0]
