"""The x86 int8 form search (toolchain.steps.int8_forms): the selection rules on measured numbers, and
real builds where the chosen form is what ships and its accuracy is the device path's."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from toolchain.steps.convert_onnx import FORMS
from toolchain.steps.int8_forms import Candidate, choose_form
from toolchain.targets import parse_target

DATA = Path(__file__).resolve().parents[2] / "calibration_data"

# Measured on the build host (digits CNN, x86 target, 2 threads; interleaved timing, agent batch 1).
MEASURED = [
    Candidate("qdq-per-channel", "onnxruntime", 0.0201, 0.958217270194986),
    Candidate("qdq-per-channel", "openvino", 0.2893, 0.958217270194986),
    Candidate("qdq-per-tensor", "onnxruntime", 0.0197, 0.9554317548746518),
    Candidate("qdq-per-tensor", "openvino", 0.2165, 0.9554317548746518),
]


def _choose(cands: list[Candidate], **kw: Any) -> dict[str, Any]:
    return choose_form(cands, "qdq-per-channel", float_accuracy=0.9554, max_accuracy_drop=0.01, **kw)


def _with(form: str, rt: str, **changes: Any) -> list[Candidate]:
    out = []
    for c in MEASURED:
        c = Candidate(c.form, c.runtime, c.p50_ms, c.accuracy)
        if (c.form, c.runtime) == (form, rt):
            for k, v in changes.items():
                setattr(c, k, v)
        out.append(c)
    return out


def test_a_near_tie_keeps_the_default_form() -> None:
    choice = _choose(MEASURED)
    assert choice["form"] == "qdq-per-channel"
    assert "not 1.10x as fast" in choice["reason"]
    assert choice["forms"]["qdq-per-tensor"]["status"] == "qualified"
    assert choice["forms"]["qdq-per-channel"]["status"] == "chosen"
    assert choice["runtime"] == "onnxruntime" and choice["p50_ms"] == 0.0201


def test_a_clearly_faster_form_that_keeps_accuracy_is_chosen() -> None:
    choice = _choose(_with("qdq-per-tensor", "onnxruntime", p50_ms=0.0150))
    assert choice["form"] == "qdq-per-tensor"
    assert choice["runtime"] == "onnxruntime"
    assert "1.34x as fast" in choice["reason"]
    # the form's accuracy is its worst runtime's
    assert choice["accuracy"] == pytest.approx(0.9554317548746518)


def test_a_faster_form_that_loses_accuracy_is_not_chosen() -> None:
    # 2 of 359 images fewer than the default in OpenVINO only: 0.56 point > 0.5 point tolerance
    cands = _with("qdq-per-tensor", "onnxruntime", p50_ms=0.0100)
    cands = [
        Candidate(c.form, c.runtime, c.p50_ms, 0.9526462395543176)
        if (c.form, c.runtime) == ("qdq-per-tensor", "openvino")
        else c
        for c in cands
    ]
    choice = _choose(cands)
    assert choice["form"] == "qdq-per-channel"
    status = choice["forms"]["qdq-per-tensor"]["status"]
    assert status.startswith("rejected: openvino accuracy 95.26 %") and "95.82 %" in status


def test_a_form_one_runtime_cannot_run_is_not_chosen() -> None:
    cands = [*MEASURED, Candidate("qoperator-per-tensor", "onnxruntime", 0.0050, 0.958217270194986)]
    cands.append(
        Candidate(
            "qoperator-per-tensor", "openvino", error="No conversion rule found for com.microsoft.QGemm"
        )
    )
    choice = _choose(cands)
    assert choice["form"] == "qdq-per-channel"
    assert choice["forms"]["qoperator-per-tensor"]["status"].startswith("rejected: openvino cannot run it")


def test_a_form_outside_the_target_budget_is_not_chosen_even_within_tolerance() -> None:
    # default at the budget's edge (float 96.1 %, budget 1 point): a form 0.28 point lower falls out
    cands = _with("qdq-per-tensor", "onnxruntime", p50_ms=0.0100)
    choice = choose_form(cands, "qdq-per-channel", float_accuracy=0.9682, max_accuracy_drop=0.01)
    assert choice["form"] == "qdq-per-channel"
    assert "outside the target's budget" in choice["forms"]["qdq-per-tensor"]["status"]


def test_a_form_not_scored_because_it_is_not_faster_is_rejected_as_such() -> None:
    cands = _with("qdq-per-tensor", "onnxruntime", accuracy=None, error="not scored: not 1.10x as fast")
    choice = _choose(cands)
    assert choice["form"] == "qdq-per-channel"
    assert choice["forms"]["qdq-per-tensor"]["status"] == "rejected: not scored: not 1.10x as fast"


def test_a_default_form_that_failed_ships_unchanged() -> None:
    cands = _with("qdq-per-channel", "openvino", error="cannot compile", p50_ms=None, accuracy=None)
    choice = _choose(cands)
    assert choice["form"] == "qdq-per-channel" and "could not be measured" in choice["reason"]


def onnx_form(path: Path) -> tuple[str, str]:
    """Read a shipped .onnx back: ("qdq"|"qoperator", "per-channel"|"per-tensor")."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    ops = Counter(n.op_type for n in m.graph.node)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    if ops["QLinearConv"]:
        fmt = "qoperator"
        scales = [inits[n.input[4]] for n in m.graph.node if n.op_type == "QLinearConv"]
    else:
        assert ops["DequantizeLinear"] and not ops["QLinearConv"] and not ops["QGemm"]
        fmt = "qdq"
        scales = [
            inits[n.input[1]]
            for n in m.graph.node
            if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(0)).ndim == 4
        ]
    assert scales
    return fmt, "per-channel" if all(s.size > 1 for s in scales) else "per-tensor"


