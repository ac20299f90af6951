"""Drift alerts: evaluate a device once enough new predictions arrived, with hysteresis.

An *evaluation* merges a device's windows stored since its previous evaluation (at least
``min_count`` predictions), compares them with the baseline (``toolchain.fleet.drift.compare``) and
feeds the verdict to the hysteresis (``drift.step``): ``raise_after`` evaluations in a row to raise,
``clear_after`` to clear. A change of state is stored in ``alerts``, logged, and published as JSON on
``edgefleet/<fleet>/alerts`` (QoS 1)::

    {"schema": 1, "type": "alert", "fleet": ..., "device_id": ..., "model": {sha256, name, version},
     "state": "alert", "previous": "ok", "ts": "...Z", "reasons": [...],
     "features": [{"name", "psi", "js"}, ...]}     # the five worst features

When the device enters or leaves ``alert`` (also when its state starts over for a new model), a
retained per-device command follows on ``edgefleet/<fleet>/<device_id>/cmd/alert``
(``toolchain.fleet.alertcmds``): the device captures at ``on_alert_rate`` while it is in alert.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from device_agent.formats.telemetry import SCHEMA, fleet_topic, utc_iso
from toolchain.fleet.alertcmds import CommandTally, command_for
from toolchain.fleet.drift import AlertState, compare_many, step
from toolchain.fleet.registry import BaselineCache
from toolchain.fleet.storage import Store, dumps, merge_packed_groups

log = logging.getLogger("edgefleet.fleet.alerts")


EVAL_LOCK = 4_711_043  # PostgreSQL advisory lock held while evaluating
IN_CHUNK = 400  # devices per IN (...) list


def _chunks(keys: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Group sorted (fleet, device) keys by fleet, in chunks of at most IN_CHUNK devices."""
    out: list[tuple[str, list[str]]] = []
    for fleet, device in keys:
        if not out or out[-1][0] != fleet or len(out[-1][1]) >= IN_CHUNK:
            out.append((fleet, []))
        out[-1][1].append(device)
    return out


def _finite(v: float) -> float | None:
    """A JSON-ready metric: rounded to 6 digits, None when not finite."""
    return round(float(v), 6) if math.isfinite(v) else None


