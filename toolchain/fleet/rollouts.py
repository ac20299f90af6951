"""Rollouts in the fleet database: what a canary gate reads (windows per model) and the events it writes.

``measure`` merges one device's windows on one model, as the collector stored them, and turns them into
the gate's metric (``toolchain.shipping.gate.Measure``); ``record_gate`` stores the decision with its
numbers in ``rollout_events`` (migration 7), which ``fleet status`` and the report show.
Only raw windows are read (not hourly rollups): a canary gate looks at the last minutes or hours.
"""

from __future__ import annotations

import json
import time
from typing import Any

from toolchain.fleet.drift import compare
from toolchain.fleet.registry import load_baseline
from toolchain.fleet.storage import Store, merge_packed
from toolchain.shipping.gate import Measure


def current_model(store: Store, fleet: str, device: str) -> tuple[str, int | None] | None:
    """Return (model sha256, version) the device last reported, or None when the fleet does not know it."""
    rows = store.query(
        "SELECT model_sha256, model_version FROM devices WHERE fleet = ? AND device_id = ?", (fleet, device)
    )
    if not rows or not rows[0][0]:
        return None
    return str(rows[0][0]), None if rows[0][1] is None else int(rows[0][1])


def _where(labelled_only: bool) -> str:
    """Windows with predictions; with labels (accuracy), or else stored packed (a registered baseline)."""
    w = " WHERE fleet = ? AND device_id = ? AND model_sha256 = ? AND count > 0"
    return w + (" AND labelled > 0" if labelled_only else " AND ints IS NOT NULL")


def window_count(store: Store, fleet: str, device: str, sha: str, labelled_only: bool = False) -> int:
    """Windows with predictions (and with labels when ``labelled_only``) from a device on one model."""
    rows = store.query("SELECT COUNT(*) FROM windows" + _where(labelled_only), (fleet, device, sha))
    return int(rows[0][0])


def measure(
    store: Store,
    gate: str,
    fleet: str,
    device: str,
    sha: str,
    windows: int,
    newest: bool,
) -> Measure | None:
    """The gate metric over ``windows`` windows of a device on one model (None: no such windows).

    ``newest``: the latest windows (before an install); otherwise the first ones (after it). The
    accuracy gate reads only windows that carry labels. Raises ``LookupError`` when the model's
    baseline is not registered (drift and confidence compare with it).
    """
    order = " ORDER BY window_end DESC, id DESC" if newest else " ORDER BY window_end, id"
    rows = store.query(
        "SELECT ints, floats, violations_json, count, labelled, correct FROM windows"
        + _where(gate == "accuracy")
        + order
        + " LIMIT ?",
        (fleet, device, sha, windows),
    )
    if not rows:
        return None
    version = store.query("SELECT version FROM baselines WHERE model_sha256 = ?", (sha,))
    ver = int(version[0][0]) if version else None
    n = sum(int(r[3]) for r in rows)
    labelled = sum(int(r[4] or 0) for r in rows)
    correct = sum(int(r[5] or 0) for r in rows)
    if gate == "accuracy":
        return Measure(sha, ver, len(rows), n, correct / labelled if labelled else None, None, labelled)
    base = load_baseline(store, sha)
    if base is None:
        raise LookupError(
            f"model {sha[:12]} has no registered baseline; run 'edgefleet fleet register BUNDLE' for it"
        )
    prof = merge_packed(
        base.layout, [(bytes(r[0]), bytes(r[1])) for r in rows], [json.loads(r[2]) for r in rows]
    )
    result = compare(base.profile, prof, base.config)
    if gate == "drift":
        return Measure(sha, ver, len(rows), n, result.max_psi, result.state, labelled)
    return Measure(sha, ver, len(rows), n, result.confidence_mean, None, labelled)


def record_gate(
    store: Store,
    *,
    fleet: str,
    deployment_id: str,
    name: str,
    version: int,
    sha256: str,
    gate: str,
    outcome: str,
    action: str,
    windows: int,
    message: str,
    detail: dict[str, Any],
    ts: float | None = None,
) -> None:
    """Store one canary gate decision (``outcome``: passed|failed|timeout; ``action``: what followed)."""
    with store.transaction():
        store.execute(
            "INSERT INTO rollout_events (ts, fleet, deployment_id, model_name, model_version, model_sha256,"
            " gate, outcome, action, windows, message, detail_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                time.time() if ts is None else ts,
                fleet,
                deployment_id,
                name,
                version,
                sha256,
                gate,
                outcome,
                action,
                windows,
                message,
                json.dumps(detail, sort_keys=True, default=str),
            ),
        )


def gate_events(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    """The latest canary gate decisions, newest first (per device numbers in ``detail``)."""
    return [
        {
            "ts": float(ts),
            "fleet": f,
            "deployment_id": dep,
            "model": {"name": name, "version": int(ver), "sha256": sha},
            "gate": gate,
            "outcome": outcome,
            "action": action,
            "windows": int(k),
            "message": msg,
            "detail": json.loads(detail),
        }
        for ts, f, dep, name, ver, sha, gate, outcome, action, k, msg, detail in store.query(
            "SELECT ts, fleet, deployment_id, model_name, model_version, model_sha256, gate, outcome, action,"
            " windows, message, detail_json FROM rollout_events ORDER BY id DESC LIMIT ?",
            (limit,),
        )
    ]
