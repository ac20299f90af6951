"""Drift alerts: evaluate a device once enough new predictions arrived, with hysteresis.

An *evaluation* merges a device's windows stored since its previous evaluation (at least
``min_count`` predictions), compares them with the baseline (``toolchain.fleet.drift.compare``) and
feeds the verdict to the hysteresis (``drift.step``): ``raise_after`` evaluations in a row to raise,
``clear_after`` to clear. A change of state is stored in ``alerts``, logged, and published as JSON on
``edgefleet/<fleet>/alerts`` (QoS 1)::

    {"schema": 1, "type": "alert", "fleet": ..., "device_id": ..., "model": {sha256, name, version},
     "state": "alert", "previous": "ok", "ts": "...Z", "reasons": [...],
     "features": [{"name", "psi", "js"}, ...]}     # the five worst features
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from device_agent.telemetry import SCHEMA, fleet_topic, utc_iso
from toolchain.fleet.drift import AlertState, compare, step
from toolchain.fleet.registry import BaselineCache
from toolchain.fleet.storage import Store, dumps, merge_packed

log = logging.getLogger("edgefleet.fleet.alerts")


class AlertSink(Protocol):
    """Where alert payloads go (the collector's MQTT client, or a list in tests)."""

    def publish_alert(self, topic: str, payload: bytes) -> None: ...


class ListSink:
    """An in-memory sink for tests and in-process use."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []

    def publish_alert(self, topic: str, payload: bytes) -> None:
        self.published.append((topic, json.loads(payload)))


@dataclass
class Evaluation:
    """One evaluation of a device: its verdict, the state after hysteresis, and any alert raised."""

    fleet: str
    device_id: str
    verdict: str
    state: str
    changed: bool
    count: int
    alert: dict[str, Any] | None


class Evaluator:
    """Evaluate devices against their baselines and raise/clear alerts with hysteresis."""

    def __init__(
        self,
        store: Store,
        baselines: BaselineCache,
        sink: AlertSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.baselines = baselines
        self.sink = sink
        self.clock = clock

    def pending_count(self, fleet: str, device_id: str) -> int:
        """Predictions stored for a device since its last evaluation (current model only)."""
        st = self.store.query(
            "SELECT model_sha256, last_window_id FROM drift_state WHERE fleet = ? AND device_id = ?",
            (fleet, device_id),
        )
        model = self._model(fleet, device_id)
        if model is None:
            return 0
        last = int(st[0][1]) if st and st[0][0] == model else 0
        rows = self.store.query(
            "SELECT COALESCE(SUM(count), 0) FROM windows WHERE fleet = ? AND device_id = ?"
            " AND model_sha256 = ? AND id > ? AND ints IS NOT NULL",
            (fleet, device_id, model, last),
        )
        return int(rows[0][0])

    def _model(self, fleet: str, device_id: str) -> str | None:
        rows = self.store.query(
            "SELECT model_sha256 FROM windows WHERE fleet = ? AND device_id = ? AND ints IS NOT NULL"
            " ORDER BY id DESC LIMIT 1",
            (fleet, device_id),
        )
        return rows[0][0] if rows else None

    def evaluate(self, fleet: str, device_id: str) -> Evaluation | None:
        """Evaluate a device if at least ``min_count`` new predictions are stored; else return None."""
        model = self._model(fleet, device_id)
        if model is None:
            return None
        base = self.baselines.get(model)
        if base is None:
            return None
        cfg = base.config
        with self.store.transaction():
            if self.store.dialect == "postgresql":
                # Two collectors of one shared group may evaluate the same device: serialise them.
                self.store.execute(
                    "SELECT pg_advisory_xact_lock(?)",
                    (zlib.crc32(f"{fleet}/{device_id}".encode()) & 0x7FFFFFFF,),
                )
            st = self.store.query(
                "SELECT model_sha256, state, candidate, streak, last_window_id FROM drift_state"
                " WHERE fleet = ? AND device_id = ?",
                (fleet, device_id),
            )
            if st and st[0][0] == model:
                prev = AlertState(st[0][1], st[0][2], int(st[0][3]))
                last_id = int(st[0][4])
            else:
                prev, last_id = AlertState(), 0
            rows = self.store.query(
                "SELECT id, count, ints, floats, violations_json, window_start, window_end FROM windows"
                " WHERE fleet = ? AND device_id = ? AND model_sha256 = ? AND id > ? AND ints IS NOT NULL ORDER BY id",
                (fleet, device_id, model, last_id),
            )
            total = sum(int(r[1]) for r in rows)
            if total < cfg.min_count:
                return None
            current = merge_packed(
                base.layout, [(bytes(r[2]), bytes(r[3])) for r in rows], [json.loads(r[4]) for r in rows]
            )
            result = compare(base.profile, current, cfg)
            new, changed = step(prev, result.state, cfg.raise_after, cfg.clear_after)
            now = self.clock()
            new_last = max(int(r[0]) for r in rows)
            self.store.execute(
                "INSERT INTO drift_state (fleet, device_id, model_sha256, state, candidate, streak, last_window_id,"
                " verdict, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, device_id) DO UPDATE SET"
                " model_sha256 = excluded.model_sha256, state = excluded.state, candidate = excluded.candidate,"
                " streak = excluded.streak, last_window_id = excluded.last_window_id, verdict = excluded.verdict,"
                " updated_at = excluded.updated_at",
                (fleet, device_id, model, new.state, new.candidate, new.streak, new_last, result.state, now),
            )
            self.store.execute(
                "INSERT INTO evaluations (ts, fleet, device_id, model_sha256, window_from, window_to, count, verdict,"
                " state, max_psi, detail_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    now,
                    fleet,
                    device_id,
                    model,
                    min(float(r[5]) for r in rows),
                    max(float(r[6]) for r in rows),
                    total,
                    result.state,
                    new.state,
                    float(result.max_psi),
                    dumps(result.to_dict(features=False)),
                ),
            )
            alert = None
            if changed:
                alert = {
                    "schema": SCHEMA,
                    "type": "alert",
                    "fleet": fleet,
                    "device_id": device_id,
                    "model": {"sha256": model, "name": base.name, "version": base.version},
                    "state": new.state,
                    "previous": prev.state,
                    "ts": utc_iso(now),
                    "reasons": result.reasons,
                    "features": [
                        {"name": f.name, "psi": round(f.psi, 4), "js": round(f.js, 4)}
                        for f in result.worst_features(5)
                    ],
                }
                message = f"device {device_id} ({fleet}) drift state {prev.state} -> {new.state}: " + (
                    "; ".join(result.reasons) or "back within thresholds"
                )
                self.store.execute(
                    "INSERT INTO alerts (ts, fleet, device_id, model_sha256, state, previous, message, detail_json)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (now, fleet, device_id, model, new.state, prev.state, message, dumps(alert)),
                )
        if alert is not None:
            log.warning("%s", message)
            if self.sink is not None:
                try:
                    self.sink.publish_alert(fleet_topic(fleet, "alerts"), json.dumps(alert).encode())
                except Exception as e:  # noqa: BLE001 - the alert is stored; a publish failure must not stop ingestion
                    log.error("could not publish alert for %s: %s", device_id, e)
        return Evaluation(fleet, device_id, result.state, new.state, changed, total, alert)
