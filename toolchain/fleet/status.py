"""What ``fleet status`` reads: devices with their counters and drift state, the fleet in numbers,
quarantine, the collectors' and the broker's counters, the latest alerts.

All functions take an open ``Store`` or a database URL and return JSON-ready dicts; the time
parsing and ground-truth accuracy they share with the drift views are in ``toolchain.fleet.queries``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from toolchain.fleet.brokerdrops import SESSION_PREFIX
from toolchain.fleet.queries import accuracy_fields, label_totals, opened
from toolchain.fleet.storage import Store

OFFLINE_AFTER_S = 600.0  # a device silent this long shows as "stale" even if its last status said online

# Windows missing from each device's streams: the seqs between the lowest and the highest stored that
# are neither stored nor reported dropped by the device. They were lost between the device's outbox
# and the database (a broker that dropped them after acknowledging, or lost its queue) or are still on
# their way (a resend after a reconnect). A lower bound: drops the device reported before the lowest
# stored seq count against the gaps too.
MISSING_SQL = (
    "SELECT fleet, device_id, SUM(CASE WHEN max_seq - min_seq + 1 - stored - dropped > 0"
    " THEN max_seq - min_seq + 1 - stored - dropped ELSE 0 END) AS missing FROM device_streams"
    " WHERE max_seq IS NOT NULL GROUP BY fleet, device_id"
)


def status_rows(
    db: str | Store, now: float | None = None, notable_limit: int | None = None
) -> list[dict[str, Any]]:
    """Return one dict per device: state, last seen, model, windows received, dropped, drift state.

    Also what the collector did not store for the device: ``duplicates`` (windows that were already
    stored), ``missing_windows`` (see ``MISSING_SQL``) and ``stream_changes`` (times the device started over with a new stream: its state was
    lost), with the current ``stream`` and when it started. One row per device is read (the counters
    are kept at ingestion). With ``notable_limit`` only that many devices that need a look are
    returned, most urgent first (drift alert, warn, restarts, offline or stale, duplicates).
    """
    now = time.time() if now is None else now
    where, order, args = "", " ORDER BY d.fleet, d.device_id", []
    if notable_limit is not None:
        where = (
            " WHERE COALESCE(s.state, '') IN ('alert', 'warn') OR d.stream_changes > 0 OR d.state <> 'online'"
            " OR d.last_seen < ? OR d.duplicates > 0 OR COALESCE(m.missing, 0) > 0"
        )
        order = (
            " ORDER BY CASE s.state WHEN 'alert' THEN 0 WHEN 'warn' THEN 1 ELSE 2 END, d.stream_changes DESC,"
            " d.last_seen, d.fleet, d.device_id LIMIT ?"
        )
        args = [now - OFFLINE_AFTER_S, notable_limit]
    with opened(db) as store:
        labels = label_totals(store)
        rows = []
        for (
            fleet,
            device,
            state,
            last_seen,
            sha,
            name,
            version,
            agent,
            target,
            dep,
            dropped,
            n,
            preds,
            dups,
            stream,
            changes,
            stream_started,
            dstate,
            verdict,
            missing,
        ) in store.query(
            "SELECT d.fleet, d.device_id, d.state, d.last_seen, d.model_sha256, d.model_name,"
            " d.model_version, d.agent_version, d.target, d.deployment_json, d.dropped_windows, d.windows,"
            " d.predictions, d.duplicates, d.stream, d.stream_changes, d.stream_started,"
            " COALESCE(s.state, 'unknown'), COALESCE(s.verdict, 'unknown'), COALESCE(m.missing, 0)"
            " FROM devices d LEFT JOIN drift_state s ON s.fleet = d.fleet AND s.device_id = d.device_id"
            f" LEFT JOIN ({MISSING_SQL}) m ON m.fleet = d.fleet AND m.device_id = d.device_id"
            + where
            + order,
            args,
        ):
            deployment = json.loads(dep) if dep else None
            shown = state
            if state == "online" and now - float(last_seen) > OFFLINE_AFTER_S:
                shown = "stale"
            rows.append(
                {
                    "fleet": fleet,
                    "device_id": device,
                    "state": shown,
                    "last_seen": float(last_seen),
                    "model": {"sha256": sha, "name": name, "version": version} if sha else None,
                    "agent_version": agent,
                    "target": target,
                    "windows": int(n),
                    "predictions": int(preds),
                    "dropped_windows": int(dropped),
                    "duplicates": int(dups),
                    "missing_windows": int(missing),
                    "stream": stream,
                    "stream_changes": int(changes),
                    "stream_started": float(stream_started) if stream_started is not None else None,
                    "drift_state": dstate,
                    "last_verdict": verdict,
                    **accuracy_fields(labels.get((fleet, device, sha))),
                    "deployment": deployment,
                    "deployment_state": (deployment or {}).get("state")
                    if isinstance(deployment, dict)
                    else None,
                }
            )
        return rows


def status_summary(db: str | Store, now: float | None = None) -> dict[str, Any]:
    """Return the fleet in numbers: devices by state and drift state, windows, duplicates, restarts."""
    now = time.time() if now is None else now
    with opened(db) as store:
        (n, online, stale, windows, preds, dups, restarted) = store.query(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN state = 'online' AND last_seen >= ? THEN 1 ELSE 0 END), 0),"
            " COALESCE(SUM(CASE WHEN state = 'online' AND last_seen < ? THEN 1 ELSE 0 END), 0),"
            " COALESCE(SUM(windows), 0), COALESCE(SUM(predictions), 0), COALESCE(SUM(duplicates), 0),"
            " COALESCE(SUM(CASE WHEN stream_changes > 0 THEN 1 ELSE 0 END), 0) FROM devices",
            (now - OFFLINE_AFTER_S, now - OFFLINE_AFTER_S),
        )[0]
        missing = store.query(f"SELECT COALESCE(SUM(missing), 0) FROM ({MISSING_SQL}) m")[0][0]
        drift = {
            str(k): int(v) for k, v in store.query("SELECT state, COUNT(*) FROM drift_state GROUP BY state")
        }
    return {
        "devices": int(n),
        "online": int(online),
        "stale": int(stale),
        "offline": int(n) - int(online) - int(stale),
        "windows": int(windows),
        "predictions": int(preds),
        "duplicates": int(dups),
        "missing_windows": int(missing),
        "restarted": int(restarted),
        "drift": drift,
    }


def quarantine_summary(db: str | Store) -> dict[str, Any]:
    """Return the quarantined messages: rows kept, counted ever, evicted (oldest first), latest few."""
    with opened(db) as store:
        n = int(store.query("SELECT COUNT(*) FROM quarantine")[0][0])
        counters = collector_counters(store)
        latest = [
            {"received_at": float(t), "topic": tp, "reason": r, "payload_bytes": int(b)}
            for t, tp, r, b in store.query(
                "SELECT received_at, topic, reason, payload_bytes FROM quarantine ORDER BY id DESC LIMIT 10"
            )
        ]
        # Databases from before the counters: the rows kept are the count.
        total = max(counters.get("quarantined", 0), n)
        return {
            "count": n,
            "total": total,
            "evicted": counters.get("quarantine_evicted", 0),
            "latest": latest,
        }


def collector_counters(db: str | Store) -> dict[str, int]:
    """Return the collectors' lifetime counters (windows stored, duplicates, quarantined, ...)."""
    with opened(db) as store:
        return {str(k): int(v) for k, v in store.query("SELECT name, value FROM collector_counters")}


