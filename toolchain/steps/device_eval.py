"""Measure a bundle on labelled data the way the device runs it: ``device_agent.Agent``, batch 1 first.

``edgefleet evaluate`` and the build's parity check (``toolchain.steps.parity``) share this path:
the agent loads the bundle with its own settings (threads from the manifest capped by the cores
here, the manifest's pinned precision such as OpenVINO's f32), and the data goes through
``Agent.predict`` one sample at a time (the daemon's path) and in batches of
``device_agent.cli.PREDICT_BATCH`` (``edgefleet-agent predict``). A runtime's ``accuracy`` is that of
its worse path, as in the build's report, so the two numbers can be compared directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.steps.latency import latency_figures


def evaluate_on_agent(
    bundle_dir: Path,
    runtime: str,
    x: np.ndarray,
    y: np.ndarray | None,
    batch_sizes: Sequence[int] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Run raw inputs ``x`` (n, *sample_shape) float through the agent in ``runtime`` at each batch size.

    Returns (figures, scores (n, K) of the batch-1 path). Figures: ``accuracy`` (worst path; None
    without labels), ``paths`` (``batch_<b>``: ``accuracy``), ``latency_ms_p50``/``latency_ms_p95``
    and ``latency_runs`` of one ``Agent.predict`` call on one sample, ``threads`` and ``precision`` as
    the runtime reports them, ``batch_sizes``.
    """
    from toolchain.steps.parity import agent_batch_sizes, run_on_agent
    from toolchain.steps.per_class import accuracy

    sizes = tuple(batch_sizes or agent_batch_sizes())
    if 1 not in sizes:
        sizes = (1, *sizes)
    x = np.ascontiguousarray(x, dtype=np.float32)
    figures: dict[str, Any] = {"paths": {}, "batch_sizes": list(sizes)}
    one: np.ndarray | None = None
    for b in sizes:
        scores, times, settings = run_on_agent(bundle_dir, runtime, x, b)
        figures.update(settings)
        figures["paths"][f"batch_{b}"] = {"accuracy": accuracy(scores, y) if y is not None else None}
        if times is not None:
            figures.update(latency_figures(times))
        if b == 1:
            one = scores
    assert one is not None
    accs = [p["accuracy"] for p in figures["paths"].values() if p["accuracy"] is not None]
    figures["accuracy"] = min(accs) if accs else None
    return figures, one
