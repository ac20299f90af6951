"""Canary gates: may a canary wave be promoted, judged from model metrics? (pure: no I/O)

For every canary the gate compares one metric over the K windows it sent on the new model (after)
with the same metric over its last K windows on the model it ran before (before):

``drift``       the drift verdict (ok < warn < alert) and the highest input-feature PSI over the windows,
                each side against its own model's baseline. Passes when the verdict falls (an alert
                clears), when it is ``ok`` on both sides, or when it stays ``warn``/``alert`` and the
                max PSI falls: a canary whose drift did not improve is not promoted. Fails when too few
                predictions to judge drift.
``confidence``  the mean top-1 confidence; passes when it drops by at most ``CONFIDENCE_TOLERANCE``.
``accuracy``    correct / labelled from feedback; passes when it drops by at most ``ACCURACY_TOLERANCE``;
                fails when the after windows carry no labels.

The wave is promoted only when every canary passes. A canary with fewer than K windows when the
gate's time ran out fails it (outcome ``timeout``): the rollout fails safe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

GATES = ("drift", "confidence", "accuracy")
CONFIDENCE_TOLERANCE = 0.02  # mean top-1 confidence, absolute
ACCURACY_TOLERANCE = 0.02  # accuracy on labelled predictions, absolute
SEVERITY = {"insufficient": -1, "ok": 0, "warn": 1, "alert": 2}


@dataclass
class Measure:
    """One device's gate metric over some windows on one model."""

    model_sha256: str
    model_version: int | None
    windows: int  # windows used
    count: int  # predictions in them
    value: float | None  # drift: max PSI; confidence: mean top-1; accuracy: correct / labelled
    state: str | None = None  # drift: the verdict over these windows
    labelled: int = 0


@dataclass
class DeviceVerdict:
    """One canary's before, after and whether it passed, with the reason in words."""

    device_id: str
    before: Measure | None
    after: Measure | None
    passed: bool
    reason: str


@dataclass
class GateDecision:
    """The gate's outcome over all canaries: ``passed``, ``failed`` or ``timeout``."""

    gate: str
    windows: int
    outcome: str
    devices: list[DeviceVerdict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"

    @property
    def message(self) -> str:
        """One line: the outcome and every canary's numbers."""
        parts = "; ".join(f"{d.device_id}: {d.reason}" for d in self.devices)
        return f"gate {self.gate} {self.outcome}: {parts}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "windows": self.windows,
            "outcome": self.outcome,
            "passed": self.passed,
            "message": self.message,
            "devices": [asdict(d) for d in self.devices],
        }


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def judge_device(gate: str, windows: int, before: Measure | None, after: Measure | None) -> tuple[bool, str]:
    """Return (passed, reason) for one canary; see the module docstring for the rules."""
    if gate not in GATES:
        raise ValueError(f"unknown gate {gate!r}; choose one of {', '.join(GATES)}")
    if after is None or after.windows < windows:
        got = 0 if after is None else after.windows
        return False, f"{got} of {windows} window(s) on the new model"
    if before is None or before.windows == 0:
        return False, "no windows from before the install to compare with"
    if gate == "drift":
        sb, sa = before.state or "insufficient", after.state or "insufficient"
        nums = f"drift {sb} -> {sa}, max PSI {_num(before.value)} -> {_num(after.value)}"
        if sa == "insufficient":
            return False, f"{nums}: {after.count} prediction(s) are too few to judge drift"
        if sb == "insufficient":
            return False, f"{nums}: too few predictions before the install to compare with"
        if SEVERITY[sa] < SEVERITY[sb]:
            return True, nums
        if SEVERITY[sa] > SEVERITY[sb]:
            return False, nums
        if sa == "ok":
            return True, nums
        if before.value is not None and after.value is not None and after.value < before.value:
            return True, f"{nums}: the drift score fell"
        return False, f"{nums}: the {sa} did not clear and the drift score did not fall"
    if gate == "accuracy":
        nums = (
            f"accuracy {_num(before.value)} ({before.labelled} labelled) -> {_num(after.value)}"
            f" ({after.labelled} labelled)"
        )
        if not after.labelled or after.value is None:
            return False, f"{nums}: no labelled predictions on the new model"
        if before.value is None:
            return False, f"{nums}: no labelled predictions before the install"
        ok = after.value >= before.value - ACCURACY_TOLERANCE
        return ok, nums if ok else f"{nums} (tolerance {ACCURACY_TOLERANCE})"
    nums = f"mean top-1 confidence {_num(before.value)} -> {_num(after.value)}"
    if before.value is None or after.value is None:
        return False, f"{nums}: no predictions to measure"
    ok = after.value >= before.value - CONFIDENCE_TOLERANCE
    return ok, nums if ok else f"{nums} (tolerance {CONFIDENCE_TOLERANCE})"


def decide(
    gate: str,
    windows: int,
    measures: Mapping[str, tuple[Measure | None, Measure | None]],
    timed_out: bool = False,
) -> GateDecision:
    """Judge every canary (device -> (before, after)); promote only when all pass."""
    if windows < 1:
        raise ValueError(f"the gate needs at least 1 window, got {windows}")
    if not measures:
        raise ValueError("the gate needs at least one canary")
    verdicts = []
    for dev, (before, after) in sorted(measures.items()):
        ok, why = judge_device(gate, windows, before, after)
        verdicts.append(DeviceVerdict(dev, before, after, ok, why))
    short = any(v.after is None or v.after.windows < windows for v in verdicts)
    if all(v.passed for v in verdicts):
        outcome = "passed"
    elif short and timed_out:
        outcome = "timeout"
    else:
        outcome = "failed"
    return GateDecision(gate, windows, outcome, verdicts)
