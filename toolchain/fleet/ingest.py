"""Validate a batch of received messages and store it in one transaction (no MQTT here).

Every message is untrusted (``device_agent.formats.telemetry`` decoders: size limit, JSON, depth, schema,
known keys, finite numbers, payload ids equal to the topic's; histogram lengths against the registered
baseline). Stats windows whose model has a baseline go through ``toolchain.fleet.fastpath`` (the same
rules, faster); whatever it refuses is judged again by the contract decoders, whose error becomes the
quarantine reason (``toolchain.fleet.quarantine``).

A batch goes through three steps: *judge* each message into rows (``toolchain.fleet.rows``), *store*
the rows in one transaction, *count* what the committed batch changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from device_agent.formats.stats import Feedback
from device_agent.formats.telemetry import (
    TelemetryError,
    decode_event,
    decode_stats,
    decode_status,
    parse_topic,
)
from toolchain.fleet.fastpath import FastWindow, Refused, decode_window
from toolchain.fleet.quarantine import QUARANTINE_MAX_ROWS, Quarantine, quarantine_row
from toolchain.fleet.ratelog import Throttle
from toolchain.fleet.registry import BaselineCache
from toolchain.fleet.rows import (
    COUNTER_SQL,
    EVENT_SQL,
    STREAM_SQL,
    WINDOW_SQL,
    CounterRow,
    DeviceSeen,
    EventRow,
    QuarantineRow,
    StatusRow,
    StreamRow,
    WindowRow,
    device_seen_sql,
    status_sql,
    stream_seq_sql,
)
from toolchain.fleet.sampleingest import SampleIngest
from toolchain.fleet.storage import Store, dumps, pack_profile

log = logging.getLogger("edgefleet.fleet.collector")

DUPLICATE_LOG_EVERY_S = 60.0  # at most one "duplicate windows" line this often
STREAM_LOG_EVERY_S = 1.0  # at most one "new stream" line a second
STREAM_CACHE_ENTRIES = 500_000  # (fleet, device, stream) known to be stored, kept in memory
_DECODE_HERE = object()  # Ingestor.process: no pre-decoded result, run the fast path in this process

DeviceKey = tuple[str, str]  # (fleet, device_id)


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
    broker_sessions_lost: int = 0  # connections on which the broker had lost this collector's session
    samples_stored: int = 0  # captured samples (toolchain.fleet.sampleingest) and their labels
    samples_duplicate: int = 0
    sample_labels_stored: int = 0
    sample_labels_duplicate: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class BatchResult:
    """What one committed batch changed."""

    stored: int = 0
    touched: dict[DeviceKey, tuple[int, str]] = field(default_factory=dict)  # -> (predictions, model)
    unknown_models: set[str] = field(default_factory=set)


class DatabaseDown(Exception):
    """A database read failed while validating a message: retry the batch, do not quarantine it."""


@dataclass
class _Win:
    """Bookkeeping of one window row of a batch (beside the row itself)."""

    key: DeviceKey
    stream: str | None  # None: a schema 1 window
    seq: int
    count: int
    sha: str
    packed: bool
    dropped: int  # windows the device dropped since its previous stored one (reported once)


@dataclass
class _Judged:
    """The rows a batch's messages became, before anything is stored."""

    windows: list[WindowRow] = field(default_factory=list)
    wins: list[_Win] = field(default_factory=list)  # one per window row
    seen: dict[DeviceKey, DeviceSeen] = field(default_factory=dict)
    statuses: list[StatusRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    bad: list[QuarantineRow] = field(default_factory=list)
    result: BatchResult = field(default_factory=BatchResult)

    def add_window(self, row: WindowRow, stream: str | None, seen: DeviceSeen) -> None:
        """Add a window row; its device's row takes the newest window's fields (drops add up in _tally)."""
        self.windows.append(row)
        key = (row.fleet, row.device_id)
        self.wins.append(
            _Win(key, stream, row.seq, row.count, row.model_sha256, row.ints is not None, row.dropped_windows)
        )
        self.seen[key] = seen


@dataclass
class _Stored:
    """What storing a batch did, for the counters and the log."""

    per: dict[DeviceKey, list[int]]  # -> [stored, predictions, duplicates, dropped]
    legacy_dups: dict[DeviceKey, int]
    changes: dict[DeviceKey, tuple[str, int]]  # -> (newest stream, stream changes)
    stored: int
    evicted: int

    @property
    def stream_changes(self) -> int:
        return sum(n for _, n in self.changes.values())


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
        self.quarantine = Quarantine(quarantine_max_rows)
        self.quarantine_log = self.quarantine.log  # one "quarantined" line per throttle window
        self.duplicate_log = Throttle(log, DUPLICATE_LOG_EVERY_S)
        self.legacy_log = Throttle(log, DUPLICATE_LOG_EVERY_S)
        self.stream_log = Throttle(log, STREAM_LOG_EVERY_S)
        self._streams: set[tuple[str, str, str]] = set()  # (fleet, device, stream) stored (a cache)
        self._sql_seen = device_seen_sql(store.greatest)
        self._sql_status = status_sql(store.greatest)
        self._sql_stream_seq = stream_seq_sql(store.greatest, store.least)
        self.samples = SampleIngest()

    def process(self, batch: list[Incoming], decoded: list[FastWindow | None] | None = None) -> BatchResult:
        """Decode, validate and store a batch in one transaction; raise on a database error.

        ``decoded`` holds what a ``DecodePool`` worker made of each message: a FastWindow, or None
        for "judge it here with the contract decoders" (a non-stats message, a refusal, a worker
        without the baseline). Without it the fast path runs here.
        """
        self.samples.begin()
        judged = self._judge_all(batch, decoded)
        now = self.clock()
        self._load_streams({(*w.key, w.stream) for w in judged.wins if w.stream is not None})
        learned: list[tuple[DeviceKey, str]] = []
        with self.store.transaction():
            done = self._store(judged, now, learned)
        if len(self._streams) + len(learned) > STREAM_CACHE_ENTRIES:
            self._streams.clear()  # a cache, not the truth: the database is asked again
        for key, stream in learned:  # only once committed: a retried batch must register them again
            self._streams.add((*key, stream))
        self._count(len(batch), judged, done)
        self.samples.count(self.counters)
        judged.result.stored = done.stored
        self._log_batch(done.per, done.legacy_dups)
        return judged.result

    # ---------------------------------------------------------------------------------------------
    # Judge: messages into rows

    def _judge_all(self, batch: list[Incoming], decoded: list[FastWindow | None] | None) -> _Judged:
        """Turn each message into rows; a message that fails becomes a quarantine row."""
        judged = _Judged()
        for i, m in enumerate(batch):
            try:
                pre = decoded[i] if decoded is not None else _DECODE_HERE
                self._judge(m, pre, judged)
            except DatabaseDown:
                raise
            except (TelemetryError, ValueError) as e:
                row = quarantine_row(m.topic, m.payload, m.received_at, e, ours=False)
            except Exception as e:  # noqa: BLE001 - no single message may stop the collector
                row = quarantine_row(m.topic, m.payload, m.received_at, e, ours=True)
            else:
                continue
            judged.bad.append(row)
            self.quarantine.note(m.topic, m.payload, row.reason)
        return judged

    def _judge(self, m: Incoming, pre: FastWindow | None | object, judged: _Judged) -> None:
        fleet, device, kind = parse_topic(m.topic)
        if kind == "stats":
            self._stats(m, fleet, device, pre, judged)
        elif kind == "status":
            self._status(m, fleet, device, judged)
        elif kind == "events":
            ev = decode_event(m.payload, topic_device=device, topic_fleet=fleet)
            judged.events.append(
                EventRow(fleet, device, ev.event, ev.ts, ev.message, dumps(ev.detail), m.received_at)
            )
        elif kind == "samples":
            self.samples.judge(m, fleet, device)
        else:
            raise TelemetryError(f"the collector does not accept messages on {kind!r} topics")

    def _stats(
        self, m: Incoming, fleet: str, device: str, pre: FastWindow | None | object, judged: _Judged
    ) -> None:
        fw = self._fast_window(m, fleet, device, pre)
        now = m.received_at
        if fw is not None:
            row = WindowRow(
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
                *_label_columns(fw.feedback),
            )
            seen = DeviceSeen(
                fleet,
                device,
                now,
                now,
                fw.model_sha256,
                fw.model_name,
                fw.model_version,
                fw.agent_version,
                fw.dropped_windows,
            )
            judged.add_window(row, fw.stream, seen)
            return
        # The contract decoders judge anything the fast path refused (and word the reason).
        msg = decode_stats(m.payload, topic_device=device, topic_fleet=fleet)
        sha = msg.model.sha256
        base = self._baseline(sha)
        ints = floats = pending = None
        if msg.heartbeat:
            pass
        elif base is not None:
            ints, floats = pack_profile(msg.profile(base.profile.spec))
        else:
            pending = dumps({"inputs": msg.inputs, "outputs": msg.outputs, "latency_ms": msg.latency_ms})
            judged.result.unknown_models.add(sha)
            self.counters.pending += 1
        if base is not None and msg.heartbeat and msg.spec_hash != base.profile.spec.spec_hash():
            raise TelemetryError(
                f"heartbeat spec_hash {msg.spec_hash[:12]} does not match the registered baseline"
            )
        if base is not None and msg.heartbeat and msg.feedback is not None:
            msg.check_feedback(len(base.profile.spec.labels))
        row = WindowRow(
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
            *_label_columns(msg.feedback),
        )
        seen = DeviceSeen(
            fleet,
            device,
            now,
            now,
            sha,
            msg.model.name,
            msg.model.version,
            msg.agent_version,
            msg.dropped_windows,
        )
        judged.add_window(row, msg.stream, seen)

    def _fast_window(
        self, m: Incoming, fleet: str, device: str, pre: FastWindow | None | object
    ) -> FastWindow | None:
        """The fast path's window (from the decode pool, or decoded here); None: judge it the slow way."""
        if isinstance(pre, FastWindow):
            return pre
        if pre is _DECODE_HERE:
            try:
                return decode_window(m.payload, fleet, device, self._layout_of)
            except Refused:
                return None
        return None

    def _status(self, m: Incoming, fleet: str, device: str, judged: _Judged) -> None:
        st = decode_status(m.payload, topic_device=device, topic_fleet=fleet)
        model = st.model
        now = m.received_at
        judged.statuses.append(
            StatusRow(
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
            judged.result.unknown_models.add(model.sha256)

    def _baseline(self, sha: str) -> Any:
        try:
            return self.baselines.get(sha)
        except Exception as e:  # noqa: BLE001 - any driver error means "database unavailable"
            raise DatabaseDown(str(e)) from e

    def _layout_of(self, sha: str) -> tuple[Any, str] | None:
        base = self._baseline(sha)
        return (base.layout, base.spec_hash) if base is not None else None

    # ---------------------------------------------------------------------------------------------
    # Store: rows into the database (in the open transaction)

    def _store(self, judged: _Judged, now: float, learned: list[tuple[DeviceKey, str]]) -> _Stored:
        flags = self._insert_windows(judged.windows)
        per, legacy_dups, new_streams = self._tally(judged, flags)
        changes = self._register_streams(new_streams, now, learned)
        self.store.executemany(self._sql_stream_seq, _stream_seqs(judged.wins, flags))
        self.store.executemany(self._sql_seen, self._device_rows(judged.seen, per, changes, now))
        self.store.executemany(self._sql_status, judged.statuses)
        self.store.executemany(EVENT_SQL, judged.events)
        evicted = self.quarantine.store(self.store, judged.bad)
        self.samples.store(self.store, now)
        done = _Stored(per, legacy_dups, changes, sum(flags), evicted)
        counts = [
            CounterRow(name, n, now)
            for name, n in (
                ("windows_stored", done.stored),
                ("windows_duplicate", len(judged.windows) - done.stored),
                ("stream_changes", done.stream_changes),
                ("quarantined", len(judged.bad)),
                ("quarantine_evicted", evicted),
            )
            if n
        ]
        self.store.executemany(COUNTER_SQL, counts)
        return done

    def _tally(
        self, judged: _Judged, flags: list[bool]
    ) -> tuple[dict[DeviceKey, list[int]], dict[DeviceKey, int], dict[tuple[DeviceKey, str], int]]:
        """Per device: [stored, predictions, duplicates, dropped], legacy duplicates; new streams -> first seq.

        ``dropped`` adds up the drops reported by the windows stored now: each window reports the drops
        since the device's previous stored window, so a resent duplicate's count is already in.
        """
        per: dict[DeviceKey, list[int]] = {}
        legacy_dups: dict[DeviceKey, int] = {}
        new_streams: dict[tuple[DeviceKey, str], int] = {}  # -> first seq in this batch
        touched = judged.result.touched
        for w, ok in zip(judged.wins, flags, strict=True):
            acc = per.setdefault(w.key, [0, 0, 0, 0])
            if ok:
                acc[0] += 1
                acc[1] += w.count
                acc[3] += w.dropped
                if w.packed:
                    touched[w.key] = (touched.get(w.key, (0, w.sha))[0] + w.count, w.sha)
            else:
                acc[2] += 1
                if w.stream is None:
                    legacy_dups[w.key] = legacy_dups.get(w.key, 0) + 1
            if w.stream is not None and (*w.key, w.stream) not in self._streams:
                k = (w.key, w.stream)
                new_streams[k] = min(new_streams.get(k, w.seq), w.seq)
        return per, legacy_dups, new_streams

    @staticmethod
    def _device_rows(
        seen: dict[DeviceKey, DeviceSeen],
        per: dict[DeviceKey, list[int]],
        changes: dict[DeviceKey, tuple[str, int]],
        now: float,
    ) -> list[DeviceSeen]:
        rows = []
        for key in sorted(seen):  # a stable order: concurrent collectors lock rows in the same order
            stored, preds, dups, dropped = per.get(key, (0, 0, 0, 0))
            stream, n_changes = changes.get(key, (None, 0))
            rows.append(
                seen[key]._replace(
                    windows=stored,
                    predictions=preds,
                    dropped_windows=dropped,
                    duplicates=dups,
                    stream=stream,
                    stream_changes=n_changes,
                    stream_started=now if stream is not None else None,
                )
            )
        return rows

    def _insert_windows(self, rows: list[WindowRow]) -> list[bool]:
        """Insert window rows (in the open transaction); return which were new.

        SQLite: one ``executemany`` (the common case: all new); only when some were already there,
        the rows with an id above the previous maximum are ours (BEGIN IMMEDIATE: no other writer).
        PostgreSQL: ``INSERT ... RETURNING`` per row in one pipelined ``executemany``.
        """
        store = self.store
        if store.dialect != "sqlite" or not rows:
            return store.insert_each(WINDOW_SQL, rows)
        top = int(store.query("SELECT COALESCE(MAX(id), 0) FROM windows")[0][0])
        # Plain tuples: sqlite3 binds a tuple subclass item by item through the sequence protocol.
        if store.executemany(WINDOW_SQL, [tuple(r) for r in rows]) == len(rows):
            return [True] * len(rows)
        new = {
            (str(f), str(d), str(st), int(q))
            for f, d, st, q in store.query(
                "SELECT fleet, device_id, stream, seq FROM windows WHERE id > ?", (top,)
            )
        }
        flags = []
        for r in rows:
            key = (r.fleet, r.device_id, r.stream, int(r.seq))
            flags.append(key in new)
            new.discard(key)  # a second copy in the same batch is the duplicate
        return flags

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
        new: dict[tuple[DeviceKey, str], int],
        now: float,
        learned: list[tuple[DeviceKey, str]],
    ) -> dict[DeviceKey, tuple[str, int]]:
        """Store streams seen for the first time; return per device (newest stream, stream changes).

        A device's first stream is not a change; every later one means the device started over
        with an empty outbox (seq from 1). Only the collector whose insert wins counts it.
        """
        out: dict[DeviceKey, tuple[str, int]] = {}
        # One at a time, in order of arrival (the last is the device's current stream): whether the
        # device had a stream must be asked before this one is inserted. New streams are rare.
        for (key, stream), seq in new.items():
            learned.append((key, stream))
            other = self.store.query(
                "SELECT 1 FROM device_streams WHERE fleet = ? AND device_id = ? AND stream <> ? LIMIT 1",
                (key[0], key[1], stream),
            )
            if not self.store.insert_each(STREAM_SQL, [StreamRow(key[0], key[1], stream, now, seq)])[0]:
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

    # ---------------------------------------------------------------------------------------------
    # Count: what the committed batch changed

    def _count(self, received: int, judged: _Judged, done: _Stored) -> None:
        c = self.counters
        c.received += received
        c.stored += done.stored
        c.duplicates += len(judged.windows) - done.stored
        c.legacy_duplicates += sum(done.legacy_dups.values())
        c.stream_changes += done.stream_changes
        c.status += len(judged.statuses)
        c.events += len(judged.events)
        c.quarantined += len(judged.bad)
        c.quarantine_evicted += done.evicted
        c.batches += 1

    def _log_batch(self, per: dict[DeviceKey, list[int]], legacy: dict[DeviceKey, int]) -> None:
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


def _stream_seqs(wins: list[_Win], flags: list[bool]) -> list[tuple[Any, ...]]:
    """Per (device, stream) of the windows stored now: parameters of ``stream_seq_sql``."""
    acc: dict[tuple[str, str, str], list[int]] = {}  # -> [lowest, highest, stored, dropped]
    for w, ok in zip(wins, flags, strict=True):
        if not ok or w.stream is None:  # schema 1 windows have no stream to count within
            continue
        a = acc.get((*w.key, w.stream))
        if a is None:
            acc[(*w.key, w.stream)] = [w.seq, w.seq, 1, w.dropped]
        else:
            a[0], a[1], a[2], a[3] = min(a[0], w.seq), max(a[1], w.seq), a[2] + 1, a[3] + w.dropped
    return [(lo, lo, hi, hi, n, d, f, dev, st) for (f, dev, st), (lo, hi, n, d) in sorted(acc.items())]


def _label_columns(fb: Feedback | None) -> tuple[int | None, int | None, str | None]:
    """A window's ``labelled``, ``correct`` and ``confusion_json`` columns (None: it carried no labels)."""
    if fb is None:
        return None, None, None
    conf = None if fb.confusion is None else dumps(fb.confusion.tolist())
    return fb.labelled, fb.correct, conf
