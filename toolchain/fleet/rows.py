"""The rows the collector writes, one NamedTuple per table, and the one INSERT statement of each.

The field names are the column names, so a statement is made from its row type and cannot list the
columns in another order than the values. The statements use ``?`` placeholders and SQL that SQLite
and PostgreSQL both run (``Store`` turns ``?`` into ``%s`` for psycopg); only the two-argument maximum
differs and comes from ``Store.greatest``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class WindowRow(NamedTuple):
    """A stats window (``windows``): packed in its baseline's layout, or pending without a baseline."""

    fleet: str
    device_id: str
    stream: str  # "" for schema 1 windows (agents without a stream id)
    seq: int
    window_start: float  # epoch seconds
    window_end: float
    received_at: float
    model_sha256: str
    spec_hash: str
    count: int  # type: ignore[assignment]  # the column; shadows tuple.count, which no caller uses
    dropped_windows: int
    violations_json: str
    ints: bytes | None  # packed int64 (None: a heartbeat, or pending)
    floats: bytes | None  # packed float64
    pending_json: str | None  # the raw statistics while the model has no registered baseline
    labelled: int | None = None  # ground truth (stats schema 3): labels counted in the window
    correct: int | None = None  # ... of which the prediction was right
    confusion_json: str | None = None  # [[true x predicted counts]] or None (no labels, or > 32 labels)


class DeviceSeen(NamedTuple):
    """A device's upsert from the windows of one batch (``devices``).

    The first nine fields come from its newest window of the batch; the rest are what the batch
    changed once stored (windows, predictions and duplicates add up; the stream fields are set when
    it started a new stream).
    """

    fleet: str
    device_id: str
    first_seen: float
    last_seen: float
    model_sha256: str
    model_name: str
    model_version: int
    agent_version: str
    dropped_windows: int  # windows the device reported dropped, added up over the stored windows
    windows: int = 0
    predictions: int = 0
    duplicates: int = 0
    stream: str | None = None
    stream_changes: int = 0
    stream_started: float | None = None


class StatusRow(NamedTuple):
    """A device's retained status message (``devices``); model fields None when it serves none."""

    fleet: str
    device_id: str
    state: str
    status_ts: float
    first_seen: float
    last_seen: float
    model_sha256: str | None
    model_name: str | None
    model_version: int | None
    agent_version: str
    target: str | None
    deployment_json: str | None


class EventRow(NamedTuple):
    """A device event (``events``), unique per (fleet, device, event, ts)."""

    fleet: str
    device_id: str
    event: str
    ts: float
    message: str
    detail_json: str
    received_at: float


class StreamRow(NamedTuple):
    """The first window of a device's stream (``device_streams``)."""

    fleet: str
    device_id: str
    stream: str
    first_seen: float
    first_seq: int


class QuarantineRow(NamedTuple):
    """A refused message (``quarantine``): why, and its first bytes."""

    received_at: float
    topic: str
    reason: str
    payload_head: str
    payload_bytes: int


class CounterRow(NamedTuple):
    """A rise of one of the collector's totals (``collector_counters``)."""

    name: str
    value: int
    updated_at: float


def insert_sql(table: str, cols: tuple[str, ...]) -> str:
    """Return ``INSERT INTO table (cols) VALUES (?, ...)`` (SQLite style; the PostgreSQL store rewrites ``?``)."""
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"


WINDOW_SQL = (
    insert_sql("windows", WindowRow._fields) + " ON CONFLICT (fleet, device_id, stream, seq) DO NOTHING"
)
STREAM_SQL = (
    insert_sql("device_streams", StreamRow._fields) + " ON CONFLICT (fleet, device_id, stream) DO NOTHING"
)
EVENT_SQL = insert_sql("events", EventRow._fields) + " ON CONFLICT (fleet, device_id, event, ts) DO NOTHING"
QUARANTINE_SQL = insert_sql("quarantine", QuarantineRow._fields)
# Oldest rows go first; the subquery is NULL (nothing deleted) while there are fewer rows.
QUARANTINE_TRIM_SQL = (
    "DELETE FROM quarantine WHERE id <= (SELECT id FROM quarantine ORDER BY id DESC LIMIT 1 OFFSET ?)"
)
COUNTER_SQL = (
    insert_sql("collector_counters", CounterRow._fields) + " ON CONFLICT (name)"
    " DO UPDATE SET value = collector_counters.value + excluded.value, updated_at = excluded.updated_at"
)


def device_seen_sql(greatest: Callable[[str, str], str]) -> str:
    """The upsert of ``DeviceSeen`` rows (``greatest``: the dialect's two-argument maximum)."""
    g = greatest
    return (
        insert_sql("devices", DeviceSeen._fields) + " ON CONFLICT (fleet, device_id)"
        f" DO UPDATE SET last_seen = {g('devices.last_seen', 'excluded.last_seen')},"
        " model_sha256 = excluded.model_sha256, model_name = excluded.model_name,"
        " model_version = excluded.model_version, agent_version = excluded.agent_version,"
        " dropped_windows = devices.dropped_windows + excluded.dropped_windows,"
        " windows = devices.windows + excluded.windows,"
        " predictions = devices.predictions + excluded.predictions,"
        " duplicates = devices.duplicates + excluded.duplicates,"
        " stream = COALESCE(excluded.stream, devices.stream),"
        " stream_changes = devices.stream_changes + excluded.stream_changes,"
        " stream_started = COALESCE(excluded.stream_started, devices.stream_started)"
    )


def stream_seq_sql(greatest: Callable[[str, str], str], least: Callable[[str, str], str]) -> str:
    """Fold a batch's stored windows of one stream into ``device_streams``' seq accounting.

    Parameters: lowest seq twice, highest seq twice, windows stored, drops reported, fleet, device,
    stream.
    """
    return (
        f"UPDATE device_streams SET min_seq = {least('COALESCE(min_seq, ?)', '?')},"
        f" max_seq = {greatest('COALESCE(max_seq, ?)', '?')}, stored = stored + ?, dropped = dropped + ?"
        " WHERE fleet = ? AND device_id = ? AND stream = ?"
    )


def status_sql(greatest: Callable[[str, str], str]) -> str:
    """The upsert of ``StatusRow`` rows: a model field left None keeps the stored one."""
    return (
        insert_sql("devices", StatusRow._fields)
        + " ON CONFLICT (fleet, device_id) DO UPDATE SET state = excluded.state,"
        " status_ts = excluded.status_ts,"
        f" last_seen = {greatest('devices.last_seen', 'excluded.last_seen')},"
        " model_sha256 = COALESCE(excluded.model_sha256, devices.model_sha256),"
        " model_name = COALESCE(excluded.model_name, devices.model_name),"
        " model_version = COALESCE(excluded.model_version, devices.model_version),"
        " agent_version = excluded.agent_version, target = COALESCE(excluded.target, devices.target),"
        " deployment_json = COALESCE(excluded.deployment_json, devices.deployment_json)"
    )
