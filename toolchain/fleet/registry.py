"""Baselines: register a bundle's ``baseline.json`` keyed by its model sha256, and look them up.

The model sha256 is the sha256 of the bundle's ``manifest.json`` (``device_agent.formats.manifest.manifest_sha256``),
which is what devices report in their ``model`` reference. Windows that arrive before their model is
registered are stored as *pending* (raw JSON); registering the model validates them against the
baseline and packs them, or moves the ones that do not fit to the quarantine.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from device_agent.formats.manifest import (
    BundleError,
    VerifyPolicy,
    load_manifest,
    manifest_sha256,
    verify_bundle,
)
from device_agent.formats.stats import Profile, StatsError, baseline_from_dict
from device_agent.formats.telemetry import ModelRef, StatsMessage, TelemetryError
from toolchain.errors import ToolchainError
from toolchain.fleet.drift import DriftConfig
from toolchain.fleet.quarantine import QUARANTINE_HEAD_BYTES, REASON_MAX_CHARS
from toolchain.fleet.rows import COUNTER_SQL, QUARANTINE_SQL, CounterRow, QuarantineRow
from toolchain.fleet.storage import Layout, Store, dumps, open_store, pack_profile

log = logging.getLogger("edgefleet.fleet")

BASELINE_MAX_BYTES = 64 << 20
NEGATIVE_CACHE_S = 5.0  # how long "no baseline for this model" is believed before asking the database again


class RegistryError(ToolchainError):
    """A bundle cannot be registered (not a bundle, damaged, no baseline)."""


@dataclass
class Baseline:
    """A registered model: its baseline profile, packing layout and drift settings."""

    model_sha256: str
    name: str
    version: int
    target: str
    profile: Profile
    layout: Layout
    config: DriftConfig
    spec_hash: str = ""

    def __post_init__(self) -> None:
        self.spec_hash = self.profile.spec.spec_hash()


def read_bundle_baseline(bundle_dir: str | os.PathLike[str]) -> tuple[str, Any, Profile, dict[str, Any]]:
    """Verify a bundle's files and return (model sha256, manifest, baseline profile, baseline doc)."""
    root = Path(bundle_dir)
    try:
        manifest = verify_bundle(root, VerifyPolicy(allow_unsigned=True))
    except BundleError as e:
        raise RegistryError(f"cannot register {str(root)!r}: {e}") from None
    path = root / manifest.baseline
    if path.stat().st_size > BASELINE_MAX_BYTES:
        raise RegistryError(f"{path} is larger than {BASELINE_MAX_BYTES} bytes")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        profile = baseline_from_dict(doc)
    except (ValueError, StatsError) as e:
        raise RegistryError(f"baseline {str(path)!r} is invalid ({e}); rebuild the bundle") from None
    return manifest_sha256(root), manifest, profile, doc


