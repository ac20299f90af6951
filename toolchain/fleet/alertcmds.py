"""The per-device alert command: tell a device, retained, when it enters or leaves drift alert.

``Evaluator.evaluate_many`` (``toolchain.fleet.alerts``) asks ``command_for`` after each evaluation:
when the device's ``in alert`` (drift state ``alert``) differs from what was stored before the
evaluation, including an alert that ends because the device now serves another model (the state
starts over for a new model), it returns the topic ``edgefleet/<fleet>/<device_id>/cmd/alert`` and
the payload (``device_agent.formats.alertcmd``; ``seq`` is the evaluation time in microseconds). The
collector publishes it retained with QoS 1 (``Collector.publish_alert`` tells it from an alert by its
topic), so the device gets the latest word whenever it connects.

A command that cannot be published is never dropped silently: ``CommandTally`` counts it and writes
one rate-limited ERROR line (an evaluator without a sink, a collector without an MQTT client, a
publish the client refused). A command published while the collector is disconnected is queued by
the MQTT client and sent on reconnect (counted as ``queued_offline``); only a collector that dies
before it reconnects loses it, and the next change of state publishes a newer one.
"""

from __future__ import annotations

import logging
import threading

from device_agent.formats.alertcmd import (
    alert_command_topic,
    encode_alert_command,
    is_alert_command_topic,
    seq_for,
)
from toolchain.fleet.ratelog import Throttle

log = logging.getLogger("edgefleet.fleet.alertcmds")

UNSENT_LOG_EVERY_S = 60.0
ALERT = "alert"

__all__ = ["CommandTally", "command_for", "is_alert_command_topic"]


def command_for(
    *,
    fleet: str,
    device_id: str,
    stored_state: str | None,
    new_state: str,
    ts: float,
    model_changed: bool,
    reasons: list[str],
    score: float | None,
    model_sha256: str,
    model_label: str,
) -> tuple[str, bytes] | None:
    """The (topic, payload) to publish after an evaluation, or None when ``in alert`` did not change.

    ``stored_state``: the drift state stored before this evaluation (None: never evaluated);
    ``model_changed``: that state belonged to another model (so the hysteresis started over).
    """
    was = stored_state == ALERT
    now = new_state == ALERT
    if was == now:
        return None
    if now:
        reason = "drift alert: " + ("; ".join(reasons) or "thresholds crossed")
    elif model_changed:
        reason = f"drift state reset: the device now serves {model_label}"
    else:
        reason = f"drift back to {new_state}"
    payload = encode_alert_command(
        fleet=fleet,
        device_id=device_id,
        in_alert=now,
        seq=seq_for(ts),
        state=new_state if new_state in ("ok", "warn", "alert") else None,
        reason=reason,
        score=score,
        model_sha256=model_sha256,
    )
    return alert_command_topic(fleet, device_id), payload


class CommandTally:
    """Count alert commands sent, queued while offline, and not sent; log the unsent ones (rate-limited)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = 0
        self.queued_offline = 0
        self.unsent = 0
        self._throttle = Throttle(log, UNSENT_LOG_EVERY_S)

    def note_sent(self, queued_offline: bool = False) -> None:
        with self._lock:
            self.sent += 1
            self.queued_offline += int(queued_offline)

    def note_unsent(self, topic: str, why: str) -> None:
        """A command that will not reach the broker: count it and say so (at most one line a minute)."""
        with self._lock:
            self.unsent += 1
        self._throttle.log(
            logging.ERROR,
            "alert command on %s NOT published (%s); the device keeps its previous capture rate until the"
            " next change of state is published",
            topic,
            why,
        )

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"sent": self.sent, "queued_offline": self.queued_offline, "unsent": self.unsent}
