"""--task regression end to end: train, build (real conversions), the real agent, the report, drift.

Data made here, unlike the digits: tabular columns in units from 0.001 to 4000 with two targets of
very different scales, and 16x16x1 images in [0, 1] whose target is a blob's brightness and column.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.formats.manifest import manifest_sha256
from device_agent.formats.telemetry import ModelRef
from device_agent.inference import InputError
from toolchain.steps.models import load_model
from toolchain.steps.regbuild import build_regression_bundles
from toolchain.steps.regression import RegressionData, error_metrics, train_regression

pytestmark = pytest.mark.slow

EPOCHS = 40
# Statistics windows of the drift test: PSI and JS over 20 bins have a sampling floor that falls
# with the window and baseline sizes; 1,500 predictions against a 3,000-sample baseline keep clean
# windows well below the 0.1 warn bands (250 against 1,000 would not).
WINDOW = 1500


def tabular(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Four columns in units 0.001..4000; targets: a remaining life in hundreds..thousands, a dose
    around 0.1..1 (``shift`` moves the third column by that many of its ranges)."""
    rng = np.random.default_rng(seed)
    x = np.stack(
        [
            rng.uniform(0.001, 0.01, n),
            rng.uniform(0.0, 1.0, n),
            rng.uniform(10.0, 60.0, n) + shift * 50.0,
            rng.uniform(500.0, 4000.0, n),
        ],
        axis=1,
    ).astype(np.float32)
    rul = 2000 * x[:, 1] + 30 * x[:, 2] + 0.2 * x[:, 3] + rng.normal(0, 60, n)
    dose = 60 * x[:, 0] + 0.5 * x[:, 1] ** 2 + rng.normal(0, 0.02, n)
    return x, np.stack([rul, dose], axis=1)


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """16x16x1 images in [0, 1] with one Gaussian blob; targets: its brightness and its column."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16]
    bright = rng.uniform(0.2, 1.0, n)
    col = rng.uniform(3.0, 12.0, n)
    row = rng.uniform(3.0, 12.0, n)
    img = bright[:, None, None] * np.exp(
        -((xx[None] - col[:, None, None]) ** 2 + (yy[None] - row[:, None, None]) ** 2) / 4.0
    )
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    return img[..., None].astype(np.float32), np.stack([bright, col], axis=1)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


@pytest.fixture(scope="module")
def tab(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("regression")
    x, y = tabular(1000, 0)
    names = ["rul_h", "dose_mg"]
    np.savez(d / "train.npz", x=x, y=y, target_names=np.array(names))
    xt, yt = tabular(300, 1)
    # calibration (and baseline) data: more than training, so the baseline's own sampling noise
    # stays well below the drift bands (a 1,000-sample baseline puts clean 600-sample windows near
    # JS 0.1 on its own)
    xc, yc = tabular(3000, 2)
    np.savez(d / "calib.npz", x=xc, y=yc, target_names=np.array(names))
    np.savez(d / "test.npz", x=xt, y=yt, target_names=np.array(names))
    res = train_regression(
        RegressionData(x, y, names, ["a", "b", "c", "d"], "train"),
        "mlp",
        EPOCHS,
        d / "m.keras",
        progress=False,
    )
    report = build_regression_bundles(
        d / "m.keras", d / "calib.npz", ["mobile", "x86"], d / "out", eval_data=d / "test.npz", progress=False
    )
    return {"dir": d, "train": res, "report": report, "x_test": xt, "y_test": yt, "names": names}


def test_tabular_bundles_return_values_in_the_users_units(tab: dict) -> None:
    report, names = tab["report"], tab["names"]
    assert report["task"] == "regression" and report["labels"] == names
    float_pred = load_model(tab["dir"] / "m.keras").predict(tab["x_test"])
    reg = json.loads((tab["dir"] / "m.keras.edgefleet.json").read_text())["regression"]
    float_pred = float_pred * np.asarray(reg["std"]) + np.asarray(reg["mean"])
    float_err = error_metrics(tab["y_test"], float_pred, names)
    for target in ("mobile", "x86"):
        entry = report["targets"][target]
        assert entry["status"] == "ok", entry["error"]
        for j, n in enumerate(names):
            m = entry["per_target"][n]
            assert set(m) >= {"mae", "rmse", "r2", "float_mae", "float_rmse", "float_r2", "output_step"}
            assert m["float_mae"] == pytest.approx(float_err[n]["mae"], rel=1e-4)
            assert m["mae"] <= m["float_mae"] * 1.05 + 1e-12  # the default budget held
            assert m["r2"] > 0.95
            # the int8 step, in the target's units, is small against the error
            assert 0 < m["output_step"] < m["float_mae"]
            lo, hi = m["output_range"]  # what the int8 output can say, in the target's units
            assert lo < np.median(tab["y_test"][:, j]) < hi
            assert hi - lo > 0.8 * (m["label_range"][1] - m["label_range"][0])
        man = json.loads((tab["dir"] / "out" / target / "manifest.json").read_text())
        assert man["task"]["type"] == "regression" and len(man["task"]["scale"]) == 2
        agent = Agent(tab["dir"] / "out" / target, allow_unsigned=True)
        got = np.stack([agent.predict(tab["x_test"][i : i + 1]).outputs[0] for i in range(100)])
        # in the user's units (the rul in thousands, the dose below 1: no shared scale could do both)
        # and close to the float model's: the int8 deviation is small against the model's own error
        dev = np.abs(got - float_pred[:100]).mean(axis=0)
        fmae = np.array([float_err[n]["mae"] for n in names])
        assert np.all(dev < 0.25 * fmae), (dev, fmae)
        np.testing.assert_allclose(got.mean(axis=0), tab["y_test"][:100].mean(axis=0), rtol=0.05)
        batch = agent.predict(tab["x_test"][:64]).outputs
        np.testing.assert_allclose(batch, got[:64], rtol=1e-5, atol=1e-5 * np.abs(got).max())


def test_agent_cli_predict_and_evaluate_speak_values(tab: dict) -> None:
    bundle = tab["dir"] / "out" / "x86"
    run = subprocess.run(
        [sys.executable, "-m", "device_agent.cli", "predict", "--bundle", str(bundle), "--input",
         str(tab["dir"] / "test.npz"), "--label", "y", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert set(doc["predictions"][0]["values"]) == set(tab["names"])
    x86 = tab["report"]["targets"]["x86"]["per_target"]
    for n in tab["names"]:
        assert doc["mae"][n] == pytest.approx(x86[n]["mae"], rel=1e-3)


def test_agent_http_api_returns_values(tab: dict) -> None:
    from device_agent.api import ApiServer
    from tests.device_agent.agent_helpers import http

    srv = ApiServer(Agent(tab["dir"] / "out" / "x86", allow_unsigned=True), "127.0.0.1:0")
    srv.start()
    try:
        code, out = http("http://" + srv.address, "/v1/predict", {"inputs": tab["x_test"][:3].tolist()})
    finally:
        srv.shutdown()
    assert code == 200 and len(out["values"]) == 3
    want = srv.agent.predict(tab["x_test"][:3]).outputs
    for row, w in zip(out["values"], want, strict=True):
        assert list(row) == tab["names"]
        np.testing.assert_allclose([row[n] for n in tab["names"]], w, rtol=1e-6)


def test_error_budget_verdict() -> None:
    from toolchain.steps.regbuild import _verdict

    floats = {"a": {"mae": 10.0}, "b": {"mae": 0.01}}
    assert _verdict({"a": {"mae": 10.5}, "b": {"mae": 0.0099}}, floats, 5.0) == []
    over = _verdict({"a": {"mae": 10.51}, "b": {"mae": 0.02}}, floats, 5.0)
    assert len(over) == 2 and over[0].startswith("a: MAE 10.51 is 5.1% above float 10")
    assert "100.0% above" in over[1]


def test_bad_input_gets_one_line(tab: dict, tmp_path: Path) -> None:
    d = tab["dir"]
    agent = Agent(d / "out" / "mobile", allow_unsigned=True)
    bad = tab["x_test"][:1].copy()
    bad[0, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        agent.predict(bad)
    csv_path = tmp_path / "float.csv"
    csv_path.write_text("a,b,t\n1,2,0.25\n3,4,1.5\n")
    cmd = [sys.executable, "-c", "from toolchain.cli import main; main()"]
    run = subprocess.run(
        [*cmd, "train", "--data", str(csv_path), "--label", "t", "--arch", "mlp", "--out", str(tmp_path / "m.keras")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1 and "--task regression" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    x, y = tabular(50, 3)
    np.savez(tmp_path / "one.npz", x=x, y=y[:, :1])
    run = subprocess.run(
        [*cmd, "build", str(d / "m.keras"), "--data", str(tmp_path / "one.npz"), "--task", "regression",
         "--target", "x86", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1 and "1 target(s); the model predicts 2" in run.stderr, run.stderr
    assert not (tmp_path / "out" / "x86").exists()


def test_prediction_drift_through_the_collector(tab: dict, sqlite_url: str) -> None:
    from toolchain.fleet.ingest import Incoming, Ingestor
    from toolchain.fleet.queries import drift_table
    from toolchain.fleet.registry import BaselineCache, register_bundle
    from toolchain.fleet.sim import stats_payload
    from toolchain.fleet.storage import open_store

    bundle = tab["dir"] / "out" / "x86"
    info = register_bundle(sqlite_url, bundle)
    assert info["model_sha256"] == manifest_sha256(bundle)
    closed: list = []
    agent = Agent(bundle, allow_unsigned=True, window_max_samples=WINDOW, on_window=closed.append)
    clean_x, _ = tabular(3 * WINDOW, 7)
    shifted_x, _ = tabular(
        3 * WINDOW, 8, shift=0.6
    )  # the temperature column runs hot: the life estimate drops
    for x in (clean_x, shifted_x):
        for i in range(x.shape[0]):
            agent.predict(x[i : i + 1])
    assert len(closed) == 6 and all(w.profile.values is not None for w in closed)
    ref = ModelRef(agent.model.ref.name, agent.model.ref.version, info["model_sha256"])
    msgs = [stats_payload("clean-1" if s < 3 else "hot-1", s, ref, w.profile) for s, w in enumerate(closed)]
    from toolchain.fleet.alerts import Evaluator

    states: dict[str, list] = {"clean-1": [], "hot-1": []}
    with open_store(sqlite_url) as s:
        cache = BaselineCache(s)
        ingest, evaluator = Ingestor(s, cache), Evaluator(s, cache)
        for i, (topic, payload) in enumerate(msgs):  # one window at a time, evaluated as it lands
            ingest.process([Incoming(topic, payload, i, 1, 0, 0.0)])
            for (_, dev), ev in evaluator.evaluate_many([("lab", "clean-1"), ("lab", "hot-1")]).items():
                states[dev].append(ev)
    assert [e.verdict for e in states["clean-1"]] == ["ok"] * 3
    assert all(e.alert is None for e in states["clean-1"])
    hot_states = [e.state for e in states["hot-1"]]
    assert hot_states[-1] == "alert" and any(e.alert is not None for e in states["hot-1"]), hot_states
    rows = {r["device_id"]: r for r in drift_table(sqlite_url, since="all") if r["scope"] == "device"}
    assert rows["clean-1"]["count"] == 3 * WINDOW and rows["hot-1"]["count"] == 3 * WINDOW
    assert rows["clean-1"]["state"] == "ok", rows["clean-1"]["reasons"]
    assert rows["clean-1"]["prediction"]["max_psi"] < 0.1
    hot = rows["hot-1"]
    assert hot["state"] == "alert" and hot["output_state"] == "alert", hot["reasons"]
    assert hot["class_psi"] is None
    assert hot["prediction"]["names"] == tab["names"]
    assert hot["prediction"]["mean_shift"][0] > 0.5  # rul rises with the hotter column
    assert any("prediction PSI" in r for r in hot["reasons"])
    # the terminal table and the fleet report show it as prediction drift
    from click.testing import CliRunner

    from toolchain.cli.fleet.views import drift_cmd
    from toolchain.fleet.report import build_report

    table = CliRunner().invoke(drift_cmd, ["--db", sqlite_url, "--since", "all", "--recompute"])
    assert table.exit_code == 0, table.output
    hot_line = next(line for line in table.output.splitlines() if "hot-1" in line)
    assert "pred" in hot_line and "alert" in hot_line
    page = build_report(sqlite_url, since="all")
    assert "(prediction)" in page and "hot-1: prediction rul_h" in page  # the drift table and histogram


def test_image_regression_with_the_cnn(tmp_path: Path) -> None:
    x, y = blobs(900, 0)
    xt, yt = blobs(200, 1)
    names = ["brightness", "column"]
    np.savez(tmp_path / "train.npz", x=x, y=y, target_names=np.array(names))
    np.savez(tmp_path / "test.npz", x=xt, y=yt, target_names=np.array(names))
    res = train_regression(
        RegressionData(x, y, names, None, "blobs"), "cnn", 25, tmp_path / "c.keras", progress=False
    )
    assert res.val_metrics["column"]["r2"] > 0.8, res.val_metrics
    report = build_regression_bundles(
        tmp_path / "c.keras", tmp_path / "train.npz", ["raspberry-pi", "coral"], tmp_path / "out",
        eval_data=tmp_path / "test.npz", progress=False,
    )  # fmt: skip
    for target, dtype in (("raspberry-pi", "int8"), ("coral", "uint8")):
        entry = report["targets"][target]
        assert entry["status"] == "ok", entry["error"]
        assert entry["outputs"][0]["dtype"] == dtype
        for n in names:
            m = entry["per_target"][n]
            assert m["r2"] > 0.8 and m["mae"] <= m["float_mae"] * 1.05 + 1e-12, m
    edgetpu = json.loads((tmp_path / "out" / "coral" / "manifest.json").read_text())["edgetpu"]
    assert edgetpu["ops_total"] > 0 and edgetpu["ops_mapped"] <= edgetpu["ops_total"]


def test_the_agents_value_hook_per_task(tab: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a window profiles per sample comes from ``windows.VALUE_FUNCTIONS`` for the bundle's task
    (the anomaly task registers its score there); without an entry, the outputs themselves."""
    from device_agent import windows

    x = tab["x_test"][:20]
    for hook, factor in ((None, 1.0), (lambda out: out * 2.0, 2.0)):
        if hook is None:
            monkeypatch.delitem(windows.VALUE_FUNCTIONS, "regression", raising=False)
        else:
            monkeypatch.setitem(windows.VALUE_FUNCTIONS, "regression", hook)
        closed: list = []
        agent = Agent(
            tab["dir"] / "out" / "mobile", allow_unsigned=True, window_max_samples=20, on_window=closed.append
        )
        outs = np.stack([agent.predict(x[i : i + 1]).outputs[0] for i in range(20)])
        assert len(closed) == 1 and closed[0].count == 20
        np.testing.assert_allclose(closed[0].profile.values.mean, factor * outs.mean(axis=0), rtol=1e-5)
