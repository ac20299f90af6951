"""Disk-backed store-and-forward queue for telemetry windows (SQLite, WAL, synchronous=FULL).

A closed window is written here, with its ``seq``, *before* it is published, and deleted only when
the broker acknowledges it (PUBACK). After a broker outage or a crash (kill -9) every row still
here is sent again, in ``seq`` order. The queue is bounded by rows and bytes: when full, the
oldest rows are dropped and the count is carried into the next window's ``dropped_windows``.

``seq`` is per device, strictly increasing and persisted: it lives in the same database, and the
row and the new counter commit in one transaction.

``stream`` is a random id (16 hex digits) made when the database is created and kept with it. A
device whose state directory is lost (reflash, factory reset, a new SD card) starts again at seq 1
with a *new* stream, so a consumer that keys windows on ``(device, stream, seq)`` never mistakes the
new windows for duplicates of the old ones. An outbox made by an older agent gets its stream the
first time it is opened (its seq goes on, so nothing collides either).
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from device_agent.errors import AgentError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 10.0
STREAM_BYTES = 8  # a stream id is 16 hex digits (64 random bits)


class OutboxError(AgentError):
    """The outbox database cannot be opened or written."""


@dataclass(frozen=True)
class Row:
    """One queued message."""

    seq: int
    topic: str
    payload: bytes


class Outbox:
    """A bounded, durable FIFO of (seq, topic, payload). Thread-safe."""

    def __init__(self, path: str | Path, max_rows: int = 10_000, max_bytes: int = 64 * 1024 * 1024) -> None:
        if max_rows < 1 or max_bytes < 1:
            raise OutboxError("outbox bounds must be positive")
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutboxError(
                f"cannot create {str(self.path.parent)!r} ({e.strerror}); check [agent] state_dir"
            ) from None
        try:
            self._db = sqlite3.connect(
                str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a row acknowledged to the caller as stored survives power loss (WAL + NORMAL may not).
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                CREATE TABLE IF NOT EXISTS outbox (
                    seq INTEGER PRIMARY KEY,
                    topic TEXT NOT NULL,
                    payload BLOB NOT NULL,
                    size_bytes INTEGER NOT NULL,
                    dropped INTEGER NOT NULL DEFAULT 0,
                    created_at REAL NOT NULL
                );
                INSERT OR IGNORE INTO meta VALUES ('schema', 1), ('next_seq', 1), ('dropped_pending', 0),
                    ('dropped_total', 0);
                CREATE TABLE IF NOT EXISTS identity (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                """
            )
            # Text in its own table: an all-digit hex id in meta's INTEGER column would become a number.
            self._db.execute(
                "INSERT OR IGNORE INTO identity VALUES ('stream', ?)", (secrets.token_hex(STREAM_BYTES),)
            )
            self.stream: str = str(
                self._db.execute("SELECT value FROM identity WHERE key='stream'").fetchone()[0]
            )
            schema = self._meta("schema")
        except sqlite3.Error as e:
            raise OutboxError(
                f"cannot open outbox {str(self.path)!r}: {e}; check [agent] state_dir"
            ) from None
        if schema != SCHEMA_VERSION:
            raise OutboxError(
                f"outbox {str(self.path)!r} has schema {schema}, this agent reads {SCHEMA_VERSION}"
            )

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("UPDATE meta SET value=? WHERE key=?", (int(value), key))

    def add(self, topic: str, encode: Callable[[int, int], bytes]) -> int:
        """Store a new message and return its seq.

        ``encode(seq, dropped_windows)`` builds the payload: ``dropped_windows`` is the number of
        windows dropped since the last stored one, which this message reports. Then the oldest rows
        are dropped while the queue is over its bounds (the new row is always kept).
        """
        return self.add_many(topic, [encode])[0]

    def add_many(self, topic: str, encoders: list[Callable[[int, int], bytes]]) -> list[int]:
        """Store several messages in one transaction (one fsync); return their seqs, in order.

        The first message reports the windows dropped since the last stored one; the others 0.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    seqs = []
                    for encode in encoders:
                        seq = self._meta("next_seq")
                        dropped = self._meta("dropped_pending")
                        payload = encode(seq, dropped)
                        self._db.execute(
                            "INSERT INTO outbox (seq, topic, payload, size_bytes, dropped, created_at)"
                            " VALUES (?,?,?,?,?,?)",
                            (seq, topic, payload, len(payload), dropped, time.time()),
                        )
                        self._set_meta("next_seq", seq + 1)
                        self._set_meta("dropped_pending", 0)
                        self._evict(keep_seq=seq)  # row by row: as many single adds would
                        seqs.append(seq)
                    self._db.execute("COMMIT")
                except BaseException:
                    # SQLite rolls back by itself on some errors (SQLITE_FULL): keep the real error.
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise OutboxError(f"cannot write outbox {str(self.path)!r}: {e}") from None
            return seqs

    def _evict(self, keep_seq: int) -> None:
        rows, nbytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM outbox"
        ).fetchone()
        lost = 0
        while rows > 1 and (rows > self.max_rows or nbytes > self.max_bytes):
            old = self._db.execute(
                "SELECT seq, size_bytes, dropped FROM outbox WHERE seq != ? ORDER BY seq LIMIT 1", (keep_seq,)
            ).fetchone()
            if old is None:
                break
            self._db.execute("DELETE FROM outbox WHERE seq=?", (old[0],))
            rows -= 1
            nbytes -= old[1]
            # The dropped row also carried a count of earlier drops that now nobody reports.
            lost += 1 + old[2]
            self._set_meta("dropped_total", self._meta("dropped_total") + 1)
        if lost:
            self._set_meta("dropped_pending", self._meta("dropped_pending") + lost)

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[Row]:
        """Return up to ``limit`` rows with seq > ``after_seq``, oldest first."""
        with self._lock:
            cur = self._db.execute(
                "SELECT seq, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            )
            return [Row(int(s), str(t), bytes(p)) for s, t, p in cur.fetchall()]

    def ack(self, seq: int) -> bool:
        """Delete a row the broker acknowledged; return False when it was already gone."""
        with self._lock:
            try:
                cur = self._db.execute("DELETE FROM outbox WHERE seq=?", (seq,))
            except sqlite3.Error as e:
                raise OutboxError(f"cannot write outbox {str(self.path)!r}: {e}") from None
            return cur.rowcount > 0

    def depth(self) -> tuple[int, int]:
        """Return (rows, bytes) waiting for an acknowledgement."""
        with self._lock:
            rows, nbytes = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM outbox"
            ).fetchone()
            return int(rows), int(nbytes)

    @property
    def dropped_total(self) -> int:
        """Windows dropped because the outbox was full, over the outbox's lifetime."""
        with self._lock:
            return self._meta("dropped_total")

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._meta("next_seq")

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
