"""Read side of the fleet database: time parsing, ground-truth accuracy, the drift table, drift over time.

All functions take an open ``Store`` or a database URL and return JSON-ready dicts. The drift table
and drift over time share the time parsing and the window selection (raw windows and hourly rollups
alike). What ``fleet status`` reads (devices, counters, quarantine, sessions, alerts) is in
``toolchain.fleet.status``.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent.formats.stats import Profile
from toolchain.errors import ToolchainError
from toolchain.fleet.drift import SEVERITY, DriftResult, compare, compare_many
from toolchain.fleet.registry import Baseline, load_baseline
from toolchain.fleet.storage import Store, merge_packed, merge_packed_groups, open_store

_loads: Callable[[str], Any] = json.loads
try:  # stored evaluations are parsed 100,000 at a time by `fleet drift`: orjson is about 4x faster
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover - the host extra installs orjson
    pass

DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class QueryError(ToolchainError):
    """A query argument is invalid (time, device, feature)."""


@contextmanager
def opened(db: str | Store) -> Iterator[Store]:
    if isinstance(db, Store):
        yield db
        return
    store = open_store(db)
    try:
        yield store
    finally:
        store.close()


def parse_time(value: str | float | None, now: float | None = None) -> float | None:
    """Parse ``--since``/``--until``: a duration back (``30m``, ``2h``, ``7d``), ISO-8601, or ``all``."""
    if value is None or value == "" or value == "all":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    now = time.time() if now is None else now
    m = DURATION_RE.match(value.strip())
    if m:
        return now - float(m.group(1)) * UNITS_S[m.group(2)]
    from datetime import datetime, timezone

    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(
            f"time {value!r} is not understood; use a duration such as 30m, 2h, 7d, an ISO time such as"
            " 2026-11-27T10:00:00Z, or 'all'"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def parse_age(value: str) -> float:
    """Parse an age such as ``90m``, ``36h`` or ``7d`` to seconds."""
    m = DURATION_RE.match(value.strip())
    if not m:
        raise QueryError(f"age {value!r} is not understood; use a number and a unit: 30m, 36h, 7d, 2w")
    return float(m.group(1)) * UNITS_S[m.group(2)]


# --------------------------------------------------------------------------------------------------
# Status


def label_totals(
    store: Store,
    since: float | None = None,
    until: float | None = None,
    fleet: str | None = None,
    device: str | None = None,
) -> dict[tuple[str, str, str], tuple[int, int]]:
    """Ground truth per (fleet, device, model): (labelled, correct) summed over windows and rollups.

    Only windows that carried labels (stats schema 3) are read; with ``since``/``until`` those that
    end at or after ``since`` and start at or before ``until``, as the drift queries choose windows.
    """
    where = " WHERE labelled IS NOT NULL"
    args: list[Any] = []
    for cond, value in (
        (" AND window_end >= ?", since),
        (" AND window_start <= ?", until),
        (" AND fleet = ?", fleet),
        (" AND device_id = ?", device),
    ):
        if value is not None:
            where += cond
            args.append(value)
    part = "SELECT fleet, device_id, model_sha256, SUM(labelled), SUM(correct) FROM {t}" + where
    part += " GROUP BY fleet, device_id, model_sha256"
    out: dict[tuple[str, str, str], tuple[int, int]] = {}
    for f, d, sha, n, c in store.query(
        part.format(t="windows") + " UNION ALL " + part.format(t="window_rollups"), args + args
    ):
        key = (str(f), str(d), str(sha))
        old = out.get(key, (0, 0))
        out[key] = (old[0] + int(n), old[1] + int(c))
    return out


def accuracy_fields(totals: tuple[int, int] | None) -> dict[str, Any]:
    """``labelled``, ``correct`` and ``accuracy`` (correct / labelled; None without labels)."""
    n, c = totals or (0, 0)
    return {"labelled": n, "correct": c, "accuracy": c / n if n else None}


def attach_accuracy(
    store: Store,
    rows: list[dict[str, Any]],
    since: float | None = None,
    until: float | None = None,
) -> list[dict[str, Any]]:
    """Add ground-truth accuracy to drift rows: per device and model, fleet rows over all devices."""
    totals = label_totals(store, since, until)
    fleet_totals: dict[tuple[str, str], tuple[int, int]] = {}
    for (f, _d, sha), (n, c) in totals.items():
        old = fleet_totals.get((f, sha), (0, 0))
        fleet_totals[(f, sha)] = (old[0] + n, old[1] + c)
    for r in rows:
        sha = (r.get("model") or {}).get("sha256", "")
        got = (
            fleet_totals.get((r["fleet"], sha))
            if r["device_id"] == "*"
            else totals.get((r["fleet"], r["device_id"], sha))
        )
        r.update(accuracy_fields(got))
    return rows


# --------------------------------------------------------------------------------------------------
# Drift


@dataclass
class Group:
    """Windows of one (fleet, device, model) or of one model fleet-wide, merged."""

    fleet: str
    device_id: str
    model_sha256: str
    windows: int
    first: float
    last: float
    profile: Profile


def _windows(
    store: Store,
    since: float | None,
    until: float | None,
    device: str | None = None,
    fleet: str | None = None,
) -> list[tuple[Any, ...]]:
    """Packed windows and hourly rollups (``fleet compact``) in the range, as one list of rows.

    Row: fleet, device_id, model_sha256, window_start, window_end, ints, floats, violations_json,
    windows (1 for a raw window, the number folded for a rollup).
    """
    where, args = _window_filter(since, until, device, fleet)
    cols = "fleet, device_id, model_sha256, window_start, window_end, ints, floats, violations_json"
    return store.query(
        f"SELECT {cols}, 1 FROM windows{where} UNION ALL SELECT {cols}, windows FROM window_rollups{where}",
        args + args,
    )


def _window_filter(
    since: float | None, until: float | None, device: str | None = None, fleet: str | None = None
) -> tuple[str, list[Any]]:
    """Return the WHERE clause (packed windows overlapping [since, until]) and its arguments."""
    where = " WHERE ints IS NOT NULL"
    args: list[Any] = []
    for value, clause in (
        (since, "window_end >= ?"),
        (until, "window_start <= ?"),
        (device, "device_id = ?"),
        (fleet, "fleet = ?"),
    ):
        if value is not None:
            where += f" AND {clause}"
            args.append(value)
    return where, args


def _counts(store: Store, since: float | None, until: float | None) -> list[int]:
    where, args = _window_filter(since, until)
    return [
        int(r[0])
        for r in store.query(
            f"SELECT count FROM windows{where} UNION ALL SELECT count FROM window_rollups{where}", args + args
        )
    ]


def _baselines(store: Store, shas: set[str]) -> dict[str, Baseline]:
    out = {}
    for sha in shas:
        b = load_baseline(store, sha)
        if b is not None:
            out[sha] = b
    return out


def merge_groups(
    store: Store,
    since: float | None = None,
    until: float | None = None,
    device: str | None = None,
    fleet: str | None = None,
) -> tuple[list[Group], list[Group], dict[str, Baseline]]:
    """Merge stored windows per device and fleet-wide per model; return (devices, fleets, baselines)."""
    rows = _windows(store, since, until, device, fleet)
    bases = _baselines(store, {r[2] for r in rows})
    devices: list[Group] = []
    fleets: list[Group] = []
    by_model: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for r in rows:
        if r[2] in bases:
            by_model[r[2]].append(r)
    for sha, rs in sorted(by_model.items()):
        layout = bases[sha].layout
        blobs = [(bytes(r[5]), bytes(r[6])) for r in rs]
        viol = [json.loads(r[7]) for r in rs]
        for keyf, out in ((lambda r: (r[0], r[1]), devices), (lambda r: (r[0], "*"), fleets)):
            keys = sorted({keyf(r) for r in rs})
            index = {k: i for i, k in enumerate(keys)}
            gids = [index[keyf(r)] for r in rs]
            profs = merge_packed_groups(layout, blobs, gids, len(keys), viol)
            first = [float("inf")] * len(keys)
            last = [float("-inf")] * len(keys)
            nwin = [0] * len(keys)
            for r, gi in zip(rs, gids, strict=True):
                first[gi] = min(first[gi], float(r[3]))
                last[gi] = max(last[gi], float(r[4]))
                nwin[gi] += int(r[8])
            out.extend(
                Group(k[0], k[1], sha, nwin[i], first[i], last[i], profs[i]) for i, k in enumerate(keys)
            )
    return devices, fleets, bases


def compare_groups(groups: list[Group], bases: dict[str, Baseline]) -> list[DriftResult]:
    """Compare every group with its model's baseline (vectorised per model); results in group order."""
    out: list[DriftResult | None] = [None] * len(groups)
    by_model: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_model[g.model_sha256].append(i)
    for sha, idx in by_model.items():
        b = bases[sha]
        for i, r in zip(
            idx, compare_many(b.profile, [groups[i].profile for i in idx], b.config), strict=True
        ):
            out[i] = r
    return [r for r in out if r is not None]


