"""Reliability in numbers: the fault matrix, the agent API under idle connections, a flood of bad messages.

Writes the "Reliability" section of BENCHMARKS.md:

* **Fault matrix**: runs ``tests/reliability/test_fault_matrix.py`` (real agent, collector and
  Mosquitto processes; SIGKILL at points of a stream, broker restarts with and without persistence,
  full disks) and tabulates each case's windows sent, stored, duplicated and lost, with what the
  broker's log says it received. The test asserts these counts; the table is what it measured.
* **Agent API under 2,000 idle connections**: ``edgefleet-agent run`` on a raspberry-pi bundle (the
  digits CNN, full-int8 .tflite in LiteRT, built by the pipeline), 300 real predictions (raw and JSON
  bodies) timed with no other client and again with 2,000 connections open (half idle, half with a
  request sent up to its body): threads, RSS, p50/p99 latency.
* **Collector under a flood of 10,000 bad messages**: ``edgefleet fleet collect`` on a real Mosquitto
  and SQLite with ``--quarantine-max-rows 1000``: RSS before and after, messages per second, and the
  quarantine rows kept against the cap; beside it the same number of valid windows (the plain case).

    .venv/bin/python -m benchmarks.reliability_bench [--bundle DIR --data NPZ] [--skip-matrix]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _bench  # noqa: E402
from benchmarks._bench import markdown_table, progress_print, publish_section, start_mosquitto  # noqa: E402
from benchmarks.agent_bench import (  # noqa: E402
    CNN_EPOCHS,
    IDLE_CONNECTIONS,
    LATENCY_REQUESTS,
    _proc_status,
    build,
    http_poster,
    open_idle_connections,
    start_agent,
    write_config,
)
from tests.helpers import child_pids  # noqa: E402

FLOOD = 10_000
QUARANTINE_CAP = 1_000
FLOOD_TIMEOUT_S = 600.0
# Mosquitto's default max_queued_messages (1000) drops a burst that runs more than about 2,000
# messages (1000 in flight + 1000 queued) ahead of the collector, even while it is connected; the
# flood gets a queue as `fleet broker-config` sizes one (a day of windows), so every message arrives.
BROKER_QUEUE = 100_000


# --------------------------------------------------------------------------------------------------
# Fault matrix (the test, run as it runs in the suite)


def fault_matrix(work: Path) -> tuple[list[dict[str, Any]], str]:
    """Run the fault matrix test file; return each case's counts and pytest's summary line."""
    counts = work / "fault-counts.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/reliability/test_fault_matrix.py",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        env=dict(os.environ, PYTHONPATH=str(_bench.REPO), EDGEFLEET_FAULT_COUNTS=str(counts)),
        cwd=str(_bench.REPO),
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = (r.stdout.strip().splitlines() or ["no output"])[-1]
    rows = [json.loads(line) for line in counts.read_text().splitlines()] if counts.exists() else []
    return rows, summary


# --------------------------------------------------------------------------------------------------
# Agent API under idle connections


def latencies(post: Any, bodies: list[bytes], n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        post(bodies[i % len(bodies)])
        out.append(time.perf_counter() - t)
    return out


def idle_api(bundle: Path, data: Path, work: Path) -> dict[str, Any]:
    """Latency of real predictions with no other client, then with IDLE_CONNECTIONS open."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * IDLE_CONNECTIONS + 256)), hard))
    xs = np.load(data)["x"][:50].astype(np.float32)
    port = _bench.free_port()
    cfg = write_config(work / "idle.toml", bundle, work / "idle-state", None, f"127.0.0.1:{port}", 60)
    cfg.write_text(cfg.read_text() + f"max_connections = {2 * IDLE_CONNECTIONS}\n")
    proc = start_agent(cfg, port)
    socks: list[socket.socket] = []
    shape = ",".join(str(n) for n in xs.shape[1:])
    try:
        posts = {
            "raw": (
                http_poster(f"127.0.0.1:{port}", "application/octet-stream", {"X-Shape": shape}),
                [x.tobytes() for x in xs],
            ),
            "json": (
                http_poster(f"127.0.0.1:{port}", "application/json"),
                [json.dumps({"inputs": x[None].tolist()}).encode() for x in xs],
            ),
        }
        for post, bodies in posts.values():
            latencies(post, bodies, 50)  # warm-up
        res: dict[str, Any] = {}
        before = _proc_status(proc.pid)
        for kind, (post, bodies) in posts.items():
            res[f"alone_{kind}"] = latencies(post, bodies, LATENCY_REQUESTS)
        open_idle_connections(port, socks)
        during = _proc_status(proc.pid)
        for kind, (post, bodies) in posts.items():
            res[f"idle_{kind}"] = latencies(post, bodies, LATENCY_REQUESTS)
        res.update(
            threads_before=before["Threads"],
            threads=during["Threads"],
            rss_before_mb=before["VmRSS"] / 1024,
            rss_mb=during["VmRSS"] / 1024,
            alive=proc.poll() is None,
        )
        return res
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(30)


