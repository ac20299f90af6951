"""ONNX models as PyTorch exports them (NCHW, dynamic batch axis), made in code for the ONNX-in tests.

No torch here: a tiny tf_keras CNN is trained on NHWC copies of the images, then its weights are written
into an ONNX graph of the operators ``torch.onnx.export`` emits for the same network (Conv with
symmetric pads, Relu, MaxPool, GlobalAveragePool, Flatten, Gemm with transB, Softmax), taking NCHW input
``(N, 3, 16, 16)`` with a symbolic batch axis. The data is unlike the digits: [0, 1] float images,
3 channels, 16x16, three unbalanced classes (horizontal stripes, vertical stripes, blobs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIDE = 16
CHANNELS = 3
CLASSES = ("horizontal", "vertical", "blob")
CLASS_SHARE = (0.5, 0.3, 0.2)


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``x`` (n, 3, 16, 16) float32 in [0, 1] (NCHW) and labels ``y`` (n,) int64, unbalanced."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(CLASSES), size=n, p=CLASS_SHARE)
    grid = np.arange(SIDE, dtype=np.float32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    x = np.empty((n, CHANNELS, SIDE, SIDE), np.float32)
    for i, c in enumerate(y):
        period = rng.uniform(3.0, 6.0)
        phase = rng.uniform(0, 2 * np.pi)
        if c == 0:
            base = 0.5 + 0.5 * np.sin(2 * np.pi * yy / period + phase)
        elif c == 1:
            base = 0.5 + 0.5 * np.sin(2 * np.pi * xx / period + phase)
        else:
            cy, cx = rng.uniform(4, 12, size=2)
            base = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(2.0, 4.0) ** 2))
        colour = rng.uniform(0.4, 1.0, size=CHANNELS).astype(np.float32)
        img = colour[:, None, None] * base[None] + rng.normal(0, 0.05, (CHANNELS, SIDE, SIDE))
        x[i] = np.clip(img, 0.0, 1.0)
    return x, y.astype(np.int64)


def save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """Write ``x``/``y`` and the class names as an edgefleet ``.npz`` data file."""
    np.savez(path, x=x, y=y, class_names=np.array(CLASSES))
    return path


def train_weights(x: np.ndarray, y: np.ndarray, epochs: int = 25) -> list[np.ndarray]:
    """Train the tiny CNN on NHWC copies of ``x`` (NCHW); return its Keras weights (HWIO kernels)."""
    from toolchain.tfenv import import_keras, import_tf

    tf = import_tf()
    keras = import_keras()
    tf.random.set_seed(0)
    model = keras.Sequential(
        [
            keras.layers.Input((SIDE, SIDE, CHANNELS)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(len(CLASSES), activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(np.transpose(x, (0, 2, 3, 1)), y, epochs=epochs, batch_size=32, verbose=0)
    return [np.asarray(w) for w in model.get_weights()]


def write_onnx(
    weights: list[np.ndarray], path: Path, opset: int = 17, input_shape: tuple[int | str, ...] | None = None
) -> Path:
    """Write the CNN as ``torch.onnx.export`` would: NCHW input ``input`` (N, 3, 16, 16), output ``output``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k1, b1, k2, b2, wd, bd = weights
    inits = [
        numpy_helper.from_array(np.transpose(k1, (3, 2, 0, 1)).astype(np.float32), "conv1.weight"),
        numpy_helper.from_array(b1.astype(np.float32), "conv1.bias"),
        numpy_helper.from_array(np.transpose(k2, (3, 2, 0, 1)).astype(np.float32), "conv2.weight"),
        numpy_helper.from_array(b2.astype(np.float32), "conv2.bias"),
        numpy_helper.from_array(wd.T.astype(np.float32), "fc.weight"),  # (out, in) as torch stores it
        numpy_helper.from_array(bd.astype(np.float32), "fc.bias"),
    ]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [1, 1]}
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["c1"], **conv),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], **conv),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["output"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, input_shape or ("batch", CHANNELS, SIDE, SIDE)
            )
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", len(CLASSES)])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="pytorch")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return Path(path)