def _row(g: Group, base: Baseline, result: DriftResult, feature: str | None) -> dict[str, Any]:
    d = result.to_dict(features=True)
    feats = d.pop("features")
    if feature is not None:
        feats = [f for f in feats if f["name"] == feature]
    feats.sort(key=lambda f: -(f["psi"] or 0))
    worst_feat = feats[0] if feats else None
    return {
        "scope": "fleet" if g.device_id == "*" else "device",
        "fleet": g.fleet,
        "device_id": g.device_id,
        "model": {"sha256": g.model_sha256, "name": base.name, "version": base.version},
        "windows": g.windows,
        "first": g.first,
        "last": g.last,
        **d,
        "worst_feature": worst_feat["name"] if worst_feat else None,
        "features": feats,
    }


def drift_table(
    db: str | Store,
    device: str | None = None,
    feature: str | None = None,
    since: str | float | None = None,
    until: str | float | None = None,
    fleet: str | None = None,
    include_fleet: bool = True,
) -> list[dict[str, Any]]:
    """Return drift rows per device (and fleet-wide per model), worst first.

    Each row carries the verdict, the device-level metrics (class PSI, confidence shift, skew rates,
    share of features in alert) and ``features``: every feature's PSI, JS, KS and mean shift,
    highest PSI first (only ``feature`` when given).
    """
    t0, t1 = parse_time(since), parse_time(until)
    with opened(db) as store:
        devices, fleets, bases = merge_groups(store, t0, t1, device, fleet)
        if (
            feature is not None
            and bases
            and not any(feature in b.profile.inputs.names for b in bases.values())
        ):
            names = next(iter(bases.values())).profile.inputs.names
            raise QueryError(
                f"unknown feature {feature!r}. Known: {', '.join(names[:8])}"
                + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            )
        if device is not None and not devices:
            known = [
                r[0] for r in store.query("SELECT DISTINCT device_id FROM windows ORDER BY device_id LIMIT 8")
            ]
            if device not in known and not store.query(
                "SELECT 1 FROM devices WHERE device_id = ?", (device,)
            ):
                raise QueryError(
                    f"no device {device!r} in this database. Some known: {', '.join(known) or 'none'}"
                )
        groups = devices + (fleets if include_fleet and device is None else [])
        rows = [
            _row(g, bases[g.model_sha256], r, feature)
            for g, r in zip(groups, compare_groups(groups, bases), strict=True)
        ]
        attach_accuracy(store, rows, t0, t1)
    rows.sort(key=lambda r: (-SEVERITY[r["state"]], -(r["max_psi"] or 0.0), r["device_id"]))
    return rows