# --------------------------------------------------------------------------------------------------
# Collector under a flood


def rss_kib(pids: list[int]) -> tuple[float, float]:
    """(VmRSS, VmHWM) summed over the collector and its worker processes, KiB."""
    rss = hwm = 0.0
    for pid in pids:
        try:
            st = _proc_status(pid)
        except OSError:
            continue
        rss += st.get("VmRSS", 0.0)
        hwm += st.get("VmHWM", 0.0)
    return rss, hwm


def counter(db: Path, name: str) -> int:
    try:
        with sqlite3.connect(db, timeout=10) as c:
            got = c.execute("SELECT value FROM collector_counters WHERE name = ?", (name,)).fetchall()
    except sqlite3.OperationalError:
        return 0
    return int(got[0][0]) if got else 0


def bad_messages(good: bytes, n: int) -> list[tuple[str, bytes]]:
    """n hostile payloads of the catalogue's kinds, over 50 device topics."""
    doc = json.loads(good)
    kinds = [
        b"\x00\x01 not json",
        json.dumps(doc).replace(f'"count": {doc["count"]}', '"count": NaN').encode(),
        b"[" * 5000,
        json.dumps({**doc, "seq": "7"}).encode(),
        json.dumps({**doc, "device_id": "someone-else"}).encode(),
        b'{"schema": 2, "type": "stats"}',
    ]
    oversize = json.dumps({**doc, "agent_version": "x" * 105_000}).encode()  # over the payload limit
    out = []
    for i in range(n):
        payload = oversize if i % 50 == 49 else kinds[i % len(kinds)]
        out.append((f"edgefleet/bench/dev-{i % 50}/stats", payload))
    return out


