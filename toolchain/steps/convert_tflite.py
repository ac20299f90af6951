"""TFLite back end: full-integer post-training (or QAT) conversion with the TFLite converter.

The model is always converted from a concrete function, so the input signature is explicit: batch
``None`` (dynamic) normally, batch 1 for targets with ``[edgetpu] static_batch`` (the Edge TPU
compiler needs static shapes). A SavedModel directory (a Keras 3 model after ``model.export``) is
loaded and its ``serve``/``serving_default`` signature wrapped the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from device_agent.formats.manifest import DType
from toolchain.steps.convert import (
    ConversionError,
    calibration_batches,
    first_line,
    remove_quietly,
)
from toolchain.targets import Target
from toolchain.tfenv import import_tf, native_quiet

SERVING_SIGNATURES = ("serve", "serving_default")


def model_signature(model: Any) -> tuple[Any, tuple[int | None, ...], Any]:
    """Return ``(call, input_shape, keep_alive)`` for a tf_keras model or a SavedModel directory.

    ``call`` maps one float32 tensor to one output tensor; ``input_shape`` includes the batch axis
    (``None`` when dynamic; every other axis must be fixed); ``keep_alive`` must outlive the
    conversion (it owns the variables).
    """
    tf = import_tf()
    if isinstance(model, (str, Path)):
        p = Path(model)
        if not (p / "saved_model.pb").is_file():
            raise ConversionError(
                f"{str(p)!r} is not a SavedModel directory (no saved_model.pb);"
                " pass a tf_keras model or a folder written by model.export()"
            )
        try:
            loaded = tf.saved_model.load(str(p))
        except Exception as e:  # TensorFlow raises many types for damaged files
            raise ConversionError(f"cannot load SavedModel {str(p)!r} ({first_line(e)})") from None
        sig = next((loaded.signatures[k] for k in SERVING_SIGNATURES if k in loaded.signatures), None)
        if sig is None:
            raise ConversionError(
                f"SavedModel {str(p)!r} has no serving signature (have: {sorted(loaded.signatures)});"
                " export it with model.export(dir)"
            )
        _, kwargs = sig.structured_input_signature
        outputs = sig.structured_outputs
        if len(kwargs) != 1 or len(outputs) != 1:
            raise ConversionError(
                f"SavedModel {str(p)!r} has {len(kwargs)} inputs and {len(outputs)} outputs;"
                " only single-input, single-output models are supported"
            )
        (in_key, in_spec), out_key = next(iter(kwargs.items())), next(iter(outputs))
        shape = tuple(in_spec.shape.as_list())

        def call_saved(x: Any) -> Any:
            return sig(**{in_key: x})[out_key]

        return call_saved, _fixed(shape), loaded
    if not hasattr(model, "input_shape") or not callable(model):
        raise ConversionError(
            f"cannot convert a {type(model).__name__}; pass a tf_keras model or a SavedModel directory"
        )
    shape = model.input_shape
    if isinstance(shape, list):
        raise ConversionError(f"the model has {len(shape)} inputs; only single-input models are supported")
    if isinstance(model.output_shape, list):
        raise ConversionError(
            f"the model has {len(model.output_shape)} outputs; only single-output models are supported"
        )

    def call_keras(x: Any) -> Any:
        return model(x, training=False)

    return call_keras, _fixed(tuple(shape)), model


def _fixed(shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
    """Return ``shape`` when only its batch axis may be unknown; refuse it otherwise."""
    if any(d is None for d in shape[1:]):
        raise ConversionError(
            f"the model's input shape {shape} has unknown dimensions besides the batch;"
            " give it a fixed input shape"
        )
    return shape


def concrete_function(model: Any, batch: int | None) -> tuple[Any, Any, tuple[int, ...]]:
    """Trace the model for float32 input ``[batch, *sample_shape]``; return (fn, keep_alive, sample_shape)."""
    tf = import_tf()
    call, shape, keep = model_signature(model)
    sample_shape = tuple(shape[1:])
    fn = tf.function(call).get_concrete_function(
        tf.TensorSpec([batch, *sample_shape], tf.float32, name="input")
    )
    return fn, keep, sample_shape  # type: ignore[return-value]


_TF_TYPES = {DType.FLOAT32: "float32", DType.INT8: "int8", DType.UINT8: "uint8"}


def refuse_onnx(model: Any) -> None:
    """Raise ConversionError for an ONNX model: no ONNX -> TFLite converter installs beside our TensorFlow."""
    from toolchain.steps.models import OnnxSource

    if isinstance(model, OnnxSource):
        raise ConversionError(
            f"cannot convert ONNX model {model.path.name!r} to TFLite (no ONNX -> TensorFlow converter works"
            " with this TensorFlow; see docs/conversion.md); build it for x86 or pass the Keras model"
        )


def convert(
    model: Any, target: Target, calib: np.ndarray, out_path: Path, *, qat: bool, progress: bool
) -> Path:
    """Write the target's full-integer .tflite (int8 weights and activations, the target's I/O dtypes)."""
    refuse_onnx(model)
    tf = import_tf()
    batch = 1 if target.edgetpu is not None and target.edgetpu.static_batch else None
    fn, keep, sample_shape = concrete_function(model, batch)
    if tuple(calib.shape[1:]) != sample_shape:
        want = "x".join(str(d) for d in sample_shape)
        raise ConversionError(
            f"calibration data has sample shape {tuple(calib.shape[1:])}; the model takes ({want}) (--data)"
        )
    if qat and not any(op.type.startswith("FakeQuant") for op in _graph_ops(fn)):
        raise ConversionError(
            "--quantize qat was asked for, but the model has no FakeQuant nodes; pass a tfmot"
            " quantization-aware model (tfmot.quantization.keras.quantize_model)"
        )
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], keep)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def representative() -> Any:
        # One sample per step: the converter's calibrator runs the float model at batch 1 anyway.
        for chunk in calibration_batches(calib, 1, progress, f"calibrating {target.name}"):
            yield [chunk]

    # QAT models carry learned ranges in their fake-quant nodes; the representative data only covers
    # tensors QAT left without ranges (and lets the converter pick the integer I/O parameters).
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = getattr(tf, _TF_TYPES[target.quantization.input_dtype])
    converter.inference_output_type = getattr(tf, _TF_TYPES[target.quantization.output_dtype])
    kind = "QAT" if qat else "post-training"
    try:
        with native_quiet():
            flat = converter.convert()
    except Exception as e:  # the converter raises ConverterError, ValueError, RuntimeError...
        remove_quietly(out_path)
        raise ConversionError(
            f"TFLite full-int8 {kind} conversion for target {target.name!r} failed: {first_line(e)}"
            + conversion_advice(str(e), qat=qat, static_batch=batch is not None)
        ) from None
    out_path.write_bytes(flat)
    return out_path


def conversion_advice(message: str, *, qat: bool, static_batch: bool) -> str:
    """Return the hint that follows a failed TFLite conversion's first line."""
    if qat and "scale_diff" in message:
        # Seen with a QAT mlp on raw 0..255 images for coral: with a static batch the converter folds
        # the Normalization before a FULLY_CONNECTED into it, and the QAT bias scale no longer
        # matches input scale x weight scale. Dynamic-batch targets convert the same model.
        where = " with the static batch this target needs" if static_batch else ""
        return (
            f" (the converter cannot keep this QAT model's learned scales{where};"
            " build this target with --quantize ptq)"
        )
    return " (does every layer have an int8 TFLite kernel?)"


def _graph_ops(fn: Any) -> list[Any]:
    """Return the ops of a concrete function's graph, including those of the functions it calls."""
    ops = list(fn.graph.get_operations())
    for f in getattr(
        fn.graph, "_functions", {}
    ).values():  # nested tf.functions (Keras layers, SavedModel signatures)
        ops += list(f.graph.get_operations()) if hasattr(f, "graph") else []
    return ops


def convert_float(model: Any, out_path: Path) -> Path:
    """Write the float32 .tflite reference (dynamic batch, no optimizations)."""
    refuse_onnx(model)
    tf = import_tf()
    fn, keep, _ = concrete_function(model, None)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], keep)
    try:
        with native_quiet():
            flat = converter.convert()
    except Exception as e:
        remove_quietly(out_path)
        raise ConversionError(f"float TFLite conversion failed: {first_line(e)}") from None
    Path(out_path).write_bytes(flat)
    return Path(out_path)
