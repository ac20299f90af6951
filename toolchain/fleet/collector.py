"""The collector daemon: MQTT 5 in, SQLite or PostgreSQL out, acknowledged only after the commit.

Flow: paho's network thread puts every message on a queue *without* acknowledging it
(``manual_ack=True``). The worker thread takes a batch (up to ``BATCH_MAX`` messages or
``BATCH_WAIT_S``), decodes and validates each message, stores the batch in one transaction, and only
after the commit returns sends the PUBACKs (``client.ack(mid, qos)``). A collector killed at any
moment has therefore acknowledged only what is committed; the broker redelivers the rest to the
persistent session (``clean_start=False`` with a session expiry), and ``UNIQUE (fleet, device_id,
seq)`` makes the redelivery a no-op.

Every message is untrusted (``device_agent.formats.telemetry`` decoders: size limit, JSON, depth, schema,
known keys, finite numbers, payload ids equal to the topic's; histogram lengths against the registered
baseline). A message that fails goes to the ``quarantine`` table with its reason and the first
``QUARANTINE_HEAD_BYTES`` bytes, is counted, logged, and acknowledged: it can never succeed later.

Subscriptions: ``stats`` and ``events`` through ``$share/<group>/...`` when a shared group is set, so
several collectors split them; ``status`` always directly, because brokers do not send retained
messages to shared subscriptions and every collector should know every device's state.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from device_agent.formats.telemetry import (
    TelemetryError,
    decode_event,
    decode_stats,
    decode_status,
    parse_topic,
)
from toolchain.errors import ToolchainError
from toolchain.fleet.alerts import Evaluator
from toolchain.fleet.fastpath import FastWindow, Refused, decode_window
from toolchain.fleet.ratelog import Throttle
from toolchain.fleet.registry import BaselineCache, BundleDirectory, RegistryError, register_bundle
from toolchain.fleet.storage import StorageError, Store, dumps, open_store, pack_profile
from toolchain.fleet.workers import DecodePool, EvalWorker, default_workers

log = logging.getLogger("edgefleet.fleet.collector")

BATCH_MAX = 500
BATCH_WAIT_S = 0.05
RECEIVE_MAXIMUM = 1000  # MQTT 5 Receive Maximum: unacknowledged QoS 1 messages the broker may send us
SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our subscriptions and queued windows this long
KEEPALIVE_S = 30
RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
PROBE_TIMEOUT_S = 5.0  # how long to wait for a CONNACK when finding out the broker's MQTT version
QUARANTINE_HEAD_BYTES = 512
QUARANTINE_MAX_ROWS = 10_000  # `fleet collect --quarantine-max-rows`: the oldest rows go first
QUARANTINE_LOG_EVERY_S = 10.0  # at most one "quarantined" line this often (the rest are counted)
DUPLICATE_LOG_EVERY_S = 60.0  # at most one "duplicate windows" line this often
STREAM_LOG_EVERY_S = 1.0  # at most one "new stream" line a second
STREAM_CACHE_ENTRIES = 500_000  # (fleet, device, stream) known to be stored, kept in memory
# MQTT 5 Maximum Packet Size the collector announces on connect: the broker does not send it larger
# packets (Mosquitto drops them and logs "Dropping too large outgoing PUBLISH"). The stats payload
# limit (device_agent.formats.telemetry.MAX_PAYLOAD_BYTES, 96 KiB) plus room for the topic and properties,
# so payloads just over the payload limit still arrive and are quarantined and counted. Broker
# configurations (`edgefleet fleet broker-config`) set Mosquitto's `max_packet_size` to this value.
MAX_PACKET_BYTES = 128 * 1024
BROKER_DROP_LOG_EVERY_S = 10.0
COMPACT_EVERY_S = 600.0  # `fleet collect --compact-after`: a compaction round at most this often
# Broker counters of messages dropped after they were acknowledged to the publisher (Mosquitto).
SYS_DROP_TOPICS = ("$SYS/broker/publish/messages/dropped",)
QUEUE_MAX_MESSAGES = 2 * RECEIVE_MAXIMUM  # received, not yet stored; paho's thread waits when full
EVAL_EVERY_S = 1.0  # a round of evaluations starts at most this often
EVAL_CHUNK = 200  # devices per evaluation (short transactions; the next chunk follows at once)
STOP_EVAL_WAIT_S = 10.0  # on stop, wait this long for a running evaluation to publish its alerts
_DECODE_HERE = object()  # Ingestor.process: no pre-decoded result, run the fast path in this process


class CollectorFailure(ToolchainError):
    """The collector stopped because its worker failed (the CLI exits 1; a supervisor restarts it)."""


class CollectorConfigError(ToolchainError):
    """The collector's configuration is invalid (the CLI exits 78, EX_CONFIG)."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is: host, port and whether to use TLS."""

    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://host[:1883]`` or ``mqtts://host[:8883]``."""
    u = urlparse(url or "")
    if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not u.hostname:
        raise CollectorConfigError(
            f"broker URL {url[:80]!r} is invalid; use mqtt://HOST:PORT or mqtts://HOST:PORT"
        )
    tls = u.scheme in ("mqtts", "ssl")
    try:
        port = u.port or (8883 if tls else 1883)
    except ValueError:
        raise CollectorConfigError(f"broker URL {url[:80]!r} has an invalid port") from None
    return BrokerAddress(u.hostname, port, tls)


@dataclass
class Incoming:
    """A message taken from the broker and not yet acknowledged."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int
    received_at: float


@dataclass
class Counters:
    """What the collector has done since it started."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    legacy_duplicates: int = 0  # duplicates among schema 1 windows (no stream: maybe a lost reset)
    stream_changes: int = 0
    pending: int = 0
    status: int = 0
    events: int = 0
    quarantined: int = 0
    quarantine_evicted: int = 0
    batches: int = 0
    evaluations: int = 0
    alerts: int = 0
    db_errors: int = 0
    broker_dropped: int = 0  # rise of the broker's $SYS drop counters seen by this collector

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class BatchResult:
    """What one committed batch changed."""

    stored: int = 0
    touched: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)  # -> (predictions, model)
    unknown_models: set[str] = field(default_factory=set)


