"""Predict per op what ``edgetpu_compiler`` maps to the Edge TPU, without the compiler and without TensorFlow.

``analyze`` reads the flatbuffer (``tflite_file``) and applies the rules of Coral's "TensorFlow models
on the Edge TPU" page and of compiler 16's op-version limits, answering in the compiler's own log
vocabulary (``compiler``). See docs/edgetpu.md for the sources of every rule and what is not verified.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.steps.edgetpu.compiler import (
    AFTER_UNMAPPED,
    DATA_TYPE,
    LIMITATION,
    MAPPED,
    NOT_SUPPORTED,
    STATUS_MAPPED,
    STATUS_NOT_MAPPED,
    VERSION_NOT_SUPPORTED,
    CompileResult,
)
from toolchain.steps.edgetpu.tflite_file import (
    CUSTOM_CODE,
    FLOAT_TYPES,
    OperatorInfo,
    TFLiteModel,
    read_tflite,
)
from toolchain.targets import EdgeTPU

# The activation types the Edge TPU runs.
EDGETPU_ACTIVATION_TYPES = frozenset({"int8", "uint8"})
# Coral: "Softmax: supports only 1-D input tensor with a max of 16,000 elements".
SOFTMAX_MAX_ELEMENTS = 16_000


@dataclass(frozen=True)
class OpVerdict:
    """Whether the compiler will map one op, in its log vocabulary, with a specific one-line detail."""

    index: int
    op: str
    version: int
    status: str  # "mapped" | "not_mapped"
    reason: str  # one of REASONS
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "op": self.op,
            "version": self.version,
            "status": self.status,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class EdgeTPUReport:
    """Per-op prediction of what edgetpu_compiler maps, the on-chip memory estimate, the compile result."""

    ops: tuple[OpVerdict, ...]
    on_chip_bytes_estimate: int
    max_on_chip_bytes: int
    constant_bytes: int
    notes: tuple[str, ...] = ()
    compiler: CompileResult | None = None

    @property
    def ops_total(self) -> int:
        return len(self.ops)

    @property
    def ops_mapped(self) -> int:
        return sum(1 for v in self.ops if v.status == STATUS_MAPPED)

    @property
    def unmapped(self) -> list[OpVerdict]:
        return [v for v in self.ops if v.status != STATUS_MAPPED]

    @property
    def fully_mapped(self) -> bool:
        return self.ops_total > 0 and self.ops_mapped == self.ops_total

    def with_compiler(self, result: CompileResult) -> EdgeTPUReport:
        """Return a copy carrying the compiler's result."""
        return dataclasses.replace(self, compiler=result)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops_total": self.ops_total,
            "ops_mapped": self.ops_mapped,
            "ops": [v.to_dict() for v in self.ops],
            "unmapped": [
                {"index": v.index, "op": v.op, "version": v.version, "reason": v.reason, "detail": v.detail}
                for v in self.unmapped
            ],
            "on_chip_bytes_estimate": self.on_chip_bytes_estimate,
            "max_on_chip_bytes": self.max_on_chip_bytes,
            "constant_bytes": self.constant_bytes,
            "notes": list(self.notes),
            "compiler": self.compiler.to_dict() if self.compiler else None,
        }


def _effective_1d(shape: Sequence[int]) -> bool:
    """True when every dimension but the last is 1 (Coral's "one-dimensional" tensors)."""
    return all(d == 1 for d in shape[:-1])


def _intrinsic_verdict(
    op: OperatorInfo, model: TFLiteModel, supported: Mapping[str, int], static_batch: bool
) -> tuple[str, str]:
    """Return (reason, detail) for one op judged on its own, ignoring the ops before it."""
    used = [model.tensors[i] for i in op.inputs + op.outputs if i >= 0]
    activations = [t for t in used if not t.is_constant]
    floats = [t for t in used if t.dtype in FLOAT_TYPES]
    if floats and op.op == "QUANTIZE" and op.version <= supported.get("QUANTIZE", 0):
        # A float input's QUANTIZE: the compiler logs it as an unspecified limitation, not a data type.
        return LIMITATION, f"QUANTIZE from {floats[0].dtype} input {floats[0].name!r} runs on the CPU"
    if floats:
        t = floats[0]
        return DATA_TYPE, f"tensor {t.name!r} is {t.dtype}; the Edge TPU runs int8/uint8 only"
    odd = [t for t in activations if t.dtype not in EDGETPU_ACTIVATION_TYPES]
    if odd:
        t = odd[0]
        return DATA_TYPE, f"tensor {t.name!r} is {t.dtype}; Edge TPU activations must be int8 or uint8"
    if op.builtin_code == CUSTOM_CODE:
        return NOT_SUPPORTED, f"custom op {op.custom_code!r} is not an Edge TPU operation"
    if op.op not in supported:
        return NOT_SUPPORTED, f"{op.op} is not in Coral's supported-operations table"
    max_version = supported[op.op]
    if max_version and op.version > max_version:
        return VERSION_NOT_SUPPORTED, (
            f"{op.op} version {op.version} > {max_version}, the newest edgetpu_compiler 16 accepts; "
            f"compiler 16 refuses the model (\"Didn't find op for builtin opcode '{op.op}' "
            f"version '{op.version}'\"): "
            "convert with an older converter or avoid the op"
        )
    dynamic = [t for t in activations if t.dynamic]
    if dynamic:
        t = dynamic[0]
        return LIMITATION, (
            f"tensor {t.name!r} has a dynamic shape {list(t.shape_signature)}; the Edge TPU needs static "
            "shapes (give the model's Input a fixed batch_size=1)"
        )
    for t in activations:
        if len(t.shape) > 3 and any(d > 1 for d in t.shape[:-3]):
            why = "batch" if static_batch else "outer dimension"
            return LIMITATION, (
                f"tensor {t.name!r} has shape {list(t.shape)}: {why} {t.shape[0]} > 1; only the 3 innermost "
                "dimensions may exceed 1 (use batch 1)"
            )
    outs = [model.tensors[i] for i in op.outputs if i >= 0]
    if op.op == "FULLY_CONNECTED" and outs and not _effective_1d(outs[0].shape):
        return LIMITATION, (
            f"FULLY_CONNECTED output shape {list(outs[0].shape)} is not one-dimensional (batch must be 1)"
        )
    if op.op == "SOFTMAX" and op.inputs and op.inputs[0] >= 0:
        t = model.tensors[op.inputs[0]]
        n = math.prod(t.shape) if t.shape else 1
        if not _effective_1d(t.shape) or n > SOFTMAX_MAX_ELEMENTS:
            return LIMITATION, (
                f"SOFTMAX input shape {list(t.shape)}: the Edge TPU supports a 1-D input of at most "
                f"{SOFTMAX_MAX_ELEMENTS} elements"
            )
    return MAPPED, ""


