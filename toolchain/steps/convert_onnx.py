"""ONNX back end: tf2onnx (opset 17), then ONNX Runtime static quantization to int8 QDQ.

Post-training: float ONNX -> ``quant_pre_process`` (shape inference and graph clean-up) ->
``quantize_static`` in QDQ format, int8 activations and per-channel int8 weights, MinMax-calibrated
on the same calibration data as the TFLite targets -> ``onnx.checker``.

Quantization-aware (``qat=True``): tf2onnx exports the QAT graph with each weight FakeQuant folded
into float weights that sit on the learned int8 grid (their scales are not kept) and each activation
FakeQuant as a *uint8* QuantizeLinear/DequantizeLinear pair. Shipping that as is would break the
int8 promise (uint8 activations, float weights in the file), so the pairs are turned into Identity
and the resulting float model, holding the QAT-trained weights, goes through the same static int8
QDQ quantization as PTQ. Per-channel convolution weights land exactly on the QAT grid again; per-tensor
QAT weights (Dense) are re-rounded per channel by at most half a step; activation ranges are
calibrated on the calibration data rather than taken from the QAT moving averages. See
docs/conversion.md.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.steps.convert import ConversionError, calibration_batches, first_line, remove_quietly
from toolchain.steps.convert_tflite import model_signature
from toolchain.targets import Target
from toolchain.tfenv import import_tf

OPSET = 17
INPUT_NAME = "input"


@dataclass(frozen=True)
class Int8Form:
    """One way ONNX Runtime writes an int8 model (all keep int8 weights and int8 activations).

    ``operator``: QOperator format (QLinearConv, QLinearMatMul... with the scales inside the op)
    instead of QDQ (float ops between QuantizeLinear/DequantizeLinear pairs that the runtime fuses).
    ``per_channel``: one weight scale per output channel instead of one per tensor.
    ``reduce_range``: 7-bit weights, which avoid the int16 overflow of the u8s8 kernels of CPUs
    without VNNI at the price of one bit of weight precision.
    """

    operator: bool = False
    per_channel: bool = True
    reduce_range: bool = False

    @property
    def name(self) -> str:
        """``qdq-per-channel``, ``qoperator-per-tensor-reduce-range``..."""
        parts = ["qoperator" if self.operator else "qdq", "per-channel" if self.per_channel else "per-tensor"]
        return "-".join(parts + (["reduce-range"] if self.reduce_range else []))


# What a build writes when it does not search (the form of every release before the search).
DEFAULT_FORM = Int8Form()
# Every combination, by name; ``toolchain.steps.int8_forms`` picks among them per target.
FORMS: dict[str, Int8Form] = {
    f.name: f
    for f in (
        Int8Form(operator=op, per_channel=pc, reduce_range=rr)
        for op in (False, True)
        for pc in (True, False)
        for rr in (False, True)
    )
}


def export_float(model: Any, out_path: Path) -> tuple[Path, tuple[int, ...]]:
    """Write the model as float ONNX (dynamic batch) with tf2onnx; return (path, sample_shape).

    An ONNX model the user brought (``OnnxSource``) is copied as it is: its layout (NCHW from
    PyTorch) and names stay, so the bundle takes inputs exactly as the user's model did.
    """
    from toolchain.steps.models import OnnxSource

    if isinstance(model, OnnxSource):
        return copy_user_onnx(model, Path(out_path))
    tf = import_tf()
    import tf2onnx

    call, shape, keep = model_signature(model)
    sample_shape = tuple(shape[1:])
    spec = (tf.TensorSpec([None, *sample_shape], tf.float32, name=INPUT_NAME),)
    fn = tf.function(call)
    try:
        # The same trace tf2onnx makes (tf.function caches it), for the constants it captured.
        consts = captured_constants(fn.get_concrete_function(*spec))
        tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET, output_path=str(out_path))
    except Exception as e:  # tf2onnx raises ValueError, KeyError, and TensorFlow's errors
        remove_quietly(out_path)
        raise ConversionError(
            f"tf2onnx (opset {OPSET}) could not convert the model: {first_line(e)}"
        ) from None
    inline_captured_inputs(Path(out_path), consts)
    del keep
    return Path(out_path), sample_shape  # type: ignore[return-value]


def copy_user_onnx(source: Any, out_path: Path) -> tuple[Path, tuple[int, ...]]:
    """Copy a user's float ONNX model to ``out_path``; return (path, sample_shape)."""
    import onnx

    m = onnx.load(str(source.path))
    inits = {i.name for i in m.graph.initializer}
    graph_input = next(i for i in m.graph.input if i.name not in inits)
    dims = graph_input.type.tensor_type.shape.dim
    sample_shape = tuple(int(d.dim_value) for d in dims[1:])
    onnx.save(m, str(out_path))
    return Path(out_path), sample_shape


def captured_constants(concrete: Any) -> dict[str, np.ndarray]:
    """Return ``{placeholder name: value}`` of the eager tensors (not variables) a trace captured.

    tf_keras ``Normalization`` keeps its mean and variance as such tensors; tf2onnx freezes variables
    into initializers but turns these into extra graph *inputs*, which no device feeds (found by the
    conversion matrix: an mlp on images failed on x86 with "the ONNX model has 3 inputs").
    """
    tf = import_tf()
    out: dict[str, np.ndarray] = {}
    for external, internal in getattr(concrete.graph, "captures", []):
        if getattr(external, "dtype", None) in (tf.resource, tf.variant) or not hasattr(external, "numpy"):
            continue
        try:
            out[internal.name] = np.asarray(external.numpy())
        except (ValueError, TypeError, AttributeError):  # symbolic tensors have no value here
            continue
    return out