class DatabaseDown(Exception):
    """A database read failed while validating a message: retry the batch, do not quarantine it."""


@dataclass
class _Win:
    """Bookkeeping of one window row of a batch (beside the row itself)."""

    key: tuple[str, str]
    stream: str | None
    seq: int
    count: int
    sha: str
    packed: bool


class Ingestor:
    """Validate and store batches of raw messages in one transaction each (no MQTT here).

    Windows are unique per ``(fleet, device_id, stream, seq)``; schema 1 windows (no stream) share
    the stream ``""``. Each window that is not stored because it is already there is counted per
    device (``devices.duplicates``) and in one rate-limited log line; a device that starts a new
    stream (its state was lost) is counted (``devices.stream_changes``) and logged.
    """

    def __init__(
        self,
        store: Store,
        baselines: BaselineCache,
        counters: Counters | None = None,
        clock: Callable[[], float] = time.time,
        quarantine_max_rows: int = QUARANTINE_MAX_ROWS,
    ) -> None:
        self.store = store
        self.baselines = baselines
        self.counters = counters or Counters()
        self.clock = clock
        self.quarantine_max_rows = quarantine_max_rows
        self.quarantine_log = Throttle(log, QUARANTINE_LOG_EVERY_S)
        self.duplicate_log = Throttle(log, DUPLICATE_LOG_EVERY_S)
        self.legacy_log = Throttle(log, DUPLICATE_LOG_EVERY_S)
        self.stream_log = Throttle(log, STREAM_LOG_EVERY_S)
        self._streams: set[tuple[str, str, str]] = set()  # (fleet, device, stream) stored (a cache)
        g = store.greatest
        self._sql_window = (
            "INSERT INTO windows (fleet, device_id, stream, seq, window_start, window_end, received_at,"
            " model_sha256, spec_hash, count, dropped_windows, violations_json, ints, floats, pending_json)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, device_id, stream,"
            " seq) DO NOTHING"
        )
        self._sql_seen = (
            "INSERT INTO devices (fleet, device_id, first_seen, last_seen, model_sha256, model_name,"
            " model_version, agent_version, dropped_windows, windows, predictions, duplicates, stream,"
            " stream_changes, stream_started) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (fleet, device_id)"
            f" DO UPDATE SET last_seen = {g('devices.last_seen', 'excluded.last_seen')},"
            " model_sha256 = excluded.model_sha256, model_name = excluded.model_name,"
            " model_version = excluded.model_version, agent_version = excluded.agent_version,"
            f" dropped_windows = {g('devices.dropped_windows', 'excluded.dropped_windows')},"
            " windows = devices.windows + excluded.windows,"
            " predictions = devices.predictions + excluded.predictions,"
            " duplicates = devices.duplicates + excluded.duplicates,"
            " stream = COALESCE(excluded.stream, devices.stream),"
            " stream_changes = devices.stream_changes + excluded.stream_changes,"
            " stream_started = COALESCE(excluded.stream_started, devices.stream_started)"
        )
        self._sql_stream = (
            "INSERT INTO device_streams (fleet, device_id, stream, first_seen, first_seq) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (fleet, device_id, stream) DO NOTHING"
        )
        self._sql_status = (
            "INSERT INTO devices (fleet, device_id, state, status_ts, first_seen, last_seen, model_sha256,"
            " model_name,"
            " model_version, agent_version, target, deployment_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
            " ?, ?)"
            " ON CONFLICT (fleet, device_id) DO UPDATE SET state = excluded.state, status_ts ="
            " excluded.status_ts,"
            f" last_seen = {g('devices.last_seen', 'excluded.last_seen')},"
            " model_sha256 = COALESCE(excluded.model_sha256, devices.model_sha256),"
            " model_name = COALESCE(excluded.model_name, devices.model_name),"
            " model_version = COALESCE(excluded.model_version, devices.model_version),"
            " agent_version = excluded.agent_version, target = COALESCE(excluded.target, devices.target),"
            " deployment_json = COALESCE(excluded.deployment_json, devices.deployment_json)"
        )
        self._sql_event = (
            "INSERT INTO events (fleet, device_id, event, ts, message, detail_json, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, device_id, event, ts) DO NOTHING"
        )
        self._sql_quarantine = (
            "INSERT INTO quarantine (received_at, topic, reason, payload_head, payload_bytes)"
            " VALUES (?, ?, ?, ?, ?)"
        )
        # Oldest rows go first; the subquery is NULL (nothing deleted) while there are fewer rows.
        self._sql_quarantine_trim = (
            "DELETE FROM quarantine WHERE id <= (SELECT id FROM quarantine ORDER BY id DESC LIMIT 1 OFFSET ?)"
        )

    def process(self, batch: list[Incoming], decoded: list[FastWindow | None] | None = None) -> BatchResult:
        """Decode, validate and store a batch in one transaction; raise on a database error.

        ``decoded`` holds what a ``DecodePool`` worker made of each message: a FastWindow, or None
        for "judge it here with the contract decoders" (a non-stats message, a refusal, a worker
        without the baseline). Without it the fast path runs here.
        """
        windows: list[tuple[Any, ...]] = []
        wins: list[_Win] = []
        seen: dict[tuple[str, str], tuple[Any, ...]] = {}
        statuses: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        bad: list[tuple[Any, ...]] = []
        res = BatchResult()
        for i, m in enumerate(batch):
            try:
                pre = decoded[i] if decoded is not None else _DECODE_HERE
                self._one(m, pre, windows, wins, seen, statuses, events, res)
            except DatabaseDown:
                raise
            except (TelemetryError, ValueError) as e:
                reason = str(e)[:500]
                head = m.payload[:QUARANTINE_HEAD_BYTES].decode("utf-8", "replace")
            except Exception as e:  # noqa: BLE001 - no single message may stop the collector
                # A bug of ours, not a bad message: keep the payload (up to the packet limit) to replay it.
                reason = f"unexpected {type(e).__name__}: {e}"[:500]
                head = m.payload[:MAX_PACKET_BYTES].decode("utf-8", "replace")
            else:
                continue
            bad.append((m.received_at, m.topic[:300], reason, head, len(m.payload)))
            self.quarantine_log.log(
                logging.WARNING,
                "quarantined message on %r (%d bytes): %s; payload starts %r",
                m.topic[:120],
                len(m.payload),
                reason,
                m.payload[:80],
            )
        now = self.clock()
        self._load_streams({(*w.key, w.stream) for w in wins if w.stream is not None})
        learned: list[tuple[tuple[str, str], str]] = []
        with self.store.transaction():
            flags = self._insert_windows(windows)
            per: dict[tuple[str, str], list[int]] = {}  # -> [stored, predictions, duplicates]
            legacy_dups: dict[tuple[str, str], int] = {}
            new_streams: dict[tuple[tuple[str, str], str], int] = {}  # -> first seq in this batch
            for w, ok in zip(wins, flags, strict=True):
                acc = per.setdefault(w.key, [0, 0, 0])
                if ok:
                    acc[0] += 1
                    acc[1] += w.count
                    if w.packed:
                        res.touched[w.key] = (res.touched.get(w.key, (0, w.sha))[0] + w.count, w.sha)
                else:
                    acc[2] += 1
                    if w.stream is None:
                        legacy_dups[w.key] = legacy_dups.get(w.key, 0) + 1
                if w.stream is not None and (*w.key, w.stream) not in self._streams:
                    k = (w.key, w.stream)
                    new_streams[k] = min(new_streams.get(k, w.seq), w.seq)
            changes = self._register_streams(new_streams, now, learned)
            rows = []
            for key in sorted(seen):  # a stable order: concurrent collectors lock rows in the same order
                stored, preds, dups = per.get(key, (0, 0, 0))
                stream, n_changes = changes.get(key, (None, 0))
                rows.append(
                    (*seen[key], stored, preds, dups, stream, n_changes, now if stream is not None else None)
                )
            self.store.executemany(self._sql_seen, rows)
            self.store.executemany(self._sql_status, statuses)
            self.store.executemany(self._sql_event, events)
            evicted = 0
            if bad:
                self.store.executemany(self._sql_quarantine, bad)
                evicted = int(
                    self.store.execute(self._sql_quarantine_trim, (self.quarantine_max_rows,)).rowcount
                )
            stored = sum(flags)
            dup_total = len(windows) - stored
            counts = [
                (name, n, now)
                for name, n in (
                    ("windows_stored", stored),
                    ("windows_duplicate", dup_total),
                    ("stream_changes", sum(c for _, c in changes.values())),
                    ("quarantined", len(bad)),
                    ("quarantine_evicted", max(evicted, 0)),
                )
                if n
            ]
            self.store.executemany(self._sql_counter, counts)
        if len(self._streams) + len(learned) > STREAM_CACHE_ENTRIES:
            self._streams.clear()  # a cache, not the truth: the database is asked again
        for key, stream in learned:  # only once committed: a retried batch must register them again
            self._streams.add((*key, stream))
        c = self.counters
        c.received += len(batch)
        c.stored += stored
        c.duplicates += dup_total
        c.legacy_duplicates += sum(legacy_dups.values())
        c.stream_changes += sum(n for _, n in changes.values())
        c.status += len(statuses)
        c.events += len(events)
        c.quarantined += len(bad)
        c.quarantine_evicted += max(evicted, 0)
        c.batches += 1
        res.stored = stored
        self._log_batch(per, legacy_dups)
        return res

    def _insert_windows(self, rows: list[tuple[Any, ...]]) -> list[bool]:
        """Insert window rows (in the open transaction); return which were new.

        SQLite: one ``executemany`` (the common case: all new); only when some were already there,
        the rows with an id above the previous maximum are ours (BEGIN IMMEDIATE: no other writer).
        PostgreSQL: ``INSERT ... RETURNING`` per row in one pipelined ``executemany``.
        """
        store = self.store
        if store.dialect != "sqlite" or not rows:
            return store.insert_each(self._sql_window, rows)
        top = int(store.query("SELECT COALESCE(MAX(id), 0) FROM windows")[0][0])
        if store.executemany(self._sql_window, rows) == len(rows):
            return [True] * len(rows)
        new = {
            (str(f), str(d), str(st), int(q))
            for f, d, st, q in store.query(
                "SELECT fleet, device_id, stream, seq FROM windows WHERE id > ?", (top,)
            )
        }
        flags = []
        for r in rows:
            key = (r[0], r[1], r[2], int(r[3]))
            flags.append(key in new)
            new.discard(key)  # a second copy in the same batch is the duplicate
        return flags

    _sql_counter = (
        "INSERT INTO collector_counters (name, value, updated_at) VALUES (?, ?, ?) ON CONFLICT (name)"
        " DO UPDATE SET value = collector_counters.value + excluded.value, updated_at = excluded.updated_at"
    )

    def _load_streams(self, pairs: set[tuple[str, str, str]]) -> None:
        """Ask the database which of these (fleet, device, stream) it knows and are not cached.

        Only the batch's own streams are read (a device with thousands of streams, say from a
        client spoofing it, costs no more than one with two).
        """
        missing = sorted(p for p in pairs if p not in self._streams)
        if not missing:
            return
        by_fleet: dict[str, tuple[set[str], set[str]]] = {}
        for fleet, device, stream in missing:
            devs, streams = by_fleet.setdefault(fleet, (set(), set()))
            devs.add(device)
            streams.add(stream)
        try:
            for fleet, (devs, streams) in by_fleet.items():
                dl, sl = sorted(devs), sorted(streams)
                for i in range(0, len(dl), 400):
                    part = dl[i : i + 400]
                    for j in range(0, len(sl), 400):
                        sp = sl[j : j + 400]
                        for device, stream in self.store.query(
                            "SELECT device_id, stream FROM device_streams WHERE fleet = ? AND device_id IN"
                            f" ({', '.join('?' * len(part))}) AND stream IN ({', '.join('?' * len(sp))})",
                            (fleet, *part, *sp),
                        ):
                            self._streams.add((fleet, str(device), str(stream)))
        except Exception as e:  # noqa: BLE001 - database down: retry the batch
            raise DatabaseDown(str(e)) from e

    def _register_streams(
        self,
        new: dict[tuple[tuple[str, str], str], int],
        now: float,
        learned: list[tuple[tuple[str, str], str]],
    ) -> dict[tuple[str, str], tuple[str, int]]:
        """Store streams seen for the first time; return per device (newest stream, stream changes).

        A device's first stream is not a change; every later one means the device started over
        with an empty outbox (seq from 1). Only the collector whose insert wins counts it.
        """
        out: dict[tuple[str, str], tuple[str, int]] = {}
        # One at a time, in order of arrival (the last is the device's current stream): whether the
        # device had a stream must be asked before this one is inserted. New streams are rare.
        for (key, stream), seq in new.items():
            learned.append((key, stream))
            other = self.store.query(
                "SELECT 1 FROM device_streams WHERE fleet = ? AND device_id = ? AND stream <> ? LIMIT 1",
                (key[0], key[1], stream),
            )
            if not self.store.insert_each(self._sql_stream, [(key[0], key[1], stream, now, seq)])[0]:
                continue
            change = 1 if other else 0
            out[key] = (stream, out.get(key, ("", 0))[1] + change)
            if change:
                self.stream_log.log(
                    logging.WARNING,
                    "device %s/%s started a new stream %s at seq %d: it lost its state (reflash, factory"
                    " reset or new storage); its new windows are stored under the new stream",
                    key[0],
                    key[1],
                    stream,
                    seq,
                )
        return out

    def _log_batch(self, per: dict[tuple[str, str], list[int]], legacy: dict[tuple[str, str], int]) -> None:
        dups = {k: v[2] for k, v in per.items() if v[2]}
        if dups:
            worst = max(dups, key=lambda k: dups[k])
            n = sum(dups.values())
            self.duplicate_log.log(
                logging.INFO,
                "%d window(s) not stored because they already are (same device, stream and seq: resent"
                " after a lost acknowledgement or redelivered) from %d device(s); most from %s/%s (%d)",
                n,
                len(dups),
                worst[0],
                worst[1],
                dups[worst],
                events=n,
            )
        if legacy:
            worst = max(legacy, key=lambda k: legacy[k])
            n = sum(legacy.values())
            self.legacy_log.log(
                logging.WARNING,
                "%d window(s) without a stream id (agents older than stats schema 2) repeat a stored seq,"
                " most from %s/%s (%d): if such a device lost its state these are new windows and are"
                " lost; upgrade its agent",
                n,
                worst[0],
                worst[1],
                legacy[worst],
                events=n,
            )

    def _baseline(self, sha: str) -> Any:
        try:
            return self.baselines.get(sha)
        except Exception as e:  # noqa: BLE001 - any driver error means "database unavailable"
            raise DatabaseDown(str(e)) from e

    def _layout_of(self, sha: str) -> tuple[Any, str] | None:
        base = self._baseline(sha)
        return (base.layout, base.spec_hash) if base is not None else None

    def _one(
        self,
        m: Incoming,
        pre: FastWindow | None | object,
        windows: list[tuple[Any, ...]],
        wins: list[_Win],
        seen: dict[tuple[str, str], tuple[Any, ...]],
        statuses: list[tuple[Any, ...]],
        events: list[tuple[Any, ...]],
        res: BatchResult,
    ) -> None:
        fleet, device, kind = parse_topic(m.topic)
        now = m.received_at
        if kind == "stats":
            fw: FastWindow | None = None
            if isinstance(pre, FastWindow):
                fw = pre
            elif pre is _DECODE_HERE:
                try:
                    fw = decode_window(m.payload, fleet, device, self._layout_of)
                except Refused:
                    fw = None
            if fw is not None:
                windows.append(
                    (
                        fleet,
                        device,
                        fw.stream or "",
                        fw.seq,
                        fw.window_start,
                        fw.window_end,
                        now,
                        fw.model_sha256,
                        fw.spec_hash,
                        fw.count,
                        fw.dropped_windows,
                        dumps(fw.schema_violations),
                        fw.ints,
                        fw.floats,
                        None,
                    )
                )
                key = (fleet, device)
                wins.append(_Win(key, fw.stream, fw.seq, fw.count, fw.model_sha256, fw.ints is not None))
                prev = seen.get(key)
                dropped = max(fw.dropped_windows, prev[8] if prev else 0)
                seen[key] = (
                    fleet,
                    device,
                    now,
                    now,
                    fw.model_sha256,
                    fw.model_name,
                    fw.model_version,
                    fw.agent_version,
                    dropped,
                )
                return
            # The contract decoders judge anything the fast path refused (and word the reason).
            msg = decode_stats(m.payload, topic_device=device, topic_fleet=fleet)
            sha = msg.model.sha256
            base = self._baseline(sha)
            ints = floats = pending = None
            if msg.heartbeat:
                pass
            elif base is not None:
                prof = msg.profile(base.profile.spec)
                ints, floats = pack_profile(prof)
            else:
                pending = dumps({"inputs": msg.inputs, "outputs": msg.outputs, "latency_ms": msg.latency_ms})
                res.unknown_models.add(sha)
                self.counters.pending += 1
            if base is not None and msg.heartbeat and msg.spec_hash != base.profile.spec.spec_hash():
                raise TelemetryError(
                    f"heartbeat spec_hash {msg.spec_hash[:12]} does not match the registered baseline"
                )
            windows.append(
                (
                    fleet,
                    device,
                    msg.stream or "",
                    msg.seq,
                    msg.window_start,
                    msg.window_end,
                    now,
                    sha,
                    msg.spec_hash,
                    msg.count,
                    msg.dropped_windows,
                    dumps(msg.schema_violations),
                    ints,
                    floats,
                    pending,
                )
            )
            key = (fleet, device)
            wins.append(_Win(key, msg.stream, msg.seq, msg.count, sha, ints is not None))
            prev = seen.get(key)
            dropped = max(msg.dropped_windows, prev[8] if prev else 0)
            seen[key] = (
                fleet,
                device,
                now,
                now,
                sha,
                msg.model.name,
                msg.model.version,
                msg.agent_version,
                dropped,
            )
        elif kind == "status":
            st = decode_status(m.payload, topic_device=device, topic_fleet=fleet)
            model = st.model
            statuses.append(
                (
                    fleet,
                    device,
                    st.state,
                    st.ts,
                    now,
                    now,
                    model.sha256 if model else None,
                    model.name if model else None,
                    model.version if model else None,
                    st.agent_version,
                    st.target,
                    dumps(st.deployment) if st.deployment is not None else None,
                )
            )
            if model is not None and self._baseline(model.sha256) is None:
                res.unknown_models.add(model.sha256)
        elif kind == "events":
            ev = decode_event(m.payload, topic_device=device, topic_fleet=fleet)
            events.append((fleet, device, ev.event, ev.ts, ev.message, dumps(ev.detail), now))
        else:
            raise TelemetryError(f"the collector does not accept messages on {kind!r} topics")


