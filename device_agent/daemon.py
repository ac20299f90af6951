"""The agent daemon: a model, statistics windows, a disk outbox, an MQTT publisher and a local API.

Threads: HTTP handler threads call ``Agent.predict`` (serialized by the Agent's lock); the
``telemetry-writer`` thread (``device_agent.windowwriter.WindowWriter``) closes windows on time and
writes every closed window to the outbox (encode + SQLite commit); the ``mqtt-publisher`` thread
drains the outbox to the broker; the ``bundle-watch`` thread notices a change of the configured
bundle path. Inference never waits on the network or the disk. This module is the wiring and the
lifecycle: it builds those parts from the config, switches bundles and answers health.

Hooks for other components (the OTA updater):

* ``Daemon.switch_bundle(path) -> bool``: the ONE way to change the model (verify every hash and the
  signature, smoke inference, atomic swap; ``model_loaded`` or ``reload_failed`` event).
* ``Daemon.publish_event(event, message, detail)``: an event on ``.../events``.
* ``Daemon.set_command_handler(fn)``: ``fn(topic, payload)`` receives every message on
  ``edgefleet/<fleet>/<device_id>/cmd`` and ``edgefleet/<fleet>/cmd``.
* ``Daemon.set_deployment_status(status)``: a dict published in the retained status (``deployment``).
* ``Daemon.served_bundle()``: the folder of the bundle served now.

The updater meets the daemon through exactly these (``device_agent.update.UpdaterHost``). The
fleet's alert command (``.../cmd/alert``) goes to ``device_agent.alertfollow.AlertFollower``, which
switches the capturer between ``sample_rate`` and ``on_alert_rate``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from device_agent.agent import Agent, agent_version, predicted_classes
from device_agent.config import AgentConfig, check_files, load_config
from device_agent.errors import AgentError, ConfigError
from device_agent.formats.telemetry import TelemetryError, encode_event, encode_status, topic
from device_agent.outbox import Outbox, OutboxError
from device_agent.store import RollbackError
from device_agent.windowwriter import WindowWriter

log = logging.getLogger(__name__)

BUNDLE_POLL_S = 2.0
SHUTDOWN_FLUSH_S = 3.0
RECENT_EVENTS = 20
EX_CONFIG = 78


class Daemon:
    """A configured, running agent. ``start()``, then ``run_forever()`` (signals) or ``stop()``."""

    def __init__(self, config: AgentConfig, *, watch_bundle: bool = True) -> None:
        self.config = config
        self.trusted_keys = check_files(config)
        if not self.trusted_keys:
            log.warning(
                "SECURITY: no trusted signing key and allow_unsigned = true:"
                " this agent runs UNSIGNED bundles "
                "(file hashes are still checked). Set [agent] trusted_keys for production devices."
            )
        try:
            config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise ConfigError(
                f"[agent] state_dir {str(config.state_dir)!r} cannot be created ({e.strerror})"
            ) from None
        try:
            self.outbox = Outbox(config.outbox_path, config.outbox_max_rows, config.outbox_max_bytes)
        except OutboxError as e:
            raise ConfigError(str(e)) from None
        self.writer = WindowWriter(self.outbox, fleet=config.fleet, device_id=config.device_id)
        # OTA updates (device_agent.update): recover an interrupted update before loading any model, then
        # serve the bundle store's active slot, or the configured bundle while the store holds none.
        from device_agent.update import updater_for_agent

        self.updater = updater_for_agent(config, self.trusted_keys)
        try:
            serve = self.updater.startup_bundle() or config.bundle
        except RollbackError as e:
            self.outbox.close()
            raise ConfigError(
                f"[agent] bundle {str(config.bundle)!r}: {e}; point it at a bundle at or above the floor"
            ) from None
        try:
            self.agent = Agent(
                serve,
                trusted_keys=self.trusted_keys,
                allow_unsigned=config.allow_unsigned,
                runtime=config.runtime,
                threads=config.threads,
                target=config.target,
                window_s=config.window_s,
                window_max_samples=config.window_max_samples,
                on_window=self.writer.put,
            )
        except AgentError as e:
            self.outbox.close()
            raise ConfigError(f"[agent] bundle {str(config.bundle)!r} cannot be served: {e}") from None
        self.capturer = None
        if config.capture.enabled:
            from device_agent.capture import Capturer, open_samples_outbox

            try:
                box = open_samples_outbox(config.state_dir, config.capture)
            except OutboxError as e:
                self.outbox.close()
                raise ConfigError(str(e)) from None
            self.capturer = Capturer(config.capture, box, fleet=config.fleet, device_id=config.device_id)
            self.agent.on_predict = self._capture
            self.agent.on_label = self.capturer.label
            self.writer.capturer = self.capturer
        from device_agent.alertfollow import AlertFollower

        # The fleet's retained word on .../cmd/alert (restored from state_dir first, so a restart keeps it).
        self.alert_follower = AlertFollower(
            config.state_dir, fleet=config.fleet, device_id=config.device_id, on_change=self._set_alert
        )
        self._set_alert(self.alert_follower.in_alert)
        self.floor = self.updater.floor
        if not self.floor.serving_below_floor:  # what serves now was activated: the floor follows it
            self._raise_floor(fallback=Path(self.agent.model.path) == Path(config.bundle))
        self.events_topic = topic(config.fleet, config.device_id, "events")
        self.status_deployment: dict[str, Any] | None = None
        self.started_at = time.time()
        self.reloads_failed = 0
        self.recent_events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self._event_listeners: list[Callable[[bytes], None]] = []
        self._switch_lock = threading.Lock()
        self._stopping = threading.Event()
        self._stopped = False
        self._hup = threading.Event()
        self._watch = watch_bundle
        self._watched_fp = _fingerprint(config.bundle)
        self._threads: list[threading.Thread] = []
        self.publisher = None
        if config.mqtt is not None:
            from device_agent.mqtt import MqttPublisher

            self.publisher = MqttPublisher(
                config.mqtt,
                self.outbox,
                fleet=config.fleet,
                device_id=config.device_id,
                status_payload=self.status_payload,
            )
        if self.publisher is not None and self.capturer is not None:
            self.publisher.samples_outbox = self.capturer.outbox
        if self.publisher is not None:
            self.publisher.alert_handler = self.alert_follower.handle
            self.writer.wake = self.publisher.wake
        self.api = None
        if config.listen:
            from device_agent.api import ApiServer

            try:
                self.api = ApiServer(
                    self.agent, config.listen, health=self.health, gauges=self.gauges, settings=config.api
                )
            except OSError as e:
                self.outbox.close()
                raise ConfigError(
                    f"[api] listen {config.listen!r}: cannot bind ({e.strerror or e})"
                ) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kw: Any) -> Daemon:
        """Load the config file and build a daemon (not started)."""
        return cls(load_config(path), **kw)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Daemon:
        """Start the writer, publisher and bundle watcher threads, the updater, then the API."""
        self._spawn("telemetry-writer", lambda: self.writer.run(self.agent, self._stopping))
        if self.publisher is not None:
            self.publisher.start()
        if self._watch:
            self._spawn("bundle-watch", self._watcher)
        m = self.agent.model
        log.info(
            "serving %s v%s (%s, sha256 %s) as %s/%s",
            m.ref.name,
            m.ref.version,
            m.runtime,
            m.ref.sha256[:12],
            self.config.fleet,
            self.config.device_id,
        )
        self.publish_event("model_loaded", f"serving {m.ref.name} v{m.ref.version}", self._model_detail())
        from device_agent.update import attach_to_daemon

        attach_to_daemon(self.updater, self)  # deploy commands, the incoming drop box, deployment status
        # The API last: its first answer already holds the start-up events (store_fallback, a
        # deployment's outcome) and the deployment status.
        if self.api is not None:
            self._threads.append(self.api.start())
        return self

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Flush the open window to the outbox, publish "offline", stop every thread. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self.updater.stop(timeout_s=10.0)
        if self.api is not None:
            self.api.shutdown()
        self.agent.close_window()
        self.writer.stop()
        for t in self._threads:
            t.join(10)
        self.writer.flush_capture()
        if self.publisher is not None:
            self.publisher.stop(SHUTDOWN_FLUSH_S)
        self.outbox.close()
        if self.capturer is not None:
            self.capturer.outbox.close()
        log.info("stopped")

    def run_forever(self) -> int:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads. Return the exit code."""
        # Handlers first: once start() has the API up, a client may signal at once (a SIGHUP that
        # came before the handler would kill the agent, or be lost where SIGHUP is ignored (nohup)).
        signal.signal(signal.SIGTERM, lambda *_: self._stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self._stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self._hup.set())
        self.start()
        try:
            while not self._stopping.is_set():
                if self._hup.wait(0.2):
                    self._hup.clear()
                    self.reload()
        finally:
            self.stop()
        return 0

    # ------------------------------------------------------------------ hooks
    def switch_bundle(self, path: str | os.PathLike[str], *, enforce_floor: bool = True) -> bool:
        """Verify ``path`` (every hash, signature), smoke-test it and swap it in; True on success.

        On failure the old model keeps serving and a ``reload_failed`` event carries the reason. With
        ``enforce_floor`` (the bundle path, SIGHUP) a bundle below the anti-rollback floor is refused
        and the one that serves raises the floor; the updater checks the floor itself and passes False
        (it must be able to roll back to the fallback bundle).
        """
        p = Path(path)
        with self._switch_lock:
            old = self.agent.model.ref
            try:
                if enforce_floor:
                    self._check_floor(p)
                new = self.agent.switch_bundle(p, min_version=self.floor.version if enforce_floor else None)
            except Exception as e:  # any failure keeps the old model serving
                self.reloads_failed += 1
                reason = str(e) if isinstance(e, AgentError) else f"{type(e).__name__}: {e}"
                if not isinstance(e, RollbackError):  # the floor logs its refusals once itself
                    log.warning(
                        "bundle %s rejected, still serving %s v%s: %s", p, old.name, old.version, reason
                    )
                self.publish_event(
                    "reload_failed",
                    reason[:500],
                    {"path": str(p), "serving_name": old.name, "serving_version": old.version},
                )
                return False
            if enforce_floor:
                self._raise_floor(fallback=p == Path(self.config.bundle))
        log.info("switched to %s v%s (%s)", new.ref.name, new.ref.version, new.ref.sha256[:12])
        self.publish_event("model_loaded", f"serving {new.ref.name} v{new.ref.version}", self._model_detail())
        if self.publisher is not None:
            self.publisher.republish_status()
        return True

    def _check_floor(self, p: Path) -> None:
        """Refuse a bundle below the anti-rollback floor before loading it (its manifest, unverified)."""
        from device_agent.formats.files import BundleId
        from device_agent.formats.manifest import BundleError, load_manifest, manifest_sha256

        try:
            m = load_manifest(p)
            ident = BundleId(m.name, m.version, manifest_sha256(p))
        except (BundleError, OSError):
            return  # the Agent's verification says what is wrong with it
        self.floor.check(ident, m.version, "bundle path")

    def _raise_floor(self, fallback: bool) -> None:
        from device_agent.formats.files import BundleId

        ref = self.agent.model.ref
        try:
            self.floor.raise_to(BundleId(ref.name, ref.version, ref.sha256), fallback=fallback)
            self.floor.serving_below_floor = False
        except OSError as e:  # the model serves; a floor that cannot be written is an error to see
            log.error("cannot record the anti-rollback floor in %s (%s)", self.floor.path, e)

    def publish_event(self, event: str, message: str = "", detail: Mapping[str, Any] | None = None) -> None:
        """Publish an event on ``.../events`` (QoS 1, best effort) and keep it in /v1/health."""
        try:
            raw = encode_event(
                device_id=self.config.device_id,
                fleet=self.config.fleet,
                event=event,
                ts=time.time(),
                message=message,
                detail=detail,
            )
        except TelemetryError as e:
            log.warning("event %r not sent: %s", event, e)
            return
        self.recent_events.append({"event": event, "message": message[:200], "ts": time.time()})
        if self.publisher is not None:
            self.publisher.publish_event(raw)
        for fn in list(self._event_listeners):
            try:
                fn(raw)
            except Exception:
                log.exception("event listener failed")

    def add_event_listener(self, fn: Callable[[bytes], None]) -> None:
        """Also hand every encoded event to ``fn`` (tests, local logging)."""
        self._event_listeners.append(fn)

    def served_bundle(self) -> Path:
        """The folder of the bundle served now."""
        return Path(self.agent.model.path)

    def set_deployment_status(self, status: dict[str, Any] | None, *, publish: bool = True) -> None:
        """Show a deployment's state in the retained status (``deployment``); ``publish``: send it now."""
        self.status_deployment = status
        if publish and self.publisher is not None:
            self.publisher.republish_status()

    def set_command_handler(self, fn: Callable[[str, bytes], None] | None) -> None:
        """Register ``fn(topic, payload)`` for messages on the device's and the fleet's cmd topics.

        It runs on the MQTT thread: hand long work (downloads) to a thread of your own.
        """
        if self.publisher is not None:
            self.publisher.command_handler = fn

    def status_payload(self, state: str) -> bytes:
        """The retained status message for ``state`` (online/offline)."""
        m = self.agent.model
        deployment = self.status_deployment
        fl = self.floor.status()
        if fl["refused_total"] or fl["serving_below_floor"]:  # rollbacks refused: visible fleet-wide
            deployment = {
                **(deployment or {"state": "idle"}),
                "rollback_floor": fl["version"],
                "rollback_refused": fl["refused_total"],
                "serving_below_floor": fl["serving_below_floor"],
            }
        return encode_status(
            device_id=self.config.device_id,
            fleet=self.config.fleet,
            state=state,
            ts=time.time(),
            model=m.ref,
            agent_version=agent_version(),
            target=m.manifest.target,
            deployment=deployment,
        )

    def _model_detail(self) -> dict[str, Any]:
        m = self.agent.model
        return {
            "name": m.ref.name,
            "version": m.ref.version,
            "sha256": m.ref.sha256,
            "runtime": m.runtime,
            "accelerated": bool(getattr(m.predictor.model, "accelerated", False)),
        }

    # ------------------------------------------------------------------ reload
    def reload(self) -> bool:
        """SIGHUP: re-read the config file and switch to its bundle (same path or a new one)."""
        path = self.config.bundle
        if self.config.path is not None:
            try:
                fresh = load_config(self.config.path)
            except ConfigError as e:
                log.warning("SIGHUP: config %s is invalid, keeping the running one: %s", self.config.path, e)
                self.publish_event("reload_failed", f"config: {e}"[:500], {"path": str(self.config.path)})
                return False
            if fresh.bundle != path:
                log.info("SIGHUP: bundle path changed %s -> %s", path, fresh.bundle)
            changed = [
                k
                for k in ("mqtt", "listen", "api", "window_s", "state_dir")
                if getattr(fresh, k) != getattr(self.config, k)
            ]
            if changed:
                log.warning("SIGHUP: %s changed; restart the agent to apply", ", ".join(changed))
            path = fresh.bundle
            self.config = _replace_bundle(self.config, path)
        self._watched_fp = _fingerprint(path)
        return self.switch_bundle(self.updater.store_bundle() or path)  # an OTA-installed bundle wins

    def _watcher(self) -> None:
        while not self._stopping.wait(BUNDLE_POLL_S):
            if self.updater.store_bundle() is not None:
                continue  # an OTA-installed bundle is serving; the configured path is only the fallback
            fp = _fingerprint(self.config.bundle)
            if fp != self._watched_fp:
                self._watched_fp = fp
                log.info("bundle path %s changed; reloading", self.config.bundle)
                self.switch_bundle(self.config.bundle)

    # ------------------------------------------------------------------ capture
    def _set_alert(self, on: bool) -> None:
        """The fleet's alert command was applied: capture at on_alert_rate while in alert."""
        if self.capturer is not None:
            self.capturer.set_alert(on)

    def _capture(self, x: Any, pred: Any, given: list[str] | None = None) -> None:
        """Agent.on_predict: offer the raw input (as given to predict) to the capturer.

        ``given``: the ids the HTTP API returned for these samples, so feedback and samples join.
        """
        c = self.capturer
        if c is None or c.rate <= 0.0:
            return
        import numpy as np

        raw = np.asarray(x)
        outs = np.asarray(pred.outputs)
        if raw.ndim == len(self.agent.model.predictor.sample_shape):
            raw = raw[None]
        labels = predicted_classes(pred, self.agent.labels)
        # None: the capturer makes ids for the rows it captures only
        ids = list(given) if given is not None and len(given) == len(labels) else None
        ref = pred.model
        c.offer(raw, outs, labels, ids, ref.sha256, str(ref.version))

    # ------------------------------------------------------------------ health and metrics
    @property
    def windows_written(self) -> int:
        """Closed windows stored in the outbox since start."""
        return self.writer.windows_written

    def health(self) -> dict[str, Any]:
        """What /v1/health returns."""
        m = self.agent.model
        rows, nbytes = self.outbox.depth()
        mqtt: dict[str, Any] = {"enabled": False}
        if self.publisher is not None:
            mqtt = {"enabled": True, **self.publisher.health()}
        return {
            "status": "ok",
            "device_id": self.config.device_id,
            "fleet": self.config.fleet,
            "agent_version": agent_version(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "model": {
                **m.ref.to_dict(),
                "runtime": m.runtime,
                "path": str(m.path),
                "target": m.manifest.target,
                "accelerated": bool(getattr(m.predictor.model, "accelerated", False)),
                # what the runtime computes in (OpenVINO reports it; null: the model's own types)
                "precision": getattr(m.predictor.model, "precision", None),
            },
            "mqtt": mqtt,
            "outbox": {
                "rows": rows,
                "bytes": nbytes,
                "dropped_windows": self.outbox.dropped_total,
                "next_seq": self.outbox.next_seq,
                "write_errors": self.writer.window_errors,
            },
            "window": {
                "count": self.agent.window_count(),
                "window_s": self.agent.window_s,
                "window_max_samples": self.agent.window_max_samples,
            },
            "windows_written": self.writer.windows_written,
            "last_window_bytes": self.writer.last_window_bytes,
            "predictions_total": self.agent.predictions_total,
            "schema_violations_total": self.agent.violations_total,
            "reloads_failed": self.reloads_failed,
            "deployment": self.updater.status(),
            "rollback_floor": self.floor.status(),
            "store": {"stale_partials_removed": self.updater.stale_partials_removed},
            "recent_events": list(self.recent_events),
            "capture": {"enabled": False}
            if self.capturer is None
            else {"enabled": True, **self.capturer.counts()},
            "alert_commands": self.alert_follower.status(),
        }

    def gauges(self) -> dict[str, float]:
        """Numbers for /metrics that the daemon (not the HTTP layer) knows."""
        rows, nbytes = self.outbox.depth()
        return {
            "outbox_depth": rows,
            "outbox_bytes": nbytes,
            "dropped_windows_total": self.outbox.dropped_total,
            "windows_total": self.writer.windows_written,
            "windows_not_stored_total": self.writer.window_errors,
            "mqtt_connected": 1.0 if (self.publisher is not None and self.publisher.connected) else 0.0,
            "predictions_total": self.agent.predictions_total,
            "schema_violations_total": self.agent.violations_total,
            "reloads_failed_total": self.reloads_failed,
            "rollback_floor_version": self.floor.version,
            "rollback_refused_total": self.floor.refused_total,
            "in_alert": 1.0 if self.alert_follower.in_alert else 0.0,
            "alert_commands_applied_total": self.alert_follower.applied,
            "alert_commands_refused_total": sum(self.alert_follower.refused.values()),
        }


def _fingerprint(path: Path) -> tuple[Any, ...]:
    """Identify what a bundle path points to now (symlink target, manifest inode, mtime, size)."""
    try:
        real = os.path.realpath(path)
        st = os.stat(Path(real) / "manifest.json")
        return (real, st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        return (str(path), None)


def _replace_bundle(cfg: AgentConfig, bundle: Path) -> AgentConfig:
    from dataclasses import replace

    return replace(cfg, bundle=bundle)
