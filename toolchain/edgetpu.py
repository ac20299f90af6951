"""Edge TPU compatibility: read a .tflite flatbuffer, predict per op what ``edgetpu_compiler`` maps, run it.

``analyze`` needs no TensorFlow and no compiler: it reads the flatbuffer itself (a small, bounds-checked
reader of the TFLite schema below) and applies the rules of Coral's "TensorFlow models on the Edge TPU"
page and of compiler 16's op-version limits, in the compiler's own log vocabulary. ``compile`` runs the
real compiler when it is on PATH and parses its operation log into rows of the same vocabulary.
See docs/edgetpu.md for the sources of every rule and what is not verified.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import signal
import struct
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.errors import ToolchainError
from toolchain.targets import EdgeTPU

# Seconds edgetpu_compiler may run before it is killed (tests patch it). The compiler's own default
# timeout is 180 s; ours is a little longer so its own message wins when it gives up first.
COMPILER_TIMEOUT_S = 240.0
# Lines of compiler output kept in a failed CompileResult.
LOG_TAIL_LINES = 20
# Coral: "Softmax: supports only 1-D input tensor with a max of 16,000 elements".
SOFTMAX_MAX_ELEMENTS = 16_000
# Refuse absurd files before reading: a .tflite for an 8 MB chip is far below this.
MAX_MODEL_BYTES = 2**31 - 1

# The compiler's operation-log vocabulary (its "Status" column).
MAPPED = "Mapped to Edge TPU"
NOT_SUPPORTED = "Operation not supported"
LIMITATION = "Operation is otherwise supported, but not mapped due to some unspecified limitation"
DATA_TYPE = "Operation is working on an unsupported data type"
AFTER_UNMAPPED = "More than one subgraph is not supported"
VERSION_NOT_SUPPORTED = "Operation version not supported"
REASONS = (MAPPED, NOT_SUPPORTED, LIMITATION, DATA_TYPE, AFTER_UNMAPPED, VERSION_NOT_SUPPORTED)

STATUS_MAPPED = "mapped"
STATUS_NOT_MAPPED = "not_mapped"


class EdgeTPUError(ToolchainError):
    """A model file cannot be analysed for the Edge TPU."""


# --------------------------------------------------------------------------------------------------
# TFLite schema facts (tensorflow/lite/schema/schema.fbs). Field numbers are vtable slots.

# fmt: off
TENSOR_TYPES: dict[int, str] = {
    0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string", 6: "bool", 7: "int16",
    8: "complex64", 9: "int8", 10: "float64", 11: "complex128", 12: "uint64", 13: "resource",
    14: "variant", 15: "uint32", 16: "uint16", 17: "int4", 18: "bfloat16",
}
FLOAT_TYPES = frozenset({"float32", "float16", "float64", "bfloat16"})
EDGETPU_ACTIVATION_TYPES = frozenset({"int8", "uint8"})

# BuiltinOperator numbers of the ops this module reasons about (schema.fbs enum values). Codes not
# listed here are named from ai_edge_litert's generated schema when that package is installed.
BUILTIN_OPS: dict[int, str] = {
    0: "ADD", 1: "AVERAGE_POOL_2D", 2: "CONCATENATION", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D",
    5: "DEPTH_TO_SPACE", 6: "DEQUANTIZE", 7: "EMBEDDING_LOOKUP", 8: "FLOOR", 9: "FULLY_CONNECTED",
    10: "HASHTABLE_LOOKUP", 11: "L2_NORMALIZATION", 12: "L2_POOL_2D", 13: "LOCAL_RESPONSE_NORMALIZATION",
    14: "LOGISTIC", 15: "LSH_PROJECTION", 16: "LSTM", 17: "MAX_POOL_2D", 18: "MUL", 19: "RELU",
    20: "RELU_N1_TO_1", 21: "RELU6", 22: "RESHAPE", 23: "RESIZE_BILINEAR", 24: "RNN", 25: "SOFTMAX",
    26: "SPACE_TO_DEPTH", 27: "SVDF", 28: "TANH", 32: "CUSTOM", 34: "PAD", 36: "GATHER",
    37: "BATCH_TO_SPACE_ND", 38: "SPACE_TO_BATCH_ND", 39: "TRANSPOSE", 40: "MEAN", 41: "SUB", 42: "DIV",
    43: "SQUEEZE", 44: "UNIDIRECTIONAL_SEQUENCE_LSTM", 45: "STRIDED_SLICE", 47: "EXP", 48: "TOPK_V2",
    49: "SPLIT", 50: "LOG_SOFTMAX", 53: "CAST", 54: "PRELU", 55: "MAXIMUM", 56: "ARG_MAX",
    57: "MINIMUM", 60: "PADV2", 65: "SLICE", 67: "TRANSPOSE_CONV", 70: "EXPAND_DIMS", 74: "SUM",
    75: "SQRT", 76: "RSQRT", 77: "SHAPE", 79: "ARG_MIN", 82: "REDUCE_MAX", 83: "PACK",
    89: "REDUCE_MIN", 97: "RESIZE_NEAREST_NEIGHBOR", 98: "LEAKY_RELU", 99: "SQUARED_DIFFERENCE",
    102: "SPLIT_V", 111: "ELU", 114: "QUANTIZE", 117: "HARD_SWISH", 126: "BATCH_MATMUL",
    150: "GELU",
}
# fmt: on
CUSTOM_CODE = 32
# OperatorCode.deprecated_builtin_code is an int8; codes above 126 live only in builtin_code.
PLACEHOLDER_FOR_GREATER_OP_CODES = 127

_ALL_BUILTIN_OPS: dict[int, str] | None = None


def builtin_op_name(code: int) -> str:
    """Return the schema name of a BuiltinOperator number (``BUILTIN_<n>`` when unknown)."""
    global _ALL_BUILTIN_OPS
    if code in BUILTIN_OPS:
        return BUILTIN_OPS[code]
    if _ALL_BUILTIN_OPS is None:
        _ALL_BUILTIN_OPS = {}
        try:  # the LiteRT wheel ships the generated schema; it imports only flatbuffers
            from ai_edge_litert import schema_py_generated as schema

            _ALL_BUILTIN_OPS = {
                v: k for k, v in vars(schema.BuiltinOperator).items() if k.isupper() and isinstance(v, int)
            }
        except ImportError:
            pass
    return _ALL_BUILTIN_OPS.get(code, f"BUILTIN_{code}")


# --------------------------------------------------------------------------------------------------
# A bounds-checked flatbuffer reader for the parts of the TFLite schema we need.


class _Corrupt(Exception):
    """An offset or length points outside the buffer."""


class _Table:
    """One flatbuffer table: scalar, vector and sub-table fields by slot number."""

    __slots__ = ("buf", "pos", "vt", "vt_len")

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf = buf
        self.pos = pos
        vt = pos - _get(buf, "<i", pos)
        self.vt = vt
        self.vt_len = _get(buf, "<H", vt)
        if self.vt_len < 4 or vt + self.vt_len > len(buf):
            raise _Corrupt(f"vtable at {vt}")

    def _field(self, slot: int) -> int:
        off = 4 + 2 * slot
        if off + 2 > self.vt_len:
            return 0
        rel = int(_get(self.buf, "<H", self.vt + off))
        return self.pos + rel if rel else 0

    def scalar(self, slot: int, fmt: str, default: int | float) -> Any:
        at = self._field(slot)
        return _get(self.buf, fmt, at) if at else default

    def table(self, slot: int) -> _Table | None:
        at = self._field(slot)
        return _Table(self.buf, at + _get(self.buf, "<I", at)) if at else None

    def _vector(self, slot: int, elem_size: int) -> tuple[int, int] | None:
        at = self._field(slot)
        if not at:
            return None
        start = at + _get(self.buf, "<I", at)
        n = _get(self.buf, "<I", start)
        if start + 4 + n * elem_size > len(self.buf):
            raise _Corrupt(f"vector of {n} at {start}")
        return start + 4, n

    def numbers(self, slot: int, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize(fmt)
        v = self._vector(slot, size)
        if v is None:
            return ()
        start, n = v
        return struct.unpack_from(f"<{n}{fmt}", self.buf, start)

    def byte_length(self, slot: int) -> int:
        v = self._vector(slot, 1)
        return 0 if v is None else v[1]

    def tables(self, slot: int) -> list[_Table]:
        v = self._vector(slot, 4)
        if v is None:
            return []
        start, n = v
        return [_Table(self.buf, start + 4 * i + _get(self.buf, "<I", start + 4 * i)) for i in range(n)]

    def string(self, slot: int) -> str:
        v = self._vector(slot, 1)
        if v is None:
            return ""
        start, n = v
        return self.buf[start : start + n].decode("utf-8", "replace")


def _get(buf: bytes, fmt: str, at: int) -> Any:
    size = struct.calcsize(fmt)
    if at < 0 or at + size > len(buf):
        raise _Corrupt(f"offset {at}")
    return struct.unpack_from(fmt, buf, at)[0]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the main subgraph: dtype, shape, shape signature (-1 = dynamic), constant bytes."""

    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]
    buffer: int
    constant_bytes: int  # bytes of constant data stored in the file for this tensor (0 = activation)
    scale: tuple[float, ...] = ()
    zero_point: tuple[int, ...] = ()
    quantized_dimension: int = 0

    @property
    def is_constant(self) -> bool:
        return self.constant_bytes > 0

    @property
    def dynamic(self) -> bool:
        return any(d < 0 for d in self.shape_signature)