class Collector:
    """The collector daemon as an object: ``start()`` runs it in background threads, ``stop()`` ends it.

    ``fleet`` limits the subscription to one fleet (default: every fleet). ``shared_group`` splits
    stats and events between the collectors of one group (MQTT 5 shared subscription). With
    ``bundle_dir``, models named in status messages or windows are registered automatically when their
    bundle is found there.
    """

    def __init__(
        self,
        db_url: str,
        broker_url: str,
        *,
        fleet: str | None = None,
        shared_group: str | None = None,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_insecure: bool = False,
        bundle_dir: str | None = None,
        evaluate: bool = True,
        protocol: str = "auto",
        batch_max: int = BATCH_MAX,
        batch_wait_s: float = BATCH_WAIT_S,
        worker_processes: int | None = None,
        quarantine_max_rows: int = QUARANTINE_MAX_ROWS,
        max_packet_bytes: int = MAX_PACKET_BYTES,
        watch_broker_drops: bool = True,
        compact_after_s: float | None = None,
    ) -> None:
        self.db_url = db_url
        if quarantine_max_rows < 1:
            raise CollectorConfigError(f"quarantine max rows must be 1 or more, not {quarantine_max_rows}")
        if not 1024 <= max_packet_bytes <= 268_435_455:  # MQTT's largest packet is 256 MiB - 1
            raise CollectorConfigError(
                f"max packet size {max_packet_bytes} must be between 1024 and 268435455 bytes"
            )
        if compact_after_s is not None and compact_after_s < 3600:
            raise CollectorConfigError("--compact-after must be at least 1h (rollups are hourly)")
        self.quarantine_max_rows = quarantine_max_rows
        self.max_packet_bytes = max_packet_bytes
        self.watch_broker_drops = watch_broker_drops
        self.compact_after_s = compact_after_s
        self._last_compact = 0.0
        self._sys_lock = threading.Lock()
        self._sys_last: dict[str, int] = {}  # $SYS topic -> last value seen (from the database at start)
        self._sys_updates: dict[str, tuple[int, int]] = {}  # $SYS topic -> (value, rise) to store
        self.broker_log = Throttle(log, BROKER_DROP_LOG_EVERY_S)
        self._sys_mid = -1
        self._broker_alerts: list[dict[str, Any]] = []  # waiting for a fleet to publish them to
        self.broker = parse_broker_url(broker_url)
        if fleet is not None and fleet != "+":
            from device_agent.formats.telemetry import check_id

            try:
                check_id(fleet, "fleet")
            except TelemetryError as e:
                raise CollectorConfigError(str(e)) from None
        self.fleet = fleet or "+"
        if shared_group is not None and (not shared_group or any(c in shared_group for c in "/+#")):
            raise CollectorConfigError(
                f"shared group {shared_group!r} must be a non-empty name without '/', '+', '#'"
            )
        self.shared_group = shared_group
        host = socket.gethostname().lower().replace(".", "-")[:40]
        self.client_id = client_id or f"edgefleet-collector-{host}" + (
            f"-{shared_group}" if shared_group else ""
        )
        self.username, self.password = username, password
        self.tls = (tls_ca, tls_cert, tls_key, tls_insecure)
        for p in (tls_ca, tls_cert, tls_key):
            if p and not Path(p).is_file():
                raise CollectorConfigError(f"TLS file {p!r} does not exist")
        self.bundles = None
        if bundle_dir:
            try:
                self.bundles = BundleDirectory(bundle_dir)
            except RegistryError as e:
                raise CollectorConfigError(str(e)) from None
        self.evaluate_enabled = evaluate
        if protocol not in ("auto", "5", "3.1.1"):
            raise CollectorConfigError(f"MQTT protocol {protocol!r} is unknown; use auto, 5 or 3.1.1")
        self.protocol = protocol
        self._connect_kw: dict[str, Any] = {}
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        if worker_processes is not None and worker_processes < 0:
            raise CollectorConfigError(f"worker processes must be 0 or more, not {worker_processes}")
        self.worker_processes = (
            default_workers(os.cpu_count()) if worker_processes is None else worker_processes
        )
        self.counters = Counters()
        self._q: queue.Queue[Incoming] = queue.Queue(QUEUE_MAX_MESSAGES)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._generation = 0
        self._worker: threading.Thread | None = None
        self._client: Any = None
        self._store: Store | None = None
        self._pending_eval: dict[tuple[str, str], tuple[int, str]] = {}
        self._fatal: BaseException | None = None
        self._stopped = False
        self._last_eval = 0.0
        self._eval_more = False
        self._due_left = 0
        self._eval_job: tuple[list[tuple[tuple[str, str], tuple[int, str]]], Future[Any]] | None = None
        self.decode_pool: DecodePool | None = None
        self.eval_worker: EvalWorker | None = None

    # ---------------------------------------------------------------------------------------------
    # MQTT

    def topics(self) -> list[str]:
        """The subscriptions this collector makes."""
        share = f"$share/{self.shared_group}/" if self.shared_group else ""
        f = self.fleet
        return [f"{share}edgefleet/{f}/+/stats", f"{share}edgefleet/{f}/+/events", f"edgefleet/{f}/+/status"]

    def _configure(self, client: Any) -> None:
        if self.username:
            client.username_pw_set(self.username, self.password)
        ca, cert, key, insecure = self.tls
        if self.broker.tls or ca:
            client.tls_set(ca_certs=ca, certfile=cert, keyfile=key, cert_reqs=ssl.CERT_REQUIRED)
            if insecure:
                client.tls_insecure_set(True)

    def probe_protocol(self, timeout_s: float = PROBE_TIMEOUT_S) -> str:
        """Return "5" or "3.1.1": what the broker speaks (MQTT 5 when it cannot be told).

        A throwaway clean connection under another client id: amqtt, for one, answers an MQTT 5
        CONNECT with "unsupported protocol version".
        """
        import paho.mqtt.client as mqtt

        for version, proto in (("5", mqtt.MQTTv5), ("3.1.1", mqtt.MQTTv311)):
            got: dict[str, Any] = {}
            done = threading.Event()

            def on_connect(
                c: Any,
                u: Any,
                f: Any,
                rc: Any,
                p: Any,
                got: dict[str, Any] = got,
                done: threading.Event = done,
            ) -> None:
                got["rc"] = rc
                done.set()

            c = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2, client_id=f"{self.client_id}-probe"[:60], protocol=proto
            )
            self._configure(c)
            c.on_connect = on_connect
            try:
                c.connect(self.broker.host, self.broker.port, keepalive=KEEPALIVE_S)
            except OSError:
                return "5"  # broker not reachable now: the daemon retries with MQTT 5
            c.loop_start()
            done.wait(timeout_s)
            c.loop_stop()
            try:
                c.disconnect()
            except Exception:  # noqa: BLE001 - a probe connection that is already gone
                pass
            rc = got.get("rc")
            if rc is not None and not rc.is_failure:
                return version
            if rc is None or "protocol" not in str(rc).lower():
                return "5"
        return "5"

    def _make_client(self) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        if self.protocol == "5":
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                protocol=mqtt.MQTTv5,
                manual_ack=True,
            )
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            props.ReceiveMaximum = RECEIVE_MAXIMUM
            props.MaximumPacketSize = self.max_packet_bytes
            self._connect_kw = {"clean_start": False, "properties": props}
        else:
            # MQTT 3.1.1: a persistent session (clean_session=False) keeps the same guarantees.
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                protocol=mqtt.MQTTv311,
                clean_session=False,
                manual_ack=True,
            )
            self._connect_kw = {}
        self._configure(client)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(1, 30)
        return client

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker refused the connection: %s", reason)
            return
        self._generation += 1
        client.subscribe([(t, 1) for t in self.topics()])
        if self.watch_broker_drops:
            # Separately: a broker that refuses $SYS (ACL, no such topics) must not stop collection.
            self._sys_mid = client.subscribe([(t, 0) for t in SYS_DROP_TOPICS])[1]
        self._connected.set()
        log.info(
            "connected to %s:%d as %s (session present: %s)",
            self.broker.host,
            self.broker.port,
            self.client_id,
            getattr(flags, "session_present", "?"),
        )

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        bad = [r for r in reasons if getattr(r, "is_failure", False)]
        if mid == self._sys_mid:
            if bad:
                log.warning(
                    "the broker refused the drop counters %s (%s): drops by the broker will not be seen;"
                    " allow the collector to read $SYS/# (see docs/fleet.md)",
                    ", ".join(SYS_DROP_TOPICS),
                    bad[0],
                )
            return
        if bad:
            log.error("broker refused subscription(s): %s", bad)
        else:
            self._subscribed.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()
        if not self._stop.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic.startswith("$SYS/"):
            self._on_broker_counter(msg.topic, bytes(msg.payload))
            return
        # Blocks while QUEUE_MAX_MESSAGES wait: the broker then holds the rest (QoS 1 is bounded by
        # Receive Maximum anyway; a flood of QoS 0 meets TCP back-pressure instead of our memory).
        self._q.put(Incoming(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._generation, time.time()))

    def _on_broker_counter(self, topic: str, payload: bytes) -> None:
        """Note a broker drop counter ($SYS); log a rise (rate-limited) for the worker to store and alert."""
        try:
            value = int(payload.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            log.warning("broker counter %s has a non-integer value %r; ignored", topic, payload[:40])
            return
        with self._sys_lock:
            last = self._sys_last.get(topic)
            # A counter below the last value means the broker restarted (Mosquitto's $SYS counters
            # start from 0): every drop since counts. The first value ever seen counts whole.
            rise = value if last is None or value < last else value - last
            self._sys_last[topic] = value
            if rise > 0 or last is None:
                prev = self._sys_updates.get(topic, (0, 0))[1]
                self._sys_updates[topic] = (value, prev + rise)
        if rise > 0:
            self.counters.broker_dropped += rise
            self.broker_log.log(
                logging.WARNING,
                "the broker at %s:%d dropped %d message(s) (%s is now %d): acknowledged messages were"
                " lost, usually a full queue of an offline persistent session; raise"
                " max_queued_messages (see docs/fleet.md)",
                self.broker.host,
                self.broker.port,
                rise,
                topic,
                value,
                events=rise,
            )

    def publish_alert(self, topic: str, payload: bytes) -> None:
        """AlertSink: publish an alert with QoS 1 on the collector's connection."""
        if self._client is not None:
            self._client.publish(topic, payload, qos=1)

    # ---------------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> Collector:
        """Open and migrate the database, connect to the broker, and start ingesting in the background."""
        try:
            self._store = open_store(self.db_url)
            rows = self._store.query(
                "SELECT topic, value FROM broker_counters WHERE broker = ?", (self.broker_key,)
            )
        except StorageError as e:
            raise CollectorConfigError(str(e)) from None
        self._sys_last = {str(t): int(v) for t, v in rows}
        if self.protocol == "auto":
            self.protocol = self.probe_protocol()
            log.info("broker %s:%d speaks MQTT %s", self.broker.host, self.broker.port, self.protocol)
        if self.protocol != "5" and self.shared_group:
            raise CollectorConfigError(
                f"the broker at {self.broker.host}:{self.broker.port} speaks only MQTT {self.protocol};"
                " --shared-group needs MQTT 5 (use Mosquitto 2 or another MQTT 5 broker)"
            )
        self._client = self._make_client()
        try:
            self._client.connect_async(
                self.broker.host, self.broker.port, keepalive=KEEPALIVE_S, **self._connect_kw
            )
        except (OSError, ValueError) as e:
            raise CollectorConfigError(
                f"cannot connect to broker {self.broker.host}:{self.broker.port}: {e}"
            ) from None
        self._worker = threading.Thread(target=self._run, name="edgefleet-collector", daemon=True)
        self._worker.start()
        self._client.loop_start()
        return self

    def wait_ready(self, timeout_s: float = 10.0) -> bool:
        """Block until connected and subscribed (True) or the timeout passed (False)."""
        return self._subscribed.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the current batch, acknowledge it, disconnect and close the database (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout_s)
        if self._client is not None:
            try:
                self._client.disconnect()
            finally:
                self._client.loop_stop()
        if self._store is not None:
            self._store.close()

    def run_forever(self) -> None:
        """Start and block until ``stop()`` is called (from a signal handler) or the worker fails."""
        self.start()
        try:
            while not self._stop.wait(0.5):
                if self._worker is not None and not self._worker.is_alive():
                    break
        finally:
            self.stop()
        if self._fatal is not None:
            raise self._fatal

    def request_stop(self) -> None:
        """Ask a running collector to stop (safe from a signal handler)."""
        self._stop.set()

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------------
    # Worker

    def _take(self, wait_s: float = 0.2) -> list[Incoming]:
        try:
            first = self._q.get(timeout=wait_s) if wait_s > 0 else self._q.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_max:
            left = deadline - time.monotonic()
            try:
                batch.append(self._q.get(timeout=left) if left > 0 else self._q.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        pool = self.decode_pool = DecodePool(self.db_url, self.worker_processes)
        evalw = None
        if self.worker_processes > 0 and self.evaluate_enabled:
            evalw = self.eval_worker = EvalWorker(self.db_url)
        try:
            pool.start()
            if evalw is not None:
                evalw.start()
            self._run_loop(pool)
        except BaseException as e:  # noqa: BLE001 - report it; run_forever turns it into an exit code
            log.exception("the collector's worker failed")
            self._fatal = CollectorFailure(f"the collector's worker failed: {type(e).__name__}: {e}")
            self._stop.set()
        finally:
            pool.close()
            if evalw is not None:
                evalw.close()

    def _run_loop(self, pool: DecodePool) -> None:
        """Take batches; while one is stored and acknowledged here, the next is decoded in the pool.

        On stop the batch in hand is finished and acknowledged; a batch still being decoded and
        whatever is queued stay unacknowledged and are redelivered by the broker to this client id.
        A running evaluation is waited for, so its alerts are published before the collector leaves.
        """
        assert self._store is not None
        store = self._store
        baselines = BaselineCache(store)
        ingestor = self.ingestor = Ingestor(
            store, baselines, self.counters, quarantine_max_rows=self.quarantine_max_rows
        )
        evaluator = Evaluator(store, baselines, sink=self)
        self._last_eval = 0.0
        # Batches taken and being decoded in the pool, oldest first; one more than the pool has workers.
        ahead: deque[tuple[list[Incoming], Any]] = deque()
        depth = max(1, pool.workers)
        while not self._stop.is_set():
            # With batches in the pool, only look for more without waiting; store the oldest when the
            # pipeline is full or nothing new came.
            batch = self._take(0.0 if ahead else 0.2)
            if batch:
                ahead.append((batch, pool.submit(batch)))
            if ahead and (len(ahead) > depth or not batch or pool.failed):
                taken, fut = ahead.popleft()
                if not self._store_batch(ingestor, store, baselines, taken, pool.result(fut)):
                    break
            self._maybe_evaluate(evaluator, baselines)
            self._flush_broker_counters(store)
            self._maybe_compact(store)
        if self._eval_job is not None:
            wait([self._eval_job[1]], timeout=STOP_EVAL_WAIT_S)
            self._maybe_evaluate(evaluator, baselines, collect_only=True)

    def _store_batch(
        self,
        ingestor: Ingestor,
        store: Store,
        baselines: BaselineCache,
        batch: list[Incoming],
        decoded: list[FastWindow | None] | None,
    ) -> bool:
        """Store and acknowledge a batch; False when stopped while the database is down."""
        attempt = 0
        while True:
            try:
                res = ingestor.process(batch, decoded)
                break
            except Exception as e:  # noqa: BLE001 - a database outage must not lose the batch
                self.counters.db_errors += 1
                delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                log.error(
                    "storing a batch of %d failed (%s); retrying in %.1f s",
                    len(batch),
                    str(e)[:200],
                    delay,
                )
                attempt += 1
                if self._stop.wait(delay):
                    return False  # unacknowledged: the broker redelivers them to the next collector
        gen = self._generation
        for m in batch:
            if m.qos > 0 and m.generation == gen:
                self._client.ack(m.mid, m.qos)
        for model in res.unknown_models:
            self._auto_register(store, baselines, model)
        if self.evaluate_enabled:
            for key, (n, sha) in res.touched.items():
                self._add_pending(key, n, sha)
        return True

    @property
    def broker_key(self) -> str:
        """The broker as ``host:port`` (the key of its counters in ``broker_counters``)."""
        return f"{self.broker.host}:{self.broker.port}"

    def _flush_broker_counters(self, store: Store) -> None:
        """Store the broker drop counters seen since the last call; publish an alert for each rise."""
        with self._sys_lock:
            updates, self._sys_updates = self._sys_updates, {}
        if not updates and not self._broker_alerts:
            return
        now = time.time()
        try:
            with store.transaction():
                store.executemany(
                    "INSERT INTO broker_counters (broker, topic, value, rises, first_seen, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (broker, topic) DO UPDATE SET"
                    " value = excluded.value, rises = broker_counters.rises + excluded.rises,"
                    " updated_at = excluded.updated_at",
                    [(self.broker_key, t, v, r, now, now) for t, (v, r) in sorted(updates.items())],
                )
                fleets = (
                    [self.fleet]
                    if self.fleet != "+"
                    else [str(r[0]) for r in store.query("SELECT DISTINCT fleet FROM devices")]
                )
        except Exception as e:  # noqa: BLE001 - keep them for the next round
            log.error("storing the broker's drop counters failed: %s", str(e)[:200])
            with self._sys_lock:
                for t, (v, r) in updates.items():
                    prev = self._sys_updates.get(t, (v, 0))
                    self._sys_updates[t] = (prev[0], prev[1] + r)
            return
        from device_agent.formats.telemetry import fleet_topic, utc_iso

        for topic, (value, rise) in sorted(updates.items()):
            if rise > 0:
                self._broker_alerts.append(
                    {
                        "schema": 1,
                        "type": "broker_drops",
                        "broker": self.broker_key,
                        "counter": topic,
                        "value": value,
                        "rise": rise,
                        "ts": utc_iso(now),
                        "message": f"the broker dropped {rise} acknowledged message(s);"
                        " raise max_queued_messages (docs/fleet.md)",
                    }
                )
        if not fleets:
            return  # no fleet known yet (a new database): publish once the first device is stored
        alerts, self._broker_alerts = self._broker_alerts, []
        for alert in alerts:
            for fleet in fleets:
                try:
                    self.publish_alert(fleet_topic(fleet, "alerts"), dumps(alert).encode())
                    self.counters.alerts += 1
                except Exception as e:  # noqa: BLE001 - stored and logged; publishing is best effort
                    log.error("could not publish the broker-drops alert for fleet %s: %s", fleet, e)

    def _maybe_compact(self, store: Store) -> None:
        """Fold windows older than ``compact_after_s`` into hourly rollups, at most every COMPACT_EVERY_S."""
        if self.compact_after_s is None or time.monotonic() - self._last_compact < COMPACT_EVERY_S:
            return
        self._last_compact = time.monotonic()
        from toolchain.fleet.compact import compact

        try:
            out = compact(store, time.time() - self.compact_after_s)
        except Exception as e:  # noqa: BLE001 - compaction is housekeeping; ingestion goes on
            log.error("compaction failed: %s", str(e)[:300])
            return
        if out.windows:
            log.info(
                "compacted %d window(s) of %d device(s) into %d hourly rollup(s)",
                out.windows,
                out.devices,
                out.rollups,
            )

    def _add_pending(self, key: tuple[str, str], n: int, sha: str) -> None:
        prev_n, prev_sha = self._pending_eval.get(key, (0, sha))
        self._pending_eval[key] = (prev_n + n if prev_sha == sha else n, sha)

    def _maybe_evaluate(
        self, evaluator: Evaluator, baselines: BaselineCache, *, collect_only: bool = False
    ) -> None:
        """Collect a finished evaluation; start the next one when devices are due.

        Due devices are evaluated at most every EVAL_EVERY_S, in chunks of EVAL_CHUNK devices (the
        next chunk follows as soon as one finishes), in the evaluation worker when there is one,
        else here.
        """
        if not self.evaluate_enabled:
            return
        job = self._eval_job
        if job is not None:
            due, fut = job
            if not fut.done():
                return
            self._eval_job = None
            assert self.eval_worker is not None
            out = self.eval_worker.outcome(fut)
            if out is None:  # the worker failed or the database was down: evaluate them again
                for key, (n, sha) in due:
                    self._add_pending(key, n, sha)
            else:
                for level, name, message in out.records:
                    logging.getLogger(name).log(level, "%s", message)
                for topic, payload in out.alerts:
                    try:
                        self.publish_alert(topic, payload)
                    except Exception as e:  # noqa: BLE001 - the alert is stored; publishing is best effort
                        log.error("could not publish an alert on %s: %s", topic, e)
                self.counters.evaluations += out.evaluated
                self.counters.alerts += out.changed
        if collect_only or not self._pending_eval:
            return
        if not self._eval_more and time.monotonic() - self._last_eval <= EVAL_EVERY_S:
            return
        due = self._take_due(baselines)
        if not due:
            return
        self._last_eval = time.monotonic()
        worker = self.eval_worker
        job_fut: Future[Any] | None = worker.submit([key for key, _ in due]) if worker is not None else None
        if job_fut is not None:
            self._eval_job = (due, job_fut)
            return
        try:
            done = evaluator.evaluate_many([key for key, _ in due])
        except Exception as e:  # noqa: BLE001 - evaluation is best effort; ingestion goes on
            log.error("evaluating %d device(s) failed: %s", len(due), e)
            return
        self.counters.evaluations += len(done)
        self.counters.alerts += sum(ev.changed for ev in done.values())

    def _take_due(self, baselines: BaselineCache) -> list[tuple[tuple[str, str], tuple[int, str]]]:
        """Remove and return up to EVAL_CHUNK devices with at least min_count new predictions."""
        due: list[tuple[tuple[str, str], tuple[int, str]]] = []
        left = 0
        for key, (n, sha) in list(self._pending_eval.items()):
            try:
                base = baselines.get(sha)
            except Exception as e:  # noqa: BLE001 - database down: try again at the next round
                log.error("reading baseline %s failed: %s", sha[:12], e)
                break
            if base is not None and n >= base.config.min_count:
                if len(due) >= EVAL_CHUNK:
                    left += 1
                    continue
                # The in-memory count only says when to look; the database decides what is evaluated
                # (the collectors of a shared group each store part of a device's windows).
                self._pending_eval.pop(key, None)
                due.append((key, (n, sha)))
        self._eval_more = left > 0
        self._due_left = left
        return due

    @property
    def evaluation_backlog(self) -> int:
        """Devices due for evaluation that are not evaluated yet (running or waiting; 0 when idle)."""
        job = self._eval_job
        return self._due_left + (len(job[0]) if job is not None else 0)

    def _auto_register(self, store: Store, baselines: BaselineCache, sha: str) -> None:
        if self.bundles is None:
            return
        path = self.bundles.find(sha)
        if path is None:
            return
        try:
            info = register_bundle(store, path)
            baselines.forget(sha)
            if self.eval_worker is not None:
                self.eval_worker.forget(sha)
            log.info("registered bundle %s (%s v%s) from %s", sha[:12], info["name"], info["version"], path)
        except (RegistryError, StorageError) as e:
            log.error("auto-registration of %s failed: %s", path, e)
        except Exception as e:  # noqa: BLE001 - a bad bundle in the directory must not stop the collector
            log.error("auto-registration of %s failed: %s", path, e)
