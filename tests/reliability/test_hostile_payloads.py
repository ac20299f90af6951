"""The hostile payload catalogue against a real collector (`edgefleet fleet collect`) on a real Mosquitto.

One broker, one collector process and one SQLite database for the module; each case publishes its
payloads, then a good window of the reference device ``dev-ok`` as a probe. When the probe is
stored, every earlier message has been judged (one subscription, batches stored in order). Then:

* the collector process is still running;
* nothing stored before is lost (every window of ``dev-ok`` so far is there, once);
* each payload is counted exactly where a user looks: ``fleet status --json`` (collector counters,
  quarantine, per-device windows / duplicates / restarts), the database, or for packets over the
  collector's Maximum Packet Size, the broker's log (the broker drops them; they never arrive).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from device_agent.formats.telemetry import ModelRef
from tests.conftest import Mosquitto, missing_service, mosquitto_binary
from tests.helpers import EDGEFLEET, run_edgefleet, stop_process, wait_for
from toolchain.fleet.sim import (
    Publisher,
    digits_baseline,
    load_digits,
    sim_stream,
    stats_payload,
    status_payload,
    window_profile,
    write_bundle,
)

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

CLIENT_ID = "hostile-test"
COUNTERS = ("windows_stored", "windows_duplicate", "stream_changes", "quarantined")


@dataclass
class Rig:
    """The module's broker, collector process, database and publisher, and dev-ok's next seq."""

    broker: Mosquitto
    db: Path
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    pub: Publisher
    ref: ModelRef
    env: dict[str, str]
    window: Callable[..., tuple[str, bytes]]
    ok_seq: int = 0
    ok_stored: list[int] = field(default_factory=list)
    spoofed: int = 0  # windows another client stored under dev-ok's id (its own stream)

    def sql(self, q: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db, timeout=10) as c:
            return c.execute(q, args).fetchall()

    def counters(self) -> dict[str, int]:
        try:
            got = dict(self.sql("SELECT name, value FROM collector_counters"))
        except sqlite3.OperationalError:  # before the collector made its tables
            got = {}
        return {k: int(got.get(k, 0)) for k in COUNTERS}

    def status(self) -> dict[str, Any]:
        out = run_edgefleet(["fleet", "status", "--db", self.url, "--json"], self.env)
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc

    def probe(self) -> None:
        """Publish dev-ok's next window and wait until it is stored."""
        self.ok_seq += 1
        seq = self.ok_seq
        self.pub.publish(*self.window("dev-ok", seq))
        assert self.pub.wait_acked(30)

        def stored() -> bool:
            self.alive()
            return bool(self.sql("SELECT 1 FROM windows WHERE device_id='dev-ok' AND seq=?", (seq,)))

        wait_for(stored, 60, f"dev-ok's probe window {seq}")
        self.ok_stored.append(seq)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the collector exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
            )


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    if not mosquitto_binary():
        missing_service("mosquitto (apt-get install mosquitto)")
    import os

    from tests.conftest import REPO

    work = tmp_path_factory.mktemp("hostile")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    broker = Mosquitto(work)
    broker.start()
    base, model = digits_baseline()
    bundle, sha = write_bundle(work / "bundle", base)
    ref = ModelRef("digits", 1, sha)
    x = load_digits()["x_test"][:40]
    prof = window_profile(base.spec, x, model.predict(x))
    db = work / "fleet.db"
    url = f"sqlite:///{db}"
    run_edgefleet(["fleet", "register", str(bundle), "--db", url], env)
    log = work / "collector.log"
    cmd = [*EDGEFLEET, "fleet", "collect", "--broker", broker.url, "--db", url, "--client-id", CLIENT_ID]
    proc = subprocess.Popen([*cmd, "--no-alerts"], env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    pub = Publisher(broker.url)

    def window(device: str, seq: int, stream: str | None = None, model: ModelRef = ref) -> tuple[str, bytes]:
        return stats_payload(device, seq, model, prof, stream=stream)

    r = Rig(broker, db, url, proc, log, pub, ref, env, window)
    try:
        # Know that it subscribed: it stores a retained status.
        pub.publish(*status_payload("dev-ok", ref), retain=True)

        def subscribed() -> bool:
            r.alive()
            return (
                db.exists()
                and bool(r.sql("SELECT 1 FROM sqlite_master WHERE name='devices'"))
                and bool(r.sql("SELECT 1 FROM devices"))
            )

        wait_for(subscribed, 60, "the collector to subscribe (it stores the retained status)")
        r.probe()
        yield r
    finally:
        pub.close()
        stop_process(proc, 30)  # SIGTERM: the collector commits and exits 0
        broker.stop()
    assert proc.returncode == 0, log.read_text()[-2000:]


def good_doc(rig: Rig, device: str = "dev-x", seq: int = 1) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(rig.window(device, seq)[1])
    return doc


def with_(doc: dict[str, Any], **changes: Any) -> bytes:
    return json.dumps({**doc, **changes}).encode()


def hist_with(doc: dict[str, Any], bins: list[int]) -> bytes:
    d = json.loads(json.dumps(doc))
    d["inputs"]["hist"][0] = bins
    return json.dumps(d, separators=(",", ":")).encode()


STATS = "edgefleet/lab/dev-x/stats"

# name -> (build the messages [(topic, payload)], quarantine reason fragments in order)
QUARANTINED: dict[str, tuple[Callable[[dict[str, Any]], list[tuple[str, bytes]]], list[str]]] = {
    "not JSON": (
        lambda d: [(STATS, b"\x00\x01\xfe not json {"), (STATS, b""), (STATS, b"\xff" * 300)],
        ["not UTF-8", "not valid JSON", "not UTF-8"],
    ),
    "JSON of the wrong shape": (
        lambda d: [(STATS, b"[]"), (STATS, b'"stats"'), (STATS, b"{}"), (STATS, b"null")],
        [
            "must be a JSON object",
            "must be a JSON object",
            "schema 'None' is not supported",
            "must be a JSON object",
        ],
    ),
    "wrong types": (
        lambda d: [
            (STATS, with_(d, seq="7")),
            (STATS, with_(d, seq=-3)),
            (STATS, with_(d, count="40")),
            (STATS, with_(d, device_id=5)),
            (STATS, with_(d, inputs=[1, 2, 3])),
            (STATS, with_(d, seq=True)),
        ],
        [
            "seq must be an integer >= 0, got '7'",
            "seq must be an integer >= 0, got '-3'",
            "count must be an integer >= 0, got '40'",
            "device_id '5' is invalid",
            "inputs must be an object",
            "seq must be an integer >= 0, got 'True'",
        ],
    ),
    "NaN and infinities": (
        lambda d: [
            (STATS, json.dumps(d).replace(f'"count": {d["count"]}', '"count": NaN').encode()),
            (STATS, json.dumps({**d, "window_end": float("inf")}).encode()),
            (STATS, json.dumps(d).replace(f'"seq": {d["seq"]}', '"seq": 1e999').encode()),
        ],
        ["NaN is not a finite number", "Infinity is not a finite number", "1e999 is not a finite number"],
    ),
    "deep nesting": (
        lambda d: [
            (STATS, b"[" * 5000),
            (STATS, b"[" * 40_000 + b"]" * 40_000),
            (STATS, with_(d, agent_version=json.loads("[" * 50 + "]" * 50))),
        ],
        ["nests deeper", "nests deeper", "nests deeper"],
    ),
    "huge arrays": (
        lambda d: [
            (
                STATS,
                hist_with(d, [1] * 30_000),
            ),  # 60 KB: under the payload limit, far more bins than the baseline
            (STATS, hist_with(d, [])),
        ],
        ["bins, the baseline has", "bins, the baseline has"],
    ),
    "over the payload limit (under the packet limit)": (
        lambda d: [(STATS, with_(d, agent_version="x" * 105_000))],
        ["exceeds the 98304-byte limit"],
    ),
    "another device's id on this device's topic": (
        lambda d: [
            (STATS, with_(d, device_id="dev-ok")),
            (STATS, with_(d, fleet="other")),
            ("edgefleet/lab/dev-ok/status", status_payload("dev-x", None)[1]),
        ],
        ["does not match the topic", "does not match the topic", "does not match the topic"],
    ),
    "bad status and event messages": (
        lambda d: [
            ("edgefleet/lab/dev-x/status", b"[]"),
            ("edgefleet/lab/dev-x/status", b'{"schema": 1, "type": "status", "state": 5}'),
            ("edgefleet/lab/dev-x/events", b'{"schema":1,"type":"event"}'),
        ],
        ["must be a JSON object", "status is missing key(s)", "event is missing key(s)"],
    ),
}


@pytest.mark.parametrize("case", list(QUARANTINED))
def test_hostile_payload_is_quarantined_counted_and_nothing_stored_is_lost(rig: Rig, case: str) -> None:
    make, reasons = QUARANTINED[case]
    msgs = make(good_doc(rig))
    before = rig.counters()
    (last_id,) = rig.sql("SELECT COALESCE(MAX(id), 0) FROM quarantine")[0]
    for t, p in msgs:
        rig.pub.publish(t, p)
    rig.probe()
    after = rig.counters()
    delta = {k: after[k] - before[k] for k in COUNTERS}
    assert delta == {
        "windows_stored": 1,
        "windows_duplicate": 0,
        "stream_changes": 0,
        "quarantined": len(msgs),
    }
    rows = rig.sql("SELECT topic, reason, payload_bytes FROM quarantine WHERE id > ? ORDER BY id", (last_id,))
    assert [(t, n) for t, _, n in rows] == [(t, len(p)) for t, p in msgs]
    for (_, reason, _), want in zip(rows, reasons, strict=True):
        assert want in reason, reason
    assert not rig.sql("SELECT 1 FROM windows WHERE device_id = 'dev-x'")
    assert_nothing_lost(rig)


def assert_nothing_lost(rig: Rig) -> None:
    rig.alive()
    own = sim_stream("dev-ok")
    seqs = [
        s
        for (s,) in rig.sql(
            "SELECT seq FROM windows WHERE device_id='dev-ok' AND stream=? ORDER BY seq", (own,)
        )
    ]
    assert seqs == rig.ok_stored
    doc = rig.status()
    (ok,) = [d for d in doc["devices"] if d["device_id"] == "dev-ok"]
    assert ok["windows"] == len(rig.ok_stored) + rig.spoofed and ok["duplicates"] == 0
    assert ok["stream_changes"] == (1 if rig.spoofed else 0)
    q = doc["quarantine"]
    assert q["total"] == q["count"] == doc["collector"].get("quarantined", 0) == rig.counters()["quarantined"]


def test_packet_over_the_collectors_maximum_is_dropped_by_the_broker_and_logged_there(rig: Rig) -> None:
    """Larger than the Maximum Packet Size the collector announced: the broker never delivers it."""
    before = rig.counters()
    log = rig.broker.workdir / "mosquitto.log"
    seen = log.read_text(errors="replace").count(f"Dropping too large outgoing PUBLISH for {CLIENT_ID}")
    big = with_(good_doc(rig), agent_version="x" * 300_000)
    rig.pub.publish(STATS, big)
    rig.pub.publish(STATS, b"\x00" * 2_000_000)
    rig.probe()
    assert rig.counters() == {**before, "windows_stored": before["windows_stored"] + 1}
    text = log.read_text(errors="replace")
    assert text.count(f"Dropping too large outgoing PUBLISH for {CLIENT_ID}") == seen + 2
    assert_nothing_lost(rig)


def test_unknown_model_is_stored_and_kept_for_when_its_baseline_arrives(rig: Rig) -> None:
    before = rig.counters()
    other = ModelRef("not-registered", 3, "ab" * 32)
    rig.pub.publish(*rig.window("dev-unknown", 1, model=other))
    rig.probe()
    after = rig.counters()
    assert after == {**before, "windows_stored": before["windows_stored"] + 2}
    ((sha, pending),) = rig.sql(
        "SELECT model_sha256, pending_json IS NOT NULL FROM windows WHERE device_id='dev-unknown'"
    )
    assert sha == other.sha256 and pending == 1  # its statistics are kept raw until the bundle is registered
    (dev,) = [d for d in rig.status()["devices"] if d["device_id"] == "dev-unknown"]
    assert dev["windows"] == 1 and dev["model"]["name"] == "not-registered"
    assert_nothing_lost(rig)


def test_another_device_speaking_on_a_real_devices_topic_cannot_erase_its_windows(rig: Rig) -> None:
    """Without broker ACLs a client may publish valid windows on dev-ok's topic (see `fleet broker-config`
    for the lock): with stream ids its windows are stored beside dev-ok's, never instead of them, and the
    device shows a stream change."""
    before = rig.counters()
    for seq in rig.ok_stored[:3]:  # the same seqs as dev-ok's stored windows, its own stream
        rig.pub.publish(*rig.window("dev-ok", seq, stream="5b00f5b00f5b00f0"))
    rig.probe()
    after = rig.counters()
    assert after == {
        **before,
        "windows_stored": before["windows_stored"] + 3 + 1,
        "stream_changes": before["stream_changes"] + 1,
    }
    spoofed = rig.sql(
        "SELECT seq FROM windows WHERE device_id='dev-ok' AND stream='5b00f5b00f5b00f0' ORDER BY seq"
    )
    assert [s for (s,) in spoofed] == rig.ok_stored[:3]
    genuine = rig.sql(
        "SELECT seq FROM windows WHERE device_id='dev-ok' AND stream<>'5b00f5b00f5b00f0' ORDER BY seq"
    )
    assert [s for (s,) in genuine] == rig.ok_stored  # nothing of the real device was lost
    rig.spoofed += 3
    # The new stream is visible in `fleet status` as a restart of dev-ok (its probe went to its old
    # stream, which is not new: no second change).
    assert_nothing_lost(rig)


def test_reused_seq_after_a_reset_is_kept_and_a_true_resend_is_a_counted_duplicate(rig: Rig) -> None:
    first, second = "1111111111111111", "2222222222222222"
    before = rig.counters()
    for seq in (1, 2, 3):
        rig.pub.publish(*rig.window("dev-r", seq, stream=first))
    for seq in (1, 2):  # after a factory reset: a new stream, seq from 1 again
        rig.pub.publish(*rig.window("dev-r", seq, stream=second))
    rig.pub.publish(*rig.window("dev-r", 2, stream=second))  # a resend after a lost PUBACK
    rig.pub.publish(*rig.window("dev-r", 3, stream=first))  # and a late redelivery of the old stream
    rig.probe()
    after = rig.counters()
    assert {k: after[k] - before[k] for k in COUNTERS} == {
        "windows_stored": 5 + 1,
        "windows_duplicate": 2,
        "stream_changes": 1,
        "quarantined": 0,
    }
    rows = rig.sql("SELECT stream, seq FROM windows WHERE device_id='dev-r' ORDER BY stream, seq")
    assert rows == [(first, 1), (first, 2), (first, 3), (second, 1), (second, 2)]
    (dev,) = [d for d in rig.status()["devices"] if d["device_id"] == "dev-r"]
    assert dev["windows"] == 5 and dev["duplicates"] == 2 and dev["stream_changes"] == 1
