"""A clean first screen: TensorFlow's native start-up lines silenced at their source.

TensorFlow's C++ runtime writes straight to file descriptor 2 while it loads
and first probes for GPUs (oneDNN notices, ``cudart_stub``, "failed call to
cuInit: ... CUDA error" on every machine without a GPU), whatever
``TF_CPP_MIN_LOG_LEVEL`` says. A new user's first sight would be an error that
is not one. :func:`install` arranges that the first ``import tensorflow`` (by
Keras or anyone) runs with descriptor 2 captured; afterwards the lines known to
be start-up noise are dropped and anything else is written back, so a real
error is never hidden. Nothing is captured after that import.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

# What TensorFlow 2.16-2.21 prints on a healthy CPU-only start.
NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations|cudart_stub|cuda drivers|"
    r"cuInit|cuda_platform|cuda_executor|cpu_feature_guard|To enable the following instructions|"
    r"rebuild TensorFlow with the appropriate compiler flags|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"TF-TRT Warning|computation placer already registered|Attempting to register factory|"
    r"CUDA-capable device|successful NUMA node read"
)


@contextlib.contextmanager
def native_stderr_filtered(noise: re.Pattern = NOISE):
    """Capture descriptor 2 (what C and C++ code prints) for the block; write back what is not ``noise``."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2 (embedded interpreters): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if line.strip() and not noise.search(line)]
            if kept:
                os.write(2, "".join(kept).encode())


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with native_stderr_filtered():
            self.loader.exec_module(module)
            # The GPU probe ("failed call to cuInit") runs on first use: do it now, inside the filter.
            with contextlib.suppress(Exception):
                module.config.list_physical_devices()


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the real finders locate it
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Filter the native start-up output of TensorFlow's first import in this process.

    Called where a command starts, never on import: the Python side obeys
    ``TF_CPP_MIN_LOG_LEVEL`` (set here unless the user set it), the native side
    is filtered while it loads.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorFlowFinder())
