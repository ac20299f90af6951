"""Ground truth end to end: a real agent daemon, real Mosquitto, the collector process and the fleet
CLI. Labels sent to the agent's /v1/feedback reach the database as labelled counts, and `fleet status
--json`, `fleet drift --json` and the report show the accuracy exactly; old-format windows (no
labels, schema 1 and 2) from another device stay valid beside them. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.agent import Agent
from device_agent.formats.telemetry import ModelRef
from tests.device_agent.agent_helpers import AgentProcess, http, write_config
from tests.fabricate import tabular_data, tabular_onnx_bundle
from tests.helpers import wait_for
from toolchain.fleet.registry import register_bundle
from toolchain.fleet.report import build_report
from toolchain.fleet.sim import Publisher, stats_payload
from toolchain.fleet.storage import open_store

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]


def _labelled(db: str, device: str) -> tuple[int, int]:
    with open_store(db, migrate=False) as s:
        n, c = s.query(
            "SELECT COALESCE(SUM(labelled), 0), COALESCE(SUM(correct), 0) FROM windows WHERE device_id = ?",
            (device,),
        )[0]
    return int(n), int(c)


def _old_format_windows(bundle: Path, ref: ModelRef) -> list[tuple[str, bytes]]:
    """Three windows of another device as agents before labels send them: schema 2, and schema 1."""
    agent = Agent(bundle)
    out = []
    for seq in range(3):
        x, _ = tabular_data(30, seed=20 + seq)
        agent.predict(x)
        t, raw = stats_payload("pump-old", seq, ref, agent.close_window().profile, fleet="plant")
        if seq == 2:
            doc = json.loads(raw)
            doc["schema"] = 1
            del doc["stream"]
            raw = json.dumps(doc).encode()
        out.append((t, raw))
    return out


@pytest.mark.parametrize("db_kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_labels_reach_the_fleet_and_status_shows_accuracy(
    db_kind: str, request: pytest.FixtureRequest, mosquitto, cli_env, tmp_path: Path
) -> None:
    db = request.getfixturevalue("sqlite_url" if db_kind == "sqlite" else "postgres_url")
    bundle = tabular_onnx_bundle(tmp_path / "bundle")
    sha = register_bundle(db, bundle)["model_sha256"]
    ref = Agent(bundle).model.ref
    assert ref.sha256 == sha
    collector = subprocess.Popen(
        [
            sys.executable, "-c", "from toolchain.cli import main; main()", "fleet", "collect",
            "--broker", mosquitto.url, "--db", db, "--client-id", f"fb-{db_kind}", "--no-alerts",
            "--worker-processes", "1",
        ],
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "collector.log", "ab"),
    )  # fmt: skip
    cfg = write_config(
        tmp_path / "agent.toml",
        bundle=bundle,
        state_dir=tmp_path / "state",
        url=mosquitto.url,
        device_id="pump-1",
        fleet="plant",
        window_s=1.0,
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    try:
        base = agent.api_base()

        def windows_stored() -> bool:
            with open_store(db, migrate=False) as s:
                return int(s.query("SELECT COUNT(*) FROM windows WHERE device_id = 'pump-1'")[0][0]) > 0

        # a message published before the collector subscribes is gone: wait for its first window
        wait_for(windows_stored, 60, "the collector to store the agent's first (empty) window")
        x, _ = tabular_data(10, seed=9)
        code, out = http(base, "/v1/predict", {"inputs": x.tolist()})
        assert code == 200
        other = {"normal": "fault", "fault": "normal"}
        items = [
            {"id": pid, "label": lab if i < 7 else other[lab]}
            for i, (pid, lab) in enumerate(zip(out["ids"], out["labels"], strict=True))
        ]
        code, fb = http(base, "/v1/feedback", {"items": items})
        assert code == 200 and fb["counted"] == 10
        assert http(base, "/v1/feedback", {"id": "unknown", "label": "fault"})[0] == 404

        wait_for(lambda: _labelled(db, "pump-1") == (10, 7), 60, "the labelled window in the database")
        # the older agents' windows, from another device
        pub = Publisher(mosquitto.url)
        pub.publish_all(_old_format_windows(bundle, ref))
        assert pub.wait_acked(30)
        pub.close()

        def old_stored() -> bool:
            with open_store(db, migrate=False) as s:
                return int(s.query("SELECT COUNT(*) FROM windows WHERE device_id = 'pump-old'")[0][0]) == 3

        wait_for(old_stored, 60, "the three old-format windows")
    finally:
        agent.stop()
        collector.terminate()
        collector.wait(30)
    with open_store(db, migrate=False) as s:
        assert int(s.query("SELECT COUNT(*) FROM quarantine")[0][0]) == 0
        assert s.query("SELECT labelled FROM windows WHERE device_id = 'pump-old'") == [(None,)] * 3

    status = json.loads(
        subprocess.run(
            [sys.executable, "-c", "from toolchain.cli import main; main()", "fleet", "status", "--db", db, "--json"],
            env=cli_env, capture_output=True, text=True, check=True, timeout=60,
        ).stdout
    )  # fmt: skip
    devs = {d["device_id"]: d for d in status["devices"]}
    assert (devs["pump-1"]["labelled"], devs["pump-1"]["correct"]) == (10, 7)
    assert devs["pump-1"]["accuracy"] == 0.7
    assert devs["pump-old"]["labelled"] == 0 and devs["pump-old"]["accuracy"] is None
    assert devs["pump-old"]["windows"] == 3

    drift = json.loads(
        subprocess.run(
            [sys.executable, "-c", "from toolchain.cli import main; main()", "fleet", "drift", "--db", db,
             "--since", "all", "--recompute", "--json"],
            env=cli_env, capture_output=True, text=True, check=True, timeout=60,
        ).stdout
    )  # fmt: skip
    rows = {(r["scope"], r["device_id"]): r for r in drift}
    assert rows[("device", "pump-1")]["accuracy"] == 0.7
    assert rows[("device", "pump-old")]["accuracy"] is None
    assert rows[("fleet", "*")]["labelled"] == 10  # the fleet row adds every device's labels
    assert "max_psi" in rows[("device", "pump-1")]  # beside the label-free signals

    page = build_report(db, since="all")
    assert "70.0 % (7 of 10)" in page
