"""Replace layers that compute the identity before quantization-aware training.

``edgefleet train`` rescales images by their largest absolute value; on data already in [0, 1] that
is ``Rescaling(1.0)``, and users' models carry the same no-op (``Rescaling(1.0)``, a
``Normalization`` with mean 0 and variance 1). Left in a QAT model, such a layer breaks int8
conversion (issue 11, QAT on data in [0, 1]): the TFLite converter folds the multiplication by one
away, so the input's fake-quant and the layer's own fake-quant (different ranges) meet with no op
between them, and the converter lowers the pair to DEQUANTIZE -> float32 -> QUANTIZE, a float
tensor inside a model promised to be int8. (Post-training quantization is not affected: the
calibrator gives the folded layer no range of its own.)

Replacing each such layer by a linear ``Activation`` (same name, no weights) keeps the graph and its
names; tfmot gives a linear activation no quantizer and both converters emit nothing for it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolchain.tfenv import import_keras, import_tf

# Random probe rows for the identity check: a non-identity affine or resize layer cannot pass by chance.
IDENTITY_PROBE_SAMPLES = 2


def is_identity_layer(layer: Any) -> bool:
    """Return True when a weightless one-input layer returns its input unchanged (same shape and values)."""
    if layer.trainable_weights or type(layer).__name__ in ("InputLayer", "Activation", "Dropout"):
        return False
    try:
        shape = layer.input_shape
        if isinstance(shape, list) or tuple(shape) != tuple(layer.output_shape):
            return False
        if any(d is None for d in shape[1:]):
            return False
        rng = np.random.default_rng(0)
        size = (IDENTITY_PROBE_SAMPLES, *shape[1:])
        # Signed values from 1e-3 to 1e4 in magnitude, so a clip or a saturating layer cannot pass.
        probe = (rng.normal(size=size) * 10.0 ** rng.uniform(-3, 4, size=size)).astype(np.float32)
        out = np.asarray(layer(import_tf().constant(probe), training=False))
    except (AttributeError, TypeError, ValueError, RuntimeError, NotImplementedError):
        return False
    return out.shape == probe.shape and bool(np.array_equal(out, probe))


def identity_layers(model: Any) -> list[str]:
    """Return the names of the model's layers that compute the identity (see ``is_identity_layer``)."""
    if not hasattr(model, "layers"):
        return []
    return [layer.name for layer in model.layers if is_identity_layer(layer)]


def drop_identity_layers(model: Any) -> Any:
    """Return ``model`` with every identity layer replaced by a linear Activation (the model itself if none).

    Other layers are shared with ``model`` (same weights). SavedModel directories and models that
    are not Functional/Sequential tf_keras models are returned unchanged.
    """
    names = set(identity_layers(model))
    if not names:
        return model
    keras = import_keras()

    def clone(layer: Any) -> Any:
        if layer.name in names:
            return keras.layers.Activation("linear", name=layer.name)
        return layer

    try:
        return keras.models.clone_model(model, clone_function=clone)
    except (ValueError, TypeError):  # subclassed models cannot be cloned; convert them as they are
        return model
