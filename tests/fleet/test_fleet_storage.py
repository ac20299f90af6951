"""Storage on real SQLite and PostgreSQL: migrations, idempotent ingestion, pending windows, quarantine."""

from __future__ import annotations

import json
import time

import pytest

from device_agent.formats.telemetry import encode_event
from toolchain.fleet.ingest import Incoming, Ingestor
from toolchain.fleet.migrations import MIGRATIONS
from toolchain.fleet.queries import drift_table
from toolchain.fleet.registry import BaselineCache, register_bundle
from toolchain.fleet.sim import stats_payload, status_payload
from toolchain.fleet.status import status_rows
from toolchain.fleet.storage import StorageError, open_store, parse_db_url


def incoming(topic: str, payload: bytes, mid: int = 1) -> Incoming:
    return Incoming(topic, payload, mid, 1, 0, time.time())


def test_parse_db_url_errors_name_the_fix() -> None:
    assert parse_db_url("sqlite:///x.db") == ("sqlite", "x.db")
    assert parse_db_url("postgresql://u@h/db")[0] == "postgresql"
    with pytest.raises(StorageError, match=r"use sqlite:///PATH"):
        parse_db_url("mysql://x")


def test_migrations_are_versioned_and_idempotent(db_url: str) -> None:
    with open_store(db_url) as s:
        assert s.schema_version() == max(v for v, _, _ in MIGRATIONS)
        assert s.migrate() == s.schema_version()  # a second run applies nothing
        rows = s.query("SELECT version FROM schema_migrations")
        assert sorted(r[0] for r in rows) == [v for v, _, _ in MIGRATIONS]
        s.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)", (999, "future", 0.0)
        )
    with pytest.raises(StorageError, match="newer than this edgefleet"):
        open_store(db_url)


def test_sqlite_runs_in_wal_with_full_sync(sqlite_url: str) -> None:
    with open_store(sqlite_url) as s:
        assert s.query("PRAGMA journal_mode")[0][0] == "wal"
        assert s.query("PRAGMA synchronous")[0][0] == 2  # FULL


def test_ingestion_is_idempotent_and_devices_track_state(db_url, bundle, model_ref, make_window) -> None:
    register_bundle(db_url, bundle[0])
    with open_store(db_url) as s:
        ing = Ingestor(s, BaselineCache(s))
        windows = [
            stats_payload("dev-1", seq, model_ref, make_window(60, seed=seq), dropped=seq) for seq in range(5)
        ]
        ing.process([incoming(t, p) for t, p in windows])
        # Redelivery of everything, plus duplicates inside one batch.
        res = ing.process([incoming(t, p) for t, p in windows + windows[:2]])
        assert res.stored == 0
        assert s.query("SELECT COUNT(*) FROM windows")[0][0] == 5
        t, p = status_payload("dev-1", model_ref, deployment={"state": "staged", "version": 2})
        ing.process([incoming(t, p)])
        t, p = status_payload("dev-1", model_ref, state="offline")
        ev = encode_event(device_id="dev-1", fleet="lab", event="model_loaded", ts=time.time(), message="ok")
        ing.process(
            [
                incoming(t, p),
                incoming("edgefleet/lab/dev-1/events", ev),
                incoming("edgefleet/lab/dev-1/events", ev),
            ]
        )
        assert s.query("SELECT COUNT(*) FROM events")[0][0] == 1
        rows = status_rows(s)
    assert len(rows) == 1
    r = rows[0]
    assert r["state"] == "offline" and r["windows"] == 5 and r["predictions"] == 300
    # each window reports the drops since the previous one (0 + 1 + 2 + 3 + 4); redelivery adds none
    assert r["dropped_windows"] == 10 and r["model"]["name"] == "digits"
    assert r["deployment_state"] == "staged"  # kept from the earlier status; the later one had none


