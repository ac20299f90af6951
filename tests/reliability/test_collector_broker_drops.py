"""Finding 3: drops by the broker are seen, logged, alerted and shown by `fleet status`.

A real Mosquitto with ``max_queued_messages`` set low: while the collector (a persistent MQTT 5
session) is offline, the broker acknowledges every window to the publisher but queues only 20 for the
collector and drops the rest, counting them in ``$SYS/broker/publish/messages/dropped``. Before,
nothing anywhere said so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from device_agent.formats.manifest import manifest_sha256
from device_agent.formats.telemetry import ModelRef
from tests.conftest import Mosquitto, missing_service, mosquitto_binary
from tests.device_agent.agent_bundles import cached_onnx_bundle
from tests.helpers import run_edgefleet, subscribe_json, wait_for
from toolchain.fleet.collector import Collector
from toolchain.fleet.registry import register_bundle
from toolchain.fleet.sim import Publisher, digits_baseline, load_digits, stats_payload, window_profile
from toolchain.fleet.status import broker_counters
from toolchain.fleet.storage import open_store

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

QUEUED = 20
SENT = 150


@pytest.fixture
def small_queue_broker(tmp_path: Path):
    if not mosquitto_binary():
        missing_service("mosquitto (apt-get install mosquitto)")
    broker = Mosquitto(tmp_path, extra_conf=f"max_queued_messages {QUEUED}\nsys_interval 1")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def windows(url: str) -> int:
    with open_store(url, migrate=False) as s:
        return int(s.query("SELECT COUNT(*) FROM windows")[0][0])


def test_broker_drops_while_the_collector_is_offline_are_logged_alerted_and_shown(
    tmp_path: Path, small_queue_broker: Mosquitto, cli_env, caplog
) -> None:
    bundle = cached_onnx_bundle()
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    register_bundle(url, bundle)
    ref = ModelRef("digits", 1, manifest_sha256(bundle))
    base, model = digits_baseline()
    x = load_digits()["x_test"][:20]
    prof = window_profile(base.spec, x, model.predict(x))
    broker = small_queue_broker
    # The collector makes its persistent session, then goes away.
    first = Collector(url, broker.url, client_id="drops-test", worker_processes=0, evaluate=False).start()
    assert first.wait_ready(15)
    first.stop()
    # An observer of the alerts topic.
    obs, got = subscribe_json(broker.port, "edgefleet/lab/alerts")
    pub = Publisher(broker.url)
    try:
        pub.publish_all(stats_payload("dev-1", seq, ref, prof) for seq in range(1, SENT + 1))
        assert pub.wait_acked(60)  # the broker acknowledged every window...
    finally:
        pub.close()
    with caplog.at_level(logging.WARNING, "edgefleet.fleet.collector"):
        col = Collector(url, broker.url, client_id="drops-test", worker_processes=0, evaluate=False).start()
        try:
            assert col.wait_ready(15)
            wait_for(lambda: windows(url) >= QUEUED, 60, "the queued windows")
            wait_for(lambda: col.counters.broker_dropped > 0, 30, "the $SYS drop counter")
            wait_for(lambda: got, 30, "the broker-drops alert")
        finally:
            col.stop()
    stored = windows(url)
    # ...but only the queued ones reached the collector; the broker counted the rest as dropped.
    assert stored < SENT
    assert col.counters.broker_dropped == SENT - stored
    (alert,) = [a for a in got if a["type"] == "broker_drops"]
    assert alert["rise"] == SENT - stored and alert["counter"] == "$SYS/broker/publish/messages/dropped"
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 1 and f"dropped {SENT - stored} message(s)" in lines[0]
    (row,) = broker_counters(url)
    assert row["dropped_seen"] == SENT - stored and row["value"] == SENT - stored
    out = run_edgefleet(["fleet", "status", "--db", url], cli_env)
    assert f"dropped {SENT - stored} message(s) after acknowledging them" in out.stdout
    out = run_edgefleet(["fleet", "status", "--db", url, "--json"], cli_env)
    assert json.loads(out.stdout)["broker_drops"][0]["dropped_seen"] == SENT - stored
    obs.loop_stop()
    obs.disconnect()
