"""Read a legacy (pre-zip) PyTorch ``state_dict`` file with NumPy alone.

PyTorch's old ``torch.save`` format is a stream of pickles followed by the raw
bytes of every tensor storage. Unpickling it blindly would run whatever the file
asks for, so :func:`load_state_dict` uses an unpickler that resolves only the
handful of names a plain ``state_dict`` contains and refuses everything else.
"""
from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint refers to something a plain state_dict never contains."""


class _Storage:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.data: np.ndarray | None = None


class _LazyTensor:
    """A tensor whose storage bytes come after the pickle, so it is filled in later."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialize(self) -> np.ndarray:
        base = self.storage.data
        if not self.size:
            return base[self.offset].copy()
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.size, strides=[s * item for s in self.stride]
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _LazyTensor(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise UnsafeCheckpointError(
            f"refusing to load {module}.{name}: a weights file should only hold tensors"
        )

    def persistent_load(self, saved_id):
        kind, storage_type, key, _location, _numel, view = saved_id
        if kind != "storage" or view is not None:
            raise UnsafeCheckpointError(f"unsupported storage reference {saved_id!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(_STORAGE_DTYPES[storage_type])
        return self._storages[key]


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Return ``{name: numpy array}`` from a legacy-format PyTorch ``state_dict`` file."""
    path = Path(path)
    with path.open("rb") as f:
        magic = _RestrictedUnpickler(f, {}).load()
        if magic != _LEGACY_MAGIC:
            raise ValueError(
                f"{path} is not a legacy PyTorch checkpoint (zip-format files are not supported)"
            )
        _RestrictedUnpickler(f, {}).load()  # protocol version: nothing to check
        sys_info = _RestrictedUnpickler(f, {}).load()
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path} was saved on a big-endian machine; not supported")
        storages: dict[str, _Storage] = {}
        tree = _RestrictedUnpickler(f, storages).load()
        keys = _RestrictedUnpickler(f, {}).load()
        for key in keys:
            storage = storages[key]
            count = int(np.frombuffer(f.read(8), dtype="<i8")[0])
            raw = f.read(count * storage.dtype.itemsize)
            if len(raw) != count * storage.dtype.itemsize:
                raise ValueError(f"{path} is truncated (storage {key})")
            storage.data = np.frombuffer(raw, dtype=storage.dtype)
    return {name: t.materialize() for name, t in tree.items()}
