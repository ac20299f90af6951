"""What a failed build tells the user to try is true for the build it failed (issue 11, found in its audit).

A QAT build that missed its accuracy budget was told to "try --quantize qat"; a model over its size or
latency budget was told to prune, which makes the int8 file neither smaller nor faster (the size
half of that is measured for real in test_finetune_weights.py).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from toolchain.steps.budget import ADVICE, BudgetError, check_budget
from toolchain.steps.context import BuildOptions, accuracy_tries
from toolchain.steps.parity import ParityError, check_parity
from toolchain.steps.per_class import target_class_evaluation
from toolchain.steps.target import _tries
from toolchain.targets import Budget, load_target


def test_ptq_is_told_to_try_qat() -> None:
    tries = accuracy_tries(BuildOptions())
    assert tries == "try --quantize qat or more representative --data"


def test_ptq_with_pruning_is_told_to_prune_less_first_with_what_pruning_cost() -> None:
    tries = accuracy_tries(BuildOptions(prune=0.5), float_accuracy=0.9722, pruned_accuracy=0.9111)
    assert tries.startswith(
        "try a lower --prune than 0.5 (pruning alone took the float model from 0.9722 to 0.9111)"
    )
    assert "--quantize qat" in tries


def test_qat_is_never_told_to_try_qat() -> None:
    tries = accuracy_tries(BuildOptions(quantize="qat"))
    assert "--quantize qat" not in tries and "--prune" not in tries
    assert tries == (
        "try more samples in --data (QAT fine-tunes on it) or a model with more capacity (more filters or units)"
    )


def test_qat_with_pruning_is_told_to_prune_less() -> None:
    tries = accuracy_tries(
        BuildOptions(quantize="qat", prune=0.75), float_accuracy=0.95, pruned_accuracy=0.80
    )
    assert "--quantize qat" not in tries
    assert tries.startswith(
        "try a lower --prune than 0.75 (pruning alone took the float model from 0.9500 to 0.8000)"
    )
    assert "(QAT fine-tunes on it)" in tries


def test_a_class_is_named() -> None:
    assert "more samples of class 'leak' in --data" in accuracy_tries(BuildOptions(), class_label="leak")
    qat = accuracy_tries(BuildOptions(quantize="qat"), class_label="leak")
    assert "more samples of class 'leak' in --data (QAT fine-tunes on it)" in qat
    assert "--quantize qat" not in qat


@pytest.mark.parametrize(
    ("options", "must", "must_not"),
    [
        (BuildOptions(), "--quantize qat", "--prune"),
        (BuildOptions(quantize="qat"), "QAT fine-tunes on it", "--quantize qat"),
        (BuildOptions(quantize="qat", prune=0.5), "a lower --prune than 0.5", "--quantize qat"),
    ],
    ids=["ptq", "qat", "qat+prune"],
)
def test_the_gates_use_the_build_s_advice(options: BuildOptions, must: str, must_not: str) -> None:
    """The class-recall gate and the parity step word their failure with the build's own advice."""
    ctx = SimpleNamespace(
        options=options, float_accuracy=0.9, pruned_accuracy=0.85 if options.prune else None
    )
    y = np.array([0] * 10 + [1] * 10)
    float_pred = y.copy()
    lost = np.array([0] * 10 + [0] * 9 + [1])  # class "b": recall 100 % -> 10 %
    _, failure = target_class_evaluation(
        y,
        float_pred,
        {"litert": lost},
        "litert",
        ["a", "b"],
        10.0,
        tries=lambda label: _tries(ctx, label),  # type: ignore[arg-type]
    )
    assert failure is not None and must in failure and must_not not in failure
    assert "more samples of class 'b'" in failure


def test_parity_failure_uses_the_advice_it_is_given(tmp_path: object) -> None:
    """check_parity words 'no runtime within budget' with ``tries`` (real bundle, real runtime)."""
    from tests.device_agent.agent_bundles import cached_onnx_bundle, digits

    d = digits()
    x, y = d["x_test"][:60], d["y_test"][:60]
    ref = np.eye(10, dtype=np.float32)[y]
    wrong = (y + 1) % 10  # labels nobody predicts: every runtime misses any budget
    tries = accuracy_tries(BuildOptions(quantize="qat"))
    with pytest.raises(ParityError) as e:
        check_parity(
            cached_onnx_bundle(),
            ["onnxruntime"],
            x,
            wrong,
            ref,
            float_accuracy=1.0,
            max_accuracy_drop=0.01,
            tries=tries,
        )
    assert f"({tries}, or pass --allow-accuracy-drop to ship it anyway)" in str(e.value)
    assert "--quantize qat" not in str(e.value)


@pytest.mark.parametrize("key", ["max_model_bytes", "max_latency_ms"])
def test_size_and_latency_budgets_do_not_advise_pruning(key: str) -> None:
    advice = ADVICE[key]
    assert "--prune" in advice and "does not" in advice  # says why not, never "prune it"
    assert "prune it" not in advice and "--prune 0.5" not in advice
    target = dataclasses.replace(load_target("mobile"), budget=Budget(**{key: 1}))
    with pytest.raises(BudgetError) as e:
        check_budget(target, {key: 10_000})
    assert str(e.value).startswith(f"{key}: measured") and advice in str(e.value)
