"""Per-class metrics and the class-drop gate on known confusion matrices (pure numpy, fast).

The data here is unlike the shipped digits (ten balanced classes): two classes at 99/1 and 95/5,
classes with 1 to 3 evaluation samples, absent classes, and a second runtime that disagrees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from toolchain.cli import main
from toolchain.errors import ToolchainError
from toolchain.report import render_html, summary_table, worst_class_line
from toolchain.steps.per_class import (
    DEFAULT_MAX_CLASS_DROP_POINTS,
    MIN_LOST_SAMPLES,
    class_drops,
    class_report,
    confusion_matrix,
    failing_classes,
    per_class_metrics,
    target_class_evaluation,
)


def _labels_preds(counts: dict[tuple[int, int], int]) -> tuple[np.ndarray, np.ndarray]:
    """Return (y_true, y_pred) with ``counts[(true, pred)]`` samples of each pair, in a fixed shuffle."""
    t = np.concatenate([np.full(n, a, np.int64) for (a, _), n in counts.items()])
    p = np.concatenate([np.full(n, b, np.int64) for (_, b), n in counts.items()])
    order = np.random.default_rng(0).permutation(len(t))
    return t[order], p[order]


def test_confusion_matrix_rows_are_true_columns_predicted() -> None:
    cm = confusion_matrix(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert cm.dtype == np.int64


def test_precision_recall_f1_and_undefined_ratios() -> None:
    # "b" is predicted twice, both wrong (precision 0); "c" never occurs and is never predicted
    cm = np.array([[8, 2, 0], [3, 0, 0], [0, 0, 0]])
    m = per_class_metrics(cm, ["a", "b", "c"])
    assert list(m) == ["a", "b", "c"]
    assert m["a"] == {"precision": 8 / 11, "recall": 0.8, "f1": 16 / 21, "support": 10}
    assert m["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}
    assert m["c"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    # "b" is never predicted: precision undefined (null, not 0), F1 still 0
    m = per_class_metrics(np.array([[10, 0], [3, 0]]), ["a", "b"])
    assert m["b"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 3}


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 7),
    pairs=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=200),
)
def test_report_is_consistent_for_any_labels(k: int, pairs: list[tuple[int, int]]) -> None:
    y = np.array([a % k for a, _ in pairs])
    p = np.array([b % k for _, b in pairs])
    labels = [f"class {i}" for i in range(k)]
    rep = class_report(y, p, labels)
    cm = np.array(rep["confusion_matrix"])
    assert cm.sum() == len(y)
    assert sum(m["support"] for m in rep["per_class"].values()) == len(y)
    for i, (label, m) in enumerate(rep["per_class"].items()):
        assert label == labels[i]
        assert m["support"] == cm[i].sum() == np.sum(y == i)
        if m["support"]:
            assert m["recall"] == pytest.approx(cm[i, i] / cm[i].sum())
            assert m["recall"] == pytest.approx(np.mean(p[y == i] == i))
        if cm[:, i].sum():
            assert m["precision"] == pytest.approx(cm[i, i] / cm[:, i].sum())
        if m["precision"] and m["recall"]:
            assert m["f1"] == pytest.approx(2 * m["precision"] * m["recall"] / (m["precision"] + m["recall"]))
    # accuracy from the matrix equals accuracy from the arrays
    assert np.trace(cm) / len(y) == pytest.approx(np.mean(y == p))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="0..1"):
        confusion_matrix(np.array([0, 2]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        confusion_matrix(np.array([0, 1, 1]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="integers"):
        confusion_matrix(np.array([0.5, 1.0]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="unique"):
        per_class_metrics(np.eye(2, dtype=np.int64), ["a", "a"])
    with pytest.raises(ValueError, match="different evaluation samples"):
        class_drops(np.array([[5, 0], [0, 5]]), np.array([[5, 0], [0, 4]]), ["a", "b"])


def test_gate_catches_a_killed_minority_class_that_overall_accuracy_hides() -> None:
    """99/1: int8 answers 'ok' for every sample. Accuracy moves 0.4 points (inside a 1-point budget)."""
    labels = ["ok", "fault"]
    y, float_pred = _labels_preds({(0, 0): 985, (0, 1): 5, (1, 1): 9, (1, 0): 1})
    _, int8_pred = _labels_preds({(0, 0): 990, (1, 0): 10})
    # same samples in the same order: the shuffle depends only on the length
    assert np.array_equal(y, _labels_preds({(0, 0): 990, (1, 0): 10})[0])
    float_acc, int8_acc = np.mean(float_pred == y), np.mean(int8_pred == y)
    assert float_acc - int8_acc == pytest.approx(0.004)  # what the overall budget sees

    fields, failure = target_class_evaluation(
        y, float_pred, {"litert": int8_pred}, "litert", labels, DEFAULT_MAX_CLASS_DROP_POINTS
    )
    assert failure is not None
    assert failure.startswith("class 'fault' recall 90.00% (float) -> 0.00% (int8, litert): 90.00 points")
    assert "9 of 10 samples" in failure and "--max-class-drop" in failure and "--quantize qat" in failure
    assert "\n" not in failure
    assert fields["per_class"]["fault"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 10}
    assert fields["float_per_class"]["fault"]["recall"] == pytest.approx(0.9)
    assert fields["confusion_matrix"] == [[990, 0], [10, 0]]
    assert fields["float_confusion_matrix"] == [[985, 5], [1, 9]]
    cd = fields["class_drop"]
    assert cd["failing"] == ["fault"] and cd["low_support"] == ["fault"]
    assert cd["worst"]["label"] == "fault" and cd["worst"]["runtime"] == "litert"
    assert cd["worst"]["lost_samples"] == 9 and cd["worst"]["drop_points"] == pytest.approx(90.0)
    # the majority class gained 5 samples: shown, never failing
    assert (
        class_drops(np.array(fields["float_confusion_matrix"]), np.array(fields["confusion_matrix"]), labels)[
            1
        ].lost_samples
        == -5
    )


def test_95_5_minority_halved_fails_and_the_same_loss_spread_over_the_majority_passes() -> None:
    labels = ["neg", "pos"]
    float_cm = np.array([[190, 0], [0, 10]])
    halved = np.array([[190, 0], [5, 5]])  # 50 points of 'pos', 2.5 points overall
    spread = np.array([[185, 5], [0, 10]])  # 5 samples lost too, but 2.6 points of 'neg'
    assert [d.label for d in failing_classes(class_drops(float_cm, halved, labels), 10.0)] == ["pos"]
    assert failing_classes(class_drops(float_cm, spread, labels), 10.0) == []


@pytest.mark.parametrize(
    ("support", "lost", "fails"),
    [
        (3, 1, False),  # one sample of three: 33 points, but one sample is noise
        (3, 2, True),  # two of three: 67 points and two samples
        (2, 2, True),  # a class of two, killed
        (1, 1, False),  # a class of one can never fail (it is listed in low_support)
        (100, 10, False),  # exactly 10 points: not more than the limit
        (100, 11, True),
        (20, 2, False),  # 10 points
        (20, 3, True),  # 15 points, 3 samples
    ],
)
def test_small_supports_need_two_lost_samples(support: int, lost: int, fails: bool) -> None:
    float_cm = np.array([[50, 0], [0, support]])
    cm = np.array([[50, 0], [lost, support - lost]])
    drops = class_drops(float_cm, cm, ["big", "small"])
    assert drops[0].label == "small" and drops[0].drop_points == pytest.approx(100 * lost / support)
    assert bool(failing_classes(drops, 10.0)) is fails
    assert MIN_LOST_SAMPLES == 2


def test_every_runtime_is_gated_and_the_preferred_one_is_reported() -> None:
    labels = ["a", "b", "c"]
    y = np.repeat(np.arange(3), [40, 30, 5])
    good = y.copy()
    bad = y.copy()
    bad[y == 1] = 0  # openvino loses class b entirely
    fields, failure = target_class_evaluation(
        y, y, {"onnxruntime": good, "openvino": bad}, "onnxruntime", labels, 10.0
    )
    assert failure is not None and "class 'b'" in failure and "int8, openvino" in failure
    assert fields["per_class"]["b"]["recall"] == 1.0  # preferred runtime (what `accuracy` describes)
    assert fields["class_drop"]["per_runtime"]["onnxruntime"]["lost_samples"] == 0
    assert fields["class_drop"]["per_runtime"]["openvino"]["label"] == "b"
    assert fields["class_drop"]["worst"]["runtime"] == "openvino"
    # a limit of 100 points turns the gate off
    assert target_class_evaluation(y, y, {"openvino": bad}, "openvino", labels, 100.0)[1] is None


def test_several_failing_classes_are_one_line() -> None:
    labels = [str(i) for i in range(4)]
    y = np.repeat(np.arange(4), 10)
    pred = np.zeros_like(y)  # classes 1..3 all lost
    _, failure = target_class_evaluation(y, y, {"litert": pred}, "litert", labels, 10.0)
    assert failure is not None and "\n" not in failure and "(and 2 more classes)" in failure


# ------------------------------------------------------------------------------------------- rendering


def _report_with_classes() -> dict:
    labels = ["ok", "fault"]
    y, float_pred = _labels_preds({(0, 0): 985, (0, 1): 5, (1, 1): 9, (1, 0): 1})
    _, int8_pred = _labels_preds({(0, 0): 990, (1, 0): 10})
    fields, failure = target_class_evaluation(y, float_pred, {"litert": int8_pred}, "litert", labels, 10.0)
    good, _ = target_class_evaluation(y, float_pred, {"litert": float_pred}, "litert", labels, 10.0)
    entry = {
        "status": "ok",
        "error": None,
        "accuracy": 0.99,
        "float_accuracy": 0.994,
        "preferred_runtime": "litert",
    }
    return {
        "schema": 1,
        "name": "pumps",
        "version": 1,
        "labels": labels,
        "float": {"accuracy": 0.994, **class_report(y, float_pred, labels)},
        "targets": {
            "mobile": dict(entry, status="failed", error=failure, **fields),
            "x86": dict(entry, preferred_runtime="onnxruntime", **good),
        },
    }


def test_html_shows_float_and_int8_matrices_per_target() -> None:
    page = render_html(_report_with_classes())
    assert "<script" not in page and "https://" not in page
    assert page.count('<table class="cm">') == 4  # float + int8 for each of the two targets
    assert "Per-class results" in page and "int8 (litert)" in page and "int8 (onnxruntime)" in page
    # mobile's int8 matrix: 'fault' always predicted 'ok' -> the (fault, ok) cell is 10 and outlined (float: 1)
    assert 'title="true fault, predicted ok: 10 of 10 (float: 1)">10</td>' in page
    assert page.count("outline:2px") == 4  # the 4 cells that changed, all in mobile's int8 matrix
    # the failing class's row is marked in the per-class table; the recall change is shown in points
    assert '<tr class="failed"><td>fault</td><td>10</td><td>90.00%</td><td>0.00%</td><td>-90.00</td>' in page


def test_html_without_per_class_keys_still_renders() -> None:
    rep = _report_with_classes()
    for t in rep["targets"].values():
        for k in ("per_class", "confusion_matrix", "float_per_class", "float_confusion_matrix", "class_drop"):
            t.pop(k)
    page = render_html(rep)
    assert "Per-class results" not in page and "<table" in page


def test_summary_names_the_worst_class() -> None:
    rep = _report_with_classes()
    text = summary_table(rep)
    assert (
        "mobile: worst class 'fault': recall 90.00% float -> 0.00% int8 (litert), -90.00 points"
        " (9 of 10 samples; limit 10 points; 1 class(es) have under 20 eval samples)" in text
    )
    assert "x86: no class lost recall from float to int8 (limit 10 points)" in text
    assert worst_class_line({"status": "failed", "error": "conversion failed"}) is None


def test_max_class_drop_flag_and_api_reject_bad_values(tmp_path: Path) -> None:
    for bad in ("-1", "101", "lots"):
        res = CliRunner().invoke(
            main,
            ["build", "m.keras", "--data", "d.npz", "--target", "mobile", "--max-class-drop", bad],
        )
        assert res.exit_code == 2 and "--max-class-drop" in res.output, res.output
    from toolchain.build import build_bundles

    with pytest.raises(ToolchainError, match="--max-class-drop 150 must be between 0 and 100"):
        build_bundles(
            tmp_path / "m.keras", tmp_path / "d.npz", ["mobile"], tmp_path / "o", max_class_drop=150
        )
    assert not (tmp_path / "o").exists()