def broker_counters(db: str | Store) -> list[dict[str, Any]]:
    """Return the broker drop counters the collectors saw ($SYS): last value and the rises seen."""
    with opened(db) as store:
        return [
            {"broker": b, "counter": t, "value": int(v), "dropped_seen": int(r), "updated_at": float(u)}
            for b, t, v, r, u in store.query(
                "SELECT broker, topic, value, rises, updated_at FROM broker_counters"
                " WHERE topic NOT LIKE ? ORDER BY broker, topic",
                (SESSION_PREFIX + "%",),
            )
        ]


def broker_sessions(db: str | Store) -> list[dict[str, Any]]:
    """Return the collectors' persistent sessions per broker: connections, and how often the broker had lost one."""
    with opened(db) as store:
        return [
            {
                "broker": b,
                "client_id": t[len(SESSION_PREFIX) :],
                "connections": int(v),
                "lost": int(r),
                "updated_at": float(u),
            }
            for b, t, v, r, u in store.query(
                "SELECT broker, topic, value, rises, updated_at FROM broker_counters"
                " WHERE topic LIKE ? ORDER BY broker, topic",
                (SESSION_PREFIX + "%",),
            )
        ]


def recent_alerts(db: str | Store, limit: int = 50) -> list[dict[str, Any]]:
    """Return the latest alert transitions, newest first."""
    with opened(db) as store:
        return [
            {"ts": float(ts), "fleet": f, "device_id": d, "state": s, "previous": p, "message": m}
            for ts, f, d, s, p, m in store.query(
                "SELECT ts, fleet, device_id, state, previous, message FROM alerts ORDER BY id DESC LIMIT ?",
                (limit,),
            )
        ]
