"""Check converted artifacts in the device runtimes (LiteRT, ONNX Runtime, OpenVINO; never TensorFlow).

Two kinds of check:

* structure (``inspect_artifact``): the I/O dtypes the runtime reports match the target profile, the
  batch axis is static where the profile asks for it, and no float op is left inside a model the
  profile promises to be int8. For TFLite, the op and tensor tables come from the LiteRT interpreter;
  a float32 operand or result makes an op a float op, except the QUANTIZE of a float model input and
  the DEQUANTIZE of a float model output of targets with float I/O (``mobile``). For ONNX QDQ, every
  compute op (Conv, ConvTranspose, MatMul, Gemm) must read its data and weight inputs from
  DequantizeLinear nodes, weights must be stored as int8 and activations quantized to int8; in the
  QOperator form, the QLinearConv/QLinearMatMul/QGemm weights must be int8 too.
* numbers (``verify_artifact``): the artifact runs in every runtime it lists, and its scores are
  compared with the float model's: top-1 agreement and SQNR in dB.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.formats.manifest import DType, ModelFormat
from toolchain.steps.artifact import Artifact, VerificationError, read_io_specs
from toolchain.targets import Target

# An artifact identical to the float model has infinite SQNR; JSON (and the manifest) cannot carry
# infinity, so values are capped here.
SQNR_CAP_DB = 120.0
ONNX_COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
# QOperator-form compute ops (weights at input 3), written by ``convert_onnx`` for QOperator forms
ONNX_QOPERATOR_OPS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm"})


def _is_float(dt: Any) -> bool:
    return np.dtype(dt).kind == "f"


def inspect_artifact(artifact: Artifact, target: Target, *, qat: bool = False) -> dict[str, Any]:
    """Check an artifact's structure against the target's promise; return what was found.

    ``qat`` says the artifact came from a quantization-aware model (it only changes the advice).
    Raises VerificationError naming the first offending tensor or op.
    """
    name = artifact.path.name
    q = target.quantization
    checks: dict[str, Any] = {
        "promise": {
            "scheme": q.scheme,
            "input_dtype": q.input_dtype.value,
            "output_dtype": q.output_dtype.value,
        },
    }
    for kind, specs, want in (
        ("input", artifact.inputs, q.input_dtype),
        ("output", artifact.outputs, q.output_dtype),
    ):
        if len(specs) != 1:
            raise VerificationError(
                f"{name} has {len(specs)} {kind}s; bundles carry single-input, single-output models"
            )
        spec = specs[0]
        if spec.dtype != want:
            raise VerificationError(
                f"{name} for target {target.name!r} has {kind} {spec.name!r} of dtype {spec.dtype.value};"
                f" the profile promises {want.value}"
            )
        if want in (DType.INT8, DType.UINT8) and spec.quantization is None:
            raise VerificationError(
                f"{name} has integer {kind} {spec.name!r} without quantization parameters"
            )
        checks[f"{kind}_dtype"] = spec.dtype.value
    shape = artifact.inputs[0].shape
    if (
        target.edgetpu is not None
        and target.edgetpu.static_batch
        and (not shape or shape[0] != 1 or -1 in shape)
    ):
        raise VerificationError(
            f"{name} for target {target.name!r} has input shape {list(shape)};"
            " the Edge TPU needs a static batch-1 shape"
        )
    checks["input_shape"] = list(shape)
    checks["static_shape"] = -1 not in shape
    if artifact.format == ModelFormat.TFLITE:
        checks.update(_inspect_tflite(artifact, target))
    else:
        checks.update(_inspect_onnx(artifact, target))
    if checks["float_ops"]:
        # Name the op that computes in float, not the (DE)QUANTIZE the converter put around it.
        converts = ("QUANTIZE", "DEQUANTIZE", "QuantizeLinear", "DequantizeLinear")
        first = next((o for o in checks["float_ops"] if o["op"] not in converts), checks["float_ops"][0])
        more = f" and {len(checks['float_ops']) - 1} more" if len(checks["float_ops"]) > 1 else ""
        raise VerificationError(
            f"{name} for target {target.name!r} keeps float op {first['op']} (op #{first['index']},"
            f" float tensor {first['tensors'][0]!r}){more}, but the profile promises int8; "
            + float_op_advice(first["op"] in converts, qat)
        )
    return checks


def float_op_advice(only_conversions: bool, qat: bool) -> str:
    """Return what to try when a float op is left in an int8 model (``only_conversions``: only (DE)QUANTIZE)."""
    if only_conversions and qat:
        return (
            "two quantization ranges meet with no int8 op between them (a QAT fake-quant on a layer"
            " the converter removes); remove layers that do nothing from the model, or build with"
            " --quantize ptq"
        )
    if only_conversions:
        return "a float tensor sits between two quantization steps; try --quantize qat"
    if qat:
        return (
            "quantization-aware training left that layer in float; replace it with a layer that has an"
            " int8 kernel, or build with --quantize ptq"
        )
    return "replace that layer with one that has an int8 kernel (see docs/conversion.md)"


def _inspect_tflite(artifact: Artifact, target: Target) -> dict[str, Any]:
    from device_agent.runtimes import load_runtime_model

    try:
        model: Any = load_runtime_model(artifact.path, "litert", threads=1)
    except Exception as e:
        raise VerificationError(f"LiteRT cannot load {artifact.path.name}: {_line(e)}") from None
    tensors = {int(t["index"]): t for t in model.tensors()}
    model_inputs = {artifact.inputs[0].name}
    model_outputs = {artifact.outputs[0].name}
    float_in = target.quantization.input_dtype == DType.FLOAT32
    float_out = target.quantization.output_dtype == DType.FLOAT32
    op_counts: Counter[str] = Counter()
    float_ops: list[dict[str, Any]] = []
    boundary: list[str] = []
    for op in model.ops():
        op_name = str(op["op_name"])
        if op_name == "DELEGATE":  # XNNPACK's replacement nodes; the original ops are listed too
            continue
        op_counts[op_name] += 1
        ins = [tensors[int(i)] for i in op["inputs"] if int(i) >= 0]
        outs = [tensors[int(i)] for i in op["outputs"] if int(i) >= 0]
        floats = [t["name"] for t in ins + outs if _is_float(t["dtype"])]
        if not floats:
            continue
        if (
            float_in
            and op_name == "QUANTIZE"
            and [t["name"] for t in ins] == [n for n in model_inputs]
            and not any(_is_float(t["dtype"]) for t in outs)
        ):
            boundary.append(op_name)
            continue
        if (
            float_out
            and op_name == "DEQUANTIZE"
            and [t["name"] for t in outs] == [n for n in model_outputs]
            and not any(_is_float(t["dtype"]) for t in ins)
        ):
            boundary.append(op_name)
            continue
        float_ops.append({"index": int(op["index"]), "op": op_name, "tensors": floats})
    dtypes = Counter(np.dtype(t["dtype"]).name for t in tensors.values())
    weights_int8 = all(
        np.dtype(tensors[int(op["inputs"][1])]["dtype"]) == np.int8
        for op in model.ops()
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
        and len(op["inputs"]) > 1
    )
    return {
        "ops": dict(sorted(op_counts.items())),
        "tensor_dtypes": dict(sorted(dtypes.items())),
        "boundary_ops": boundary,
        "float_ops": float_ops,
        "weights_int8": weights_int8,
    }


def _inspect_onnx(artifact: Artifact, target: Target) -> dict[str, Any]:
    import onnx
    from onnx import numpy_helper

    try:
        m = onnx.load(str(artifact.path))
    except Exception as e:
        raise VerificationError(f"onnx cannot read {artifact.path.name}: {_line(e)}") from None
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    op_counts = Counter(n.op_type for n in g.node)
    float_ops: list[dict[str, Any]] = []
    for idx, n in enumerate(g.node):
        if n.op_type not in ONNX_COMPUTE_OPS:
            continue
        bad = [
            i for i in n.input[:2] if i and (i not in producer or producer[i].op_type != "DequantizeLinear")
        ]
        if bad:
            float_ops.append({"index": idx, "op": f"{n.op_type} {n.name!r}", "tensors": bad})
    weight_dtypes: Counter[str] = Counter()
    act_dtypes: Counter[str] = Counter()
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            weight_dtypes[numpy_helper.to_array(inits[n.input[0]]).dtype.name] += 1
        elif n.op_type in ONNX_QOPERATOR_OPS and len(n.input) > 3 and n.input[3] in inits:
            # QOperator form: the int8 weight is the op's fourth input, with no DequantizeLinear
            weight_dtypes[numpy_helper.to_array(inits[n.input[3]]).dtype.name] += 1
        elif n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
            act_dtypes[numpy_helper.to_array(inits[n.input[2]]).dtype.name] += 1
    wrong = sorted((set(weight_dtypes) | set(act_dtypes)) - {"int8", "int32"})  # int32: biases
    if wrong:
        raise VerificationError(
            f"{artifact.path.name} for target {target.name!r} quantizes to {', '.join(wrong)};"
            " the profile promises int8"
        )
    if not weight_dtypes and not float_ops:
        raise VerificationError(
            f"{artifact.path.name} for target {target.name!r} stores no quantized weights"
        )
    return {
        "ops": dict(sorted(op_counts.items())),
        "weight_dtypes": dict(weight_dtypes),
        "activation_dtypes": dict(act_dtypes),
        "float_ops": float_ops,
        "weights_int8": set(weight_dtypes) <= {"int8", "int32"},
        "opset": max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0),
    }


def verify_artifact(
    artifact: Artifact, target: Target, x: np.ndarray, float_scores: np.ndarray
) -> dict[str, Any]:
    """Run the artifact in every runtime it lists and compare with the float model's scores.

    ``x``: raw float inputs (n, *sample_shape); ``float_scores``: the float model's outputs on ``x``
    (n, K). Returns ``{"top1_agreement", "sqnr_db", "per_runtime", "float_ops", "checks", "samples"}``;
    the top-level numbers are the worst over the runtimes. Raises VerificationError when the
    structure breaks the profile's promise or a runtime cannot run the artifact.
    """
    checks = inspect_artifact(artifact, target)
    x = np.asarray(x, dtype=np.float32)
    ref = np.asarray(float_scores, dtype=np.float32).reshape(len(float_scores), -1)
    if len(ref) != len(x) or len(x) == 0:
        raise VerificationError(
            f"verification needs scores for each of the {len(x)} samples; got {len(ref)} rows"
        )
    per_runtime: dict[str, Any] = {}
    for rt in artifact.runtimes:
        scores = predict_artifact(artifact, rt, x)
        if scores.shape != ref.shape:
            raise VerificationError(
                f"{artifact.path.name} in {rt} returns scores of shape {scores.shape};"
                f" the float model gives {ref.shape}"
            )
        per_runtime[rt] = {
            "top1_agreement": top1_agreement(scores, ref),
            "sqnr_db": sqnr_db(ref, scores),
            "max_abs_diff": float(np.max(np.abs(scores - ref))),
        }
    if not per_runtime:
        raise VerificationError(f"{artifact.path.name} lists no runtime to verify it in")
    return {
        "top1_agreement": min(v["top1_agreement"] for v in per_runtime.values()),
        "sqnr_db": min(v["sqnr_db"] for v in per_runtime.values()),
        "per_runtime": per_runtime,
        "float_ops": checks["float_ops"],
        "checks": checks,
        "samples": int(len(x)),
    }


def top1_agreement(scores: np.ndarray, ref: np.ndarray) -> float:
    """Return the share of samples whose argmax equals the reference's argmax."""
    return float(np.mean(np.argmax(scores, axis=1) == np.argmax(ref, axis=1)))


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    """Return the signal-to-quantization-noise ratio 10*log10(sum ref^2 / sum (ref-approx)^2), capped."""
    signal = float(np.sum(np.square(ref.astype(np.float64))))
    noise = float(np.sum(np.square(ref.astype(np.float64) - approx.astype(np.float64))))
    if noise == 0.0:
        return SQNR_CAP_DB
    if signal == 0.0:
        return -SQNR_CAP_DB
    return float(min(SQNR_CAP_DB, 10.0 * math.log10(signal / noise)))


