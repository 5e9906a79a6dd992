"""What every backbone is: uint8 RGB batches in, one float32 vector per image out.

:class:`Backbone` wraps one Keras model and its preprocessing (and can cut off
its last blocks for fine-tuning); :class:`Ensemble` joins several. The errors
and the pooling heads that every family shares live here too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import SimilarFinderError

POOLINGS = ("avg", "max", "gem", "flatten")  # CNN feature maps
GEM_P = 3.0
# Names of the layers that start a block: EfficientNet-Lite's ports, Keras's VGG and ResNet.
_BLOCK_NAME = re.compile(r"^(_blocks\.\d+|_conv_head|block\d+|conv\d+_block\d+)")


class BackboneError(SimilarFinderError, RuntimeError):
    """A backbone could not be built as asked."""


class WeightsUnavailableError(BackboneError):
    """Pretrained weights could not be downloaded or read."""


def weights_value(value):
    """``weights=`` as given (None, ``"none"``, ``"random"``, ``"imagenet"``, a path) to what builders take:
    None for random weights, else the string. The one place these spellings are mapped."""
    if value is None or str(value).lower() in ("none", "random"):
        return None
    return str(value)


def weights_source(weights) -> str:
    """What a sidecar records of ``weights``: ``"random"``, ``"imagenet"`` or the path."""
    return "random" if weights is None else str(weights)


def pool(x, pooling: str):
    """A CNN feature map to one vector per image, by ``pooling`` (see :data:`POOLINGS`)."""
    import keras

    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    if pooling == "gem":
        from ..pooling import GeMPooling2D  # a Keras layer: importing it imports Keras

        return GeMPooling2D(GEM_P, name="gem_pool")(x)
    return keras.layers.Flatten(name="flatten")(x)


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
        return joined([m.pooling for m in self.members])

    @property
    def input_size(self) -> int:
        return self.members[0].input_size

    @property
    def weights_source(self) -> str:
        return joined([m.weights_source for m in self.members])

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


def joined(values) -> str:
    """One value if all members share it, else the members' values joined with ``+``."""
    values = [str(v) for v in values]
    return values[0] if len(set(values)) == 1 else "+".join(values)
