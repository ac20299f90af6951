"""Model files made in code that exposed runtime faults (used by test_parity; no TensorFlow).

``write_depthwise_1x1`` writes the int8 QDQ ONNX block on which OpenVINO 2026.4's CPU plugin went
wrong at batch 1 with a dynamic batch axis on CPUs with VNNI but without AMX (issue 11): a depthwise
3x3 convolution on a 1x1 feature map between the Reshape and BatchNormalization nodes tf2onnx and
ONNX Runtime's quantizer leave in a MobileNetV2 at 32x32 (blocks 13 to 16), with quantization
parameters of the magnitudes found there. Random weights; the fault does not depend on them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_depthwise_1x1(path: Path, channels: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write the model (input and output ``(n, channels, 1, 1)`` float32, dynamic n) to ``path``;
    return 64 typical inputs (ReLU6 activations) and their labels (argmax of ONNX Runtime's
    output: the float truth here)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    c = int(channels)
    rng = np.random.default_rng(seed)

    def arr(name: str, v: object, dt: type) -> onnx.TensorProto:
        return nh.from_array(np.asarray(v, dtype=dt), name)

    inits = [
        arr("s_in", 0.0213, np.float32),
        arr("z_in", -128, np.int8),
        arr("shape", [-1, c, 1, 1], np.int64),
        arr("w_q", rng.integers(-127, 128, (c, 1, 3, 3)), np.int8),
        arr("w_s", rng.uniform(2e-4, 4e-4, c), np.float32),
        arr("w_z", np.zeros(c), np.int8),
        arr("s_dw", 0.00187, np.float32),
        arr("z_dw", 0, np.int8),
        arr("g_q", rng.integers(60, 127, c), np.int8),
        arr("g_s", 0.0082, np.float32),
        arr("g_z", 0, np.int8),
        arr("b_q", rng.integers(-3000, 3000, c), np.int32),
        arr("b_s", [1.53e-5], np.float32),
        arr("b_z", 0, np.int32),
        arr("mean", rng.normal(0, 0.02, c), np.float32),
        arr("var", rng.uniform(2e-4, 8e-4, c), np.float32),
        arr("s_o", 0.0174, np.float32),
        arr("z_o", -128, np.int8),
    ]
    n = h.make_node
    nodes = [
        n("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0),
        n("DequantizeLinear", ["g_q", "g_s", "g_z"], ["g"]),
        n("DequantizeLinear", ["b_q", "b_s", "b_z"], ["b"]),
        n("Reshape", ["x", "shape"], ["xr"]),
        n("QuantizeLinear", ["xr", "s_in", "z_in"], ["xrq"]),
        n("DequantizeLinear", ["xrq", "s_in", "z_in"], ["xin"]),
        n("Conv", ["xin", "w"], ["y"], group=c, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        n("QuantizeLinear", ["y", "s_dw", "z_dw"], ["yq"]),
        n("DequantizeLinear", ["yq", "s_dw", "z_dw"], ["yd"]),
        n("Reshape", ["yd", "shape"], ["yr"]),
        n("QuantizeLinear", ["yr", "s_dw", "z_dw"], ["yrq"]),
        n("DequantizeLinear", ["yrq", "s_dw", "z_dw"], ["yrd"]),
        n("BatchNormalization", ["yrd", "g", "b", "mean", "var"], ["bn"], epsilon=1e-3),
        n("QuantizeLinear", ["bn", "s_o", "z_o"], ["oq"]),
        n("DequantizeLinear", ["oq", "s_o", "z_o"], ["out"]),
    ]
    graph = h.make_graph(
        nodes,
        "depthwise_1x1",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, 1, 1])],
        [h.make_tensor_value_info("out", TensorProto.FLOAT, ["n", c, 1, 1])],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    x = np.clip(rng.normal(1.0, 1.0, (64, c, 1, 1)), 0.0, 6.0).astype(np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return x, np.asarray(ref).reshape(len(x), -1).argmax(axis=1)
