"""Finding 6: the collector stays bounded under floods of oversized and bad payloads.

A real ``edgefleet fleet collect`` process, a real Mosquitto and SQLite. Before: five 100 MB
payloads raised the collector's RSS from 629 to 966 MB, and one client made 9,643 quarantine rows and
as many WARNING lines in 10 s. Now the collector announces an MQTT 5 Maximum Packet Size (the broker
drops anything larger and logs it), the quarantine keeps its newest N rows (every message counted)
and quarantine lines are rate-limited.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.device_agent.agent_bundles import cached_onnx_bundle
from tests.helpers import EDGEFLEET, run_edgefleet, stop_process, wait_for
from toolchain.fleet.quarantine import MAX_PACKET_BYTES, QUARANTINE_LOG_EVERY_S
from toolchain.fleet.registry import register_bundle
from toolchain.fleet.sim import Publisher, status_payload
from toolchain.fleet.storage import open_store

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]

MAX_ROWS = 200
HUGE_BYTES = 40 * 1024 * 1024  # far beyond the packet limit: the broker must not pass it on
N_HUGE = 3
N_BAD = 3000
N_OVER = 20  # over the 96 KiB payload limit, under the 128 KiB packet limit: quarantined and counted


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def counted(url: str, name: str) -> int:
    with open_store(url, migrate=False) as s:
        try:
            found = s.query("SELECT value FROM collector_counters WHERE name = ?", (name,))
        except Exception:  # noqa: BLE001 - a database from before the counters: every row is kept
            return int(s.query("SELECT COUNT(*) FROM quarantine")[0][0]) if name == "quarantined" else 0
    return int(found[0][0]) if found else 0


def devices(url: str) -> int:
    with open_store(url, migrate=False) as s:
        return int(s.query("SELECT COUNT(*) FROM devices")[0][0])


def rows(url: str) -> int:
    with open_store(url, migrate=False) as s:
        return int(s.query("SELECT COUNT(*) FROM quarantine")[0][0])


def test_flood_of_bad_and_oversized_payloads_leaves_the_collector_bounded(
    tmp_path: Path, mosquitto, cli_env
) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    register_bundle(url, cached_onnx_bundle())
    log = tmp_path / "collector.log"
    cmd = [
        *EDGEFLEET,
        "fleet",
        "collect",
        "--broker",
        mosquitto.url,
        "--db",
        url,
        "--client-id",
        "bounds-test",
        "--no-alerts",
        "--worker-processes",
        "0",
        "--quarantine-max-rows",
        str(MAX_ROWS),
    ]
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    pub = Publisher(mosquitto.url)
    try:
        # Know it subscribed (it stores a retained status), then warm up with 100 bad messages.
        pub.publish(*status_payload("dev-s", None), retain=True)
        wait_for(lambda: devices(url) == 1, 60, "the collector to subscribe")
        warm_n = 100
        for _ in range(warm_n):
            pub.publish("edgefleet/lab/warm/stats", b"warm-up, not json")
        wait_for(lambda: counted(url, "quarantined") == warm_n, 60, "warm-up quarantined")
        before_kib = peak_rss_kib(proc.pid)
        started = time.monotonic()
        huge = b"{" + b" " * HUGE_BYTES + b"}"
        over = json.dumps({"schema": 2, "type": "stats", "pad": "x" * 105_000}).encode()
        kinds = [b"\x00\x01 not json", b'{"schema": 99}', b"[" * 5000, b'{"schema":2,"type":"stats"}']
        for i in range(N_BAD):
            pub.publish(f"edgefleet/lab/dev-{i % 50}/stats", kinds[i % len(kinds)])
            if i % 1000 == 0 and i // 1000 < N_HUGE:
                pub.publish("edgefleet/lab/dev-huge/stats", huge)
        for _ in range(N_OVER):
            pub.publish("edgefleet/lab/dev-over/stats", over)
        assert pub.wait_acked(120), "the broker did not acknowledge the flood"
        want = warm_n + N_BAD + N_OVER  # the huge ones never reach the collector
        wait_for(lambda: counted(url, "quarantined") >= want, 120, f"{want} quarantined")
        elapsed = time.monotonic() - started
        after_kib = peak_rss_kib(proc.pid)
        assert counted(url, "quarantined") == want
        assert rows(url) == MAX_ROWS  # the newest rows; the oldest went first
        assert counted(url, "quarantine_evicted") == want - MAX_ROWS
        with open_store(url, migrate=False) as s:
            last = s.query("SELECT topic, payload_bytes, reason FROM quarantine ORDER BY id DESC LIMIT 1")[0]
        assert last[0] == "edgefleet/lab/dev-over/stats" and "exceeds the 98304-byte limit" in last[2]
        # Memory: the 40 MB payloads did not reach the collector (peak RSS grew by far less than one).
        assert after_kib - before_kib < HUGE_BYTES // 1024 // 2, (before_kib, after_kib)
        # The broker refused them at the collector's limit and says so in its log.
        broker_log = (mosquitto.workdir / "mosquitto.log").read_text(errors="replace")
        assert broker_log.count("Dropping too large outgoing PUBLISH for bounds-test") == N_HUGE
        # `fleet status --json` shows the counts.
        out = run_edgefleet(["fleet", "status", "--db", url, "--json"], cli_env)
        q = json.loads(out.stdout)["quarantine"]
        assert q == {"count": MAX_ROWS, "total": want, "evicted": want - MAX_ROWS}
    finally:
        pub.close()
        stop_process(proc, 30)  # SIGTERM: the collector commits and exits 0
    text = log.read_text(errors="replace")
    lines = text.count("quarantined message on")
    # One line, then at most one per QUARANTINE_LOG_EVERY_S, for thousands of messages.
    assert 1 <= lines <= 2 + (elapsed + 60) / QUARANTINE_LOG_EVERY_S, lines
    assert proc.returncode == 0, text[-2000:]
    assert MAX_PACKET_BYTES < HUGE_BYTES
