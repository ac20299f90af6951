"""Compaction: fold raw windows older than a cutoff into hourly per-device rollups.

A window of 60 s costs about 10 KB in the database; a day of one device is 1,440 of them. Compaction
merges a device's windows of one model and one UTC hour (by ``window_start``) into one rollup row in
the same packed layout, then deletes the raw rows, in one transaction per chunk of devices. Counts
and histograms add exactly; mean and M2 use the k-way form of Chan et al.'s parallel update
(``storage.merge_packed_groups``, the packed twin of ``device_agent.formats.stats.Profile.merge``; a test
checks the two agree). Running it again for the same hour merges the new windows into the existing
rollup. Readers (``fleet status``, ``drift``, ``report``) see raw windows and rollups together.

Not compacted: windows waiting for their model's baseline (``pending_json``: they cannot be merged
until it is registered) and windows newer than the cutoff. The cutoff should leave the drift
evaluation time to read them (it reads only raw windows): an age of a day or more is the usual choice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolchain.fleet.registry import BaselineCache
from toolchain.fleet.storage import Store, dumps, merge_packed_groups, pack_profile

HOUR_S = 3600.0
DEVICE_CHUNK = 200  # devices per transaction


@dataclass
class CompactResult:
    """What one compaction did."""

    windows: int = 0  # raw windows folded and deleted (heartbeats included)
    rollups: int = 0  # rollup rows written (new or merged into)
    devices: int = 0
    bytes_before: int = 0  # packed bytes of the raw windows folded
    bytes_after: int = 0  # packed bytes of the rollups written

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def compact(
    store: Store,
    cutoff: float,
    progress: Callable[[int, int], None] | None = None,
) -> CompactResult:
    """Fold raw windows whose ``window_end`` is before ``cutoff`` (POSIX s) into hourly rollups."""
    out = CompactResult()
    baselines = BaselineCache(store)
    devices = [
        (str(f), str(d))
        for f, d in store.query(
            "SELECT DISTINCT fleet, device_id FROM windows WHERE window_end < ? AND pending_json IS NULL"
            " ORDER BY fleet, device_id",
            (cutoff,),
        )
    ]
    for i in range(0, len(devices), DEVICE_CHUNK):
        _compact_chunk(store, baselines, cutoff, devices[i : i + DEVICE_CHUNK], out)
        if progress is not None:
            progress(min(i + DEVICE_CHUNK, len(devices)), len(devices))
    out.devices = len(devices)
    return out


def _compact_chunk(
    store: Store, baselines: BaselineCache, cutoff: float, chunk: list[tuple[str, str]], out: CompactResult
) -> None:
    by_fleet: dict[str, list[str]] = {}
    for f, d in chunk:
        by_fleet.setdefault(f, []).append(d)
    with store.transaction():
        # group key (fleet, device, model, hour) -> rows of windows and the existing rollup
        groups: dict[tuple[str, str, str, float], list[tuple[Any, ...]]] = {}
        ids: list[int] = []
        for fleet, devs in by_fleet.items():
            marks = ", ".join("?" * len(devs))
            for r in store.query(
                "SELECT id, device_id, model_sha256, spec_hash, window_start, window_end, count,"
                " dropped_windows, violations_json, ints, floats, labelled, correct, confusion_json"
                " FROM windows WHERE fleet = ? AND device_id"
                f" IN ({marks}) AND window_end < ? AND pending_json IS NULL",
                (fleet, *devs, cutoff),
            ):
                hour = math.floor(float(r[4]) / HOUR_S) * HOUR_S
                groups.setdefault((fleet, str(r[1]), str(r[2]), hour), []).append((1, *r[3:]))
                ids.append(int(r[0]))
                if r[9] is not None:
                    out.bytes_before += len(r[9]) + len(r[10])
        if not ids:
            return
        # Existing rollups of the same hours: merged in, then replaced.
        old_ids: list[int] = []
        for fleet, devs in by_fleet.items():
            marks = ", ".join("?" * len(devs))
            hours = sorted({k[3] for k in groups if k[0] == fleet})
            if not hours:
                continue
            for r in store.query(
                "SELECT id, device_id, model_sha256, hour, spec_hash, window_start, window_end, windows, count,"
                " dropped_windows, violations_json, ints, floats, labelled, correct, confusion_json"
                " FROM window_rollups WHERE fleet = ? AND"
                f" device_id IN ({marks}) AND hour >= ? AND hour <= ?",
                (fleet, *devs, hours[0], hours[-1]),
            ):
                key = (fleet, str(r[1]), str(r[2]), float(r[3]))
                if key in groups:
                    groups[key].append((int(r[7]), *r[4:7], *r[8:]))
                    old_ids.append(int(r[0]))
        rows = _merge(baselines, groups)
        for i in range(0, len(old_ids), 500):
            part = old_ids[i : i + 500]
            store.execute(f"DELETE FROM window_rollups WHERE id IN ({', '.join('?' * len(part))})", part)
        store.executemany(
            "INSERT INTO window_rollups (fleet, device_id, model_sha256, spec_hash, hour, window_start,"
            " window_end, windows, count, dropped_windows, violations_json, ints, floats, labelled, correct,"
            " confusion_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            store.execute(f"DELETE FROM windows WHERE id IN ({', '.join('?' * len(part))})", part)
    out.windows += len(ids)
    out.rollups += len(rows)
    out.bytes_after += sum(len(r[11]) + len(r[12]) for r in rows if r[11] is not None)


def _merge(
    baselines: BaselineCache, groups: dict[tuple[str, str, str, float], list[tuple[Any, ...]]]
) -> list[tuple[Any, ...]]:
    """Merge each group's windows (``(n, spec_hash, start, end, count, dropped, viol, ints, floats,
    labelled, correct, confusion_json)``); ground-truth counts add up."""
    rows: list[tuple[Any, ...]] = []
    by_model: dict[str, list[tuple[str, str, str, float]]] = {}
    for key in sorted(groups):
        by_model.setdefault(key[2], []).append(key)
    for sha, keys in by_model.items():
        base = baselines.get(sha)
        blobs: list[tuple[bytes, bytes]] = []
        gids: list[int] = []
        viol: list[dict[str, int]] = []
        packed_keys: list[tuple[str, str, str, float]] = []
        for key in keys:
            parts = [p for p in groups[key] if p[7] is not None]
            if parts:
                gi = len(packed_keys)
                packed_keys.append(key)
                for p in parts:
                    blobs.append((bytes(p[7]), bytes(p[8])))
                    gids.append(gi)
                    viol.append(json.loads(p[6]))
        profs: dict[tuple[str, str, str, float], tuple[bytes, bytes]] = {}
        if packed_keys:
            if base is None:
                raise ValueError(f"model {sha[:12]} has packed windows but no registered baseline")
            for key, prof in zip(
                packed_keys,
                merge_packed_groups(base.layout, blobs, gids, len(packed_keys), viol),
                strict=True,
            ):
                profs[key] = pack_profile(prof)
        for key in keys:
            g = groups[key]
            violations: dict[str, int] = {}
            for part in g:
                for k, v in json.loads(part[6]).items():
                    violations[k] = violations.get(k, 0) + int(v)
            ints, floats = profs.get(key, (None, None))
            rows.append(
                (
                    key[0],
                    key[1],
                    key[2],
                    g[0][1],
                    key[3],
                    min(float(p[2]) for p in g),
                    max(float(p[3]) for p in g),
                    sum(int(p[0]) for p in g),
                    sum(int(p[4]) for p in g),
                    sum(int(p[5]) for p in g),
                    dumps(violations),
                    ints,
                    floats,
                    *_sum_labels(g),
                )
            )
    return rows


def _sum_labels(parts: list[tuple[Any, ...]]) -> tuple[int | None, int | None, str | None]:
    """The group's (labelled, correct, confusion_json): sums, or None where no part had labels."""
    labelled = [p for p in parts if p[9] is not None]
    if not labelled:
        return None, None, None
    confusion: np.ndarray | None = None
    for p in labelled:
        if p[11] is not None:
            m = np.asarray(json.loads(p[11]), dtype=np.int64)
            confusion = m if confusion is None else confusion + m
    return (
        sum(int(p[9]) for p in labelled),
        sum(int(p[10]) for p in labelled),
        None if confusion is None else dumps(confusion.tolist()),
    )
