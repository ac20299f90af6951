"""Check every runtime a bundle lists the way the device runs it: through ``device_agent.Agent``.

The build's other checks run a converted model file in each runtime on the whole evaluation set at
once. A device does not: the daemon predicts one sample at a time, and ``edgefleet-agent predict``
sends batches of ``device_agent.agent.PREDICT_BATCH``. Runtimes can differ between those paths
(OpenVINO 2026.4 computed an int8 MobileNetV2 wrongly at batch 1 with a dynamic batch axis, and
right on whole batches). So the build assembles the bundle in a scratch folder, loads it in the
agent once per runtime, with the agent's own settings (thread count from the manifest capped by the
cores here, the manifest's pinned precision, the native single-sample path where the agent takes
it), and runs the evaluation data through ``Agent.predict`` one sample at a time and in batches of
``PREDICT_BATCH``.

Per runtime it records accuracy and top-1 agreement with the float model on each path, and the
latency of ``Agent.predict`` for one sample (what a caller of the daemon waits for, the agent's
input checks and statistics included). A runtime is left out of the bundle when, on its worse path,

* its accuracy drops more than the target's accuracy budget (``max_accuracy_drop``) below the float
  model's (not applied under ``--allow-accuracy-drop``, which ships a model over budget knowingly),
* or its accuracy or its top-1 agreement with the float model is more than that budget below the
  best runtime's (a runtime that disagrees with its peers on the same model file is at fault, not
  the quantization; applied always).

With no runtime left the target fails with one line. See docs/conversion.md ("What verified means").
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.steps.latency import latency_figures

log = logging.getLogger(__name__)

# Single samples timed before the recorded ones (first calls allocate and warm caches).
PARITY_WARMUP = 5


class ParityError(ToolchainError):
    """No runtime a target lists runs its bundle within the budget the way the device runs it."""


@dataclass
class ParityResult:
    """What ``check_parity`` found: per-runtime figures, the runtimes kept (in the given order)
    and the reason for each runtime left out."""

    per_runtime: dict[str, dict[str, Any]]
    kept: list[str]
    excluded: dict[str, str] = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = ()
    # top-1 class per sample, one sample at a time through the agent (the daemon's path)
    batch_1_classes: dict[str, np.ndarray] = field(default_factory=dict)


def agent_batch_sizes() -> tuple[int, ...]:
    """The batch sizes the agent's paths use: 1 (the daemon, one sample per request) and
    ``edgefleet-agent predict``'s batch."""
    from device_agent.agent import PREDICT_BATCH

    return (1, int(PREDICT_BATCH))