@dataclass(frozen=True)
class OperatorInfo:
    """One operator of the main subgraph, in execution order."""

    index: int
    op: str
    builtin_code: int
    version: int
    inputs: tuple[int, ...]  # tensor indices; -1 marks an omitted optional input
    outputs: tuple[int, ...]
    custom_code: str = ""


@dataclass(frozen=True)
class TFLiteModel:
    """What the Edge TPU analysis needs from a .tflite file (main subgraph only)."""

    schema_version: int
    tensors: tuple[TensorInfo, ...]
    operators: tuple[OperatorInfo, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    subgraph_count: int
    buffer_bytes: tuple[int, ...]


def read_tflite(source: Path | bytes) -> TFLiteModel:
    """Parse a .tflite flatbuffer (path or bytes) without TensorFlow; EdgeTPUError when it is not one."""
    where = str(source) if isinstance(source, Path) else "model bytes"
    if isinstance(source, Path):
        try:
            size = source.stat().st_size
            if size > MAX_MODEL_BYTES:
                raise EdgeTPUError(f"{where}: {size} bytes is too large for a .tflite flatbuffer")
            buf = source.read_bytes()
        except OSError as e:
            raise EdgeTPUError(f"{where}: cannot read the model ({e.strerror}); check the path") from None
    else:
        buf = bytes(source)
    fix = "re-export it with TFLiteConverter"
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise EdgeTPUError(f"{where}: not a TFLite flatbuffer (no 'TFL3' identifier); {fix}")
    try:
        return _parse_model(buf)
    except (_Corrupt, struct.error, UnicodeDecodeError, IndexError, OverflowError) as e:
        raise EdgeTPUError(f"{where}: corrupt or truncated TFLite flatbuffer ({e}); {fix}") from None


def _parse_model(buf: bytes) -> TFLiteModel:
    model = _Table(buf, _get(buf, "<I", 0))
    version = int(model.scalar(0, "<I", 0))
    codes = []
    for oc in model.tables(1):
        deprecated = int(oc.scalar(0, "<b", 0))
        builtin = int(oc.scalar(3, "<i", 0))
        code = max(deprecated, builtin)  # the schema's documented rule for the two code fields
        codes.append((code, int(oc.scalar(2, "<i", 1)), oc.string(1)))
    buffer_bytes = []
    for b in model.tables(4):
        n = b.byte_length(0)
        if n == 0:  # models > 2 GB keep data outside the flatbuffer: (offset, size)
            offset, size = int(b.scalar(1, "<Q", 0)), int(b.scalar(2, "<Q", 0))
            n = size if offset > 1 else 0
        buffer_bytes.append(n)
    subgraphs = model.tables(2)
    if not subgraphs:
        raise _Corrupt("no subgraph")
    sg = subgraphs[0]
    tensors = []
    for i, t in enumerate(sg.tables(0)):
        shape = tuple(int(d) for d in t.numbers(0, "i"))
        sig = tuple(int(d) for d in t.numbers(7, "i")) or shape
        buffer = int(t.scalar(2, "<I", 0))
        scale: tuple[float, ...] = ()
        zp: tuple[int, ...] = ()
        qdim = 0
        q = t.table(4)
        if q is not None:
            scale = tuple(float(s) for s in q.numbers(2, "f"))
            zp = tuple(int(z) for z in q.numbers(3, "q"))
            qdim = int(q.scalar(6, "<i", 0))
        tensors.append(
            TensorInfo(
                index=i,
                name=t.string(3),
                dtype=TENSOR_TYPES.get(int(t.scalar(1, "<b", 0)), "unknown"),
                shape=shape,
                shape_signature=sig,
                buffer=buffer,
                constant_bytes=buffer_bytes[buffer] if 0 < buffer < len(buffer_bytes) else 0,
                scale=scale,
                zero_point=zp,
                quantized_dimension=qdim,
            )
        )
    ops = []
    for i, o in enumerate(sg.tables(3)):
        idx = int(o.scalar(0, "<I", 0))
        if idx >= len(codes):
            raise _Corrupt(f"operator {i} uses opcode {idx} of {len(codes)}")
        code, ver, custom = codes[idx]
        ins = tuple(int(x) for x in o.numbers(1, "i"))
        outs = tuple(int(x) for x in o.numbers(2, "i"))
        if any(x >= len(tensors) for x in ins + outs):
            raise _Corrupt(f"operator {i} refers to a tensor out of range")
        ops.append(OperatorInfo(i, builtin_op_name(code), code, ver, ins, outs, custom))
    return TFLiteModel(
        schema_version=version,
        tensors=tuple(tensors),
        operators=tuple(ops),
        inputs=tuple(int(x) for x in sg.numbers(1, "i")),
        outputs=tuple(int(x) for x in sg.numbers(2, "i")),
        subgraph_count=len(subgraphs),
        buffer_bytes=tuple(buffer_bytes),
    )


# --------------------------------------------------------------------------------------------------
# Analysis


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
class CompileRow:
    """One row of the compiler's operation log: an op, how many of it, and their status."""

    op: str
    count: int
    reason: str

    @property
    def status(self) -> str:
        return STATUS_MAPPED if self.reason == MAPPED else STATUS_NOT_MAPPED

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "count": self.count, "status": self.status, "reason": self.reason}


