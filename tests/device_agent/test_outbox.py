"""The disk outbox: persisted strictly increasing seq, order, bounds with drop reporting, crash safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.outbox import Outbox, OutboxError

REPO = Path(__file__).resolve().parents[2]


def enc(seq: int, dropped: int) -> bytes:
    return json.dumps({"seq": seq, "dropped_windows": dropped}).encode()


def test_seq_is_strictly_increasing_and_survives_reopen(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    assert [ob.add("t", enc) for _ in range(3)] == [1, 2, 3]
    for s in (1, 2, 3):
        assert ob.ack(s)
    ob.close()
    ob = Outbox(tmp_path / "o.db")  # empty queue, but seq continues
    assert ob.add("t", enc) == 4
    assert ob.depth()[0] == 1


def test_pending_in_seq_order_after_cursor_and_ack_deletes(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    for _ in range(5):
        ob.add("a/b", enc)
    assert [r.seq for r in ob.pending()] == [1, 2, 3, 4, 5]
    assert [r.seq for r in ob.pending(after_seq=2, limit=2)] == [3, 4]
    assert ob.ack(3) and not ob.ack(3)
    assert [r.seq for r in ob.pending()] == [1, 2, 4, 5]
    row = ob.pending(limit=1)[0]
    assert row.topic == "a/b" and json.loads(row.payload) == {"seq": 1, "dropped_windows": 0}


def test_row_bound_drops_oldest_and_next_payload_reports_each_drop_once(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", max_rows=3)
    for _ in range(8):
        ob.add("t", enc)
    rows = ob.pending()
    assert [r.seq for r in rows] == [6, 7, 8]
    assert ob.dropped_total == 5
    delivered = [json.loads(r.payload)["dropped_windows"] for r in rows]
    for r in rows:
        ob.ack(r.seq)
    ob.add("t", enc)
    (nxt,) = ob.pending()
    # adding seq 4-8 evicted seq 1-5; seq 5 carried a report of one drop, which moves on to seq 9
    assert delivered == [1, 1, 1] and json.loads(nxt.payload)["dropped_windows"] == 2
    assert sum(delivered) + 2 == ob.dropped_total  # every drop reported exactly once


def test_byte_bound(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", max_rows=1000, max_bytes=2000)
    for _ in range(10):
        ob.add("t", lambda s, d: b"x" * 600)
    rows, nbytes = ob.depth()
    assert rows == 3 and nbytes == 1800 and ob.dropped_total == 7


def test_rows_survive_a_killed_process(tmp_path: Path) -> None:
    """A row committed by add() is on disk even when the process dies right after (os._exit)."""
    code = (
        f"import sys, os; sys.path.insert(0, {str(REPO)!r}); from device_agent.outbox import Outbox; "
        f"ob = Outbox({str(tmp_path / 'o.db')!r}); "
        "[ob.add('t', lambda s, d: b'w' + str(s).encode()) for _ in range(3)]; ob.ack(1); os._exit(9)"
    )
    rc = subprocess.run([sys.executable, "-c", code]).returncode
    assert rc == 9
    ob = Outbox(tmp_path / "o.db")
    assert [(r.seq, r.payload) for r in ob.pending()] == [(2, b"w2"), (3, b"w3")]
    assert ob.add("t", enc) == 4


def test_wal_and_full_sync(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    assert ob._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ob._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_encode_failure_leaves_no_row_and_no_seq_gap(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")

    def boom(seq: int, dropped: int) -> bytes:
        raise ValueError("too big")

    with pytest.raises(ValueError):
        ob.add("t", boom)
    assert ob.depth() == (0, 0)
    assert ob.add("t", enc) == 1


def test_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutboxError, match="state_dir"):
        Outbox(tmp_path / "file" / "o.db")
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir(mode=0o500)
        with pytest.raises(OutboxError):
            Outbox(d / "o.db")


def test_stream_id_is_random_per_database_and_persisted(tmp_path: Path) -> None:
    import re
    import sqlite3

    ob = Outbox(tmp_path / "a" / "o.db")
    stream = ob.stream
    assert re.fullmatch(r"[0-9a-f]{16}", stream)
    ob.add("t", enc)
    ob.close()
    again = Outbox(tmp_path / "a" / "o.db")
    assert again.stream == stream and again.next_seq == 2
    again.close()
    # the state directory wiped: seq starts at 1 again, in a new stream
    fresh = Outbox(tmp_path / "b" / "o.db")
    assert fresh.stream != stream and fresh.add("t", enc) == 1
    fresh.close()
    # an outbox made before streams existed gets one, and its seq goes on
    old = tmp_path / "c" / "o.db"
    Outbox(old).close()
    with sqlite3.connect(old) as db:
        db.execute("DROP TABLE identity")
        db.execute("UPDATE meta SET value=41 WHERE key='next_seq'")
    up = Outbox(old)
    assert re.fullmatch(r"[0-9a-f]{16}", up.stream) and up.add("t", enc) == 41
    up.close()