def test_windows_before_registration_wait_then_get_judged(
    db_url, bundle, model_ref, make_window, digits_model
) -> None:
    with open_store(db_url) as s:
        ing = Ingestor(s, BaselineCache(s))
        good = [stats_payload("dev-2", seq, model_ref, make_window(100, seed=seq)) for seq in range(3)]
        # A window whose histograms do not fit the baseline (one bin cut off the first feature).
        t, raw = stats_payload("dev-2", 3, model_ref, make_window(100, seed=3))
        doc = json.loads(raw)
        doc["inputs"]["hist"][0] = doc["inputs"]["hist"][0][:-1]
        bad = json.dumps(doc).encode()
        res = ing.process([incoming(tt, p) for tt, p in good] + [incoming(t, bad)])
        assert res.unknown_models == {model_ref.sha256}
        assert s.query("SELECT COUNT(*) FROM windows WHERE pending_json IS NOT NULL")[0][0] == 4
        assert drift_table(s) == []  # nothing to judge without a baseline
        info = register_bundle(s, bundle[0])
        assert (info["pending_packed"], info["pending_quarantined"]) == (3, 1)
        assert s.query("SELECT COUNT(*) FROM windows WHERE pending_json IS NULL")[0][0] == 3
        reason = s.query("SELECT reason FROM quarantine")[0][0]
        assert "bins, the baseline has" in reason
        rows = drift_table(s)
        (dev,) = status_rows(s)
        assert (dev["windows"], dev["predictions"]) == (3, 300)  # the misfit moved to the quarantine
        assert dict(s.query("SELECT name, value FROM collector_counters"))["quarantined"] == 1
    assert {r["scope"] for r in rows} == {"device", "fleet"}
    assert all(r["count"] == 300 for r in rows)


def test_register_keeps_settings_and_refuses_a_damaged_bundle(sqlite_url, bundle) -> None:
    from toolchain.fleet.registry import RegistryError

    info = register_bundle(sqlite_url, bundle[0], {"psi_alert": 0.3})
    assert info["created"] and info["config"]["psi_alert"] == 0.3
    again = register_bundle(sqlite_url, bundle[0])
    assert not again["created"] and again["config"]["psi_alert"] == 0.3
    (bundle[0] / "baseline.json").write_text("{}")
    with pytest.raises(RegistryError, match="baseline.json. has 2 bytes, the manifest says"):
        register_bundle(sqlite_url, bundle[0])


@pytest.mark.postgres
def test_postgresql_packs_windows_with_lz4(postgres_url: str) -> None:
    """Migration 2: lz4 TOAST compression for the packed columns (pglz cost 0.4 ms of CPU per window)."""
    with open_store(postgres_url) as s:
        rows = s.query(
            "SELECT attname, attcompression FROM pg_attribute WHERE attrelid = 'windows'::regclass"
            " AND attname IN ('ints', 'floats') ORDER BY attname"
        )
    assert [(r[0], r[1]) for r in rows] == [("floats", "l"), ("ints", "l")]


def test_baseline_cache_picks_up_changed_thresholds(db_url, bundle) -> None:
    """`fleet register --set` on a running collector: new settings within REFRESH_S, same layout."""
    info = register_bundle(db_url, bundle[0])
    sha = info["model_sha256"]
    with open_store(db_url) as s:
        cache = BaselineCache(s)
        first = cache.get(sha)
        assert first is not None and first.config.psi_alert != 0.33
        register_bundle(db_url, bundle[0], {"psi_alert": 0.33})
        assert cache.get(sha) is first  # still within REFRESH_S: the cached settings
        cache.REFRESH_S = 0.0
        now = cache.get(sha)
        assert now is not None and now.config.psi_alert == 0.33
        assert now.layout is first.layout and now.profile is first.profile
        s.close()  # a database that fails on the re-read: the cached settings stay in use
        assert cache.get(sha) is now


def _legacy(payload: bytes) -> bytes:
    """The same window as an agent without streams sends it (stats schema 1)."""
    doc = json.loads(payload)
    del doc["stream"]
    doc["schema"] = 1
    return json.dumps(doc).encode()


