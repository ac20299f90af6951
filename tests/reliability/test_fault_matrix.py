"""The fault matrix: real processes killed at points of a stream, with exact counts of windows.

Every case runs the real agent (`edgefleet-agent run`, an ONNX bundle in ONNX Runtime, disk outbox,
MQTT 5), a real Mosquitto and the real collector (`edgefleet fleet collect`, SQLite). The agent closes
one window per request (``W`` predictions, ``window_max_samples = W``), so the windows it answered
for are known. Each case counts:

* sent: windows the agent committed to its outbox (its ``seq``; `/v1/health` ``outbox.next_seq - 1``,
  or the outbox file of a killed agent);
* stored: distinct windows of the device in the fleet database;
* duplicated: windows the collector received again and did not store (``windows_duplicate``);
* lost: sent windows that are not stored (``0`` wherever the delivery guarantee holds).

Kill points inside the collector (before its commit, after its commit but before the PUBACKs) are
reached by a prelude that wraps the collector's batch step and SIGKILLs its own process there; the
collector code has no test hooks. With ``EDGEFLEET_FAULT_COUNTS=FILE`` every case appends its counts
as a JSON line (benchmarks/reliability_bench.py writes them to BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Mosquitto, missing_service, mosquitto_binary
from tests.device_agent.agent_bundles import cached_onnx_bundle, digits
from tests.device_agent.agent_helpers import AgentProcess, http, write_config
from tests.helpers import REPO, run_edgefleet, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

W = 4  # predictions per window (one request closes one window)
DEVICE = "pi-001"
COLLECTOR_ID = "fault-collector"
COUNTS_ENV = "EDGEFLEET_FAULT_COUNTS"

# `edgefleet fleet collect` with an optional kill point: EDGEFLEET_TEST_KILL_AT=before-commit:N or
# after-commit:N SIGKILLs the collector at its N-th batch that holds windows, before its database
# commit or after it (before the PUBACKs, which are sent once the batch step returns). The number of
# windows in that batch goes to EDGEFLEET_TEST_KILLED first.
COLLECTOR_PRELUDE = r"""
import os, signal, time
point = os.environ.get("EDGEFLEET_TEST_KILL_AT")
if point:
    import toolchain.fleet.collector as C
    where, n = point.split(":")
    n = int(n)
    orig = C.Ingestor.process
    seen = [0]
    def die(windows):
        with open(os.environ["EDGEFLEET_TEST_KILLED"], "w") as fh:
            fh.write(str(windows))
        os.kill(os.getpid(), signal.SIGKILL)
    def process(self, batch, decoded=None):
        windows = sum(1 for m in batch if m.topic.endswith("/stats"))
        if windows:
            seen[0] += 1
        hit = windows and seen[0] == n
        if hit and where == "before-commit":
            die(windows)
        res = orig(self, batch, decoded)
        if hit and where == "after-commit":
            time.sleep(0.5)  # the PUBACKs of earlier batches leave; this batch's are never sent
            die(windows)
        return res
    C.Ingestor.process = process
from toolchain.cli import main
main()
"""


def record(case: str, **counts: Any) -> None:
    """Append one case's counts for the benchmark (when asked to)."""
    path = os.environ.get(COUNTS_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"case": case, **counts}) + "\n")


