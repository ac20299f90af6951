"""Follow the fleet's alert command (``.../cmd/alert``): switch capture to ``on_alert_rate`` in alert.

``AlertFollower.handle(topic, payload)`` runs on the MQTT thread for every message on the device's
``edgefleet/<fleet>/<device_id>/cmd/alert``. A command is applied only when it decodes
(``device_agent.formats.alertcmd``), names this device and fleet, and its ``seq`` is newer than the
last one applied; a command with the same ``seq`` is the retained copy again (counted as a
duplicate, not a refusal). Everything refused is counted by reason (``malformed``, ``foreign``,
``stale``) and logged at most once per ``LOG_EVERY_S`` per reason, with how many were held back.

The applied state lives in ``state_dir/alert_state.json`` (temporary file, fsync, rename), so a
restart keeps the alert before the broker is reachable; a corrupt or unreadable file is logged and
ignored (the device starts out of alert and the retained command corrects it).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_agent.formats.alertcmd import AlertCommand, AlertCommandError, decode_alert_command
from device_agent.formats.telemetry import utc_iso

log = logging.getLogger("edgefleet.alertfollow")

STATE_FILE = "alert_state.json"
STATE_SCHEMA = 1
STATE_MAX_BYTES = 4096
LOG_EVERY_S = 60.0  # one line per refusal reason at most this often (with the count held back)
REASONS = ("malformed", "foreign", "stale")


class AlertFollower:
    """Apply alert commands for one device, persist the applied state, and count what is refused."""

    def __init__(
        self,
        state_dir: Path,
        *,
        fleet: str,
        device_id: str,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(state_dir) / STATE_FILE
        self.fleet = fleet
        self.device_id = device_id
        self.on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self.in_alert = False
        self.seq = 0
        self.since: float | None = None  # when the current state was applied (POSIX time)
        self.reason: str | None = None
        self.applied = 0
        self.duplicates = 0
        self.refused: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.state_file_errors = 0
        self._last_log: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._load()

    # ------------------------------------------------------------------ state file
    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            self.state_file_errors += 1
            log.warning("alert state %s cannot be read (%s); starting out of alert", self.path, e.strerror)
            return
        try:
            if len(raw) > STATE_MAX_BYTES:
                raise ValueError(f"{len(raw)} bytes, over {STATE_MAX_BYTES}")
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("schema") != STATE_SCHEMA:
                raise ValueError("not a schema 1 alert state")
            in_alert, seq, since = doc["in_alert"], doc["seq"], doc["since"]
            reason = doc.get("reason")
            if not isinstance(in_alert, bool) or type(seq) is not int or seq < 0:
                raise ValueError("in_alert must be a boolean and seq an integer >= 0")
            if since is not None and not isinstance(since, (int, float)):
                raise ValueError("since must be a number or null")
            if reason is not None and not isinstance(reason, str):
                raise ValueError("reason must be a string or null")
        except (ValueError, KeyError, TypeError) as e:
            self.state_file_errors += 1
            log.warning(
                "alert state %s is corrupt (%s); ignoring it and starting out of alert until the fleet"
                " says otherwise",
                self.path,
                str(e)[:120],
            )
            return
        self.in_alert, self.seq, self.reason = in_alert, seq, reason
        self.since = float(since) if since is not None else None
        log.info("alert state restored from %s: in_alert=%s (seq %d)", self.path, in_alert, seq)

    def _save(self) -> None:
        from device_agent.store import atomic_write_json

        doc = {
            "schema": STATE_SCHEMA,
            "in_alert": self.in_alert,
            "seq": self.seq,
            "since": self.since,
            "reason": self.reason,
        }
        try:
            atomic_write_json(self.path, doc)
        except OSError as e:  # applied in memory; a restart may fall back to the retained command
            self.state_file_errors += 1
            log.error("cannot write alert state %s (%s); the alert applies until restart", self.path, e)

    # ------------------------------------------------------------------ commands
    def handle(self, topic: str, payload: bytes) -> bool:
        """Apply one command; return True when it changed what is applied. Never raises."""
        try:
            cmd = decode_alert_command(payload)
        except AlertCommandError as e:
            self._refuse("malformed", f"{e} (payload {payload[:120]!r})")
            return False
        except Exception as e:  # noqa: BLE001 - a decoder bug must not stop the MQTT thread
            self._refuse("malformed", f"{type(e).__name__}: {e}")
            return False
        return self.apply(cmd)

    def apply(self, cmd: AlertCommand) -> bool:
        """Apply a decoded command if it is for this device and newer; return True when applied."""
        if cmd.fleet != self.fleet or cmd.device_id != self.device_id:
            self._refuse(
                "foreign",
                f"command for {cmd.fleet}/{cmd.device_id} refused: this is {self.fleet}/{self.device_id}",
            )
            return False
        with self._lock:
            if cmd.seq == self.seq:
                self.duplicates += 1  # the retained command again (reconnect, restart)
                return False
            if cmd.seq < self.seq:
                stale = True
            else:
                stale = False
                changed = cmd.in_alert != self.in_alert
                self.seq = cmd.seq
                self.reason = cmd.reason
                if changed or self.since is None:
                    self.since = self._clock()
                self.in_alert = cmd.in_alert
                self.applied += 1
                self._save()
        if stale:
            self._refuse("stale", f"command seq {cmd.seq} is not newer than the applied seq {self.seq}")
            return False
        log.info(
            "fleet says %s/%s is %s (seq %d%s)",
            self.fleet,
            self.device_id,
            "IN ALERT" if cmd.in_alert else "out of alert",
            cmd.seq,
            f": {cmd.reason}" if cmd.reason else "",
        )
        if self.on_change is not None:
            try:
                self.on_change(cmd.in_alert)
            except Exception:  # noqa: BLE001 - the state is applied and saved; a hook bug is logged
                log.exception("applying the alert state failed")
        return True

    def _refuse(self, reason: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.refused[reason] += 1
            self._held[reason] = self._held.get(reason, 0) + 1
            if now - self._last_log.get(reason, -1e18) < LOG_EVERY_S:
                return
            n = self._held.pop(reason)
            self._last_log[reason] = now
        more = f" ({n} {reason} command(s) since the last such line)" if n > 1 else ""
        log.warning("alert command refused (%s): %s%s", reason, message[:300], more)

    # ------------------------------------------------------------------ health
    def status(self) -> dict[str, Any]:
        """The ``alert_commands`` block of /v1/health."""
        with self._lock:
            return {
                "in_alert": self.in_alert,
                "since": utc_iso(self.since) if self.since is not None else None,
                "seq": self.seq,
                "reason": self.reason,
                "applied": self.applied,
                "duplicates": self.duplicates,
                "refused": dict(self.refused),
                "refused_total": sum(self.refused.values()),
                "state_file_errors": self.state_file_errors,
            }