def test_a_reset_device_starts_a_new_stream_and_nothing_is_dropped(
    db_url, bundle, model_ref, make_window
) -> None:
    """Finding 1: seq restarting at 1 after lost state must not make new windows 'duplicates'."""
    register_bundle(db_url, bundle[0])
    with open_store(db_url) as s:
        ing = Ingestor(s, BaselineCache(s))
        before = [
            stats_payload("dev-1", seq, model_ref, make_window(30, seed=seq), stream="aaaaaaaaaaaaaaaa")
            for seq in range(1, 6)
        ]
        after = [  # state wiped: seq from 1 again, a new stream
            stats_payload("dev-1", seq, model_ref, make_window(20, seed=50 + seq), stream="bbbbbbbbbbbbbbbb")
            for seq in range(1, 4)
        ]
        ing.process([incoming(t, p) for t, p in before])
        res = ing.process([incoming(t, p) for t, p in after + after[:1]])  # and one true resend
        assert res.stored == 3
        assert s.query("SELECT COUNT(*), SUM(count) FROM windows")[0] == (8, 5 * 30 + 3 * 20)
        assert ing.counters.duplicates == 1 and ing.counters.stream_changes == 1
        (r,) = status_rows(s)
        assert r["windows"] == 8 and r["predictions"] == 210
        assert r["duplicates"] == 1 and r["stream_changes"] == 1 and r["stream"] == "bbbbbbbbbbbbbbbb"
        # A second collector (fresh cache) sees the same streams: no second "change".
        ing2 = Ingestor(s, BaselineCache(s))
        t, p = stats_payload("dev-1", 4, model_ref, make_window(20, seed=99), stream="bbbbbbbbbbbbbbbb")
        assert ing2.process([incoming(t, p)]).stored == 1
        assert status_rows(s)[0]["stream_changes"] == 1
        counters = dict(s.query("SELECT name, value FROM collector_counters"))
        assert counters["windows_stored"] == 9 and counters["windows_duplicate"] == 1
        # A new device whose first and second stream arrive in one batch: one change, not two.
        both = [
            stats_payload("dev-9", 1, model_ref, make_window(10, seed=1), stream="cccccccccccccccc"),
            stats_payload("dev-9", 1, model_ref, make_window(10, seed=2), stream="dddddddddddddddd"),
        ]
        ing2.process([incoming(t, p) for t, p in both])
        r9 = next(r for r in status_rows(s) if r["device_id"] == "dev-9")
        assert r9["stream_changes"] == 1 and r9["stream"] == "dddddddddddddddd" and r9["windows"] == 2


def test_schema_1_windows_without_a_stream_are_stored_and_deduplicated(
    db_url, bundle, model_ref, make_window
) -> None:
    register_bundle(db_url, bundle[0])
    with open_store(db_url) as s:
        ing = Ingestor(s, BaselineCache(s))
        old = [
            _legacy(stats_payload("dev-1", seq, model_ref, make_window(30, seed=seq))[1]) for seq in range(3)
        ]
        ing.process([incoming("edgefleet/lab/dev-1/stats", p) for p in old + old[:2]])
        assert s.query("SELECT COUNT(*) FROM windows WHERE stream = ''")[0][0] == 3
        assert ing.counters.duplicates == 2 and ing.counters.legacy_duplicates == 2
        # The agent is upgraded: its first stream is not a restart.
        t, p = stats_payload("dev-1", 3, model_ref, make_window(30, seed=3))
        ing.process([incoming(t, p)])
        (r,) = status_rows(s)
        assert r["windows"] == 4 and r["duplicates"] == 2 and r["stream_changes"] == 0 and r["stream"]


def test_migration_3_keeps_windows_and_counts_them(tmp_path, bundle, model_ref, make_window) -> None:
    """A database written before streams: windows keep their ids, devices get their counters."""
    from toolchain.fleet import migrations

    url = f"sqlite:///{tmp_path / 'old.db'}"
    keep = migrations.MIGRATIONS
    try:
        migrations.MIGRATIONS = [m for m in keep if m[0] < 3]
        import toolchain.fleet.storage as storage_mod

        storage_mod.MIGRATIONS = migrations.MIGRATIONS
        with open_store(url) as s:
            for seq in range(4):
                s.execute(
                    "INSERT INTO windows (fleet, device_id, seq, window_start, window_end, received_at,"
                    " model_sha256, spec_hash, count, dropped_windows, violations_json) VALUES"
                    " ('lab', 'dev-1', ?, 0, 1, 1, 'x', 'y', 10, 0, '{}')",
                    (seq,),
                )
            s.execute(
                "INSERT INTO devices (fleet, device_id, first_seen, last_seen) VALUES ('lab', 'dev-1', 1, 1)"
            )
    finally:
        migrations.MIGRATIONS = keep
        storage_mod.MIGRATIONS = keep
    with open_store(url) as s:
        assert s.schema_version() == max(v for v, _, _ in keep)
        assert s.query("SELECT id, stream, seq FROM windows ORDER BY id") == [
            (i + 1, "", i) for i in range(4)
        ]
        (r,) = status_rows(s)
        assert r["windows"] == 4 and r["predictions"] == 40