class Rig:
    """A broker, a collector process and an agent process of one test, with their counts."""

    def __init__(
        self,
        work: Path,
        broker_conf: str = "persistence true\nautosave_interval 1",
        db_dir: Path | None = None,
    ) -> None:
        if not mosquitto_binary():
            missing_service("mosquitto (apt-get install mosquitto)")
        self.work = work
        self.broker = Mosquitto(work)
        text = self.broker.conf.read_text().replace("persistence false\n", "")
        if "persistence true" in broker_conf:
            broker_conf += f"\npersistence_location {work}/"
        self.broker.conf.write_text(text + broker_conf + "\nlog_type all\n")
        self.broker.start()
        self.db = (db_dir or work) / "fleet.db"
        self.url = f"sqlite:///{self.db}"
        self.env = dict(os.environ, PYTHONPATH=str(REPO))
        self.collector: subprocess.Popen[bytes] | None = None
        self.collectors: list[subprocess.Popen[bytes]] = []
        self.agent: AgentProcess | None = None
        self.agents = 0
        self.state = work / "state"
        self.x = digits()["x_test"]
        self.requests = 0  # requests answered with 200 (each closed one window)
        self.cfg = write_config(
            work / "agent.toml",
            bundle=cached_onnx_bundle(),
            state_dir=self.state,
            url=self.broker.url,
            device_id=DEVICE,
            window_s=3600,
            window_max_samples=W,
            outbox_max_rows=5000,
        )

    # ---------------------------------------------------------------- processes
    def start_collector(self, kill_at: str | None = None) -> None:
        """Start `fleet collect`; return once it is connected and subscribed.

        Subscribed: it stored the device's retained status again (the broker sends retained messages on
        every subscription); before the agent ever ran, connected is all there is to wait for.
        """
        env = dict(self.env)
        if kill_at:
            env.update(EDGEFLEET_TEST_KILL_AT=kill_at, EDGEFLEET_TEST_KILLED=str(self.work / "killed"))
        cmd = [sys.executable, "-c", COLLECTOR_PRELUDE, "fleet", "collect", "--broker", self.broker.url]
        cmd += ["--db", self.url, "--client-id", COLLECTOR_ID, "--no-alerts"]
        log = (self.work / "collector.log").open("ab")
        connects = self.collector_log().count("connected to ")
        t0 = time.time()
        self.collector = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        self.collectors.append(self.collector)
        wait_for(
            lambda: self.collector_alive() and self.collector_log().count("connected to ") > connects,
            60,
            "connected",
        )
        if self.agents:
            wait_for(
                lambda: self.collector_alive() and self.last_seen() >= t0, 60, "the device's retained status"
            )

    def collector_alive(self) -> bool:
        if self.collector is not None and self.collector.poll() is not None:
            raise AssertionError(f"collector exited: {self.collector_log()[-2000:]}")
        return True

    def last_seen(self) -> float:
        got = self.sql(f"SELECT last_seen FROM devices WHERE device_id='{DEVICE}'")
        return float(got[0][0]) if got else 0.0

    def collector_log(self) -> str:
        p = self.work / "collector.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop_collector(self) -> None:
        c = self.collector
        if c is not None and c.poll() is None:
            c.send_signal(signal.SIGTERM)
            c.wait(30)
        self.collector = None

    def kill_collector(self) -> None:
        assert self.collector is not None
        self.collector.kill()
        self.collector.wait(30)
        self.collector = None

    def start_agent(self) -> str:
        self.agents += 1
        t0 = time.time()
        self.agent = AgentProcess(self.cfg, self.work / f"agent{self.agents}.log")
        base = self.agent.api_base()
        if self.collector is not None:  # its status reached the collector: connected, and so are we
            wait_for(lambda: self.last_seen() >= t0, 60, "the agent's status in the database")
        return base

    def kill_agent(self) -> None:
        assert self.agent is not None
        self.agent.kill()
        self.agent = None

    def wait_saved(self, now: bool = False) -> None:
        """Wait until the broker wrote its state (sessions, queues) to its persistence file once more.

        Mosquitto logs "Saving in-memory database" *before* it writes ``mosquitto.db.new`` and renames
        it over ``mosquitto.db``. With ``now`` (SIGUSR1: save at once; no autosave in between), the
        save is done when the file is a new one; otherwise (autosave every second) when the save
        after the next one starts: saves run one after the other.
        """
        log = self.broker.workdir / "mosquitto.log"
        db = self.broker.workdir / "mosquitto.db"

        def ident() -> tuple[int, int] | None:
            try:
                st = db.stat()
            except FileNotFoundError:
                return None
            return (st.st_ino, st.st_mtime_ns)

        if now:
            before = ident()
            assert self.broker.proc is not None
            self.broker.proc.send_signal(signal.SIGUSR1)
            wait_for(lambda: ident() not in (None, before), 30, "the state written")
            return
        n = log.read_text(errors="replace").count("Saving in-memory database")
        wait_for(
            lambda: log.read_text(errors="replace").count("Saving in-memory database") >= n + 2, 30, "a save"
        )

    def wait_collector_acked(self) -> None:
        """Wait until the collector acknowledged every QoS 1 message the broker sent it (broker log)."""
        path = self.broker.workdir / "mosquitto.log"

        def acked() -> bool:
            lines = path.read_text(errors="replace").splitlines()
            sent = sum(1 for x in lines if f"Sending PUBLISH to {COLLECTOR_ID} (d0, q1" in x)
            sent += sum(1 for x in lines if f"Sending PUBLISH to {COLLECTOR_ID} (d1, q1" in x)
            return sent == sum(1 for x in lines if f"Received PUBACK from {COLLECTOR_ID}" in x)

        wait_for(acked, 30, "the collector's PUBACKs")

    def kill_broker(self) -> None:
        assert self.broker.proc is not None
        self.broker.proc.kill()
        self.broker.proc.wait(10)
        self.broker.proc = None

    def close(self) -> None:
        if self.agent is not None:
            self.agent.kill()
        for c in self.collectors:
            if c.poll() is None:
                c.kill()
                c.wait(10)
        self.broker.stop()

    # ---------------------------------------------------------------- traffic and counts
    def windows(self, n: int) -> None:
        """Answer ``n`` requests of W predictions (each closes one window)."""
        assert self.agent is not None
        base = self.agent.api_base()
        for _ in range(n):
            at = (self.requests * W) % (len(self.x) - W)
            code, doc = http(base, "/v1/predict", {"inputs": self.x[at : at + W].tolist()})
            assert code == 200, doc
            self.requests += 1

    def health(self) -> dict[str, Any]:
        assert self.agent is not None
        code, doc = http(self.agent.api_base(), "/v1/health")
        assert code == 200, doc
        return dict(doc)

    def sent(self) -> int:
        """Windows committed to the agent's outbox (seq 1..sent), read from the outbox file."""
        with sqlite3.connect(self.state / "outbox.sqlite3", timeout=10) as c:
            return int(c.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()[0]) - 1

    def outbox_rows(self) -> int:
        with sqlite3.connect(self.state / "outbox.sqlite3", timeout=10) as c:
            return int(c.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def sql(self, q: str) -> list[tuple[Any, ...]]:
        if not self.db.exists():
            return []
        with sqlite3.connect(self.db, timeout=10) as c:
            try:
                return c.execute(q).fetchall()
            except sqlite3.OperationalError:  # tables not made yet
                return []

    def seqs(self) -> list[int]:
        return [
            int(s) for (s,) in self.sql(f"SELECT seq FROM windows WHERE device_id='{DEVICE}' ORDER BY seq")
        ]

    def stored(self) -> int:
        return len(self.seqs())

    def counter(self, name: str) -> int:
        got = self.sql(f"SELECT value FROM collector_counters WHERE name='{name}'")
        return int(got[0][0]) if got else 0

    def wait_stored(self, n: int, timeout_s: float = 60) -> None:
        def done() -> bool:
            return self.collector_alive() and self.stored() >= n

        wait_for(done, timeout_s, f"{n} windows stored (have {self.stored()})")

    def wait_drained(self, timeout_s: float = 60) -> None:
        wait_for(lambda: self.health()["outbox"]["rows"] == 0, timeout_s, "the agent's outbox drained")

    def broker_received(self) -> int:
        """Windows the broker received from the device (its log, `log_type all`), resends included."""
        log = (self.broker.workdir / "mosquitto.log").read_text(errors="replace")
        return sum(
            1
            for line in log.splitlines()
            if f"Received PUBLISH from edgefleet-{DEVICE} " in line
            and f"'edgefleet/lab/{DEVICE}/stats'" in line
        )

    def counts(self, case: str, redelivered: int = 0, **extra: Any) -> dict[str, int]:
        """The case's counts (recorded for the benchmark); lost = sent windows not stored.

        Checked against the broker's own log: every window the broker received from the device more
        than once, and every window it delivered again after a collector was killed between its commit
        and its PUBACKs (``redelivered``), is one duplicate; every other received window is stored or lost.
        """
        sent = self.sent()
        seqs = set(self.seqs())
        out = {
            "sent": sent,
            "stored": len(seqs),
            "duplicated": self.counter("windows_duplicate"),
            "lost": len(set(range(1, sent + 1)) - seqs),
        }
        assert seqs <= set(range(1, sent + 1)), "a window the agent never sent was stored"
        received = self.broker_received()
        assert out["duplicated"] == received - out["stored"] - out["lost"] + redelivered, (received, out)
        record(case, **out, received_by_broker=received, **extra)
        return out


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


# -------------------------------------------------------------------------------------------------- agent


def test_agent_sigkill_with_unacknowledged_windows_resends_them(rig: Rig) -> None:
    """SIGKILL of the agent while its windows wait for a PUBACK (broker stopped with SIGSTOP)."""
    rig.start_collector()
    rig.start_agent()
    rig.windows(5)
    rig.wait_stored(5)
    assert rig.broker.proc is not None
    rig.broker.proc.send_signal(signal.SIGSTOP)  # PUBLISHes reach its socket, no PUBACK comes back
    try:
        rig.windows(6)
        wait_for(lambda: rig.sent() == 11, 30, "11 windows in the outbox")
        assert rig.outbox_rows() == 6
        rig.kill_agent()
    finally:
        rig.broker.proc.send_signal(signal.SIGCONT)
    rig.start_agent()
    rig.windows(3)
    rig.wait_stored(14)
    rig.wait_drained()
    c = rig.counts("agent SIGKILL, 6 windows not yet acknowledged")
    assert c["sent"] == c["stored"] == 14 and c["lost"] == 0
    # The broker read, after SIGCONT, those of the 6 the agent had written to its socket, and passed them
    # on; the restarted agent sent all 6 again: exactly those are the duplicates (counts() checks it).
    assert c["duplicated"] <= 6
    assert rig.seqs() == list(range(1, 15))


def test_agent_sigkill_mid_stream_loses_no_committed_window(rig: Rig) -> None:
    """SIGKILL of the agent while it answers requests: only windows closed and not yet committed can go."""
    rig.start_collector()
    rig.start_agent()
    import threading

    stop = threading.Event()
    errors: list[BaseException] = []

    def traffic() -> None:
        try:
            while not stop.is_set():
                rig.windows(1)
        except BaseException as e:  # noqa: BLE001 - the kill ends the traffic with a connection error
            errors.append(e)

    t = threading.Thread(target=traffic)
    t.start()
    rig.wait_stored(20)
    rig.kill_agent()
    stop.set()
    t.join(30)
    answered = rig.requests
    sent_at_kill = rig.sent()
    rig.start_agent()
    rig.windows(2)
    rig.wait_stored(sent_at_kill + 2)
    rig.wait_drained()
    c = rig.counts(
        "agent SIGKILL mid-stream (a window every few ms)",
        closed_not_committed=answered - sent_at_kill,
    )
    assert c["lost"] == 0 and c["stored"] == c["sent"] == sent_at_kill + 2
    assert rig.seqs() == list(range(1, sent_at_kill + 3))
    # What a kill takes: windows closed (their requests answered) that the writer thread had not yet
    # committed to the outbox. They never got a seq, so nothing downstream can see them missing; with
    # a window every few ms under full load that backlog is large (docs/agent.md, Guarantees).
    assert answered >= sent_at_kill


# -------------------------------------------------------------------------------------------------- collector


@pytest.mark.parametrize("point", ["before-commit", "after-commit"])
def test_collector_sigkill_inside_a_batch(rig: Rig, point: str) -> None:
    """SIGKILL of the collector at its 3rd batch of windows, before or after the commit (never acked)."""
    rig.start_collector(kill_at=f"{point}:3")
    rig.start_agent()
    for _ in range(20):  # batches of a few windows each
        rig.windows(2)
        time.sleep(0.1)
        if rig.collector is not None and rig.collector.poll() is not None:
            break
    assert rig.collector is not None
    assert rig.collector.wait(30) == -signal.SIGKILL
    in_batch = int((rig.work / "killed").read_text())
    stored_at_kill = rig.stored()
    rig.windows(5)
    rig.wait_drained()  # the broker acknowledged every window: the agent forgot them
    rig.start_collector()
    total = rig.sent()
    rig.wait_stored(total)
    again = in_batch if point == "after-commit" else 0
    c = rig.counts(f"collector SIGKILL {point.replace('-', ' ')}", redelivered=again, killed_batch=in_batch)
    assert c["lost"] == 0 and c["stored"] == c["sent"] == total
    # after-commit: stored, never acknowledged, so redelivered and counted as duplicates (checked in
    # counts() against the broker's log); before-commit: rolled back with the process, stored now.
    assert stored_at_kill >= (in_batch if point == "after-commit" else 0)
    assert rig.seqs() == list(range(1, total + 1))


# -------------------------------------------------------------------------------------------------- broker


def test_broker_sigkill_before_publish_ack(rig: Rig) -> None:
    """SIGKILL of the broker while it holds PUBLISHes it has not acknowledged (stopped with SIGSTOP)."""
    rig.start_collector()
    rig.start_agent()
    rig.windows(4)
    rig.wait_stored(4)
    rig.wait_saved()  # the collector's session is on disk (else a crash loses it: see the offline cases)
    assert rig.broker.proc is not None
    rig.broker.proc.send_signal(signal.SIGSTOP)
    rig.windows(5)
    wait_for(lambda: rig.sent() == 9, 30, "9 windows in the outbox")
    assert rig.outbox_rows() == 5
    rig.kill_broker()
    rig.broker.start()
    rig.windows(2)
    rig.wait_stored(11)
    rig.wait_drained()
    c = rig.counts("broker SIGKILL before PUBACK")
    assert c == {"sent": 11, "stored": 11, "duplicated": 0, "lost": 0}


def test_broker_sigkill_with_the_collector_online(rig: Rig) -> None:
    """SIGKILL of the broker after it acknowledged and delivered: nothing it still owed is lost."""
    rig.start_collector()
    rig.start_agent()
    rig.windows(10)
    rig.wait_stored(10)
    rig.wait_saved()
    rig.kill_broker()
    rig.windows(5)  # while the broker is down: into the outbox
    rig.broker.start()
    rig.windows(3)
    rig.wait_stored(18)
    rig.wait_drained()
    c = rig.counts("broker SIGKILL, collector online")
    assert c == {"sent": 18, "stored": 18, "duplicated": 0, "lost": 0}


@pytest.mark.parametrize(
    "conf,restart,lost",
    [
        ("persistence true\nautosave_interval 1", "kill", 0),  # saved after the acks: kept
        ("persistence true\nautosave_interval 3600", "kill", 12),  # acknowledged since the last save: lost
        ("persistence false", "stop", 12),  # a clean restart without persistence: the session is gone
    ],
    ids=["persistence-saved", "persistence-unsaved", "no-persistence"],
)
def test_broker_restart_while_the_collector_is_offline(
    tmp_path: Path, conf: str, restart: str, lost: int
) -> None:
    """Windows the broker acknowledged and queued for the offline collector's persistent session."""
    rig = Rig(tmp_path, broker_conf=conf)
    try:
        rig.start_collector()
        rig.start_agent()
        rig.windows(6)
        rig.wait_stored(6)
        if "persistence true" in conf:  # the collector's session is on disk (SIGUSR1: save now)
            rig.wait_collector_acked()  # with nothing in flight to it
            rig.wait_saved(now=True)
        rig.stop_collector()
        rig.windows(12)
        # all 12 committed by the writer thread (else the outbox can look drained before the last are
        # written, and those reach the broker only after its restart), then acknowledged by the broker
        wait_for(lambda: rig.sent() == 6 + 12, 30, "the 12 windows in the outbox")
        rig.wait_drained()  # acknowledged by the broker: deleted from the agent's outbox
        if "autosave_interval 1" in conf:
            rig.wait_saved()  # the queued windows are on disk
        if restart == "kill":
            rig.kill_broker()
        else:
            rig.broker.stop()
        rig.broker.start()
        rig.start_collector()
        rig.windows(3)
        rig.wait_stored(6 + 12 - lost + 3)
        rig.wait_drained()
        time.sleep(1.0)  # nothing more arrives
        seqs = rig.seqs()
        c = rig.counts(
            f"broker restart ({conf.replace(chr(10), ', ')}; {'SIGKILL' if restart == 'kill' else 'SIGTERM'}),"
            " 12 windows queued for the offline collector",
            gap=seqs[-1] - len(seqs),
        )
        assert c["sent"] == 21 and c["lost"] == lost and c["stored"] == 21 - lost and c["duplicated"] == 0
        # The loss shows as a gap in the device's seq (same stream, later windows stored).
        assert seqs == [s for s in range(1, 22) if not 6 < s <= 6 + lost]
        # What the collector was told on reconnecting: without persistence its session is gone too; with
        # an unsaved queue the session is there and only the seq gap shows the loss.
        present = "session present: True" in rig.collector_log().rsplit("connected to", 1)[-1]
        assert present == ("persistence true" in conf)
        # A lost session is counted (once), logged and shown by fleet status; a kept one is not.
        from toolchain.fleet.status import broker_sessions

        (session,) = broker_sessions(rig.url)
        assert session["connections"] == 2 and session["lost"] == (0 if present else 1)
        assert rig.collector_log().count("had no session for collector") == (0 if present else 1)
        out = subprocess.run(
            [sys.executable, "-m", "toolchain.cli", "fleet", "status", "--db", rig.url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert ("session 1 time(s), with the windows queued for it" in out.stdout) == (not present)
        # Whatever the broker did, the windows it lost are missing from the device's seq, and status says so
        # (the unsaved queue is the case no broker counter and no session flag shows).
        doc = json.loads(
            subprocess.run(
                [sys.executable, "-m", "toolchain.cli", "fleet", "status", "--db", rig.url, "--json"],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
        )
        (dev,) = doc["devices"]
        assert dev["missing_windows"] == lost
        assert (f"{lost} window(s) missing from the seq of 1 device(s)" in out.stdout) == (lost > 0)
    finally:
        rig.close()


# -------------------------------------------------------------------------------------------------- full disks


def mount_tmpfs(where: Path, size_kib: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)], capture_output=True
    )
    if r.returncode != 0:  # skipped by hand, a failure under ./run test (EDGEFLEET_REQUIRE_SERVICES=1)
        missing_service(
            f"a small tmpfs for a full disk (mount failed: {r.stderr.decode().strip()}; run as root)"
        )


def umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(where: Path) -> Path:
    """Fill the file system at ``where`` to the last byte; return the filler (delete it to free space)."""
    filler = where / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for size in (65536, 4096, 512, 1):
            while True:
                try:
                    fh.write(b"\0" * size)
                except OSError:
                    break
    return filler


def test_full_disk_for_the_outbox(tmp_path: Path) -> None:
    """The agent's state dir fills up: it keeps answering, counts each window it could not store,
    reports them to the fleet in the next stored window, and stores again once there is room."""
    fs = tmp_path / "fs"
    mount_tmpfs(fs, 2048)
    rig = Rig(tmp_path)
    rig.state = fs / "state"
    rig.cfg = write_config(
        tmp_path / "agent.toml",
        bundle=cached_onnx_bundle(),
        state_dir=rig.state,
        url=rig.broker.url,
        device_id=DEVICE,
        window_s=3600,
        window_max_samples=W,
    )
    try:
        rig.start_collector()
        rig.start_agent()
        rig.windows(5)
        rig.wait_stored(5)
        rig.wait_collector_acked()  # (else the broker redelivers those after its restart: duplicates)
        rig.broker.stop()  # windows must be written, not only passed on
        filler = fill(fs)
        rig.windows(30)  # the WAL has some room left; the rest cannot be stored

        def judged() -> bool:
            h = rig.health()
            return bool(h["windows_written"] + h["outbox"]["write_errors"] == 35)

        wait_for(judged, 30, "all 35 windows written or counted as not stored")
        h = rig.health()
        not_stored = h["outbox"]["write_errors"]
        assert not_stored > 0 and h["predictions_total"] == 35 * W  # it kept answering
        filler.unlink()  # room again
        rig.broker.start()
        rig.windows(3)
        wait_for(lambda: rig.health()["windows_written"] == 35 - not_stored + 3, 30, "the new windows stored")
        rig.wait_drained()
        total = rig.sent()
        rig.wait_stored(total)
        c = rig.counts("full disk for the outbox", not_stored_by_agent=not_stored)
        assert c["lost"] == 0 and c["stored"] == total == 35 - not_stored + 3
        # The fleet sees what the agent could not store: the next stored window reports it.
        doc = json.loads(run_edgefleet(["fleet", "status", "--db", rig.url, "--json"], rig.env).stdout)
        (dev,) = doc["devices"]
        assert dev["dropped_windows"] == not_stored
        assert "not stored" in (rig.work / "agent1.log").read_text()
    finally:
        rig.close()
        umount(fs)


def test_full_disk_for_the_database(tmp_path: Path) -> None:
    """The collector's database fills up: it keeps the batch unacknowledged, retries, counts the
    errors, and stores everything once there is room; nothing stored before is lost."""
    fs = tmp_path / "fs"
    mount_tmpfs(fs, 4096)
    rig = Rig(tmp_path, db_dir=fs)
    try:
        rig.start_collector()
        rig.start_agent()
        rig.windows(5)
        rig.wait_stored(5)
        filler = fill(fs)
        rig.windows(40)
        wait_for(lambda: "storing a batch of" in rig.collector_log(), 30, "a failed commit")
        rig.wait_drained()  # the broker holds them for the collector
        assert rig.collector is not None and rig.collector.poll() is None
        assert rig.stored() == 5 or rig.stored() < 45
        filler.unlink()
        rig.wait_stored(45, 90)
        rig.windows(2)
        rig.wait_stored(47)
        c = rig.counts("full disk for the database")
        assert c == {"sent": 47, "stored": 47, "duplicated": 0, "lost": 0}
        assert rig.seqs() == list(range(1, 48))
    finally:
        rig.close()
        umount(fs)
