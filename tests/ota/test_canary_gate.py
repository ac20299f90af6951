"""``edgefleet fleet deploy --canary N --gate ...``: a canary gated by model metrics, end to end.

Real Mosquitto, the real collector (SQLite; one case on PostgreSQL), real agents serving a real ONNX
bundle. Windows are driven explicitly: each agent closes a window every ``WIN`` predictions (never on
time), and the test sends whole windows before the rollout and to the canary once it runs the new
model, so the gate's numbers do not depend on timing.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tests.fabricate import fit_softmax, flat_onnx_bundle, onnx_dense
from tests.helpers import EDGEFLEET
from tests.ota.agent_proc import Agent, start_fleet_agents, wait_for
from toolchain.cli import main
from toolchain.fleet.storage import open_store
from toolchain.shipping.gate import Measure, decide, judge_device

WIN = 100  # predictions per window (the agents' window_max_samples)
K = 3  # --gate-windows: 300 predictions, above the drift settings' min_count of 200


# --------------------------------------------------------------------------------------------------
# The decision alone


def m(value: float | None, state: str | None = None, windows: int = K, labelled: int = 0) -> Measure:
    return Measure("sha", 1, windows, windows * WIN, value, state, labelled)


def test_drift_gate_rules() -> None:
    assert judge_device("drift", K, m(0.5, "alert"), m(0.9, "warn"))[0]  # the alert cleared
    assert judge_device("drift", K, m(0.01, "ok"), m(0.09, "ok"))[0]  # ok on both sides
    assert judge_device("drift", K, m(0.30, "alert"), m(0.25, "alert"))[0]  # still alert, score fell
    ok, why = judge_device("drift", K, m(0.30, "alert"), m(0.30, "alert"))  # no better: not promoted
    assert not ok and "the alert did not clear and the drift score did not fall" in why
    ok, why = judge_device("drift", K, m(0.30, "alert"), m(0.40, "alert"))
    assert not ok and "0.300 -> 0.400" in why
    ok, why = judge_device("drift", K, m(0.05, "ok"), m(0.04, "alert"))
    assert not ok and "ok -> alert" in why
    ok, why = judge_device("drift", K, m(0.05, "ok"), m(0.0, "insufficient"))
    assert not ok and "too few" in why


def test_confidence_and_accuracy_gate_rules() -> None:
    assert judge_device("confidence", K, m(0.90), m(0.885))[0]
    ok, why = judge_device("confidence", K, m(0.90), m(0.85))
    assert not ok and "0.900 -> 0.850" in why
    assert judge_device("accuracy", K, m(0.80, labelled=50), m(0.79, labelled=40))[0]
    assert not judge_device("accuracy", K, m(0.80, labelled=50), m(0.70, labelled=40))[0]
    ok, why = judge_device("accuracy", K, m(0.80, labelled=50), m(None, labelled=0))
    assert not ok and "no labelled" in why


def test_decision_over_canaries_and_timeout() -> None:
    both = {"a": (m(0.5, "alert"), m(0.01, "ok")), "b": (m(0.01, "ok"), m(0.02, "ok"))}
    assert decide("drift", K, both).outcome == "passed"
    one_bad = {**both, "b": (m(0.01, "ok"), m(0.5, "alert"))}
    d = decide("drift", K, one_bad)
    assert d.outcome == "failed" and not d.passed and "b: drift ok -> alert" in d.message
    short = {**both, "b": (m(0.01, "ok"), m(0.01, "ok", windows=1))}
    assert decide("drift", K, short, timed_out=True).outcome == "timeout"
    assert "1 of 3 window(s)" in decide("drift", K, short, timed_out=True).message
    assert decide("drift", K, {"a": (m(0.01, "ok"), None)}, timed_out=True).outcome == "timeout"
    doc = decide("drift", K, both).to_dict()
    assert doc["devices"][0]["before"]["value"] == 0.5 and json.dumps(doc)
    with pytest.raises(ValueError):
        judge_device("latency", K, m(0.1), m(0.1))


# --------------------------------------------------------------------------------------------------
# Real broker, collector and agents


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    open_store(url).close()
    return url


@pytest.fixture(scope="module")
def model(digits: dict[str, np.ndarray]) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray, bytes]:
    """(the ONNX model, training inputs (n, 64), held-out inputs (n, 64), their labels, a model that
    answers the next class: ``(true + 1) % 10`` where the first is right, so nearly always wrong)."""
    x = digits["x"].reshape(len(digits["x"]), -1).astype(np.float32)
    w, b = fit_softmax(x, digits["y"])
    xt = digits["x_test"].reshape(len(digits["x_test"]), -1).astype(np.float32)
    shift = np.roll(np.arange(w.shape[1]), 1)  # output j takes the logits of class j - 1
    wrong = onnx_dense(w[:, shift], b[shift], ["n", w.shape[0]])
    return onnx_dense(w, b, ["n", w.shape[0]]), x, xt, np.asarray(digits["y_test"]), wrong


@pytest.fixture
def bundle_of(tmp_path: Path, model, ota_keys) -> Callable[..., Path]:
    """``make(version, scale, wrong=False)``: a signed bundle of the model (or the wrong one) whose
    baseline saw inputs * scale."""
    from toolchain.shipping.signing import sign_bundle

    def make(version: int, scale: float, wrong: bool = False) -> Path:
        out = tmp_path / "bundles" / f"v{version}-x{scale:g}{'-wrong' if wrong else ''}"
        flat_onnx_bundle(out, model[4] if wrong else model[0], model[1][:400] * scale, version=version)
        sign_bundle(out, ota_keys["key"])
        return out

    return make


class Fleet:
    def __init__(self, db: str, agents: dict[str, Agent], feed: np.ndarray, truth: np.ndarray) -> None:
        self.db, self.agents, self.feed, self.truth = db, agents, feed, truth

    def windows(self, device: str, version: int) -> int:
        with open_store(self.db, migrate=False) as s:
            return int(
                s.query(
                    "SELECT COUNT(*) FROM windows w JOIN baselines b ON b.model_sha256 = w.model_sha256"
                    " WHERE w.device_id = ? AND b.version = ? AND w.count > 0",
                    (device, version),
                )[0][0]
            )

    def send_windows(self, device: str, n: int, version: int) -> None:
        """Send ``n`` whole windows of the feed to a device and wait until the collector stored them."""
        start = self.windows(device, version)
        for i in range(n):
            rows = self.feed[(i * WIN) % len(self.feed) :][:WIN]
            assert len(rows) == WIN
            self.agents[device].predict(rows.tolist())
        wait_for(lambda: self.windows(device, version) >= start + n, 60, f"{n} windows of {device} stored")

    def send_labelled_windows(self, device: str, n: int, version: int) -> None:
        """``n`` windows whose first half is labelled (the label arrives while the window is open)."""
        from tests.ota.agent_proc import call

        a = self.agents[device]
        start = self.windows(device, version)
        half = WIN // 2
        for i in range(n):
            lo = (i * WIN) % len(self.feed)
            ids = a.predict(self.feed[lo : lo + half].tolist())["ids"]
            items = [{"id": p, "label": int(y)} for p, y in zip(ids, self.truth[lo : lo + half], strict=True)]
            code, doc = call(a.base + "/v1/feedback", {"items": items})
            assert code == 200 and doc["counted"] == half, doc
            a.predict(self.feed[lo + half : lo + WIN].tolist())
        wait_for(lambda: self.windows(device, version) >= start + n, 60, f"{n} windows of {device} stored")

    def events(self) -> list[dict[str, Any]]:
        from toolchain.fleet.rollouts import gate_events

        with open_store(self.db, migrate=False) as s:
            return gate_events(s)


@pytest.fixture
def fleet(
    request: pytest.FixtureRequest, tmp_path: Path, mosquitto, ota_keys, bundle_of, model
) -> Iterator[Callable[..., Fleet]]:
    from toolchain.fleet.collector import Collector
    from toolchain.fleet.registry import register_bundle

    started: list[Any] = []

    def start(db_kind: str, feed_scale: float, devices: tuple[str, ...] = ("cam-1", "cam-2")) -> Fleet:
        db = request.getfixturevalue("sqlite_url" if db_kind == "sqlite" else "postgres_url")
        v1 = bundle_of(1, 1.0)
        register_bundle(db, v1)
        collector = Collector(db, mosquitto.url, fleet="lab", evaluate=False)
        collector.start()
        started.append(collector)
        assert collector.wait_ready(15)
        agents = start_fleet_agents(
            tmp_path,
            dict.fromkeys(devices, v1),
            pub=ota_keys["pub"],
            mqtt_url=mosquitto.url,
            extra_config=f"\n[telemetry]\nwindow_s = 3600\nwindow_max_samples = {WIN}\n",
            started=started,
        )
        f = Fleet(db, agents, model[2] * feed_scale, model[3])
        for dev in devices:
            f.send_windows(dev, K, 1)
        return f

    yield start
    for x in reversed(started):
        x.stop()


def start_deploy(bundle: Path, mosquitto, db: str, ota_keys, *extra: str) -> subprocess.Popen[str]:
    options = (
        f"--device cam-1 --device cam-2 --canary 1 --key {ota_keys['pub']} --timeout 120 --gate-windows {K}"
    )
    args = ["fleet", "deploy", str(bundle), "--broker", mosquitto.url, "--fleet", "lab", "--db", db, "--json"]
    args += [*options.split(), *extra]
    return subprocess.Popen([*EDGEFLEET, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> tuple[int, dict[str, Any], str]:
    out, err = proc.communicate(timeout=240)
    try:
        doc = json.loads(out)
    except ValueError:
        raise AssertionError(
            f"no JSON from fleet deploy (exit {proc.returncode}): {out[-500:]} {err[-2000:]}"
        ) from None
    return proc.returncode, doc, err


def canary_on(f: Fleet, version: int, proc: subprocess.Popen[str]) -> None:
    def running() -> bool:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        return f.agents["cam-1"].model_version() == version

    wait_for(running, 120, f"the canary to run v{version}")


@pytest.mark.broker
@pytest.mark.timeout(400)
def test_drift_gate_passes_when_the_alert_clears_and_promotes(fleet, bundle_of, mosquitto, ota_keys) -> None:
    """The feed is faded (inputs * 0.5): v1 is in alert; v2's baseline saw such inputs: the alert clears."""
    f = fleet("sqlite", 0.5)
    v2 = bundle_of(2, 0.5)
    proc = start_deploy(v2, mosquitto, f.db, ota_keys, "--gate", "drift")
    canary_on(f, 2, proc)
    assert f.agents["cam-2"].model_version() == 1  # not promoted before the gate decided
    f.send_windows("cam-1", K, 2)
    code, doc, err = finish(proc)
    assert code == 0, err[-2000:]
    gate = doc["gate"]
    assert gate["outcome"] == "passed" and gate["action"] == "promoted", gate
    (cam1,) = gate["devices"]
    assert cam1["before"]["state"] == "alert" and cam1["after"]["state"] in ("ok", "warn")  # cleared
    assert cam1["after"]["value"] < cam1["before"]["value"] / 2
    assert cam1["before"]["windows"] == K and cam1["after"]["windows"] == K
    assert cam1["after"]["count"] == K * WIN
    assert doc["devices"]["cam-2"]["state"] == "deployed"
    wait_for(lambda: f.agents["cam-2"].model_version() == 2, 60, "cam-2 on v2")
    assert "windows on v2: cam-1 3/3" in err  # progress (earlier counts depend on timing)
    (ev,) = f.events()
    assert ev["outcome"] == "passed" and ev["action"] == "promoted" and ev["model"]["version"] == 2
    r = CliRunner().invoke(main, ["fleet", "status", "--db", f.db, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["canary_gates"][0]["outcome"] == "passed"
    r = CliRunner().invoke(main, ["fleet", "status", "--db", f.db])
    assert "canary gates" in r.output and "promoted" in r.output


@pytest.mark.broker
@pytest.mark.timeout(400)
def test_drift_gate_fails_and_rolls_the_canary_back(fleet, bundle_of, mosquitto, ota_keys, tmp_path) -> None:
    """The feed matches v1; v2's baseline saw faded inputs, so the same feed looks drifted to it."""
    f = fleet("sqlite", 1.0)
    v2 = bundle_of(2, 0.5)
    v3 = bundle_of(3, 1.0)  # the old model again, under a higher version (anti-rollback floor)
    proc = start_deploy(v2, mosquitto, f.db, ota_keys, "--gate", "drift", "--rollback-bundle", str(v3))
    canary_on(f, 2, proc)
    f.send_windows("cam-1", K, 2)
    code, doc, err = finish(proc)
    assert code == 1, err[-2000:]
    gate = doc["gate"]
    assert gate["outcome"] == "failed" and gate["action"] == "rolled_back", gate
    (cam1,) = gate["devices"]
    assert cam1["before"]["state"] in ("ok", "warn") and cam1["after"]["state"] == "alert"
    assert gate["rollback"]["devices"] == {"cam-1": "deployed"} and gate["rollback"]["version"] == 3
    assert doc["stopped"] and "-> alert" in doc["stop_reason"] and "rolled back to v3" in doc["stop_reason"]
    assert doc["devices"]["cam-2"]["state"] == "not_reached"
    assert f.agents["cam-1"].model_version() == 3 and f.agents["cam-2"].model_version() == 1
    (ev,) = f.events()
    assert ev["outcome"] == "failed" and ev["action"] == "rolled_back"
    assert ev["detail"]["devices"][0]["after"]["value"] > ev["detail"]["devices"][0]["before"]["value"]
    from toolchain.fleet.report import build_report

    page = build_report(f.db)
    assert 'id="canary-gates"' in page and "rolled_back" in page


@pytest.mark.broker
@pytest.mark.postgres
@pytest.mark.timeout(400)
def test_gate_timeout_fails_safe_and_rolls_back_on_postgres(fleet, bundle_of, mosquitto, ota_keys) -> None:
    """Only one of three windows arrives before --gate-timeout: the rollout fails safe."""
    f = fleet("postgres", 1.0)
    v2 = bundle_of(2, 1.0)
    v3 = bundle_of(3, 1.0)
    proc = start_deploy(
        v2,
        mosquitto,
        f.db,
        ota_keys,
        "--gate",
        "confidence",
        "--gate-timeout",
        "20",
        "--rollback-bundle",
        str(v3),
    )
    canary_on(f, 2, proc)
    f.send_windows("cam-1", 1, 2)
    code, doc, err = finish(proc)
    assert code == 1
    gate = doc["gate"]
    assert gate["outcome"] == "timeout" and gate["action"] == "rolled_back", gate
    assert "of 3 window(s) on the new model" in gate["message"]
    assert "failing safe" in err
    assert f.agents["cam-1"].model_version() == 3 and f.agents["cam-2"].model_version() == 1
    (ev,) = f.events()
    assert ev["outcome"] == "timeout" and ev["windows"] == K


@pytest.mark.broker
@pytest.mark.timeout(400)
def test_accuracy_gate_fails_on_a_worse_model_and_rolls_back(fleet, bundle_of, mosquitto, ota_keys) -> None:
    """Labels from /v1/feedback: v1 is right on most digits, v2 answers the next class (inputs unchanged)."""
    f = fleet("sqlite", 1.0)
    f.send_labelled_windows("cam-1", K, 1)
    v2 = bundle_of(2, 1.0, wrong=True)
    v3 = bundle_of(3, 1.0)
    proc = start_deploy(v2, mosquitto, f.db, ota_keys, "--gate", "accuracy", "--rollback-bundle", str(v3))
    canary_on(f, 2, proc)
    f.send_windows("cam-1", 1, 2)  # windows without labels do not count for the accuracy gate
    f.send_labelled_windows("cam-1", K, 2)
    code, doc, err = finish(proc)
    assert code == 1, err[-2000:]
    gate = doc["gate"]
    assert gate["outcome"] == "failed" and gate["action"] == "rolled_back", gate
    (cam1,) = gate["devices"]
    before, after = cam1["before"], cam1["after"]
    assert before["labelled"] == after["labelled"] == K * WIN // 2
    assert before["value"] > 0.8 and after["value"] < 0.2, cam1
    assert f.agents["cam-1"].model_version() == 3 and f.agents["cam-2"].model_version() == 1


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_accuracy_gate_without_labels_is_refused_in_one_line(fleet, bundle_of, mosquitto, ota_keys) -> None:
    f = fleet("sqlite", 1.0, devices=("cam-1",))
    r = CliRunner().invoke(
        main,
        ["fleet", "deploy", str(bundle_of(2, 1.0)), "--broker", mosquitto.url, "--db", f.db]
        + f"--fleet lab --device cam-1 --key {ota_keys['pub']} --gate accuracy".split(),
    )
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --gate accuracy needs ground truth"), r.output
    assert f.agents["cam-1"].model_version() == 1 and f.events() == []


def test_gate_flags_are_checked(tmp_path: Path, make_version) -> None:
    def run(*args: str) -> Any:
        return CliRunner().invoke(
            main,
            [
                "fleet",
                "deploy",
                str(make_version(2)),
                "--broker",
                "mqtt://127.0.0.1:1",
                "--fleet",
                "lab",
                *args,
            ],
        )

    r = run("--rollback-bundle", str(tmp_path))
    assert r.exit_code == 2 and "--rollback-bundle needs --gate" in r.output
    r = run("--gate", "drift", "--canary", "0")
    assert r.exit_code == 2 and "--gate needs canaries" in r.output
    r = run("--gate", "drift", "--gate-windows", "0")
    assert r.exit_code == 2
    r = run("--gate", "drift", "--rollback-bundle", str(make_version(2)))
    assert r.exit_code == 1 and "is not above the new v2" in r.output and "--version 3" in r.output
    r = run("--gate", "drift", "--db", f"sqlite:///{tmp_path / 'none.db'}")
    assert r.exit_code == 1 and "does not exist" in r.output and len(r.output.strip().splitlines()) == 1


def test_without_a_rollback_bundle_the_canaries_keep_the_model_and_the_way_back_is_said(
    make_version, sqlite_url
) -> None:
    from toolchain.shipping.canary import GateOptions, MetricGate
    from toolchain.shipping.flash import MqttDest

    dest = MqttDest("127.0.0.1", 1, False, None, None, "lab", None, None)
    g = MetricGate(GateOptions("drift", sqlite_url), make_version(4), dest)
    action, note, detail = g._roll_back(["cam-1", "cam-2"])
    assert action == "kept" and detail["bundle"] is None
    assert "keep v4" in note and "--version 5" in note and "--device cam-1 --device cam-2" in note


def test_a_database_lost_while_waiting_fails_the_gate_safe(make_version, sqlite_url) -> None:
    from toolchain.shipping.canary import GateOptions, MetricGate
    from toolchain.shipping.flash import MqttDest

    dest = MqttDest("127.0.0.1", 1, False, None, None, "lab", None, None)
    g = MetricGate(GateOptions("drift", sqlite_url, windows=2), make_version(2), dest)
    g.before = {"cam-1": m(0.01, "ok", windows=2)}
    Path(sqlite_url.removeprefix("sqlite:///")).unlink()
    d = g._decide(["cam-1"])
    assert (
        d.outcome == "failed"
        and "cannot read the fleet database" in d.message
        and "failing safe" in d.message
    )