class AlertSink(Protocol):
    """Where alert payloads go (the collector's MQTT client, or a list in tests)."""

    def publish_alert(self, topic: str, payload: bytes) -> None: ...


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
        self.commands = CommandTally()  # alert commands this evaluator could not hand to a sink

    def evaluate(self, fleet: str, device_id: str) -> Evaluation | None:
        """Evaluate a device if at least ``min_count`` new predictions are stored; else return None."""
        return self.evaluate_many([(fleet, device_id)]).get((fleet, device_id))

    def evaluate_many(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Evaluation]:
        """Evaluate many devices in one transaction (metrics vectorised per model); return those evaluated.

        A device is evaluated when the windows stored since its previous evaluation (of the model of
        its newest window) hold at least the model's ``min_count`` predictions.
        """
        keys = sorted(set(keys))
        if not keys:
            return {}
        store = self.store
        now = self.clock()
        todo: dict[str, list[tuple[tuple[str, str], AlertState, list[tuple[Any, ...]]]]] = {}
        out: dict[tuple[str, str], Evaluation] = {}
        alerts: list[dict[str, Any]] = []
        commands: list[tuple[str, bytes]] = []
        with store.transaction():
            if store.dialect == "postgresql":
                # The collectors of a shared group may evaluate the same devices: one at a time.
                store.execute("SELECT pg_advisory_xact_lock(?)", (EVAL_LOCK,))
            states: dict[tuple[str, str], tuple[Any, ...]] = {}
            found: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
            for fleet, devices in _chunks(keys):
                marks = ", ".join("?" for _ in devices)
                for row in store.query(
                    "SELECT device_id, model_sha256, state, candidate, streak, last_window_id"
                    f" FROM drift_state WHERE fleet = ? AND device_id IN ({marks})",
                    (fleet, *devices),
                ):
                    states[(fleet, row[0])] = tuple(row[1:])
                last = {d: int(states[(fleet, d)][4]) if (fleet, d) in states else 0 for d in devices}
                for row in store.query(
                    "SELECT id, count, ints, floats, violations_json, window_start, window_end, model_sha256,"
                    f" device_id FROM windows WHERE fleet = ? AND device_id IN ({marks}) AND id > ?"
                    " AND ints IS NOT NULL ORDER BY id",
                    (fleet, *devices, min(last.values())),
                ):
                    if int(row[0]) > last[row[8]]:
                        found.setdefault((fleet, row[8]), []).append(tuple(row[:8]))
            for key in keys:
                rows = found.get(key)
                if not rows:
                    continue
                st = states.get(key)
                model = rows[-1][7]
                prev = AlertState(st[1], st[2], int(st[3])) if st and st[0] == model else AlertState()
                rows = [r for r in rows if r[7] == model]
                base = self.baselines.get(model)
                if base is None or sum(int(r[1]) for r in rows) < base.config.min_count:
                    continue
                todo.setdefault(model, []).append((key, prev, rows))
            state_rows, eval_rows, alert_rows = [], [], []
            for model, items in todo.items():
                base = self.baselines.get(model)
                assert base is not None
                cfg = base.config
                blobs, groups, viol = [], [], []
                for gi, (_, _, rows) in enumerate(items):
                    for r in rows:
                        blobs.append((bytes(r[2]), bytes(r[3])))
                        groups.append(gi)
                        viol.append(json.loads(r[4]))
                profs = merge_packed_groups(base.layout, blobs, groups, len(items), viol)
                results = compare_many(base.profile, profs, cfg)
                for ((fleet, device), prev, rows), result in zip(items, results, strict=True):
                    new, changed = step(prev, result.state, cfg.raise_after, cfg.clear_after)
                    total = sum(int(r[1]) for r in rows)
                    detail = result.to_dict(features=False)
                    detail["worst_features"] = [
                        {"name": f.name, "psi": _finite(f.psi), "js": _finite(f.js)}
                        for f in result.worst_features(5)
                    ]
                    detail_json = dumps(detail)
                    w_from = min(float(r[5]) for r in rows)
                    w_to = max(float(r[6]) for r in rows)
                    state_rows.append(
                        (
                            fleet,
                            device,
                            model,
                            new.state,
                            new.candidate,
                            new.streak,
                            max(int(r[0]) for r in rows),
                            result.state,
                            now,
                            float(result.max_psi),
                            total,
                            w_from,
                            w_to,
                            detail_json,
                        )
                    )
                    eval_rows.append(
                        (
                            now,
                            fleet,
                            device,
                            model,
                            w_from,
                            w_to,
                            total,
                            result.state,
                            new.state,
                            float(result.max_psi),
                            detail_json,
                        )
                    )
                    alert = None
                    if changed:
                        alert = {
                            "schema": SCHEMA,
                            "type": "alert",
                            "fleet": fleet,
                            "device_id": device,
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
                        message = f"device {device} ({fleet}) drift state {prev.state} -> {new.state}: " + (
                            "; ".join(result.reasons) or "back within thresholds"
                        )
                        alert_rows.append(
                            (now, fleet, device, model, new.state, prev.state, message, dumps(alert))
                        )
                        alerts.append({**alert, "_message": message})
                    st = states.get((fleet, device))
                    cmd = command_for(
                        fleet=fleet,
                        device_id=device,
                        stored_state=str(st[1]) if st else None,
                        new_state=new.state,
                        ts=now,
                        model_changed=st is not None and st[0] != model,
                        reasons=result.reasons,
                        score=_finite(result.max_psi),
                        model_sha256=model,
                        model_label=f"{base.name} v{base.version}",
                    )
                    if cmd is not None:
                        commands.append(cmd)
                    out[(fleet, device)] = Evaluation(
                        fleet, device, result.state, new.state, changed, total, alert
                    )
            store.executemany(
                "INSERT INTO drift_state (fleet, device_id, model_sha256, state, candidate, streak,"
                " last_window_id, verdict, updated_at, max_psi, count, window_from, window_to, detail_json)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, device_id) DO"
                " UPDATE SET max_psi = excluded.max_psi, count = excluded.count,"
                " window_from = excluded.window_from, window_to = excluded.window_to,"
                " detail_json = excluded.detail_json,"
                " model_sha256 = excluded.model_sha256, state = excluded.state, candidate ="
                " excluded.candidate,"
                " streak = excluded.streak, last_window_id = excluded.last_window_id, verdict ="
                " excluded.verdict,"
                " updated_at = excluded.updated_at",
                state_rows,
            )
            store.executemany(
                "INSERT INTO evaluations (ts, fleet, device_id, model_sha256, window_from, window_to,"
                " count, verdict,"
                " state, max_psi, detail_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                eval_rows,
            )
            store.executemany(
                "INSERT INTO alerts (ts, fleet, device_id, model_sha256, state, previous, message,"
                " detail_json)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                alert_rows,
            )
        for a in alerts:
            message = a.pop("_message")
            log.warning("%s", message)
            if self.sink is not None:
                try:
                    self.sink.publish_alert(fleet_topic(a["fleet"], "alerts"), json.dumps(a).encode())
                except Exception as e:  # noqa: BLE001 - the alert is stored; a publish failure must not stop ingestion
                    log.error("could not publish alert for %s: %s", a["device_id"], e)
        for topic, payload in commands:
            if self.sink is None:
                self.commands.note_unsent(
                    topic, "no MQTT connection to publish on (database-only evaluation)"
                )
                continue
            try:
                self.sink.publish_alert(topic, payload)
            except Exception as e:  # noqa: BLE001 - the state is stored; publishing must not stop ingestion
                self.commands.note_unsent(topic, f"{type(e).__name__}: {e}")
        return out