def run_on_agent(
    bundle_dir: Path, runtime: str, x: np.ndarray, batch: int, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Run raw float inputs ``x`` (n, *sample_shape) through ``Agent.predict`` in chunks of ``batch``.

    Returns (scores (n, K), per-call latency in ms for batch 1 else None, the agent's settings:
    ``threads`` and ``precision`` as the runtime reports them).
    """
    from device_agent.agent import Agent

    agent = Agent(bundle_dir, allow_unsigned=True, runtime=runtime, threads=threads)
    pred = agent.model.predictor
    settings = {
        "threads": int(pred.threads),
        # OpenVINO reports what it computes in; the others compute in the model's own types.
        "precision": getattr(pred.model, "precision", None),
    }
    n = len(x)
    if batch == 1:
        for i in range(min(PARITY_WARMUP, n)):
            agent.predict(x[i])
        times = np.empty(n, dtype=np.float64)
        rows = []
        for i in range(n):
            sample = x[i]
            t0 = time.perf_counter_ns()
            rows.append(agent.predict(sample).outputs)
            times[i] = (time.perf_counter_ns() - t0) / 1e6
        return np.concatenate(rows, axis=0), times, settings
    chunks = [agent.predict(x[i : i + batch]).outputs for i in range(0, n, batch)]
    return np.concatenate(chunks, axis=0), None, settings


def check_parity(
    bundle_dir: Path,
    runtimes: Sequence[str],
    x: np.ndarray,
    y: np.ndarray,
    float_scores: np.ndarray,
    *,
    float_accuracy: float,
    max_accuracy_drop: float,
    apply_budget: bool = True,
    batch_sizes: Sequence[int] | None = None,
    tries: str = "try --quantize qat",
) -> ParityResult:
    """Run a bundle in each runtime through the agent at its batch sizes; decide which to keep.

    ``x`` holds raw float inputs as the device receives them (the manifest's preprocessing is the
    agent's job), ``y`` their labels, ``float_scores`` the float model's scores on them (n, K).
    Raises ParityError (one line) when no runtime is left; ``tries`` is what that line tells the user to
    try when every runtime missed the accuracy budget (``toolchain.steps.context.accuracy_tries``).
    """
    from toolchain.steps.per_class import accuracy
    from toolchain.steps.verify import top1_agreement

    sizes = tuple(batch_sizes or agent_batch_sizes())
    x = np.ascontiguousarray(x, dtype=np.float32)
    ref = np.asarray(float_scores, dtype=np.float32).reshape(len(float_scores), -1)
    per: dict[str, dict[str, Any]] = {}
    classes: dict[str, np.ndarray] = {}
    for rt in runtimes:
        paths: dict[str, dict[str, float]] = {}
        entry: dict[str, Any] = {"paths": paths}
        one: np.ndarray | None = None
        for b in sizes:
            try:
                scores, times, settings = run_on_agent(bundle_dir, rt, x, b)
            except Exception as e:  # a runtime that cannot run the bundle at all is left out
                entry["error"] = f"the agent cannot run it at batch {b}: {_line(e)}"
                break
            entry.update(settings)
            paths[f"batch_{b}"] = {
                "accuracy": accuracy(scores, y),
                "top1_agreement": top1_agreement(scores, ref),
            }
            if times is not None:
                entry.update(latency_figures(times))
            if b == 1:
                one = scores
                classes[rt] = np.argmax(scores.reshape(len(scores), -1), axis=1)
            elif one is not None:
                # the same inputs alone and in a batch: what a caller would see change
                diff = float(np.max(np.abs(scores - one))) if len(one) else 0.0
                entry[f"max_abs_diff_batch_{b}_vs_1"] = diff
        if paths:
            entry["accuracy"] = min(p["accuracy"] for p in paths.values())
            entry["top1_agreement"] = min(p["top1_agreement"] for p in paths.values())
        per[rt] = entry
    excluded = _decide(per, sizes, float_accuracy, max_accuracy_drop, apply_budget)
    for rt, entry in per.items():
        entry["parity"] = "excluded" if rt in excluded else "ok"
        if rt in excluded:
            entry["excluded_reason"] = excluded[rt]
    kept = [rt for rt in runtimes if rt not in excluded]
    if not kept:
        reasons = "; ".join(f"{rt}: {why}" for rt, why in excluded.items())
        hint = (
            f" ({tries}, or pass --allow-accuracy-drop to ship it anyway)"
            if apply_budget and all("below float" in why for why in excluded.values())
            else ""
        )
        raise ParityError(
            f"no runtime runs the bundle within budget the way the device does: {reasons}{hint}"
        )
    return ParityResult(per, kept, excluded, sizes, classes)


def _decide(
    per: Mapping[str, Mapping[str, Any]],
    sizes: Sequence[int],
    float_accuracy: float,
    budget: float,
    apply_budget: bool,
) -> dict[str, str]:
    """Return {runtime: reason} for the runtimes to leave out (rules in the module docstring)."""
    out: dict[str, str] = {}
    ran = {rt: e for rt, e in per.items() if "error" not in e}
    for rt, e in per.items():
        if "error" in e:
            out[rt] = str(e["error"])
    if not ran:
        return out
    best_acc = max(e["accuracy"] for e in ran.values())
    best_agree = max(e["top1_agreement"] for e in ran.values())
    eps = 1e-9
    for rt, e in ran.items():
        worst = min(e["paths"].items(), key=lambda kv: kv[1]["accuracy"])
        where = worst[0].replace("_", " ")
        if apply_budget and e["accuracy"] + eps < float_accuracy - budget:
            out[rt] = (
                f"accuracy {e['accuracy']:.4f} at {where} is {100 * (float_accuracy - e['accuracy']):.2f}"
                f" points below float {float_accuracy:.4f}; the budget is {100 * budget:.2f} points"
            )
        elif e["accuracy"] + eps < best_acc - budget:
            out[rt] = (
                f"accuracy {e['accuracy']:.4f} at {where} is {100 * (best_acc - e['accuracy']):.2f} points"
                f" below the best runtime's {best_acc:.4f} on the same model; the budget is"
                f" {100 * budget:.2f} points"
            )
        elif e["top1_agreement"] + eps < best_agree - budget:
            worst_a = min(e["paths"].items(), key=lambda kv: kv[1]["top1_agreement"])[0].replace("_", " ")
            out[rt] = (
                f"top-1 agreement with the float model {e['top1_agreement']:.4f} at {worst_a} is"
                f" {100 * (best_agree - e['top1_agreement']):.2f} points below the best runtime's"
                f" {best_agree:.4f}; the budget is {100 * budget:.2f} points"
            )
    return out


def scratch_bundle(staging: Path) -> None:
    """Remove a scratch bundle folder made for the parity check."""
    shutil.rmtree(staging, ignore_errors=True)


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