@dataclass(frozen=True)
class CompileResult:
    """Outcome of running edgetpu_compiler: ``compiled``, ``failed`` or ``compiler_not_found``."""

    status: str
    message: str
    compiled_path: Path | None = None
    log_path: Path | None = None
    compiler_version: str | None = None
    ops: tuple[CompileRow, ...] = ()
    ops_total: int | None = None
    ops_mapped: int | None = None
    on_chip_bytes: int | None = None
    off_chip_bytes: int | None = None
    log_tail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "message": self.message,
            "compiled_path": str(self.compiled_path) if self.compiled_path else None,
            "log_path": str(self.log_path) if self.log_path else None,
            "compiler_version": self.compiler_version,
            "ops": [r.to_dict() for r in self.ops],
            "ops_total": self.ops_total,
            "ops_mapped": self.ops_mapped,
            "on_chip_bytes": self.on_chip_bytes,
            "off_chip_bytes": self.off_chip_bytes,
            "log_tail": self.log_tail,
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


# --------------------------------------------------------------------------------------------------
# The compiler and its log

_LOG_ROW = re.compile(r"^([A-Z][A-Z0-9_]*)\s+(\d+)\s+(\S.*?)\s*$")
_SIZE = re.compile(r"^([\d.]+)\s*(B|KiB|MiB|GiB)$")
_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_size(text: str) -> int | None:
    """Parse the compiler's sizes (``3.21MiB``, ``7.75KiB``, ``0.00B``) into bytes."""
    m = _SIZE.match(text.strip())
    return round(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def parse_compiler_log(text: str) -> list[CompileRow]:
    """Parse the ``Operator  Count  Status`` table of an edgetpu_compiler log or stdout."""
    rows: list[CompileRow] = []
    in_table = False
    for line in text.splitlines():
        if re.match(r"^\s*Operator\s+Count\s+Status\s*$", line):
            in_table = True
            continue
        if not in_table or not line.strip():
            continue
        m = _LOG_ROW.match(line.strip())
        if m is None:
            if rows:
                break  # the table ended
            continue
        rows.append(CompileRow(m.group(1), int(m.group(2)), m.group(3)))
    return rows


def parse_compiler_summary(text: str) -> dict[str, Any]:
    """Pull the version, op counts and memory figures out of edgetpu_compiler's stdout."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if line.startswith("Edge TPU Compiler version"):
            out["version"] = line.rsplit(" ", 1)[-1].strip()
        elif key == "Total number of operations" and value.isdigit():
            out["ops_total"] = int(value)
        elif key == "Number of operations that will run on Edge TPU" and value.isdigit():
            out["ops_mapped"] = int(value)
        elif key == "On-chip memory used for caching model parameters":
            out["on_chip_bytes"] = parse_size(value)
        elif key == "Off-chip memory used for streaming uncached model parameters":
            out["off_chip_bytes"] = parse_size(value)
    return out


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def compile(tflite_path: Path, out_dir: Path, constraints: EdgeTPU) -> CompileResult:  # noqa: A001
    """Run edgetpu_compiler on a .tflite into out_dir/model_edgetpu.tflite and parse its operation log."""
    tflite_path = Path(tflite_path)
    out_dir = Path(out_dir)
    exe = shutil.which(constraints.compiler)
    if exe is None:
        return CompileResult(
            status="compiler_not_found",
            message=(
                f"the Edge TPU compiler {constraints.compiler!r} is not on PATH, so no _edgetpu.tflite was "
                "made; the bundle runs the int8 model on the CPU. Install 'edgetpu-compiler' from Coral's "
                "apt repository (x86_64 Debian/Ubuntu) and build again to run on the Edge TPU."
            ),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    produced = out_dir / f"{tflite_path.stem}_edgetpu.tflite"
    produced_log = out_dir / f"{tflite_path.stem}_edgetpu.log"
    for stale in (produced, produced_log, out_dir / "model_edgetpu.tflite", out_dir / "model_edgetpu.log"):
        stale.unlink(missing_ok=True)  # never mistake an earlier run's output for this one's
    cmd = [exe, "--out_dir", str(out_dir), "--show_operations", str(tflite_path)]
    try:
        # Own session: the compiler forks a worker, and a timeout must stop both.
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as e:
        return CompileResult(
            status="failed",
            message=f"cannot run {exe} ({e.strerror}); check that it is an executable edgetpu_compiler",
        )
    try:
        stdout, stderr = proc.communicate(timeout=COMPILER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, stderr = proc.communicate()
        for partial_file in (produced, produced_log):
            partial_file.unlink(missing_ok=True)
        return CompileResult(
            status="failed",
            message=(
                f"{constraints.compiler} did not finish within {COMPILER_TIMEOUT_S:g} s on "
                f"{tflite_path.name}; the bundle keeps the int8 CPU model (try a smaller model)"
            ),
            log_tail=_tail((stdout or "") + (stderr or "")),
        )
    proc_stdout, proc_stderr, returncode = stdout or "", stderr or "", proc.returncode
    output = proc_stdout + ("\n" + proc_stderr if proc_stderr else "")
    summary = parse_compiler_summary(proc_stdout)
    if returncode != 0 or not produced.is_file():
        lines = [ln for ln in output.strip().splitlines() if ln.strip()]
        last = next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        why = f"exit code {returncode}" if returncode != 0 else f"no {produced.name} was written"
        return CompileResult(
            status="failed",
            message=f"{constraints.compiler} failed on {tflite_path.name} ({why}): {last.strip()}",
            compiler_version=summary.get("version"),
            log_tail=_tail(output),
        )
    compiled = out_dir / "model_edgetpu.tflite"
    if produced != compiled:
        os.replace(produced, compiled)
    log_path: Path | None = None
    log_text = proc_stdout
    if produced_log.is_file():
        log_path = out_dir / "model_edgetpu.log"
        if produced_log != log_path:
            os.replace(produced_log, log_path)
        log_text = log_path.read_text(encoding="utf-8", errors="replace")
    rows = parse_compiler_log(log_text) or parse_compiler_log(proc_stdout)
    mapped = sum(r.count for r in rows if r.reason == MAPPED) if rows else summary.get("ops_mapped")
    total = sum(r.count for r in rows) if rows else summary.get("ops_total")
    if mapped is not None and total:
        msg = f"compiled: {mapped} of {total} ops run on the Edge TPU"
    else:
        msg = "compiled"
    return CompileResult(
        status="compiled",
        message=msg,
        compiled_path=compiled,
        log_path=log_path,
        compiler_version=summary.get("version"),
        ops=tuple(rows),
        ops_total=total,
        ops_mapped=mapped,
        on_chip_bytes=summary.get("on_chip_bytes"),
        off_chip_bytes=summary.get("off_chip_bytes"),
    )


__all__ = [
    "AFTER_UNMAPPED",
    "DATA_TYPE",
    "LIMITATION",
    "MAPPED",
    "NOT_SUPPORTED",
    "REASONS",
    "VERSION_NOT_SUPPORTED",
    "CompileResult",
    "CompileRow",
    "EdgeTPUError",
    "EdgeTPUReport",
    "OpVerdict",
    "OperatorInfo",
    "TFLiteModel",
    "TensorInfo",
    "analyze",
    "analyze_model",
    "builtin_op_name",
    "compile",
    "parse_compiler_log",
    "parse_compiler_summary",
    "read_tflite",
]
