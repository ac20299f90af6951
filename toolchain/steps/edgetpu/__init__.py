"""Edge TPU compatibility: read a .tflite flatbuffer, predict per op what ``edgetpu_compiler`` maps, run it.

``analyze`` needs no TensorFlow and no compiler: it reads the flatbuffer itself (a small, bounds-checked
reader of the TFLite schema) and applies the rules of Coral's "TensorFlow models on the Edge TPU"
page and of compiler 16's op-version limits, in the compiler's own log vocabulary. ``compile`` runs the
real compiler when it is on PATH and parses its operation log into rows of the same vocabulary.
See docs/edgetpu.md for the sources of every rule and what is not verified.

The package has three parts: ``tflite_file`` (the flatbuffer reader), ``rules`` (the per-op
prediction) and ``compiler`` (running the compiler and parsing its log); this module names their
public API. Tunables are patched where they live (``compiler.COMPILER_TIMEOUT_S``).
"""

from __future__ import annotations

from toolchain.steps.edgetpu.compiler import (
    AFTER_UNMAPPED,
    DATA_TYPE,
    LIMITATION,
    MAPPED,
    NOT_SUPPORTED,
    REASONS,
    VERSION_NOT_SUPPORTED,
    CompileResult,
    CompileRow,
    compile,
    parse_compiler_log,
    parse_compiler_summary,
    parse_size,
)
from toolchain.steps.edgetpu.rules import EdgeTPUReport, OpVerdict, analyze, analyze_model
from toolchain.steps.edgetpu.tflite_file import (
    BUILTIN_OPS,
    EdgeTPUError,
    OperatorInfo,
    TensorInfo,
    TFLiteModel,
    builtin_op_name,
    read_tflite,
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
    "BUILTIN_OPS",
    "builtin_op_name",
    "compile",
    "parse_compiler_log",
    "parse_compiler_summary",
    "parse_size",
    "read_tflite",
]
