"""DINOv2, DINOv3, CLIP and SigLIP image encoders from KerasHub presets.

A preset is downloaded once by KerasHub, or read from a local preset folder
given as ``weights`` (:func:`save_hub_preset` writes one on a machine with
internet). The encoder's tokens are pooled (class token, mean of the patches)
or the model's own pooled output is used.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UsageError
from .base import Backbone, BackboneError, WeightsUnavailableError, weights_source

TOKEN_POOLINGS = ("cls", "mean", "pooled")  # vision transformers


@dataclass(frozen=True)
class HubFamily:
    """A KerasHub model family: its class, the poolings it offers, and fallback preprocessing."""

    cls: str
    poolings: tuple
    mean: tuple  # used only when the preset folder has no image converter of its own
    std: tuple
    fixed_size: bool  # position embeddings of one size: the preset's own image size only
    patch: int = 16

    @property
    def default_pooling(self) -> str:
        return self.poolings[0]


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HUB_FAMILIES = {
    "dinov2": HubFamily("DINOV2Backbone", ("cls", "mean"), *_IMAGENET, fixed_size=False, patch=14),
    "dinov3": HubFamily("DINOV3Backbone", ("cls", "mean"), *_IMAGENET, fixed_size=False),
    "clip": HubFamily("CLIPBackbone", ("pooled", "cls", "mean"), (0.48145466, 0.4578275, 0.40821073),
                       (0.26862954, 0.26130258, 0.27577711), fixed_size=True),
    "siglip": HubFamily("SigLIPBackbone", ("pooled",), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), fixed_size=True),
}


def hub_family(name: str) -> str | None:
    """The KerasHub family of a backbone name (``dinov2_small`` -> ``dinov2``), or None for the CNNs."""
    for family in ("dinov2", "dinov3", "siglip", "clip"):
        if name.startswith(family):
            return family
    return None


def hub_native_size(name: str) -> int:
    """CLIP and SigLIP presets name their size (``_384``); DINO takes any multiple of its patch: 224."""
    size = re.search(r"_(\d{3})(?:_|$)", name)
    return int(size.group(1)) if size and hub_family(name) in ("clip", "siglip") else 224


def _keras_hub():
    try:
        import keras_hub
    except ImportError as exc:
        raise WeightsUnavailableError("KerasHub backbones need the package keras-hub; install it with "
                                      "`pip install keras-hub`") from exc
    return keras_hub


def save_hub_preset(name: str, folder: str | os.PathLike) -> Path:
    """Download KerasHub preset ``name`` (backbone and image converter) into ``folder``, for offline use.

    Run it once on a machine with internet, copy the folder over, and pass it as
    ``weights`` (``--weights DIR``) with the same backbone name.
    """
    keras_hub = _keras_hub()
    folder = Path(folder)
    keras_hub.models.Backbone.from_preset(name).save_to_preset(str(folder))
    try:
        keras_hub.layers.ImageConverter.from_preset(name).save_to_preset(str(folder))
    except Exception:  # a preset without a converter: the family's documented normalisation is used
        pass
    return folder


def _how_to_get(name: str) -> str:
    return (f"On a machine with internet run `python -c \"from similar_finder.backbones import save_hub_preset; "
            f"save_hub_preset('{name}', '{name}')\"`, copy the folder {name}/ here and pass it with "
            f"--weights DIR (weights=DIR)")


def build_keras_hub(name: str, pooling: str, input_size: int, weights) -> Backbone:
    keras_hub = _keras_hub()
    family = hub_family(name)
    spec = HUB_FAMILIES[family]
    cls = getattr(keras_hub.models, spec.cls)
    if weights not in (None, "imagenet"):
        if not Path(weights).is_dir():
            raise WeightsUnavailableError(f"KerasHub preset folder {weights} does not exist. {_how_to_get(name)}")
        preset = str(weights)
    elif name in cls.presets:
        preset = name
    else:
        raise UsageError(f"{name} is not a KerasHub {spec.cls} preset; choose one of {', '.join(cls.presets)}, "
                         f"or pass a local preset folder with --weights DIR")
    kwargs = {} if spec.fixed_size else {"image_shape": (input_size, input_size, 3)}
    try:
        hub = cls.from_preset(preset, load_weights=weights is not None, **kwargs)
    except ValueError as exc:
        if Path(preset).is_dir():  # e.g. a folder holding another family's model
            raise BackboneError(f"the preset folder {preset} does not hold a {spec.cls}: {exc}") from exc
        raise WeightsUnavailableError(f"could not load the KerasHub preset {name} ({exc}). {_how_to_get(name)}") \
            from exc
    except Exception as exc:  # a failed download surfaces as assorted exception types
        raise WeightsUnavailableError(f"could not load the KerasHub preset {name} ({exc}). {_how_to_get(name)}") \
            from exc
    model = _hub_model(hub, family, pooling, input_size, name)
    return Backbone(name, pooling, input_size, weights_source(weights), model,
                    _hub_preprocess(keras_hub, preset, spec), family=family)


def _hub_model(hub, family: str, pooling: str, input_size: int, name: str):
    """``images -> one vector``: the encoder's token sequence pooled, or the model's own pooled output."""
    import keras

    from ..pooling import TokenPooling  # a Keras layer: importing it imports Keras

    encoder = hub.vision_encoder if family in ("clip", "siglip") else hub
    size = int(encoder.image_shape[0])
    if size != input_size:
        raise BackboneError(f"{name} takes {size} px images only; leave --input-size out or pass {size}")
    inputs = keras.Input((input_size, input_size, 3), name="images")
    key = next(iter(encoder.input)) if isinstance(encoder.input, dict) else None
    encoded = encoder({key: inputs} if key else inputs)
    if pooling == "pooled":
        # CLIP: the projected class token it was trained to match with text; SigLIP: its attention-pooling head.
        outputs = hub.vision_projection(hub.vision_pooler(encoded)) if family == "clip" else encoded
    else:
        prefix = 1 + int(getattr(encoder, "num_register_tokens", 0))
        outputs = TokenPooling(pooling, prefix, name=f"{pooling}_token_pool")(encoded)
    return keras.Model(inputs, outputs, name=f"{name}_{pooling}")


def _hub_preprocess(keras_hub, preset: str, spec: HubFamily) -> Callable[[np.ndarray], np.ndarray]:
    """``x * scale + offset`` from the preset's own image converter, else the family's documented mean and std."""
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
        scale, offset = converter.scale, converter.offset
    except Exception:  # no converter saved in the preset folder
        std = np.asarray(spec.std, "float32")
        scale, offset = 1.0 / (255.0 * std), -np.asarray(spec.mean, "float32") / std
    scale = np.asarray(1.0 if scale is None else scale, "float32")
    offset = np.asarray(0.0 if offset is None else offset, "float32")

    def preprocess(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype="float32") * scale + offset

    return preprocess
