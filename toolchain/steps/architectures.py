"""The built-in architectures: ``mlp`` for tabular data, ``cnn`` and ``mobilenetv2`` for images.

They put the normalisation inside the model (``Rescaling`` for images, ``Normalization`` adapted to
the training data for tabular data), so the device feeds raw values. Width, depth, input resolution
and (MobileNetV2) alpha are the knobs ``edgefleet tune`` searches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolchain.steps.models import ModelError
from toolchain.tfenv import import_keras, import_tf

ARCHITECTURES = ("mlp", "cnn", "mobilenetv2")
# Architectures of the other tasks (issue 15): name -> (task, "module:function" taking (x, seed)),
# imported on first use. Not classifiers, so not in ARCHITECTURES (``edgefleet tune`` searches those).
TASK_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "autoencoder": ("anomaly", "toolchain.steps.anomaly:build_autoencoder"),
}
# MobileNetV2 needs at least 32x32 inputs; smaller images are resized inside the model.
MOBILENET_MIN_SIDE = 32
MOBILENET_ALPHA = 0.35
MOBILENET_BN_MOMENTUM = 0.9
REGRESSION_L2 = 1e-2


def build_architecture(
    arch: str,
    x: np.ndarray,
    n_classes: int,
    seed: int = 0,
    *,
    width: float = 1.0,
    depth: int = 2,
    resolution: float = 1.0,
    alpha: float = MOBILENET_ALPHA,
    linear: bool = False,
) -> Any:
    """Return an uncompiled tf_keras model for raw inputs like ``x`` (n, *shape) with ``n_classes`` outputs.

    ``mlp`` (tabular or small images, flattened), ``cnn`` (images (h, w, c)), ``mobilenetv2`` (images,
    random init). Normalisation is the first layer, so the model takes raw values.

    The knobs ``edgefleet tune`` searches (the defaults give the fixed architectures): ``width``
    multiplies the units (mlp: 64, 32, ...) or filters (cnn: 16, 32, ...), ``depth`` is the number of
    hidden layers (mlp) or conv blocks (cnn), each half (mlp) or twice (cnn) the previous one;
    ``resolution`` (0..1] scales the image's height and width by a resize inside the model (the device
    still sends full-size images); ``alpha`` is MobileNetV2's width multiplier.

    ``linear`` (regression, ``toolchain.steps.regression``): ``n_classes`` linear outputs, one per
    target, instead of a softmax over classes.
    """
    if arch in TASK_ARCHITECTURES:
        import importlib

        module, func = TASK_ARCHITECTURES[arch][1].split(":")
        return getattr(importlib.import_module(module), func)(x, seed)
    keras = import_keras()
    tf = import_tf()
    tf.random.set_seed(seed)
    if arch not in ARCHITECTURES:
        known = ", ".join((*ARCHITECTURES, *TASK_ARCHITECTURES))
        raise ModelError(f"unknown architecture {arch!r}. Known: {known}")
    shape = tuple(int(d) for d in x.shape[1:])
    if n_classes < 2 and not linear:
        raise ModelError(f"the data has {n_classes} class; classification needs at least 2")
    L = keras.layers
    inp = keras.Input(shape=shape, name="input")
    if arch == "mlp":
        h = L.Flatten()(inp) if len(shape) > 1 else inp
        flat = x.reshape(x.shape[0], -1).astype(np.float32)
        norm = L.Normalization(axis=-1, name="normalize")
        norm.adapt(flat)
        h = norm(h)
        x0 = h
        # regression: an L2 penalty on the hidden layers, so what the linear path explains stays there
        reg = keras.regularizers.l2(REGRESSION_L2) if linear else None
        for i in range(depth):
            h = L.Dense(max(4, round(64 * width / 2**i)), activation="relu", kernel_regularizer=reg)(h)
        if linear:
            # regression: a linear path beside the hidden layers (train starts it at the least-squares
            # fit; the hidden part starts at zero and learns what is not linear)
            head = L.Dense(n_classes, kernel_initializer="zeros", name="scores")(h)
            out = L.Add(name="values")([head, L.Dense(n_classes, use_bias=False, name="linear")(x0)])
        else:
            out = L.Dense(n_classes, activation="softmax", name="scores")(h)
        return keras.Model(inp, out, name="mlp")
    if len(shape) != 3:
        raise ModelError(
            f"--arch {arch} needs images of shape (height, width, channels); the data has samples of shape "
            f"{shape}"
        )
    scale = float(np.max(np.abs(x))) or 1.0
    if arch == "cnn":
        h = L.Rescaling(1.0 / scale, name="rescale")(inp)
        work_hw = _scaled_side(shape, resolution, 1)
        if work_hw != shape[:2]:
            h = L.Resizing(*work_hw, name="resize")(h)
        for i in range(depth):
            h = L.Conv2D(max(4, round(16 * width * 2**i)), 3, padding="same", activation="relu")(h)
            # pool while the feature map is at least 4 pixels on its short side
            h = L.MaxPooling2D(2)(h) if min(int(h.shape[1]), int(h.shape[2])) >= 4 else h
        spatial = int(np.prod(h.shape[1:3]))
        h = L.Flatten()(h) if spatial <= 64 else L.GlobalAveragePooling2D()(h)
        h = L.Dense(64, activation="relu")(h)
        h = L.Dropout(0.2)(h)
        out = L.Dense(n_classes, activation=None if linear else "softmax", name="scores")(h)
        return keras.Model(inp, out, name="cnn")
    # mobilenetv2: scale raw values to [-1, 1] as MobileNetV2 expects; resize tiny images up.
    h = L.Rescaling(2.0 / scale, offset=-1.0, name="rescale")(inp)
    hw = _scaled_side(shape, resolution, 1)
    if min(hw) < MOBILENET_MIN_SIDE:
        side = max(MOBILENET_MIN_SIDE, *hw)
        hw = (side, side)
    if hw != shape[:2]:
        h = L.Resizing(*hw, name="resize")(h)
    side_shape = (*hw, shape[2])
    # input_tensor keeps every MobileNetV2 layer in this one flat graph (tfmot refuses nested models).
    base = keras.applications.MobileNetV2(
        input_shape=side_shape,
        input_tensor=h,
        alpha=alpha,
        include_top=False,
        weights=None,
        pooling="avg",
    )
    # Keras builds MobileNetV2's BatchNormalization with momentum 0.999: on a small data set (tens of
    # steps per epoch) the moving statistics barely move, inference-mode accuracy stays at chance for
    # many epochs and early stopping ends training there. 0.9 tracks the weights within an epoch.
    for layer in base.layers:
        if type(layer).__name__ == "BatchNormalization":
            layer.momentum = MOBILENET_BN_MOMENTUM
    h = base.output
    out = L.Dense(n_classes, activation=None if linear else "softmax", name="scores")(h)
    return keras.Model(inp, out, name="mobilenetv2")


def _scaled_side(shape: tuple[int, ...], resolution: float, least: int) -> tuple[int, int]:
    """Return (height, width) of an image shape scaled by ``resolution`` (each at least ``least``)."""
    if not 0 < resolution <= 1:
        raise ModelError(f"resolution {resolution} must be in (0, 1] (a fraction of the image's side)")
    return (max(least, round(shape[0] * resolution)), max(least, round(shape[1] * resolution)))