def analyze_model(model: TFLiteModel, constraints: EdgeTPU) -> EdgeTPUReport:
    """Predict, op by op in execution order, what edgetpu_compiler maps (see docs/edgetpu.md)."""
    supported = {k.upper(): int(v) for k, v in constraints.supported_ops.items()}
    verdicts: list[OpVerdict] = []
    # The compiler makes one Edge TPU subgraph: it starts at the first op it can map (CPU ops before it,
    # such as a float input's QUANTIZE, are fine) and ends at the first op after that it cannot map.
    started = False
    cut: OperatorInfo | None = None
    for op in model.operators:
        reason, detail = _intrinsic_verdict(op, model, supported, constraints.static_batch)
        if reason == MAPPED and cut is not None:
            reason = AFTER_UNMAPPED
            detail = (
                f"comes after the first unmapped op #{cut.index} {cut.op}; the compiler maps only up to it, "
                "so this op runs on the CPU"
            )
        elif reason == MAPPED:
            started = True
        elif started and cut is None:
            cut = op
        status = STATUS_MAPPED if reason == MAPPED else STATUS_NOT_MAPPED
        verdicts.append(OpVerdict(op.index, op.op, op.version, status, reason, detail))

    # Parameters the TPU caches: constant tensors read by mapped ops, each buffer counted once.
    on_chip: dict[int, int] = {}
    for op, v in zip(model.operators, verdicts, strict=True):
        if v.status == STATUS_MAPPED:
            for i in op.inputs:
                if i >= 0 and model.tensors[i].is_constant:
                    t = model.tensors[i]
                    on_chip[t.buffer] = t.constant_bytes
    estimate = sum(on_chip.values())
    constant_total = sum({t.buffer: t.constant_bytes for t in model.tensors if t.is_constant}.values())
    notes = []
    if model.subgraph_count > 1:
        notes.append(
            f"the model has {model.subgraph_count} subgraphs; only the main one is analysed and the compiler "
            "maps only one"
        )
    too_new = [v for v in verdicts if v.reason == VERSION_NOT_SUPPORTED]
    if too_new:
        v = too_new[0]
        notes.append(
            f"edgetpu_compiler 16 refuses the whole model, not just op #{v.index}: {v.op} version "
            f"{v.version} is newer than it knows (edgetpu issue 879); no op runs on the Edge TPU until "
            "that op is gone"
        )
    float_compute = [
        v
        for v in verdicts
        if v.reason == DATA_TYPE and v.op not in ("QUANTIZE", "DEQUANTIZE") and "float" in v.detail
    ]
    if float_compute:
        v = float_compute[0]
        notes.append(
            f"op #{v.index} {v.op} computes in floating point: the compiler maps no float op (and refuses "
            'a model with no quantized tensor: "Model not quantized"); convert with full-integer '
            "quantization and int8/uint8 I/O"
        )
    if estimate > constraints.max_on_chip_bytes:
        notes.append(
            f"parameters of mapped ops take about {estimate} bytes > {constraints.max_on_chip_bytes} of "
            "on-chip memory: the rest streams from host memory on every inference (slower); "
            "use a smaller model"
        )
    limit = constraints.max_on_chip_bytes
    return EdgeTPUReport(tuple(verdicts), estimate, limit, constant_total, tuple(notes))


def analyze(tflite_path: Path, constraints: EdgeTPU) -> EdgeTPUReport:
    """Read a .tflite file and predict per op whether edgetpu_compiler maps it, and why not."""
    return analyze_model(read_tflite(Path(tflite_path)), constraints)