def register_bundle(
    db: str | Store, bundle_dir: str | os.PathLike[str], settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Store a bundle's baseline keyed by model sha256; validate windows that waited for it.

    ``settings`` overrides drift thresholds for this model (names of ``DriftConfig`` fields); a
    re-registration without settings keeps the stored ones. Returns a summary dict.
    """
    sha, manifest, profile, doc = read_bundle_baseline(bundle_dir)
    store = open_store(db) if isinstance(db, str) else db
    try:
        old = store.query("SELECT config_json FROM baselines WHERE model_sha256 = ?", (sha,))
        base_cfg = DriftConfig.from_dict(json.loads(old[0][0])) if old else DriftConfig()
        cfg = DriftConfig.from_dict({**base_cfg.to_dict(), **(settings or {})})
        with store.transaction():
            store.execute(
                "INSERT INTO baselines (model_sha256, name, version, target, spec_hash, baseline_json,"
                " config_json,"
                " source, registered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model_sha256) DO"
                " UPDATE"
                " SET config_json = excluded.config_json",
                (
                    sha,
                    manifest.name,
                    manifest.version,
                    manifest.target,
                    doc["spec_hash"],
                    dumps(doc),
                    dumps(cfg.to_dict()),
                    str(Path(bundle_dir).resolve()),
                    time.time(),
                ),
            )
        packed, quarantined = resolve_pending(store, sha, profile)
        return {
            "model_sha256": sha,
            "name": manifest.name,
            "version": manifest.version,
            "target": manifest.target,
            "spec_hash": doc["spec_hash"],
            "features": profile.inputs.n_features,
            "pending_packed": packed,
            "pending_quarantined": quarantined,
            "config": cfg.to_dict(),
            "created": not old,
        }
    finally:
        if isinstance(db, str):
            store.close()


def resolve_pending(store: Store, sha: str, baseline: Profile) -> tuple[int, int]:
    """Pack the pending windows of a model now that its baseline is known; quarantine misfits."""
    spec = baseline.spec
    rows = store.query(
        "SELECT id, fleet, device_id, spec_hash, count, violations_json, pending_json FROM windows"
        " WHERE model_sha256 = ? AND pending_json IS NOT NULL",
        (sha,),
    )
    packed = bad = 0
    now = time.time()
    with store.transaction():
        for wid, fleet, device, spec_hash, count, viol, pending in rows:
            state = json.loads(pending)
            msg = StatsMessage(
                device_id=device,
                fleet=fleet,
                seq=0,
                window_start=0.0,
                window_end=0.0,
                model=ModelRef("pending", 1, sha),
                spec_hash=spec_hash,
                count=int(count),
                inputs=state["inputs"],
                outputs=state["outputs"],
                latency_ms=state["latency_ms"],
                schema_violations=json.loads(viol),
                dropped_windows=0,
                agent_version="",
            )
            try:
                prof = msg.profile(spec)
            except TelemetryError as e:
                store.execute("DELETE FROM windows WHERE id = ?", (wid,))
                store.execute(
                    QUARANTINE_SQL,
                    QuarantineRow(
                        now,
                        f"edgefleet/{fleet}/{device}/stats",
                        f"after registration: {e}"[:REASON_MAX_CHARS],
                        pending[:QUARANTINE_HEAD_BYTES],
                        len(pending),
                    ),
                )
                # The window no longer counts as stored for its device; the quarantine counts it.
                store.execute(
                    "UPDATE devices SET windows = windows - 1, predictions = predictions - ?"
                    " WHERE fleet = ? AND device_id = ?",
                    (int(count), fleet, device),
                )
                bad += 1
                continue
            ints, floats = pack_profile(prof)
            store.execute(
                "UPDATE windows SET ints = ?, floats = ?, pending_json = NULL WHERE id = ?",
                (ints, floats, wid),
            )
            packed += 1
        if bad:
            store.execute(COUNTER_SQL, CounterRow("quarantined", bad, now))
    if bad:
        log.warning(
            "quarantined %d pending window(s) of model %s that do not fit its baseline", bad, sha[:12]
        )
    return packed, bad


def load_baseline(store: Store, sha: str) -> Baseline | None:
    """Return the registered baseline of a model, or None."""
    rows = store.query(
        "SELECT name, version, target, baseline_json, config_json FROM baselines WHERE model_sha256 = ?",
        (sha,),
    )
    if not rows:
        return None
    name, version, target, bjson, cjson = rows[0]
    profile = baseline_from_dict(json.loads(bjson))
    return Baseline(
        sha,
        name,
        int(version),
        target,
        profile,
        Layout.of(profile.spec),
        DriftConfig.from_dict(json.loads(cjson)),
    )


class BaselineCache:
    """Baselines by model sha256 for one Store, with a short negative cache for unknown models.

    A cached baseline's drift settings are re-read every ``REFRESH_S`` seconds, so thresholds changed
    with ``edgefleet fleet register BUNDLE --set ...`` reach a running collector (and its evaluation
    worker) within that time. The profile and packing layout of a model never change and are kept.
    If the re-read fails, the cached settings stay in use until the next try.
    """

    REFRESH_S = 30.0

    def __init__(self, store: Store) -> None:
        self.store = store
        self._known: dict[str, tuple[Baseline, float]] = {}
        self._missing: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, sha: str) -> Baseline | None:
        now = time.monotonic()
        with self._lock:
            got = self._known.get(sha)
            if got is not None and now - got[1] < self.REFRESH_S:
                return got[0]
            if got is None and now - self._missing.get(sha, -1e18) < NEGATIVE_CACHE_S:
                return None
        if got is not None:
            return self._refresh(sha, got[0], now)
        found = load_baseline(self.store, sha)
        with self._lock:
            if found is None:
                self._missing[sha] = now
            else:
                self._known[sha] = (found, now)
                self._missing.pop(sha, None)
        return found

    def _refresh(self, sha: str, old: Baseline, now: float) -> Baseline:
        base = old
        try:
            rows = self.store.query("SELECT config_json FROM baselines WHERE model_sha256 = ?", (sha,))
            if rows:
                cfg = DriftConfig.from_dict(json.loads(rows[0][0]))
                if cfg != old.config:
                    base = replace(old, config=cfg)
                    log.info(
                        "drift settings of %s (%s v%s) changed: %s", sha[:12], old.name, old.version, cfg
                    )
        except Exception as e:  # noqa: BLE001 - keep serving the cached settings; try again later
            log.warning("re-reading the drift settings of %s failed: %s", sha[:12], e)
        with self._lock:
            self._known[sha] = (base, now)
        return base

    def forget(self, sha: str) -> None:
        with self._lock:
            self._known.pop(sha, None)
            self._missing.pop(sha, None)


class BundleDirectory:
    """Find bundles by model sha256 in a directory (recursively, a few levels deep) for auto-registration."""

    RESCAN_S = 10.0
    MAX_DEPTH = 3

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise RegistryError(
                f"bundle directory {str(root)!r} does not exist; pass a folder of built bundles"
            )
        self._by_sha: dict[str, Path] = {}
        self._scanned = -1e18

    def scan(self) -> None:
        found: dict[str, Path] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            depth = len(Path(dirpath).relative_to(self.root).parts)
            if depth >= self.MAX_DEPTH:
                dirnames[:] = []
            if "manifest.json" in filenames:
                try:
                    load_manifest(dirpath)
                    found[manifest_sha256(dirpath)] = Path(dirpath)
                except BundleError:
                    continue
        self._by_sha = found
        self._scanned = time.monotonic()

    def find(self, sha: str) -> Path | None:
        """Return the bundle whose manifest hashes to ``sha`` (rescanning at most every RESCAN_S)."""
        if sha not in self._by_sha and time.monotonic() - self._scanned > self.RESCAN_S:
            self.scan()
        return self._by_sha.get(sha)
