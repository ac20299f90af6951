"""`edgefleet evaluate` measures through the device's path: the agent, batch 1, the bundle's runtimes.

Real bundle, data unlike the digits: tabular columns from 0.001 to 4000, two unbalanced classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from toolchain.steps.data import Dataset

SCALES = np.logspace(-3, np.log10(4000.0), 6)


def _tabular(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(np.int64)  # 80/20
    means = np.array([[0.0] * 6, [1.2, -1.0, 0.8, -0.6, 1.0, -1.2]])
    x = (means[y] + rng.normal(0.0, 0.6, size=(n, 6)) + 4.0) * SCALES
    return Dataset(x.astype(np.float32), y, None, ["ok", "fault"])


def _agent_batch_1(bundle: Path, runtime: str, x: np.ndarray) -> np.ndarray:
    from device_agent.agent import Agent

    agent = Agent(bundle, allow_unsigned=True, runtime=runtime)
    return np.array([int(np.argmax(agent.predict(x[i]).outputs[0])) for i in range(len(x))])


@pytest.mark.slow
def test_evaluate_reports_the_agents_batch_1_accuracy_per_runtime(tmp_path: Path) -> None:
    from toolchain.build import build_bundles
    from toolchain.steps.architectures import build_architecture
    from toolchain.steps.evaluate import evaluate_bundle
    from toolchain.steps.models import save_model
    from toolchain.steps.train import deterministic
    from toolchain.tfenv import import_keras

    keras = import_keras()
    train, test = _tabular(400, seed=1), _tabular(150, seed=2)
    with deterministic(0):
        model = build_architecture("mlp", train.x, 2, seed=0)
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
        model.fit(train.x, train.y, epochs=4, batch_size=16, verbose=0, shuffle=False)
    path = save_model(model, tmp_path / "tab.keras")
    report = build_bundles(path, train, ["x86"], tmp_path / "out", eval_data=test, progress=False)
    bundle = tmp_path / "out" / "x86"
    built = report["targets"]["x86"]

    res = evaluate_bundle(bundle, test, repeats=5, progress=False)
    json.dumps(res)  # --json prints it
    # keys the command has always printed stay
    for key in ("accuracy", "build_accuracy", "latency_ms_p50", "latency_ms_p95", "per_runtime", "per_class"):
        assert key in res
    assert set(res["per_runtime"]) == set(built["runtimes"]) and res["per_runtime"]
    for rt, v in res["per_runtime"].items():
        pred = _agent_batch_1(bundle, rt, test.x)
        assert v["paths"]["batch_1"]["accuracy"] == pytest.approx(float(np.mean(pred == test.y)))
        assert v["accuracy"] == min(p["accuracy"] for p in v["paths"].values())
        # the build measured the same path on the same data
        assert v["accuracy"] == pytest.approx(built["per_runtime"][rt]["accuracy"])
        assert v["latency_ms_p50"] > 0 and v["latency_runs"] == len(test.x) and v["threads"] >= 1
        assert set(v["latency"]) == {"threads_1", "threads_N"}
        # the per-class figures are the batch-1 path's: recall of 'fault' from the agent's predictions
        fault = test.y == 1
        assert v["per_class"]["fault"]["recall"] == pytest.approx(float(np.mean(pred[fault] == 1)))
    if "openvino" in res["per_runtime"]:
        assert res["per_runtime"]["openvino"]["precision"] == "f32"
    assert res["accuracy"] == res["per_runtime"][res["preferred_runtime"]]["accuracy"]
