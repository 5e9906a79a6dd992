"""Keras layers that pool a backbone's output into one vector per image.

They live in their own module (imported only with Keras) and are registered
with Keras, so a model that holds them — a backbone, or an adapter whose
fine-tuned tail ends in one — is saved and loaded like any other.
"""
from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="similar_finder")
class GeMPooling2D(keras.layers.Layer):
    """Generalised-mean pooling over the feature map: ``(mean(max(x, eps) ** p)) ** (1 / p)`` per channel.

    ``p = 1`` is average pooling and ``p -> inf`` max pooling; ``p = 3`` (Radenović
    et al., 2018) weights the strongest activations of a channel more than the
    average does without keeping only one of them. Values are clamped to
    ``eps`` before the power, so a zero (or, on other networks, a negative)
    activation never turns the root into NaN.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.p, self.eps = float(p), float(eps)

    def call(self, x):
        x = ops.power(ops.maximum(x, self.eps), self.p)
        return ops.power(ops.mean(x, axis=(1, 2)), 1.0 / self.p)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "p": self.p, "eps": self.eps}


@keras.saving.register_keras_serializable(package="similar_finder")
class TokenPooling(keras.layers.Layer):
    """One vector from a vision transformer's token sequence ``(batch, tokens, dim)``.

    ``"cls"`` takes the first (class) token; ``"mean"`` averages the patch
    tokens, skipping the ``prefix_tokens`` that are not patches (the class token
    and any register tokens).
    """

    def __init__(self, mode: str = "cls", prefix_tokens: int = 1, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("cls", "mean"):
            raise ValueError(f"unknown token pooling {mode!r}")
        self.mode, self.prefix_tokens = mode, int(prefix_tokens)

    def call(self, x):
        if self.mode == "cls":
            return x[:, 0, :]
        return ops.mean(x[:, self.prefix_tokens:, :], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "prefix_tokens": self.prefix_tokens}
