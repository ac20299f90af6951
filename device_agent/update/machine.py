"""The update state machine: one deployment at a time through persisted states.

An update runs these states, each persisted in ``state_dir/bundles/update.json`` before it starts::

    downloading -> verifying -> writing -> switching -> checking -> committed
                                                                \\-> failed (previous model serving)

* ``downloading``: fetch into ``staging/`` (HTTP(S) with resume, a size cap and a stall timeout, chunks
  over MQTT, or a local drop from ``edgefleet flash``). The manifest comes first and is checked (hash
  named by the command, signature, target, version, size cap) before any model byte is fetched.
* ``verifying``: ``verify_bundle`` on the staged copy with the device's policy.
* ``writing``: copy into the inactive slot (``.partial``, fsync, rename) and verify the slot again.
* ``switching``: point ``active.json`` at the new slot (atomic) and hand it to the serving process.
* ``checking``: smoke inference, then a health window; any failure rolls back.
* ``committed`` emits ``deployed``; ``failed`` points back at the previous bundle and emits
  ``deploy_failed`` with the reason.

Crash and power-loss safety: ``recover()`` runs at start-up before any model is loaded. An update that
stopped before ``switching`` never touched the pointer; one that stopped in ``switching`` or
``checking`` is rolled back (the new model never passed its health window). Either way the staging
area and partial slot are removed and ``deploy_failed`` is reported. Serving reads only complete,
verified slots, so no half-written model is ever loaded.

The allowed moves are the table ``TRANSITIONS``; every state change goes through ``_persist`` (the
document in ``update.json`` keeps the keys it always had) and refuses a move the table does not list.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from device_agent.errors import AgentError
from device_agent.formats.deploy import (
    CommandError,
    DeployCommand,
    LocalSource,
    Source,
    decode_command,
)
from device_agent.formats.files import BundleId, StoreError
from device_agent.formats.manifest import (
    BundleError,
    VerifyPolicy,
    load_manifest,
    manifest_sha256,
    verify_bundle,
)
from device_agent.store import (
    ActiveRef,
    RollbackError,
    remove_tree,
)
from device_agent.update.fetch import (
    UpdateError,
    disk_full,
    fetch_bundle,
)
from device_agent.update.state import (
    DeploymentState,
    Emit,
    UpdaterConfig,
    _noop_emit,
)

log = logging.getLogger(__name__)

# Tunables (module constants so tests can patch them).
HEALTH_WINDOW_S = 10.0
HEALTH_POLL_S = 0.5
INCOMING_POLL_S = 1.0
QUEUE_MAX = 8  # deploy commands waiting behind the running one; more are refused (command_rejected)

# --------------------------------------------------------------------------------------------------
# Smoke inference


def smoke_inference(bundle_dir: Path) -> None:
    """Load a bundle in its runtime and run one all-zero sample; raise UpdateError when that fails."""
    from device_agent.inference import Predictor

    try:
        pred = Predictor(bundle_dir)
    except AgentError as e:
        raise UpdateError(f"smoke inference failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - any runtime failure means the model cannot serve
        raise UpdateError(f"smoke inference failed: {type(e).__name__}: {str(e)[:200]}") from None
    smoke_predictor(pred)


def smoke_predictor(pred: Any) -> None:
    """Run one all-zero sample through a loaded ``Predictor``; raise UpdateError on failure or bad scores."""
    import numpy as np

    try:
        shape = tuple(1 if d < 0 else d for d in pred.sample_shape)
        scores = pred.predict(np.zeros((1, *shape), dtype=np.float32))
    except AgentError as e:
        raise UpdateError(f"smoke inference failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - any runtime failure means the model cannot serve
        raise UpdateError(f"smoke inference failed: {type(e).__name__}: {str(e)[:200]}") from None
    if not np.isfinite(scores).all():
        raise UpdateError("smoke inference returned NaN or infinite scores")
    if scores.shape[1] != len(pred.labels):
        raise UpdateError(
            f"smoke inference returned {scores.shape[1]} scores but the bundle has {len(pred.labels)} labels"
        )


@dataclass(frozen=True)
class _Run:
    """One deployment between its states: what ``downloading`` decided for the states after it."""

    dep_id: str
    src: Source
    cmd: DeployCommand | None
    new: dict[str, Any]
    already_active: bool
    policy: VerifyPolicy
    check_floor: bool


class Updater(DeploymentState):
    """Run deployments one at a time through the persisted state machine.

    The serving process provides four callables: ``switch(bundle_dir) -> bool`` (load and serve a
    bundle; False when it refused), ``smoke(bundle_dir)`` (raise when the served bundle cannot
    predict), ``health() -> bool`` (polled during the health window) and ``emit(event, message,
    detail)``. ``on_state(status)`` is called with the deployment status after every state change.
    """

    def __init__(
        self,
        config: UpdaterConfig,
        *,
        switch: Callable[[Path], bool],
        smoke: Callable[[Path], None] = smoke_inference,
        health: Callable[[], bool] = lambda: True,
        emit: Emit = _noop_emit,
        on_state: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(config, emit=emit, on_state=on_state)
        self.switch = switch
        self.smoke = smoke
        self.health = health
        self._queue: queue.Queue[DeployCommand | LocalSource | None] = queue.Queue(QUEUE_MAX)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.stale_partials_removed = 0

    # ------------------------------------------------------------------ entry points

    def handle_command(self, payload: bytes) -> DeployCommand | None:
        """Decode a ``cmd`` payload and queue it; return None when it does not apply to this device.

        Raises CommandError for a malformed payload (the caller logs and counts it).
        """
        cmd = decode_command(payload)
        if not cmd.applies_to(self.config.device_id):
            return None
        try:
            self._queue.put_nowait(cmd)
        except queue.Full:
            raise CommandError(
                f"deploy command {cmd.deployment_id!r} dropped: {QUEUE_MAX} deployments are already waiting"
            ) from None
        return cmd

    def submit(self, item: DeployCommand | LocalSource) -> None:
        """Queue a deployment for the worker thread (blocks while the queue is full)."""
        self._queue.put(item)

    def start(self) -> None:
        """Start the worker thread (runs queued deployments and polls the incoming drop box)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._worker, name="edgefleet-updater", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the worker thread after the deployment in progress."""
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the worker checks the stop flag before taking the next item
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=INCOMING_POLL_S)
            except queue.Empty:
                item = None
            if self._stop.is_set():
                break
            try:
                if item is not None:
                    self.deploy(item)
                else:
                    self.poll_incoming()
            except Exception:  # noqa: BLE001 - the worker must never die on one deployment
                log.exception("deployment crashed")

    def poll_incoming(self) -> bool:
        """Deploy the oldest complete drop in ``incoming/`` (from ``edgefleet flash``); True if one ran."""
        stale = self.store.remove_stale_partials()
        if stale:
            self.stale_partials_removed += len(stale)
            log.warning("removed %d stale .partial drop(s) (a flash stopped mid-copy)", len(stale))
        drops = self.store.pending_incoming()
        if not drops:
            return False
        self.deploy(LocalSource(str(drops[0])))
        return True

    # ------------------------------------------------------------------ one deployment

    def deploy(self, item: DeployCommand | LocalSource) -> bool:
        """Run one deployment to its end; return True when the new bundle is committed and serving."""
        with self._lock:
            self._doc = self._doc or self._load()
        if isinstance(item, DeployCommand):
            last = self._doc
            if last.get("deployment_id") == item.deployment_id and last.get("state") in (
                "committed",
                "failed",
            ):
                self._report(last["state"] == "committed")  # a retry: answer again, do not redo
                return last["state"] == "committed"
        run = self._begin(item)
        if run.already_active:
            self._persist(state="committed", reason="already active")
            self._report_pending()
            return True
        staged = self._stage(run)
        if staged is None:
            return False
        ref, slot_dir = staged
        if not self._switch_and_check(slot_dir, ref):
            return False
        self.floor.raise_to(BundleId(ref.name, ref.version, ref.sha256))
        self.floor.serving_below_floor = False
        self._persist(state="committed")
        self.store.clear_staging()
        self._report_pending()
        return True

    def _begin(self, item: DeployCommand | LocalSource) -> _Run:
        """Persist ``downloading`` for a new deployment and return what its next states need."""
        new: dict[str, Any]
        if isinstance(item, DeployCommand):
            dep_id = item.deployment_id
            src: Source = item.source
            cmd: DeployCommand | None = item
            new = {"name": item.name, "version": item.version, "sha256": item.sha256}
        else:
            dep_id = (
                "local-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{Path(item.path).name[:24]}"
            )
            src, cmd = item, None
            try:
                m0 = load_manifest(item.path)
                new = {"name": m0.name, "version": m0.version, "sha256": manifest_sha256(item.path)}
            except BundleError:
                new = {"name": None, "version": None, "sha256": None}
        served = self._serving_manifest()
        try:
            served_ref = self.store.active()
        except StoreError:
            served_ref = None
        self._doc = {}
        self._persist(
            deployment_id=dep_id,
            state="downloading",
            new=new,
            source=src.to_dict(),
            previous=served_ref.to_dict() if served_ref else None,
            previous_served={"name": served.name, "version": served.version} if served else None,
            target_slot=None,
            reason=None,
            failed_in=None,
            reported=False,
            started_at=time.time(),
        )
        return _Run(
            dep_id=dep_id,
            src=src,
            cmd=cmd,
            new=new,
            already_active=(
                cmd is not None
                and served is not None
                and served_ref is not None
                and served_ref.sha256 == cmd.sha256
            ),
            policy=replace(self.config.policy, min_version_exclusive=served.version if served else None),
            # The policy refuses what is not newer than the served bundle; the floor matters when the
            # device serves below it (the configured fallback after a damaged slot).
            check_floor=served is None or served.version < self.floor.version,
        )

    def _stage(self, run: _Run) -> tuple[ActiveRef, Path] | None:
        """downloading -> verifying -> writing: a verified copy in the inactive slot (None: failed)."""
        source = "ota" if run.cmd is not None else "flash"
        staging = self.store.staging_for(run.dep_id)
        try:
            offered = run.new.get("version")
            if run.check_floor and isinstance(offered, int):  # before any byte is fetched
                self.floor.check(BundleId.from_dict(run.new), offered, source)
            bundle_dir = fetch_bundle(
                run.src,
                run.cmd,
                run.policy,
                staging,
                mqtt=self.config.mqtt,
                ssl_context=self.config.ssl_context,
                quota_bytes=self.config.staging_quota_bytes,
            )
            self._persist(state="verifying")
            manifest = verify_bundle(bundle_dir, run.policy)
            sha = manifest_sha256(bundle_dir)
            if run.check_floor:  # again on the verified manifest
                self.floor.check(BundleId(manifest.name, manifest.version, sha), manifest.version, source)
            if run.cmd is not None and sha != run.cmd.sha256:
                raise UpdateError("the verified manifest is not the one the command names")
            self._doc["new"] = {
                "name": manifest.name,
                "version": manifest.version,
                "sha256": manifest_sha256(bundle_dir),
            }
            slot = self.store.inactive_slot()
            self._persist(state="writing", target_slot=slot)
            slot_dir = self.store.write_slot(slot, bundle_dir, manifest)
            verify_bundle(slot_dir, run.policy)
            return self.store.ref_for(slot, manifest), slot_dir
        except RollbackError as e:
            self._fail(str(e), switched=False, logged=True)
        except (UpdateError, BundleError, StoreError) as e:
            self._fail(str(e), switched=False)
        except OSError as e:
            reason = f"disk full in staging ({e.strerror})" if disk_full(e) else f"I/O error: {e}"
            self._fail(reason, switched=False)
        finally:
            if isinstance(run.src, LocalSource):
                remove_tree(Path(run.src.path))
        return None

    def _switch_and_check(self, slot_dir: Path, ref: ActiveRef) -> bool:
        """switching -> checking: serve the slot, smoke it, hold the health window (False: rolled back)."""
        self._persist(state="switching")
        loaded = False
        try:
            self.store.set_active(ref)
            if not self.switch(slot_dir):
                raise UpdateError("the agent refused to serve the new bundle (see its reload_failed event)")
            loaded = True
            self._persist(state="checking")
            self.smoke(slot_dir)
            self._health_window()
        except (UpdateError, BundleError, StoreError) as e:
            self._fail(str(e), switched=True, reload_previous=loaded)
            return False
        except Exception as e:  # noqa: BLE001 - anything going wrong after the switch means roll back
            self._fail(f"{type(e).__name__}: {str(e)[:200]}", switched=True, reload_previous=loaded)
            return False
        return True

    def _health_window(self) -> None:
        window = HEALTH_WINDOW_S if self.config.health_window_s is None else self.config.health_window_s
        poll = HEALTH_POLL_S if self.config.health_poll_s is None else self.config.health_poll_s
        deadline = time.monotonic() + window
        while True:
            if not self.health():
                raise UpdateError(f"health check failed within the {window:g} s health window")
            if time.monotonic() >= deadline:
                return
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    def _fail(self, reason: str, switched: bool, reload_previous: bool = True, logged: bool = False) -> None:
        failed_in = self._doc.get("state")
        if not logged:  # ``logged``: the anti-rollback floor already logged it (once per bundle)
            log.warning("deployment %s failed in %s: %s", self._doc.get("deployment_id"), failed_in, reason)
        if switched:
            prev = self._doc.get("previous")
            ref = ActiveRef.from_dict(prev) if prev else None
            try:
                self.store.set_active(ref)
                back = self.serving_dir()
                if reload_previous and back is not None and not self.switch(back):
                    reason += "; and the previous bundle failed to load again (check the agent)"
            except Exception as e:  # noqa: BLE001
                reason += f"; rollback error: {e}"
        target = self._doc.get("target_slot")
        active = self.store.active()
        if target and (active is None or active.slot != target):
            remove_tree(self.store.slot_path(target))
        self.store.clear_staging()
        self._persist(state="failed", failed_in=failed_in, reason=reason[:900])
        self._report_pending()


__all__ = ["Updater", "smoke_inference", "smoke_predictor"]
