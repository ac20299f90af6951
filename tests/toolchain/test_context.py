"""The build's typed records (toolchain.steps.context): what a report entry holds at each step."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from toolchain.errors import ToolchainError
from toolchain.steps.context import BuildOptions, Measurement, TargetResult, finite

# The keys of a target that failed in conversion, as the untyped build wrote them.
FAILED_AT_CONVERSION = [
    "status",
    "error",
    "bundle",
    "format",
    "float_accuracy",
    "float_size_bytes",
    "float_gzip_size_bytes",
    "build_s",
]


def _result() -> TargetResult:
    return TargetResult(
        target="dev", format="tflite", float_accuracy=0.9, float_size_bytes=4000, float_gzip_size_bytes=3000
    )


def _measurement(**over: object) -> Measurement:
    fields: dict[str, object] = dict(
        accuracy=0.875,
        accuracy_drop=0.025,
        max_accuracy_drop=0.01,
        size_bytes=1200,
        gzip_size_bytes=900,
        size_ratio=0.3,
        sparsity=np.float32(0.25),
        top1_agreement=0.97,
        sqnr_db=float("inf"),
        runtimes=["openvino", "litert"],
        latency_ms_p50=0.5,
        latency_ms_p95=float("nan"),
        threads=np.int64(2),
        latency={},
        float_latency={},
        per_runtime={},
        inputs=[],
        outputs=[],
        checks={},
        runtimes_excluded={},
        parity_batch_sizes=[1, 64],
        precision={"openvino": "f32", "litert": None},
        float_latency_ms_p50=0.4,
    )
    fields.update(over)
    return Measurement(**fields)  # type: ignore[arg-type]


def test_a_target_failed_in_conversion_writes_the_keys_it_always_wrote() -> None:
    r = _result()
    r.error = "the tflite converter wrote no model"
    r.build_s = 1.5
    d = r.to_dict()
    assert list(d) == FAILED_AT_CONVERSION
    assert d["status"] == "failed" and d["bundle"] is None and d["error"].startswith("the tflite")


def test_a_measured_target_is_json_ready_and_ordered_as_the_steps_ran() -> None:
    r = _result()
    r.measured = _measurement()
    r.classes = {"per_class": {"cat": {"recall": 1.0}}}
    r.arena = {"arena_bytes": 4096, "arena_method": "liveness"}
    r.accuracy_budget = "exceeded, allowed by --allow-accuracy-drop: ..."
    d = r.to_dict()
    json.dumps(d, allow_nan=False)  # NaN and inf became null
    assert d["sqnr_db"] is None and d["latency_ms_p95"] is None
    assert type(d["sparsity"]) is float and type(d["threads"]) is int
    assert d["preferred_runtime"] == "openvino"  # the first kept runtime
    keys = list(d)
    assert keys.index("float_latency_ms_p50") < keys.index("per_class") < keys.index("arena_bytes")
    assert keys.index("arena_bytes") < keys.index("accuracy_budget")
    # a target without an Edge TPU has no op share, and budgets not reached are not written
    assert "edgetpu" not in d and "edgetpu_op_share" not in d and "budget" not in d
    assert "class_drop_budget" not in d and "bundle_action" not in d and "build_s" not in d
    # raw_dict keeps the measured values for the budget check
    assert math.isnan(r.raw_dict()["latency_ms_p95"])


def test_edgetpu_op_share_and_warnings_follow_the_edgetpu_summary() -> None:
    r = _result()
    r.measured = _measurement()
    r.edgetpu = {"ops_total": 4, "ops_mapped": 3}
    r.arena = {"arena_bytes": 10}
    r.edgetpu_op_share = 0.75
    r.warnings.append("1 of 4 ops run on the CPU")
    d = r.to_dict()
    keys = list(d)
    assert keys.index("edgetpu") < keys.index("arena_bytes") < keys.index("edgetpu_op_share")
    assert d["edgetpu_op_share"] == 0.75 and d["warnings"] == ["1 of 4 ops run on the CPU"]


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        (BuildOptions(quantize="int4"), "--quantize 'int4' is unknown"),
        (BuildOptions(prune=1.0), "--prune 1.0 must be between 0 and 1"),
        (BuildOptions(cluster=1), "--cluster 1 must be a whole number of clusters from 2 to 256"),
        (BuildOptions(cluster=300), "--cluster 300 must be a whole number"),
        (BuildOptions(version=0), "--version 0 must be a positive integer"),
        (BuildOptions(version=True), "--version True must be a positive integer"),
        (BuildOptions(max_class_drop=101), "--max-class-drop 101 must be between 0 and 100"),
    ],
)
def test_options_out_of_range_fail_in_one_line_naming_the_flag(options: BuildOptions, flag: str) -> None:
    with pytest.raises(ToolchainError) as e:
        options.check()
    assert str(e.value).startswith(flag) and "\n" not in str(e.value)


def test_options_report_section() -> None:
    from pathlib import Path

    o = BuildOptions(quantize="qat", prune=0.5, cluster=16, sign_key=Path("k"), max_class_drop=5)
    o.check()
    assert o.qat
    assert o.to_dict() == {
        "quantize": "qat",
        "prune": 0.5,
        "cluster": 16,
        "allow_accuracy_drop": False,
        "max_class_drop": 5.0,
        "signed": True,
    }


def test_finite_cleans_nested_numpy_and_paths() -> None:
    from pathlib import Path

    doc = finite({"a": [np.float64("nan"), np.int32(3)], "p": Path("/x"), "t": (1.5, float("-inf"))})
    assert doc == {"a": [None, 3], "p": "/x", "t": [1.5, None]}
