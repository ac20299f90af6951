"""Read a .tflite flatbuffer without TensorFlow: tensors, operators, op versions, buffer sizes.

A small, bounds-checked reader of the parts of the TFLite schema (tensorflow/lite/schema/schema.fbs)
that the Edge TPU analysis, the memory budget (``toolchain.steps.budget``) and the sparsity count
(``toolchain.steps.evaluate``) need. A file that is not a TFLite flatbuffer, or a corrupt one, raises
``EdgeTPUError`` with the offending offset; nothing is executed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.errors import ToolchainError

# Refuse absurd files before reading: a .tflite for an 8 MB chip is far below this.
MAX_MODEL_BYTES = 2**31 - 1


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
        # deprecated_builtin_code is an int8 (127 is a placeholder): codes above 126 live only in
        # builtin_code, so the schema's documented rule takes the larger of the two.
        code = max(deprecated, builtin)
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
