"""ONNX back end: tf2onnx (opset 17), then ONNX Runtime static quantization to int8 QDQ.

Post-training: float ONNX -> ``quant_pre_process`` (shape inference and graph clean-up) ->
``quantize_static`` in QDQ format, int8 activations and per-channel int8 weights, MinMax-calibrated
on the same calibration data as the TFLite targets -> ``onnx.checker``.

Quantization-aware (``qat=True``): tf2onnx turns each of the QAT model's FakeQuant nodes into a
QuantizeLinear/DequantizeLinear pair that carries the learned range. The weight pairs are then
folded into int8 initializers (so the file holds int8 weights, like the PTQ route), and the graph is
checked. No re-calibration happens: the learned ranges are the ones the model was fine-tuned with.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.steps.convert import ConversionError, calibration_batches, first_line, remove_quietly
from toolchain.steps.convert_tflite import model_signature
from toolchain.targets import Target
from toolchain.tfenv import import_tf

OPSET = 17
INPUT_NAME = "input"


def export_float(model: Any, out_path: Path) -> tuple[Path, tuple[int, ...]]:
    """Write the model as float ONNX (dynamic batch) with tf2onnx; return (path, sample_shape)."""
    tf = import_tf()
    import tf2onnx

    call, shape, keep = model_signature(model)
    sample_shape = tuple(shape[1:])
    if any(d is None for d in sample_shape):
        raise ConversionError(
            f"the model's input shape {shape} has unknown dimensions besides the batch; give it a fixed input shape"
        )
    spec = (tf.TensorSpec([None, *sample_shape], tf.float32, name=INPUT_NAME),)
    try:
        tf2onnx.convert.from_function(
            tf.function(call), input_signature=spec, opset=OPSET, output_path=str(out_path)
        )
    except Exception as e:  # tf2onnx raises ValueError, KeyError, and TensorFlow's errors
        remove_quietly(out_path)
        raise ConversionError(
            f"tf2onnx (opset {OPSET}) could not convert the model: {first_line(e)}"
        ) from None
    del keep
    return Path(out_path), sample_shape  # type: ignore[return-value]


def _reader(calib: np.ndarray, input_name: str, progress: bool, desc: str) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    from toolchain.steps.convert import CALIBRATION_BATCH

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        """Feeds the calibration batches to ONNX Runtime's calibrator."""

        def __init__(self) -> None:
            self._it: Iterator[np.ndarray] = calibration_batches(calib, CALIBRATION_BATCH, progress, desc)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

    return Reader()


def check_onnx(path: Path) -> None:
    """Run ``onnx.checker`` on a written model (full check, with shape inference)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # ValidationError, InferenceError
        raise ConversionError(f"onnx.checker rejects {path.name}: {first_line(e)}") from None


def convert(
    model: Any, target: Target, calib: np.ndarray, out_path: Path, *, qat: bool, progress: bool
) -> Path:
    """Write the target's int8 QDQ .onnx (float32 I/O, int8 activations and per-channel int8 weights)."""
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="edgefleet-onnx-") as tmp:
        float_path, sample_shape = export_float(model, Path(tmp) / "float.onnx")
        if tuple(calib.shape[1:]) != sample_shape:
            want = "x".join(str(d) for d in sample_shape)
            raise ConversionError(
                f"calibration data has sample shape {tuple(calib.shape[1:])}; the model takes ({want}) (--data)"
            )
        if qat:
            fold_qat_weights(float_path, out_path)
        else:
            quantize_ptq(float_path, out_path, calib, target, progress)
    check_onnx(out_path)
    return out_path


def quantize_ptq(float_path: Path, out_path: Path, calib: np.ndarray, target: Target, progress: bool) -> None:
    """Quantize a float ONNX model statically (QDQ, int8, per-channel) on the calibration data."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = float_path.with_name("pre.onnx")
    try:
        quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=False)
    except Exception as e:
        raise ConversionError(f"ONNX Runtime quant_pre_process failed: {first_line(e)}") from None
    try:
        quantize_static(
            str(pre),
            str(out_path),
            _reader(calib, _input_name(pre), progress, f"calibrating {target.name}"),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    except Exception as e:
        remove_quietly(out_path)
        raise ConversionError(
            f"ONNX Runtime static quantization for target {target.name!r} failed: {first_line(e)}"
        ) from None


def _input_name(path: Path) -> str:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in inits]
    if len(names) != 1:
        raise ConversionError(
            f"the ONNX model has {len(names)} inputs; only single-input models are supported"
        )
    return names[0]


def fold_qat_weights(qdq_path: Path, out_path: Path) -> None:
    """Fold QuantizeLinear nodes on constant weights into int8 initializers (keep the learned ranges).

    tf2onnx exports a QAT model as float weights followed by QuantizeLinear -> DequantizeLinear. A
    QuantizeLinear whose input is a constant is evaluated here once (round half to even, saturate,
    as the ONNX spec defines it) and replaced by its int8 result.
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(qdq_path))
    g = m.graph
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:  # tf2onnx sometimes leaves constants as Constant nodes
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    n_q = sum(1 for n in g.node if n.op_type == "QuantizeLinear")
    if n_q == 0:
        raise ConversionError(
            "the QAT model exported to ONNX without QuantizeLinear nodes; is it a tfmot quantization-aware model"
            " (tfmot.quantization.keras.quantize_model)?"
        )
    keep = []
    folded = 0
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in consts and n.input[1] in consts:
            w = consts[n.input[0]].astype(np.float32)
            scale = consts[n.input[1]].astype(np.float32)
            zp = consts[n.input[2]] if len(n.input) > 2 and n.input[2] in consts else np.zeros((), np.uint8)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if scale.ndim == 1 and scale.size > 1:
                bshape = [1] * w.ndim
                bshape[axis] = scale.size
                scale_b, zp_b = scale.reshape(bshape), zp.astype(np.int32).reshape(bshape)
            else:
                scale_b, zp_b = scale, zp.astype(np.int32)
            info = np.iinfo(zp.dtype)
            q = np.clip(np.rint(w / scale_b) + zp_b, info.min, info.max).astype(zp.dtype)
            g.initializer.append(numpy_helper.from_array(q, n.output[0]))
            folded += 1
            continue
        keep.append(n)
    if folded == 0:
        raise ConversionError(
            "no weight QuantizeLinear could be folded in the QAT ONNX export; the weights stay float"
        )
    del g.node[:]
    g.node.extend(keep)
    # Drop float weights and Constant nodes nobody reads any more.
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    live = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    live_nodes = [n for n in g.node if n.op_type != "Constant" or n.output[0] in used]
    del g.node[:]
    g.node.extend(live_nodes)
    onnx.save(m, str(out_path))


def convert_float(model: Any, out_path: Path) -> Path:
    """Write the float32 ONNX reference (dynamic batch), checked with onnx.checker."""
    path, _ = export_float(model, Path(out_path))
    check_onnx(path)
    return path
