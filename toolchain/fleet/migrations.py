"""Versioned schema migrations for the fleet database (SQLite and PostgreSQL share them).

Each migration is ``(version, name, statements)``; statements use placeholders the dialect fills in:
``{ID}`` an auto-incrementing primary key, ``{BLOB}`` bytes, ``{REAL}`` a double, ``{BIGINT}``.
A statement may also be ``Only(dialect, sql, guard)``: it runs on that dialect only, and only when
the ``guard`` query (if any) returns a row.
Append new migrations with the next version number; never edit one that has shipped, because the
``schema_migrations`` table records which versions a database already holds. Every version missing
from that table is applied, in order, also one below the highest applied: two branches may add
versions 6 and 7 at once, and a database migrated to 1-5 and 7 later gets 6.
"""

from __future__ import annotations

from typing import NamedTuple

DIALECT_TYPES = {
    "sqlite": {
        "ID": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "BLOB": "BLOB",
        "REAL": "REAL",
        "BIGINT": "INTEGER",
    },
    "postgresql": {
        "ID": "BIGSERIAL PRIMARY KEY",
        "BLOB": "BYTEA",
        "REAL": "DOUBLE PRECISION",
        "BIGINT": "BIGINT",
    },
}


class Only(NamedTuple):
    """A statement for one dialect, run only when ``guard`` (a query) returns a row."""

    dialect: str
    sql: str
    guard: str | None = None