def flood(work: Path) -> dict[str, Any]:
    """Start Mosquitto and `fleet collect`; publish FLOOD bad messages, then FLOOD valid windows."""
    from device_agent.formats.telemetry import ModelRef
    from toolchain.fleet.sim import (
        Publisher,
        digits_baseline,
        load_digits,
        stats_payload,
        status_payload,
        window_profile,
        write_bundle,
    )

    broker, url = start_mosquitto(work, f"max_queued_messages {BROKER_QUEUE}\n")
    if broker is None or url is None:
        raise RuntimeError("mosquitto is not installed")
    db = work / "flood.db"
    db_url = f"sqlite:///{db}"
    env = dict(os.environ, PYTHONPATH=str(_bench.REPO))
    edgefleet = [sys.executable, "-c", "from toolchain.cli import main; main()"]
    base, model = digits_baseline()
    bundle, sha = write_bundle(work / "bundle", base)
    subprocess.run(
        [*edgefleet, "fleet", "register", str(bundle), "--db", db_url],
        env=env,
        check=True,
        capture_output=True,
    )
    ref = ModelRef("digits", 1, sha)
    x = load_digits()["x_test"][:40]
    prof = window_profile(base.spec, x, model.predict(x))
    cmd = [
        *edgefleet,
        "fleet",
        "collect",
        "--broker",
        url,
        "--db",
        db_url,
        "--client-id",
        "flood-bench",
        "--no-alerts",
    ]
    cmd += ["--quarantine-max-rows", str(QUARANTINE_CAP)]
    col = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=(work / "collector.log").open("wb")
    )
    pub = Publisher(url)
    res: dict[str, Any] = {}
    try:
        pub.publish(*status_payload("dev-0", ref, fleet="bench"), retain=True)
        _wait(lambda: db.exists() and _has_device(db), col)  # subscribed: it stored the retained status
        # Warm up (imports, caches, first transactions) with 100 of each kind.
        bad = bad_messages(stats_payload("dev-0", 1, ref, prof, fleet="bench")[1], FLOOD)
        pub.publish_all(bad[:100])
        pub.publish_all(stats_payload(f"dev-{i}", 100_000 + i, ref, prof, fleet="bench") for i in range(100))
        _wait(lambda: counter(db, "quarantined") >= 100 and counter(db, "windows_stored") >= 100, col)
        pids = [col.pid, *child_pids(col.pid)]
        res["rss_before_mb"] = rss_kib(pids)[0] / 1024
        t = time.perf_counter()
        pub.publish_all(bad)
        _wait(lambda: counter(db, "quarantined") >= 100 + FLOOD, col)
        res["bad_s"] = time.perf_counter() - t
        rss, hwm = rss_kib(pids)
        res["rss_after_bad_mb"], res["hwm_after_bad_mb"] = rss / 1024, hwm / 1024
        good = [stats_payload(f"dev-{i % 50}", i + 1, ref, prof, fleet="bench") for i in range(FLOOD)]
        t = time.perf_counter()
        pub.publish_all(good)
        _wait(lambda: counter(db, "windows_stored") >= 100 + FLOOD, col)
        res["good_s"] = time.perf_counter() - t
        res["rss_after_good_mb"] = rss_kib(pids)[0] / 1024
        with sqlite3.connect(db, timeout=10) as c:
            res["quarantine_rows"] = int(c.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0])
        res["quarantined"] = counter(db, "quarantined")
        res["evicted"] = counter(db, "quarantine_evicted")
        res["log_lines"] = (
            (work / "collector.log").read_text(errors="replace").count("quarantined message on")
        )
        res["alive"] = col.poll() is None
        res["broker_dropped"] = counter_rises(db)
    finally:
        pub.close()
        col.terminate()
        try:
            col.wait(30)
        except subprocess.TimeoutExpired:
            col.kill()
        broker.terminate()
        broker.wait(10)
    return res