@pytest.mark.slow
def test_the_x86_bundle_ships_the_chosen_form(digits_bundles: Path) -> None:
    report = json.loads((digits_bundles / "report.json").read_text())
    x86 = report["targets"]["x86"]
    choice = x86["int8_form_choice"]
    fmt, scales = onnx_form(digits_bundles / "x86" / "model.onnx")
    assert choice["form"] == f"{fmt}-{scales}"
    assert {c["form"] for c in choice["candidates"]} >= {"qdq-per-channel", "qdq-per-tensor"}
    for c in choice["candidates"]:
        assert c["p50_ms"] > 0  # every form is timed; the default and contenders are scored
        if c["error"] is None:
            assert 0.5 < c["accuracy"] <= 1
        else:
            assert c["error"].startswith("not scored") and c["accuracy"] is None
            assert choice["forms"][c["form"]]["status"].startswith("rejected: not scored")
    assert all(c["accuracy"] for c in choice["candidates"] if c["form"] == "qdq-per-channel")
    # the chosen form's candidate accuracy is the agent's one-sample-at-a-time accuracy of the bundle
    for rt in x86["runtimes"]:
        cand = next(c for c in choice["candidates"] if (c["form"], c["runtime"]) == (choice["form"], rt))
        assert cand["accuracy"] == pytest.approx(x86["per_runtime"][rt]["paths"]["batch_1"]["accuracy"])


@pytest.mark.slow
def test_a_faster_qoperator_form_ships_and_reads_back_as_qoperator(
    digits_cnn_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ONNX Runtime-only target (QOperator cannot run in OpenVINO), QOperator made to look faster:
    the bundle carries QLinearConv, passes verification and parity, and reports the device path."""
    from toolchain.build import build_bundles
    from toolchain.steps import int8_forms

    real_timer = int8_forms.time_interleaved

    def qoperator_looks_faster(entries: Any, sample: Any, threads: int) -> None:
        real_timer(entries, sample, threads)  # real numbers, then QOperator's divided by 10
        for c, _ in entries:
            if c.form.startswith("qoperator") and c.p50_ms:
                c.p50_ms /= 10

    monkeypatch.setattr(int8_forms, "time_interleaved", qoperator_looks_faster)
    monkeypatch.setattr(int8_forms, "SEARCH_FORMS", ("qdq-per-channel", "qoperator-per-tensor"))
    target = parse_target(
        {
            "name": "x86-ort",
            "format": "onnx",
            "runtimes": ["onnxruntime"],
            "threads": 1,
            "quantization": {"scheme": "int8", "input_dtype": "float32", "output_dtype": "float32"},
            "limits": {"max_model_bytes": 100_000_000, "max_accuracy_drop": 0.05},
        }
    )
    rep = build_bundles(
        digits_cnn_path,
        DATA / "digits.npz",
        [target],
        tmp_path / "out",
        eval_data=DATA / "digits_test.npz",
        progress=False,
        allow_accuracy_drop=True,
    )
    entry = rep["targets"]["x86-ort"]
    choice = entry["int8_form_choice"]
    assert choice["form"] == "qoperator-per-tensor", choice["reason"]
    assert onnx_form(tmp_path / "out" / "x86-ort" / "model.onnx") == ("qoperator", "per-tensor")
    assert entry["checks"]["weights_int8"] and entry["checks"]["ops"].get("QLinearConv")
    batch_1 = entry["per_runtime"]["onnxruntime"]["paths"]["batch_1"]["accuracy"]
    assert choice["accuracy"] == pytest.approx(batch_1)
    assert set(FORMS) >= {c["form"] for c in choice["candidates"]}