MIGRATIONS: list[tuple[int, str, list[str | Only]]] = [
    (
        1,
        "baselines, devices, windows, events, quarantine, alerts, drift state",
        [
            """CREATE TABLE baselines (
                model_sha256 TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                version INTEGER NOT NULL,
                target TEXT NOT NULL,
                spec_hash TEXT NOT NULL,
                baseline_json TEXT NOT NULL,
                config_json TEXT NOT NULL,
                source TEXT NOT NULL,
                registered_at {REAL} NOT NULL
            )""",
            """CREATE TABLE devices (
                fleet TEXT NOT NULL,
                device_id TEXT NOT NULL,
                state TEXT NOT NULL DEFAULT 'unknown',
                status_ts {REAL},
                first_seen {REAL} NOT NULL,
                last_seen {REAL} NOT NULL,
                model_sha256 TEXT,
                model_name TEXT,
                model_version INTEGER,
                agent_version TEXT,
                target TEXT,
                deployment_json TEXT,
                dropped_windows {BIGINT} NOT NULL DEFAULT 0,
                PRIMARY KEY (fleet, device_id)
            )""",
            """CREATE TABLE windows (
                id {ID},
                fleet TEXT NOT NULL,
                device_id TEXT NOT NULL,
                seq {BIGINT} NOT NULL,
                window_start {REAL} NOT NULL,
                window_end {REAL} NOT NULL,
                received_at {REAL} NOT NULL,
                model_sha256 TEXT NOT NULL,
                spec_hash TEXT NOT NULL,
                count {BIGINT} NOT NULL,
                dropped_windows {BIGINT} NOT NULL,
                violations_json TEXT NOT NULL,
                ints {BLOB},
                floats {BLOB},
                pending_json TEXT,
                UNIQUE (fleet, device_id, seq)
            )""",
            "CREATE INDEX windows_device_end ON windows (fleet, device_id, window_end)",
            "CREATE INDEX windows_model_end ON windows (model_sha256, window_end)",
            """CREATE TABLE events (
                id {ID},
                fleet TEXT NOT NULL,
                device_id TEXT NOT NULL,
                event TEXT NOT NULL,
                ts {REAL} NOT NULL,
                message TEXT NOT NULL,
                detail_json TEXT NOT NULL,
                received_at {REAL} NOT NULL,
                UNIQUE (fleet, device_id, event, ts)
            )""",
            """CREATE TABLE quarantine (
                id {ID},
                received_at {REAL} NOT NULL,
                topic TEXT NOT NULL,
                reason TEXT NOT NULL,
                payload_head TEXT NOT NULL,
                payload_bytes {BIGINT} NOT NULL
            )""",
            """CREATE TABLE alerts (
                id {ID},
                ts {REAL} NOT NULL,
                fleet TEXT NOT NULL,
                device_id TEXT NOT NULL,
                model_sha256 TEXT NOT NULL,
                state TEXT NOT NULL,
                previous TEXT NOT NULL,
                message TEXT NOT NULL,
                detail_json TEXT NOT NULL
            )""",
            """CREATE TABLE drift_state (
                fleet TEXT NOT NULL,
                device_id TEXT NOT NULL,
                model_sha256 TEXT NOT NULL,
                state TEXT NOT NULL,
                candidate TEXT NOT NULL,
                streak INTEGER NOT NULL,
                last_window_id {BIGINT} NOT NULL,
                verdict TEXT NOT NULL,
                updated_at {REAL} NOT NULL,
                PRIMARY KEY (fleet, device_id)
            )""",
            """CREATE TABLE evaluations (
                id {ID},
                ts {REAL} NOT NULL,
                fleet TEXT NOT NULL,
                device_id TEXT NOT NULL,
                model_sha256 TEXT NOT NULL,
                window_from {REAL} NOT NULL,
                window_to {REAL} NOT NULL,
                count {BIGINT} NOT NULL,
                verdict TEXT NOT NULL,
                state TEXT NOT NULL,
                max_psi {REAL} NOT NULL,
                detail_json TEXT NOT NULL
            )""",
            "CREATE INDEX evaluations_device_ts ON evaluations (fleet, device_id, ts)",
        ],
    ),
    (
        2,
        "PostgreSQL: lz4 TOAST compression for packed windows",
        [
            # pglz, the default, spent about 0.4 ms of server CPU per 10 KB window here; lz4 about
            # 0.05 ms, for 3.2 instead of 2.1 KB on disk (benchmarks/collector_bench.py, docs/fleet.md).
            Only(
                "postgresql",
                "ALTER TABLE windows ALTER COLUMN ints SET COMPRESSION lz4,"
                " ALTER COLUMN floats SET COMPRESSION lz4",
                "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression'"
                " AND 'lz4' = ANY(enumvals)",
            ),
        ],
    ),
    (
        3,
        "window streams (dedup on fleet, device, stream, seq), per-device counters, collector counters",
        [
            # SQLite cannot change a table's UNIQUE constraint: rebuild windows, keeping every id
            # (drift_state.last_window_id points at them).
            Only(
                "sqlite",
                """CREATE TABLE windows_v3 (
                id {ID},
                fleet TEXT NOT NULL,
                device_id TEXT NOT NULL,
                stream TEXT NOT NULL DEFAULT '',
                seq {BIGINT} NOT NULL,
                window_start {REAL} NOT NULL,
                window_end {REAL} NOT NULL,
                received_at {REAL} NOT NULL,
                model_sha256 TEXT NOT NULL,
                spec_hash TEXT NOT NULL,
                count {BIGINT} NOT NULL,
                dropped_windows {BIGINT} NOT NULL,
                violations_json TEXT NOT NULL,
                ints {BLOB},
                floats {BLOB},
                pending_json TEXT,
                UNIQUE (fleet, device_id, stream, seq)
            )""",
            ),
            Only(
                "sqlite",
                "INSERT INTO windows_v3 (id, fleet, device_id, stream, seq, window_start, window_end,"
                " received_at, model_sha256, spec_hash, count, dropped_windows, violations_json, ints,"
                " floats, pending_json) SELECT id, fleet, device_id, '', seq, window_start, window_end,"
                " received_at, model_sha256, spec_hash, count, dropped_windows, violations_json, ints,"
                " floats, pending_json FROM windows",
            ),
            Only("sqlite", "DROP TABLE windows"),
            Only("sqlite", "ALTER TABLE windows_v3 RENAME TO windows"),
            Only("sqlite", "CREATE INDEX windows_device_end ON windows (fleet, device_id, window_end)"),
            Only("sqlite", "CREATE INDEX windows_model_end ON windows (model_sha256, window_end)"),
            Only("postgresql", "ALTER TABLE windows ADD COLUMN stream TEXT NOT NULL DEFAULT ''"),
            Only("postgresql", "ALTER TABLE windows DROP CONSTRAINT windows_fleet_device_id_seq_key"),
            Only(
                "postgresql",
                "ALTER TABLE windows ADD CONSTRAINT windows_fleet_device_stream_seq"
                " UNIQUE (fleet, device_id, stream, seq)",
            ),
            # Counters kept per device at ingestion, so `fleet status` reads one row per device.
            "ALTER TABLE devices ADD COLUMN windows {BIGINT} NOT NULL DEFAULT 0",
            "ALTER TABLE devices ADD COLUMN predictions {BIGINT} NOT NULL DEFAULT 0",
            "ALTER TABLE devices ADD COLUMN duplicates {BIGINT} NOT NULL DEFAULT 0",
            "ALTER TABLE devices ADD COLUMN stream TEXT",
            "ALTER TABLE devices ADD COLUMN stream_changes {BIGINT} NOT NULL DEFAULT 0",
            "ALTER TABLE devices ADD COLUMN stream_started {REAL}",
            "UPDATE devices SET windows = (SELECT COUNT(*) FROM windows w WHERE w.fleet = devices.fleet"
            " AND w.device_id = devices.device_id), predictions = (SELECT COALESCE(SUM(w.count), 0)"
            " FROM windows w WHERE w.fleet = devices.fleet AND w.device_id = devices.device_id)",
            """CREATE TABLE device_streams (
                fleet TEXT NOT NULL,
                device_id TEXT NOT NULL,
                stream TEXT NOT NULL,
                first_seen {REAL} NOT NULL,
                first_seq {BIGINT} NOT NULL,
                PRIMARY KEY (fleet, device_id, stream)
            )""",
            """CREATE TABLE collector_counters (
                name TEXT PRIMARY KEY,
                value {BIGINT} NOT NULL,
                updated_at {REAL} NOT NULL
            )""",
            """CREATE TABLE broker_counters (
                broker TEXT NOT NULL,
                topic TEXT NOT NULL,
                value {BIGINT} NOT NULL,
                rises {BIGINT} NOT NULL,
                first_seen {REAL} NOT NULL,
                updated_at {REAL} NOT NULL,
                PRIMARY KEY (broker, topic)
            )""",
        ],
    ),
    (
        4,
        "hourly per-device rollups of compacted windows; the latest evaluation kept in drift_state",
        [
            """CREATE TABLE window_rollups (
                id {ID},
                fleet TEXT NOT NULL,
                device_id TEXT NOT NULL,
                model_sha256 TEXT NOT NULL,
                spec_hash TEXT NOT NULL,
                hour {REAL} NOT NULL,
                window_start {REAL} NOT NULL,
                window_end {REAL} NOT NULL,
                windows {BIGINT} NOT NULL,
                count {BIGINT} NOT NULL,
                dropped_windows {BIGINT} NOT NULL,
                violations_json TEXT NOT NULL,
                ints {BLOB},
                floats {BLOB},
                UNIQUE (fleet, device_id, model_sha256, hour)
            )""",
            "CREATE INDEX window_rollups_model_end ON window_rollups (model_sha256, window_end)",
            "CREATE INDEX window_rollups_device_end ON window_rollups (fleet, device_id, window_end)",
            Only(
                "postgresql",
                "ALTER TABLE window_rollups ALTER COLUMN ints SET COMPRESSION lz4,"
                " ALTER COLUMN floats SET COMPRESSION lz4",
                "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression'"
                " AND 'lz4' = ANY(enumvals)",
            ),
            # `fleet drift` reads one row per device instead of merging its windows again.
            "ALTER TABLE drift_state ADD COLUMN max_psi {REAL}",
            "ALTER TABLE drift_state ADD COLUMN count {BIGINT}",
            "ALTER TABLE drift_state ADD COLUMN window_from {REAL}",
            "ALTER TABLE drift_state ADD COLUMN window_to {REAL}",
            "ALTER TABLE drift_state ADD COLUMN detail_json TEXT",
        ],
    ),
    (
        5,
        "ground truth: labelled and correct counts (and the confusion matrix) of windows and rollups",
        [
            # NULL: the window carried no labels (every window of older agents).
            "ALTER TABLE windows ADD COLUMN labelled {BIGINT}",
            "ALTER TABLE windows ADD COLUMN correct {BIGINT}",
            "ALTER TABLE windows ADD COLUMN confusion_json TEXT",
            "ALTER TABLE window_rollups ADD COLUMN labelled {BIGINT}",
            "ALTER TABLE window_rollups ADD COLUMN correct {BIGINT}",
            "ALTER TABLE window_rollups ADD COLUMN confusion_json TEXT",
            # Accuracy reads only the labelled rows.
            "CREATE INDEX windows_labelled ON windows (fleet, device_id, model_sha256) WHERE labelled IS NOT NULL",
            "CREATE INDEX window_rollups_labelled ON window_rollups (fleet, device_id, model_sha256)"
            " WHERE labelled IS NOT NULL",
        ],
    ),
    (
        6,
        "captured samples (raw inputs in the row) and their ground-truth labels",
        [
            # One row per captured input, unique per device and prediction id (a redelivered samples
            # message stores nothing). ``data`` is the raw C-order input (at most ~48 KB: one sample
            # fits a 64 KB message): SQLite keeps it in the row, PostgreSQL moves it out of line
            # (TOAST) by itself; docs/fleet.md says why not files beside the database.
            """CREATE TABLE samples (
                id {ID},
                fleet TEXT NOT NULL,
                device_id TEXT NOT NULL,
                sample_id TEXT NOT NULL,
                stream TEXT NOT NULL,
                seq {BIGINT} NOT NULL,
                pos INTEGER NOT NULL,
                ts {REAL} NOT NULL,
                received_at {REAL} NOT NULL,
                model_sha256 TEXT NOT NULL,
                model_version TEXT,
                predicted INTEGER NOT NULL,
                scores {BLOB} NOT NULL,
                dtype TEXT NOT NULL,
                shape TEXT NOT NULL,
                data {BLOB} NOT NULL,
                UNIQUE (fleet, device_id, sample_id)
            )""",
            "CREATE INDEX samples_ts ON samples (ts, fleet, device_id)",
            "CREATE INDEX samples_device_ts ON samples (fleet, device_id, ts)",
            # Kept apart from samples: a label may arrive for a sample the device dropped at its disk
            # cap (or before a redelivered sample); the export joins them.
            """CREATE TABLE sample_labels (
                fleet TEXT NOT NULL,
                device_id TEXT NOT NULL,
                sample_id TEXT NOT NULL,
                label TEXT NOT NULL,
                label_index INTEGER NOT NULL,
                ts {REAL} NOT NULL,
                received_at {REAL} NOT NULL,
                PRIMARY KEY (fleet, device_id, sample_id)
            )""",
            Only(
                "postgresql",
                "ALTER TABLE samples ALTER COLUMN data SET COMPRESSION lz4",
                "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression'"
                " AND 'lz4' = ANY(enumvals)",
            ),
        ],
    ),
    (
        7,
        "rollout events: canary gate decisions with their numbers",
        [
            """CREATE TABLE rollout_events (
                id {ID},
                ts {REAL} NOT NULL,
                fleet TEXT NOT NULL,
                deployment_id TEXT NOT NULL,
                model_name TEXT NOT NULL,
                model_version INTEGER NOT NULL,
                model_sha256 TEXT NOT NULL,
                gate TEXT NOT NULL,
                outcome TEXT NOT NULL,
                action TEXT NOT NULL,
                windows INTEGER NOT NULL,
                message TEXT NOT NULL,
                detail_json TEXT NOT NULL
            )""",
            "CREATE INDEX rollout_events_ts ON rollout_events (fleet, ts)",
        ],
    ),
    (
        8,
        "seq accounting per stream: lowest and highest seq stored, windows stored, drops the device reported",
        [
            # A device's outbox numbers its windows 1, 2, 3 ... per stream, so a stream's
            # max_seq - min_seq + 1 - stored - dropped windows are missing: lost between the device
            # and the database (a broker that dropped or lost them) or still on their way.
            "ALTER TABLE device_streams ADD COLUMN min_seq {BIGINT}",
            "ALTER TABLE device_streams ADD COLUMN max_seq {BIGINT}",
            "ALTER TABLE device_streams ADD COLUMN stored {BIGINT} NOT NULL DEFAULT 0",
            "ALTER TABLE device_streams ADD COLUMN dropped {BIGINT} NOT NULL DEFAULT 0",
            "UPDATE device_streams SET"
            " min_seq = (SELECT MIN(w.seq) FROM windows w WHERE w.fleet = device_streams.fleet"
            " AND w.device_id = device_streams.device_id AND w.stream = device_streams.stream),"
            " max_seq = (SELECT MAX(w.seq) FROM windows w WHERE w.fleet = device_streams.fleet"
            " AND w.device_id = device_streams.device_id AND w.stream = device_streams.stream),"
            " stored = (SELECT COUNT(*) FROM windows w WHERE w.fleet = device_streams.fleet"
            " AND w.device_id = device_streams.device_id AND w.stream = device_streams.stream),"
            " dropped = (SELECT COALESCE(SUM(w.dropped_windows), 0) FROM windows w"
            " WHERE w.fleet = device_streams.fleet AND w.device_id = device_streams.device_id"
            " AND w.stream = device_streams.stream)",
        ],
    ),
]


def render(statement: str, dialect: str) -> str:
    """Fill a migration statement's type placeholders for a dialect."""
    return statement.format(**DIALECT_TYPES[dialect])
