"""The collector against a real Mosquitto broker and real SQLite / PostgreSQL databases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from device_agent.formats.telemetry import encode_event
from tests.helpers import child_pids, subscribe_json, wait_for
from toolchain.fleet.registry import register_bundle
from toolchain.fleet.sim import Publisher, stats_payload, status_payload
from toolchain.fleet.storage import open_store

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


def test_duplicates_are_stored_once(
    mosquitto, sqlite_url, bundle, model_ref, make_window, collector_factory, count_rows
) -> None:
    register_bundle(sqlite_url, bundle[0])
    c = collector_factory(sqlite_url, mosquitto.url, client_id="dup-test")
    pub = Publisher(mosquitto.url)
    msgs = [stats_payload("dev-1", seq, model_ref, make_window(50, seed=seq)) for seq in range(20)]
    pub.publish_all(msgs)
    pub.publish_all(msgs)  # the agent resends after a lost PUBACK: same (device, seq)
    pub.publish_all(msgs[:5])
    assert pub.wait_acked(30)
    pub.close()
    wait_for(lambda: c.counters.received >= 45, 30, "45 deliveries")
    assert count_rows(sqlite_url, "windows") == 20
    assert c.counters.stored == 20 and c.counters.duplicates == 25
    with open_store(sqlite_url) as s:
        assert sorted(r[0] for r in s.query("SELECT seq FROM windows")) == list(range(20))


def test_malformed_payloads_are_quarantined_and_collection_goes_on(
    mosquitto, sqlite_url, bundle, model_ref, make_window, collector_factory
) -> None:
    register_bundle(sqlite_url, bundle[0])
    c = collector_factory(sqlite_url, mosquitto.url, client_id="bad-test")
    _, good = stats_payload("dev-1", 0, model_ref, make_window(50))
    doc = json.loads(good)
    wrong_schema = json.dumps({**doc, "schema": 99}).encode()
    unknown_key = json.dumps({**doc, "extra": 1}).encode()
    nan = good.replace(b'"count":50', b'"count":NaN')
    # over the 96 KiB payload limit, under the collector's 128 KiB packet limit (larger: the broker drops it)
    huge = json.dumps({**doc, "agent_version": "x" * 105_000}).encode()
    deep = b'{"schema":1,"type":"stats","x":' + b"[" * 40 + b"]" * 40 + b"}"
    spoofed = json.dumps({**doc, "device_id": "dev-2"}).encode()
    short = json.loads(good)
    short["inputs"]["hist"][5] = short["inputs"]["hist"][5][:-2]
    bad = {
        "not JSON": (b"\x00\x01not json at all", "not valid JSON"),
        "wrong schema": (wrong_schema, "schema '99' is not supported"),
        "unknown key": (unknown_key, "unknown key"),
        "NaN": (nan, "not valid JSON"),
        "huge": (huge, "exceeds the"),
        "deep nesting": (deep, "nests deeper"),
        "spoofed device": (spoofed, "does not match the topic"),
        "wrong histogram length": (json.dumps(short).encode(), "bins, the baseline has"),
    }
    pub = Publisher(mosquitto.url)
    for payload, _ in bad.values():
        pub.publish("edgefleet/lab/dev-1/stats", payload)
    pub.publish("edgefleet/lab/dev-1/status", b"[]")
    pub.publish("edgefleet/lab/dev-1/events", b'{"schema":1,"type":"event"}')
    t, p = stats_payload("dev-1", 1, model_ref, make_window(50, seed=1))
    pub.publish(t, p)  # a good window after all the bad ones
    assert pub.wait_acked(30)
    pub.close()
    wait_for(lambda: c.counters.stored == 1, 30, "the good window")
    assert c.counters.quarantined == len(bad) + 2
    with open_store(sqlite_url) as s:
        rows = s.query("SELECT reason, payload_head, payload_bytes FROM quarantine ORDER BY id")
    assert len(rows) == len(bad) + 2
    # The last two rows are the bad status and event.
    for (name, (payload, want)), (reason, head, size) in zip(bad.items(), rows[: len(bad)], strict=True):
        assert want in reason, f"{name}: {reason}"
        assert size == len(payload) and len(head) <= 512
    assert c._worker is not None and c._worker.is_alive()


def test_status_and_events_reach_the_devices_table(
    mosquitto, sqlite_url, model_ref, collector_factory
) -> None:
    from toolchain.fleet.status import status_rows

    collector_factory(sqlite_url, mosquitto.url, client_id="status-test")
    pub = Publisher(mosquitto.url)
    t, p = status_payload("dev-7", model_ref, deployment={"state": "downloading", "version": 2})
    pub.publish(t, p, retain=True)
    pub.publish(
        "edgefleet/lab/dev-7/events",
        encode_event(device_id="dev-7", fleet="lab", event="model_loaded", ts=1.8e9, message="v1"),
    )
    assert pub.wait_acked(30)
    rows = wait_for(lambda: status_rows(sqlite_url), 30, "the device row")
    assert rows[0]["state"] == "online" and rows[0]["deployment_state"] == "downloading"
    t, p = status_payload("dev-7", model_ref, state="offline")
    pub.publish(t, p, retain=True)
    assert pub.wait_acked(30)
    pub.close()
    wait_for(lambda: status_rows(sqlite_url)[0]["state"] == "offline", 30, "offline state")
    with open_store(sqlite_url) as s:
        assert s.query("SELECT event, message FROM events") == [("model_loaded", "v1")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["eval worker", "in process", "eval worker killed"])
def test_alerts_are_published_with_hysteresis(
    mosquitto, sqlite_url, bundle, model_ref, make_window, collector_factory, mode
) -> None:
    """Alerts are the same whether the evaluation runs in its worker process, in the collector, or
    in the collector after its evaluation worker died."""

    register_bundle(sqlite_url, bundle[0], {"raise_after": 2, "clear_after": 2, "min_count": 200})
    c = collector_factory(
        sqlite_url, mosquitto.url, client_id="alert-test", worker_processes=0 if mode == "in process" else 1
    )
    sub, got = subscribe_json(mosquitto.port, "edgefleet/lab/alerts")
    pub = Publisher(mosquitto.url)
    plan = ["shift", "shift", "shift", "ok", "ok"]
    for seq, kind in enumerate(plan):
        transform = (lambda x: x * 0.5) if kind == "shift" else None
        pub.publish(*stats_payload("dev-1", seq, model_ref, make_window(250, seed=seq, transform=transform)))
        wait_for(lambda n=seq + 1: c.counters.evaluations >= n, 30, f"evaluation {seq + 1}")
        if mode == "eval worker killed" and seq == 0:
            assert c.eval_worker is not None
            for pid in c.eval_worker.pids():
                os.kill(pid, signal.SIGKILL)
    states = wait_for(lambda: [a["state"] for a in got] if len(got) >= 2 else None, 30, "two alerts")
    sub.loop_stop()
    pub.close()
    assert states == ["alert", "ok"]  # raised at the 2nd shifted window, cleared at the 2nd good one
    assert (c.eval_worker is None) == (mode == "in process")
    if c.eval_worker is not None:
        assert c.eval_worker.failed == (mode == "eval worker killed")
    first = got[0]
    assert first["device_id"] == "dev-1" and first["previous"] == "ok" and first["features"]
    with open_store(sqlite_url) as s:
        assert [r[0] for r in s.query("SELECT state FROM alerts ORDER BY id")] == ["alert", "ok"]
        assert [r[0] for r in s.query("SELECT verdict FROM evaluations ORDER BY id")] == [
            "alert",
            "alert",
            "alert",
            "ok",
            "ok",
        ]


def test_bundle_dir_registers_models_automatically(
    mosquitto, sqlite_url, bundle, model_ref, make_window, collector_factory
) -> None:
    collector_factory(sqlite_url, mosquitto.url, client_id="auto-test", bundle_dir=str(bundle[0].parent))
    pub = Publisher(mosquitto.url)
    pub.publish(*stats_payload("dev-3", 0, model_ref, make_window(50)))
    pub.publish(*status_payload("dev-3", model_ref))
    assert pub.wait_acked(30)
    pub.close()

    def packed() -> bool:
        with open_store(sqlite_url) as s:
            return s.query("SELECT COUNT(*) FROM windows WHERE ints IS NOT NULL")[0][0] == 1

    wait_for(packed, 30, "the window to be judged against the auto-registered baseline")
    with open_store(sqlite_url) as s:
        assert s.query("SELECT model_sha256 FROM baselines") == [(model_ref.sha256,)]


def _start_cli_collector(
    env: dict[str, str], broker: str, db: str, log: Path, client_id: str
) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from toolchain.cli import main; main()",
            "fleet",
            "collect",
            "--broker",
            broker,
            "--db",
            db,
            "--client-id",
            client_id,
            "--no-alerts",
            "--batch-size",
            "20",
            "--worker-processes",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),
    )


def test_sigkill_and_restart_loses_no_acknowledged_window(
    mosquitto, sqlite_url, bundle, model_ref, make_window, cli_env, tmp_path, count_rows
) -> None:
    register_bundle(sqlite_url, bundle[0])
    log = tmp_path / "collector.log"
    proc = _start_cli_collector(cli_env, mosquitto.url, sqlite_url, log, "kill-test")
    pub = Publisher(mosquitto.url)
    # Wait until the collector has its (persistent) session: it stores a status message.
    pub.publish(*status_payload("dev-k", model_ref), retain=True)
    wait_for(lambda: count_rows(sqlite_url, "devices") == 1, 60, "the collector to subscribe")
    total = 1000
    profiles = [make_window(20, seed=i) for i in range(8)]
    msgs = [stats_payload(f"dev-{i % 10}", i // 10, model_ref, profiles[i % 8]) for i in range(total)]
    feeder = threading.Thread(target=pub.publish_all, args=(msgs,))
    feeder.start()
    procs = [proc]
    try:
        for _ in range(2):
            # Kill each instance once it has stored some windows of its own, mid-stream.
            kill_at = count_rows(sqlite_url, "windows") + 60
            wait_for(
                lambda k=kill_at: count_rows(sqlite_url, "windows") >= k, 120, f"{kill_at} stored windows"
            )
            workers = child_pids(proc.pid)
            assert workers, f"kill at {kill_at}: no decode worker; log: {log.read_text()[-1500:]}"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            # Its worker processes notice the collector is gone and exit instead of lingering.
            wait_for(
                lambda w=workers: not any(Path(f"/proc/{p}").exists() for p in w), 20, "orphaned workers"
            )
            stored = count_rows(sqlite_url, "windows")
            assert stored < total, "the kill came too late to prove anything"
            proc = _start_cli_collector(cli_env, mosquitto.url, sqlite_url, log, "kill-test")
            procs.append(proc)
        feeder.join(60)
        assert pub.wait_acked(60), "the broker did not acknowledge every window"
        wait_for(lambda: count_rows(sqlite_url, "windows") == total, 120, "every acknowledged window")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        for p in procs:  # a failed assertion must not leave a collector running
            if p.poll() is None:
                p.kill()
                p.wait(10)
        pub.close()
    assert proc.returncode == 0, log.read_text()[-2000:]
    with open_store(sqlite_url) as s:
        keys = s.query("SELECT device_id, seq FROM windows")
    assert sorted(keys) == sorted((f"dev-{i % 10}", i // 10) for i in range(total))


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_two_collectors_in_a_shared_group_store_every_window_once(
    mosquitto, postgres_url, bundle, model_ref, make_window, collector_factory, count_rows
) -> None:
    register_bundle(postgres_url, bundle[0])
    a = collector_factory(postgres_url, mosquitto.url, shared_group="ingest", client_id="col-a")
    b = collector_factory(postgres_url, mosquitto.url, shared_group="ingest", client_id="col-b")
    pub = Publisher(mosquitto.url)
    profiles = [make_window(20, seed=i) for i in range(5)]
    total = 300
    pub.publish_all(stats_payload(f"dev-{i % 15}", i // 15, model_ref, profiles[i % 5]) for i in range(total))
    assert pub.wait_acked(60)
    pub.close()
    wait_for(lambda: count_rows(postgres_url, "windows") == total, 120, "every window")
    wait_for(lambda: a.counters.received + b.counters.received >= total, 30, "the counters")
    # Each window was delivered to exactly one member of the group, and both did part of the work.
    assert a.counters.received + b.counters.received == total
    assert a.counters.stored + b.counters.stored == total
    assert a.counters.duplicates + b.counters.duplicates == 0
    assert a.counters.stored > 0 and b.counters.stored > 0


def test_embedded_mqtt311_broker_works_without_shared_groups(
    sqlite_url, bundle, model_ref, make_window, collector_factory, count_rows
) -> None:
    """The demo's embedded broker (amqtt) speaks only MQTT 3.1.1: the collector falls back to it."""
    pytest.importorskip("amqtt")
    from device_agent.broker import EmbeddedBroker
    from toolchain.fleet.collector import Collector, CollectorConfigError

    broker = EmbeddedBroker().start()
    try:
        register_bundle(sqlite_url, bundle[0])
        c = collector_factory(sqlite_url, broker.url, client_id="amqtt-test")
        assert c.protocol == "3.1.1"
        pub = Publisher(broker.url, protocol="3.1.1")
        pub.publish_all(
            stats_payload("dev-1", seq, model_ref, make_window(30, seed=seq)) for seq in range(10)
        )
        assert pub.wait_acked(30)
        pub.close()
        wait_for(lambda: count_rows(sqlite_url, "windows") == 10, 60, "10 windows through amqtt")
        with pytest.raises(CollectorConfigError, match="needs MQTT 5"):
            Collector(sqlite_url, broker.url, shared_group="g", client_id="amqtt-shared").start()
    finally:
        broker.stop()


