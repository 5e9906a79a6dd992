"""The saved adapter at run time: raw backbone vectors in, adapted unit vectors out.

What extraction, Ray's actors and new queries need of an adapter, and nothing
of its training (:mod:`.training`), so embedding never depends on the code
built on top of it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._io import file_sha256, read_json
from ..errors import MissingError, SimilarFinderError


class AdapterError(SimilarFinderError):
    """An adapter file is missing, unreadable or does not fit the features."""


def embed(model, features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, np.float32)
    # Called directly, not with predict(): that compiles a function per model, and training makes many.
    return np.concatenate([np.asarray(model(x[i:i + 4096], training=False), np.float32)
                           for i in range(0, len(x), 4096)]) if len(x) else np.zeros((0, model.output_shape[-1]),
                                                                                      np.float32)


class Adapter:
    """A trained head: raw backbone vectors in, adapted unit vectors out; loaded once per process and file."""

    def __init__(self, path: str | os.PathLike):
        import keras

        from .. import pooling  # noqa: F401  registers the layers a fine-tuned tail may end in (GeM)

        self.path = Path(path)
        if not self.path.is_file():
            raise MissingError(f"no adapter at {self.path}; train one with `similar-finder adapt LABELLED_DIR`")
        self.info = read_json(self.path.with_suffix(".json")) if self.path.with_suffix(".json").is_file() else {}
        try:
            self.model = keras.saving.load_model(self.path, compile=False)
        except Exception as exc:  # Keras reports a bad file with assorted exception types
            raise AdapterError(f"cannot read the adapter {self.path}: {exc}") from exc
        self.sha256 = file_sha256(self.path)
        self.input_shape = tuple(self.model.input_shape[1:])
        self.input_dim = int(self.input_shape[-1])
        self.dim = int(self.model.output_shape[-1])
        self.cut = self.info.get("cut")  # fine-tuned: the backbone layer whose activations it takes

    @property
    def record(self) -> dict:
        """What the feature sidecar records of the adapter (mixing others is refused)."""
        return {"sha256": self.sha256, "dim": self.dim, "path": str(self.path)}

    def check_backbone(self, config: dict) -> None:
        """Refuse a backbone other than the one the adapter was trained on."""
        trained = {k: v for k, v in (self.info.get("backbone") or {}).items() if k != "adapter"}
        input_fits = self.cut is not None or self.input_dim == config["dim"]
        if not input_fits or (trained and trained != {k: config[k] for k in trained}):
            raise AdapterError(f"the adapter {self.path} was trained on {trained or f'{self.input_dim}-d features'}, "
                               f"not on {config}; train one for this backbone with `similar-finder adapt`")

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Backbone vectors (or, for a fine-tuned adapter, the activations at ``cut``) to adapted vectors."""
        features = np.asarray(features, np.float32)
        if features.ndim == 1:
            features = features[None]
        if features.shape[1:] != self.input_shape:
            raise AdapterError(f"the adapter {self.path} takes {self.input_dim}-d features, got "
                               f"{features.shape[1]}-d; use it with the backbone it was trained on "
                               f"({self.info.get('backbone', {}).get('backbone', 'see its .json')})")
        return embed(self.model, features)


@dataclass
class AdaptedBackbone:
    """A backbone followed by an adapter: what ``extract --adapter`` and its new queries embed with."""

    backbone: object
    adapter: Adapter

    def __post_init__(self):
        self.adapter.check_backbone(self.backbone.config)
        self.name, self.input_size = self.backbone.name, self.backbone.input_size

    @property
    def dim(self) -> int:
        return self.adapter.dim

    @property
    def config(self) -> dict:
        return {**self.backbone.config, "dim": self.adapter.dim, "adapter": self.adapter.record}

    def embed(self, images: np.ndarray) -> np.ndarray:
        if self.adapter.cut is not None:  # fine-tuned: its own copy of the last blocks takes over from there
            return self.adapter.transform(self.backbone.embed_trunk(images, self.adapter.cut))
        return self.adapter.transform(self.backbone.embed(images))


def adapter_for(record: dict | None) -> Adapter | None:
    """The adapter a library's sidecar records, checked to be the very file it was made with."""
    if not record:
        return None
    path = Path(record["path"])
    if not path.is_file() or file_sha256(path) != record["sha256"]:
        raise AdapterError(f"the library's vectors were made with the adapter {path} (sha256 "
                           f"{record['sha256'][:12]}…), which is no longer there as it was; put it back, or "
                           f"extract again with `--adapter NEW_FILE --overwrite`")
    return load_adapter(path)


def load_adapter(path: str | os.PathLike) -> Adapter:
    """The adapter at ``path``, loaded once per process and version of the file."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise MissingError(f"no adapter at {path}; train one with `similar-finder adapt LABELLED_DIR`")
    return _load_cached(str(path), path.stat().st_mtime_ns)


_LOADED: dict = {}


def _load_cached(path: str, stamp: int) -> Adapter:
    key = (path, stamp)
    if key not in _LOADED:
        _LOADED[key] = Adapter(path)
    return _LOADED[key]
