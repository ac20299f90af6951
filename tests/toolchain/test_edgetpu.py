"""Edge TPU analysis: the flatbuffer reader against LiteRT, per-op verdicts, the compiler integration.

Real models: tiny tf_keras models converted to full-int8 uint8-I/O .tflite (marker ``slow``). Synthetic
models, written with the LiteRT wheel's generated flatbuffer schema, cover the rules no converter emits on
demand (too-new op versions, custom ops, batch > 1). The real edgetpu_compiler cannot be installed here
(Google's apt repository is unreachable), so the compiler path runs a fake ``edgetpu_compiler`` script that
writes files and a log in the real compiler's format; docs/edgetpu.md says what that leaves unverified.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolchain.errors import ToolchainError
from toolchain.steps import edgetpu
from toolchain.steps.edgetpu import (
    AFTER_UNMAPPED,
    DATA_TYPE,
    LIMITATION,
    MAPPED,
    NOT_SUPPORTED,
    VERSION_NOT_SUPPORTED,
    EdgeTPUError,
    analyze,
    read_tflite,
)
from toolchain.targets import EdgeTPU, load_target

schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
flatbuffers = pytest.importorskip("flatbuffers")

OP = schema.BuiltinOperator
TT = schema.TensorType


@pytest.fixture(scope="module")
def coral() -> EdgeTPU:
    target = load_target("coral")
    assert target.edgetpu is not None
    return target.edgetpu


# --------------------------------------------------------------------------------------------------
# Synthetic models (no TensorFlow): tensors and ops written with the generated schema's object API.


def tensor(
    name: str,
    ttype: int = TT.INT8,
    shape: tuple[int, ...] = (1, 4),
    signature: tuple[int, ...] | None = None,
    data: bytes | None = None,
) -> dict[str, Any]:
    return {"name": name, "type": ttype, "shape": shape, "sig": signature, "data": data}


def build_model(
    tensors: list[dict[str, Any]],
    ops: Sequence[tuple[Any, ...]],
    inputs: list[int],
    outputs: list[int],
) -> bytes:
    """Return .tflite bytes; each op is (builtin code, version, inputs, outputs[, custom code])."""
    model = schema.ModelT()
    model.version = 3
    model.buffers = [schema.BufferT()]
    sg = schema.SubGraphT()
    sg.tensors = []
    for t in tensors:
        tt = schema.TensorT()
        tt.name, tt.type, tt.shape = t["name"], t["type"], list(t["shape"])
        tt.shapeSignature = list(t["sig"]) if t["sig"] is not None else None
        q = schema.QuantizationParametersT()
        q.scale, q.zeroPoint = [0.05], [0]
        tt.quantization = q
        tt.buffer = 0
        if t["data"] is not None:
            buf = schema.BufferT()
            buf.data = np.frombuffer(t["data"], dtype=np.uint8)
            model.buffers.append(buf)
            tt.buffer = len(model.buffers) - 1
        sg.tensors.append(tt)
    codes: dict[tuple[int, int, str], int] = {}
    model.operatorCodes = []
    sg.operators = []
    for spec in ops:
        code, version, ins, outs = spec[:4]
        custom = spec[4] if len(spec) > 4 else ""
        key = (code, version, custom)
        if key not in codes:
            oc = schema.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.version = version
            oc.customCode = custom or None
            codes[key] = len(model.operatorCodes)
            model.operatorCodes.append(oc)
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = codes[key], ins, outs
        sg.operators.append(op)
    sg.inputs, sg.outputs = inputs, outputs
    model.subgraphs = [sg]
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def chain(*ops: tuple[int, int], shape: tuple[int, ...] = (1, 4), ttype: int = TT.INT8) -> bytes:
    """A straight line of single-input ops on int8 activations of one shape."""
    ts = [tensor(f"t{i}", ttype, shape) for i in range(len(ops) + 1)]
    return build_model(ts, [(c, v, [i], [i + 1]) for i, (c, v) in enumerate(ops)], [0], [len(ops)])


def write(tmp_path: Path, data: bytes, name: str = "model.tflite") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def reasons(report: edgetpu.EdgeTPUReport) -> list[str]:
    return [v.reason for v in report.ops]


# --------------------------------------------------------------------------------------------------
# Op names and the profile's table


def test_builtin_op_table_matches_the_schema_enum() -> None:
    enum = {v: k for k, v in vars(OP).items() if k.isupper() and isinstance(v, int)}
    for code, name in edgetpu.BUILTIN_OPS.items():
        assert enum[code] == name, code
    # Codes outside the hand-written table are named from the installed schema, never guessed.
    assert edgetpu.builtin_op_name(OP.STABLEHLO_ADD) == "STABLEHLO_ADD"
    assert edgetpu.builtin_op_name(10_000) == "BUILTIN_10000"


def test_coral_profile_has_a_max_version_for_every_op(coral: EdgeTPU) -> None:
    ops = dict(coral.supported_ops)
    assert ops and all(v >= 1 for v in ops.values())
    enum_names = {k for k in vars(OP) if k.isupper()}
    assert set(ops) <= enum_names, set(ops) - enum_names
    # Compiler 16 rejects these versions (edgetpu issues 879, 631, 845): the table must too.
    assert ops["QUANTIZE"] < 3 and ops["CONV_2D"] < 6 and ops["TRANSPOSE_CONV"] < 4
    # Not in Coral's supported-operations table.
    assert not {"DEQUANTIZE", "LEAKY_RELU", "HARD_SWISH", "GATHER"} & set(ops)


# --------------------------------------------------------------------------------------------------
# Rules on synthetic models


def test_all_supported_chain_is_mapped(tmp_path: Path, coral: EdgeTPU) -> None:
    report = analyze(write(tmp_path, chain((OP.QUANTIZE, 1), (OP.RELU, 1), (OP.LOGISTIC, 1))), coral)
    assert reasons(report) == [MAPPED] * 3
    assert report.ops_mapped == report.ops_total == 3 and report.fully_mapped


def test_op_version_above_compiler_max_is_not_supported(tmp_path: Path, coral: EdgeTPU) -> None:
    report = analyze(write(tmp_path, chain((OP.RELU, 1), (OP.QUANTIZE, 3), (OP.RELU, 1))), coral)
    assert reasons(report) == [MAPPED, VERSION_NOT_SUPPORTED, AFTER_UNMAPPED]
    q = report.ops[1]
    assert q.op == "QUANTIZE" and q.version == 3
    assert "Didn't find op for builtin opcode 'QUANTIZE' version '3'" in q.detail
    assert "#1 QUANTIZE" in report.ops[2].detail
    assert len(report.notes) == 1 and "refuses the whole model" in report.notes[0]


def test_list_form_table_accepts_any_version(tmp_path: Path, coral: EdgeTPU) -> None:
    any_version = replace(coral, supported_ops={"QUANTIZE": 0, "RELU": 0})
    report = analyze(write(tmp_path, chain((OP.QUANTIZE, 3), (OP.RELU, 3))), any_version)
    assert reasons(report) == [MAPPED, MAPPED]


def test_custom_op_is_not_supported(tmp_path: Path, coral: EdgeTPU) -> None:
    ts = [tensor("in"), tensor("mid"), tensor("out")]
    data = build_model(ts, [(OP.CUSTOM, 1, [0], [1], "MyOp"), (OP.RELU, 1, [1], [2])], [0], [2])
    report = analyze(write(tmp_path, data), coral)
    # A leading CPU op does not cut the model: the Edge TPU subgraph starts at the first mappable op.
    assert [(v.op, v.reason) for v in report.ops] == [("CUSTOM", NOT_SUPPORTED), ("RELU", MAPPED)]
    assert "MyOp" in report.ops[0].detail
    assert report.ops_mapped == 1


def test_unsupported_op_after_the_cut_keeps_its_own_reason(tmp_path: Path, coral: EdgeTPU) -> None:
    # After the first unmapped op, an op that is itself unsupported keeps its own reason (as in real logs).
    report = analyze(
        write(tmp_path, chain((OP.RELU, 1), (OP.EXP, 1), (OP.LEAKY_RELU, 1), (OP.TANH, 1))), coral
    )
    assert reasons(report) == [MAPPED, NOT_SUPPORTED, NOT_SUPPORTED, AFTER_UNMAPPED]
    assert [u["op"] for u in report.to_dict()["unmapped"]] == ["EXP", "LEAKY_RELU", "TANH"]


def test_float_io_ops_are_unsupported_data_type_without_rejecting_the_model(
    tmp_path: Path, coral: EdgeTPU
) -> None:
    ts = [tensor("in", TT.FLOAT32), tensor("q"), tensor("r"), tensor("out", TT.FLOAT32)]
    ops = [(OP.QUANTIZE, 1, [0], [1]), (OP.RELU, 1, [1], [2]), (OP.DEQUANTIZE, 2, [2], [3])]
    report = analyze(write(tmp_path, build_model(ts, ops, [0], [3])), coral)
    # As the compiler logs a float-I/O model: the input QUANTIZE is a limitation, the core is mapped, and
    # the float output's DEQUANTIZE is an unsupported data type.
    assert reasons(report) == [LIMITATION, MAPPED, DATA_TYPE]
    assert report.ops_mapped == 1 and not report.notes


def test_int16_activations_are_an_unsupported_data_type(tmp_path: Path, coral: EdgeTPU) -> None:
    report = analyze(write(tmp_path, chain((OP.RELU, 1), ttype=TT.INT16)), coral)
    assert reasons(report) == [DATA_TYPE]
    assert "int16" in report.ops[0].detail


def test_batch_above_one_is_a_limitation(tmp_path: Path, coral: EdgeTPU) -> None:
    report = analyze(write(tmp_path, chain((OP.RELU, 1), shape=(2, 8, 8, 3))), coral)
    assert reasons(report) == [LIMITATION]
    assert "batch 2 > 1" in report.ops[0].detail


def test_fully_connected_with_two_rows_is_a_limitation(tmp_path: Path, coral: EdgeTPU) -> None:
    ts = [tensor("x", shape=(4, 16)), tensor("w", shape=(3, 16), data=bytes(48)), tensor("y", shape=(4, 3))]
    data = build_model(ts, [(OP.FULLY_CONNECTED, 4, [0, 1, -1], [2])], [0], [2])
    report = analyze(write(tmp_path, data), coral)
    assert reasons(report) == [LIMITATION]
    assert "not one-dimensional" in report.ops[0].detail


def test_softmax_above_16000_elements_is_a_limitation(tmp_path: Path, coral: EdgeTPU) -> None:
    report = analyze(write(tmp_path, chain((OP.SOFTMAX, 2), shape=(1, 16_001))), coral)
    assert reasons(report) == [LIMITATION]
    report = analyze(write(tmp_path, chain((OP.SOFTMAX, 2), shape=(1, 16_000))), coral)
    assert reasons(report) == [MAPPED]


def test_dynamic_signature_is_a_limitation(tmp_path: Path, coral: EdgeTPU) -> None:
    ts = [tensor("in", signature=(-1, 4)), tensor("out", signature=(-1, 4))]
    report = analyze(write(tmp_path, build_model(ts, [(OP.RELU, 1, [0], [1])], [0], [1])), coral)
    assert reasons(report) == [LIMITATION]
    assert "dynamic shape [-1, 4]" in report.ops[0].detail


def test_on_chip_estimate_counts_mapped_constants_once(tmp_path: Path, coral: EdgeTPU) -> None:
    # Two FULLY_CONNECTED ops share one 48-byte weight buffer; a third op after EXP holds 100 more bytes.
    ts = [
        tensor("x", shape=(1, 16)),
        tensor("w", shape=(3, 16), data=bytes(range(48))),
        tensor("y", shape=(1, 3)),
        tensor("z", shape=(1, 3)),
        tensor("e", shape=(1, 3)),
        tensor("w2", shape=(100, 1), data=bytes(range(100))),
        tensor("out", shape=(1, 3)),
    ]
    ops = [
        (OP.FULLY_CONNECTED, 4, [0, 1, -1], [2]),
        (OP.ADD, 1, [2, 2], [3]),
        (OP.EXP, 1, [3], [4]),
        (OP.MUL, 1, [4, 5], [6]),
    ]
    report = analyze(write(tmp_path, build_model(ts, ops, [0], [6])), coral)
    assert reasons(report) == [MAPPED, MAPPED, NOT_SUPPORTED, AFTER_UNMAPPED]
    assert report.on_chip_bytes_estimate == 48
    assert report.constant_bytes == 148
    assert not report.notes
    tight = replace(coral, max_on_chip_bytes=40)
    notes = analyze(write(tmp_path, build_model(ts, ops, [0], [6])), tight).notes
    assert len(notes) == 1 and "48 bytes > 40" in notes[0]


def test_op_codes_above_127_use_builtin_code(tmp_path: Path, coral: EdgeTPU) -> None:
    model = read_tflite(chain((OP.GELU, 1), (OP.RELU, 1)))
    assert [(o.op, o.builtin_code) for o in model.operators] == [("GELU", OP.GELU), ("RELU", OP.RELU)]


def test_report_dict_has_the_contract_keys(tmp_path: Path, coral: EdgeTPU) -> None:
    report = analyze(write(tmp_path, chain((OP.RELU, 1), (OP.EXP, 1))), coral)
    d = json.loads(json.dumps(report.to_dict()))
    assert {"ops_total", "ops_mapped", "ops", "unmapped", "on_chip_bytes_estimate", "compiler"} <= set(d)
    assert d["ops_total"] == 2 and d["ops_mapped"] == 1 and d["compiler"] is None
    assert set(d["ops"][0]) >= {"index", "op", "version", "status", "reason"}
    assert d["ops"][0]["status"] == "mapped" and d["ops"][1]["status"] == "not_mapped"
    assert d["unmapped"] == [
        {"index": 1, "op": "EXP", "version": 1, "reason": NOT_SUPPORTED, "detail": d["ops"][1]["detail"]}
    ]


# --------------------------------------------------------------------------------------------------
# Bad files


def test_bad_files_raise_one_line_errors(tmp_path: Path, coral: EdgeTPU) -> None:
    good = chain((OP.RELU, 1), (OP.TANH, 1))
    cases = {
        "missing.tflite": None,
        "empty.tflite": b"",
        "notflite.tflite": b"PK\x03\x04" + bytes(100),
        "truncated.tflite": good[: len(good) // 2],
    }
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(EdgeTPUError) as info:
            analyze(path, coral)
        msg = str(info.value)
        assert isinstance(info.value, ToolchainError)
        assert "\n" not in msg and name in msg, msg
        assert "re-export" in msg or "check the path" in msg, msg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_models_parse_or_raise_edgetpu_error(data: st.DataObject) -> None:
    good = chain((OP.QUANTIZE, 1), (OP.RELU, 1), (OP.SOFTMAX, 2))
    buf = bytearray(good)
    cut = data.draw(st.integers(0, len(buf)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(buf) - 1), st.integers(0, 255)), max_size=4))
    for at, value in flips:
        buf[at] = value
    try:
        read_tflite(bytes(buf[:cut] if data.draw(st.booleans()) else buf))
    except EdgeTPUError:
        pass


# --------------------------------------------------------------------------------------------------
# The compiler: missing, and a fake on PATH speaking the real compiler's format

FAKE_COMPILER = textwrap.dedent(
    """\
    #!{python}
    # Fake edgetpu_compiler for tests: mimics v16's files and output format (not its analysis).
    import json, os, shutil, sys, time
    args = sys.argv[1:]
    with open(os.environ["FAKE_ETPU_ARGS"], "w") as fh:
        json.dump(args, fh)
    mode = os.environ.get("FAKE_ETPU_MODE", "ok")
    print("Edge TPU Compiler version 16.0.384591198")
    print("Started a compilation timeout timer of 180 seconds.")
    if mode == "hang":
        sys.stdout.flush()
        time.sleep(60)
    if mode == "reject":
        print("ERROR: Didn't find op for builtin opcode 'QUANTIZE' version '3'. An older version of this "
              "builtin might be supported. Are you using an old TFLite binary with a newer model?")
        print()
        print("ERROR: Registration failed.")
        print()
        print("Invalid model: " + args[-1])
        print("Model could not be parsed")
        sys.exit(1)
    out_dir = args[args.index("--out_dir") + 1]
    src = args[-1]
    stem = os.path.splitext(os.path.basename(src))[0]
    shutil.copyfile(src, os.path.join(out_dir, stem + "_edgetpu.tflite"))
    table = os.environ["FAKE_ETPU_TABLE"]
    with open(os.path.join(out_dir, stem + "_edgetpu.log"), "w") as fh:
        fh.write("Edge TPU Compiler version 16.0.384591198\\n")
        fh.write("Input: " + src + "\\nOutput: " + stem + "_edgetpu.tflite\\n\\n")
        fh.write("Operator                       Count      Status\\n\\n" + table)
    print()
    print("Model compiled successfully in 12 ms.")
    print()
    print("Input model: " + src)
    print("Input size: 2.12KiB")
    print("Output model: " + os.path.join(out_dir, stem + "_edgetpu.tflite"))
    print("Output size: 63.27KiB")
    print("On-chip memory used for caching model parameters: 1.75KiB")
    print("On-chip memory remaining for caching model parameters: 7.92MiB")
    print("Off-chip memory used for streaming uncached model parameters: 0.00B")
    print("Number of Edge TPU subgraphs: 1")
    print("Total number of operations: 8")
    print("Operation log: " + os.path.join(out_dir, stem + "_edgetpu.log"))
    print()
    print("Number of operations that will run on Edge TPU: 2")
    print("Number of operations that will run on CPU: 6")
    """
)

FAKE_TABLE = (
    f"{'QUANTIZE':<31}{1:<11}{MAPPED}\n"
    f"{'CONV_2D':<31}{1:<11}{MAPPED}\n"
    f"{'LEAKY_RELU':<31}{1:<11}{NOT_SUPPORTED}\n"
    f"{'CONV_2D':<31}{1:<11}{AFTER_UNMAPPED}\n"
    f"{'RESHAPE':<31}{1:<11}{AFTER_UNMAPPED}\n"
    f"{'FULLY_CONNECTED':<31}{1:<11}{AFTER_UNMAPPED}\n"
    f"{'SOFTMAX':<31}{1:<11}{AFTER_UNMAPPED}\n"
    f"{'QUANTIZE':<31}{1:<11}{AFTER_UNMAPPED}\n"
)


@pytest.fixture
def fake_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a fake edgetpu_compiler first on PATH; return the file its arguments are recorded in."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "edgetpu_compiler"
    exe.write_text(FAKE_COMPILER.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", str(bindir) + os.pathsep + os.environ.get("PATH", ""))
    args = tmp_path / "args.json"
    monkeypatch.setenv("FAKE_ETPU_ARGS", str(args))
    monkeypatch.setenv("FAKE_ETPU_TABLE", FAKE_TABLE)
    return args


def test_compiler_not_found_says_so_plainly(
    tmp_path: Path, coral: EdgeTPU, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder
    model = write(tmp_path, chain((OP.RELU, 1)))
    result = edgetpu.compile(model, tmp_path / "out", coral)
    assert result.status == "compiler_not_found" and result.compiled_path is None
    assert "'edgetpu_compiler' is not on PATH" in result.message and "CPU" in result.message
    assert not (tmp_path / "out").exists()
    assert result.to_dict()["status"] == "compiler_not_found"


def test_compiler_output_is_moved_and_its_log_parsed(
    tmp_path: Path, coral: EdgeTPU, fake_compiler: Path
) -> None:
    model = write(tmp_path, chain((OP.RELU, 1)), name="digits_int8.tflite")
    out = tmp_path / "bundle"
    result = edgetpu.compile(model, out, coral)
    assert result.status == "compiled", result.message
    assert result.compiled_path == out / "model_edgetpu.tflite" and result.compiled_path.is_file()
    assert result.log_path == out / "model_edgetpu.log" and result.log_path.is_file()
    assert not (out / "digits_int8_edgetpu.tflite").exists()
    args = json.loads(fake_compiler.read_text())
    assert args == ["--out_dir", str(out), "--show_operations", str(model)]
    assert result.compiler_version == "16.0.384591198"
    assert [(r.op, r.count, r.status) for r in result.ops[:3]] == [
        ("QUANTIZE", 1, "mapped"),
        ("CONV_2D", 1, "mapped"),
        ("LEAKY_RELU", 1, "not_mapped"),
    ]
    assert result.ops[2].reason == NOT_SUPPORTED and result.ops[3].reason == AFTER_UNMAPPED
    assert (result.ops_mapped, result.ops_total) == (2, 8)
    assert result.on_chip_bytes == round(1.75 * 1024) and result.off_chip_bytes == 0
    assert result.message == "compiled: 2 of 8 ops run on the Edge TPU"
    d = json.loads(json.dumps(result.to_dict()))
    assert d["compiled_path"] == str(out / "model_edgetpu.tflite")


def test_compiler_rejection_is_failed_with_the_error_line(
    tmp_path: Path, coral: EdgeTPU, fake_compiler: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ETPU_MODE", "reject")
    model = write(tmp_path, chain((OP.QUANTIZE, 3)))
    stale = tmp_path / "out" / "model_edgetpu.tflite"  # left by an earlier, successful build
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    result = edgetpu.compile(model, tmp_path / "out", coral)
    assert result.status == "failed" and result.compiled_path is None
    assert not stale.exists()
    assert "exit code 1" in result.message
    assert "Didn't find op for builtin opcode 'QUANTIZE' version '3'" in result.message
    assert "Model could not be parsed" in result.log_tail
    # The analysis predicts the same op and says why.
    assert "version '3'" in analyze(model, coral).ops[0].detail


def test_compiler_timeout_is_failed(
    tmp_path: Path, coral: EdgeTPU, fake_compiler: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ETPU_MODE", "hang")
    from toolchain.steps.edgetpu import compiler

    monkeypatch.setattr(compiler, "COMPILER_TIMEOUT_S", 1.0)
    result = edgetpu.compile(write(tmp_path, chain((OP.RELU, 1))), tmp_path / "out", coral)
    assert result.status == "failed" and "did not finish within 1 s" in result.message
    assert not (tmp_path / "out" / "model_edgetpu.tflite").exists()


def test_report_carries_the_compile_result(tmp_path: Path, coral: EdgeTPU, fake_compiler: Path) -> None:
    model = write(tmp_path, chain((OP.RELU, 1)))
    report = analyze(model, coral).with_compiler(edgetpu.compile(model, tmp_path / "out", coral))
    assert report.to_dict()["compiler"]["status"] == "compiled"


def test_parse_compiler_log_reads_the_operator_table() -> None:
    log = (
        "Edge TPU Compiler version 16.0.384591198\nInput: m.tflite\nOutput: m_edgetpu.tflite\n\n"
        "Operator                       Count      Status\n\n"
        f"{'DEQUANTIZE':<31}{2:<11}{DATA_TYPE}\n"
        f"{'DEPTHWISE_CONV_2D':<31}{80:<11}{MAPPED}\n"
        f"{'LOGISTIC':<31}{1:<11}{LIMITATION}\n"
    )
    rows = edgetpu.parse_compiler_log(log)
    assert [(r.op, r.count, r.reason) for r in rows] == [
        ("DEQUANTIZE", 2, DATA_TYPE),
        ("DEPTHWISE_CONV_2D", 80, MAPPED),
        ("LOGISTIC", 1, LIMITATION),
    ]
    assert edgetpu.parse_compiler_log("Model compiled successfully") == []
    assert edgetpu.parse_size("3.21MiB") == round(3.21 * 1024**2) and edgetpu.parse_size("n/a") is None


# --------------------------------------------------------------------------------------------------
# Real converted models (TensorFlow converts; LiteRT checks the reader)


def _convert(tf: Any, model: Any, x: np.ndarray, quantize: bool) -> bytes:
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([x[i : i + 1]] for i in range(min(64, len(x))))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.uint8
        conv.inference_output_type = tf.uint8
    return bytes(conv.convert())


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory, digits: dict[str, np.ndarray]) -> dict[str, Path]:
    """Tiny digits models as .tflite: all-supported, LeakyReLU in the middle, dynamic batch, float."""
    from toolchain.tfenv import import_keras, import_tf

    tf, keras = import_tf(), import_keras()
    keras.utils.set_random_seed(0)
    x = digits["x"][:64].astype(np.float32)
    out = tmp_path_factory.mktemp("edgetpu_models")

    def net(batch: int | None, leaky: bool) -> Any:
        inp = keras.Input(x.shape[1:], batch_size=batch)
        h = keras.layers.Conv2D(4, 3, activation="relu")(inp)
        if leaky:
            h = keras.layers.LeakyReLU(0.1)(h)
            h = keras.layers.Conv2D(4, 3, activation="relu")(h)
        h = keras.layers.Flatten()(h)
        h = keras.layers.Dense(10)(h)
        return keras.Model(inp, keras.layers.Softmax()(h))

    specs = {
        "supported": (net(1, False), True),
        "leaky": (net(1, True), True),
        "dynamic": (net(None, False), True),
        "float": (net(1, False), False),
    }
    paths = {}
    for name, (model, quantize) in specs.items():
        paths[name] = out / f"{name}.tflite"
        paths[name].write_bytes(_convert(tf, model, x, quantize))
    return paths


def _interpreter(path: Path) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["supported", "leaky", "dynamic", "float"])
def test_reader_agrees_with_litert(converted: dict[str, Path], name: str) -> None:
    path = converted[name]
    model = read_tflite(path)
    interp = _interpreter(path)
    ops = interp._get_ops_details()
    assert [o.op for o in model.operators] == [d["op_name"] for d in ops]
    for mine, theirs in zip(model.operators, ops, strict=True):
        assert list(mine.inputs) == [int(i) for i in theirs["inputs"]]
        assert list(mine.outputs) == [int(i) for i in theirs["outputs"]]
    details = interp.get_tensor_details()
    assert details
    for d in details:
        t = model.tensors[d["index"]]
        assert t.name == d["name"]
        assert t.dtype == np.dtype(d["dtype"]).name
        assert list(t.shape) == [int(v) for v in d["shape"]]
        assert list(t.shape_signature) == [int(v) for v in d["shape_signature"]]
        q = d["quantization_parameters"]
        assert np.allclose(t.scale, q["scales"]) and list(t.zero_point) == [int(z) for z in q["zero_points"]]
    assert [model.tensors[i].name for i in model.inputs] == [d["name"] for d in interp.get_input_details()]
    assert [model.tensors[i].name for i in model.outputs] == [d["name"] for d in interp.get_output_details()]
    # Op versions: LiteRT does not report them; the generated schema reader is the independent check.
    fb = schema.Model.GetRootAsModel(path.read_bytes(), 0)
    sg = fb.Subgraphs(0)
    versions = [
        fb.OperatorCodes(sg.Operators(i).OpcodeIndex()).Version() for i in range(sg.OperatorsLength())
    ]
    assert [o.version for o in model.operators] == versions


@pytest.mark.slow
def test_all_supported_model_is_fully_mapped(converted: dict[str, Path], coral: EdgeTPU) -> None:
    report = analyze(converted["supported"], coral)
    assert [v.op for v in report.ops] == [
        "QUANTIZE",
        "CONV_2D",
        "RESHAPE",
        "FULLY_CONNECTED",
        "SOFTMAX",
        "QUANTIZE",
    ]
    assert reasons(report) == [MAPPED] * report.ops_total
    assert report.to_dict()["unmapped"] == []
    # Every constant buffer is read by a mapped op; count them with the generated schema reader.
    fb = schema.Model.GetRootAsModel(converted["supported"].read_bytes(), 0)
    sg = fb.Subgraphs(0)
    used = {sg.Tensors(i).Buffer() for i in range(sg.TensorsLength())} - {0}
    expected = sum(fb.Buffers(b).DataLength() for b in used)
    assert expected >= 4 * 3 * 3 + 10 * (6 * 6 * 4)  # int8 conv kernel 4x3x3x1 + dense kernel 10x144
    assert report.on_chip_bytes_estimate == report.constant_bytes == expected


@pytest.mark.slow
def test_unsupported_op_in_the_middle_cuts_the_model(converted: dict[str, Path], coral: EdgeTPU) -> None:
    report = analyze(converted["leaky"], coral)
    names = [v.op for v in report.ops]
    cut = names.index("LEAKY_RELU")
    assert 0 < cut < len(names) - 1
    assert reasons(report)[:cut] == [MAPPED] * cut
    assert report.ops[cut].reason == NOT_SUPPORTED
    assert all(v.reason == AFTER_UNMAPPED and f"#{cut} LEAKY_RELU" in v.detail for v in report.ops[cut + 1 :])
    d = report.to_dict()
    assert d["ops_mapped"] == cut and [u["index"] for u in d["unmapped"]] == list(range(cut, len(names)))
    assert report.on_chip_bytes_estimate < report.constant_bytes


@pytest.mark.slow
def test_dynamic_batch_model_names_the_dynamic_shape(converted: dict[str, Path], coral: EdgeTPU) -> None:
    report = analyze(converted["dynamic"], coral)
    first = report.ops[0]
    assert first.reason == LIMITATION and "dynamic shape [-1, 8, 8, 1]" in first.detail
    assert "batch_size=1" in first.detail
    assert report.ops_mapped == 0


@pytest.mark.slow
def test_float_model_is_an_unsupported_data_type(converted: dict[str, Path], coral: EdgeTPU) -> None:
    report = analyze(converted["float"], coral)
    assert report.ops_total > 0 and reasons(report) == [DATA_TYPE] * report.ops_total
    assert "float32" in report.ops[0].detail
    assert any("Model not quantized" in n for n in report.notes)
    assert report.on_chip_bytes_estimate == 0 and report.constant_bytes > 0