@pytest.mark.timeout(120)
def test_database_outage_delays_but_loses_nothing(
    mosquitto, sqlite_url, bundle, model_ref, make_window, collector_factory, count_rows, monkeypatch
) -> None:
    """While another process holds the write lock, batches fail, stay unacknowledged and are retried."""
    import sqlite3

    import toolchain.fleet.storage as storage

    register_bundle(sqlite_url, bundle[0])
    monkeypatch.setattr(storage, "SQLITE_BUSY_TIMEOUT_MS", 100)
    c = collector_factory(sqlite_url, mosquitto.url, client_id="outage-test", evaluate=False)
    blocker = sqlite3.connect(sqlite_url[len("sqlite:///") :], isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    pub = Publisher(mosquitto.url)
    pub.publish_all(stats_payload("dev-1", seq, model_ref, make_window(30, seed=seq)) for seq in range(20))
    assert pub.wait_acked(30)
    wait_for(lambda: c.counters.db_errors >= 2, 30, "failed commits while the database is locked")
    assert c.counters.stored == 0
    blocker.execute("ROLLBACK")
    blocker.close()
    wait_for(lambda: count_rows(sqlite_url, "windows") == 20, 60, "every window after the outage")
    pub.close()
    assert c.counters.quarantined == 0


def test_a_dead_decode_worker_loses_nothing(
    mosquitto, sqlite_url, bundle, model_ref, make_window, collector_factory, count_rows
) -> None:
    """SIGKILL the decode worker process: the collector decodes in process from then on, loses nothing."""
    register_bundle(sqlite_url, bundle[0])
    c = collector_factory(sqlite_url, mosquitto.url, client_id="pool-test", worker_processes=1)
    profiles = [make_window(20, seed=i) for i in range(4)]
    msgs = [stats_payload(f"dev-{i % 5}", i // 5, model_ref, profiles[i % 4]) for i in range(200)]
    pub = Publisher(mosquitto.url)
    pub.publish_all(msgs[:100])
    wait_for(lambda: count_rows(sqlite_url, "windows") == 100, 60, "the first 100 windows")
    assert c.decode_pool is not None
    pids = wait_for(c.decode_pool.pids, 10, "a decode worker")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    pub.publish_all(msgs[100:])
    assert pub.wait_acked(30)
    pub.close()
    wait_for(lambda: count_rows(sqlite_url, "windows") == 200, 60, "all 200 windows")
    assert c.decode_pool.failed and c.counters.quarantined == 0 and c.counters.stored == 200


def test_collector_without_worker_processes_stores_the_same(
    mosquitto, sqlite_url, bundle, model_ref, make_window, collector_factory, count_rows
) -> None:
    register_bundle(sqlite_url, bundle[0])
    c = collector_factory(sqlite_url, mosquitto.url, client_id="nopool-test", worker_processes=0)
    pub = Publisher(mosquitto.url)
    pub.publish_all([stats_payload("dev-1", seq, model_ref, make_window(30, seed=seq)) for seq in range(30)])
    assert pub.wait_acked(30)
    pub.close()
    wait_for(lambda: count_rows(sqlite_url, "windows") == 30, 30, "30 windows")
    assert c.decode_pool is not None and c.decode_pool.pids() == [] and c.counters.stored == 30