def inline_captured_inputs(path: Path, consts: dict[str, np.ndarray]) -> int:
    """Turn graph inputs that are captured constants into initializers; return how many."""
    if not consts:
        return 0
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name for i in m.graph.initializer}
    moved = [i for i in m.graph.input if i.name in consts and i.name not in inits]
    if not moved:
        return 0
    for i in moved:
        m.graph.initializer.append(numpy_helper.from_array(consts[i.name], i.name))
    keep = [i for i in m.graph.input if i not in moved]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    onnx.save(m, str(path))
    return len(moved)


def _reader(calib: np.ndarray, input_name: str, progress: bool, desc: str) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    from toolchain.steps.convert import CALIBRATION_BATCH

    class Reader(CalibrationDataReader):
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
    model: Any,
    target: Target,
    calib: np.ndarray,
    out_path: Path,
    *,
    qat: bool,
    progress: bool,
    form: Int8Form = DEFAULT_FORM,
) -> Path:
    """Write the target's int8 .onnx (float32 I/O, int8 activations and weights) in ``form``."""
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="edgefleet-onnx-") as tmp:
        float_path = export_quantizable(model, calib, Path(tmp), qat=qat)
        quantize_ptq(float_path, out_path, calib, target, progress, form)
    check_onnx(out_path)
    return out_path


def export_quantizable(model: Any, calib: np.ndarray, tmp: Path, *, qat: bool) -> Path:
    """Write the float ONNX model that ``quantize_ptq`` takes into ``tmp`` (QAT pairs stripped)."""
    float_path, sample_shape = export_float(model, Path(tmp) / "float.onnx")
    if tuple(calib.shape[1:]) != sample_shape:
        want = "x".join(str(d) for d in sample_shape)
        raise ConversionError(
            f"calibration data has sample shape {tuple(calib.shape[1:])}; the model takes ({want}) (--data)"
        )
    if qat:
        stripped = Path(tmp) / "qat_float.onnx"
        strip_qat_qdq(float_path, stripped)
        float_path = stripped
    return float_path


def quantize_ptq(
    float_path: Path,
    out_path: Path,
    calib: np.ndarray,
    target: Target,
    progress: bool,
    form: Int8Form = DEFAULT_FORM,
) -> None:
    """Quantize a float ONNX model statically (int8, MinMax) on the calibration data, in ``form``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = float_path.with_name(f"{float_path.stem}-pre.onnx")  # the same for every form: made once
    try:
        if not pre.is_file():
            quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=False)
    except Exception as e:
        remove_quietly(pre)
        raise ConversionError(f"ONNX Runtime quant_pre_process failed: {first_line(e)}") from None
    try:
        quantize_static(
            str(pre),
            str(out_path),
            _reader(calib, _input_name(pre), progress, f"calibrating {target.name}"),
            quant_format=QuantFormat.QOperator if form.operator else QuantFormat.QDQ,
            nodes_to_exclude=_softmax_nodes(pre) if form.operator else None,
            per_channel=form.per_channel,
            reduce_range=form.reduce_range,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    except Exception as e:
        remove_quietly(out_path)
        raise ConversionError(
            f"ONNX Runtime static quantization for target {target.name!r} failed: {first_line(e)}"
        ) from None


def _softmax_nodes(path: Path) -> list[str]:
    """Names of the Softmax nodes: QOperator would turn them into com.microsoft QLinearSoftmax, which
    OpenVINO 2026.4 cannot read with int8 inputs, so they stay float (the last op; QDQ keeps them too)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return [n.name for n in m.graph.node if n.op_type == "Softmax"]


def _input_name(path: Path) -> str:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    used = {i for n in m.graph.node for i in n.input}
    # Older exports list weights among the graph inputs too; only a consumed, non-constant input counts.
    names = [i.name for i in m.graph.input if i.name not in inits and i.name in used]
    if len(names) != 1:
        raise ConversionError(
            f"the ONNX model has {len(names)} inputs; only single-input models are supported"
        )
    return names[0]


def strip_qat_qdq(qdq_path: Path, out_path: Path) -> int:
    """Turn the QuantizeLinear/DequantizeLinear pairs of a tf2onnx QAT export into Identity; return how many.

    tf2onnx folds each weight FakeQuant of a tfmot QAT model into a float constant that already sits on
    the learned int8 grid, and exports each activation FakeQuant as a uint8 Q/DQ pair. What is left
    after removing the pairs is a float model with the QAT weights, which ``quantize_ptq`` turns
    into int8 QDQ (activation ranges re-calibrated on the calibration data).
    """
    import onnx

    m = onnx.load(str(qdq_path))
    n_qdq = 0
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            n.op_type = "Identity"
            del n.input[1:]
            del n.attribute[:]
            n_qdq += 1
    if n_qdq == 0:
        raise ConversionError(
            "--quantize qat was asked for, but the model has no FakeQuant nodes; pass a tfmot"
            " quantization-aware model (tfmot.quantization.keras.quantize_model)"
        )
    del m.graph.value_info[:]  # the pairs' uint8 types are stale now; shape inference redoes them
    used = {i for n in m.graph.node for i in n.input}
    live = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(live)
    # Graph inputs that only fed the removed pairs' scale/zero-point are dead now.
    inputs = [i for i in m.graph.input if i.name in used]
    del m.graph.input[:]
    m.graph.input.extend(inputs)
    onnx.save(m, str(out_path))
    return n_qdq


def convert_float(model: Any, out_path: Path) -> Path:
    """Write the float32 ONNX reference (dynamic batch), checked with onnx.checker."""
    path, _ = export_float(model, Path(out_path))
    check_onnx(path)
    return path
