"""ResNet50 and VGG19 from ``keras.applications`` (``include_top=False``), ImageNet weights by Keras.

Keras downloads the weights on first use; an air-gapped machine passes the
file itself (``weights=PATH``) or puts it in the Keras cache.
"""
from __future__ import annotations

import os
from pathlib import Path

from .base import Backbone, WeightsUnavailableError, pool, weights_source

# What Keras downloads for each, named in the message that tells an offline user what to fetch.
KERAS_WEIGHT_FILES = {
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "vgg19": "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
}


def build_keras_application(name: str, pooling: str, input_size: int, weights) -> Backbone:
    import keras

    module, constructor = {
        "resnet50": (keras.applications.resnet50, keras.applications.ResNet50),
        "vgg19": (keras.applications.vgg19, keras.applications.VGG19),
    }[name]
    try:
        base = constructor(include_top=False, weights=weights, input_shape=(input_size, input_size, 3))
    except Exception as exc:  # Keras raises a bare Exception on a failed download
        if weights != "imagenet":
            raise WeightsUnavailableError(f"could not load {name} weights from {weights}: {exc}") from exc
        cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
        raise WeightsUnavailableError(
            f"the ImageNet weights of {name} could not be downloaded ({exc}). "
            f"To use {name} offline, download {KERAS_WEIGHT_FILES[name]} on a machine with "
            f"internet and either copy it to {cache}/ or pass weights=PATH (--weights PATH)."
        ) from exc
    model = keras.Model(base.input, pool(base.output, pooling), name=f"{name}_{pooling}")
    return Backbone(name, pooling, input_size, weights_source(weights), model, module.preprocess_input)
