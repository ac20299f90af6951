"""Per-class evaluation: confusion matrix, precision/recall/F1 per class, and the class-drop gate.

Pure numpy on integer labels and predictions; no I/O, no runtimes. The build compares the float
reference with the int8 artifact on the same evaluation samples, so a class's recall drop is exact
on those samples: ``lost_samples`` (samples of the class the float model got right minus those the
int8 model got right) is what moved, and ``drop_points = 100 * lost_samples / support``.

The gate (``failing_classes``) fails a class when its recall drops by more than ``max_points``
percentage points **and** by at least ``MIN_LOST_SAMPLES`` samples. A class with 3 evaluation
samples drops 33 points when one sample flips; one flipped sample is not evidence that quantization
broke the class, two are. Classes are never exempted for small support: the minority classes that
int8 models lose first are the ones with few samples. A class with a single evaluation sample can
therefore never fail the gate; ``low_support`` lists every class with fewer than
``LOW_SUPPORT_SAMPLES`` samples so the report can say its recall is coarse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Default for `edgefleet build --max-class-drop` (percentage points of one class's recall, float -> int8).
DEFAULT_MAX_CLASS_DROP_POINTS = 10.0
# A class fails the gate only when at least this many of its samples were lost (one sample is noise).
MIN_LOST_SAMPLES = 2
# Below this many evaluation samples a class's recall moves in steps of more than 5 points: say so.
LOW_SUPPORT_SAMPLES = 20


def accuracy(scores: np.ndarray, y: np.ndarray) -> float:
    """Return top-1 accuracy of scores (n, K) against labels (n,)."""
    scores = np.asarray(scores)
    if len(scores) == 0:
        return float("nan")
    return float(np.mean(np.argmax(scores.reshape(len(scores), -1), axis=1) == np.asarray(y)))


def predicted_classes(scores: np.ndarray) -> np.ndarray:
    """Return the top-1 class index (n,) int64 of scores (n, K) (any trailing shape is flattened)."""
    s = np.asarray(scores)
    if s.ndim == 0 or len(s) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.argmax(s.reshape(len(s), -1), axis=1).astype(np.int64)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Return the (K, K) int64 confusion matrix: rows are true classes, columns predicted, in index order.

    ``y_true`` and ``y_pred`` are integer class indices (n,) in ``0..n_classes-1``.
    """
    t = np.asarray(y_true).reshape(-1)
    p = np.asarray(y_pred).reshape(-1)
    if len(t) != len(p):
        raise ValueError(f"{len(t)} labels but {len(p)} predictions")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    for name, arr in (("labels", t), ("predictions", p)):
        if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= n_classes):
            raise ValueError(f"{name} must be integers in 0..{n_classes - 1}")
    flat = t.astype(np.int64) * n_classes + p.astype(np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def per_class_metrics(cm: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Return ``{label: {precision, recall, f1, support}}`` in label order from a confusion matrix.

    precision = TP / predicted, recall = TP / support, f1 = 2 TP / (2 TP + FP + FN). A ratio whose
    denominator is 0 is ``None`` (JSON null), not 0: a class never predicted has no precision, a class
    absent from the data has no recall. F1 is 0 for a class that is present but never predicted.
    """
    m = np.asarray(cm, dtype=np.int64)
    k = len(labels)
    if m.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {m.shape} does not fit {k} labels")
    if len(set(labels)) != k:
        raise ValueError("class labels must be unique")
    tp = np.diag(m)
    support = m.sum(axis=1)
    predicted = m.sum(axis=0)
    out: dict[str, dict[str, Any]] = {}
    for i, label in enumerate(labels):
        fp = int(predicted[i] - tp[i])
        fn = int(support[i] - tp[i])
        out[str(label)] = {
            "precision": _ratio(int(tp[i]), int(predicted[i])),
            "recall": _ratio(int(tp[i]), int(support[i])),
            "f1": _ratio(2 * int(tp[i]), 2 * int(tp[i]) + fp + fn),
            "support": int(support[i]),
        }
    return out


def class_report(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Return ``{"per_class": {...}, "confusion_matrix": [[...]]}`` (JSON-ready) for class indices."""
    cm = confusion_matrix(y_true, y_pred, len(labels))
    return {"per_class": per_class_metrics(cm, labels), "confusion_matrix": cm.tolist()}


@dataclass(frozen=True)
class ClassDrop:
    """How one class's recall moved from the float reference to the int8 model on the same samples."""

    label: str
    support: int
    float_recall: float | None
    recall: float | None
    lost_samples: int  # net: float-correct minus int8-correct samples of this class (negative: gained)
    drop_points: float  # 100 * lost_samples / support; 0.0 for a class with no samples

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form (report.json ``class_drop.worst``)."""
        return {
            "label": self.label,
            "support": self.support,
            "float_recall": self.float_recall,
            "recall": self.recall,
            "lost_samples": self.lost_samples,
            "drop_points": self.drop_points,
        }


def class_drops(float_cm: np.ndarray, cm: np.ndarray, labels: Sequence[str]) -> list[ClassDrop]:
    """Return every class's recall change, worst first (largest drop, then most samples lost, label order).

    Both matrices must come from the same evaluation samples (equal row sums).
    """
    f = np.asarray(float_cm, dtype=np.int64)
    q = np.asarray(cm, dtype=np.int64)
    k = len(labels)
    if f.shape != (k, k) or q.shape != (k, k):
        raise ValueError(f"confusion matrices of shapes {f.shape} and {q.shape} do not fit {k} labels")
    support = f.sum(axis=1)
    if not np.array_equal(support, q.sum(axis=1)):
        raise ValueError(
            "the two confusion matrices come from different evaluation samples (row sums differ)"
        )
    drops = []
    for i, label in enumerate(labels):
        s = int(support[i])
        lost = int(f[i, i] - q[i, i])
        drops.append(
            ClassDrop(
                label=str(label),
                support=s,
                float_recall=_ratio(int(f[i, i]), s),
                recall=_ratio(int(q[i, i]), s),
                lost_samples=lost,
                drop_points=100.0 * lost / s if s else 0.0,
            )
        )
    order = sorted(range(k), key=lambda i: (-drops[i].drop_points, -drops[i].lost_samples, i))
    return [drops[i] for i in order]


def failing_classes(
    drops: Sequence[ClassDrop], max_points: float, min_lost: int = MIN_LOST_SAMPLES
) -> list[ClassDrop]:
    """Return the classes whose recall dropped more than ``max_points`` points by ``min_lost``+ samples."""
    return [d for d in drops if d.drop_points > max_points + 1e-9 and d.lost_samples >= min_lost]


def low_support(per_class: Mapping[str, Mapping[str, Any]], below: int = LOW_SUPPORT_SAMPLES) -> list[str]:
    """Return the labels with fewer than ``below`` evaluation samples (their recall is coarse)."""
    return [label for label, m in per_class.items() if int(m["support"]) < below]


def describe_drop(d: ClassDrop, runtime: str | None = None) -> str:
    """Return ``class 'x' recall 95.00% (float) -> 40.00% (int8, rt): 55.00 points, 11 of 20 samples``."""
    where = f"int8, {runtime}" if runtime else "int8"
    fr = "-" if d.float_recall is None else f"{100 * d.float_recall:.2f}%"
    r = "-" if d.recall is None else f"{100 * d.recall:.2f}%"
    return (
        f"class {d.label!r} recall {fr} (float) -> {r} ({where}): {d.drop_points:.2f} points,"
        f" {d.lost_samples} of {d.support} samples"
    )


def _worst_key(d: ClassDrop) -> tuple[float, int]:
    return (d.drop_points, d.lost_samples)


def target_class_evaluation(
    y_true: np.ndarray,
    float_pred: np.ndarray,
    preds: Mapping[str, np.ndarray],
    preferred: str,
    labels: Sequence[str],
    max_points: float,
    min_lost: int = MIN_LOST_SAMPLES,
    tries: Callable[[str], str] | None = None,
) -> tuple[dict[str, Any], str | None]:
    """Return one target's per-class report fields and the gate's failure text (None when it passes).

    ``float_pred`` and each ``preds[runtime]`` are class indices (n,) on the evaluation samples
    ``y_true``. ``per_class``/``confusion_matrix`` describe the ``preferred`` runtime (the one
    ``accuracy`` describes); the gate checks every runtime, since a device may run any of them.
    Fields: ``float_per_class``, ``float_confusion_matrix``, ``per_class``, ``confusion_matrix``,
    ``class_drop`` (``max_points``, ``min_lost_samples``, ``worst`` with its ``runtime``,
    ``per_runtime`` worst class, ``failing`` labels, ``low_support_samples`` and the ``low_support``
    labels with fewer evaluation samples).
    """
    if not preds or preferred not in preds:
        raise ValueError(f"no predictions for the preferred runtime {preferred!r}")
    k = len(labels)
    float_cm = confusion_matrix(y_true, float_pred, k)
    fields: dict[str, Any] = {
        "float_per_class": per_class_metrics(float_cm, labels),
        "float_confusion_matrix": float_cm.tolist(),
    }
    worst: tuple[str, ClassDrop] | None = None
    failing: dict[str, tuple[str, ClassDrop]] = {}
    per_runtime: dict[str, Any] = {}
    for rt, pred in preds.items():
        cm = confusion_matrix(y_true, pred, k)
        if rt == preferred:
            fields["per_class"] = per_class_metrics(cm, labels)
            fields["confusion_matrix"] = cm.tolist()
        drops = class_drops(float_cm, cm, labels)
        per_runtime[rt] = drops[0].to_dict()
        if worst is None or _worst_key(drops[0]) > _worst_key(worst[1]):
            worst = (rt, drops[0])
        for d in failing_classes(drops, max_points, min_lost):
            if d.label not in failing or _worst_key(d) > _worst_key(failing[d.label][1]):
                failing[d.label] = (rt, d)
    assert worst is not None
    ranked = sorted(failing.values(), key=lambda v: _worst_key(v[1]), reverse=True)
    fields["class_drop"] = {
        "max_points": float(max_points),
        "min_lost_samples": int(min_lost),
        "worst": dict(worst[1].to_dict(), runtime=worst[0]),
        "per_runtime": per_runtime,
        "failing": [d.label for _, d in ranked],
        "low_support_samples": LOW_SUPPORT_SAMPLES,
        "low_support": low_support(fields["float_per_class"]),
    }
    if not ranked:
        return fields, None
    rt, d = ranked[0]
    more = f" (and {len(ranked) - 1} more class{'es' if len(ranked) > 2 else ''})" if len(ranked) > 1 else ""
    message = f"{describe_drop(d, rt)}{more}, over the {max_points:g}-point limit of --max-class-drop; " + (
        tries(d.label)
        if tries is not None
        else f"try --quantize qat or more samples of class {d.label!r} in --data"
    )
    return fields, message
