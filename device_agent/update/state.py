"""The persisted side of an update: ``update.json``, what is served, and recovery at start-up.

``DeploymentState`` owns the deployment document (same keys and schema as ever), refuses a state change
``TRANSITIONS`` does not list, and makes the store consistent after a crash (``RECOVERY``). The
``Updater`` (``device_agent.update.machine``) moves a deployment through the states on top of it.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from device_agent.formats.broker import BrokerSettings
from device_agent.formats.files import BundleId, StoreError, read_json
from device_agent.formats.manifest import (
    BundleError,
    Manifest,
    VerifyPolicy,
    load_manifest,
    manifest_sha256,
    verify_bundle,
)
from device_agent.store import ActiveRef, BundleStore, RollbackFloor, atomic_write_json, remove_tree

log = logging.getLogger(__name__)

UPDATE_SCHEMA = 1

STATES = ("idle", "downloading", "verifying", "writing", "switching", "checking", "committed", "failed")
TERMINAL = ("idle", "committed", "failed")
# state -> the states it may move to. A deployment starts from any terminal state; "committed" straight
# from "downloading" is a command for the bundle already active; every running state may fail.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "idle": ("downloading",),
    "downloading": ("verifying", "committed", "failed"),
    "verifying": ("writing", "failed"),
    "writing": ("switching", "failed"),
    "switching": ("checking", "failed"),
    "checking": ("committed", "failed"),
    "committed": ("downloading",),
    "failed": ("downloading",),
}
# What start-up recovery does with a deployment that stopped in a running state: "rollback" (the
# pointer may have moved: restore the previous one) or "drop" (the pointer was never touched).
RECOVERY: dict[str, str] = {
    "downloading": "drop",
    "verifying": "drop",
    "writing": "drop",
    "switching": "rollback",
    "checking": "rollback",
}


Emit = Callable[[str, str, Mapping[str, Any]], None]


@dataclass
class UpdaterConfig:
    """Device policy for updates (from the agent's config; never from a command or a bundle)."""

    state_dir: Path
    policy: VerifyPolicy = field(default_factory=VerifyPolicy)
    fallback_bundle: Path | None = None  # the config's bundle, served while the store holds none
    health_window_s: float | None = None
    health_poll_s: float | None = None
    staging_quota_bytes: int | None = None  # refuse downloads larger than this (None: free disk space)
    device_id: str | None = None
    mqtt: BrokerSettings | None = None
    ssl_context: ssl.SSLContext | None = None


def _noop_emit(event: str, message: str, detail: Mapping[str, Any]) -> None:
    log.info("%s: %s %s", event, message, dict(detail))


class DeploymentState:
    """The deployment document in ``state_dir/bundles/update.json``, the store and the floor it guards.

    ``emit(event, message, detail)`` reports a finished deployment; ``on_state(status)`` is called with
    the deployment status after every state change.
    """

    def __init__(
        self,
        config: UpdaterConfig,
        *,
        emit: Emit = _noop_emit,
        on_state: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.store = BundleStore(config.state_dir)
        self.floor = RollbackFloor(self.store.root)
        self.emit = emit
        self.on_state = on_state
        self._lock = threading.RLock()
        self._doc: dict[str, Any] = {}
        self._startup_events: list[tuple[str, str, dict[str, Any]]] = []

    # ------------------------------------------------------------------ persisted state

    def _load(self) -> dict[str, Any]:
        try:
            doc = read_json(self.store.update_path)
        except StoreError as e:
            log.error("update state unreadable, starting from idle: %s", e)
            return {}
        if not isinstance(doc, dict) or doc.get("schema") != UPDATE_SCHEMA or doc.get("state") not in STATES:
            return {}
        return doc

    def _persist(self, **changes: Any) -> None:
        with self._lock:
            if "state" in changes:
                before = self._doc.get("state") or "idle"
                if changes["state"] not in TRANSITIONS[before]:
                    raise RuntimeError(
                        f"update state {before!r} -> {changes['state']!r} is not in TRANSITIONS"
                    )
            self._doc.update(changes)
            self._doc["schema"] = UPDATE_SCHEMA
            self._doc["updated_at"] = time.time()
            self.store.ensure()
            atomic_write_json(self.store.update_path, self._doc)
            status = self.status()
        if self.on_state is not None:
            try:
                self.on_state(status)
            except Exception:  # noqa: BLE001 - a status publisher must not break an update
                log.exception("on_state callback failed")

    def status(self) -> dict[str, Any]:
        """Return the deployment state for status messages and ``/v1/health`` (JSON-ready)."""
        with self._lock:
            d = self._doc or self._load()
        if not d:
            return {"state": "idle"}
        new = d.get("new") or {}
        return {
            "id": d.get("deployment_id"),
            "state": d.get("state"),
            "name": new.get("name"),
            "version": new.get("version"),
            "sha256": new.get("sha256"),
            "reason": d.get("reason"),
            "updated_at": d.get("updated_at"),
        }

    # ------------------------------------------------------------------ what is served

    def store_bundle(self) -> Path | None:
        """Return the store's active slot, or None (also when the pointer is unreadable: logged)."""
        try:
            return self.store.active_dir()
        except StoreError as e:
            log.error("bundle store pointer unreadable, serving the configured bundle: %s", e)
            return None

    def serving_dir(self) -> Path | None:
        """Return the bundle to serve: the store's active slot, else the configured fallback bundle."""
        return self.store_bundle() or self.config.fallback_bundle

    def _serving_manifest(self) -> Manifest | None:
        d = self.serving_dir()
        if d is None:
            return None
        try:
            return load_manifest(d)
        except BundleError:
            return None

    # ------------------------------------------------------------------ recovery

    def recover(self, report: bool = True) -> None:
        """Make the store consistent after a crash or power loss; call before loading any model.

        An interrupted update before ``switching`` is dropped; one in ``switching`` or ``checking`` is
        rolled back to the previous pointer. Staging and partial slots are removed. A terminal result
        that was never reported is reported now (``emit`` must be usable).
        """
        self.store.ensure()
        with self._lock:
            self._doc = self._load()
        d = self._doc
        state = d.get("state")
        action = RECOVERY.get(str(state))
        if action == "rollback":
            prev = d.get("previous")
            ref = ActiveRef.from_dict(prev) if prev else None
            self.store.set_active(ref)
            target = d.get("target_slot")
            if target and (ref is None or ref.slot != target):
                remove_tree(self.store.slot_path(target))
            self._persist(
                state="failed",
                failed_in=state,
                reported=False,
                reason=f"agent restarted during '{state}' before the new model passed its health window;"
                " rolled back to the previous model",
            )
        elif action == "drop":
            target = d.get("target_slot")
            active = self.store.active()
            if target and (active is None or active.slot != target):
                remove_tree(self.store.slot_path(target))
            self._persist(
                state="failed",
                failed_in=state,
                reported=False,
                reason=f"agent restarted during '{state}'; the previous model kept serving",
            )
        self.store.clear_staging()
        if report:
            self._report_pending()

    def report_pending(self) -> None:
        """Report a finished deployment whose event was not sent yet (after ``recover(report=False)``)."""
        with self._lock:
            self._doc = self._doc or self._load()
        self._report_pending()
        for event, message, detail in self._startup_events:
            try:
                self.emit(event, message, detail)
            except Exception:  # noqa: BLE001
                log.exception("could not emit %s", event)
        self._startup_events.clear()

    def check_active_slot(self) -> bool:
        """Verify the active slot at start-up; when it is damaged, fall back to the configured bundle.

        A committed slot can still rot on a worn SD card. Serving the configured bundle keeps the device
        useful; the event ``store_fallback`` says why. Returns False when it fell back.
        """
        try:
            ref = self.store.active()
        except StoreError:
            ref = None
        if ref is not None:  # a committed slot was activated: it is part of the floor even if it rotted
            self.floor.raise_to(BundleId(ref.name, ref.version, ref.sha256))
        active = self.store_bundle()
        if active is None:
            return True
        try:
            verify_bundle(active, replace(self.config.policy, min_version_exclusive=None))
            return True
        except (BundleError, OSError) as e:
            reason = f"the active bundle in {str(active)!r} is damaged ({e}); serving the configured bundle"
            log.error("%s", reason)
            self.store.set_active(None)
            self._startup_events.append(("store_fallback", reason[:900], {"path": str(active)}))
            return False

    def seed_floor(self) -> None:
        """Start a floor on a device that has none (first start, or an upgrade from an agent without one).

        The versions the store says were committed raise it; the configured bundle becomes the
        fallback (trust on first use), so a device with a damaged slot still starts after the upgrade.
        """
        if self.floor.exists:
            return
        with self._lock:
            d = self._doc or self._load()
        new = d.get("new") or {}
        if d.get("state") == "committed" and isinstance(new.get("version"), int) and new.get("sha256"):
            b = BundleId.from_dict({**new, "name": new.get("name") or "?"})
            if b is not None:
                self.floor.raise_to(b)
        fb = self.config.fallback_bundle
        if fb is not None:
            try:
                m = load_manifest(fb)
                self.floor.record_fallback(BundleId(m.name, m.version, manifest_sha256(fb)))
            except (BundleError, OSError):
                pass  # the daemon reports an unloadable configured bundle itself

    def startup_bundle(self) -> Path | None:
        """Return what to serve at start-up: the active slot, else the configured bundle if the floor allows.

        The configured bundle is served below the floor only when it is the recorded fallback (the
        configured bundle this device activated before): the device keeps serving after a slot rots,
        but a bundle path pointed at an older bundle is not activated by a restart. Raises
        RollbackError (the daemon exits 78) otherwise.
        """
        slot = self.store_bundle()
        if slot is not None:
            return slot
        fb = self.config.fallback_bundle
        if fb is None:
            return None
        try:
            m = load_manifest(fb)
            me = BundleId(m.name, m.version, manifest_sha256(fb))
        except (BundleError, OSError):
            return fb  # not loadable: the Agent says why
        if self.floor.allows(m.version):
            return fb
        if self.floor.fallback == me:
            self.floor.serving_below_floor = True
            log.warning(
                "serving the configured bundle %s v%d below the anti-rollback floor v%d (the fallback);"
                " only v%d or newer will be installed",
                me.name,
                me.version,
                self.floor.version,
                self.floor.version,
            )
            return fb
        self.floor.check(me, m.version, "bundle path")
        return fb  # pragma: no cover - check raised

    def _report_pending(self) -> None:
        d = self._doc
        if not d or d.get("reported", True) or d.get("state") not in ("committed", "failed"):
            return
        self._report(d["state"] == "committed")
        self._persist(reported=True)

    def _report(self, ok: bool) -> None:
        d = self._doc
        new = d.get("new") or {}
        detail = {
            "deployment_id": d.get("deployment_id"),
            "name": new.get("name"),
            "version": new.get("version"),
            "sha256": new.get("sha256"),
        }
        try:
            if ok:
                detail["previous_version"] = (d.get("previous_served") or {}).get("version")
                self.emit("deployed", f"now serving {new.get('name')} v{new.get('version')}", detail)
            else:
                detail["state"] = d.get("failed_in")
                detail["reason"] = d.get("reason")
                self.emit("deploy_failed", str(d.get("reason")), detail)
        except Exception:  # noqa: BLE001 - reporting must not turn a finished update into a crash
            log.exception("could not emit the deployment result")


__all__ = [
    "UPDATE_SCHEMA",
    "STATES",
    "TERMINAL",
    "TRANSITIONS",
    "RECOVERY",
    "UpdaterConfig",
    "DeploymentState",
]