def test_quarantine_keeps_the_newest_rows_and_counts_every_one(db_url) -> None:
    with open_store(db_url) as s:
        ing = Ingestor(s, BaselineCache(s), quarantine_max_rows=5)
        for b in range(3):
            ing.process([incoming(f"edgefleet/lab/dev-{b}-{i}/stats", b"not json") for i in range(4)])
        topics = [r[0] for r in s.query("SELECT topic FROM quarantine ORDER BY id")]
        assert topics == ["edgefleet/lab/dev-1-3/stats"] + [
            f"edgefleet/lab/dev-2-{i}/stats" for i in range(4)
        ]
        counters = dict(s.query("SELECT name, value FROM collector_counters"))
        assert counters["quarantined"] == 12 and counters["quarantine_evicted"] == 7
        assert ing.counters.quarantined == 12 and ing.counters.quarantine_evicted == 7
        # One log line for the whole flood (the throttle's window is 10 s).
        assert ing.quarantine_log.lines == 1


def test_throttle_counts_what_it_holds_back(caplog) -> None:
    import logging

    from toolchain.fleet.ratelog import Throttle

    now = [0.0]
    t = Throttle(logging.getLogger("edgefleet.test.throttle"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, "edgefleet.test.throttle"):
        assert t.log(logging.WARNING, "bad %d", 1)
        for i in range(50):
            now[0] += 0.1
            assert not t.log(logging.WARNING, "bad %d", i + 2, events=2)
        now[0] += 10.0
        assert t.log(logging.WARNING, "bad %d", 99)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["bad 1", "bad 99 (and 100 more since the previous such line: 50 line(s) held back)"]
    assert t.lines == 2


def test_windows_missing_from_a_stream_are_counted_and_shown(db_url, bundle, model_ref, make_window) -> None:
    """Seqs between the lowest and highest stored that are neither stored nor reported dropped are missing;
    a late window fills its gap, a redelivery changes nothing, and a new stream counts on its own."""
    from toolchain.fleet.status import status_summary

    register_bundle(db_url, bundle[0])

    def win(seq: int, dropped: int = 0, stream: str | None = None, device: str = "dev-1") -> Incoming:
        return incoming(
            *stats_payload(device, seq, model_ref, make_window(20, seed=seq), dropped=dropped, stream=stream)
        )

    with open_store(db_url) as s:
        ing = Ingestor(s, BaselineCache(s))
        # seqs 1-3, then 4-6 never arrive, 7 reports 1 drop (the outbox overflowed), 8-10 arrive
        ing.process([win(q) for q in (1, 2, 3)])
        ing.process([win(7, dropped=1)] + [win(q) for q in (8, 9, 10)])
        ing.process([win(2), win(9)])  # redelivered: nothing changes
        (row,) = status_rows(s)
        assert row["missing_windows"] == 10 - 7 - 1
        ing.process([win(5)])  # late, after a reconnect: its gap closes
        (row,) = status_rows(s)
        assert row["missing_windows"] == 1
        # the device lost its state: a new stream from seq 1, with its own accounting (2 of 4 missing)
        ing.process([win(1, stream="b" * 16), win(4, stream="b" * 16)])
        (row,) = status_rows(s)
        assert row["missing_windows"] == 1 + 2 and row["stream_changes"] == 1
        # a second device without gaps
        ing.process([win(q, device="dev-2") for q in (1, 2, 3)])
        rows = {r["device_id"]: r for r in status_rows(s)}
        assert rows["dev-2"]["missing_windows"] == 0
        assert "dev-1" in [r["device_id"] for r in status_rows(s, notable_limit=10)]
        assert status_summary(s)["missing_windows"] == 3
        # migration 8 computes the same numbers from the stored windows (databases from before it)
        (backfill,) = [st for v, _, sts in MIGRATIONS if v == 8 for st in sts if str(st).startswith("UPDATE")]
        before = s.query("SELECT stream, min_seq, max_seq, stored, dropped FROM device_streams ORDER BY 1, 2")
        s.execute("UPDATE device_streams SET min_seq = NULL, max_seq = NULL, stored = 0, dropped = 0")
        s.execute(str(backfill))
        assert (
            s.query("SELECT stream, min_seq, max_seq, stored, dropped FROM device_streams ORDER BY 1, 2")
            == before
        )