def has_evaluations(db: str | Store) -> bool:
    """True when the collectors stored evaluations with their metrics (``drift_state.detail_json``)."""
    with opened(db) as store:
        return bool(store.query("SELECT 1 FROM drift_state WHERE detail_json IS NOT NULL LIMIT 1"))


_SEVERITY_SQL = "CASE verdict WHEN 'alert' THEN 2 WHEN 'warn' THEN 1 WHEN 'ok' THEN 0 ELSE -1 END"


def drift_from_evaluations(
    db: str | Store,
    since: str | float | None = None,
    fleet: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Return the drift table from the evaluations the collectors stored, worst first (no recompute).

    One row per device: its latest evaluation (the windows since its previous one, at least
    ``min_count`` predictions) whose windows end after ``since``, with ``alert_state``, the
    hysteresis state alerts follow; only the ``limit`` worst when given (the database sorts them).
    One summary row per model and fleet (``scope`` "fleet", ``device_id`` "*"): devices evaluated
    and in each state, total predictions, the highest device PSI and its device, counted by the
    database over every device. The exact fleet-wide merge of every window is ``drift_table``
    (``fleet drift --recompute``).
    """
    t0 = parse_time(since)
    where = " WHERE detail_json IS NOT NULL"
    args: list[Any] = []
    if t0 is not None:
        where += " AND window_to >= ?"
        args.append(t0)
    if fleet is not None:
        where += " AND fleet = ?"
        args.append(fleet)
    with opened(db) as store:
        sql = (
            "SELECT fleet, device_id, model_sha256, state, verdict, max_psi, count, window_from, window_to,"
            f" detail_json FROM drift_state{where} ORDER BY {_SEVERITY_SQL} DESC,"
            " COALESCE(max_psi, 0) DESC, device_id"
        )
        found = store.query(
            sql + (" LIMIT ?" if limit is not None else ""), [*args, limit] if limit else args
        )
        groups = store.query(
            "SELECT fleet, model_sha256, verdict, COUNT(*), SUM(count), MAX(max_psi), MIN(window_from),"
            f" MAX(window_to) FROM drift_state{where} GROUP BY fleet, model_sha256, verdict",
            args,
        )
        names = {
            str(sha): (str(n), int(v))
            for sha, n, v in store.query("SELECT model_sha256, name, version FROM baselines")
        }
        fleets: dict[tuple[str, str], dict[str, Any]] = {}
        for f, sha, verdict, n, count, max_psi, w_from, w_to in groups:
            name, version = names.get(sha, ("?", 0))
            agg = fleets.setdefault(
                (f, sha),
                {
                    "scope": "fleet",
                    "fleet": f,
                    "device_id": "*",
                    "model": {"sha256": sha, "name": name, "version": version},
                    "devices": 0,
                    "devices_by_state": {"ok": 0, "warn": 0, "alert": 0, "insufficient": 0},
                    "count": 0,
                    "state": "insufficient",
                    "max_psi": None,
                    "first": float(w_from),
                    "last": float(w_to),
                    "worst_device": None,
                },
            )
            agg["devices"] += int(n)
            agg["devices_by_state"][verdict] = agg["devices_by_state"].get(verdict, 0) + int(n)
            agg["count"] += int(count or 0)
            agg["first"] = min(agg["first"], float(w_from))
            agg["last"] = max(agg["last"], float(w_to))
            if SEVERITY.get(verdict, -1) > SEVERITY.get(agg["state"], -1):
                agg["state"] = verdict
            if (
                max_psi is not None
                and np.isfinite(max_psi)
                and (agg["max_psi"] is None or max_psi > agg["max_psi"])
            ):
                agg["max_psi"] = float(max_psi)
        for (f, sha), agg in fleets.items():
            if agg["max_psi"] is not None:
                top = store.query(
                    "SELECT device_id FROM drift_state WHERE fleet = ? AND model_sha256 = ? AND max_psi >= ?"
                    " ORDER BY max_psi DESC, device_id LIMIT 1",
                    (f, sha, agg["max_psi"]),
                )
                agg["worst_device"] = str(top[0][0]) if top else None
    rows: list[dict[str, Any]] = []
    for f, d, sha, alert_state, verdict, max_psi, count, w_from, w_to, detail in found:
        det = _loads(detail)
        worst = det.pop("worst_features", [])
        name, version = names.get(sha, ("?", 0))
        rows.append(
            {
                "scope": "device",
                "fleet": f,
                "device_id": d,
                "model": {"sha256": sha, "name": name, "version": version},
                "windows": None,
                "first": float(w_from),
                "last": float(w_to),
                **det,
                "state": verdict,
                "alert_state": alert_state,
                "max_psi": None if max_psi is None or not np.isfinite(max_psi) else float(max_psi),
                "count": int(count),
                "worst_feature": worst[0]["name"] if worst else None,
                "features": worst,
            }
        )
    with opened(db) as store:
        out = attach_accuracy(store, rows + list(fleets.values()), t0)
    out.sort(key=lambda r: (-SEVERITY.get(r["state"], 0), -(r["max_psi"] or 0.0), r["device_id"]))
    return out


def drift_series(
    db: str | Store,
    since: str | float | None = None,
    until: str | float | None = None,
    buckets: int = 12,
    top_features: int = 5,
) -> dict[str, Any]:
    """Return drift over time: per device max PSI, and PSI of the fleet's worst features, per time bucket.

    Windows are merged per bucket of equal length between the first and the last window; a bucket
    with fewer predictions than the model's ``min_count`` has no value (``None``).
    """
    t0, t1 = parse_time(since), parse_time(until)
    with opened(db) as store:
        rows = _windows(store, t0, t1)
        if not rows:
            return {"edges": [], "devices": {}, "features": {}}
        bases = _baselines(store, {r[2] for r in rows})
        rows = [r for r in rows if r[2] in bases]
        if not rows:
            return {"edges": [], "devices": {}, "features": {}}
        # As many buckets as the data allows: on average a device's bucket holds twice min_count.
        min_count = min(b.config.min_count for b in bases.values())
        n_dev = len({(r[0], r[1]) for r in rows})
        per_dev = sum(int(merge_count) for merge_count in _counts(store, t0, t1)) / max(n_dev, 1)
        buckets = int(min(buckets, max(2, per_dev // (2 * min_count))))
        lo = min(float(r[4]) for r in rows)
        hi = max(float(r[4]) for r in rows)
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, buckets + 1)
        idx = {
            id(r): min(int(np.searchsorted(edges, float(r[4]), side="right")) - 1, buckets - 1) for r in rows
        }
        by_dev: dict[tuple[str, str, str], list[list[tuple[Any, ...]]]] = defaultdict(
            lambda: [[] for _ in range(buckets)]
        )
        by_model: dict[str, list[list[tuple[Any, ...]]]] = defaultdict(lambda: [[] for _ in range(buckets)])
        for r in rows:
            by_dev[(r[0], r[1], r[2])][idx[id(r)]].append(r)
            by_model[r[2]][idx[id(r)]].append(r)

        def compare_bucket(sha: str, rs: list[tuple[Any, ...]]) -> DriftResult | None:
            if not rs:
                return None
            b = bases[sha]
            prof = merge_packed(
                b.layout, [(bytes(r[5]), bytes(r[6])) for r in rs], [json.loads(r[7]) for r in rs]
            )
            if prof.count < b.config.min_count:
                return None
            return compare(b.profile, prof, b.config)

        devices: dict[str, list[float | None]] = {}
        for (fleet, dev, sha), bk in sorted(by_dev.items()):
            res = [compare_bucket(sha, rs) for rs in bk]
            devices[f"{fleet}/{dev}"] = [r.max_psi if r else None for r in res]
        features: dict[str, list[float | None]] = {}
        for sha, bk in by_model.items():
            res = [compare_bucket(sha, rs) for rs in bk]
            last = next((r for r in reversed(res) if r is not None), None)
            if last is None:
                continue
            for f in last.worst_features(top_features):
                j = [x.name for x in last.features].index(f.name)
                label = f.name if len(by_model) == 1 else f"{bases[sha].name}:{f.name}"
                features[label] = [r.features[j].psi if r else None for r in res]
        return {"edges": [float(e) for e in edges], "devices": devices, "features": features}
