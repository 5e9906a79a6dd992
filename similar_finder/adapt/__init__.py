"""Adapting the embedding to the user's own labelled photos: a metric-learning head on frozen features.

Pretrained features know ImageNet's categories, not the user's. Given photos
sorted into one folder per class, ``adapt(labelled_dir)`` embeds them with the
backbone (incrementally, reusing a features file), trains a small Keras head on
the frozen vectors with a metric-learning loss on class-balanced batches, stops
early on a validation split, and saves the head (``models/adapter.keras`` plus a
``.json`` beside it). ``extract --adapter`` then writes adapted vectors, and a
new photo is embedded the same way, so every part of the project uses them.

The head: Dense(512, ReLU) → Dense(``dim``) → unit length. Losses:

* ``"arcface"`` (default) – a cosine classifier with an additive angular margin
  (Deng et al., 2019): each class gets a direction; a photo must be closer to
  its class's direction than to any other by a margin. Stable on small data.
* ``"supcon"`` – supervised contrastive (Khosla et al., 2020): in each batch,
  photos of one class are pulled together and the rest pushed apart.

``fine_tune_blocks=N`` also trains the backbone's last N blocks (a copy of
them, inside the adapter), on the photos and their mirror images; the
adapter then takes the activations that feed those blocks, and extraction
stops the backbone there.

Command line: ``similar-finder adapt LABELLED_DIR --out models/adapter.keras``.

Three modules, one job each, layered so that embedding never depends on
training: :mod:`.model` (the saved adapter at run time, which extraction uses),
:mod:`.training` (heads, losses, the blend; plain arrays in) and
:mod:`.pipeline` (a labelled folder in, an adapter file out; built on
extraction). Names are imported on first use, so importing
``similar_finder.adapt.model`` does not load the training code or extraction.
"""
from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "Adapter": "model", "AdaptedBackbone": "model", "AdapterError": "model", "load_adapter": "model",
    "LOSSES": "training", "fit_adapter": "training", "stratified_split": "training", "class_split": "training",
    "AdaptResult": "pipeline", "DEFAULT_ADAPTER": "pipeline", "adapt": "pipeline", "compare_adapted": "pipeline",
    "fine_tuning_inputs": "pipeline",
}


__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