def predict_artifact(
    artifact_or_bundle_path: Artifact | Path | str, runtime: str | None, x: np.ndarray
) -> np.ndarray:
    """Return float scores (n, K) for raw float inputs through ``device_agent``'s runtimes.

    Accepts an ``Artifact``, a bundle directory (run by ``device_agent.inference.Predictor``, with its
    declared preprocessing) or a bare .tflite/.onnx file. ``runtime=None`` takes the first preferred.
    """
    from device_agent.agent import Predictor, dequantize, quantize
    from device_agent.runtimes import load_runtime_model

    if isinstance(artifact_or_bundle_path, Artifact):
        path, inputs, outputs = (
            artifact_or_bundle_path.path,
            artifact_or_bundle_path.inputs,
            artifact_or_bundle_path.outputs,
        )
        runtimes = artifact_or_bundle_path.runtimes
    else:
        p = Path(artifact_or_bundle_path)
        if p.is_dir():
            try:
                return Predictor(p, runtime=runtime).predict(x)
            except Exception as e:
                if isinstance(e, VerificationError):
                    raise
                raise VerificationError(f"cannot run bundle {str(p)!r}: {_line(e)}") from None
        fmt = {".tflite": ModelFormat.TFLITE, ".onnx": ModelFormat.ONNX}.get(p.suffix)
        if fmt is None or not p.is_file():
            raise VerificationError(f"{str(p)!r} is neither a bundle folder nor a .tflite/.onnx file")
        path = p
        inputs, outputs = read_io_specs(p, fmt)
        runtimes = ["litert", "openvino"] if fmt == ModelFormat.TFLITE else ["onnxruntime", "openvino"]
    rt = runtime or runtimes[0]
    arr = np.asarray(x, dtype=np.float32)
    sample_shape = tuple(inputs[0].shape[1:])
    if tuple(arr.shape) == sample_shape:
        arr = arr[None, ...]
    if tuple(arr.shape[1:]) != sample_shape:
        raise VerificationError(
            f"inputs of shape {arr.shape} do not fit {path.name}, which takes (n, {sample_shape})"
        )
    from toolchain.steps.data import batch_rows

    # Large samples go in chunks (toolchain.steps.data.BATCH_INPUT_BYTES); small ones in one batch.
    step = batch_rows(sample_shape, max(1, len(arr)))
    outs = []
    try:
        model = load_runtime_model(path, rt, threads=1)
        for i in range(0, max(1, len(arr)), step):  # an empty batch runs once, as before
            raw = model.run(quantize(arr[i : i + step], inputs[0]))
            out = dequantize(np.asarray(raw), outputs[0])
            outs.append(out.reshape(out.shape[0], -1))
    except Exception as e:
        raise VerificationError(f"{rt} cannot run {path.name}: {_line(e)}") from None
    return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