def counter_rises(db: Path) -> int:
    """Messages the broker dropped after acknowledging them, as the collector saw ($SYS)."""
    try:
        with sqlite3.connect(db, timeout=10) as c:
            return int(c.execute("SELECT COALESCE(SUM(rises), 0) FROM broker_counters").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def _has_device(db: Path) -> bool:
    try:
        with sqlite3.connect(db, timeout=10) as c:
            return bool(c.execute("SELECT 1 FROM devices").fetchall())
    except sqlite3.OperationalError:
        return False


def _wait(pred: Any, col: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + FLOOD_TIMEOUT_S
    while not pred():
        if col.poll() is not None:
            raise RuntimeError(f"the collector exited with {col.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("the collector did not keep up within the timeout")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------------
# Report


def pct(v: list[float], q: float) -> float:
    return float(np.percentile(v, q) * 1e3)


def report(
    matrix: list[dict[str, Any]], summary: str, api: dict[str, Any] | None, fl: dict[str, Any]
) -> None:
    parts = []
    if matrix:
        rows = []
        for r in matrix:
            extra = {k: v for k, v in r.items() if k not in ("case", "sent", "stored", "duplicated", "lost")}
            note = ", ".join(
                f"{k.replace('_', ' ')} {v}" for k, v in extra.items() if k != "received_by_broker"
            )
            rows.append(
                [
                    r["case"],
                    r["sent"],
                    r["stored"],
                    r["duplicated"],
                    r["lost"],
                    extra.get("received_by_broker"),
                    note,
                ]
            )
        parts.append(
            f"**Fault matrix** (`tests/reliability/test_fault_matrix.py`: {summary})\n\n"
            + markdown_table(
                ["case", "sent", "stored", "duplicated", "lost", "broker received", "notes"], rows
            )
        )
    if api is not None:
        rows = [
            ["threads", f"{api['threads_before']:.0f}", f"{api['threads']:.0f}"],
            ["RSS MB", api["rss_before_mb"], api["rss_mb"]],
        ]
        for kind in ("raw", "json"):
            rows.append([f"{kind} p50 ms", pct(api[f"alone_{kind}"], 50), pct(api[f"idle_{kind}"], 50)])
            rows.append([f"{kind} p99 ms", pct(api[f"alone_{kind}"], 99), pct(api[f"idle_{kind}"], 99)])
        parts.append(
            f"**Agent API under {IDLE_CONNECTIONS:,} idle connections** (digits CNN, raspberry-pi bundle, LiteRT;"
            f" {LATENCY_REQUESTS} real predictions of each kind; still serving after: {api['alive']})\n\n"
            + markdown_table(["", "no other client", f"{IDLE_CONNECTIONS:,} connections open"], rows)
        )
    rows = [
        [
            f"{FLOOD:,} bad messages",
            FLOOD / fl["bad_s"],
            fl["rss_before_mb"],
            fl["rss_after_bad_mb"],
            f"{fl['quarantine_rows']:,} kept (cap {QUARANTINE_CAP:,}), {fl['quarantined'] - 100:,} + 100 warm-up"
            f" counted, {fl['evicted']:,} evicted; {fl['log_lines']} log lines; broker drops"
            f" {fl['broker_dropped']}",
        ],
        [
            f"{FLOOD:,} valid windows (plain)",
            FLOOD / fl["good_s"],
            fl["rss_after_bad_mb"],
            fl["rss_after_good_mb"],
            "stored",
        ],
    ]
    parts.append(
        "**Collector under a flood** (`edgefleet fleet collect`, SQLite, one decode worker; RSS of the"
        f" collector and its workers; still running after: {fl['alive']})\n\n"
        + markdown_table(["messages", "messages/s", "RSS before MB", "RSS after MB", "quarantine"], rows)
    )
    intro = (
        "`benchmarks/reliability_bench.py`. *Fault matrix*: real `edgefleet-agent run` (ONNX bundle, one window per"
        " request of 4 predictions), Mosquitto 2 (`persistence true`, `autosave_interval 1` unless the case says"
        " otherwise) and `edgefleet fleet collect` on SQLite; *sent* is the agent's outbox seq, *stored* the"
        " distinct windows in the database, *duplicated* the collector's `windows_duplicate`, *lost* the sent"
        " windows not stored, *broker received* the PUBLISHes of the device in Mosquitto's log (resends"
        " included). *Agent API*: 2,000 connections, half idle and half with a request sent up to its body."
        " *Flood*: the hostile payload kinds of `tests/reliability/test_hostile_payloads.py` over 50 device"
        " topics, one in 50 over the 96 KiB payload limit, `--quarantine-max-rows 1000`, Mosquitto with"
        f" `max_queued_messages {BROKER_QUEUE:,}`: with its default of 1,000 the broker dropped 6,418 of"
        " 10,100 messages of the flood after acknowledging them, with the collector connected (a burst"
        " more than about 2,000 messages ahead of it); the collector saw the drops on `$SYS`, logged and"
        " stored them."
    )
    body = "\n\n".join(parts)
    publish_section("reliability", "Reliability", body, intro=intro)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--bundle", type=Path, help="a built bundle for the API rows (default: build the digits CNN)"
    )
    ap.add_argument("--data", type=Path, help="inputs for --bundle (.npz with x)")
    ap.add_argument("--skip-matrix", action="store_true", help="leave the fault matrix out")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="reliability-bench-"))
    try:
        matrix: list[dict[str, Any]] = []
        summary = ""
        if not args.skip_matrix:
            progress_print("== fault matrix (tests/reliability/test_fault_matrix.py) ...")
            matrix, summary = fault_matrix(work)
            progress_print(f"   {summary}")
        progress_print(f"== collector under a flood of {FLOOD:,} bad messages ...")
        fl = flood(work)
        bundle, data = args.bundle, args.data
        if bundle is None:
            progress_print("== digits CNN: training and building the raspberry-pi bundle ...")
            bundle, data = (
                build("cnn", _bench.DIGITS, _bench.DIGITS_TEST, CNN_EPOCHS, work),
                _bench.DIGITS_TEST,
            )
        assert data is not None
        progress_print(f"== agent API under {IDLE_CONNECTIONS:,} idle connections ...")
        api = idle_api(bundle, data, work)
        report(matrix, summary, api, fl)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
